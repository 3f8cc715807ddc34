"""Accounting of what providers charge beside the tokens: OpenAI's hosted tools in Responses
answers (web search, file search: per call), DALL·E images (per image, by the size and quality
asked), Anthropic's server tools that have no fee of their own (web fetch, code execution), and
realtime image tokens read from the prompt cache (their own cached rate).

Each upstream answers in the provider's wire format (loopback `ChunkServer`s from
test_accounting_edges, realtime stand-ins from test_realtime_review); the official `openai` and
`anthropic` SDKs are the clients. The cost is checked in the log line and in
`sidegate_cost_usd_total`, and once against a spend limit. Rates: developers.openai.com/api/docs/
pricing (Tools; Image generation) and the model pages; docs.claude.com (Web search, Web fetch,
Code execution tools). At 8d1b4ea (tokens only) every test here that charges a fee failed."""

import io
import json

import anthropic
import httpx
import openai
import pytest

from test_accounting_edges import gateways, sse
from test_cost import metric, wait_line

# Search content, token counts of every answer here.
USAGE = {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 400, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 3400}


@pytest.fixture
def served(tmp_path):
    """`served(chunks, extra_spec="", **kw)`: a gateway in front of a ChunkServer answering `chunks`."""
    with gateways(tmp_path, "acct-tools") as make:
        yield make


def as_json(doc):
    return [json.dumps(doc, indent=2).encode()]


def line_of(g, raw):
    return wait_line(g, raw.headers["cf-aig-log-id"])


def oa(g):
    return openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)


# --- OpenAI Responses: hosted tools charged per call --------------------------------------------
#
# "Web search (all models)": $10.00 / 1k calls; "Web search preview (reasoning models, including
# gpt-5, o-series)": $10.00 / 1k calls; "Web search preview (non-reasoning models)": $25.00 / 1k
# calls, search content tokens free; "File search tool call (Responses API only)": $2.50 / 1k
# calls. A `web_search_call` item is one call when its action is a search (`search`); opening a
# page or finding in it (`open_page`, `find_in_page`) is not charged as one.

def search(id, action):
    return {"type": "web_search_call", "id": id, "status": "completed", "action": action}


OUTPUT = [
    search("ws_1", {"type": "search", "query": "sidegate gateway"}),
    search("ws_2", {"type": "open_page", "url": "https://example.com/sidegate"}),
    search("ws_3", {"type": "search", "query": "sidegate pricing",
                    "sources": [{"type": "url", "url": "https://example.com"}]}),
    {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["pricing"], "results": None},
    {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
     "content": [{"type": "output_text", "annotations": [],
                  "text": 'Two searches. (A quoted item: {"type": "web_search_call"})'}]},
]


def response(model, tools, output=OUTPUT, usage=USAGE):
    return {"id": "resp_tools", "object": "response", "created_at": 1764000000, "status": "completed",
            "error": None, "incomplete_details": None, "model": model, "output": output,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": tools, "usage": usage,
            "metadata": {"type": "web_search_call"}}


PREVIEW = [{"type": "web_search_preview", "search_context_size": "medium"},
           {"type": "file_search", "vector_store_ids": ["vs_1"]}]
GENERAL = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]


def tokens(input_price, output_price):
    return (3000 * input_price + 400 * output_price) / 1e6


