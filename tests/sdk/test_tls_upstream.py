"""HTTPS upstreams, as the providers are: the official SDKs through sidegate to a mock provider
serving TLS (offering h2 and http/1.1, as the providers do) with a CA given by --upstream-ca."""

import json
import time

import anthropic
import httpx
import openai
import pytest

from conftest import ANTHROPIC_KEY, DEFAULT_KEYS, OPENAI_KEY, MockProvider, Sidegate, gateway_yaml


@pytest.fixture
def tls_mock(tmp_path):
    m = MockProvider(tls_dir=tmp_path / "pki")
    yield m
    m.stop()


@pytest.fixture
def tls_gateway(tls_mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(tls_mock.url), DEFAULT_KEYS, extra_args=["--upstream-ca", str(tls_mock.ca)])
    yield g
    g.stop()


def openai_client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/openai", api_key="placeholder", max_retries=0)


def test_openai_json_and_stream_over_tls_with_the_stored_key(tls_gateway, tls_mock):
    c = openai_client(tls_gateway)
    out = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "over tls"}])
    assert out.choices[0].message.content == "mock reply to: over tls"
    assert out.usage.total_tokens > 0
    seen = tls_mock.last()
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert seen["path"] == "/v1/chat/completions"

    stream = c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream these words over tls"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        "mock reply to: stream these words over tls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # Both responses' tokens were counted: the bodies were read on the way, not only passed on.
    want = f'sidegate_tokens_total{{provider="openai",direction="output"}} ' \
        f"{out.usage.completion_tokens + chunks[-1].usage.completion_tokens}\n"
    deadline = time.monotonic() + 5
    while want not in tls_gateway.metrics():
        assert time.monotonic() < deadline, f"{want!r} not in {tls_gateway.metrics()}"
        time.sleep(0.05)


def test_anthropic_stream_over_tls(tls_gateway, tls_mock):
    c = anthropic.Anthropic(base_url=tls_gateway.url + "/anthropic", api_key="placeholder", max_retries=0)
    with c.messages.stream(model="claude-haiku-4-5", max_tokens=64,
                           messages=[{"role": "user", "content": "hello over tls"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "mock reply to: hello over tls"
    assert final.usage.output_tokens > 0
    assert tls_mock.last()["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_a_large_request_body_over_tls(tls_gateway, tls_mock):
    # A long prompt (~120 KiB, many TLS records): sent whole.
    words = "lorem " * 20_000
    out = openai_client(tls_gateway).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": words}])
    assert out.choices[0].message.content.startswith("mock reply to: lorem lorem")
    assert len(json.loads(tls_mock.last()["body"])["messages"][0]["content"]) == len(words)


def test_a_restarted_upstream_gets_a_new_connection(tls_gateway, tls_mock, tmp_path):
    c = openai_client(tls_gateway)
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}]).choices
    # The upstream goes away and comes back on the same port with the same identity: the pooled
    # TLS connection is dead; the next request must not fail on it.
    tls_mock.stop()
    again = MockProvider(listen=tls_mock.addr, tls_dir=tmp_path / "pki")
    try:
        for i in range(3):
            out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"again {i}"}])
            assert out.choices[0].message.content == f"mock reply to: again {i}"
    finally:
        again.stop()


def test_client_disconnect_closes_the_tls_upstream_stream(tls_gateway, tls_mock):
    before = tls_mock.stats()["streams_cancelled"]
    with httpx.stream(
        "POST", tls_gateway.url + "/openai/chat/completions",
        headers={"x-mock-chunk-delay-ms": "200"},
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b c d e f g h i j"}]},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    deadline = time.monotonic() + 5
    while tls_mock.stats()["streams_cancelled"] == before:
        assert time.monotonic() < deadline, "upstream stream still running after the client left"
        time.sleep(0.05)


def test_an_upstream_the_ca_does_not_vouch_for_is_a_502_in_the_envelope(tls_mock, tmp_path):
    # No --upstream-ca: the mock's certificate is from an unknown CA.
    g = Sidegate(tmp_path, gateway_yaml(tls_mock.url), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + "/openai/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert r.status_code == 502
        err = r.json()["error"][0]
        assert err["code"] == 2104
        assert "certificate" in err["message"].lower()
        # Gateway errors are logged as the answer goes out (not by the buffered access log).
        g.wait_for_log("upstream failed provider=openai method=POST status=502 code=2104")
        assert OPENAI_KEY not in r.text and OPENAI_KEY not in g.logs()
        assert tls_mock.stats()["requests"] == 0
    finally:
        g.stop()
