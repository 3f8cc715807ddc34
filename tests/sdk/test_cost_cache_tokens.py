"""Tokens and cost of answers with prompt-cache reads and writes and with thinking: input is
all of it (fresh, cache reads, cache writes) as the providers bill it, cache reads and writes
are priced by the provider's rule, Gemini's thinking is output; passthrough and /compat charge
the same upstream answer the same."""

import json
import pathlib
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate
from test_cost import wait_line

GOOGLE_KEY = "AIza-sidegate-test-cache-tokens"

# Claude Sonnet 4.5: $3 in, $15 out; cache reads 0.1x, 5-minute writes 1.25x.
ANTHROPIC_CACHE_READ = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 50, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 100000,
              "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
              "output_tokens": 500, "service_tier": "standard"},
}
# 50 x 3 + 100000 x 0.30 + 500 x 15, per million (0.00765 when the cache read was dropped).
ANTHROPIC_CACHE_READ_COST = 0.03765

# Gemini 2.5 Pro: $1.25 in, $10 out; thinking is output.
GEMINI_THINKING = {
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 200,
                      "totalTokenCount": 3200,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1000}],
                      "thoughtsTokenCount": 2000},
    "modelVersion": "gemini-2.5-pro", "responseId": "r1",
}
# 1000 x 1.25 + 2200 x 10, per million (0.00325 when the thinking was dropped).
GEMINI_THINKING_COST = 0.02325


def gateway(tmp_path, upstream_url, extra_spec=""):
    d = pathlib.Path(tmp_path) / f"gw-{time.monotonic_ns()}"
    d.mkdir()
    yaml = (
        "schemaVersion: 1\n"
        "gateway: {namespace: team-a, name: cache-tokens}\n"
        "spec:\n"
        "  providers:\n"
        f"    anthropic: {{baseURL: '{upstream_url}'}}\n"
        f"    google-ai-studio: {{baseURL: '{upstream_url}'}}\n"
        + extra_spec
    )
    keys = dict(DEFAULT_KEYS, **{"google-ai-studio.default": GOOGLE_KEY})
    return Sidegate(d, yaml, keys, extra_args=["--log-format", "json"])


@pytest.fixture
def served(tmp_path):
    """A gateway in front of an upstream that answers every request with `answer`."""
    made = []

    def make(answer):
        upstream = FixedAnswerServer(json.dumps(answer).encode())
        g = gateway(tmp_path, upstream.url)
        made.append((g, upstream))
        return g

    yield make
    for g, upstream in made:
        g.stop()
        upstream.stop()