@pytest.mark.parametrize("model, tools, want", [
    # Non-reasoning model, preview tool: 2 searches at $25 per 1,000, 1 file search at $2.50.
    pytest.param("gpt-4.1", PREVIEW, tokens(2.0, 8.0) + 2 * 0.025 + 0.0025, id="gpt-4.1-preview"),
    pytest.param("gpt-4o-mini", PREVIEW, tokens(0.15, 0.60) + 2 * 0.025 + 0.0025, id="gpt-4o-mini-preview"),
    # The general tool: $10 per 1,000 on every model; the preview on a reasoning model too.
    pytest.param("gpt-4.1", GENERAL, tokens(2.0, 8.0) + 2 * 0.01 + 0.0025, id="gpt-4.1-general"),
    pytest.param("gpt-5-mini", PREVIEW, tokens(0.25, 2.0) + 2 * 0.01 + 0.0025, id="gpt-5-mini-preview"),
    pytest.param("o4-mini", GENERAL, tokens(1.10, 4.40) + 2 * 0.01 + 0.0025, id="o4-mini-general"),
])
def test_responses_hosted_tool_calls_are_charged_per_call(served, model, tools, want):
    g, _ = served(as_json(response(model, tools)), content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(
        model=model, input="what does sidegate cost?", tools=tools)
    parsed = raw.parse()
    assert [o.type for o in parsed.output].count("web_search_call") == 3
    line = line_of(g, raw)
    assert (line["tokens_in"], line["tokens_out"]) == (3000, 400), line
    assert line["cost"] == pytest.approx(want, rel=1e-9), line
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(want, rel=1e-9)


def test_a_responses_answer_without_hosted_tools_costs_its_tokens(served):
    output = [OUTPUT[-1]]
    g, _ = served(as_json(response("gpt-4.1", PREVIEW, output=output)), content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(model="gpt-4.1", input="hi", tools=PREVIEW)
    assert line_of(g, raw)["cost"] == pytest.approx(tokens(2.0, 8.0), rel=1e-9)


def response_events(model, tools):
    """A Responses stream: each call announced by its own events, then every item again in the
    final `response.completed`."""
    started = dict(response(model, tools, output=[], usage=None), status="in_progress")
    events = [("response.created", {"type": "response.created", "sequence_number": 0, "response": started})]
    seq = 1
    for index, item in enumerate(OUTPUT[:-1]):
        kind = item["type"].removesuffix("_call")
        announced = {k: v for k, v in item.items() if k != "action"} | {"status": "in_progress"}
        for name, data in [
            ("response.output_item.added", {"output_index": index, "item": announced}),
            (f"response.{kind}_call.in_progress", {"output_index": index, "item_id": item["id"]}),
            (f"response.{kind}_call.completed", {"output_index": index, "item_id": item["id"]}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]:
            events.append((name, {"type": name, "sequence_number": seq, **data}))
            seq += 1
    events.append(("response.output_text.delta", {
        "type": "response.output_text.delta", "sequence_number": seq, "item_id": "msg_1", "output_index": 4,
        "content_index": 0, "delta": OUTPUT[-1]["content"][0]["text"]}))
    events.append(("response.completed", {"type": "response.completed", "sequence_number": seq + 1,
                                          "response": response(model, tools)}))
    return sse(*events)


@pytest.mark.parametrize("model, tools, want", [
    pytest.param("gpt-4.1", PREVIEW, tokens(2.0, 8.0) + 2 * 0.025 + 0.0025, id="preview"),
    pytest.param("gpt-5", GENERAL, tokens(1.25, 10.0) + 2 * 0.01 + 0.0025, id="general"),
])
def test_a_streamed_response_is_charged_for_its_calls_once(served, model, tools, want):
    # Each call comes in four events and again in `response.completed`: charged once, from it.
    g, _ = served(response_events(model, tools))
    raw = oa(g).responses.with_raw_response.create(
        model=model, input="what does sidegate cost?", tools=tools, stream=True)
    events = list(raw.parse())
    assert events[-1].type == "response.completed"
    assert sum(e.type == "response.output_item.done" and e.item.type == "web_search_call" for e in events) == 3
    line = line_of(g, raw)
    assert line["outcome"] == "complete" and line["tokens_in"] == 3000, line
    assert line["cost"] == pytest.approx(want, rel=1e-9), line
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(want, rel=1e-9)


def test_a_universal_step_to_the_responses_api_is_charged_for_its_calls(served):
    g, _ = served(as_json(response("gpt-4.1", PREVIEW)), content_type="application/json")
    step = {"provider": "openai", "endpoint": "responses", "headers": {"authorization": "Bearer placeholder"},
            "query": {"model": "gpt-4.1", "input": "what does sidegate cost?", "tools": PREVIEW}}
    r = httpx.post(g.url + "/", json=[step], timeout=30)
    assert r.status_code == 200, r.text
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert line["cost"] == pytest.approx(tokens(2.0, 8.0) + 2 * 0.025 + 0.0025, rel=1e-9), line


def test_search_fees_count_against_the_spend_limit(served):
    # The tokens cost $0.0092; with the searches $0.0617, past the $0.05 limit.
    g, _ = served(as_json(response("gpt-4.1", PREVIEW)), "  spendLimit: {amount: '0.05', period: day}\n",
                  content_type="application/json")
    client = oa(g)
    raw = client.responses.with_raw_response.create(model="gpt-4.1", input="search", tools=PREVIEW)
    assert line_of(g, raw)["cost"] > 0.05
    with pytest.raises(openai.RateLimitError) as e:
        client.responses.create(model="gpt-4.1", input="search again", tools=PREVIEW)
    assert e.value.body[0]["code"] == 2041, e.value.body


# --- DALL·E: per image, by the size and quality asked ------------------------------------------
#
# DALL·E 3: standard $0.04 (1024x1024), $0.08 (1024x1792, 1792x1024); HD $0.08, $0.12.
# DALL·E 2: $0.016 (256x256), $0.018 (512x512), $0.02 (1024x1024). The answer has no usage: each
# image of its `data` is one.

def images(n, key="url"):
    data = [{"url": f"https://oaidalleapiprodscus.example/img-{i}.png", "revised_prompt": 'a "url": cat'}
            if key == "url" else {"b64_json": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk" * 400}
            for i in range(n)]
    return {"created": 1764000000, "data": data}


@pytest.mark.parametrize("asked, answered, want", [
    pytest.param({"model": "dall-e-3"}, images(1), 0.04, id="dall-e-3-defaults"),
    pytest.param({"model": "dall-e-3", "size": "1792x1024", "quality": "hd"}, images(1), 0.12, id="dall-e-3-hd-wide"),
    pytest.param({"model": "dall-e-3", "size": "1024x1792", "quality": "standard", "response_format": "b64_json"},
                 images(1, "b64_json"), 0.08, id="dall-e-3-tall-b64"),
    pytest.param({"model": "dall-e-2", "size": "256x256", "n": 3}, images(3), 3 * 0.016, id="dall-e-2-small"),
    pytest.param({"model": "dall-e-2", "n": 2, "response_format": "b64_json"}, images(2, "b64_json"), 2 * 0.02,
                 id="dall-e-2-defaults"),
])
def test_dalle_images_are_priced_by_size_and_quality(served, asked, answered, want):
    body = json.dumps(answered).encode()
    # Cut inside the answer's data, through a key.
    cut = body.index(b'"url"' if b'"url"' in body else b'"b64_json"') + 3
    g, _ = served([body[:cut], body[cut:]], content_type="application/json")
    raw = oa(g).images.with_raw_response.generate(prompt="a cat", **asked)
    assert len(raw.parse().data) == len(answered["data"])
    line = line_of(g, raw)
    assert (line["model"], line["tokens_in"]) == (asked["model"], None), line
    assert line["cost"] == pytest.approx(want, rel=1e-9), line
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(want, rel=1e-9)


def test_a_dalle_variation_upload_is_priced_by_its_size(served):
    g, _ = served(as_json(images(2)), content_type="application/json")
    raw = oa(g).images.with_raw_response.create_variation(
        image=("cat.png", io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "image/png"),
        model="dall-e-2", n=2, size="512x512")
    assert len(raw.parse().data) == 2
    assert line_of(g, raw)["cost"] == pytest.approx(2 * 0.018, rel=1e-9)


def test_a_universal_step_to_dalle_is_priced_by_its_size_and_quality(served):
    g, _ = served(as_json(images(1)), content_type="application/json")
    step = {"provider": "openai", "endpoint": "images/generations", "headers": {"authorization": "Bearer placeholder"},
            "query": {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1792", "quality": "hd"}}
    r = httpx.post(g.url + "/", json=[step], timeout=30)
    assert r.status_code == 200, r.text
    assert wait_line(g, r.headers["cf-aig-log-id"])["cost"] == pytest.approx(0.12, rel=1e-9)


def test_gpt_image_1_stays_priced_by_its_tokens(served):
    # Its answers have usage: text in $5, image in $10, image out $40 per million; no per-image fee.
    answer = dict(images(1, "b64_json"), usage={
        "input_tokens": 343, "input_tokens_details": {"image_tokens": 323, "text_tokens": 20},
        "output_tokens": 1056, "total_tokens": 1399})
    g, _ = served(as_json(answer), content_type="application/json")
    raw = oa(g).images.with_raw_response.generate(model="gpt-image-1", prompt="a cat", size="1024x1024")
    raw.parse()
    want = (20 * 5 + 323 * 10 + 1056 * 40) / 1e6
    assert line_of(g, raw)["cost"] == pytest.approx(want, rel=1e-9)


# --- Anthropic: server tools without a fee of their own -----------------------------------------
#
# Web fetch: "no additional charges" beyond the tokens. Code execution: billed by container time
# past 1,550 free hours a month ($0.05 an hour), which one answer cannot tell: not charged (README).
def test_anthropic_web_fetches_and_code_executions_cost_their_tokens_only(served):
    usage = {"input_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
             "output_tokens": 300,
             "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 4, "code_execution_requests": 2}}
    message = {"id": "msg_fetch", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
               "content": [{"type": "text", "text": "fetched"}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": usage}
    g, _ = served(as_json(message), content_type="application/json")
    an = anthropic.Anthropic(base_url=g.url + "/anthropic", api_key="placeholder", max_retries=0)
    raw = an.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=256, messages=[{"role": "user", "content": "fetch it"}],
        tools=[{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 5}])
    assert raw.parse().usage.server_tool_use.web_fetch_requests == 4
    assert line_of(g, raw)["cost"] == pytest.approx((2000 * 3 + 300 * 15) / 1e6, rel=1e-9)


# --- Realtime: cached image tokens at their own rate --------------------------------------------
#
# gpt-realtime: text $4 in, $0.40 cached, $16 out; image $5 in, $0.50 cached (model page).
CACHED_IMAGE = {"total_tokens": 3100, "input_tokens": 3000, "output_tokens": 100,
                "input_token_details": {"cached_tokens": 2000, "text_tokens": 1000, "audio_tokens": 0,
                                        "image_tokens": 2000,
                                        "cached_tokens_details": {"text_tokens": 500, "audio_tokens": 0,
                                                                  "image_tokens": 1500}},
                "output_token_details": {"text_tokens": 100, "audio_tokens": 0}}


def test_cached_realtime_images_are_priced_at_the_cached_image_rate(tmp_path):
    from test_realtime_review import one_response_session

    line = one_response_session(tmp_path, "gpt-realtime-2025-08-28", CACHED_IMAGE)
    # 500 fresh text, 500 fresh image, 500 cached text, 1500 cached image; 100 out.
    want = (500 * 4 + 500 * 5 + 500 * 0.40 + 1500 * 0.50 + 100 * 16) / 1e6
    assert line["cost"] == pytest.approx(want, rel=1e-9), line
