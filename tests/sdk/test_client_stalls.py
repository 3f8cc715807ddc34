"""Clients that stall the gateway without sending or reading: an h2c stream whose flow-control
window stays shut, first bytes that are only a part of the h2c preface, and `Expect:
100-continue` (answered by the gateway, never asked of the provider)."""

import json
import os
import socket
import time

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from test_connections import EndlessStream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
SETTINGS_INITIAL_WINDOW_SIZE = 4


def _frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name, value):
    """A header field as an HPACK literal without indexing, no Huffman coding (short values)."""
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _request(stream, path, body, port):
    headers = (_literal(":method", "POST") + _literal(":scheme", "http") + _literal(":path", path)
               + _literal(":authority", f"127.0.0.1:{port}") + _literal("content-type", "application/json")
               + _literal("content-length", str(len(body))))
    return _frame(HEADERS, 0x4, stream, headers) + _frame(DATA, 0x1, stream, body)  # END_HEADERS; END_STREAM


class _Frames:
    """Reads frames off an h2c connection, acknowledging SETTINGS and answering PINGs (a live
    client), never sending WINDOW_UPDATE."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self, deadline):
        """The next frame (type, flags, stream, payload), None once the connection is closed;
        TimeoutError past `deadline` (monotonic)."""
        while True:
            if len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + length:
                    kind, flags = self.buf[3], self.buf[4]
                    stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                    payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
                    if kind == SETTINGS and not flags & 0x1:
                        self.sock.sendall(_frame(SETTINGS, 0x1, 0))
                    elif kind == PING and not flags & 0x1:
                        self.sock.sendall(_frame(PING, 0x1, 0, payload))
                    return kind, flags, stream, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk


def test_an_h2c_stream_whose_window_stays_shut_is_reset_and_its_provider_stream_ends(mock, tmp_path):
    # The client grants no stream window (SETTINGS_INITIAL_WINDOW_SIZE 0) and never sends
    # WINDOW_UPDATE, while acknowledging and answering PINGs: no write of the gateway ever waits,
    # yet the client takes none of its answer. After --client-timeout the stream is reset, its
    # request logged cancelled and the provider's stream behind it closed.
    upstream = EndlessStream()
    yaml = gateway_yaml(mock.url).replace(
        "  providers:\n", f"  providers:\n    custom-endless: {{baseURL: '{upstream.url}'}}\n", 1)
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS, extra_args=["--client-timeout", "1"])
    try:
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            no_window = SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (0).to_bytes(4, "big")
            s.sendall(PREFACE + _frame(SETTINGS, 0, 0, no_window))
            body = json.dumps({"model": "m", "stream": True,
                               "messages": [{"role": "user", "content": "no window"}]}).encode()
            s.sendall(_request(1, "/custom-endless/chat/completions", body, g.port))
            frames = _Frames(s)
            deadline = time.monotonic() + 15
            answered = reset = None
            while reset is None:
                try:
                    frame = frames.next(deadline)
                except TimeoutError:
                    break
                if frame is None:
                    break
                kind, _flags, stream, _payload = frame
                assert not (kind == DATA and stream == 1), "DATA sent beyond a window of 0"
                if kind == HEADERS and stream == 1:
                    answered = time.monotonic()
                elif kind == RST_STREAM and stream == 1:
                    reset = time.monotonic()
            assert answered, "the stream was answered"
            assert reset, "a stream whose client takes none of its answer stays open"
            # 1 s of --client-timeout, and slack for a loaded machine.
            assert reset - answered < 5, f"reset {reset - answered:.1f}s after its head"
            assert upstream.ended.wait(5), "the provider's stream is still being read"
            deadline = time.monotonic() + 5
            while "outcome=cancelled" not in g.logs():
                assert time.monotonic() < deadline, "no access log line for the stream reset"
                time.sleep(0.05)
            assert "took none of its answer" in g.logs()
        assert g.proc.poll() is None
    finally:
        g.stop()
        upstream.stop()


def test_an_h2c_preface_that_arrives_in_parts_is_still_h2c(gateway):
    # The first bytes are a part of the preface: the gateway reads them and waits for the rest,
    # then hands the whole preface to its HTTP/2 reader.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(PREFACE[:1])
        time.sleep(0.2)
        s.sendall(PREFACE[1:10])
        time.sleep(0.2)
        s.sendall(PREFACE[10:] + _frame(SETTINGS, 0, 0))
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "parts"}]}).encode()
        s.sendall(_request(1, "/openai/chat/completions", body, gateway.port))
        frames = _Frames(s)
        deadline = time.monotonic() + 10
        status = None
        while True:
            frame = frames.next(deadline)
            assert frame is not None, "closed before the answer"
            kind, flags, stream, payload = frame
            if kind == HEADERS and stream == 1:
                status = payload[:1]
            if stream == 1 and flags & 0x1 and kind in (HEADERS, DATA):
                break
        assert status == b"\x88", "answered 200 (HPACK static index 8)"


def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_connections_that_sent_a_part_of_the_h2c_preface_cost_no_cpu_while_they_wait(mock, tmp_path):
    # 200 connections send `P` (maybe `PRI * HTTP/2.0`, maybe `POST`) and nothing more for 2 s.
    # Waiting for their next bytes must not poll: a 1 ms re-peek loop cost about 1 s of CPU here.
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--client-timeout", "5"])
    conns = []
    try:
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            c.sendall(b"P")
            conns.append(c)
        time.sleep(0.3)  # all accepted
        before = _cpu_seconds(g.proc.pid)
        time.sleep(2)
        spent = _cpu_seconds(g.proc.pid) - before
        assert spent < 0.3, f"{spent:.2f} s of CPU in 2 s for 200 connections waiting on their first bytes"
        # Still waiting, not closed: the rest of a request is served.
        c = conns.pop()
        body = b'{"model":"m","messages":[{"role":"user","content":"late"}]}'
        c.sendall(b"OST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert c.recv(65536).startswith(b"HTTP/1.1 200 OK")
        c.close()
    finally:
        for c in conns:
            c.close()
        g.stop()


def test_expect_100_continue_is_answered_by_the_gateway_and_not_sent_upstream(gateway, mock):
    # The gateway answers `100 Continue` itself and reads the body whole before it goes upstream:
    # the provider is asked nothing, and the request keeps the gateway's own HTTP/1 client.
    body = b'{"model":"m","messages":[{"role":"user","content":"expect"}]}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    sent = mock.last()["headers"]
    assert "expect" not in {k.lower() for k in sent}, sent
    assert json.loads(mock.last()["body"])["messages"][0]["content"] == "expect"
