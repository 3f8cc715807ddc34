"""When a cached answer can be found again: as soon as its client has the whole of it.

A response is stored as its last byte goes through the gateway (`body.rs`, `ProxyBody::Filling`),
before the client can see its end: an identical request sent the moment the first answer is
read is a hit, whatever way the upstream ends its body (chunked or by length, the connection
closed after it or kept).

What does make an identical request a miss is another key: the stored key of a provider loaded
(by a reload) between the two requests. The first went with the client's own key — none — and
entries never cross credentials. Tests that write a key after the gateway started and ask at
once are racing that reload (50 ms after the write), as the stated-cost cache-hit test of
test_accounting_review2.py did in CI.

Loopback upstreams only; every process started here is stopped here."""

import json
import time

import httpx
import pytest

from rawhttp import Listener, read_request
from test_accounting_edges import start_gateway
from test_cache import reload_count

CACHE_ON = "  cache: {enabled: true, ttl: 10m}\n"
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}).encode()


class Upstream:
    """Answers every request with ANSWER, framed as `framing` says: `chunked-close` (chunked,
    `connection: close`, closed after it), `length-close` (content-length, `connection: close`,
    closed after it), `chunked-keepalive` (chunked, the connection kept for the next request).
    With `apart`, the body's last bytes (a chunked body's last chunk, a length body's last
    byte) come a moment after the rest, in a read of their own. Records the `Authorization`
    of each request."""

    def __init__(self, framing, apart=False):
        self.framing, self.apart = framing, apart
        self.auths = []
        self.connections = 0
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, _index):
        self.connections += 1
        with conn:
            conn.settimeout(10)
            rest = b""
            try:
                while True:
                    got = read_request(conn, rest)
                    if got is None:
                        return
                    head, _body, rest = got
                    self.auths.append(next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                                            if line.lower().startswith(b"authorization:")), None))
                    self._answer(conn)
                    if self.framing != "chunked-keepalive":
                        return
            except OSError:
                pass

    def _send(self, conn, parts):
        for i, part in enumerate(parts):
            if i and self.apart:
                time.sleep(0.02)
            conn.sendall(part)

    def _answer(self, conn):
        if self.framing == "length-close":
            head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(ANSWER))
            self._send(conn, [head + ANSWER[:-1], ANSWER[-1:]])
            return
        close = b"connection: close\r\n" if self.framing == "chunked-close" else b""
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                + close + b"\r\n")
        half = len(ANSWER) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (ANSWER[:half], ANSWER[half:]))
        self._send(conn, [head + chunks, b"0\r\n\r\n"])

    def stop(self):
        self.listener.close()


@pytest.fixture
def upstream_gateway(tmp_path):
    """`make(framing, apart)`: a gateway, its cache on, in front of an `Upstream`."""
    made = []

    def make(framing, apart=False):
        up = Upstream(framing, apart)
        g = start_gateway(tmp_path, up.url, CACHE_ON, name="cache-timing")
        made.append((g, up))
        return g, up

    yield make
    for g, up in made:
        g.stop()
        up.stop()


def chat(text):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


PATH = "/openai/v1/chat/completions"


@pytest.mark.parametrize("apart", [False, True], ids=["end-with-the-rest", "end-apart"])
@pytest.mark.parametrize("framing", ["chunked-close", "length-close", "chunked-keepalive"])
def test_an_identical_request_right_after_the_answer_is_a_hit(upstream_gateway, framing, apart):
    g, up = upstream_gateway(framing, apart)
    rounds = 4
    # A connection of their own for each request, and one kept for both (the second request
    # leaves the moment the first answer's last byte is read).
    with httpx.Client(timeout=30) as kept:
        for i in range(rounds):
            body = chat(f"{framing} {apart} {i}")
            send = kept.post if i % 2 else httpx.post
            first = send(g.url + PATH, json=body, timeout=30)
            second = send(g.url + PATH, json=body, timeout=30)
            assert first.status_code == second.status_code == 200, (first.text, second.text)
            assert [first.headers["cf-aig-cache-status"], second.headers["cf-aig-cache-status"]] == ["MISS", "HIT"], i
            assert first.content == second.content == ANSWER
    # One upstream call per pair, every one with the stored key.
    assert up.auths == [b"Bearer sk-sgtestkey-openai-0001"] * rounds, up.auths
    if framing == "chunked-keepalive":
        assert up.connections == 1, "the upstream connection was kept"


@pytest.mark.parametrize("framing", ["chunked-close", "length-close", "chunked-keepalive"])
def test_an_identical_request_a_while_later_is_a_hit_too(upstream_gateway, framing):
    g, up = upstream_gateway(framing)
    body = chat(f"later {framing}")
    assert httpx.post(g.url + PATH, json=body, timeout=30).headers["cf-aig-cache-status"] == "MISS"
    time.sleep(1.2)
    assert httpx.post(g.url + PATH, json=body, timeout=30).headers["cf-aig-cache-status"] == "HIT"
    assert len(up.auths) == 1


@pytest.fixture
def keyless_gateway(tmp_path):
    """A gateway whose openrouter provider has no stored key yet, in front of an `Upstream`."""
    up = Upstream("chunked-close")
    extra = f"    openrouter: {{baseURL: '{up.url}/api'}}\n" + CACHE_ON
    g = start_gateway(tmp_path, up.url, extra, name="cache-timing-keys")
    yield g, up
    g.stop()
    up.stop()


def test_entries_never_cross_a_key_loaded_in_between(keyless_gateway):
    # The CI miss: the first request went before the provider's key was loaded (with the
    # client's own key: none), the second with it. Another credential, another entry.
    g, up = keyless_gateway
    url = g.url + "/openrouter/v1/chat/completions"
    body = chat("before and after the key")
    before = httpx.post(url, json=body, timeout=30)
    assert before.status_code == 200 and before.headers["cf-aig-cache-status"] == "MISS"
    reloads = reload_count(g)
    (g.keys_dir / "openrouter.default").write_text("sk-or-v1-cache-timing\n")
    deadline = time.monotonic() + 10
    while reload_count(g) == reloads:
        assert time.monotonic() < deadline, "the new key was not loaded"
        time.sleep(0.02)
    after = [httpx.post(url, json=body, timeout=30) for _ in range(2)]
    assert [r.headers["cf-aig-cache-status"] for r in after] == ["MISS", "HIT"]
    # No key on the first call (the client sent none), the stored one on the second.
    assert up.auths == [None, b"Bearer sk-or-v1-cache-timing"], up.auths
