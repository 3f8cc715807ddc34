"""Retries of failed upstream attempts (spec.retries and cf-aig-max-attempts/-retry-delay/-backoff).

The mock provider fails on demand: `x-mock-fail-first: N;ID[;STATUS]` answers the first N
requests carrying that value with STATUS (default 503), so each test counts exact attempts.
"""

import email.utils
import json
import socket
import struct
import threading
import time
import uuid

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, StallingServer, gateway_yaml
from rawhttp import Listener, read_request

CHAT = "/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "try again"}]}


def fail_first(n, status=None):
    return {"x-mock-fail-first": f"{n};{uuid.uuid4().hex}" + (f";{status}" if status else "")}


def attempts(mock, headers):
    value = headers["x-mock-fail-first"]
    return sum(r["headers"].get("x-mock-fail-first") == value for r in mock.requests())


def retry_metric(g):
    for line in g.metrics().splitlines():
        if line.startswith('sidegate_upstream_retries_total{provider="openai"}'):
            return int(float(line.split()[-1]))
    return 0


@pytest.fixture
def retrying(mock, tmp_path):
    spec = "  retries: {maxAttempts: 3, retryDelay: 20ms, backoff: constant}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def test_failed_attempts_are_retried_until_one_succeeds(retrying, mock):
    h = fail_first(2)
    r = httpx.post(retrying.url + CHAT, json=BODY, headers=h)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: try again"
    assert attempts(mock, h) == 3
    assert retry_metric(retrying) == 2
    assert "retrying upstream" in retrying.logs()


def retry_after_gateway(tmp_path, retry_after):
    """A gateway retrying (3 attempts, 20 ms apart) a provider that answers 429 with
    `Retry-After: retry_after` once, then 200."""
    server = FixedAnswerServer(b'{"error": {"message": "slow down"}}', status=429,
                               then=[(200, b'{"id": "ok", "choices": []}')], headers=[("retry-after", retry_after)])
    spec = ("  retries: {maxAttempts: 3, retryDelay: 20ms, backoff: constant}\n"
            f"  providers:\n    custom-ra: {{baseURL: '{server.url}/v1'}}\n")
    yaml = gateway_yaml("http://127.0.0.1:9", extra_spec="").replace("  providers:\n", "", 1)
    yaml = yaml.replace("    openai:", spec + "    openai:", 1)
    return server, Sidegate(tmp_path, yaml, DEFAULT_KEYS)


def test_a_providers_retry_after_is_waited_out_before_the_next_attempt(tmp_path):
    server, g = retry_after_gateway(tmp_path, "1")
    try:
        started = time.monotonic()
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=BODY)
        took = time.monotonic() - started
        assert (r.status_code, r.json()["id"]) == (200, "ok"), r.text
        assert took >= 0.95, f"retried after {took:.2f} s, not the 1 s the provider asked for"
    finally:
        g.stop()
        server.stop()


def test_a_retry_after_longer_than_the_gateway_waits_passes_the_answer_through(tmp_path):
    server, g = retry_after_gateway(tmp_path, "120")
    try:
        started = time.monotonic()
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=BODY)
        assert time.monotonic() - started < 1.0
        assert (r.status_code, r.headers["retry-after"]) == (429, "120"), r.text
        assert r.json() == {"error": {"message": "slow down"}}
    finally:
        g.stop()
        server.stop()


def test_a_fallback_step_moves_on_when_retry_after_asks_for_longer_than_its_timeout(mock, tmp_path):
    # A step that may take 1 s for its answer does not wait 30 s to retry: its 429 is its answer,
    # and the next step serves (a shorter Retry-After is still waited out: see above).
    server = FixedAnswerServer(b'{"error": {"message": "slow down"}}', status=429, headers=[("retry-after", "30")])
    yaml = gateway_yaml(mock.url).replace(
        "  providers:\n", f"  providers:\n    custom-ra: {{baseURL: '{server.url}/v1'}}\n", 1)
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS)
    try:
        limited = {"provider": "custom-ra", "endpoint": "chat/completions", "headers": {},
                   "query": BODY, "config": {"maxAttempts": 2, "retryDelay": 0, "requestTimeout": 1000}}
        fallback = {"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": BODY}
        started = time.monotonic()
        r = httpx.post(g.url + "/", json=[limited, fallback], timeout=60)
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
        assert time.monotonic() - started < 5, "the step waited out a Retry-After longer than its timeout"
    finally:
        g.stop()
        server.stop()


