"""Built-in prices of the newer models, as the log line shows them: GPT-5.1 and 5.2 (`.` is no
name boundary, so neither is priced as gpt-5, nor a later point release as either), xAI's fast
Grok 3 models (`fast` names a sibling priced otherwise), and gpt-4o-mini-tts speech (text tokens
in, audio tokens out, counted only where the answer reports them).

Figures: gpt-5.1 $1.25 in, $0.125 cached, $10 out per million (its model page,
developers.openai.com); gpt-5.2 $1.75 / $0.175 / $14; gpt-5.1-codex-mini $0.25 / $2;
grok-3-fast $5 / $1.25 cached / $25 (docs.x.ai Models and Pricing); gpt-4o-mini-tts $0.60 per
million text tokens in, $12 per million audio tokens out. Loopback upstreams only; every process
started here is stopped here."""

import json

import openai
import pytest

from test_accounting_edges import post, served, sse  # noqa: F401  (`served` is a fixture)
from test_cost import json_gateway, wait_line


def chat_answer(model, prompt, completion, cached=0):
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }).encode()


# FAILS at e4bd67f: gpt-5.1 has no row and `.` is no boundary: its cost is null
def test_a_gpt_5_1_request_is_logged_at_gpt_5_1s_list_price(mock, tmp_path):
    g = json_gateway(tmp_path, mock)
    try:
        oa = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        resp = oa.chat.completions.with_raw_response.create(
            model="gpt-5.1", messages=[{"role": "user", "content": "price a point release"}])
        usage = resp.parse().usage
        line = wait_line(g, resp.headers["cf-aig-log-id"])
        assert line["model"] == "gpt-5.1"
        assert line["cost"] == pytest.approx(
            (usage.prompt_tokens * 1.25 + usage.completion_tokens * 10.0) / 1e6, rel=1e-9), line
    finally:
        g.stop()


