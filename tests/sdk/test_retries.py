"""Retries of failed upstream attempts (spec.retries and cf-aig-max-attempts/-retry-delay/-backoff).

The mock provider fails on demand: `x-mock-fail-first: N;ID[;STATUS]` answers the first N
requests carrying that value with STATUS (default 503), so each test counts exact attempts.
"""

import email.utils
import json
import socket
import time
import uuid

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, StallingServer, gateway_yaml

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
