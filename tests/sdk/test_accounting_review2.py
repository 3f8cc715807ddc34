"""Second review of token and cost accounting (usage.rs, cost.rs, telemetry.rs at e2592d8): usage
objects and stated costs cut by a frame's end at every offset, usage repeated across a stream's
chunks, stated costs that are not the provider's, failed answers, and the log against metrics.

Loopback upstreams only (`ChunkServer`s answering each provider's documented wire format); one
gateway per test, requests sent one after another. Tests marked `FAILS at e2592d8` reproduce bugs
found by this review."""

import json
import time

import httpx
import pytest

from test_accounting_edges import ChunkServer, gateways, sse
from test_cost import metric, wait_line


class SplitServer(ChunkServer):
    """A ChunkServer with a shorter pause between chunks (still long enough for the sidecar to read
    them as separate frames), for tests that send a request per cut of an answer."""

    PAUSE = 0.004


# OpenRouter, Perplexity and Vertex AI are served by the same upstream.
PROVIDERS = {"perplexity-ai": ("", "pplx-acct-review2"), "openrouter": ("/api", "sk-or-v1-acct-review2"),
             "google-vertex-ai": ("", "ya29.acct-review2-vertex")}


@pytest.fixture
def split(tmp_path):
    """`split(content_type)`: a gateway (OpenRouter, Perplexity, Vertex AI too) in front of a
    SplitServer answering `{}` until the test sets its chunks; `spec`: more lines of the spec."""
    with gateways(tmp_path, "acct-review2", PROVIDERS, server=SplitServer) as make:
        def make_split(content_type="application/json", status=200, spec=""):
            return make([b"{}"], spec, content_type=content_type, status=status)

        yield make_split


def post(g, path, body, **headers):
    r = httpx.post(g.url + path, json=body, headers=headers, timeout=30)
    return r, wait_line(g, r.headers["cf-aig-log-id"])


