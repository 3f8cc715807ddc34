"""Review of the Anthropic Messages API through the gateway: the official `anthropic` SDK on the
passthrough route (`/anthropic/v1/messages`) and the `openai` SDK on `/compat/chat/completions`
with `anthropic/<model>`, against a scripted loopback upstream speaking Anthropic's wire format
(docs.anthropic.com/en/docs/build-with-claude/streaming, /en/api/messages).

Tests marked `# FAILS at 6727912` reproduce bugs found in review; the others pin behaviour that
is right today and that the other modules do not already cover."""

import json
import pathlib
import time

import anthropic
import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from test_compat_fidelity import ScriptedUpstream, anthropic_message, anthropic_stream, sse

CLAUDE = "claude-sonnet-4-5"
COMPAT_CLAUDE = f"anthropic/{CLAUDE}"
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
THINKING = {"thinking": {"type": "enabled", "budget_tokens": 1024}}


def start(tmp_path_factory, name, extra=""):
    up = ScriptedUpstream()
    d = pathlib.Path(tmp_path_factory.mktemp(name))
    g = Sidegate(d, gateway_yaml(up.url, extra_spec=extra), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    return g, up


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    g, up = start(tmp_path_factory, "anthropic-review")
    yield g, up
    g.stop()
    up.stop()


@pytest.fixture
def gw(env):
    g, up = env
    up.reset()
    return g, up


def oai(g):
    return openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0, timeout=20)


def claude(g):
    return anthropic.Anthropic(base_url=g.url + "/anthropic", api_key="placeholder", max_retries=0, timeout=20)


def log_line(g, log_id):
    return json.loads(g.wait_log_line(log_id))


def message_start(usage=None):
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": CLAUDE, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 1}}})


TEXT_START = [
    message_start(),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
]
# "We may occasionally send errors in the event stream. For example, during periods of high usage,
# you may receive an overloaded_error, which would normally correspond to an HTTP 529 in a
# non-streaming context" (docs.anthropic.com/en/docs/build-with-claude/streaming#error-events).
OVERLOADED = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
IN_BAND_FAILURES = {"error-event": sse(TEXT_START + [OVERLOADED]), "no-message-stop": sse(TEXT_START)}


# =================================================================================================
# Bugs
# =================================================================================================