# FAILS at e4bd67f: none of these is priced (no rows; gpt-5.2-pro's `pro` stops the fallback)
@pytest.mark.parametrize("model, fresh_in, cached_in, out", [
    # 9,000 fresh + 1,000 cached in, 500 out.
    ("gpt-5.1-2025-11-13", 1.25, 0.125, 10.0),
    ("gpt-5.1-codex", 1.25, 0.125, 10.0),
    ("gpt-5.1-codex-mini", 0.25, 0.025, 2.0),
    ("gpt-5.2", 1.75, 0.175, 14.0),
    ("gpt-5.2-pro", 21.0, 21.0, 168.0),
])
def test_gpt_5_point_releases_price_fresh_and_cached_input_at_their_own_rates(served, model, fresh_in, cached_in, out):
    g, _ = served([chat_answer(model, 10_000, 500, cached=1_000)], content_type="application/json")
    r, line = post(g, "/openai/chat/completions",
                   {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert (line["tokens_in"], line["tokens_out"]) == (10_000, 500), line
    want = (9_000 * fresh_in + 1_000 * cached_in + 500 * out) / 1e6
    assert line["cost"] == pytest.approx(want, rel=1e-9), (model, line["cost"], want)


@pytest.mark.parametrize("model", ["gpt-5.10", "gpt-5.1-mini", "gpt-5.3"])
# Holds at e4bd67f too: pins that the new rows do not reach them.
def test_point_releases_the_table_does_not_know_have_no_cost(served, model):
    # Not gpt-5's price, nor gpt-5.1's: no cost, not a guessed one.
    g, _ = served([chat_answer(model, 1_000, 100)], content_type="application/json")
    r, line = post(g, "/openai/chat/completions",
                   {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert line["tokens_in"] == 1_000, line
    assert line["cost"] is None, line


# FAILS at e4bd67f: grok-3-fast is priced as grok-3 ($3 / $15)
def test_grok_3_fast_is_priced_at_its_own_rate_not_grok_3s(served):
    # grok-3 is $3 / $15; its fast serving $5 / $25, cached input $1.25.
    g, _ = served(sse(
        {"id": "c1", "object": "chat.completion.chunk", "model": "grok-3-fast",
         "choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "grok-3-fast", "choices": [],
         "usage": {"prompt_tokens": 2_000, "completion_tokens": 300, "total_tokens": 2_300,
                   "prompt_tokens_details": {"cached_tokens": 1_000}}},
        b"[DONE]"))
    r, line = post(g, "/grok/v1/chat/completions",
                   {"model": "grok-3-fast", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert line["cost"] == pytest.approx((1_000 * 5.0 + 1_000 * 1.25 + 300 * 25.0) / 1e6, rel=1e-9), line


SPEECH = {"model": "gpt-4o-mini-tts", "voice": "coral", "input": "Hello from the gateway."}


# FAILS at e4bd67f: gpt-4o-mini-tts is priced as gpt-4o-mini text ($0.15 / $0.60)
def test_speech_streamed_as_sse_is_priced_by_text_in_and_audio_out(served):
    # OpenAI's speech SSE: `speech.audio.delta` events, then `speech.audio.done` with the usage.
    g, _ = served(sse(
        {"type": "speech.audio.delta", "audio": "SUQzBAAAAAAAI1RTU0UAAAAPAAADTGF2ZjU4Ljc2LjEwMAAA"},
        {"type": "speech.audio.done",
         "usage": {"input_tokens": 14, "output_tokens": 1_010, "total_tokens": 1_024}}))
    r, line = post(g, "/openai/audio/speech", dict(SPEECH, stream_format="sse"))
    assert r.status_code == 200, r.text
    assert (line["tokens_in"], line["tokens_out"]) == (14, 1_010), line
    assert line["cost"] == pytest.approx((14 * 0.60 + 1_010 * 12.0) / 1e6, rel=1e-9), line


def test_speech_answered_as_an_audio_file_reports_no_usage_and_has_no_cost(served):
    # The default answer is the audio itself (audio/mpeg): nothing measurable, so no cost.
    g, _ = served([b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x00" * 64],
                  content_type="audio/mpeg")
    r, line = post(g, "/openai/audio/speech", SPEECH)
    assert r.status_code == 200, r.text
    assert line["model"] == "gpt-4o-mini-tts", line
    assert line["cost"] is None, line


# --- The audit of 2026-11-28 (cost.rs, PRICES_AS_OF) ----------------------------------------
#
# Anthropic (platform.claude.com, Pricing and the model pages): cache hits are $0.20 on Opus 5.5
# ($4 in, $5 / $8 writes, $20 out) and $0.25 on Fable 5.1 and Mythos 5.1 ($10 in, $12.50 / $20
# writes, $50 out): not a tenth. Mythos 5.1 and Haiku 5.5 ($0.10 / $0.50 for prompts up to 100K)
# had no row. DeepSeek (api-docs.deepseek.com/quick_start/pricing): V4-Flash $0.14 / $0.0028 hit /
# $0.28, which deepseek-chat and deepseek-reasoner are aliases of; V4-Pro $0.435 / $0.003625 /
# $0.87.

def claude_answer(model, fresh, read, write, out):
    return json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": fresh, "cache_read_input_tokens": read,
                  "cache_creation_input_tokens": write, "output_tokens": out},
    }).encode()


# FAILS at 91770b5: Opus 5.5's and Fable 5.1's cache hits are priced at a tenth of the input price
# (2x and 4x the page's), Mythos 5.1 and Haiku 5.5 have no price
@pytest.mark.parametrize("model, fresh_in, read, write, out", [
    ("claude-opus-5-5", 4.0, 0.20, 5.0, 20.0),
    ("claude-fable-5-1", 10.0, 0.25, 12.5, 50.0),
    ("claude-mythos-5-1", 10.0, 0.25, 12.5, 50.0),
    ("claude-haiku-5-5", 0.10, 0.01, 0.125, 0.50),
    # Unchanged: Fable 5's hits are still a tenth ($1).
    ("claude-fable-5", 10.0, 1.0, 12.5, 50.0),
])
def test_claude_cache_hits_are_priced_as_anthropics_price_page_lists_them(served, model, fresh_in, read, write, out):
    # 1,000 fresh, 100,000 read from the cache, 2,000 written for 5 minutes, 300 out.
    g, _ = served([claude_answer(model, 1_000, 100_000, 2_000, 300)], content_type="application/json")
    r, line = post(g, "/anthropic/v1/messages",
                   {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert (line["tokens_in"], line["tokens_out"]) == (103_000, 300), line
    want = (1_000 * fresh_in + 100_000 * read + 2_000 * write + 300 * out) / 1e6
    assert line["cost"] == pytest.approx(want, rel=1e-9), line


# FAILS at 91770b5: deepseek-chat and deepseek-reasoner are priced at V3.2's $0.28 / $0.42 (hits
# $0.028), the V4 models have no price
@pytest.mark.parametrize("model, miss, hit, out", [
    ("deepseek-chat", 0.14, 0.0028, 0.28),
    ("deepseek-reasoner", 0.14, 0.0028, 0.28),
    ("deepseek-v4-flash", 0.14, 0.0028, 0.28),
    ("deepseek-v4-pro", 0.435, 0.003625, 0.87),
])
def test_deepseek_v4_and_its_aliases_are_priced_at_the_v4_page(served, model, miss, hit, out):
    usage = {"prompt_tokens": 10_000, "completion_tokens": 500, "total_tokens": 10_500,
             "prompt_tokens_details": {"cached_tokens": 8_000},
             "prompt_cache_hit_tokens": 8_000, "prompt_cache_miss_tokens": 2_000}
    g, _ = served([json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": model,
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": "hi"}}],
                               "usage": usage}).encode()], content_type="application/json")
    r, line = post(g, "/deepseek/chat/completions",
                   {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert line["cost"] == pytest.approx((2_000 * miss + 8_000 * hit + 500 * out) / 1e6, rel=1e-9), line
