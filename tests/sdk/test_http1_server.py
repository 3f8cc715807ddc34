"""The gateway's own HTTP/1.1 server, byte by byte on raw sockets: pipelining, keep-alive across
requests it leaves to hyper, bodies that come late or large, chunked requests read strictly,
`Connection: close`, chunked answers, and a client that leaves before its answer."""

import json
import signal
import socket
import time

import httpx
import pytest

CHAT = "/openai/chat/completions"


def request(content, *, stream=False, extra=b"", path=CHAT, chunked=False):
    body = json.dumps({"model": "gpt-4o-mini", "stream": stream,
                       "messages": [{"role": "user", "content": content}]}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n").encode() + extra
    if chunked:
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:])) + b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class Reader:
    """Reads HTTP/1.1 answers off a socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(sep, 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def answer(self):
        """(status, headers with lowercase names, body, whether it came chunked)."""
        head = self._until(b"\r\n\r\n").decode()
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, value = line.split(":", 1)
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        if status < 200:
            return status, headers, b"", False
        if headers.get("transfer-encoding") == "chunked":
            assert "content-length" not in headers
            body = b""
            while size := int(self._until(b"\r\n"), 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._take(2) == b"\r\n"
            return status, headers, body, True
        return status, headers, self._take(int(headers["content-length"])), False

    def closed(self):
        """Whether the peer closes the connection with nothing more to read."""
        try:
            self._fill()
        except EOFError:
            return self.buf == b""
        return False


def connect(gateway):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    return s, Reader(s)


def reply(body):
    return json.loads(body)["choices"][0]["message"]["content"]


def test_pipelined_requests_are_answered_in_order_on_one_connection(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(request("first") + request("second") + request("third"))
        for word in ("first", "second", "third"):
            status, headers, body, _ = r.answer()
            assert status == 200
            assert reply(body) == f"mock reply to: {word}"
            assert headers["content-length"] == str(len(body))
            assert "date" in headers


def test_a_connection_goes_on_across_requests_left_to_hyper(gateway, mock):
    # `Expect` is hyper's to read (a small chunked body the gateway's own); the connection stays
    # usable.
    s, r = connect(gateway)
    with s:
        s.sendall(request("plain"))
        assert reply(r.answer()[2]) == "mock reply to: plain"
        s.sendall(request("chunked", chunked=True))
        assert reply(r.answer()[2]) == "mock reply to: chunked"
        s.sendall(request("after", extra=b"Expect: 100-continue\r\n"))
        status, _, body, _ = r.answer()
        if status == 100:
            status, _, body, _ = r.answer()
        assert (status, reply(body)) == (200, "mock reply to: after")
        s.sendall(request("last"))
        assert reply(r.answer()[2]) == "mock reply to: last"
    assert [json.loads(q["body"])["messages"][0]["content"] for q in mock.requests()] == [
        "plain", "chunked", "after", "last"]


def test_a_body_that_comes_after_its_head_in_parts_is_read_whole(gateway, mock):
    whole = request("late " * 50)
    head_end = whole.index(b"\r\n\r\n") + 4
    s, r = connect(gateway)
    with s:
        s.sendall(whole[:head_end])
        time.sleep(0.3)
        s.sendall(whole[head_end:head_end + 20])
        time.sleep(0.2)
        s.sendall(whole[head_end + 20:])
        status, _, body, _ = r.answer()
    assert status == 200
    assert reply(body).startswith("mock reply to: late late")
    assert mock.last()["body"] == whole[head_end:].decode()


def test_a_large_body_is_read_whole(gateway, mock):
    big = "x" * 300_000
    s, r = connect(gateway)
    with s:
        s.sendall(request(big) + request("small after it"))
        assert r.answer()[0] == 200
        assert reply(r.answer()[2]) == "mock reply to: small after it"
    assert json.loads(mock.requests()[0]["body"])["messages"][0]["content"] == big


def test_connection_close_is_said_in_the_answer_and_done(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(request("bye", extra=b"Connection: close\r\n"))
        status, headers, body, _ = r.answer()
        assert (status, headers["connection"]) == (200, "close")
        assert r.closed(), "the connection stayed open"


def test_a_stream_is_sent_chunked_and_the_connection_is_reused_after_it(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(request("one two three", stream=True))
        status, headers, body, chunked = r.answer()
        assert (status, chunked) == (200, True)
        assert headers["content-type"].startswith("text/event-stream")
        assert body.endswith(b"data: [DONE]\n\n")
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in body.decode().split("\n")
                       if line.startswith("data: {") and json.loads(line[6:])["choices"])
        assert "one two three" in text
        s.sendall(request("again"))
        assert reply(r.answer()[2]) == "mock reply to: again"


def test_a_gateway_error_has_a_length_and_a_date(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(request("x", path="/nowhere/chat/completions"))
        status, headers, body, _ = r.answer()
    assert status == 404
    assert headers["content-length"] == str(len(body))
    assert headers["date"].endswith(" GMT")
    assert json.loads(body)["success"] is False


def test_a_client_that_leaves_before_its_answer_drops_its_request_at_once(gateway):
    # The provider takes 5 s to answer; the client leaves after 0.3 s: its request is dropped
    # then (logged cancelled, 499), not when the provider answers.
    s, _ = connect(gateway)
    with s:
        s.sendall(request("leaving", extra=b"x-mock-delay-ms: 5000\r\n"))
        time.sleep(0.3)
    left = time.monotonic()
    while 'sidegate_requests_total{provider="openai",status="499"} 1' not in gateway.metrics():
        assert time.monotonic() - left < 2, "the request was not dropped when its client left"
        time.sleep(0.05)


def test_a_head_request_gets_no_body_and_the_connection_goes_on(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(b"HEAD /nowhere/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = r._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404")
        s.sendall(request("after head"))
        assert reply(r.answer()[2]) == "mock reply to: after head"
    assert httpx.post(gateway.url + CHAT, json={"model": "m", "messages": []}).status_code == 200


def test_the_providers_own_headers_reach_the_client_from_either_server(gateway):
    # Request ids and rate-limit counts are written through as the provider sent them by the
    # gateway's own server, and put in hyper's header map on a connection left to hyper.
    s, r = connect(gateway)
    with s:
        s.sendall(request("own"))
        _, own, _, _ = r.answer()
        s.sendall(request("by hyper", chunked=True))
        _, hypers, _, _ = r.answer()
    for headers in (own, hypers):
        assert headers["x-request-id"].startswith("req_mock_")
        assert headers["x-ratelimit-remaining-requests"] == "9999"
        assert headers["x-ratelimit-reset-tokens"] == "0s"
        assert headers["openai-processing-ms"] == "12"
        assert headers["openai-organization"] == "mock-org"
        assert "cf-aig-log-id" in headers


def test_a_head_over_the_limit_is_431_whenever_it_comes(gateway):
    big = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: localhost\r\nx-big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"
    s, r = connect(gateway)
    with s:
        s.sendall(request("small first"))
        assert r.answer()[0] == 200
        s.sendall(big)
        assert r._until(b"\r\n").startswith(b"HTTP/1.1 431")


def _slow_gateway(mock, tmp_path):
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    return Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--client-timeout", "1"])


def test_a_body_that_stops_coming_is_408_one_client_timeout_after_its_last_part(mock, tmp_path):
    g = _slow_gateway(mock, tmp_path)
    mock.clear()
    try:
        whole = request("never whole")
        for stop in (False, True):
            s, r = connect(g)
            with s:
                s.sendall(whole[:-10])
                started = time.monotonic()
                if stop:
                    # The stop does not cut it short: the 408 still comes, closing.
                    time.sleep(0.3)
                    g.proc.send_signal(signal.SIGTERM)
                status, headers, body, _ = r.answer()
                took = time.monotonic() - started
                assert status == 408, body
                assert json.loads(body)["error"][0]["code"] == 2101
                assert headers["connection"] == "close"
                assert 0.9 < took < 1.8, f"408 after {took:.1f}s with --client-timeout 1"
                assert r.closed()
        assert mock.requests() == []
    finally:
        g.stop()


def test_a_body_its_client_cuts_off_is_counted_as_refused(gateway, mock):
    mock.clear()
    s, _ = connect(gateway)
    with s:
        s.sendall(request("cut off")[:-10])
        time.sleep(0.2)
    deadline = time.monotonic() + 3
    while 'sidegate_requests_total{provider="openai",status="400"} 1' not in gateway.metrics():
        assert time.monotonic() < deadline, "no record of the request cut off mid-body"
        time.sleep(0.05)
    assert mock.requests() == []


def test_requests_sent_before_the_client_shut_its_side_are_all_answered(gateway):
    s, r = connect(gateway)
    with s:
        s.sendall(request("one", extra=b"x-mock-delay-ms: 200\r\n") + request("two"))
        s.shutdown(socket.SHUT_WR)
        assert reply(r.answer()[2]) == "mock reply to: one"
        assert reply(r.answer()[2]) == "mock reply to: two"
        assert r.closed()


def test_headers_the_upstream_names_in_connection_are_not_passed_on(tmp_path):
    from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
    answer = json.dumps({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": []}).encode()
    upstream = FixedAnswerServer(answer, headers=[("connection", "keep-alive, x-request-id, x-other"),
                                                  ("x-request-id", "hop"), ("x-other", "hop"),
                                                  ("x-ratelimit-remaining-requests", "5")])
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + CHAT, json={"model": "gpt-4o-mini", "messages": []})
        assert r.status_code == 200
        assert "x-request-id" not in r.headers and "x-other" not in r.headers
        assert r.headers["x-ratelimit-remaining-requests"] == "5"
    finally:
        g.stop()
        upstream.stop()


def test_a_large_answer_reaches_the_client_byte_for_byte(tmp_path):
    from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
    answer = json.dumps({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(chr(65 + i % 26) for i in range(400_000))}}]}).encode()
    upstream = FixedAnswerServer(answer)
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        s, r = connect(g)
        with s:
            for _ in range(2):
                s.sendall(request("big"))
                status, headers, body, _ = r.answer()
                assert status == 200
                assert headers["content-length"] == str(len(answer))
                assert body == answer
    finally:
        g.stop()
        upstream.stop()


def chunked_request(*chunks, trailers=b"", extension=b""):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    return head + b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


def chat(content):
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).encode()


def test_a_chunked_request_reaches_the_provider_whole_with_its_length(gateway, mock):
    body = chat("in many chunks")
    parts = [body[i:i + 7] for i in range(0, len(body), 7)]
    s, r = connect(gateway)
    with s:
        # Many chunks with extensions and trailers, then one chunk: the connection goes on.
        s.sendall(chunked_request(*parts, trailers=b"x-checksum: 1\r\nx-other: a b\r\n", extension=b";a=1;b=\"q\""))
        status, _, answer, _ = r.answer()
        assert (status, reply(answer)) == (200, "mock reply to: in many chunks")
        s.sendall(chunked_request(chat("one chunk")) + request("plain after"))
        assert reply(r.answer()[2]) == "mock reply to: one chunk"
        assert reply(r.answer()[2]) == "mock reply to: plain after"
    sent = mock.requests()
    assert [q["body"] for q in sent[:2]] == [body.decode(), chat("one chunk").decode()]
    for q in sent[:2]:
        headers = {k.lower(): v for k, v in q["headers"].items()}
        assert "transfer-encoding" not in headers, headers
        assert "x-checksum" not in headers
        assert headers["content-length"] == str(len(q["body"].encode()))


def test_a_chunked_body_that_comes_in_pieces_is_read_whole(gateway, mock):
    wire = chunked_request(chat("slowly"))
    s, r = connect(gateway)
    with s:
        # Cut inside the size line, the data, the CRLF after it, and the last chunk.
        head_end = wire.index(b"\r\n\r\n") + 4
        cuts = [head_end + 1, head_end + 10, len(wire) - 7, len(wire) - 2, len(wire)]
        at = 0
        for cut in cuts:
            s.sendall(wire[at:cut])
            at = cut
            time.sleep(0.05)
        status, _, answer, _ = r.answer()
        assert (status, reply(answer)) == (200, "mock reply to: slowly")
    assert mock.requests()[-1]["body"] == chat("slowly").decode()


BAD_FRAMING = {
    "bare LF after the size": lambda b: b"%x\n%s\r\n0\r\n\r\n" % (len(b), b),
    "data longer than its size": lambda b: b"%x\r\n%sX\r\n0\r\n\r\n" % (len(b), b),
    "data shorter than its size": lambda b: b"%x\r\n%s\r\n0\r\n\r\n" % (len(b) + 1, b),
    "size not hex": lambda b: b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
    "negative size": lambda b: b"-%x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
    "17 digit size": lambda b: b"0000000000000%04x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
    "bare CR in the trailers": lambda b: b"%x\r\n%s\r\n0\r\nx-t: 1\rx-u: 2\r\n\r\n" % (len(b), b),
    "folded trailer": lambda b: b"%x\r\n%s\r\n0\r\nx-t: 1\r\n folded\r\n\r\n" % (len(b), b),
}


@pytest.mark.parametrize("name", BAD_FRAMING)
def test_a_chunked_body_framed_wrong_is_400_and_the_connection_closed(gateway, mock, name):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    s, r = connect(gateway)
    with s:
        # A whole request after it, which must never be read as one.
        s.sendall(head + BAD_FRAMING[name](chat("framed wrong")) + request("after"))
        status, headers, body, _ = r.answer()
        assert status == 400, (status, body)
        error = json.loads(body)["error"][0]
        assert error["code"] == 2101 and "chunk" in error["message"], error
        assert headers["connection"] == "close"
        assert r.closed()
    assert mock.requests() == []