def test_the_last_attempts_provider_error_passes_through_unchanged(retrying, mock):
    h = fail_first(5, 429)
    r = httpx.post(retrying.url + CHAT, json=BODY, headers=h)
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "mock failure (x-mock-fail-first)"
    assert attempts(mock, h) == 3


def test_client_errors_are_not_retried(retrying, mock):
    r = httpx.post(retrying.url + CHAT, json=dict(BODY, model="mock-status-400"))
    assert r.status_code == 400
    assert len(mock.requests()) == 1


def test_headers_turn_retries_on_per_request(gateway, mock):
    h = fail_first(1)
    assert httpx.post(gateway.url + CHAT, json=BODY, headers=h).status_code == 503
    h = fail_first(1)
    r = httpx.post(gateway.url + CHAT, json=BODY, headers=dict(h, **{"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0"}))
    assert r.status_code == 200
    assert attempts(mock, h) == 2


def test_the_openai_sdk_gets_its_answer_with_its_own_retries_off(retrying, mock):
    h = fail_first(2, 500)
    client = openai.OpenAI(base_url=retrying.url + "/openai", api_key="placeholder", max_retries=0, default_headers=h)
    assert client.chat.completions.create(**BODY).choices[0].message.content == "mock reply to: try again"
    assert attempts(mock, h) == 3


def test_exponential_backoff_waits_longer_each_time(gateway, mock):
    h = fail_first(2)
    t0 = time.monotonic()
    r = httpx.post(gateway.url + CHAT, json=BODY, headers=dict(h, **{
        "cf-aig-max-attempts": "3", "cf-aig-retry-delay": "200", "cf-aig-backoff": "exponential"}))
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert elapsed >= 0.6, elapsed  # 200 ms, then 400 ms
    assert attempts(mock, h) == 3


def test_timeouts_are_per_attempt_and_the_last_attempt_waits(gateway, mock):
    # Cloudflare: "On the final retry attempt, your gateway will wait until the request completes".
    h = dict(fail_first(0), **{"x-mock-delay-ms": "400", "cf-aig-request-timeout": "100",
                               "cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"})
    r = httpx.post(gateway.url + CHAT, json=BODY, headers=h)
    assert r.status_code == 200
    assert attempts(mock, h) == 3


def test_unreachable_upstreams_are_retried_then_502(mock, tmp_path, refusing_port):
    dead = refusing_port.url
    spec = "  retries: {maxAttempts: 3, retryDelay: 10ms}\n"
    g = Sidegate(tmp_path, gateway_yaml(dead, extra_spec=spec), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + CHAT, json=BODY)
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104)
        assert retry_metric(g) == 2
    finally:
        g.stop()


def test_compat_requests_are_retried_too(mock, tmp_path, refusing_port):
    # /compat builds its own upstream request (no client headers pass), so use a dead upstream.
    dead = refusing_port.url
    spec = "  retries: {maxAttempts: 2, retryDelay: 10ms}\n"
    g = Sidegate(tmp_path, gateway_yaml(dead, extra_spec=spec), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(BODY, model="anthropic/claude-haiku-4-5"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104)
        assert 'sidegate_upstream_retries_total{provider="anthropic"} 1' in g.metrics()
    finally:
        g.stop()


@pytest.mark.parametrize("header,value", [
    ("cf-aig-max-attempts", "0"), ("cf-aig-max-attempts", "6"),
    ("cf-aig-retry-delay", "5001"), ("cf-aig-backoff", "fibonacci"),
])
def test_bad_retry_headers_are_400_2100(gateway, mock, header, value):
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={header: value})
    assert r.status_code == 400
    err = r.json()["error"][0]
    assert err["code"] == 2100 and header in err["message"]
    assert mock.requests() == []


# --- what the provider's answer says -------------------------------------------------------------


def custom_gateway(tmp_path, server, extra_spec=""):
    """A gateway whose `custom-ra` provider is `server` (an OpenAI-format upstream)."""
    yaml = gateway_yaml("http://127.0.0.1:9", extra_spec=extra_spec).replace(
        "  providers:\n", f"  providers:\n    custom-ra: {{baseURL: '{server.url}/v1'}}\n", 1)
    return Sidegate(tmp_path, yaml, DEFAULT_KEYS)


