"""Client connections: HTTP/1.1 and h2c told apart by their first bytes, graceful shutdown."""

import json
import signal
import socket
import threading
import time

import httpx
import pytest


def _post_in_two_writes(port, first, pause=0.1):
    """Sends an HTTP/1.1 request whose first write is `first` and returns its status line."""
    body = b'{"model":"m","messages":[{"role":"user","content":"slow"}]}'
    head = (b"POST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    whole = head + body
    assert whole.startswith(first)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first)
        time.sleep(pause)
        s.sendall(whole[len(first):])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("first", [b"P", b"PO", b"POST /op"])
def test_a_request_whose_first_bytes_arrive_slowly_is_read_as_http1(gateway, first):
    # "P" could still be the HTTP/2 preface ("PRI * HTTP/2.0"): the gateway waits for more.
    assert _post_in_two_writes(gateway.port, first) == b"HTTP/1.1 200 OK"


def test_shutdown_lets_in_flight_requests_finish_and_closes_silent_connections(gateway, mock):
    silent = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    result = {}

    def slow_request():
        r = httpx.post(gateway.url + "/openai/chat/completions", timeout=30,
                       headers={"x-mock-delay-ms": "4000"},
                       json={"model": "m", "messages": [{"role": "user", "content": "in flight at shutdown"}]})
        result["status"] = r.status_code

    t = threading.Thread(target=slow_request)
    t.start()
    # SIGTERM only once the request is in flight: the mock has it and holds its answer 4 s.
    deadline = time.monotonic() + 5
    while not any("in flight at shutdown" in q["body"] for q in mock.requests()):
        assert time.monotonic() < deadline, "the request never reached the mock"
        time.sleep(0.02)
    started = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    # While the in-flight request finishes, a new connection is refused, not left unanswered.
    deadline = started + 3
    while True:
        try:
            late = socket.create_connection(("127.0.0.1", gateway.port), timeout=2)
        except ConnectionRefusedError:
            break
        late.close()
        assert time.monotonic() < deadline, "new connections were still accepted 3 s into the shutdown"
        time.sleep(0.02)
    assert "status" not in result and gateway.proc.poll() is None, \
        "refused only once the in-flight request was over: it must hold the shutdown"
    assert gateway.proc.wait(15) == 0
    took = time.monotonic() - started
    t.join(10)
    assert result.get("status") == 200
    # The silent connection (no first bytes yet) did not hold the shutdown for the grace period
    # (25 s): the exit follows the in-flight request's end.
    assert took < 10, f"shutdown took {took:.1f}s"
    assert silent.recv(1) == b""
    silent.close()


def test_a_stream_cut_off_by_shutdown_still_gets_its_log_line(mock, tmp_path):
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--shutdown-grace", "1"])
    try:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a long stream"}]}
        # ~4 s of events (500 ms each) against a grace period of 1 s: cut off by the exit.
        with httpx.stream("POST", g.url + "/openai/chat/completions", json=body, timeout=20,
                          headers={"x-mock-chunk-delay-ms": "500"}) as r:
            log_id = r.headers["cf-aig-log-id"]
            chunks = r.iter_raw()
            next(chunks)
            g.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError):
                b"".join(chunks)
            # Cut at the grace's end, not left for the tasks' abort a second later.
            assert time.monotonic() - signalled < 1.7
        assert g.proc.wait(15) == 0
        line = next((line for line in g.logs().splitlines() if log_id in line), None)
        assert line and "outcome=cancelled" in line, g.logs()
    finally:
        g.stop()


def test_a_request_body_sent_in_many_chunks_reaches_the_provider_whole(gateway, mock):
    text = "piece " * 2000
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()

    def pieces():
        # Paced, so the gateway reads them as separate frames and has to join them.
        for i in range(0, len(payload), 700):
            yield payload[i:i + 700]
            time.sleep(0.005)

    r = httpx.post(gateway.url + "/openai/chat/completions", content=pieces(),
                   headers={"content-type": "application/json"}, timeout=20)
    assert r.status_code == 200, r.text
    assert mock.last()["body"].encode() == payload


