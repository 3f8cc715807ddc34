"""Edges of WebSocket sessions (upgrade headers, subprotocol keys, frames relayed as they are,
peers that vanish or never answer a close) and of the universal endpoint (bad step lists,
hop-by-hop headers in steps, a stream from a later step), against raw local stand-ins."""

import base64
import hashlib
import json
import socket
import struct
import threading
import time

import httpx
import pytest
import websockets
import websockets.sync.client

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate, gateway_yaml

MODEL = "gpt-4o-realtime-preview"
AUTH = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLIENT_SECRET = f"sk-{KEY_MARKER}-client-own-secret"


def frame(opcode, payload=b"", fin=True, mask=None):
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([m | n])
    elif n <= 0xFFFF:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def read_frame(sock):
    """(fin, opcode, payload) of the next frame, unmasked."""
    a, b = read_exact(sock, 2)
    n = b & 0x7F
    if n == 126:
        n = struct.unpack(">H", read_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read_exact(sock, 8))[0]
    mask = read_exact(sock, 4) if b & 0x80 else None
    payload = read_exact(sock, n)
    if mask:
        payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
    return bool(a & 0x80), a & 0x0F, payload


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip().lower(), v.strip()))
    return lines[0], headers, rest


class RawUpstream:
    """A provider WebSocket endpoint written by hand, so that each frame is seen as it came.

    mode "echo": every data frame comes back unmasked as it was (fragments kept), a ping is
    answered with a pong, a close with the same close, then the connection ends.
    mode "silent": takes the handshake and frames, never answers a close nor closes.
    mode "vanish": sends one text frame, then closes the TCP connection without a close frame.
    """

    def __init__(self, mode="echo", subprotocol=None):
        self.mode = mode
        self.subprotocol = subprotocol
        self.handshakes = []
        self.frames = []
        self.eof = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.settimeout(30)
        try:
            line, headers, _ = read_head(c)
            h = {}
            for k, v in headers:
                h[k] = f"{h[k]}, {v}" if k in h else v
            self.handshakes.append({"line": line, "headers": h})
            if h.get("authorization") != f"Bearer {OPENAI_KEY}" or "sec-websocket-key" not in h:
                body = b'{"error":{"message":"bad key"}}'
                c.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
                          + f"content-length: {len(body)}\r\n\r\n".encode() + body)
                c.close()
                return
            accept = base64.b64encode(hashlib.sha1(h["sec-websocket-key"].encode() + GUID).digest()).decode()
            extra = f"sec-websocket-protocol: {self.subprotocol}\r\n" if self.subprotocol else ""
            c.sendall(("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                       f"sec-websocket-accept: {accept}\r\n{extra}\r\n").encode())
            if self.mode == "flood":
                for i in range(400):
                    c.sendall(frame(1, b'{"type":"response.output_audio.delta","delta":"' + b"A" * 2000 + b'"}'))
                    time.sleep(0.005)
                time.sleep(10)
                return
            if self.mode == "vanish":
                c.sendall(frame(1, b'{"type":"session.created"}'))
                time.sleep(0.3)
                c.close()
                return
            while True:
                try:
                    fin, op, payload = read_frame(c)
                except (EOFError, OSError):
                    self.eof.set()
                    return
                self.frames.append((fin, op, payload))
                if self.mode == "silent":
                    continue
                if op == 9:
                    c.sendall(frame(10, payload))
                elif op == 8:
                    c.sendall(frame(8, payload))
                    c.close()
                    self.eof.set()
                    return
                elif op != 10:
                    c.sendall(frame(op, payload, fin=fin))
        except (EOFError, OSError):
            self.eof.set()

    def stop(self):
        self.stopping = True
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()
        self.thread.join(5)


def ws_url(g, path=f"/openai/realtime?model={MODEL}"):
    return g.url.replace("http", "ws") + path


def session_lines(g):
    return [line for line in g.logs().splitlines() if " status_code=101 " in line]


def wait_session_line(g, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = session_lines(g)
        if lines:
            return lines
        time.sleep(0.05)
    return []


def raw_client(g, path=f"/openai/realtime?model={MODEL}", extra=()):
    """A raw socket upgraded through the gateway; (socket, status line, header dict)."""
    s = socket.create_connection(("127.0.0.1", g.port if hasattr(g, "port") else int(g.url.rsplit(":", 1)[1])), timeout=10)
    key = base64.b64encode(b"0123456789abcdef").decode()
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
    for k, v in extra:
        req += f"{k}: {v}\r\n"
    s.sendall((req + "\r\n").encode())
    line, headers, rest = read_head(s)
    return BufferedSocket(s, rest), line, dict(headers)


class BufferedSocket:
    """A socket whose first bytes (read with the handshake answer) are served first."""

    def __init__(self, sock, rest):
        self.sock, self.rest = sock, rest

    def recv(self, n):
        if self.rest:
            out, self.rest = self.rest[:n], self.rest[n:]
            return out
        return self.sock.recv(n)

    def __getattr__(self, name):
        return getattr(self.sock, name)


MASK = b"\x11\x22\x33\x44"


@pytest.fixture
def echo():
    u = RawUpstream("echo")
    yield u
    u.stop()


@pytest.fixture
def echo_gateway(echo, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(echo.url), DEFAULT_KEYS)
    yield g
    g.stop()


# --- WebSocket sessions -------------------------------------------------------------------


# Failed at a755ca5 (mended since): the client's own key in the `openai-insecure-api-key.`
# subprotocol goes upstream next to the stored key (build_upstream_request drops only the provider's
# key headers), though the README promises the stored key replaces the client's.
def test_a_client_key_in_the_subprotocol_does_not_go_upstream_with_the_stored_key(echo, echo_gateway):
    protocols = ["realtime", f"openai-insecure-api-key.{CLIENT_SECRET}", "openai-beta.realtime-v1"]
    with websockets.sync.client.connect(ws_url(echo_gateway), subprotocols=protocols, open_timeout=5) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    (hs,) = echo.handshakes
    assert hs["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    offered = hs["headers"].get("sec-websocket-protocol", "")
    assert CLIENT_SECRET not in offered, offered


# Failed at a755ca5 (mended since): the gateway token, passed in the subprotocol list the way
# browser-style clients pass keys, goes to the provider (only key *headers* are checked for the
# token).
def test_the_gateway_token_in_the_subprotocol_never_goes_upstream(echo, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(echo.url, auth=True), keys)
    try:
        protocols = ["realtime", f"openai-insecure-api-key.{GATEWAY_TOKEN}"]
        try:
            with websockets.sync.client.connect(ws_url(g), subprotocols=protocols,
                                                additional_headers=AUTH, open_timeout=5) as ws:
                ws.send("hi")
                ws.recv(timeout=5)
        except websockets.exceptions.InvalidStatus:
            pass  # refusing the upgrade is fine too
        for hs in echo.handshakes:
            assert GATEWAY_TOKEN not in json.dumps(hs["headers"]), hs["headers"]
    finally:
        g.stop()


def test_compression_is_not_offered_upstream_and_other_handshake_headers_pass(echo, echo_gateway):
    s, line, headers = raw_client(echo_gateway, extra=[
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Protocol", "realtime, openai-beta.realtime-v1"),
        ("cf-aig-metadata", '{"a":"b"}'),
    ])
    try:
        assert " 101 " in line, line
        assert "sec-websocket-extensions" not in headers
        expected = base64.b64encode(hashlib.sha1(b"MDEyMzQ1Njc4OWFiY2RlZg==" + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == expected
    finally:
        s.close()
    (hs,) = echo.handshakes
    h = hs["headers"]
    assert "sec-websocket-extensions" not in h
    assert h["sec-websocket-version"] == "13"
    assert h["sec-websocket-protocol"] == "realtime, openai-beta.realtime-v1"
    assert not any(k.startswith("cf-aig-") for k in h), h
    assert h["upgrade"].lower() == "websocket" and "upgrade" in h["connection"].lower()


def test_a_handshake_without_a_key_is_refused_by_the_provider_and_answered_through(echo, echo_gateway):
    port = int(echo_gateway.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(f"GET /openai/realtime?model={MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        line, headers, _ = read_head(s)
        assert " 101 " not in line, line
    finally:
        s.close()


def test_fragments_binary_ping_and_close_codes_are_relayed_as_they_are(echo, echo_gateway):
    s, line, _ = raw_client(echo_gateway)
    try:
        assert " 101 " in line, line
        # A fragmented text message with a ping between its fragments, then a binary frame
        # of 70000 bytes (64-bit length), then a close with a code and reason.
        s.sendall(frame(1, b'{"type":"resp', fin=False, mask=MASK))
        s.sendall(frame(9, b"are-you-there", mask=MASK))
        s.sendall(frame(0, b'onse.create"}', fin=True, mask=MASK))
        big = bytes(range(256)) * 274
        s.sendall(frame(2, big, mask=MASK))
        got = [read_frame(s) for _ in range(4)]
        assert got[0] == (False, 1, b'{"type":"resp')
        assert got[1] == (True, 10, b"are-you-there")
        assert got[2] == (True, 0, b'onse.create"}')
        assert got[3] == (True, 2, big)
        reason = "bye now".encode()
        s.sendall(frame(8, struct.pack(">H", 4001) + reason, mask=MASK))
        fin, op, payload = read_frame(s)
        assert (op, struct.unpack(">H", payload[:2])[0], payload[2:]) == (8, 4001, reason)
        s.settimeout(5)
        assert s.recv(1) == b""
    finally:
        s.close()
    upstream_ops = [f[1] for f in echo.frames]
    assert upstream_ops == [1, 9, 0, 2, 8], upstream_ops
    (line,) = wait_session_line(echo_gateway, 5)
    assert " provider=openai " in line


def test_a_provider_that_never_answers_a_close_is_dropped_after_the_grace(tmp_path):
    u = RawUpstream("silent")
    g = Sidegate(tmp_path, gateway_yaml(u.url), DEFAULT_KEYS)
    try:
        s, line, _ = raw_client(g)
        assert " 101 " in line
        s.sendall(frame(8, struct.pack(">H", 1000), mask=MASK))
        # The client gives up waiting for the close answer and goes; the provider never
        # closes: the gateway drops its side within the 5 s grace and logs the session.
        time.sleep(0.3)
        s.close()
        t0 = time.monotonic()
        assert u.eof.wait(8), "the gateway did not pass the client's going on to the provider"
        assert len(wait_session_line(g, 8)) == 1, g.logs()[-2000:]
        assert time.monotonic() - t0 < 7.5
        assert [f[1] for f in u.frames] == [8]
    finally:
        g.stop()
        u.stop()


def test_a_provider_that_vanishes_mid_session_ends_it_for_the_client_and_logs_it(tmp_path):
    u = RawUpstream("vanish")
    g = Sidegate(tmp_path, gateway_yaml(u.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g), open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=8)
        assert len(wait_session_line(g, 5)) == 1
        m = g.metrics()
        assert "sidegate" in m
    finally:
        g.stop()
        u.stop()


def test_a_client_that_vanishes_mid_session_closes_the_providers_side_and_is_logged(echo, echo_gateway):
    s, line, _ = raw_client(echo_gateway)
    assert " 101 " in line
    s.sendall(frame(1, b"hello", mask=MASK))
    assert read_frame(s) == (True, 1, b"hello")
    s.close()
    assert echo.eof.wait(8), "the provider's side stayed open after the client went"
    lines = wait_session_line(echo_gateway, 8)
    assert len(lines) == 1, echo_gateway.logs()[-2000:]


def test_nothing_secret_reaches_the_logs_of_a_session(echo, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(echo.url, auth=True), keys)
    try:
        with websockets.sync.client.connect(ws_url(g) + f"&api_key={CLIENT_SECRET}",
                                            additional_headers=dict(AUTH, authorization=f"Bearer {CLIENT_SECRET}"),
                                            open_timeout=5) as ws:
            ws.send("x")
            ws.recv(timeout=5)
        wait_session_line(g, 5)
        logs = g.logs()
        for secret in (GATEWAY_TOKEN, CLIENT_SECRET, OPENAI_KEY):
            assert secret not in logs
    finally:
        g.stop()


# --- universal endpoint --------------------------------------------------------------------


def openai_step(text="edge hello", **extra):
    step = {"provider": "openai", "endpoint": "chat/completions", "headers": {},
            "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}}
    step.update(extra)
    return step


@pytest.mark.parametrize("body,needle", [
    (b"[]", "1 to 16 steps"),
    (json.dumps([openai_step()] * 17).encode(), "got 17"),
    (json.dumps([openai_step(), {"provider": "nope", "endpoint": "x", "query": {}}]).encode(), "steps[1].provider"),
    (json.dumps([openai_step(), "not an object"]).encode(), "steps[1]"),
    (json.dumps([openai_step(), {"provider": "openai", "endpoint": "chat/completions", "query": {},
                                 "headers": {"bad name": "x"}}]).encode(), "steps[1].headers"),
    (json.dumps([openai_step(), {"provider": "openai", "endpoint": "chat/completions", "query": {},
                                 "headers": {"x": 5}}]).encode(), "steps[1]"),
    (json.dumps({"steps": []}).encode(), "steps[0]"),
    (json.dumps([openai_step(), {"provider": "openai", "endpoint": "chat/completions", "query": {},
                                 "headers": {"x-evil": "a\r\nx-injected: 1"}}]).encode(), "steps[1].headers"),
    (json.dumps([{"provider": "openai", "endpoint": "chat/completions#frag", "query": {}}]).encode(), "steps[0].endpoint"),
])
def test_bad_step_lists_are_refused_before_any_step_is_sent(gateway, mock, body, needle):
    r = httpx.post(gateway.url + "/", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"][0]
    assert err["code"] == 2108 and needle in err["message"], err
    assert mock.requests() == []


def test_hop_by_hop_and_host_headers_of_a_step_do_not_reach_the_provider(gateway, mock):
    step = openai_step()
    step["headers"] = {"host": "evil.example", "connection": "close, x-drop-me", "x-drop-me": "1",
                       "transfer-encoding": "chunked", "content-length": "3", "te": "trailers",
                       "upgrade": "websocket", "keep-alive": "timeout=1", "x-kept": "yes"}
    r = httpx.post(gateway.url + "/", json=[step])
    assert r.status_code == 200 and r.headers["cf-aig-step"] == "0", r.text
    h = mock.last()["headers"]
    assert h.get("host", "").startswith("127.0.0.1"), h
    for name in ("x-drop-me", "transfer-encoding", "te", "upgrade", "keep-alive"):
        assert name not in h, (name, h)
    assert h["x-kept"] == "yes"
    assert h["authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_stream_from_a_later_step_is_relayed_with_its_index(gateway, mock):
    failing = openai_step(text="first fails")
    failing["headers"]["x-mock-fail-first"] = "5;edge-stream;500"
    streaming = openai_step(text="second streams")
    streaming["query"]["stream"] = True
    with httpx.stream("POST", gateway.url + "/", json=[failing, streaming]) as r:
        assert r.status_code == 200
        assert r.headers["cf-aig-step"] == "1"
        assert r.headers["content-type"].startswith("text/event-stream")
        body = b"".join(r.iter_bytes())
    assert b"data: [DONE]" in body
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [l for l in gateway.logs().splitlines() if "step=1" in l]:
        time.sleep(0.05)
    assert [l for l in gateway.logs().splitlines() if "step=1" in l], gateway.logs()[-2000:]


def test_a_steps_own_key_is_replaced_by_the_stored_key(gateway, mock):
    step = openai_step()
    step["headers"]["authorization"] = f"Bearer {CLIENT_SECRET}"
    step["headers"]["x-api-key"] = CLIENT_SECRET
    r = httpx.post(gateway.url + "/", json=[step])
    assert r.status_code == 200
    h = mock.last()["headers"]
    assert h["authorization"] == f"Bearer {OPENAI_KEY}"
    assert CLIENT_SECRET not in json.dumps(h)
    assert CLIENT_SECRET not in gateway.logs()


# The model named with percent escapes is still priced (the spend limit holds).
def test_a_percent_encoded_model_name_is_priced_as_the_model_it_names(tmp_path):
    from test_realtime import RealtimeUpstream
    from test_realtime_limits import limits
    u = RealtimeUpstream()
    spec = limits(spend="0.01", pricing=[(MODEL, 1000, 1000)])
    g = Sidegate(tmp_path, gateway_yaml(u.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        s, line, _ = raw_client(g, path="/openai/realtime?model=%67pt%2D4o-realtime-preview")
        try:
            assert " 101 " in line
            assert b"session.created" in read_frame(s)[2]
            s.sendall(frame(1, b'{"type":"response.create"}', mask=MASK))
            # 19 tokens at $1000 a million: past the $0.01 limit, the session is closed.
            frames = [read_frame(s) for _ in range(3)]
            assert frames[2][1] == 8 and struct.unpack(">H", frames[2][2][:2])[0] == 1008, frames
        finally:
            s.close()
    finally:
        g.stop()
        u.stop()


# Failed at a755ca5 (mended since): a step's own `cf-aig-collect-log: false` is ignored (the module
# docs of universal.rs: a step's cf-aig-* headers "override the request's for this step"); the
# record is made with the request's LogOptions (universal.rs RequestRecord::new(.., opts, ..)).
def test_a_steps_own_collect_log_false_writes_no_log_line(gateway, mock):
    step = openai_step(text="not logged by the step's wish")
    step["headers"]["cf-aig-collect-log"] = "false"
    r = httpx.post(gateway.url + "/", json=[step])
    assert r.status_code == 200
    time.sleep(0.5)
    lines = [l for l in gateway.logs().splitlines() if f"id={r.headers['cf-aig-log-id']}" in l]
    assert lines == [], lines


# Failed at a755ca5 (mended since): a step's own `cf-aig-metadata` is not logged, for provider and
# compat steps alike (only the request's is: LogOptions come from the request's headers).
@pytest.mark.parametrize("compat", [False, True])
def test_a_steps_own_metadata_is_logged_for_it(gateway, mock, compat):
    if compat:
        step = {"provider": "compat", "endpoint": "chat/completions", "headers": {},
                "query": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "meta"}]}}
    else:
        step = openai_step(text="meta")
    step["headers"]["cf-aig-metadata"] = '{"team":"step"}'
    r = httpx.post(gateway.url + "/", json=[step])
    assert r.status_code == 200
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert 'metadata={"team":"step"}' in line, line


# Failed at a755ca5 (mended since): a client that leaves (a reset) while the provider is sending is
# logged `outcome=upstream_error success=false`, blaming the provider; the README logs a client that
# leaves as `cancelled`. websocket.rs `forward` returns End::Failed for a failed write to the client
# as for a failed read from the provider, and `run` finishes both as upstream errors.
def test_a_client_that_leaves_mid_stream_is_not_logged_as_an_upstream_error(tmp_path):
    u = RawUpstream("flood")
    g = Sidegate(tmp_path, gateway_yaml(u.url), DEFAULT_KEYS)
    try:
        s, line, _ = raw_client(g)
        assert " 101 " in line
        assert read_frame(s)[1] == 1
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        (line,) = wait_session_line(g, 10)
        assert " outcome=upstream_error" not in line, line
    finally:
        g.stop()
        u.stop()


def test_sixteen_steps_are_tried_in_order_and_the_last_answers(gateway, mock):
    steps = []
    for i in range(15):
        st = openai_step(text=f"fails {i}")
        st["headers"]["x-mock-fail-first"] = f"5;edge16-{i};503"
        st["config"] = {"maxAttempts": 1}
        steps.append(st)
    steps.append(openai_step(text="the sixteenth"))
    r = httpx.post(gateway.url + "/", json=steps, timeout=30)
    assert r.status_code == 200 and r.headers["cf-aig-step"] == "15", r.text
    sent = [json.loads(q["body"])["messages"][0]["content"] for q in mock.requests()]
    assert sent == [f"fails {i}" for i in range(15)] + ["the sixteenth"], sent


# Failed at a755ca5 (mended since): a provider step's own `cf-aig-event-id` is not the log line's
# event_id (universal.rs serve: `event_id = aig.get(Gw::EventId)`, the request's); a compat step's
# is.
def test_a_provider_steps_own_event_id_is_logged_for_it(gateway, mock):
    step = openai_step(text="event id")
    step["headers"]["cf-aig-event-id"] = "step-event-1"
    r = httpx.post(gateway.url + "/", json=[step])
    assert r.status_code == 200
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert " event_id=step-event-1" in line, line


def test_a_provider_that_never_answers_the_handshake_is_a_504_at_the_request_timeout(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    g = Sidegate(tmp_path, gateway_yaml(f"http://127.0.0.1:{listener.getsockname()[1]}"), DEFAULT_KEYS)
    try:
        t0 = time.monotonic()
        s, line, _ = raw_client(g, extra=[("cf-aig-request-timeout", "500")])
        s.close()
        assert " 504 " in line and time.monotonic() - t0 < 3, line
    finally:
        g.stop()
        listener.close()


def test_an_upgrade_from_a_web_page_is_refused_before_the_provider(echo, echo_gateway):
    s, line, _ = raw_client(echo_gateway, extra=[("Origin", "https://evil.example")])
    s.close()
    assert " 403 " in line, line
    assert echo.handshakes == []