@pytest.mark.parametrize("form", ["decimal seconds", "HTTP date"])
def test_a_retry_after_in_decimal_seconds_or_as_a_date_is_waited_out(tmp_path, form):
    # As the OpenAI and Anthropic SDKs read it (RFC 9110 §10.2.3 for the date).
    value = "1.5" if form == "decimal seconds" else email.utils.formatdate(time.time() + 2.5, usegmt=True)
    server, g = retry_after_gateway(tmp_path, value)
    try:
        started = time.monotonic()
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=BODY, timeout=30)
        took = time.monotonic() - started
        assert (r.status_code, r.json()["id"]) == (200, "ok"), r.text
        assert took >= 1.4, f"retried after {took:.2f} s, not the 1.5 s or more the provider asked for"
    finally:
        g.stop()
        server.stop()


def test_x_should_retry_true_retries_an_answer_not_retried_for_its_status(tmp_path):
    server = FixedAnswerServer(b'{"error": {"message": "try me again"}}', status=400,
                               then=[(200, b'{"id": "again", "choices": []}')], headers=[("x-should-retry", "true")])
    g = custom_gateway(tmp_path, server)
    try:
        r = httpx.post(g.url + "/custom-ra/chat/completions", json=BODY, timeout=30,
                       headers={"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0"})
        assert (r.status_code, r.json()["id"]) == (200, "again"), r.text
        assert "retrying upstream" in g.logs()
    finally:
        g.stop()
        server.stop()


@pytest.mark.parametrize("status", [408, 409])
def test_request_and_lock_timeouts_are_retried_as_the_sdks_retry_them(retrying, mock, status):
    h = fail_first(1, status)
    r = httpx.post(retrying.url + CHAT, json=BODY, headers=h)
    assert r.status_code == 200, r.text
    assert attempts(mock, h) == 2


# --- /compat answers held back whole -------------------------------------------------------------


def anthropic_message(text):
    body = json.dumps({"id": "msg_raw", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class ScriptedUpstream:
    """A raw loopback upstream answering its n-th request (one per connection, each answer
    saying `connection: close`: none is pooled and found closed on reuse) as
    `script[min(n, len - 1)]` says: `reset` (a 200 head, 20 bytes of a 400-byte body, a TCP
    reset), `stall` (the same, then nothing, the connection held), `garbage` (a whole 200 that is
    no JSON: a captive portal's page), or any bytes, sent as they are. `requests` holds the
    request bodies."""

    # What `reset` and `stall` send before they break off.
    BROKEN = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 400\r\n\r\n"
              b'{"id":"msg_1","type"')

    def __init__(self, script):
        self.script, self.requests, self.held = script, [], []
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, _index):
        got = read_request(conn)
        if got is None:
            conn.close()
            return
        self.requests.append(got[1])
        action = self.script[min(len(self.requests) - 1, len(self.script) - 1)]
        if action in ("reset", "stall"):
            conn.sendall(self.BROKEN)
            if action == "stall":
                self.held.append(conn)
                return
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif action == "garbage":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 27\r\n\r\n"
                         b"<html>captive portal</html>")
        else:
            conn.sendall(action)
        conn.close()

    def stop(self):
        self.listener.close()
        for c in self.held:
            c.close()


def anthropic_gateway(tmp_path, upstream, mock_url="http://127.0.0.1:9", extra_spec=""):
    """A gateway whose anthropic provider is `upstream`; the others are `mock_url`."""
    yaml = gateway_yaml(mock_url, extra_spec=extra_spec)
    yaml = yaml.replace(f"    anthropic: {{baseURL: '{mock_url}'}}\n", f"    anthropic: {{baseURL: '{upstream.url}'}}\n")
    return Sidegate(tmp_path, yaml, DEFAULT_KEYS)


COMPAT_CHAT = dict(BODY, model="anthropic/claude-haiku-4-5")
TWO_ATTEMPTS = {"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0"}