def test_the_admin_port_bounds_what_a_connection_may_hold(gateway):
    # The admin port listens beyond loopback (probes, metrics): a head that never ends is cut at
    # 16 KiB, a silent connection closed after 5 s, and health checks answer meanwhile.
    port = int(gateway.admin.rsplit(":", 1)[1])
    big = socket.create_connection(("127.0.0.1", port), timeout=10)
    big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * 40000)
    answer = big.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    big.close()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    assert httpx.get(gateway.admin + "/healthz", timeout=5).status_code == 200
    started = time.monotonic()
    for s in silent:
        assert s.recv(1) == b""
        s.close()
    assert time.monotonic() - started < 9, "silent admin connections are closed after 5 s"


def test_a_client_that_goes_silent_mid_request_is_answered_408_or_closed(mock, tmp_path):
    # --client-timeout bounds every silence of a client on the gateway port: within a body (408
    # in the error envelope, the provider never called), within a head and between keep-alive
    # requests (the connection closed). Without it each would hold a task until shutdown.
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--client-timeout", "1"])
    try:
        mock.clear()
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        envelope = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert envelope["success"] is False
        assert envelope["error"][0]["code"] == 2101, envelope
        assert "stalled" in envelope["error"][0]["message"], envelope
        assert 0.9 < time.monotonic() - started < 5
        assert mock.requests() == [], "a stalled request must not reach the provider"

        for first in (b"POST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\n", b""):
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
                s.sendall(first)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                assert time.monotonic() - started < 5, f"a silent connection after {first!r} stays open"
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]

        # An idle keep-alive connection after a full exchange is closed too.
        with httpx.Client(base_url=g.url) as client:
            r = client.post("/openai/chat/completions", timeout=10,
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first[:80]
            started = time.monotonic()
            rest = first
            while chunk := s.recv(65536):
                rest += chunk
            assert time.monotonic() - started < 5, "an idle keep-alive connection stays open"
        assert g.proc.poll() is None
    finally:
        g.stop()


class EndlessStream:
    """A provider whose SSE answer does not end: 64 KiB events as fast as they are taken, until
    the connection goes (at most 2 GiB); `ended` is set once the gateway stops taking them."""

    def __init__(self):
        self.ended = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # stopped before any connection
        with conn:
            conn.settimeout(60)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            event = b"data: " + b"x" * 65530 + b"\n\n"
            chunk = f"{len(event):x}\r\n".encode() + event + b"\r\n"
            try:
                for _ in range(32768):
                    conn.sendall(chunk)
            except OSError:
                pass
            self.ended.set()

    def stop(self):
        self.listener.close()


def test_a_client_that_takes_none_of_its_answer_is_let_go(mock, tmp_path):
    # The client reads the head of a stream, then nothing: once its socket buffers are full the
    # gateway's write waits, and after --client-timeout the connection, the request (logged as
    # cancelled) and the provider's stream behind it end, while the client still holds on.
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    upstream = EndlessStream()
    yaml = gateway_yaml(mock.url).replace("  providers:\n", f"  providers:\n    custom-endless: {{baseURL: '{upstream.url}'}}\n", 1)
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS, extra_args=["--client-timeout", "1"])
    try:
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"go on"}]}'
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"POST /custom-endless/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                      b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            # Reads nothing more, and stays connected.
            assert upstream.ended.wait(30), "the provider's stream is still being read"
            deadline = time.monotonic() + 5
            while "outcome=cancelled" not in g.logs():
                assert time.monotonic() < deadline, "no log line for the request let go"
                time.sleep(0.05)
    finally:
        g.stop()
        upstream.stop()