def test_anthropic_cache_reads_are_input_priced_at_the_cache_rate_on_both_routes(served):
    g = served(ANTHROPIC_CACHE_READ)
    r = httpx.post(g.url + "/anthropic/v1/messages", timeout=30, json={
        "model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (100050, 500), line
    assert line["cost"] == pytest.approx(ANTHROPIC_CACHE_READ_COST, rel=1e-9)

    r = httpx.post(g.url + "/compat/chat/completions", timeout=30, json={
        "model": "anthropic/claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 100050
    assert usage["prompt_tokens_details"]["cached_tokens"] == 100000
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (100050, 500), line
    assert line["cost"] == pytest.approx(ANTHROPIC_CACHE_READ_COST, rel=1e-9)


def test_cache_prices_in_spec_pricing_replace_the_providers_rule(tmp_path):
    # Sonnet 4.5 with its cache reads at $0.50 (0.30 by Anthropic's rule): 50 x 3 + 100000 x 0.50
    # + 500 x 15, per million; a price the config cannot read is refused at load, by field.
    upstream = FixedAnswerServer(json.dumps(ANTHROPIC_CACHE_READ).encode())
    g = gateway(tmp_path, upstream.url, "  pricing:\n    - {model: claude-sonnet-4-5, inputPerMillion: '3',"
                " outputPerMillion: '15', cacheReadPerMillion: '0.50'}\n")
    try:
        r = httpx.post(g.url + "/anthropic/v1/messages", timeout=30, json={
            "model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert wait_line(g, r.headers["cf-aig-log-id"])["cost"] == pytest.approx(0.05765, rel=1e-9)
    finally:
        g.stop()
        upstream.stop()
    d = pathlib.Path(tmp_path) / "refused"
    d.mkdir()
    with pytest.raises(Exception) as refused:
        Sidegate(d, "schemaVersion: 1\nspec:\n  pricing:\n    - {model: m, inputPerMillion: '1',"
                    " outputPerMillion: '1', cacheWritePerMillion: 'cheap'}\n", DEFAULT_KEYS)
    assert "spec.pricing[0].cacheWritePerMillion" in str(refused.value), refused.value


def test_gemini_thinking_is_output_on_both_routes(served):
    g = served(GEMINI_THINKING)
    r = httpx.post(g.url + "/google-ai-studio/v1beta/models/gemini-2.5-pro:generateContent",
                   timeout=30, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert r.status_code == 200, r.text
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (1000, 2200), line
    assert line["cost"] == pytest.approx(GEMINI_THINKING_COST, rel=1e-9)

    r = httpx.post(g.url + "/compat/chat/completions", timeout=30, json={
        "model": "google-ai-studio/gemini-2.5-pro",
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (1000, 2200), line
    assert line["cost"] == pytest.approx(GEMINI_THINKING_COST, rel=1e-9)


ANTHROPIC_CACHE_READ_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_s","type":"message",'
    b'"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
    b'"usage":{"input_tokens":50,"cache_creation_input_tokens":0,"cache_read_input_tokens":100000,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":500}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("path, model", [
    ("/anthropic/v1/messages", "claude-sonnet-4-5"),
    ("/compat/chat/completions", "anthropic/claude-sonnet-4-5"),
])
def test_a_streamed_anthropic_cache_read_costs_what_the_whole_answer_does(tmp_path, path, model):
    from test_compat_outcomes import RawStreamServer
    upstream = RawStreamServer(ANTHROPIC_CACHE_READ_STREAM)
    g = gateway(tmp_path, upstream.url)
    try:
        r = httpx.post(g.url + path, timeout=30, json={
            "model": model, "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and "hi" in r.text, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"]) == (100050, 500), line
        assert line["cost"] == pytest.approx(ANTHROPIC_CACHE_READ_COST, rel=1e-9)
    finally:
        g.stop()
        upstream.stop()


# Claude Sonnet 4.5 writing 1000 tokens to the prompt cache (5-minute, 1.25x) and 2000 for an
# hour (2x): 10 x 3 + 1000 x 3.75 + 2000 x 6 + 5 x 15, per million; the OpenAI format has no field
# for cache writes, so /compat must count the provider's own usage to charge them.
ANTHROPIC_CACHE_WRITE_USAGE = (
    '"usage":{"input_tokens":10,"cache_creation_input_tokens":3000,"cache_read_input_tokens":0,'
    '"cache_creation":{"ephemeral_5m_input_tokens":1000,"ephemeral_1h_input_tokens":2000},"output_tokens":5}')
ANTHROPIC_CACHE_WRITE_COST = (10 * 3 + 1000 * 3.75 + 2000 * 6 + 5 * 15) / 1e6
ANTHROPIC_CACHE_WRITE = json.loads(
    '{"id":"msg_w","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",'
    '"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,'
    + ANTHROPIC_CACHE_WRITE_USAGE + '}')
ANTHROPIC_CACHE_WRITE_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_w","type":"message",'
    b'"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
    + ANTHROPIC_CACHE_WRITE_USAGE.replace('"output_tokens":5', '"output_tokens":1').encode() + b'}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":5}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path, model", [
    ("/anthropic/v1/messages", "claude-sonnet-4-5"),
    ("/compat/chat/completions", "anthropic/claude-sonnet-4-5"),
])
def test_anthropic_cache_writes_cost_the_same_on_both_routes(tmp_path, path, model, stream):
    from test_compat_outcomes import RawStreamServer
    upstream = (RawStreamServer(ANTHROPIC_CACHE_WRITE_STREAM) if stream
                else FixedAnswerServer(json.dumps(ANTHROPIC_CACHE_WRITE).encode()))
    g = gateway(tmp_path, upstream.url)
    try:
        r = httpx.post(g.url + path, timeout=30, json={
            "model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and "hi" in r.text, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"]) == (3010, 5), line
        assert line["cost"] == pytest.approx(ANTHROPIC_CACHE_WRITE_COST, rel=1e-9), line
    finally:
        g.stop()
        upstream.stop()


OPENAI_CACHED_STREAM = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[],'
    b'"usage":{"prompt_tokens":100000,"completion_tokens":1000,"total_tokens":101000,'
    b'"prompt_tokens_details":{"cached_tokens":90000}}}\n\n'
    b'data: [DONE]\n\n'
)


def test_an_openai_streams_cache_reads_cost_the_same_with_a_spend_limit(tmp_path):
    # Under a spend limit the gateway reads the usage chunk it holds out of the client's stream:
    # its cached tokens are priced at the cache rate there too.
    from test_compat_outcomes import RawStreamServer
    upstream = RawStreamServer(OPENAI_CACHED_STREAM)
    costs = []
    try:
        for spec in ("", "  spendLimit: {amount: '1000', period: day}\n"):
            d = pathlib.Path(tmp_path) / f"gw-{time.monotonic_ns()}"
            d.mkdir()
            yaml = ("schemaVersion: 1\ngateway: {namespace: team-a, name: cached-stream}\nspec:\n"
                    f"  providers:\n    openai: {{baseURL: '{upstream.url}/v1'}}\n{spec}")
            g = Sidegate(d, yaml, DEFAULT_KEYS, extra_args=["--log-format", "json"])
            try:
                r = httpx.post(g.url + "/openai/chat/completions", timeout=30, json={
                    "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                # With the limit, the usage chunk the client did not ask for is held out.
                assert ('"choices":[],' in r.text) == (spec == ""), r.text
                line = wait_line(g, r.headers["cf-aig-log-id"])
                assert (line["tokens_in"], line["tokens_out"]) == (100000, 1000), line
                costs.append(line["cost"])
            finally:
                g.stop()
    finally:
        upstream.stop()
    # gpt-4o: $2.50 in ($1.25 cached), $10 out.
    expected = (10000 * 2.5 + 90000 * 1.25 + 1000 * 10) / 1e6
    assert costs == [pytest.approx(expected, rel=1e-9)] * 2, costs