def test_a_held_back_answer_that_stalls_is_retried(tmp_path):
    # A body silent for the request timeout while held back whole is a failed attempt, as one
    # broken off is: the client has had nothing yet.
    up = ScriptedUpstream(["stall", anthropic_message("after the stall")])
    g = anthropic_gateway(tmp_path, up, extra_spec="  requestTimeout: 1s\n")
    try:
        r = httpx.post(g.url + "/compat/chat/completions", json=COMPAT_CHAT, headers=TWO_ATTEMPTS, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "after the stall"
        assert len(up.requests) == 2
        assert "no data for 1000 ms" in g.wait_for_log("retrying upstream")
    finally:
        g.stop()
        up.stop()


def test_a_held_back_answer_broken_on_every_attempt_is_a_502_logged_as_not_delivered(tmp_path):
    up = ScriptedUpstream(["reset"])
    g = anthropic_gateway(tmp_path, up)
    try:
        r = httpx.post(g.url + "/compat/chat/completions", json=COMPAT_CHAT, headers=TWO_ATTEMPTS, timeout=30)
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104), r.text
        assert len(up.requests) == 2
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert "status_code=502" in line and "outcome=upstream_error" in line, line
        logs = g.logs()
        assert logs.count("retrying upstream") == 1 and "response not delivered" in logs
    finally:
        g.stop()
        up.stop()


def test_an_answer_that_cannot_be_translated_is_not_asked_for_again(tmp_path):
    # The provider answered whole: the same request would get the same answer, billed again.
    up = ScriptedUpstream(["garbage", anthropic_message("never asked")])
    g = anthropic_gateway(tmp_path, up)
    try:
        r = httpx.post(g.url + "/compat/chat/completions", json=COMPAT_CHAT, timeout=30,
                       headers={"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"})
        assert r.status_code == 502, r.text
        assert r.json()["error"][0]["code"] == 2104 and "could not be translated" in r.text, r.text
        assert len(up.requests) == 1
    finally:
        g.stop()
        up.stop()


def test_an_answer_that_cannot_be_translated_falls_back(mock, tmp_path):
    # A fallback stands in for a target whose answer cannot reach the client.
    up = ScriptedUpstream(["garbage"])
    spec = ("  fallbacks:\n    - name: chain\n      targets:\n"
            "        - {provider: anthropic, model: claude-haiku-4-5}\n"
            "        - {provider: openai, model: gpt-4o-mini}\n")
    g = anthropic_gateway(tmp_path, up, mock.url, extra_spec=spec)
    try:
        mock.clear()
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(BODY, model="fallback/chain"), timeout=30)
        assert (r.status_code, r.headers.get("cf-aig-step")) == (200, "1"), r.text
        assert r.json()["choices"][0]["message"]["content"] == "mock reply to: try again"
        assert len(up.requests) == 1 and len(mock.requests()) == 1
        assert "could not be translated" in g.wait_for_log("route target failed, trying the next")
    finally:
        g.stop()
        up.stop()


def titan_answer(text):
    body = json.dumps({"embedding": [float(len(text)), 0.5], "inputTextTokenCount": 1}).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class TitanUpstream:
    """A raw Bedrock InvokeModel upstream for Titan embeddings (one text per request): the text
    `fail` is answered as `how` says (`reset`, or bytes) its first `times` times; the rest get
    a vector `[len(text), 0.5]`. `texts` lists the texts asked for, in order."""

    def __init__(self, fail, how, times):
        self.fail, self.how, self.times, self.texts = fail, how, times, []
        self.lock = threading.Lock()
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, _index):
        got = read_request(conn)
        if got is None:
            conn.close()
            return
        text = json.loads(got[1])["inputText"]
        with self.lock:
            self.texts.append(text)
            failing = text == self.fail and self.texts.count(text) <= self.times
        if failing and self.how == "reset":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 400\r\n\r\n{\"emb")
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(self.how if failing else titan_answer(text))
        conn.close()

    def stop(self):
        self.listener.close()


TITAN = "aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0"
BEDROCK_KEYS = dict(DEFAULT_KEYS, **{"aws-bedrock.default": json.dumps(
    {"accessKeyId": "AKIDMOCK", "secretAccessKey": "mock-secret", "region": "us-east-1"})})


def bedrock_gateway(tmp_path, upstream, mock_url="http://127.0.0.1:9", extra_spec=""):
    spec = f"    aws-bedrock: {{baseURL: '{upstream.url}'}}\n" + extra_spec
    return Sidegate(tmp_path, gateway_yaml(mock_url, extra_spec=spec), BEDROCK_KEYS)


