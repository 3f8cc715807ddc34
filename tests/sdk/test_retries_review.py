"""Review of retries, request timeouts and fallbacks (direct requests, /compat routes and chains,
the universal endpoint): what is retried and what is not, how often a request goes upstream, what
reaches the provider on each attempt, how long it all takes when upstreams hang, and what the
client gets and the log says. Checked live against the binaries, loopback only.

The public contract: Cloudflare's request-handling page ("A request timeout allows you to trigger
fallbacks or a retry"; the timeout is on "the first part of the response"; retries "recover from
temporary issues"), and where it is silent what the providers' own SDKs do, which the gateway
says it follows (`retry.rs`: Retry-After "as the OpenAI SDK does").
"""

import email.utils
import hashlib
import json
import os
import socket
import struct
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from rawhttp import Listener, read_request
from test_retries import attempts, fail_first, retry_after_gateway

CHAT = "/openai/chat/completions"


def chat(text="retry review"):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def with_provider(yaml, provider, url):
    """`yaml` (a `gateway_yaml`) with `provider`'s base URL set to `url` instead of the mock's."""
    lines = [line for line in yaml.splitlines(keepends=True) if not line.startswith(f"    {provider}:")]
    at = lines.index("  providers:\n") + 1
    base = url if provider == "anthropic" else f"{url}/v1"
    return "".join(lines[:at] + [f"    {provider}: {{baseURL: '{base}'}}\n"] + lines[at:])


