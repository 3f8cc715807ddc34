"""Review of realtime (WebSocket) accounting (websocket.rs `read_message`, the client's close
frame) and cached-audio prices (cost.rs)."""

import json
import pathlib
import socket
import threading
import time
import openai
import pytest
from conftest import DEFAULT_KEYS, Sidegate


# OpenAI's Realtime price list (platform.openai.com/docs/pricing, per million tokens):
#   gpt-realtime-mini                   text $0.60 in, $0.06 cached, $2.40 out; audio $10 in, $0.30 cached, $20 out
#   gpt-4o-realtime-preview-2024-10-01  text $5 in, $2.50 cached, $20 out; audio $100 in, $20 cached, $200 out
#                                       (Dec 2024: "cached audio input costs drop 87.5% to $2.50" for the new snapshot)
#   gpt-realtime                        text $4 in, $0.40 cached, $16 out; audio $32 in, $0.40 cached, $64 out
# Cached audio has a price of its own; cost.rs prices every cached token at the text cache rate
# (its comment on the realtime rows says so for gpt-realtime-mini), which matches gpt-realtime
# and gpt-4o-realtime-preview but not these two.

def realtime_upstream(usage=None, close_after_response=False):
    import websockets  # noqa: F401  (the test_realtime stand-in needs it)
    from test_realtime import RealtimeUpstream

    class Upstream(RealtimeUpstream):
        async def _session(self, ws):
            await ws.send(json.dumps({"type": "session.created", "event_id": "ev_1", "session": {}}))
            async for message in ws:
                # Binary messages (audio, or a test's odd bytes) are taken without an answer.
                if isinstance(message, bytes) or json.loads(message).get("type") != "response.create":
                    continue
                await ws.send(json.dumps({"type": "response.done", "event_id": "ev_r", "response": {
                    "id": "resp_1", "object": "realtime.response", "status": "completed", "output": [],
                    "usage": usage or {"total_tokens": 19, "input_tokens": 12, "output_tokens": 7}}}))
                if close_after_response:
                    # The provider ends the session (as OpenAI does at its session time limit).
                    await ws.close(1000, "session over")
                    return

    return Upstream()


def realtime_gateway(tmp_path, upstream):
    d = pathlib.Path(tmp_path) / f"rt-{time.monotonic_ns()}"
    d.mkdir()
    yaml = ("schemaVersion: 1\ngateway: {namespace: team-a, name: rtreview}\nspec:\n  providers:\n"
            f"    openai: {{baseURL: '{upstream.url}/v1'}}\n  spendLimit: {{amount: '1000', period: day}}\n")
    return Sidegate(d, yaml, DEFAULT_KEYS, extra_args=["--log-format", "json"])


def session_line(g, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in g.logs().splitlines()
                 if '"message":"request"' in x and '"status_code":101' in x]
        if lines:
            (line,) = lines
            return line
        assert time.monotonic() < deadline, "no session line"
        time.sleep(0.05)


def one_response_session(tmp_path, model, usage):
    """The log line of a realtime session with `model` whose one response reports `usage`."""
    import websockets.sync.client
    up = realtime_upstream(usage)
    g = realtime_gateway(tmp_path, up)
    try:
        with websockets.sync.client.connect(g.url.replace("http", "ws") + f"/openai/realtime?model={model}") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            ws.send(json.dumps({"type": "response.create"}))
            assert json.loads(ws.recv(timeout=5))["type"] == "response.done"
        return session_line(g)
    finally:
        g.stop()
        up.stop()