def test_a_part_of_a_request_sent_in_parts_whose_answer_broke_off_is_retried(tmp_path):
    up = TitanUpstream("bb", "reset", times=1)
    g = bedrock_gateway(tmp_path, up)
    try:
        r = httpx.post(g.url + "/compat/embeddings", json={"model": TITAN, "input": ["a", "bb", "ccc"]},
                       headers=TWO_ATTEMPTS, timeout=30)
        assert r.status_code == 200, r.text
        assert [d["embedding"][0] for d in r.json()["data"]] == [1.0, 2.0, 3.0]
        assert sorted(up.texts) == ["a", "bb", "bb", "ccc"]
    finally:
        g.stop()
        up.stop()


def test_a_request_sent_in_parts_whose_part_fails_falls_back_whole(mock, tmp_path):
    # The next target gets every text: an answer never joins two models' vectors.
    refused = b'{"message": "too many tokens"}'
    up = TitanUpstream("bb", b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"x-amzn-errortype: ValidationException\r\ncontent-length: %d\r\n\r\n%s"
                       % (len(refused), refused), times=99)
    spec = ("  fallbacks:\n    - name: vectors\n      targets:\n"
            "        - {provider: aws-bedrock, model: 'us-east-1/amazon.titan-embed-text-v2:0'}\n"
            "        - {provider: openai, model: text-embedding-3-small}\n")
    g = bedrock_gateway(tmp_path, up, mock.url, extra_spec=spec)
    try:
        mock.clear()
        r = httpx.post(g.url + "/compat/embeddings", json={"model": "fallback/vectors", "input": ["a", "bb", "ccc"]},
                       timeout=30)
        assert (r.status_code, r.headers.get("cf-aig-step")) == (200, "1"), r.text
        assert len(r.json()["data"]) == 3
        (sent,) = mock.requests()
        assert json.loads(sent["body"])["input"] == ["a", "bb", "ccc"]
        assert "a part of the request: status 400" in g.wait_for_log("route target failed, trying the next")
    finally:
        g.stop()
        up.stop()


# --- answers held back whole for the response checks ---------------------------------------------

# Response checks (DLP, guardrails) hold an answer passed on as it came back whole: it is read
# within its attempt, so one that breaks off before the client got any of it is retried and then
# hands over, as a /compat answer held back to be translated does.
RESPONSE_CHECKS = {
    "dlp": "  dlp:\n    policies:\n      - {{id: cards, action: BLOCK, check: [RESPONSE], profiles: [credit-card]}}\n",
    "guardrails": "  guardrails:\n    moderationURL: '{mock}/v1/moderations'\n    response: {{violence: block}}\n",
}
REQUEST_CHECKS = {
    "dlp": "  dlp:\n    policies:\n      - {{id: cards, action: BLOCK, check: [REQUEST], profiles: [credit-card]}}\n",
    "guardrails": "  guardrails:\n    moderationURL: '{mock}/v1/moderations'\n    prompt: {{violence: block}}\n",
}


def openai_completion(text):
    body = json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def chunk_event(text):
    chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: %s\n\n" % json.dumps(chunk).encode()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


def openai_stream(*texts):
    return STREAM_HEAD + b"".join(chunk_event(t) for t in texts) + b"data: [DONE]\n\n"


class StreamBreakingUpstream(ScriptedUpstream):
    """A ScriptedUpstream whose `reset` (and `stall`) sends the head and first event of an
    OpenAI chat stream (`hel`) before it breaks off."""

    BROKEN = STREAM_HEAD + chunk_event("hel")


def checked_gateway(tmp_path, upstream, mock, checks, extra_spec="", on=RESPONSE_CHECKS):
    """A gateway with `checks` (`on` the responses, or the requests) whose openai provider is
    `upstream`; the other providers and the moderation endpoint are the mock."""
    yaml = gateway_yaml(mock.url, extra_spec=on[checks].format(mock=mock.url) + extra_spec)
    yaml = yaml.replace(f"    openai: {{baseURL: '{mock.url}/v1'}}\n", f"    openai: {{baseURL: '{upstream.url}/v1'}}\n")
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS)
    mock.clear()
    return g


def access_lines(g):
    return [line for line in g.logs().splitlines() if " request id=" in line]


def moderated(mock):
    return [json.loads(r["body"])["input"] for r in mock.requests() if r["path"] == "/v1/moderations"]


