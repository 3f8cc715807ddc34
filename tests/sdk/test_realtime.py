"""WebSocket sessions through the gateway: the OpenAI SDK's Realtime client against a local
stand-in for OpenAI's Realtime endpoint (`wss://api.openai.com/v1/realtime?model=...`), as
Cloudflare's WebSockets API serves it: gateway token checked, stored key injected, frames passed
both ways, one log line per session with the tokens of its `response.done` events."""

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
import websockets
import websockets.sync.client
from websockets.asyncio.server import serve
from websockets.http11 import Response
from websockets.datastructures import Headers

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, OPENAI_KEY, Sidegate, gateway_yaml

MODEL = "gpt-4o-realtime-preview"
AUTH = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}


def session_line(g, timeout=5):
    """The access log line of the one WebSocket session (status 101), once it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in g.logs().splitlines() if " status_code=101 " in line]
        if lines:
            (line,) = lines
            return line
        assert time.monotonic() < deadline, "no access log line for the session"
        time.sleep(0.05)


class RealtimeUpstream:
    """OpenAI's Realtime API in small: `session.created` on connect, and for each
    `response.create` a text delta and a `response.done` with usage. Records each handshake."""

    def __init__(self):
        self.handshakes = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            async with serve(self._session, "127.0.0.1", 0, process_request=self._check) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self.stop_event.wait()

        self.loop.run_until_complete(main())

    def _check(self, connection, request):
        self.handshakes.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.raw_items()}})
        if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
            body = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}).encode()
            return Response(401, "Unauthorized", Headers([("content-type", "application/json")]), body)
        return None

    async def _session(self, ws):
        await ws.send(json.dumps({"type": "session.created", "event_id": "ev_1", "session": {"model": MODEL}}))
        n = 0
        async for message in ws:
            event = json.loads(message)
            if event.get("type") != "response.create":
                continue
            n += 1
            await ws.send(json.dumps({"type": "response.output_text.delta", "event_id": f"ev_d{n}", "delta": f"reply {n}"}))
            await ws.send(json.dumps({"type": "response.done", "event_id": f"ev_r{n}", "response": {
                "id": f"resp_{n}", "object": "realtime.response", "status": "completed", "output": [],
                "usage": {"total_tokens": 19, "input_tokens": 12, "output_tokens": 7}}}))

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture
def upstream():
    u = RealtimeUpstream()
    yield u
    u.stop()


@pytest.fixture
def realtime_gateway(upstream, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, auth=True), keys)
    yield g
    g.stop()


def client(g):
    return openai.OpenAI(api_key="placeholder", base_url=g.url + "/openai", default_headers=AUTH)


def test_the_openai_sdk_realtime_client_talks_through_the_gateway(realtime_gateway, upstream):
    with client(realtime_gateway).realtime.connect(model=MODEL) as conn:
        first = conn.recv()
        assert first.type == "session.created"
        texts = []
        for _ in range(2):
            conn.response.create()
            while True:
                event = conn.recv()
                if event.type == "response.output_text.delta":
                    texts.append(event.delta)
                if event.type == "response.done":
                    assert event.response.usage.input_tokens == 12
                    break
    assert texts == ["reply 1", "reply 2"]
    (hs,) = upstream.handshakes
    assert hs["path"] == f"/v1/realtime?model={MODEL}"
    # The stored key replaced the placeholder; gateway headers and compression offers stayed here.
    assert hs["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(k.startswith("cf-aig-") for k in hs["headers"]), hs["headers"]
    assert "sec-websocket-extensions" not in hs["headers"]
    # One log line when the session ends, with the tokens of both responses.
    line = session_line(realtime_gateway)
    assert " provider=openai " in line and " path=realtime " in line, line
    assert " tokens_in=24 tokens_out=14" in line, line
    assert OPENAI_KEY not in realtime_gateway.logs()


def test_cloudflares_realtime_url_and_a_bad_key_answer_through(upstream, tmp_path):
    # Cloudflare's shape is `/openai?model=...`; without a stored key the client's key goes,
    # and the provider's refusal reaches the client as the provider sent it.
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), {})
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(g.url.replace("http", "ws") + f"/openai?model={MODEL}",
                                           additional_headers={"Authorization": "Bearer sk-wrong"}).close()
        assert refused.value.response.status_code == 401
        assert b"Incorrect API key" in refused.value.response.body
        # The refusal carries the id of its log line, as every answer does.
        log_id = refused.value.response.headers["cf-aig-log-id"]
        assert " status_code=401 " in g.wait_log_line(log_id)
        assert upstream.handshakes[-1]["path"] == f"/v1/realtime?model={MODEL}"
        with websockets.sync.client.connect(g.url.replace("http", "ws") + f"/openai?model={MODEL}",
                                            additional_headers={"Authorization": f"Bearer {OPENAI_KEY}"}) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    finally:
        g.stop()


def test_sessions_need_the_gateway_token(realtime_gateway, upstream):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(realtime_gateway.url.replace("http", "ws") + f"/openai/realtime?model={MODEL}").close()
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"][0]["code"] == 2009
    assert upstream.handshakes == []


def test_a_gateway_that_checks_what_requests_carry_refuses_sessions(upstream, tmp_path):
    spec = "  dlp:\n    policies:\n      - {id: cards, action: BLOCK, check: [REQUEST], profiles: [credit-card]}\n"
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(g.url.replace("http", "ws") + f"/openai/realtime?model={MODEL}").close()
        assert refused.value.response.status_code == 400
        err = json.loads(refused.value.response.body)["error"][0]
        assert err["code"] == 2111 and "DLP" in err["message"], err
        assert upstream.handshakes == []
        # Plain HTTP requests are served as before: this one reaches the upstream.
        httpx.get(g.url + "/openai/models")
        assert [h["path"] for h in upstream.handshakes] == ["/v1/models"]
    finally:
        g.stop()


def ws_url(g):
    return g.url.replace("http", "ws") + f"/openai/realtime?model={MODEL}"


def respond(ws):
    """Asks for a response; the events until its response.done."""
    ws.send(json.dumps({"type": "response.create"}))
    events = []
    while not events or events[-1]["type"] != "response.done":
        events.append(json.loads(ws.recv(timeout=5)))
    return events


def test_a_session_is_closed_when_its_token_budget_runs_out(upstream, tmp_path):
    # Each response reports 19 tokens: the first fits a budget of 20 tokens a minute, the
    # second spends it, and the session is closed then (1008), charged for both.
    spec = "  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 20}\n"
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            respond(ws)
            respond(ws)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == 1008, closed.value
        assert " tokens_in=24 tokens_out=14" in session_line(g)
        # The budget is spent: the next session is refused at the upgrade.
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(ws_url(g)).close()
        assert refused.value.response.status_code == 429
    finally:
        g.stop()


def test_under_a_budget_sessions_whose_usage_the_gateway_cannot_read_are_refused(upstream, tmp_path):
    # Only OpenAI's Realtime events are read for usage: a session of another provider could
    # spend past the limits unseen, so where limits apply it is refused at the upgrade.
    spec = "  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 100000}\n"
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(g.url.replace("http", "ws") + "/groq/realtime").close()
        assert refused.value.response.status_code == 400
        err = json.loads(refused.value.response.body)["error"][0]
        assert err["code"] == 2111 and "cannot read" in err["message"], err
        assert upstream.handshakes == []
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    finally:
        g.stop()


def test_sessions_end_when_the_gateway_is_deleted(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            # kubelet empties both volumes when the AIGateway is deleted.
            g.config.unlink()
            for f in g.keys_dir.iterdir():
                f.unlink()
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1001, closed.value
        # Logged when it ended, not left open.
        assert " provider=openai " in session_line(g)
    finally:
        g.stop()


def reloads(g):
    m = re.search(r'sidegate_config_reloads_total{result="success"} (\d+)', g.metrics())
    return int(m.group(1)) if m else 0


def wait_for_reload(g, before, timeout=10):
    deadline = time.monotonic() + timeout
    while reloads(g) <= before:
        assert time.monotonic() < deadline, "the edit was not reloaded"
        time.sleep(0.05)


def test_a_session_ends_when_its_stored_key_is_rotated_not_when_another_is(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            # Another provider's key changes: this session goes on.
            before = reloads(g)
            (g.keys_dir / "anthropic.default").write_text("sk-ant-rotated\n")
            wait_for_reload(g, before)
            assert respond(ws)[-1]["type"] == "response.done"
            # Its own key is rotated: the gateway no longer holds what the session was opened
            # with, so the session ends (1001), and says why.
            (g.keys_dir / "openai.default").write_text("sk-openai-rotated\n")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1001, closed.value
            assert "removed or rotated" in closed.value.rcvd.reason
        assert " provider=openai " in session_line(g)
    finally:
        g.stop()


def test_a_session_ends_when_its_stored_key_is_removed(upstream, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"openai.team-b": OPENAI_KEY})
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), keys)
    try:
        headers = {"cf-aig-byok-alias": "team-b"}
        with websockets.sync.client.connect(ws_url(g), additional_headers=headers) as team_b, \
                websockets.sync.client.connect(ws_url(g)) as default:
            for ws in (team_b, default):
                assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            (g.keys_dir / "openai.team-b").unlink()
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                team_b.recv(timeout=10)
            assert closed.value.rcvd.code == 1001, closed.value
            # The session on the key still held goes on.
            assert respond(default)[-1]["type"] == "response.done"
    finally:
        g.stop()


def test_a_session_whose_provider_goes_away_ends_for_the_client(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            upstream.stop()
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                ws.recv(timeout=10)
        assert " provider=openai " in session_line(g)
    finally:
        g.stop()


# A client that drops its connection without a close frame (a killed process, a lost network)
# went away: its session is logged `cancelled` (with the tokens of the responses it had), not
# `complete` as one it closed with a close frame (RFC 6455 §7.1.1: the client starts the
# closing handshake; §7.1.5/§7.4.1: 1006 when the connection closes without one).
@pytest.mark.parametrize("how", ["close frame", "dropped"])
def test_a_session_the_client_drops_without_a_close_frame_is_logged_cancelled(realtime_gateway, how):
    url = realtime_gateway.url.replace("http", "ws") + f"/openai/realtime?model={MODEL}"
    with websockets.sync.client.connect(url, additional_headers=AUTH) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        ws.send(json.dumps({"type": "response.create"}))
        while json.loads(ws.recv(timeout=5))["type"] != "response.done":
            pass
        if how == "dropped":
            ws.socket.close()
    line = session_line(realtime_gateway)
    assert " tokens_in=12 tokens_out=7" in line, line
    want = "complete" if how == "close frame" else "cancelled"
    assert f" outcome={want} " in line, line
