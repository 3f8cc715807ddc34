"""The request timeout as Cloudflare documents it (configuration/request-handling):

- it bounds the first part of the response only: a stream that pauses longer between chunks is
  still delivered whole;
- with retries, an attempt that times out is retried, and the last attempt waits until the
  response comes; with one attempt, a timeout is a 504 in the SPEC envelope.

The mock provider delays its response head by `x-mock-delay-ms` and each streamed event by
`x-mock-chunk-delay-ms`; it records each request as it arrives, before the delay.
"""

import uuid

import httpx
import openai

from conftest import DEFAULT_KEYS, MockProvider, Sidegate, gateway_yaml

CHAT = "/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "wait for it"}]}


def tagged(**headers):
    """`headers` and a header marking this test's requests, to count the mock's attempts."""
    return dict(headers, **{"x-mock-fail-first": f"0;{uuid.uuid4().hex}"})


def attempts(mock, headers):
    value = headers["x-mock-fail-first"]
    return sum(r["headers"].get("x-mock-fail-first") == value for r in mock.requests())


def test_a_timed_out_attempt_is_retried_and_the_last_attempt_waits_for_its_answer(gateway, mock):
    h = tagged(**{"cf-aig-request-timeout": "500", "cf-aig-max-attempts": "2",
                  "cf-aig-retry-delay": "0", "x-mock-delay-ms": "1500"})
    r = httpx.post(gateway.url + CHAT, json=BODY, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: wait for it"
    assert attempts(mock, h) == 2
    assert "retrying upstream" in gateway.logs()


def test_the_last_attempt_waits_no_longer_than_the_gateways_own_request_timeout(mock, tmp_path):
    # The operator's spec.requestTimeout bounds the last attempt's wait, as it bounds the
    # gateway's other waits.
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  requestTimeout: 800ms\n"), DEFAULT_KEYS)
    try:
        h = tagged(**{"cf-aig-request-timeout": "200", "cf-aig-max-attempts": "2",
                      "cf-aig-retry-delay": "0", "x-mock-delay-ms": "1500"})
        r = httpx.post(g.url + CHAT, json=BODY, headers=h, timeout=30)
        assert r.status_code == 504, r.text
        assert "800 ms" in r.json()["error"][0]["message"]
        assert attempts(mock, h) == 2
    finally:
        g.stop()


def test_a_single_attempt_that_times_out_is_a_504_in_the_envelope(gateway, mock):
    h = tagged(**{"cf-aig-request-timeout": "500", "cf-aig-max-attempts": "1", "x-mock-delay-ms": "1500"})
    r = httpx.post(gateway.url + CHAT, json=BODY, headers=h, timeout=30)
    assert r.status_code == 504
    body = r.json()
    assert body["success"] is False
    assert body["error"][0]["code"] == 2103
    assert "500 ms" in body["error"][0]["message"]
    assert attempts(mock, h) == 1


def test_a_stream_pausing_longer_than_the_request_timeout_is_delivered_whole(gateway, mock):
    # The head comes at once; every chunk after a pause of twice the request timeout.
    client = openai.OpenAI(base_url=gateway.url + "/openai", api_key="placeholder", max_retries=0,
                           default_headers={"cf-aig-request-timeout": "150", "x-mock-chunk-delay-ms": "300"})
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "slowly"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock reply to: slowly"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_compat_retries_a_timed_out_attempt_and_its_last_attempt_waits(tmp_path):
    # /compat builds its own upstream request (no client header passes): this mock delays
    # every answer's head.
    slow = MockProvider("--delay-ms", "1500")
    g = Sidegate(tmp_path, gateway_yaml(slow.url), DEFAULT_KEYS)
    try:
        h = {"cf-aig-request-timeout": "500", "cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0"}
        r = httpx.post(g.url + "/compat/chat/completions", headers=h, timeout=30,
                       json=dict(BODY, model="openai/gpt-4o-mini"))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "mock reply to: wait for it"
        assert len(slow.requests()) == 2
    finally:
        g.stop()
        slow.stop()