def lines_of(g, log_ids, timeout=10):
    """The JSON access log lines of `log_ids`, in order (one read of the log once all are there)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for raw in g.logs().splitlines():
            if '"message":"request"' in raw:
                doc = json.loads(raw)
                found[doc["id"]] = doc
        if all(i in found for i in log_ids):
            return [found[i] for i in log_ids]
        assert time.monotonic() < deadline, "missing access log lines"
        time.sleep(0.05)


def each_cut(g, up, body, offsets, send):
    """`send()` once per offset of `offsets`, the upstream's answer `body` cut there in two (or
    at each offset of a tuple); the access log lines, with their cuts."""
    ids = []
    for at in offsets:
        ats = at if isinstance(at, tuple) else (at,)
        bounds = (0, *ats, len(body))
        up.chunks = [body[a:b] for a, b in zip(bounds, bounds[1:])]
        r = send()
        assert r.status_code == 200, r.text
        ids.append(r.headers["cf-aig-log-id"])
    return list(zip(offsets, lines_of(g, ids)))


def cuts(body, around, span=None):
    """Offsets cutting `body` everywhere in the first occurrence of `around` and `span` bytes
    after it (its whole usage object)."""
    at = body.index(around)
    end = min(len(body), at + (span or len(around)))
    return range(at, end + 1)


CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


# --- OpenRouter: its stated cost, cut by a frame's end at every offset ----------------------------
def or_usage(cost, byok=False, upstream=None):
    return {"prompt_tokens": 194, "completion_tokens": 20, "total_tokens": 214, "cost": cost,
            "is_byok": byok, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "cost_details": {"upstream_inference_cost": upstream, "upstream_inference_prompt_cost": 0,
                             "upstream_inference_completions_cost": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0}}


def or_stream(usage):
    chunk = {"id": "gen-s", "provider": "OpenAI", "model": "openai/gpt-4o-mini",
             "object": "chat.completion.chunk", "created": 1}
    return b"".join(sse(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                              "finish_reason": None}]),
                        dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                        dict(chunk, choices=[], usage=usage), b"[DONE]"))


def test_an_openrouter_byok_streams_stated_cost_is_read_wherever_a_frame_ends(split):
    g, up = split("text/event-stream")
    body = or_stream(or_usage(0.00002, byok=True, upstream=0.0004))
    send = lambda: httpx.post(g.url + "/openrouter/v1/chat/completions", json=dict(CHAT, stream=True), timeout=30)
    got = each_cut(g, up, body, cuts(body, b'"usage"', 400), send)
    wrong = [(at, body[at - 8:at + 8], ln["tokens_in"], ln["tokens_out"], ln["cost"]) for at, ln in got
             if (ln["tokens_in"], ln["tokens_out"], ln["cost"]) != (194, 20, pytest.approx(0.00042, rel=1e-9))]
    assert not wrong, wrong[:5]


# --- Perplexity: its stated cost, cut at every offset; a stream repeating it in every chunk ------
PPLX_USAGE = {"prompt_tokens": 10, "completion_tokens": 300, "total_tokens": 310,
              "search_context_size": "low",
              "cost": {"input_tokens_cost": 3e-05, "output_tokens_cost": 0.0045, "request_cost": 0.006,
                       "total_cost": 0.01053}}


def test_a_perplexity_stated_cost_is_read_wherever_a_frame_ends(split):
    g, up = split("application/json")
    body = json.dumps({"id": "pplx-1", "model": "sonar-pro", "created": 1, "object": "chat.completion",
                       "usage": PPLX_USAGE, "citations": ["https://example.com"], "search_results": [],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "answer [1]"}}]}).encode()
    send = lambda: httpx.post(g.url + "/perplexity-ai/chat/completions", json=dict(CHAT, model="sonar-pro"),
                              timeout=30)
    got = each_cut(g, up, body, cuts(body, b'"usage"', 300), send)
    wrong = [(at, body[at - 8:at + 8], ln["tokens_in"], ln["tokens_out"], ln["cost"]) for at, ln in got
             if (ln["tokens_in"], ln["tokens_out"], ln["cost"]) != (10, 300, pytest.approx(0.01053, rel=1e-9))]
    assert not wrong, wrong[:5]


def test_a_perplexity_stream_with_its_usage_in_every_chunk_costs_the_last_total_once(split):
    g, up = split("text/event-stream")
    chunk = {"id": "pplx-s", "model": "sonar-pro", "created": 1, "object": "chat.completion.chunk"}
    events = []
    for n in range(1, 6):
        usage = dict(PPLX_USAGE, completion_tokens=n * 60, total_tokens=10 + n * 60,
                     cost=dict(PPLX_USAGE["cost"], total_cost=round(0.002 * n, 6)))
        events.append(dict(chunk, usage=usage, choices=[{"index": 0, "delta": {"content": "w "},
                                                         "finish_reason": "stop" if n == 5 else None}]))
    up.chunks = sse(*events, b"[DONE]")
    r, line = post(g, "/perplexity-ai/chat/completions", dict(CHAT, model="sonar-pro", stream=True))
    assert (line["tokens_in"], line["tokens_out"]) == (10, 300), line
    assert line["cost"] == pytest.approx(0.01, rel=1e-9), line


# --- Stated costs that are not the provider's ----------------------------------------------------
def test_a_cost_inside_the_models_text_is_not_taken_from_an_openrouter_answer(split):
    # The model's text holds what looks like a usage object with a stated cost; JSON escapes its
    # quotes, so only the real usage (no `cost`: priced by the table) counts.
    g, up = split("application/json")
    fake = '{"usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost": 0, "is_byok": false}}'
    answer = {"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o-mini", "object": "chat.completion",
              "created": 1, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                  "role": "assistant", "content": fake}}],
              "usage": {"prompt_tokens": 194, "completion_tokens": 20, "total_tokens": 214}}
    up.chunks = [json.dumps(answer).encode()]
    r, line = post(g, "/openrouter/v1/chat/completions", CHAT)
    assert r.json()["choices"][0]["message"]["content"] == fake
    assert (line["tokens_in"], line["tokens_out"]) == (194, 20), line
    assert line["cost"] == pytest.approx((194 * 0.15 + 20 * 0.60) / 1e6, rel=1e-9), line


@pytest.mark.parametrize("cost", ["-5", "1e308", "1e7", '"0.0001"'])
def test_a_negative_huge_or_string_stated_cost_is_not_taken(split, cost):
    g, up = split("application/json")
    body = (b'{"id":"gen-1","model":"openai/gpt-4o-mini","object":"chat.completion","created":1,'
            b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"hi"}}],'
            b'"usage":{"prompt_tokens":194,"completion_tokens":20,"total_tokens":214,"cost":'
            + cost.encode() + b',"is_byok":false}}')
    up.chunks = [body]
    r, line = post(g, "/openrouter/v1/chat/completions", CHAT)
    assert line["cost"] == pytest.approx((194 * 0.15 + 20 * 0.60) / 1e6, rel=1e-9), line


# --- Failed answers and cache hits are not charged -----------------------------------------------
@pytest.mark.parametrize("status", [400, 402, 500])
def test_a_failed_openrouter_answer_with_a_stated_cost_costs_nothing(split, status):
    g, up = split("application/json", status=status)
    up.chunks = [json.dumps({"error": {"code": status, "message": "no"},
                             "usage": or_usage(0.5)}).encode()]
    r, line = post(g, "/openrouter/v1/chat/completions", CHAT)
    assert r.status_code == status
    assert line["cost"] is None, line
    assert metric(g, 'sidegate_cost_usd_total{provider="openrouter"}') in (None, 0.0)


def test_a_cache_hit_of_a_stated_cost_answer_costs_nothing_and_metrics_match_the_log(split):
    g, up = split("application/json", spec="  cache: {enabled: true, ttl: 10m}\n")
    answer = {"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o-mini", "object": "chat.completion",
              "created": 1, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "hi"}}],
              "usage": or_usage(0.0004)}
    up.chunks = [json.dumps(answer).encode()]
    # A chunked answer, its connection closed after it (the SplitServer's way), and the identical
    # request a while after the first: a hit, not charged. (Its keys were once written after the
    # gateway started: the first request went before they were loaded, with no key, and the
    # second, with the stored key, was a miss — a key of its own.)
    first = httpx.post(g.url + "/openrouter/v1/chat/completions", json=CHAT, timeout=30)
    time.sleep(0.3)
    second = httpx.post(g.url + "/openrouter/v1/chat/completions", json=CHAT, timeout=30)
    rs = [first, second]
    assert [r.headers["cf-aig-cache-status"] for r in rs] == ["MISS", "HIT"]
    assert up.auths == [b"Bearer sk-or-v1-acct-review2"], up.auths
    lines = [wait_line(g, r.headers["cf-aig-log-id"]) for r in rs]
    assert [ln["cached"] for ln in lines] == [False, True], [(ln["cached"], ln["status_code"], ln["outcome"]) for ln in lines]
    assert lines[0]["cost"] == pytest.approx(0.0004, rel=1e-9) and lines[1]["cost"] is None, lines
    assert metric(g, 'sidegate_cost_usd_total{provider="openrouter"}') == pytest.approx(0.0004, rel=1e-9)


# --- Anthropic: message_start + message_delta, web searches, cut at every offset ----------------
SEARCH_USAGE = {"input_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                "output_tokens": 300, "server_tool_use": {"web_search_requests": 3}}
SEARCH_COST = (2000 * 3 + 300 * 15) / 1e6 + 3 * 0.01


def claude_search_stream():
    start = {"type": "message_start", "message": {
        "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1, "server_tool_use": {"web_search_requests": 0}}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": SEARCH_USAGE}
    return b"".join(sse(("message_start", start),
                        ("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}}),
                        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": "found it"}}),
                        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                        ("message_delta", delta), ("message_stop", {"type": "message_stop"})))


CLAUDE = {"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": True,
          "messages": [{"role": "user", "content": "search"}]}


def test_an_anthropic_streams_web_searches_count_once_wherever_a_frame_ends(split):
    g, up = split("text/event-stream")
    body = claude_search_stream()
    # Every cut through message_delta's usage object.
    at = body.index(b'"usage"', body.index(b"message_delta"))
    send = lambda: httpx.post(g.url + "/anthropic/v1/messages", json=CLAUDE, timeout=30)
    got = each_cut(g, up, body, range(at, at + len(json.dumps(SEARCH_USAGE, separators=(",", ":"))) + 12), send)
    wrong = [(at, body[at - 8:at + 8], ln["tokens_in"], ln["tokens_out"], ln["cost"]) for at, ln in got
             if (ln["tokens_in"], ln["tokens_out"], ln["cost"]) != (2000, 300, pytest.approx(SEARCH_COST, rel=1e-9))]
    assert not wrong, wrong[:5]


# --- Gemini: usageMetadata in every chunk of a stream, audio by modality ------------------------
def test_a_gemini_stream_repeating_its_audio_details_counts_them_once(split):
    g, up = split("text/event-stream")
    events = []
    for n in range(1, 5):
        usage = {"promptTokenCount": 1050, "candidatesTokenCount": 25 * n, "totalTokenCount": 1050 + 25 * n,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 50},
                                         {"modality": "AUDIO", "tokenCount": 1000}]}
        if n == 4:
            usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": 100}]
        events.append({"candidates": [{"content": {"role": "model", "parts": [{"text": "word "}]},
                                       "index": 0, **({"finishReason": "STOP"} if n == 4 else {})}],
                       "usageMetadata": usage, "modelVersion": "gemini-2.5-flash", "responseId": "r"})
    up.chunks = sse(*events)
    r = httpx.post(f"{g.url}/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   headers={"x-goog-api-key": "placeholder"},
                   json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, timeout=30)
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (1050, 100), line
    assert line["cost"] == pytest.approx((50 * 0.30 + 1000 * 1.00 + 100 * 2.50) / 1e6, rel=1e-9), line


# --- Imagen: images counted by their key, at every offset; text that is not an image ------------
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def imagen(g, model="imagen-4.0-generate-001"):
    r = httpx.post(f"{g.url}/google-ai-studio/v1beta/models/{model}:predict",
                   headers={"x-goog-api-key": "placeholder"},
                   json={"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": 2}}, timeout=30)
    return r, wait_line(g, r.headers["cf-aig-log-id"])


def test_imagen_images_are_counted_once_wherever_a_frame_ends(split):
    g, up = split("application/json")
    body = json.dumps({"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": IMAGE},
                                       {"bytesBase64Encoded": IMAGE, "mimeType": "image/png"}]}).encode()
    at = body.index(b'"bytesBase64Encoded"')
    # Two pieces; three: the key's bytes in a frame of their own, frames shorter than the key.
    offsets = [*cuts(body, b'"bytesBase64Encoded"'),
               (at, at + 20), (at + 1, at + 19), (at + 5, at + 9), (at - 3, at + 2), (at + 2, at + 3, at + 4)]
    send = lambda: httpx.post(f"{g.url}/google-ai-studio/v1beta/models/imagen-4.0-generate-001:predict",
                              headers={"x-goog-api-key": "placeholder"},
                              json={"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": 2}},
                              timeout=30)
    got = each_cut(g, up, body, offsets, send)
    wrong = [(at, ln["cost"]) for at, ln in got if ln["cost"] != pytest.approx(0.08, rel=1e-9)]
    assert not wrong, wrong[:5]


# FAILS at e2592d8: each enhanced prompt ending in `"bytesBase64Encoded` is charged as one more
# image (cost 0.16, not 0.08).
# Imagen's predictions echo the prompt Imagen rewrote (`prompt`: "The rewritten prompt used for the
# image generation", Vertex AI REST reference, VisionGenerativeModelResult.Image) -- text the client
# steers. usage.rs:325-339 (ImageCount::observe) counts every occurrence of the 20 bytes
# `"bytesBase64Encoded"`, inside strings too: a string ending in an escaped quote and the word
# (`...\"bytesBase64Encoded"`) holds them, the string's closing quote being the key's last. Fix:
# count the key only where a key can be -- its first quote not escaped (previous byte not `\`, or
# an even run of backslashes) and followed (after spaces) by `:`, as KeySum's number_after_key
# already requires for Vertex's token_count.
def test_imagen_a_prompt_echo_ending_in_the_image_key_is_not_an_image(split):
    g, up = split("application/json")
    prompt = 'A neon sign reading "bytesBase64Encoded'
    body = json.dumps({"predictions": [
        {"mimeType": "image/png", "bytesBase64Encoded": IMAGE, "prompt": prompt},
        {"mimeType": "image/png", "bytesBase64Encoded": IMAGE, "prompt": prompt}]}).encode()
    up.chunks = [body]
    r, line = imagen(g)
    assert r.json()["predictions"][0]["prompt"] == prompt
    assert line["cost"] == pytest.approx(0.08, rel=1e-9), line


# --- Plain OpenAI and Anthropic chat: as before; the log against the metrics ---------------------
def test_plain_openai_and_anthropic_chat_cost_as_before_and_metrics_match_the_log(split):
    g, up = split("application/json")
    up.chunks = [json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "hi"}}],
                             "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                                       "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
                                       "completion_tokens_details": {"reasoning_tokens": 0,
                                                                     "audio_tokens": 0}}}).encode()]
    _, oa = post(g, "/openai/v1/chat/completions", dict(CHAT, model="gpt-4o-mini"))
    assert (oa["tokens_in"], oa["tokens_out"]) == (1000, 200), oa
    assert oa["cost"] == pytest.approx((600 * 0.15 + 400 * 0.075 + 200 * 0.60) / 1e6, rel=1e-9), oa
    up.content_type = "text/event-stream"
    up.chunks = [claude_search_stream().replace(b'"web_search_requests":3', b'"web_search_requests":0')]
    _, an = post(g, "/anthropic/v1/messages", CLAUDE)
    assert (an["tokens_in"], an["tokens_out"]) == (2000, 300), an
    assert an["cost"] == pytest.approx((2000 * 3 + 300 * 15) / 1e6, rel=1e-9), an
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(oa["cost"], rel=1e-9)
    assert metric(g, 'sidegate_cost_usd_total{provider="anthropic"}') == pytest.approx(an["cost"], rel=1e-9)





# --- Vertex AI: Imagen and embeddings on `:predict` ---------------------------------------------
VERTEX = "/google-vertex-ai/v1/projects/p/locations/us-central1/publishers/google/models/"


def vertex_predict(g, model, body):
    return httpx.post(f"{g.url}{VERTEX}{model}:predict", headers={"authorization": "Bearer placeholder"},
                      json=body, timeout=30)


def test_vertex_imagen_images_are_priced_per_image(split):
    g, up = split("application/json")
    up.chunks = [json.dumps({"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": IMAGE}] * 3}).encode()]
    r = vertex_predict(g, "imagen-4.0-fast-generate-001",
                       {"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": 3}})
    assert r.status_code == 200
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert line["cost"] == pytest.approx(3 * 0.02, rel=1e-9), line


# FAILS at e2592d8: images Vertex writes to Cloud Storage cost nothing (cost null, never charged).
# With `parameters.storageUri` Vertex's Imagen writes the images to the bucket and each prediction
# is `{"mimeType", "gcsUri"}` instead of `{"mimeType", "bytesBase64Encoded"}` (Vertex AI REST
# reference, VisionGenerativeModelResult.Image: data is one of bytesBase64Encoded, gcsUri; firebase-
# android-sdk's GenerateImageResponse.kt reads either). Google bills the images all the same.
# usage.rs:325-339 (ImageCount::observe, IMAGE_KEY at usage.rs:139) counts only
# `"bytesBase64Encoded"`, so the answer has no images and no tokens, and cost.rs:867-870 (a price
# needs tokens, images, seconds or characters) gives `None`: a spend limit or budget node is never
# charged for them (an app can generate images past its limit by naming a bucket), and the sidecar
# warns that the model "has no price". Fix: count each prediction's `"gcsUri"` key too.
def test_vertex_imagen_images_written_to_cloud_storage_are_priced_per_image(split):
    g, up = split("application/json")
    up.chunks = [json.dumps({"predictions": [
        {"mimeType": "image/png", "gcsUri": f"gs://bucket/out/sample_{i}.png"} for i in range(3)]}).encode()]
    r = vertex_predict(g, "imagen-4.0-generate-001",
                       {"instances": [{"prompt": "a cat"}],
                        "parameters": {"sampleCount": 3, "storageUri": "gs://bucket/out/"}})
    assert r.status_code == 200
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert line["cost"] == pytest.approx(3 * 0.04, rel=1e-9), line


def test_a_vertex_embeddings_counts_are_read_wherever_a_frame_ends(split):
    g, up = split("application/json")
    body = json.dumps({"predictions": [
        {"embeddings": {"values": [0.0125, -0.5], "statistics": {"token_count": 12, "truncated": False}}},
        {"embeddings": {"values": [0.25, 0.75], "statistics": {"truncated": False, "token_count": 7}}}],
        "metadata": {"billableCharacterCount": 4321}}).encode()
    first, last = body.index(b'"token_count"'), body.index(b"}}")
    offsets = [*range(first, last + 1), *cuts(body, b'"billableCharacterCount"', 32),
               (first + 3, first + 6, first + 9, first + 14, first + 15)]
    send = lambda: vertex_predict(g, "text-embedding-005", {"instances": [{"content": "x"}, {"content": "y"}]})
    got = each_cut(g, up, body, offsets, send)
    wrong = [(at, ln["tokens_in"], ln["cost"]) for at, ln in got
             if (ln["tokens_in"], ln["cost"]) != (19, pytest.approx(4321 / 1000 * 0.000025, rel=1e-9))]
    assert not wrong, wrong[:5]


# --- Spend limits are charged the stated cost, as logged ---------------------------------------
def test_a_spend_limit_is_charged_openrouters_stated_cost(split):
    # 0.0004 stated per request against $0.001 a day: the third request crosses it (the table's
    # gpt-4o-mini price, 4.11e-05, would take 25).
    g, up = split("application/json", spec="  spendLimit: {amount: '0.001', period: day}\n")
    answer = {"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o-mini", "object": "chat.completion",
              "created": 1, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "hi"}}],
              "usage": or_usage(0.0004)}
    up.chunks = [json.dumps(answer).encode()]
    costs = []
    for _ in range(3):
        r, line = post(g, "/openrouter/v1/chat/completions", CHAT)
        assert r.status_code == 200
        costs.append(line["cost"])
    assert costs == [pytest.approx(0.0004, rel=1e-9)] * 3
    r = httpx.post(g.url + "/openrouter/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 429 and r.json()["error"][0]["code"] == 2041, r.text
    assert metric(g, 'sidegate_cost_usd_total{provider="openrouter"}') == pytest.approx(0.0012, rel=1e-9)


# FAILS at e2592d8: a per-token custom cost on an answer without tokens (Imagen's images, whisper-1's
# seconds) makes it cost nothing against the spend limit: the next request is let through (200,
# not 429).
# telemetry.rs:1037-1048 (RequestRecord::charged) charges the higher of the custom cost and the
# model's price only when the custom cost is known; `cf-aig-custom-cost: {"per_token_in": 0,
# "per_token_out": 0}` on an answer with no token counts is `None` (cost.rs:863-864,
# `known.then_some(..)`), and `(None, Some(_))` falls to `(c, _) => c`: nothing is charged, though
# the images (or minutes) have a price. The README promises "an app cannot spend past them by
# claiming a low cost". Fix: in `charged`, when the custom cost gives `None`, charge
# `cost(self.price, None, tokens)`.
@pytest.mark.parametrize("kind", ["imagen", "whisper"])
def test_a_per_token_custom_cost_cannot_spend_images_or_minutes_past_the_spend_limit(split, kind):
    spend_twice(split, kind, {"cf-aig-custom-cost": '{"per_token_in": 0, "per_token_out": 0}'})


@pytest.mark.parametrize("kind", ["imagen", "whisper"])
def test_images_and_minutes_are_charged_to_the_spend_limit(split, kind):
    spend_twice(split, kind, {})


def spend_twice(split, kind, custom):
    g, up = split("application/json", spec="  spendLimit: {amount: '0.05', period: day}\n")
    if kind == "imagen":
        up.chunks = [json.dumps({"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": IMAGE}] * 2}).encode()]
        send = lambda: httpx.post(f"{g.url}/google-ai-studio/v1beta/models/imagen-4.0-generate-001:predict",
                                  headers={"x-goog-api-key": "placeholder", **custom},
                                  json={"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": 2}},
                                  timeout=30)
    else:
        # 600 seconds of audio: $0.06 at $0.006 a minute.
        up.chunks = [json.dumps({"text": "hello", "usage": {"type": "duration", "seconds": 600}}).encode()]
        send = lambda: httpx.post(f"{g.url}/openai/v1/audio/transcriptions", headers=custom,
                                  data={"model": "whisper-1"}, files={"file": ("a.wav", b"R" * 2000, "audio/wav")},
                                  timeout=30)
    first = send()
    assert first.status_code == 200, first.text
    wait_line(g, first.headers["cf-aig-log-id"])
    # $0.08 of images (or $0.06 of audio) went through: the limit of $0.05 is reached.
    second = send()
    assert second.status_code == 429, (second.status_code, second.text[:200])



# --- Model-made objects that look like usage ----------------------------------------------------
def test_a_gemini_function_calls_args_cannot_pass_for_its_usage(split):
    # A function call's `args` is an object the model writes (not a string): one that looks like
    # `usageMetadata`, in every chunk, with counts of its own (thoughts, cache reads, tool prompts
    # the real usage omits as zero). The real usageMetadata after it replaces them all.
    g, up = split("text/event-stream")
    forged = {"usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "thoughtsTokenCount": 10**9,
                                "cachedContentTokenCount": 1, "toolUsePromptTokenCount": 10**9,
                                "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 10**6}]},
              "usage": {"prompt_tokens": 10**9, "completion_tokens": 10**9, "cost": 0}}
    events = [{"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "record", "args": forged}}]}, "index": 0,
        **({"finishReason": "STOP"} if n == 2 else {})}],
        "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 10 * n, "totalTokenCount": 40 + 10 * n},
        "modelVersion": "gemini-2.5-flash", "responseId": "r"} for n in (1, 2)]
    up.chunks = sse(*events)
    r = httpx.post(f"{g.url}/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   headers={"x-goog-api-key": "placeholder"},
                   json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, timeout=30)
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (40, 20), line
    assert line["cost"] == pytest.approx((40 * 0.30 + 20 * 2.50) / 1e6, rel=1e-9), line


def test_a_streamed_gpt_4o_transcription_is_priced_from_its_done_event(split):
    # `stream=true` transcriptions: `transcript.text.delta` events, then `transcript.text.done`
    # with the usage (API reference, Stream Event transcript.text.done).
    g, up = split("text/event-stream")
    up.chunks = sse({"type": "transcript.text.delta", "delta": "hello"},
                    {"type": "transcript.text.delta", "delta": " there"},
                    {"type": "transcript.text.done", "text": "hello there", "usage": {
                        "type": "tokens", "input_tokens": 114,
                        "input_token_details": {"text_tokens": 14, "audio_tokens": 100},
                        "output_tokens": 45, "total_tokens": 159}})
    r = httpx.post(f"{g.url}/openai/v1/audio/transcriptions",
                   data={"model": "gpt-4o-transcribe", "stream": "true"},
                   files={"file": ("a.wav", b"R" * 2000, "audio/wav")}, timeout=30)
    assert r.status_code == 200
    line = wait_line(g, r.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (114, 45), line
    assert line["cost"] == pytest.approx((14 * 2.50 + 100 * 6.0 + 45 * 10.0) / 1e6, rel=1e-9), line


def test_a_low_custom_cost_is_logged_but_the_spend_limit_is_charged_the_stated_one(split):
    # Precedence: `cf-aig-custom-cost` is the logged cost; the spend limit takes the higher of it
    # and the provider's stated cost (README, cf-aig-custom-cost).
    g, up = split("application/json", spec="  spendLimit: {amount: '0.001', period: day}\n")
    answer = {"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o-mini", "object": "chat.completion",
              "created": 1, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "hi"}}],
              "usage": or_usage(0.0004)}
    up.chunks = [json.dumps(answer).encode()]
    low = {"cf-aig-custom-cost": '{"total_cost": 0}'}
    for _ in range(3):
        r, line = post(g, "/openrouter/v1/chat/completions", CHAT, **low)
        assert r.status_code == 200 and line["cost"] == 0 and line["custom_cost"] is True, line
    r = httpx.post(g.url + "/openrouter/v1/chat/completions", json=CHAT, headers=low, timeout=30)
    assert r.status_code == 429, r.text