# FAILS at 6727912: a 200 Anthropic stream on the passthrough route that fails in band (an
# `event: error` overloaded_error, or a stream that ends before `message_stop`) is logged
# `success: true, outcome: complete`. The same upstream answer on /compat is logged
# `success: false, outcome: upstream_error`, an OpenAI passthrough stream without `data: [DONE]`
# is too, and the cache already refuses to store it as not whole (cache.rs `ended_whole`): only
# OpenAI-format chat streams are watched for their last event (proxy.rs:954-961, DoneWatch).
@pytest.mark.parametrize("case", list(IN_BAND_FAILURES))
def test_a_passthrough_anthropic_stream_that_fails_in_band_is_logged_as_failed(gw, case):
    g, up = gw
    up.answer(IN_BAND_FAILURES[case], ctype="text/event-stream")
    r = httpx.post(g.url + "/anthropic/v1/messages", timeout=20, headers={"x-api-key": "placeholder"},
                   json={"model": CLAUDE, "max_tokens": 64, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    # Passed through unchanged all the same.
    assert r.status_code == 200 and r.content == IN_BAND_FAILURES[case]
    line = log_line(g, r.headers["cf-aig-log-id"])
    assert (line["success"], line["outcome"]) == (False, "upstream_error"), line
    # The tokens the provider reported are still logged.
    assert (line["tokens_in"], line["tokens_out"]) == (10, 1), line


# FAILS at 6727912: a `cache_control` mark on an assistant message's text part is dropped on the
# way to Anthropic (`openai::assistant_parts` keeps the text only; anthropic.rs:108-109 builds a
# bare text block), so the breakpoint of a multi-turn conversation cached at the assistant's last
# answer never reaches the provider and every turn is billed as fresh input. Anthropic caches
# "content blocks in the messages.content array, for both user and assistant turns"
# (docs.anthropic.com/en/docs/build-with-claude/prompt-caching#what-can-be-cached); user, system,
# tool and tool-result marks are already passed on.
def test_cache_control_on_an_assistant_turn_reaches_anthropic(gw):
    g, up = gw
    mark = {"type": "ephemeral", "ttl": "1h"}
    up.answer(anthropic_message([{"type": "text", "text": "ok"}]))
    oai(g).chat.completions.create(model=COMPAT_CLAUDE, messages=[
        {"role": "user", "content": "Summarize the contract."},
        {"role": "assistant", "content": [{"type": "text", "text": "A long summary.", "cache_control": mark}]},
        {"role": "user", "content": "And the termination clause?"}])
    sent = up.last_body()["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "text", "text": "A long summary.", "cache_control": mark}]}, sent


# =================================================================================================
# Right today (regression suite)
# =================================================================================================

def test_the_same_in_band_failures_are_logged_as_failed_on_compat(gw):
    g, up = gw
    for case, body in IN_BAND_FAILURES.items():
        up.answer(body, ctype="text/event-stream")
        r = httpx.post(g.url + "/compat/chat/completions", timeout=20, headers={"authorization": "Bearer x"},
                       json={"model": COMPAT_CLAUDE, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and '"error"' in r.text and "[DONE]" not in r.text, (case, r.text)
        line = log_line(g, r.headers["cf-aig-log-id"])
        assert (line["success"], line["outcome"]) == (False, "upstream_error"), (case, line)


def test_sdk_stream_with_thinking_redacted_thinking_and_tool_use_passes_through_whole(gw):
    g, up = gw
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000,
             "output_tokens": 1}
    body = anthropic_stream([
        ({"type": "thinking", "thinking": "", "signature": ""},
         [{"type": "thinking_delta", "thinking": "Look it up."}, {"type": "signature_delta", "signature": "EqoBsig=="}]),
        ({"type": "redacted_thinking", "data": "EmwKAhgBEgy"}, []),
        ({"type": "tool_use", "id": "toolu_A", "name": "lookup", "input": {}},
         [{"type": "input_json_delta", "partial_json": ""}, {"type": "input_json_delta", "partial_json": '{"q": "Os'},
          {"type": "input_json_delta", "partial_json": 'lo"}'}]),
        ({"type": "tool_use", "id": "toolu_B", "name": "lookup", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"q": "Rome"}'}]),
    ], stop_reason="tool_use").replace(b'"usage": {"input_tokens": 10, "output_tokens": 1}',
                                       json.dumps({"usage": usage})[1:-1].encode())
    assert b"cache_read_input_tokens" in body
    up.answer(body, ctype="text/event-stream")
    with claude(g).messages.stream(
            model=CLAUDE, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[{"name": "lookup", "input_schema": {"type": "object"}}],
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"}) as s:
        final = s.get_final_message()
        log_id = s.response.headers["cf-aig-log-id"]
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "tool_use", "tool_use"]
    assert final.content[0].signature == "EqoBsig==" and final.content[1].data == "EmwKAhgBEgy"
    assert [(b.id, b.input) for b in final.content[2:]] == [("toolu_A", {"q": "Oslo"}), ("toolu_B", {"q": "Rome"})]
    assert final.stop_reason == "tool_use"
    assert up.requests[-1][1].get("anthropic-beta") == "interleaved-thinking-2025-05-14"
    line = log_line(g, log_id)
    assert (line["success"], line["tokens_in"], line["tokens_out"]) == (True, 3210, 20), line


def test_sdk_raises_a_mid_stream_overloaded_error_unchanged(gw):
    g, up = gw
    up.answer(IN_BAND_FAILURES["error-event"], ctype="text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as e:
        with claude(g).messages.stream(model=CLAUDE, max_tokens=64,
                                       messages=[{"role": "user", "content": "hi"}]) as s:
            for _ in s:
                pass
    assert e.value.body == OVERLOADED[1]


def test_compat_stream_with_a_server_tool_and_citations_keeps_only_text_and_function_calls(gw):
    g, up = gw
    # A web search answer (docs.anthropic.com/en/docs/agents-and-tools/tool-use/web-search-tool):
    # server_tool_use, web_search_tool_result, cited text, then a client tool call.
    up.answer(anthropic_stream([
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Searching. "}]),
        ({"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"query": "oslo weather"}'}]),
        ({"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
            {"type": "web_search_result", "title": "Oslo", "url": "https://w.example", "encrypted_content": "Eqgf",
             "page_age": None}]}, []),
        ({"type": "text", "text": ""}, [
            {"type": "text_delta", "text": "It is sunny."},
            {"type": "citations_delta", "citation": {"type": "web_search_result_location", "cited_text": "sunny",
                                                     "url": "https://w.example", "title": "Oslo",
                                                     "encrypted_index": "Eo8B"}}]),
        ({"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"q":'}, {"type": "input_json_delta", "partial_json": '"x"}'}]),
    ], stop_reason="tool_use"), ctype="text/event-stream")
    chunks = list(oai(g).chat.completions.create(model=COMPAT_CLAUDE, messages=[{"role": "user", "content": "hi"}],
                                                 tools=[TOOL], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == "Searching. It is sunny." and finish == ["tool_calls"]
    assert {tc.index for tc in calls} == {0} and calls[0].id == "toolu_01"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"q":"x"}'
    assert chunks[-1].usage.total_tokens == 30


def test_compat_interleaved_thinking_tool_loop_round_trips_the_signed_blocks(gw):
    g, up = gw
    up.answer(anthropic_stream([
        ({"type": "thinking", "thinking": "", "signature": ""},
         [{"type": "thinking_delta", "thinking": "Need A."}, {"type": "signature_delta", "signature": "sigA"}]),
        ({"type": "tool_use", "id": "toolu_A", "name": "lookup", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"a":1}'}]),
        ({"type": "thinking", "thinking": "", "signature": ""},
         [{"type": "thinking_delta", "thinking": "Need B."}, {"type": "signature_delta", "signature": "sigB"}]),
        ({"type": "tool_use", "id": "toolu_B", "name": "lookup", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"b":2}'}]),
    ], stop_reason="tool_use"), ctype="text/event-stream")
    c = oai(g)
    with c.chat.completions.stream(model=COMPAT_CLAUDE, messages=[{"role": "user", "content": "hi"}], tools=[TOOL],
                                   extra_body=THINKING,
                                   extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"}) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert up.requests[-1][1].get("anthropic-beta") == "interleaved-thinking-2025-05-14"
    m = final.choices[0].message
    blocks = m.model_dump()["thinking_blocks"]
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(t.id, t.function.arguments) for t in m.tool_calls] == [("toolu_A", '{"a":1}'), ("toolu_B", '{"b":2}')]
    assert [(b["thinking"], b["signature"]) for b in blocks] == [("Need A.", "sigA"), ("Need B.", "sigB")]
    up.answer(anthropic_message([{"type": "text", "text": "done"}]))
    out = c.chat.completions.create(model=COMPAT_CLAUDE, tools=[TOOL], extra_body=THINKING, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in m.tool_calls],
         "thinking_blocks": blocks},
        {"role": "tool", "tool_call_id": "toolu_A", "content": "1"},
        {"role": "tool", "tool_call_id": "toolu_B", "content": "2"}])
    assert out.choices[0].message.content == "done"
    sent = up.last_body()["messages"]
    assert sent[1]["content"][:2] == [{"type": "thinking", "thinking": "Need A.", "signature": "sigA"},
                                      {"type": "thinking", "thinking": "Need B.", "signature": "sigB"}]
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_A", "content": "1"},
        {"type": "tool_result", "tool_use_id": "toolu_B", "content": "2"}]}


def test_compat_pdf_file_part_becomes_a_cached_document_block(gw):
    g, up = gw
    mark = {"type": "ephemeral", "ttl": "1h"}
    up.answer(anthropic_message([{"type": "text", "text": "ok"}], usage={
        "input_tokens": 5, "cache_creation_input_tokens": 900, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 900}, "output_tokens": 2}))
    out = oai(g).chat.completions.create(model=COMPAT_CLAUDE, stop=["END"], messages=[{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"},
         "cache_control": mark},
        {"type": "text", "text": "Summarize"}]}])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (905, 2)
    sent = up.last_body()
    assert sent["stop_sequences"] == ["END"]
    assert sent["messages"][0]["content"][0] == {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"},
        "cache_control": mark}


@pytest.fixture(scope="module")
def dlp_env(tmp_path_factory):
    g, up = start(tmp_path_factory, "anthropic-review-dlp",
                  "  dlp:\n    policies:\n      - {id: ssn, action: FLAG, check: [RESPONSE], profiles: [us-ssn]}\n")
    yield g, up
    g.stop()
    up.stop()


@pytest.mark.parametrize("where", ["tool-input", "thinking"])
@pytest.mark.parametrize("route", ["passthrough", "compat"])
def test_dlp_reads_streamed_tool_input_and_thinking_split_across_deltas(dlp_env, where, route):
    g, up = dlp_env
    up.reset()
    blocks = {
        "tool-input": [({"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {}},
                        [{"type": "input_json_delta", "partial_json": '{"ssn": "123-4'},
                         {"type": "input_json_delta", "partial_json": '5-6789"}'}])],
        "thinking": [({"type": "thinking", "thinking": "", "signature": ""},
                      [{"type": "thinking_delta", "thinking": "It is 123-4"},
                       {"type": "thinking_delta", "thinking": "5-6789."},
                       {"type": "signature_delta", "signature": "sig"}]),
                     ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "ok"}])],
    }[where]
    up.answer(anthropic_stream(blocks, stop_reason="tool_use"), ctype="text/event-stream")
    if route == "passthrough":
        r = httpx.post(g.url + "/anthropic/v1/messages", timeout=20, headers={"x-api-key": "placeholder"},
                       json={"model": CLAUDE, "max_tokens": 64, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
    else:
        r = httpx.post(g.url + "/compat/chat/completions", timeout=20, headers={"authorization": "Bearer x"},
                       json={"model": COMPAT_CLAUDE, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert json.loads(r.headers["cf-aig-dlp"]) == [{"policy": "ssn", "profiles": ["us-ssn"], "check": "RESPONSE"}]


def test_gateway_cache_keys_on_anthropic_beta_on_both_routes(tmp_path_factory):
    g, up = start(tmp_path_factory, "anthropic-review-cache", "  cache: {enabled: true}\n")
    try:
        for path, body in [("/compat/chat/completions", {"model": COMPAT_CLAUDE, "messages": [{"role": "user", "content": "hi"}]}),
                           ("/anthropic/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})]:
            statuses = []
            for beta in ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07", "context-1m-2025-08-07"]:
                up.answer(anthropic_message([{"type": "text", "text": beta}]))
                r = httpx.post(g.url + path, json=body, timeout=20,
                               headers={"x-api-key": "x", "authorization": "Bearer x", "anthropic-beta": beta})
                assert r.status_code == 200 and beta in r.text
                statuses.append(r.headers["cf-aig-cache-status"])
            assert statuses == ["MISS", "MISS", "HIT"], path
            up.reset()
    finally:
        g.stop()
        up.stop()
