"""Review of 569cdeb: OpenAI's hosted tool calls (web search, file search) charged per call.

Reuses test_accounting_tools' upstream (a loopback ChunkServer per gateway), its Responses
answers and its helpers; the official `openai` SDK is the client where it can be. Every test
marked `# Failed at 03f0e25` failed there (mended since); the one unmarked (a stream cut before its final event)
passes and is the reference its neighbour is held to.

Rates (developers.openai.com/api/docs/pricing, Tools, as README and cost.rs quote them):
"Web search (all models)": $10.00 / 1k calls; "Web search preview (non-reasoning models)":
$25.00 / 1k calls; "File search tool call (Responses API only)": $2.50 / 1k calls."""

import json

import httpx
import openai
import pytest

from test_accounting_edges import gateways
from test_accounting_tools import (  # noqa: F401  (`served` is a fixture, used by name)
    CACHED_IMAGE, GENERAL, OUTPUT, PREVIEW, as_json, images, line_of, oa, response, response_events, served,
    tokens)
from test_cost import metric, wait_line

# OUTPUT: 2 web searches (a third call only opened a page), 1 file search.
GENERAL_FEES = 2 * 0.01 + 0.0025
PREVIEW_FEES = 2 * 0.025 + 0.0025


# --- Models outside the hard-coded families pay no tool fee ---------------------------------------
#
# README: "each `web_search_call` whose action is a search costs $10 per 1,000 (`web_search`, any
# model) ... Each `file_search_call` costs $2.50 per 1,000", and "`spec.pricing` adds or overrides
# models". ToolFees::of gives fees only to names that are or continue `gpt-4o`, `gpt-4.1`, `gpt-5`,
# `o1`, `o3`, `o4-mini` after `-`, `@` or `:`: `gpt-5.2` (`.` is no boundary), `gpt-5.5`, a
# fine-tune (`ft:gpt-4.1-mini:...`), any other name the operator prices, get none. The SDK installed here lists gpt-5.1 ... gpt-6.1 as the
# current models; the built-in table has gpt-5.1 and gpt-5.2 (at the prices given here) but none
# after them, so spec.pricing is how those get a price.
# Failed at 03f0e25 (mended since): a web search and a file search of gpt-5.2 / gpt-5.5 priced by spec.pricing cost nothing beside the tokens
@pytest.mark.parametrize("model, input_price, output_price", [
    pytest.param("gpt-5.2", 1.75, 14.0, id="gpt-5.2"),
    pytest.param("gpt-5.5", 5.0, 30.0, id="gpt-5.5"),
])
def test_hosted_tool_calls_of_a_model_priced_by_spec_pricing_cost_their_fees(served, model, input_price, output_price):
    pricing = f"  pricing:\n    - {{model: {model}, inputPerMillion: '{input_price}', outputPerMillion: '{output_price}'}}\n"
    g, _ = served(as_json(response(model, GENERAL)), pricing, content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(model=model, input="what does sidegate cost?", tools=GENERAL)
    assert [o.type for o in raw.parse().output].count("web_search_call") == 3
    line = line_of(g, raw)
    assert (line["tokens_in"], line["tokens_out"]) == (3000, 400), line
    want = tokens(input_price, output_price) + GENERAL_FEES
    assert line["cost"] == pytest.approx(want, rel=1e-9), line
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(want, rel=1e-9)


# --- What the app writes passes for items and final events ------------------------------------------
#
# The commit passes over the response's `metadata` "so that it cannot pass for an item or a final
# event", but the response echoes other values the app writes, and its file search results carry
# the attributes the app set on its vector store files (`attributes`: "Set of 16 key-value pairs",
# openai-python types/responses/response_file_search_tool_call.py), tools' JSON schemas
# (`parameters` of a function tool, echoed in `tools`), `text.format.schema`, MCP servers'
# `input_schema`s. A `"type"` pair there is read as an item's: a file labelled `type: open_page`
# cancels a real search, a `{"type": "response.completed"}` in a schema (after `output`, as OpenAI
# orders its fields) drops every call before it; `type: web_search_call` adds a call never made.
def file_hits(attributes):
    hit = {"file_id": "file_1", "filename": "handbook.pdf", "score": 0.92, "text": "pricing", "attributes": attributes}
    return {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["pricing"],
            "results": [hit, dict(hit, file_id="file_2")]}


SCHEMA_TOOL = {"type": "function", "name": "lookup", "strict": False, "description": "Look up a record.",
               "parameters": {"type": "object", "properties": {
                   "filter": {"type": "object", "default": {"type": "response.completed"}}}}}


# Failed at 03f0e25 (mended since): app-written "type" values (file attributes, a tool's JSON schema) are counted as items or a final event: searches dropped or added
@pytest.mark.parametrize("output, tools", [
    # Two searches, one page opened, a file search whose two hits are labelled `type: open_page`:
    # charged 0 searches.
    pytest.param([OUTPUT[0], OUTPUT[1], OUTPUT[2], file_hits({"type": "open_page"}), OUTPUT[-1]], GENERAL,
                 id="file-attributes-cancel-searches"),
    # Labelled `type: web_search_call`: charged 4 searches.
    pytest.param([OUTPUT[0], OUTPUT[1], OUTPUT[2], file_hits({"type": "web_search_call", "year": 2026}),
                  OUTPUT[-1]], GENERAL, id="file-attributes-add-searches"),
    # A function tool's schema holds `{"type": "response.completed"}`: charged nothing beside tokens.
    pytest.param(OUTPUT, GENERAL + [SCHEMA_TOOL], id="tool-schema-ends-the-answer"),
])
def test_app_written_values_in_a_response_do_not_pass_for_hosted_tool_calls(served, output, tools):
    g, _ = served(as_json(response("gpt-4.1", tools, output=output)), content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(model="gpt-4.1", input="what does sidegate cost?", tools=tools)
    parsed = raw.parse()
    searches = [o for o in parsed.output if o.type == "web_search_call" and o.action.type == "search"]
    assert len(searches) == 2 and [o.type for o in parsed.output].count("file_search_call") == 1
    line = line_of(g, raw)
    assert line["cost"] == pytest.approx(tokens(2.0, 8.0) + GENERAL_FEES, rel=1e-9), line


# --- A stream cut inside its final event ---------------------------------------------------------
#
# README: "A stream is charged for the items of its final event's response (`response.completed`,
# ...); one that ends before it, for its `response.web_search_call.completed` and
# `response.file_search_call.completed` events." A stream cut before `response.completed` is
# charged so (3 calls at $25 per 1,000 + 1 file search: $0.0775, test below passes); one cut a
# few bytes into that event -- the connection dropped while the event carrying the whole response
# (every item again, the full text) was on its way, no usage arrived -- is charged nothing: the
# event's `"type"` reset the counts and no item of its response came.
def cut_stream(g):
    r = httpx.post(g.url + "/openai/responses", headers={"authorization": "Bearer placeholder"}, timeout=30,
                   json={"model": "gpt-4.1", "input": "what does sidegate cost?", "tools": PREVIEW, "stream": True})
    assert r.status_code == 200
    return wait_line(g, r.headers["cf-aig-log-id"])


CUT_FEES = 3 * 0.025 + 0.0025


def test_a_stream_cut_before_its_final_event_is_charged_for_its_completed_calls(served):
    g, _ = served(response_events("gpt-4.1", PREVIEW)[:-1])
    line = cut_stream(g)
    assert (line["tokens_in"], line["cost"]) == (None, pytest.approx(CUT_FEES, rel=1e-9)), line


# Failed at 03f0e25 (mended since): a stream cut inside its response.completed event is charged nothing (its 3 completed searches and file search dropped)
def test_a_stream_cut_inside_its_final_event_is_charged_for_its_completed_calls(served):
    events = response_events("gpt-4.1", PREVIEW)
    final = events[-1]
    assert final.startswith(b"event: response.completed\n")
    # The event's name, its `"type"` and the start of its response: no item yet.
    g, _ = served(events[:-1] + [final[:120]])
    line = cut_stream(g)
    assert line["tokens_in"] is None, line
    assert line["cost"] == pytest.approx(CUT_FEES, rel=1e-9), line


# Failed at 03f0e25 (mended since): cut after the final event's items but before its `tools`, the searches fall to the $10 rate though the stream declared only web_search_preview
def test_a_stream_cut_inside_its_final_event_keeps_the_preview_rate(served):
    events = response_events("gpt-4.1", PREVIEW)
    final = events[-1]
    # Its response's output (all four calls) came, its `tools` (after `output`) did not.
    keep = final.index(b'"type":"message"')
    assert b'"tools"' not in final[:keep]
    g, _ = served(events[:-1] + [final[:keep]])
    line = cut_stream(g)
    # The calls of the items seen ($0.0525) or of the completed events ($0.0775): at the
    # preview's $25 per 1,000 either way, as `response.created` declared only that tool.
    assert line["cost"] is not None and line["cost"] >= PREVIEW_FEES - 1e-12, line


# The same in a stream: `response.created` and `response.completed` echo the schema in their
# `tools`, the final response lists file hits labelled by the app; the stream announced its
# items in events whose own `type` is the provider's.
# Failed at e9bdb02 (mended since): the schema's `{"type": "response.completed"}` in the final event's tools dropped its searches
def test_app_written_values_in_a_stream_do_not_pass_for_hosted_tool_calls_or_its_end(served):
    tools = GENERAL + [SCHEMA_TOOL]
    events = [e.replace(b'"results":null', json.dumps({"results": file_hits({"type": "open_page"})["results"]},
                                                       separators=(",", ":"))[1:-1].encode())
              for e in response_events("gpt-4.1", tools)]
    assert b'"attributes":{"type":"open_page"}' in events[-1]
    g, _ = served(events)
    raw = oa(g).responses.with_raw_response.create(model="gpt-4.1", input="what does sidegate cost?", tools=tools,
                                                  stream=True)
    assert [e.type for e in raw.parse()][-1] == "response.completed"
    line = line_of(g, raw)
    assert line["tokens_in"] == 3000, line
    assert line["cost"] == pytest.approx(tokens(2.0, 8.0) + GENERAL_FEES, rel=1e-9), line


# --- In the review's report, mended and tested since ----------------------------------------------
#
# The preview's $25 rate follows GPT-4.1 into its fine-tunes (`ft:{base}:{org}::{id}`), which only
# spec.pricing prices.
# Failed at e9bdb02 (mended since): a fine-tune got no tool fee at all
def test_a_fine_tune_of_gpt_4_1_pays_the_preview_rate_of_its_family(served):
    model = "ft:gpt-4.1-mini-2025-04-14:acme::b7x2k9"
    pricing = f"  pricing:\n    - {{model: '{model}', inputPerMillion: '0.80', outputPerMillion: '3.20'}}\n"
    g, _ = served(as_json(response(model, PREVIEW)), pricing, content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(model=model, input="what does sidegate cost?", tools=PREVIEW)
    line = line_of(g, raw)
    assert line["cost"] == pytest.approx(tokens(0.80, 3.20) + PREVIEW_FEES, rel=1e-9), line


# A name that adds `-mini` (or nano, lite, pro) to a model of the table is another model:
# gpt-5-codex-mini costs $0.25/$2, not gpt-5's $1.25/$10. Unknown, it has no cost (and a warning
# under a spend limit); named in spec.pricing, its own price.
# Failed at e9bdb02 (mended since; unpriced): priced as gpt-5, $1.25/$10
@pytest.mark.parametrize("pricing, want", [
    pytest.param("", None, id="unpriced"),
    pytest.param("  pricing:\n    - {model: gpt-5-codex-mini, inputPerMillion: '0.25', outputPerMillion: '2'}\n",
                 tokens(0.25, 2.0) + GENERAL_FEES, id="spec-pricing"),
])
def test_a_mini_the_table_does_not_know_is_not_priced_as_its_big_sibling(served, pricing, want):
    model = "gpt-5-codex-mini"
    g, _ = served(as_json(response(model, GENERAL)), pricing, content_type="application/json")
    raw = oa(g).responses.with_raw_response.create(model=model, input="what does sidegate cost?", tools=GENERAL)
    line = line_of(g, raw)
    assert line["tokens_in"] == 3000, line
    assert line["cost"] == (want if want is None else pytest.approx(want, rel=1e-9)), line


# DALL·E 2 makes standard images only (`quality`: "hd ... only supported for dall-e-3"): asked for
# HD it is priced as the standard image of its size, not at the 1024x1024 default.
# Failed at e9bdb02 (mended since): priced at the 1024x1024 default, $0.02 an image
def test_dalle_2_asked_for_hd_is_priced_as_the_standard_image_of_its_size(served):
    g, _ = served(as_json(images(2)), content_type="application/json")
    raw = oa(g).images.with_raw_response.generate(model="dall-e-2", prompt="a cat", size="256x256", quality="hd", n=2)
    assert len(raw.parse().data) == 2
    assert line_of(g, raw)["cost"] == pytest.approx(2 * 0.016, rel=1e-9)


# Cached image input $0.08 per million on the realtime minis, against cached text $0.06
# (developers.openai.com/api/docs/models/gpt-realtime-2.1-mini, which compares it with
# gpt-realtime-mini at the same prices); gpt-realtime-2.1-mini is a mini ($0.60/$2.40 text, $0.80
# image), not gpt-realtime ($4/$16, $5).
# Failed at e9bdb02 (mended since): cached images at the cached text's $0.06; gpt-realtime-2.1-mini priced as gpt-realtime
@pytest.mark.parametrize("model", ["gpt-realtime-mini", "gpt-realtime-2.1-mini"])
def test_cached_realtime_mini_images_are_priced_at_their_own_rate(tmp_path, model):
    from test_realtime_review import one_response_session

    line = one_response_session(tmp_path, model, CACHED_IMAGE)
    # 500 fresh text, 500 fresh image, 500 cached text, 1500 cached image; 100 out.
    want = (500 * 0.60 + 500 * 0.80 + 500 * 0.06 + 1500 * 0.08 + 100 * 2.40) / 1e6
    assert line["cost"] == pytest.approx(want, rel=1e-9), line


# Azure OpenAI answers in OpenAI's format: a deployment's Responses answer is read for its hosted
# tool calls, and a DALL·E deployment's images are counted, at OpenAI's rates (as their tokens
# are priced), the deployment's name naming the model.
# Failed at e9bdb02 (mended since): Azure answers were not read for tool calls nor images
def test_azure_openai_responses_and_dalle_deployments_are_charged_as_openais(tmp_path):
    azure = {"azure-openai": ("/openai/deployments/{deployment}", "sgtestkey-azure-fees")}
    with gateways(tmp_path, "acct-azure", providers=azure) as make:
        g, up = make(as_json(response("gpt-4o", PREVIEW)), content_type="application/json")
        r = httpx.post(g.url + "/azure-openai/res/gpt-4o/responses?api-version=2025-04-01-preview", timeout=30,
                       json={"model": "gpt-4o", "input": "what does sidegate cost?", "tools": PREVIEW})
        assert r.status_code == 200, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["provider"], line["model"], line["tokens_in"]) == ("azure-openai", "gpt-4o", 3000), line
        assert line["cost"] == pytest.approx(tokens(2.5, 10.0) + PREVIEW_FEES, rel=1e-9), line
        up.chunks = as_json(images(1))
        client = openai.AzureOpenAI(azure_endpoint=g.url + "/azure-openai/res", api_key="placeholder",
                                    api_version="2024-10-21", max_retries=0)
        raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="a cat", size="1792x1024",
                                                       quality="hd")
        assert len(raw.parse().data) == 1
        line = line_of(g, raw)
        assert (line["provider"], line["model"]) == ("azure-openai", "dall-e-3"), line
        assert line["cost"] == pytest.approx(0.12, rel=1e-9), line
        assert up.bodies[-1] and json.loads(up.bodies[-1])["quality"] == "hd"
