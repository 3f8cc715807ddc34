"""Guardrails at their edges, against a scripted local moderation service: what text is sent
for bodies that are not chat text (images, audio, base64), JSON-lines streams, answers of the
moderation service that are odd (errors, malformed, fewer results than inputs, slow), clients
that leave while the check runs, and the cache.

Tests marked `# FAILS at 743d25e` reproduce bugs; the others pin behaviour that holds."""

import base64
import http.server
import json
import os
import threading
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, OPENAI_KEY, FixedAnswerServer, Sidegate, gateway_yaml

CHAT = "/openai/chat/completions"
CATEGORIES = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
              "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
              "sexual/minors", "violence", "violence/graphic"]


def verdict(text):
    cats = {c: f"mock-flag:{c}" in text for c in CATEGORIES}
    return {"flagged": any(cats.values()), "categories": cats,
            "category_scores": {c: (0.98 if on else 0.0001) for c, on in cats.items()}}


class Moderation:
    """A scripted OpenAI-compatible moderation service: `answer(inputs) -> (status, body bytes)`
    (default: OpenAI's shape, a category flagged when an input holds `mock-flag:<category>`),
    after `delay` seconds. Records every request's inputs and headers."""

    def __init__(self, answer=None, delay=0.0):
        self.answer = answer or (lambda inputs: (200, json.dumps(
            {"id": "modr-1", "model": "omni-moderation-latest",
             "results": [verdict(i) for i in inputs]}).encode()))
        self.delay = delay
        self.seen = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                inputs = json.loads(raw)["input"]
                inputs = [inputs] if isinstance(inputs, str) else inputs
                outer.seen.append({"inputs": inputs, "headers": dict(self.headers)})
                time.sleep(outer.delay)
                status, body = outer.answer(inputs)
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/moderations"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def text(self):
        return "\n".join(i for s in self.seen for i in s["inputs"])

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def start(tmp_path, upstream_url, moderation, rules, extra=""):
    spec = f"  guardrails:\n    moderationURL: '{moderation.url}'\n{rules}{extra}"
    return Sidegate(tmp_path, gateway_yaml(upstream_url, extra_spec=spec), DEFAULT_KEYS)


def metric(g, result):
    for line in g.metrics().splitlines():
        if line.startswith(f'sidegate_guardrails_total{{result="{result}"}}'):
            return int(float(line.split()[-1]))
    return 0