def metric(g, prefix):
    return [line for line in g.metrics().splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("how", ["reset", "stall"])
@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_an_answer_held_back_for_the_response_checks_that_breaks_off_is_retried(mock, tmp_path, checks, how):
    up = ScriptedUpstream([how, openai_completion("second try")])
    g = checked_gateway(tmp_path, up, mock, checks, extra_spec="  requestTimeout: 1s\n")
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0,
                               default_headers=TWO_ATTEMPTS)
        raw = client.chat.completions.with_raw_response.create(**BODY)
        assert raw.parse().choices[0].message.content == "second try"
        assert len(up.requests) == 2
        failure = "no data for 1000 ms" if how == "stall" else "reading the answer"
        assert failure in g.wait_for_log("retrying upstream")
        # Only the answer the client got is checked, logged and counted: once.
        if checks == "guardrails":
            assert moderated(mock) == ["second try"]
        line = g.wait_log_line(raw.headers["cf-aig-log-id"])
        assert " status_code=200 " in line and " tokens_in=3 tokens_out=2 " in line, line
        assert len(access_lines(g)) == 1
        assert metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}') == \
            ['sidegate_tokens_total{provider="openai",direction="output"} 2']
        assert retry_metric(g) == 1
    finally:
        g.stop()
        up.stop()


@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_a_stream_held_back_for_the_response_checks_that_breaks_off_is_retried_whole(mock, tmp_path, checks):
    # The first attempt's event never reaches the client: it gets the second attempt's stream,
    # and nothing of the first.
    up = StreamBreakingUpstream(["reset", openai_stream("second", " try")])
    g = checked_gateway(tmp_path, up, mock, checks)
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0,
                               default_headers=TWO_ATTEMPTS)
        stream = client.chat.completions.create(**BODY, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "second try"
        assert len(up.requests) == 2
        if checks == "guardrails":
            assert moderated(mock) == ["second try"]
    finally:
        g.stop()
        up.stop()


def anthropic_stream(text):
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_raw", "type": "message", "role": "assistant", "model": "claude-haiku-4-5", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return STREAM_HEAD + b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                                  for name, data in events)


@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_a_compat_stream_held_back_for_the_response_checks_that_breaks_off_is_retried(mock, tmp_path, checks):
    # A stream translated as it comes is held back whole for the checks too: read within its
    # attempt, as an answer passed on as it came is.
    up = ScriptedUpstream(["reset", anthropic_stream("second try")])
    g = anthropic_gateway(tmp_path, up, mock.url, extra_spec=RESPONSE_CHECKS[checks].format(mock=mock.url))
    try:
        mock.clear()
        client = openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0,
                               default_headers=TWO_ATTEMPTS)
        stream = client.chat.completions.create(**COMPAT_CHAT, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "second try"
        assert len(up.requests) == 2
        assert metric(g, 'sidegate_tokens_total{provider="anthropic",direction="output"}') == \
            ['sidegate_tokens_total{provider="anthropic",direction="output"} 2']
    finally:
        g.stop()
        up.stop()


@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_an_answer_held_back_for_the_checks_broken_on_every_attempt_is_a_502_counting_no_tokens(mock, tmp_path, checks):
    up = ScriptedUpstream(["reset"])
    g = checked_gateway(tmp_path, up, mock, checks)
    try:
        r = httpx.post(g.url + CHAT, json=BODY, headers=TWO_ATTEMPTS, timeout=30)
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104), r.text
        assert len(up.requests) == 2
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert " status_code=502 " in line and " outcome=upstream_error" in line, line
        # The bytes the client got: the error.
        assert f" bytes={len(r.content)} " in line, line
        assert "response not delivered" in g.logs() and g.logs().count("retrying upstream") == 1
        assert metric(g, "sidegate_tokens_total") == [] and moderated(mock) == []
    finally:
        g.stop()
        up.stop()