def reset(conn):
    """Closes `conn` with a TCP reset."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def anthropic_message(text):
    body = json.dumps({"id": "msg_raw", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body))


class BrokenBodyUpstream:
    """An Anthropic-format upstream whose first `broken` connections answer `200 OK` with a
    Content-Length of 400, send 30 bytes of it and reset the connection; later ones answer a
    whole Message. `hits` counts the requests read."""

    def __init__(self, broken=1):
        self.broken, self.hits = broken, 0
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, index):
        if read_request(conn) is None:
            conn.close()
            return
        self.hits += 1
        if index >= self.broken:
            conn.sendall(anthropic_message("second try"))
            conn.close()
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
                     b'{"id":"msg_1","type":"message",')
        time.sleep(0.1)
        reset(conn)

    def stop(self):
        self.listener.close()


# --- what is retried ----------------------------------------------------------------------------


# Failed at 91770b5 (mended since): a Retry-After given as an HTTP date (RFC 9110 §10.2.3, read by the OpenAI and Anthropic SDKs) is ignored: a provider asking for 2 minutes is retried at once, 20 ms later, and the client gets the next attempt's answer
def test_a_retry_after_given_as_an_http_date_is_read(tmp_path):
    # Asked for more than the 60 s the gateway waits out: as with `Retry-After: 120`
    # (test_retries), the provider's answer is the response, at once, and it is not asked again.
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    server, g = retry_after_gateway(tmp_path, date)
    try:
        started = time.monotonic()
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=chat(), timeout=30)
        assert time.monotonic() - started < 5
        assert (r.status_code, r.headers.get("retry-after")) == (429, date), \
            f"retried although the provider asked for 120 s: {r.status_code} {r.text[:200]}"
        assert r.json() == {"error": {"message": "slow down"}}
    finally:
        g.stop()
        server.stop()


# Failed at 91770b5 (mended since): `x-should-retry: false` (sent by OpenAI and Anthropic, obeyed first by both SDKs) is ignored: a 503 the provider says not to retry is sent again and the client gets the second attempt's answer
def test_a_provider_saying_x_should_retry_false_is_not_asked_again(tmp_path):
    server = FixedAnswerServer(b'{"error": {"message": "do not repeat this"}}', status=503,
                               then=[(200, b'{"id": "repeated", "choices": []}')],
                               headers=[("x-should-retry", "false")])
    yaml = gateway_yaml("http://127.0.0.1:9").replace(
        "  providers:\n", f"  providers:\n    custom-ra: {{baseURL: '{server.url}/v1'}}\n", 1)
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=chat(), timeout=30,
                       headers={"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"})
        assert (r.status_code, r.json()) == (503, {"error": {"message": "do not repeat this"}}), \
            f"the provider said not to retry, the gateway did: {r.status_code} {r.text[:200]}"
    finally:
        g.stop()
        server.stop()


@pytest.mark.parametrize("n", [1, 3])
def test_an_upstream_that_resets_before_answering_is_sent_the_request_exactly_max_attempts_times(tmp_path, n):
    # A reset before any answer is a connection error: retried, and never more often than asked
    # (a POST that went out whole is not also resent inside an attempt).
    got = []

    def handle(conn, _index):
        got.append(read_request(conn) is not None)
        reset(conn)

    up = Listener(handle)
    g = Sidegate(tmp_path, gateway_yaml(up.url), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + CHAT, json=chat(), timeout=30,
                       headers={"cf-aig-max-attempts": str(n), "cf-aig-retry-delay": "0"})
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104), r.text
        time.sleep(0.3)
        assert got == [True] * n, f"{len(got)} requests for {n} attempts"
        assert g.logs().count("retrying upstream") == n - 1
    finally:
        g.stop()
        up.close()


def test_a_stream_that_broke_after_its_first_bytes_is_not_sent_again(tmp_path):
    # Bytes went to the client: no retry can take their place. The client sees the stream break
    # and the log says so.
    got = []
    event = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hel"}}]}\n\n'

    def handle(conn, _index):
        read_request(conn)
        got.append(1)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n" % (len(event), event))
        time.sleep(0.2)
        reset(conn)

    up = Listener(handle)
    g = Sidegate(tmp_path, gateway_yaml(up.url), DEFAULT_KEYS)
    try:
        received = b""
        with httpx.stream("POST", g.url + CHAT, json=dict(chat(), stream=True), timeout=30,
                          headers={"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"}) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for piece in r.iter_bytes():
                    received += piece
        assert received == event
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert " outcome=upstream_error" in line and " success=false " in line, line
        assert got == [1] and "retrying upstream" not in g.logs()
    finally:
        g.stop()
        up.close()


# Failed at 91770b5 (mended since): a /compat answer held back whole for translation whose body breaks off before any byte reached the client ends in a 502 although a fallback was configured: the next target or step is never tried
@pytest.mark.parametrize("entry", ["fallback chain", "universal step"])
def test_a_held_back_answer_that_breaks_before_any_byte_went_out_falls_back(mock, tmp_path, entry):
    broken = BrokenBodyUpstream(broken=99)
    spec = ("  fallbacks:\n    - name: chain\n      targets:\n"
            "        - {provider: anthropic, model: claude-haiku-4-5}\n"
            "        - {provider: openai, model: gpt-4o-mini}\n")
    g = Sidegate(tmp_path, with_provider(gateway_yaml(mock.url, extra_spec=spec), "anthropic", broken.url), DEFAULT_KEYS)
    try:
        mock.clear()
        ask = chat("fall back please")
        if entry == "fallback chain":
            r = httpx.post(g.url + "/compat/chat/completions", json=dict(ask, model="fallback/chain"), timeout=30)
        else:
            steps = [{"provider": "compat", "endpoint": "chat/completions", "headers": {},
                      "query": dict(ask, model="anthropic/claude-haiku-4-5")},
                     {"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": ask}]
            r = httpx.post(g.url + "/", json=steps, timeout=30)
        assert broken.hits == 1
        assert (r.status_code, r.headers.get("cf-aig-step")) == (200, "1"), \
            f"the fallback was never tried: {r.status_code} {r.text[:200]}"
        assert r.json()["choices"][0]["message"]["content"] == "mock reply to: fall back please"
    finally:
        g.stop()
        broken.stop()


# Failed at 91770b5 (mended since): a /compat answer held back whole whose body breaks off (a connection reset, before any byte reached the client) is not retried: the client gets 502/2104 with 2 attempts asked for, and the provider was asked once
def test_a_held_back_answer_that_breaks_before_any_byte_went_out_is_retried(mock, tmp_path):
    # README: "Retries happen before any byte reaches the client, for /compat too", after "a
    # connection error"; this one came while the answer was still the gateway's.
    broken = BrokenBodyUpstream(broken=1)
    g = Sidegate(tmp_path, with_provider(gateway_yaml(mock.url), "anthropic", broken.url), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + "/compat/chat/completions", timeout=30,
                       json=dict(chat(), model="anthropic/claude-haiku-4-5"),
                       headers={"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0"})
        assert (r.status_code, broken.hits) == (200, 2), f"{broken.hits} attempt(s): {r.status_code} {r.text[:200]}"
        assert r.json()["choices"][0]["message"]["content"] == "second try"
    finally:
        g.stop()
        broken.stop()


# --- a client that leaves, time spent ------------------------------------------------------------


def test_a_client_that_leaves_during_a_universal_step_stops_the_fallbacks(gateway, mock):
    # Step 0 takes 800 ms to fail; the client gives up after 300 ms: step 1 is never sent (nor
    # billed), and the request is logged as given up.
    slow = {"provider": "openai", "endpoint": "chat/completions", "headers": {"x-mock-delay-ms": "800"},
            "query": dict(chat(), model="mock-status-503")}
    backup = {"provider": "anthropic", "endpoint": "v1/messages", "headers": {},
              "query": {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": chat()["messages"]}}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(gateway.url + "/", json=[slow, backup], timeout=0.3)
    time.sleep(1.5)
    assert [r["path"] for r in mock.requests()] == ["/v1/chat/completions"]
    logs = gateway.wait_for_log(" status_code=499 ")
    assert " outcome=cancelled" in logs


def test_when_every_step_hangs_the_universal_endpoint_answers_504_within_the_steps_timeouts(tmp_path):
    # Three steps, two attempts each of 300 ms to the first byte, upstreams that never answer:
    # six attempts, then the last step's 504 — about 1.8 s, never the gateway's 600 s default.
    held = []

    def hang(conn, _index):
        read_request(conn)
        held.append(conn)

    up = Listener(hang)
    g = Sidegate(tmp_path, gateway_yaml(up.url), DEFAULT_KEYS)
    try:
        config = {"requestTimeout": 300, "maxAttempts": 2, "retryDelay": 0}
        steps = [{"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": chat(), "config": config},
                 {"provider": "anthropic", "endpoint": "v1/messages", "headers": {}, "config": config,
                  "query": {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": chat()["messages"]}},
                 {"provider": "compat", "endpoint": "chat/completions", "headers": {}, "config": config,
                  "query": dict(chat(), model="openai/gpt-4o-mini")}]
        started = time.monotonic()
        r = httpx.post(g.url + "/", json=steps, timeout=30)
        took = time.monotonic() - started
        assert (r.status_code, r.json()["error"][0]["code"], r.headers.get("cf-aig-step")) == (504, 2103, "2"), r.text
        assert 1.7 < took < 6, took
        assert up.accepted == 6
    finally:
        g.stop()
        up.close()
        for c in held:
            c.close()


def test_a_universal_steps_timeout_bounds_its_first_byte_not_its_stream(gateway, mock):
    # Cloudflare: "As long as the first part of the response returns within the specified
    # timeframe — such as when streaming a response — your gateway will wait for the response."
    step = {"provider": "openai", "endpoint": "chat/completions", "headers": {"x-mock-chunk-delay-ms": "300"},
            "query": dict(chat("hi"), stream=True), "config": {"requestTimeout": 150}}
    with httpx.stream("POST", gateway.url + "/", json=[step, step], timeout=30) as r:
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0")
        body = b"".join(r.iter_bytes())
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    assert len(mock.requests()) == 1


# --- what reaches the provider on each attempt ---------------------------------------------------


def test_a_chunked_multipart_upload_goes_whole_on_every_attempt(gateway, mock):
    boundary = "r158boundary"
    audio = bytes(range(256)) * 2048
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # no Content-Length: the client sends it chunked
        for i in range(0, len(form), 65536):
            yield form[i:i + 65536]

    h = fail_first(2)
    r = httpx.post(gateway.url + "/openai/audio/transcriptions", content=chunks(), timeout=30,
                   headers=dict(h, **{"content-type": f"multipart/form-data; boundary={boundary}",
                                      "cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"}))
    assert r.status_code == 200, r.text
    assert r.json()["text"] == f"mock transcript of {len(audio)} bytes"
    sent = [q for q in mock.requests() if q["headers"].get("x-mock-fail-first") == h["x-mock-fail-first"]]
    assert len(sent) == 3
    for q in sent:
        assert q["body"] == form.decode("utf-8", "replace")
        assert q["headers"]["content-length"] == str(len(form))
        assert q["headers"]["content-type"] == f"multipart/form-data; boundary={boundary}"


def read_whole(conn):
    """One request off `conn`: `(head, body)`, None when it ends first. (`rawhttp.read_request`
    joins bytes one recv at a time: quadratic on the 66 MiB body below.)"""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        piece = conn.recv(1 << 20)
        if not piece:
            return None
        buf += piece
    at = buf.index(b"\r\n\r\n")
    head, body = bytes(buf[:at]), bytearray(buf[at + 4:])
    length = next((int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                   if k.strip().lower() == b"content-length"), 0)
    while len(body) < length:
        piece = conn.recv(1 << 20)
        if not piece:
            return None
        body += piece
    return head, bytes(body)


def test_a_body_over_64_mib_goes_whole_on_every_attempt(tmp_path):
    # Bodies over 64 MiB take the general upstream client: each attempt still carries all of it.
    digests = []

    def handle(conn, _index):
        with conn:
            while (req := read_whole(conn)) is not None:
                digests.append(hashlib.sha256(req[1]).hexdigest())
                if len(digests) < 3:
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"content-length: 2\r\n\r\n{}")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")

    up = Listener(handle)
    spec = "  limits: {maxRequestBody: 80Mi, maxBufferedBytes: 256Mi}\n"
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        big = os.urandom(1 << 20) * 66
        r = httpx.post(g.url + "/openai/files", content=big, timeout=60,
                       headers={"content-type": "application/octet-stream",
                                "cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"})
        assert r.status_code == 200, r.text
        assert digests == [hashlib.sha256(big).hexdigest()] * 3
    finally:
        g.stop()
        up.close()


def test_no_universal_step_gets_another_steps_key_or_the_requests(gateway, mock):
    # groq has no stored key: each step's own header goes to it, and nothing else — not the
    # previous step's, not the Authorization of the universal request itself.
    def step(model, key):
        return {"provider": "groq", "endpoint": "chat/completions",
                "headers": {"authorization": f"Bearer {key}"}, "query": dict(chat(), model=model)}

    r = httpx.post(gateway.url + "/", json=[step("mock-status-503", "gsk-step-zero"), step("llama-3", "gsk-step-one")],
                   headers={"authorization": "Bearer gsk-of-the-request", "x-api-key": "of-the-request"})
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
    first, second = mock.requests()
    assert (first["headers"]["authorization"], second["headers"]["authorization"]) == \
        ("Bearer gsk-step-zero", "Bearer gsk-step-one")
    assert "x-api-key" not in first["headers"] and "x-api-key" not in second["headers"]


# --- what is counted and logged ------------------------------------------------------------------


def test_tokens_and_cost_are_counted_once_for_retried_and_fallen_back_requests(gateway, mock):
    h = fail_first(2)
    r = httpx.post(gateway.url + CHAT, json=chat("count me once"), timeout=30,
                   headers=dict(h, **{"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"}))
    assert r.status_code == 200 and attempts(mock, h) == 3
    retried = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    failing = {"provider": "openai", "endpoint": "chat/completions", "config": {"maxAttempts": 2, "retryDelay": 0},
               "headers": {}, "query": dict(chat(), model="mock-status-503")}
    serving = {"provider": "openai", "endpoint": "chat/completions", "config": {"maxAttempts": 2, "retryDelay": 0},
               "headers": fail_first(1), "query": chat("count me once")}
    u = httpx.post(gateway.url + "/", json=[failing, serving], timeout=30)
    assert (u.status_code, u.headers["cf-aig-step"]) == (200, "1"), u.text
    fell_back = gateway.wait_log_line(u.headers["cf-aig-log-id"])
    for line in (retried, fell_back):
        assert " tokens_in=3 tokens_out=6 " in line and " cost=0.00000405" in line, line
    assert " step=1" in fell_back, fell_back
    access = [line for line in gateway.logs().splitlines() if " request id=" in line]
    assert len(access) == 2, access
    metrics = gateway.metrics()
    assert 'sidegate_requests_total{provider="openai",status="200"} 2' in metrics
    assert 'sidegate_tokens_total{provider="openai",direction="output"} 12' in metrics


@pytest.mark.parametrize("name,value", [
    ("cf-aig-max-attempts", "-1"), ("cf-aig-max-attempts", "2.5"), ("cf-aig-max-attempts", ""),
    ("cf-aig-retry-delay", "-1"), ("cf-aig-retry-delay", "1s"),
    ("cf-aig-request-timeout", "0"), ("cf-aig-request-timeout", "3600001"), ("cf-aig-backoff", ""),
])
def test_bad_retry_headers_are_refused_alike_on_compat_and_the_universal_endpoint(gateway, mock, name, value):
    ask = chat()
    compat = httpx.post(gateway.url + "/compat/chat/completions", json=dict(ask, model="openai/gpt-4o-mini"),
                        headers={name: value})
    request_level = httpx.post(gateway.url + "/", headers={name: value},
                               json=[{"provider": "openai", "endpoint": "chat/completions", "query": ask}])
    step_level = httpx.post(gateway.url + "/", json=[{"provider": "openai", "endpoint": "chat/completions",
                                                      "query": ask, "headers": {name: value}}])
    for r, code in ((compat, 2100), (request_level, 2100), (step_level, 2108)):
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["success"] is False and body["error"][0]["code"] == code, body
        assert name in body["error"][0]["message"], body
    assert mock.requests() == []