def test_after_sigterm_new_requests_are_served_for_the_drain_delay_then_refused(mock, tmp_path):
    # A classic sidecar gets SIGTERM together with its app, whose last requests (on new
    # connections or kept-alive ones) come in meanwhile: --shutdown-delay keeps serving them;
    # after it new connections are refused while the in-flight stream still completes.
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS,
                 extra_args=["--shutdown-delay", "2", "--shutdown-grace", "20"])
    chat = {"model": "m", "messages": [{"role": "user", "content": "during the drain delay"}]}
    try:
        kept_alive = httpx.Client(base_url=g.url, timeout=5)
        assert kept_alive.post("/openai/chat/completions", json=chat).status_code == 200
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a long stream"}]}
        # ~4 s of events (500 ms each): in flight across the delay and after it.
        with httpx.stream("POST", g.url + "/openai/chat/completions", json=body, timeout=20,
                          headers={"x-mock-chunk-delay-ms": "500"}) as stream:
            chunks = stream.iter_raw()
            received = next(chunks)
            signalled = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            r = httpx.post(g.url + "/openai/chat/completions", json=chat, timeout=5)  # a new connection
            assert r.status_code == 200, r.text
            assert kept_alive.post("/openai/chat/completions", json=chat).status_code == 200
            assert time.monotonic() - signalled < 1.5, "served during the delay, not after it"
            while True:
                try:
                    socket.create_connection(("127.0.0.1", g.port), timeout=2).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() - signalled < 4, "new connections still accepted 4 s after SIGTERM"
                time.sleep(0.02)
            refused_after = time.monotonic() - signalled
            assert refused_after > 1.8, f"refused {refused_after:.1f}s after SIGTERM, within the 2 s delay"
            assert g.proc.poll() is None, "the in-flight stream holds the exit"
            received += b"".join(chunks)
        assert b"data: [DONE]" in received, received[-200:]
        assert g.proc.wait(15) == 0
        kept_alive.close()
        assert "drain delay" in g.logs()
    finally:
        g.stop()


def test_a_drain_delay_longer_than_the_grace_ends_with_the_grace(mock, tmp_path):
    # The delay is part of the grace: said at start, and the log says the delay that applies.
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS,
                 extra_args=["--shutdown-delay", "30", "--shutdown-grace", "1"])
    try:
        assert "--shutdown-delay is part of --shutdown-grace and longer than it" in g.logs()
        signalled = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(15) == 0
        assert time.monotonic() - signalled < 10, "waited past the grace"
        line = next(line for line in g.logs().splitlines() if "still serving new requests" in line)
        assert "delay_secs=1 " in line, line
    finally:
        g.stop()


def _h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _h2_read_frame(sock):
    """The next frame (type, flags, stream, payload), or None when the connection is closed."""
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data
    head = exactly(9)
    if head is None:
        return None
    length = int.from_bytes(head[:3], "big")
    payload = exactly(length) if length else b""
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload


def _hpack_literal(name, value):
    """A header field as an HPACK literal without indexing (name: a static table index or a
    new lowercase name), no Huffman coding."""
    value = value.encode()
    if isinstance(name, int):
        return bytes([name]) + bytes([len(value)]) + value
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value


def test_an_idle_h2c_connection_is_closed_and_a_long_stream_is_not(mock, tmp_path):
    # Like an idle HTTP/1.1 keep-alive connection, an h2c connection with no open stream is
    # closed after --client-timeout (GOAWAY, then closed as this client answers no PING);
    # a request open longer than that is not idle.
    from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--client-timeout", "1"])
    try:
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0))  # preface, SETTINGS
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "h2c"}]}).encode()
            headers = (b"\x83\x86"  # :method POST, :scheme http
                       + _hpack_literal(4, "/openai/chat/completions") + _hpack_literal(1, "localhost")
                       + _hpack_literal("content-type", "application/json")
                       + _hpack_literal("x-mock-delay-ms", "1500"))
            started = time.monotonic()
            s.sendall(_h2_frame(1, 0x4, 1, headers) + _h2_frame(0, 0x1, 1, body))  # END_HEADERS, END_STREAM
            status, answered, goaway = None, None, False
            while True:
                try:
                    frame = _h2_read_frame(s)
                except TimeoutError:
                    pytest.fail("an idle h2c connection stays open")
                if frame is None:
                    break
                kind, flags, stream, payload = frame
                if kind == 4 and not flags & 0x1:
                    s.sendall(_h2_frame(4, 0x1, 0))  # SETTINGS ACK
                elif kind == 1 and stream == 1:
                    status = payload[:1]
                elif kind == 0 and stream == 1 and flags & 0x1:
                    answered = time.monotonic()
                elif kind == 7:
                    goaway = True
            closed = time.monotonic()
        assert status == b"\x88", "the stream was answered 200 (HPACK static index 8)"
        assert answered and answered - started > 1.4, "the stream outlived the client timeout, whole"
        assert goaway, "the idle connection was told GOAWAY first"
        assert closed - answered < 4, f"closed {closed - answered:.1f}s after its last stream"
        assert g.proc.poll() is None
    finally:
        g.stop()