@pytest.mark.parametrize("entry", ["fallback chain", "universal step", "universal compat step"])
@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_an_answer_held_back_for_the_response_checks_that_breaks_off_falls_back(mock, tmp_path, checks, entry):
    up = ScriptedUpstream(["reset"])
    spec = ("  fallbacks:\n    - name: chain\n      targets:\n"
            "        - {provider: openai, model: gpt-4o-mini}\n"
            "        - {provider: custom-local, model: gpt-4o-mini}\n")
    g = checked_gateway(tmp_path, up, mock, checks, extra_spec=spec)
    try:
        ask = dict(BODY, messages=[{"role": "user", "content": "fall back please"}])
        local = {"provider": "custom-local", "endpoint": "chat/completions", "headers": {}, "query": ask}
        if entry == "fallback chain":
            client = openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(**dict(ask, model="fallback/chain"))
            status, headers, content = raw.status_code, raw.headers, raw.parse().choices[0].message.content
            handed = "route target failed, trying the next"
        else:
            first = ({"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": ask}
                     if entry == "universal step" else
                     {"provider": "compat", "endpoint": "chat/completions", "headers": {},
                      "query": dict(ask, model="openai/gpt-4o-mini")})
            r = httpx.post(g.url + "/", json=[first, local], timeout=30)
            status, headers = r.status_code, r.headers
            content = r.json()["choices"][0]["message"]["content"] if status == 200 else r.text
            handed = "universal step failed, trying the next"
        assert (status, headers.get("cf-aig-step")) == (200, "1"), f"the fallback was never tried: {status} {content[:200]}"
        assert content == "mock reply to: fall back please"
        assert len(up.requests) == 1
        assert "reading the answer" in g.wait_for_log(handed)
        # Logged and counted once, for what served.
        line = g.wait_log_line(headers["cf-aig-log-id"])
        assert " provider=custom-local " in line and " step=1" in line and " status_code=200 " in line, line
        assert len(access_lines(g)) == 1
        assert metric(g, 'sidegate_tokens_total{provider="openai"') == []
        if checks == "guardrails":
            assert moderated(mock) == ["mock reply to: fall back please"]
    finally:
        g.stop()
        up.stop()


@pytest.mark.parametrize("checks", ["dlp", "guardrails"])
def test_with_request_checks_only_a_stream_that_broke_after_its_first_bytes_is_not_sent_again(mock, tmp_path, checks):
    # Nothing holds the answer back: it streams on as it comes, and bytes that reached the
    # client are never followed by another attempt's.
    up = StreamBreakingUpstream(["reset", openai_stream("never", " sent")])
    g = checked_gateway(tmp_path, up, mock, checks, on=REQUEST_CHECKS)
    try:
        received = b""
        with httpx.stream("POST", g.url + CHAT, json=dict(BODY, stream=True), headers=TWO_ATTEMPTS, timeout=30) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for piece in r.iter_bytes():
                    received += piece
        assert received == chunk_event("hel")
        assert len(up.requests) == 1 and "retrying upstream" not in g.logs()
    finally:
        g.stop()
        up.stop()


# --- the request's own config --------------------------------------------------------------------


def test_a_reload_does_not_change_the_wait_limits_of_a_request_under_way(tmp_path):
    # The request came under `requestTimeout: 1s`: its stream's silences are bounded by that,
    # though the config was reloaded to 120 s before it went upstream.
    stall = StallingServer()
    g = Sidegate(tmp_path, gateway_yaml(stall.url, extra_spec="  requestTimeout: 1s\n"), DEFAULT_KEYS)
    try:
        # Over 64 KiB: the gateway takes the request (and its config) before the body is read.
        body = json.dumps(dict(BODY, messages=[{"role": "user", "content": "x" * (100 << 10)}])).encode()
        with socket.create_connection(("127.0.0.1", g.port), timeout=30) as s:
            s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body[:10]))
            before = reload_successes(g)
            g.config.write_text(gateway_yaml(stall.url, extra_spec="  requestTimeout: 120s\n"))
            deadline = time.monotonic() + 10
            while reload_successes(g) == before:
                assert time.monotonic() < deadline, "the config was not reloaded"
                time.sleep(0.05)
            s.sendall(body[10:])
            started = time.monotonic()
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except TimeoutError:
                raise AssertionError(f"still open after 30 s: {got[:300]!r}") from None
            took = time.monotonic() - started
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        assert took < 5, f"the stream was cut after {took:.1f} s, not the request's 1 s"
        assert "outcome=upstream_error" in g.wait_for_log("outcome=upstream_error")
    finally:
        g.stop()
        stall.stop()


def reload_successes(g):
    for line in g.metrics().splitlines():
        if line.startswith('sidegate_config_reloads_total{result="success"}'):
            return float(line.split()[-1])
    return 0.0