def chat(text, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def completion(text):
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


@pytest.fixture
def moderation():
    m = Moderation()
    yield m
    m.stop()


# --- bugs ----------------------------------------------------------------------------------

# FAILS at 743d25e: a generated image (b64_json) is moderated as text; past ~2 MiB it is refused 424/2017
def test_an_image_generation_answer_is_not_moderated_as_text_nor_refused_for_its_size(tmp_path, moderation):
    image = base64.b64encode(os.urandom(1_800_000)).decode()  # a 2.4 MB PNG-sized b64_json
    answer = json.dumps({"created": 1, "data": [{"b64_json": image, "revised_prompt": "a calm lake"}]}).encode()
    up = FixedAnswerServer(answer)
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/images/generations", timeout=30,
                       json={"model": "gpt-image-1", "prompt": "a calm lake", "response_format": "b64_json"})
        # README: guardrails read text, "not image, file or other base64 data".
        assert r.status_code == 200, r.text[:300]
        assert image[:64] not in moderation.text()
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a small generated image's base64 goes to the moderation service as "text"
def test_a_small_image_generation_answer_sends_no_base64_to_moderation(tmp_path, moderation):
    image = base64.b64encode(os.urandom(30_000)).decode()
    answer = json.dumps({"created": 1, "data": [{"b64_json": image}]}).encode()
    up = FixedAnswerServer(answer)
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/images/generations", timeout=30,
                       json={"model": "gpt-image-1", "prompt": "a calm lake"})
        assert r.status_code == 200, r.text[:300]
        assert image[:64] not in moderation.text(), "the image went to the moderation service"
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a vision prompt whose only part is an image is moderated as its base64; a big image is refused 424/2016
def test_an_image_only_prompt_is_not_moderated_as_its_base64(tmp_path, moderation):
    up = FixedAnswerServer(completion("a lake"))
    g = start(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        image = base64.b64encode(os.urandom(2_000_000)).decode()  # a 2.7 MB data URL
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
        r = httpx.post(g.url + CHAT, json=body, timeout=30)
        assert r.status_code == 200, r.text[:300]
        assert image[:64] not in moderation.text()
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a multipart audio upload is moderated as text (its bytes); a 3 MB file is refused 424/2016
def test_an_audio_upload_is_not_moderated_as_text_nor_refused_for_its_size(tmp_path, moderation):
    up = FixedAnswerServer(b'{"text": "hello there"}')
    g = start(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        audio = b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(3_000_000)
        r = httpx.post(g.url + "/openai/audio/transcriptions", timeout=30,
                       data={"model": "whisper-1"}, files={"file": ("a.wav", audio, "audio/wav")})
        assert r.status_code == 200, r.text[:300]
        assert "WAVEfmt" not in moderation.text(), "the audio file went to the moderation service"
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a JSON-lines stream (Ollama /api/chat, Cohere v1) is moderated as raw lines: a phrase split over two chunks passes
def test_a_json_lines_stream_is_moderated_as_its_joined_text(tmp_path, moderation):
    lines = [{"model": "llama3", "message": {"role": "assistant", "content": "say mock-fl"}, "done": False},
             {"model": "llama3", "message": {"role": "assistant", "content": "ag:violence now"}, "done": False},
             {"model": "llama3", "message": {"role": "assistant", "content": ""}, "done": True,
              "eval_count": 3}]
    up = FixedAnswerServer(b"".join(json.dumps(x).encode() + b"\n" for x in lines),
                           content_type="application/x-ndjson")
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/custom-local/api/chat", timeout=30,
                       json={"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        # The SSE, event-stream and JSON-array twins of this stream are blocked (test_checks_on_streams).
        assert r.status_code == 424, f"served unblocked: {r.text[:300]}; moderated: {moderation.text()!r}"
        assert r.json()["error"][0]["code"] == 2017
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a moderation answer it cannot use (fewer results than inputs, a result without `categories`) is taken as clean: served, no `error`, no warning
@pytest.mark.parametrize("results", [
    # A service that classifies only the first input of a list (text past 64 KiB never classified).
    lambda inputs: [verdict(inputs[0])],
    # A service that says `flagged` but gives no categories.
    lambda inputs: [{"flagged": True} for _ in inputs],
], ids=["fewer-results", "no-categories"])
def test_an_answer_the_gateway_cannot_use_is_not_taken_as_clean(tmp_path, results):
    m = Moderation(answer=lambda inputs: (200, json.dumps({"results": results(inputs)}).encode()))
    up = FixedAnswerServer(completion("ok"))
    g = start(tmp_path, up.url, m, "    prompt: {violence: block}\n")
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "lorem ipsum " * 6000},
                                                     {"role": "user", "content": "mock-flag:violence"}]}
        r = httpx.post(g.url + CHAT, json=body, timeout=30)
        assert len(m.seen[0]["inputs"]) == 2
        # Either refused, or at least failed open as an answer it could not use (warned, counted).
        assert r.status_code == 424 or metric(g, "error") == 1, \
            f"{r.status_code}: the flagged text was never classified, and nothing says so"
    finally:
        g.stop()
        up.stop()
        m.stop()