CACHED_AUDIO = {"total_tokens": 2100, "input_tokens": 2000, "output_tokens": 100,
                "input_token_details": {"cached_tokens": 1000, "text_tokens": 1000, "audio_tokens": 1000,
                                        "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 1000}},
                "output_token_details": {"text_tokens": 100, "audio_tokens": 0}}


# Failed at 4c429f1 (mended since; gpt-realtime-mini, 2024-10-01): cached audio input is priced at the text cache rate (cost.rs `cost` has one cache_read price), not the model's cached-audio price
@pytest.mark.parametrize("model, want", [
    pytest.param("gpt-realtime-mini", (1000 * 0.60 + 1000 * 0.30 + 100 * 2.40) / 1e6, id="gpt-realtime-mini"),
    pytest.param("gpt-4o-realtime-preview-2024-10-01", (1000 * 5 + 1000 * 20 + 100 * 20) / 1e6, id="2024-10-01"),
    pytest.param("gpt-realtime", (1000 * 4 + 1000 * 0.40 + 100 * 16) / 1e6, id="gpt-realtime"),
])
def test_cached_realtime_audio_is_priced_at_the_models_cached_audio_rate(tmp_path, model, want):
    line = one_response_session(tmp_path, model, CACHED_AUDIO)
    assert (line["model"], line["tokens_in"], line["tokens_out"]) == (model, 2000, 100), line
    assert line["cost"] == pytest.approx(want, rel=1e-9), line


class RawWebSocket:
    """A WebSocket client on a plain socket, whose frames (masked, as a client's) the test writes
    byte by byte if it likes, and which can drop its connection without a close frame."""

    def __init__(self, g, path):
        import base64
        import os
        self.sock = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{g.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "closed during the handshake"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    @staticmethod
    def frame(opcode, payload, fin=True):
        import os
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, data, piece=None):
        if piece is None:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), piece):
            self.sock.sendall(data[i:i + piece])
            time.sleep(0.005)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def recv(self):
        """The next frame from the server: (opcode, payload)."""
        self._need(2)
        opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        at = 2
        if n == 126:
            self._need(4)
            n, at = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, at = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(at + n)
        payload, self.buf = self.buf[at:at + n], self.buf[at + n:]
        return opcode, payload

    def recv_until(self, event_type):
        for _ in range(50):
            opcode, payload = self.recv()
            if opcode == 1 and json.loads(payload)["type"] == event_type:
                return
        raise AssertionError(f"no {event_type}")

    def drop(self):
        self.sock.close()


def answered_session(g):
    """A raw session through the gateway that has asked for a response and read it."""
    ws = RawWebSocket(g, "/openai/realtime?model=gpt-realtime")
    ws.recv_until("session.created")
    ws.send(ws.frame(1, json.dumps({"type": "response.create"}).encode()))
    ws.recv_until("response.done")
    return ws


# The client's close frame, however its bytes arrive (one at a time, masked, after a message sent
# in fragments with a ping between them), ends the session cleanly: `complete`; a client that
# drops the connection without one went away: `cancelled`, even when a data frame it sent held the
# bytes of a close frame.
@pytest.mark.parametrize("how, want", [
    ("close frame in pieces", "complete"),
    ("close bytes in a data frame, then dropped", "cancelled"),
])
def test_the_clients_close_frame_is_found_however_it_is_cut(tmp_path, how, want):
    up = realtime_upstream()
    g = realtime_gateway(tmp_path, up)
    try:
        ws = RawWebSocket(g, "/openai/realtime?model=gpt-realtime")
        ws.recv_until("session.created")
        create = json.dumps({"type": "response.create"}).encode()
        ws.send(ws.frame(1, create[:5], fin=False) + ws.frame(9, b"ping") + ws.frame(0, create[5:]), piece=3)
        ws.recv_until("response.done")
        if how == "close frame in pieces":
            ws.send(ws.frame(8, (1000).to_bytes(2, "big") + b"bye"), piece=1)
            for _ in range(5):  # the provider's answering close frame (then the connection ends)
                if ws.recv()[0] == 8:
                    break
        else:
            ws.send(ws.frame(2, bytes([0x88, 0x02, 0x03, 0xE8])))
            time.sleep(0.2)
        ws.drop()
        line = session_line(g)
        assert (line["tokens_in"], line["tokens_out"], line["outcome"]) == (12, 7, want), line
    finally:
        g.stop()
        up.stop()


