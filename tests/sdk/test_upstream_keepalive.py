"""The keep-alive race: an upstream closing an idle connection just as the gateway reuses it.

The request then went out on a connection the upstream had already given up, and it was never
read. The gateway sends it again, once, on a new connection, inside the same upstream attempt
(no retry counted or logged) when that cannot do it twice: the upstream had not all of it (the
connection went while it was being written), or the request is safe to repeat (an
`Idempotency-Key`). A POST that went out whole may have been read (and billed) by an upstream
that then failed: that, a request lost on a new connection, or after part of an answer, stays an
error.
"""

import json
import socket
import struct

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from rawhttp import Listener, content_length, read_request

CHAT = "/openai/chat/completions"


def chat(prompt):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}


class RacingUpstream:
    """A keep-alive upstream whose first connection answers one request and is then lost under
    the next one as `lose` says: "fin" (closed after reading it), "rst" (reset after reading
    it), "unread" (closed with its body unread), or "at-once" (the first request is lost, on
    the new connection). Every other connection answers each request with which connection it
    was and how much of the body it read."""

    def __init__(self, lose):
        self.lose = lose
        self.listener = Listener(self._serve, backlog=16)
        self.url = self.listener.url

    @property
    def accepted(self):
        return self.listener.accepted

    def _serve(self, conn, index):
        lost_at = {"at-once": 0}.get(self.lose, 1) if index == 0 else None
        with conn:
            n = 0
            while True:
                req = read_request(conn, body=not (n == lost_at and self.lose == "unread"))
                if req is None:
                    return
                if n == lost_at:
                    if self.lose == "rst":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                head, got, _ = req
                length, read = content_length(head), len(got)
                body = json.dumps({
                    "id": f"conn-{index}", "object": "chat.completion", "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"{read} of {length}"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                n += 1

    def stop(self):
        self.listener.close()


def retries_counted(g):
    for line in g.metrics().splitlines():
        if line.startswith('sidegate_upstream_retries_total{provider="openai"}'):
            return int(float(line.split()[-1]))
    return 0


@pytest.fixture
def racing(tmp_path, request):
    up = RacingUpstream(request.param)
    g = Sidegate(tmp_path, gateway_yaml(up.url), DEFAULT_KEYS)
    yield up, g
    g.stop()
    up.stop()


@pytest.mark.parametrize("racing", ["fin", "rst", "unread"], indirect=True)
def test_a_request_lost_with_a_reused_connection_is_sent_again_on_a_new_one(racing):
    up, g = racing
    with httpx.Client(timeout=30) as client:
        first = client.post(g.url + CHAT, json=chat("hello"))
        assert first.status_code == 200, first.text
        assert first.json()["id"] == "conn-0"
        # A long prompt where the upstream closes with it unread: cut off mid-write. A short one
        # went out whole: sent again only as the client made it safe to repeat.
        prompt = "x" * (4 << 20) if up.lose == "unread" else "again"
        headers = {} if up.lose == "unread" else {"idempotency-key": "req-7"}
        second = client.post(g.url + CHAT, json=chat(prompt), headers=headers)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == "conn-1"
    read, _, length = second.json()["choices"][0]["message"]["content"].partition(" of ")
    assert read == length and int(length) > len(prompt), "the request went again whole"
    assert up.accepted == 2
    # One upstream attempt as far as anyone can see.
    assert retries_counted(g) == 0
    assert "retrying upstream" not in g.logs()


@pytest.mark.parametrize("racing", ["fin", "rst"], indirect=True)
def test_a_post_that_went_out_whole_is_not_sent_twice(racing):
    # The upstream read it, then the connection was lost: it may have done (and billed) it.
    up, g = racing
    with httpx.Client(timeout=30) as client:
        assert client.post(g.url + CHAT, json=chat("hello")).status_code == 200
        r = client.post(g.url + CHAT, json=chat("again"))
    assert r.status_code == 502, r.text
    assert r.json()["error"][0]["code"] == 2104
    assert up.accepted == 1


@pytest.mark.parametrize("racing", ["at-once"], indirect=True)
def test_a_request_lost_on_a_new_connection_is_not_sent_again(racing):
    up, g = racing
    r = httpx.post(g.url + CHAT, json=chat("hello"), timeout=30)
    assert r.status_code == 502, r.text
    assert "closed before message completed" in r.text
    assert up.accepted == 1