# FAILS at 743d25e: prompt text outside the known keys is skipped when the body has one (Cohere rerank's `query`, a FIM `suffix`)
@pytest.mark.parametrize("path,body", [
    ("/cohere/v1/rerank", {"model": "rerank-english-v3.0", "query": "mock-flag:violence",
                           "documents": [{"text": "doc one"}, {"text": "doc two"}]}),
    ("/openai/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "def f():", "suffix": "mock-flag:violence"}),
], ids=["rerank-query", "fim-suffix"])
def test_prompt_text_beside_known_fields_is_read(tmp_path, moderation, path, body):
    up = FixedAnswerServer(b'{"results": []}')
    g = start(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        r = httpx.post(g.url + path, json=body)
        assert r.status_code == 424, f"not blocked ({r.status_code}); moderated: {moderation.text()!r}"
    finally:
        g.stop()
        up.stop()


# FAILS at 743d25e: a binary answer (audio/speech) is moderated as lossy UTF-8 text; past ~2 MiB of it, refused 424/2017
def test_a_binary_speech_answer_is_not_moderated_as_text(tmp_path, moderation):
    audio = b"ID3\x04\x00" + os.urandom(1_500_000)  # ~1.5 MB of MP3, ~1.5 minutes of speech
    up = FixedAnswerServer(audio, content_type="audio/mpeg")
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/audio/speech", timeout=30,
                       json={"model": "tts-1", "voice": "alloy", "input": "a calm lake"})
        assert r.status_code == 200, r.text[:300]
        assert r.content == audio
        assert "\ufffd" not in moderation.text(), "the audio went to the moderation service as text"
    finally:
        g.stop()
        up.stop()


class Upstream:
    """A loopback upstream answering every POST with `answer` (JSON), recording the bodies."""

    def __init__(self, answer):
        self.bodies = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                outer.bodies.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# FAILS at 743d25e: a prompt serde_json refuses (a lone surrogate escape, nesting past 128) is moderated as raw JSON: \u-escaped text passes
@pytest.mark.parametrize("extra", [
    '"user":"\\ud800",',  # RFC 8259 allows it; Python's json (the providers') reads it
    '"tools":[{"type":"function","function":{"name":"f","parameters":' + '{"a":' * 130 + "1" + "}" * 130 + "}}],",
], ids=["lone-surrogate", "deep-schema"])
def test_a_prompt_the_gateway_cannot_parse_is_not_moderated_as_its_escaped_json(tmp_path, moderation, extra):
    up = Upstream(completion("fine"))
    g = start(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        escaped = "".join(f"\\u{ord(c):04x}" for c in "mock-flag:violence")
        prompt = '"messages":[{"role":"user","content":"' + escaped + '"}]}'
        headers = {"content-type": "application/json"}
        # Escaped text alone is read unescaped and blocked...
        r = httpx.post(g.url + CHAT, content='{"model":"gpt-4o-mini",' + prompt, headers=headers)
        assert r.status_code == 424, r.text
        # ...but not beside something serde_json refuses, though the provider reads it.
        r = httpx.post(g.url + CHAT, content='{"model":"gpt-4o-mini",' + extra + prompt, headers=headers)
        if r.status_code == 200:
            assert "mock-flag:violence" not in json.loads(up.bodies[-1])["messages"][0]["content"], \
                f"served unchecked; the moderation saw {moderation.seen[-1]['inputs'][0][-150:]!r}"
    finally:
        g.stop()
        up.stop()


def sse(*events):
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


# FAILS at 743d25e: a Responses API stream's text deltas (`delta` strings) are not read: a stream that fails before its `.done` events is served unmoderated
def test_a_responses_stream_is_moderated_by_its_deltas(tmp_path, moderation):
    def delta(t):
        return {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": t}
    body = sse({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}},
               delta("say mock-fl"), delta("ag:violence now"),
               {"type": "response.failed", "response": {"id": "resp_1", "status": "failed", "output": [],
                                                        "error": {"code": "server_error", "message": "oops"}}})
    up = FixedAnswerServer(body, content_type="text/event-stream")
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/responses", json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
        # The chat-completions twin of this stream is blocked (its deltas are `content`).
        assert r.status_code == 424, f"served: {r.text[:200]!r}; moderated: {moderation.text()!r}"
    finally:
        g.stop()
        up.stop()


def hosts_wrapper(tmp_path):
    """Starts the sidecar in a mount namespace of its own where api.openai.com is 127.0.0.1."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost api.openai.com\n")
    return ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]


def openai_moderation(tmp_path, moderation, host):
    port = moderation.url.split(":")[2].split("/")[0]
    spec = f"  guardrails:\n    moderationURL: 'http://{host}:{port}/v1/moderations'\n    prompt: {{violence: block}}\n"
    up = FixedAnswerServer(completion("fine"))
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS, wrapper=hosts_wrapper(tmp_path))
    return g, up


# FAILS at 743d25e: the stored OpenAI key goes to http://api.openai.com (cleartext) as it does to https
def test_the_stored_openai_key_never_goes_over_cleartext_http(tmp_path, moderation):
    g, up = openai_moderation(tmp_path, moderation, "api.openai.com")
    try:
        r = httpx.post(g.url + CHAT, json=chat("hello"))
        assert r.status_code == 200
        (seen,) = moderation.seen
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert OPENAI_KEY not in json.dumps(headers), f"sent in cleartext: {headers.get('authorization')}"
    finally:
        g.stop()
        up.stop()


# --- edge behaviour that holds (regression) --------------------------------------------------

@pytest.mark.parametrize("status,body", [
    (500, b'{"error": {"message": "boom"}}'),
    (429, b'{"error": {"message": "rate limited"}}'),
    (200, b"not json"),
    (200, b'{"id": "x"}'),
])
def test_a_moderation_error_or_malformed_answer_fails_open_and_is_counted(tmp_path, status, body):
    m = Moderation(answer=lambda inputs: (status, body))
    up = FixedAnswerServer(completion("fine"))
    g = start(tmp_path, up.url, m, "    prompt: {violence: block}\n    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + CHAT, json=chat("mock-flag:violence"), timeout=30)
        assert r.status_code == 200, r.text
        assert metric(g, "error") == 2  # the prompt's check and the response's
        assert "moderation unavailable" in g.logs()
    finally:
        g.stop()
        up.stop()
        m.stop()


def test_the_moderation_request_is_openai_shaped_and_carries_no_key(tmp_path, moderation):
    up = FixedAnswerServer(completion("fine"))
    g = start(tmp_path, up.url, moderation, "    prompt: {hate: flag}\n")
    try:
        r = httpx.post(g.url + CHAT, json=chat("hello there", ), headers={"authorization": "Bearer sk-client-own-1"})
        assert r.status_code == 200
        (seen,) = moderation.seen
        assert seen["inputs"] == ["hello there"]
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert "authorization" not in headers and "sgtestkey" not in json.dumps(headers)
        assert "sk-client-own-1" not in json.dumps(headers)
    finally:
        g.stop()
        up.stop()


def test_flag_and_block_in_one_answer_blocks_whatever_order_the_categories_come_in(tmp_path):
    # `hate` (flag) listed first, `violence` (block) second.
    m = Moderation(answer=lambda inputs: (200, json.dumps({"results": [
        {"flagged": True, "categories": {"hate": True, "violence": True, "made-up": True}}]}).encode()))
    up = FixedAnswerServer(completion("fine"))
    g = start(tmp_path, up.url, m, "    prompt: {hate: flag, violence: block}\n")
    try:
        r = httpx.post(g.url + CHAT, json=chat("anything"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016)
        assert "violence" in r.json()["error"][0]["message"]
        assert metric(g, "block") == 1
    finally:
        g.stop()
        up.stop()
        m.stop()


def test_an_unknown_category_in_the_answer_is_ignored(tmp_path):
    m = Moderation(answer=lambda inputs: (200, json.dumps({"results": [
        {"flagged": True, "categories": {"violence": False, "weapons": True}}]}).encode()))
    up = FixedAnswerServer(completion("fine"))
    g = start(tmp_path, up.url, m, "    prompt: {violence: block}\n")
    try:
        r = httpx.post(g.url + CHAT, json=chat("anything"))
        assert r.status_code == 200
        assert metric(g, "block") == 0 and metric(g, "error") == 0
    finally:
        g.stop()
        up.stop()
        m.stop()


def test_a_client_that_leaves_while_the_response_check_runs_is_logged_cancelled(tmp_path):
    m = Moderation(delay=3)
    up = FixedAnswerServer(completion("fine words"))
    g = start(tmp_path, up.url, m, "    response: {violence: block}\n")
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(g.url + CHAT, json=chat("hi"), timeout=1)
        logs = g.wait_for_log("status_code=499", timeout=8)
        line = [x for x in logs.splitlines() if " request id=" in x and "status_code=499" in x]
        assert line and "outcome=cancelled" in line[0], line
    finally:
        g.stop()
        up.stop()
        m.stop()


def test_a_blocked_answer_is_blocked_again_from_the_cache(tmp_path, moderation):
    up = FixedAnswerServer(completion("here: mock-flag:violence"))
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n",
              extra="  cache: {enabled: true}\n")
    try:
        for _ in range(2):
            r = httpx.post(g.url + CHAT, json=chat("same question"))
            assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017)
            assert "mock-flag" not in r.text
        assert len(moderation.seen) == 2  # the hit is checked again
    finally:
        g.stop()
        up.stop()


def test_a_blocked_compat_and_universal_answer_is_2017(tmp_path, moderation):
    up = FixedAnswerServer(completion("here: mock-flag:violence"))
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(chat("q"), model="openai/gpt-4o-mini"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
        r = httpx.post(g.url + "/", json=[{"provider": "openai", "endpoint": "chat/completions",
                                          "headers": {}, "query": chat("q")}])
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
    finally:
        g.stop()
        up.stop()


def test_a_whole_responses_stream_and_a_translated_compat_stream_are_blocked(mock, tmp_path, moderation):
    done = {"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "text": "say mock-flag:violence now"}
    up = FixedAnswerServer(sse(done, {"type": "response.completed", "response": {"id": "r", "status": "completed",
                                                                                   "output": []}}),
                           content_type="text/event-stream")
    g = start(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/responses", json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
    finally:
        g.stop()
        up.stop()
    # /compat to Anthropic (the mock echoes the prompt), streamed: translated, then checked whole.
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f"  guardrails:\n    moderationURL: '{moderation.url}'\n"
                                                            "    response: {violence: block}\n"), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + "/compat/chat/completions", timeout=30,
                       json={"model": "anthropic/claude-haiku-4-5", "stream": True, "max_tokens": 50,
                             "messages": [{"role": "user", "content": "say mock-flag:violence"}]})
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
        r = httpx.post(g.url + "/compat/chat/completions", timeout=30,
                       json={"model": "anthropic/claude-haiku-4-5", "stream": True, "max_tokens": 50,
                             "messages": [{"role": "user", "content": "say hello"}]})
        assert r.status_code == 200 and "data: [DONE]" in r.text
    finally:
        g.stop()


def test_a_client_that_leaves_while_the_prompt_check_runs_is_logged_cancelled_and_not_sent(tmp_path):
    m = Moderation(delay=3)
    up = Upstream(completion("fine"))
    g = start(tmp_path, up.url, m, "    prompt: {violence: block}\n")
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(g.url + CHAT, json=chat("hi"), timeout=1)
        g.wait_for_log("status_code=499", timeout=8)
        time.sleep(2.5)
        assert up.bodies == [], "sent upstream for a client that had left"
    finally:
        g.stop()
        up.stop()
        m.stop()