# A client that sends its close frame and closes its socket at once, the provider's answering
# close frame unread (a process exiting after ws.close() without waiting, a browser tab closed):
# the kernel answers the unread bytes with a RST, and the gateway's next read of the client fails
# (ECONNRESET). to_provider returns Err(Failed::Client) and the close frame it saw (close_seen) is
# lost: run() logs the session `cancelled` ("the client went away"), though the client ended it
# with its close frame.
# Failed at 4c429f1 (mended since): websocket.rs to_provider/run(): a read error after the client's close frame (RST on unread data) is logged `cancelled`; close_seen is dropped with the error
def test_a_session_the_client_closed_with_a_close_frame_is_complete_when_its_socket_resets(tmp_path):
    up = realtime_upstream()
    g = realtime_gateway(tmp_path, up)
    try:
        ws = answered_session(g)
        ws.send(ws.frame(8, (1000).to_bytes(2, "big")))
        time.sleep(0.3)  # the answering close frame arrives, unread
        ws.drop()
        line = session_line(g)
        assert (line["tokens_in"], line["tokens_out"], line["outcome"]) == (12, 7, "complete"), line
    finally:
        g.stop()
        up.stop()


# The provider ends a session (a close frame: OpenAI's session time limit, say) and a client
# leaves on it without echoing the close frame, as many do. The session was ended by the
# provider, not cut short by the client: run() sets `client_left` whenever the client's side ends
# first without a close frame, and the provider, waiting for the echo, always ends second — its own
# close frame, which `forward`'s Frames saw pass (close_seen), is not consulted.
# Failed at 4c429f1 (mended since): websocket.rs run(): a session the provider closed is logged `cancelled` when the client leaves on the provider's close frame without echoing it
def test_a_session_the_provider_closed_is_complete_when_the_client_leaves_on_its_close_frame(tmp_path):
    up = realtime_upstream(close_after_response=True)
    g = realtime_gateway(tmp_path, up)
    try:
        ws = answered_session(g)
        opcode, payload = ws.recv()
        assert opcode == 8 and payload[:2] == (1000).to_bytes(2, "big"), (opcode, payload)
        ws.drop()
        line = session_line(g)
        assert (line["tokens_in"], line["tokens_out"], line["outcome"]) == (12, 7, "complete"), line
    finally:
        g.stop()
        up.stop()


class SilentProvider:
    """A realtime provider that takes the upgrade, says `session.created`, and then reads and
    answers nothing, not even a close frame (RFC 6455 §5.5.1 asks for one)."""

    def __init__(self):
        import base64
        import hashlib
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns = []

        def serve():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            event = json.dumps({"type": "session.created", "event_id": "ev_1", "session": {}}).encode()
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + bytes([0x81, len(event)]) + event)
            while conn.recv(65536):
                pass

        threading.Thread(target=serve, daemon=True).start()

    def stop(self):
        self.listener.close()
        for c in self.conns:
            c.close()


# A client's close frame ends its side of the session: a provider that never answers it (nor
# closes) has the gateway's 5 s grace, then the session ends for both, logged `complete` — it does
# not stay open as long as the client keeps its connection.
def test_a_client_close_frame_the_provider_never_answers_ends_the_session_after_the_grace(tmp_path):
    up = SilentProvider()
    g = realtime_gateway(tmp_path, up)
    try:
        ws = RawWebSocket(g, "/openai/realtime?model=gpt-realtime")
        ws.recv_until("session.created")
        sent = time.monotonic()
        ws.send(ws.frame(8, (1000).to_bytes(2, "big")))
        with pytest.raises((EOFError, ConnectionResetError)):
            for _ in range(5):
                ws.recv()
        took = time.monotonic() - sent
        assert 4 < took < 8, took
        line = session_line(g)
        assert line["outcome"] == "complete", line
        ws.drop()
    finally:
        g.stop()
        up.stop()
