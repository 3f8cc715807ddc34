"""Usage limits, authentication and request checks over the life of WebSocket sessions: Azure
OpenAI sessions priced by their deployment, input audio transcriptions counted and charged, and
open sessions admitted again (and charged to the new limits) when the config is reloaded.

The provider is the Realtime stand-in of test_realtime.py, taught Azure's `api-key` and
OpenAI's transcription sessions (`?intent=transcription`)."""

import json

import pytest
import websockets
import websockets.sync.client

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate, gateway_yaml
from test_realtime import MODEL, RealtimeUpstream, reloads, respond, session_line, wait_for_reload, ws_url

TRANSCRIBE = "gpt-4o-transcribe"
OTHER_TOKEN = f"gw-{KEY_MARKER}-token-2"


class Upstream(RealtimeUpstream):
    """Also takes Azure's `api-key` header, and serves transcription sessions: a
    `transcription_session.created` naming `transcription_model`, then for each
    `input_audio_buffer.commit` a completed transcription with `transcription_usage`."""

    transcription_model = TRANSCRIBE
    transcription_usage = {"type": "tokens", "total_tokens": 30, "input_tokens": 20,
                           "input_token_details": {"text_tokens": 0, "audio_tokens": 20}, "output_tokens": 10}

    def _check(self, connection, request):
        if request.headers.get("api-key") == OPENAI_KEY:
            self.handshakes.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.raw_items()}})
            return None
        return super()._check(connection, request)

    async def _session(self, ws):
        if "intent=transcription" not in ws.request.path:
            return await super()._session(ws)
        await ws.send(json.dumps({"event_id": "ev_1", "type": "transcription_session.created", "session": {
            "id": "sess_1", "object": "realtime.transcription_session",
            "input_audio_transcription": {"model": self.transcription_model, "language": "en"}}}))
        n = 0
        async for message in ws:
            if json.loads(message).get("type") != "input_audio_buffer.commit":
                continue
            n += 1
            await ws.send(json.dumps({"event_id": f"ev_t{n}", "type": "conversation.item.input_audio_transcription.completed",
                                      "item_id": f"item_{n}", "content_index": 0, "transcript": f"words {n}",
                                      "usage": self.transcription_usage}))


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.stop()


def transcribe(ws):
    """Commits audio; the events until its transcription completed."""
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    events = []
    while not events or not events[-1]["type"].endswith("transcription.completed"):
        events.append(json.loads(ws.recv(timeout=5)))
    return events


def assert_closed(ws, code, timeout=10):
    """The gateway closes the session with `code`; its reason."""
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        ws.recv(timeout=timeout)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code, closed.value
    return closed.value.rcvd.reason


def assert_refused(url, status, headers=None):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(url, additional_headers=headers or {}).close()
    assert refused.value.response.status_code == status, refused.value.response.body
    return refused.value.response


def wss(g, path):
    return g.url.replace("http", "ws") + path


def limits(*, spend=None, tokens=None, pricing=()):
    spec = ""
    if pricing:
        spec += "  pricing:\n" + "".join(
            f"    - {{model: {m}, inputPerMillion: \"{i}\", outputPerMillion: \"{o}\"}}\n" for m, i, o in pricing)
    if spend:
        spec += f"  spendLimit: {{amount: \"{spend}\", period: day}}\n"
    if tokens:
        spec += f"  rateLimit: {{limit: 1000, interval: 60s, tokensPerMinute: {tokens}}}\n"
    return spec


# Azure OpenAI: the model its URL names is the session's.

# The deployment's path names the deployment; Azure's v1 API names none (the session's model is
# the URL's ?model=, as on OpenAI, and the session goes to the resource's /openai/v1/realtime).
@pytest.mark.parametrize("path,upstream_path", [
    ("/azure-openai/my-resource/house-realtime/realtime?api-version=2024-10-01-preview",
     "/openai/deployments/house-realtime/realtime?api-version=2024-10-01-preview"),
    ("/azure-openai/my-resource/openai/v1/realtime?model=house-realtime",
     "/openai/v1/realtime?model=house-realtime"),
], ids=["deployment", "v1"])
def test_an_azure_session_is_charged_at_the_price_of_the_model_its_url_names(upstream, tmp_path, path, upstream_path):
    # Each response reports 19 tokens: at $1000 a million, $0.019, past the $0.01 limit.
    spec = limits(spend="0.01", pricing=[("house-realtime", 1000, 1000)])
    keys = dict(DEFAULT_KEYS, **{"azure-openai.default": OPENAI_KEY})
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), keys)
    try:
        with websockets.sync.client.connect(wss(g, path)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            assert respond(ws)[-1]["response"]["usage"]["input_tokens"] == 12
            assert assert_closed(ws, 1008) == "usage limit reached"
        assert upstream.handshakes[0]["path"] == upstream_path
        line = session_line(g)
        assert " model=house-realtime " in line and " tokens_in=12 tokens_out=7" in line, line
        # The day's spend is used up: the next session is refused at the upgrade.
        assert_refused(wss(g, path), 429)
    finally:
        g.stop()


def test_under_a_spend_limit_a_session_naming_no_model_is_refused(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(spend="100")), DEFAULT_KEYS)
    try:
        answer = assert_refused(wss(g, "/openai/realtime"), 400)
        err = json.loads(answer.body)["error"][0]
        assert err["code"] == 2111 and "names no model" in err["message"] and "?model=" in err["message"], err
        assert upstream.handshakes == []
        # Naming it, the session is served.
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    finally:
        g.stop()


def test_a_token_budget_alone_counts_a_session_naming_no_model(upstream, tmp_path):
    # Tokens are counted whatever the model: no reason to refuse the session.
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(tokens=20)), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(wss(g, "/openai/realtime")) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            respond(ws)
            respond(ws)
            assert_closed(ws, 1008)
    finally:
        g.stop()


# Input audio transcriptions.

def test_transcriptions_count_against_the_token_budget(upstream, tmp_path):
    # Each transcription reports 30 tokens: the first fits 50 a minute, the second spends them.
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(tokens=50)), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(wss(g, "/openai/realtime?intent=transcription")) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "transcription_session.created"
            assert transcribe(ws)[-1]["transcript"] == "words 1"
            transcribe(ws)
            assert assert_closed(ws, 1008) == "usage limit reached"
        assert_refused(wss(g, "/openai/realtime?intent=transcription"), 429)
    finally:
        g.stop()


def test_transcriptions_are_charged_at_the_transcription_models_price(upstream, tmp_path):
    # 30 tokens at $1000 a million: $0.03, past the $0.01 limit at the first transcription.
    spec = limits(spend="0.01", pricing=[(TRANSCRIBE, 1000, 1000)])
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(wss(g, "/openai/realtime?intent=transcription")) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "transcription_session.created"
            transcribe(ws)
            assert assert_closed(ws, 1008) == "usage limit reached"
        assert_refused(wss(g, "/openai/realtime?intent=transcription"), 429)
    finally:
        g.stop()


def test_transcriptions_that_cannot_be_priced_are_warned_about(upstream, tmp_path):
    # A model without a price, then one billed by the audio's duration: not charged, and the
    # operator is told so (once each), as for HTTP answers.
    upstream.transcription_model = "house-transcribe"
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(spend="0.01")), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(wss(g, "/openai/realtime?intent=transcription")) as ws:
            ws.recv(timeout=5)
            transcribe(ws)
            transcribe(ws)
            upstream.transcription_usage = {"type": "duration", "seconds": 2.5}
            transcribe(ws)
        session_line(g)
        logs = g.logs()
        unpriced = [line for line in logs.splitlines() if "the model has no price" in line]
        assert len(unpriced) == 1 and "house-transcribe" in unpriced[0], unpriced
        assert "reported no token counts" in logs
    finally:
        g.stop()


# Reloads: open sessions are admitted again, and charged to the new limits.

def reload_with(g, text=None, keys=()):
    before = reloads(g)
    if text is not None:
        g.config.write_text(text)
    for name, value in keys:
        (g.keys_dir / name).write_text(value + "\n")
    wait_for_reload(g, before)


def test_limits_added_by_a_reload_apply_to_open_sessions(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            respond(ws)  # no limits yet: not charged to any
            reload_with(g, gateway_yaml(upstream.url, extra_spec=limits(tokens=20)))
            respond(ws)  # 19 of the new 20
            respond(ws)  # 38: spent
            assert assert_closed(ws, 1008) == "usage limit reached"
        assert " tokens_in=36 tokens_out=21" in session_line(g)
        # Charged to the gateway's counters: new sessions find the budget spent.
        assert_refused(ws_url(g), 429)
    finally:
        g.stop()


def test_a_reload_to_a_spent_limit_ends_open_sessions(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(tokens=1000)), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as a, websockets.sync.client.connect(ws_url(g)) as b:
            for ws in (a, b):
                assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            respond(a)
            respond(b)
            # The budget is lowered below what was spent: both sessions end.
            reload_with(g, gateway_yaml(upstream.url, extra_spec=limits(tokens=30)))
            for ws in (a, b):
                assert assert_closed(ws, 1008) == "usage limit reached"
    finally:
        g.stop()


def test_a_session_ends_when_its_gateway_token_is_revoked(upstream, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": f"{GATEWAY_TOKEN}\n{OTHER_TOKEN}"})
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, auth=True), keys)
    try:
        old = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
        # The other token given as the provider key, as Cloudflare's stored-key examples do.
        other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
        with websockets.sync.client.connect(ws_url(g), additional_headers=old) as revoked, \
                websockets.sync.client.connect(ws_url(g), additional_headers=other) as kept:
            for ws in (revoked, kept):
                assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            reload_with(g, keys=[("authentication.tokens", OTHER_TOKEN)])
            assert "gateway token" in assert_closed(revoked, 1008)
            assert respond(kept)[-1]["type"] == "response.done"
            # The tokens replaced again: the kept session's token is gone too.
            reload_with(g, keys=[("authentication.tokens", f"gw-{KEY_MARKER}-token-3")])
            assert "gateway token" in assert_closed(kept, 1008)
        logs = g.logs()
        assert GATEWAY_TOKEN not in logs and OTHER_TOKEN not in logs
    finally:
        g.stop()


def test_a_session_opened_without_authentication_ends_when_it_is_turned_on(upstream, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), keys)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            reload_with(g, gateway_yaml(upstream.url, auth=True))
            assert "gateway token" in assert_closed(ws, 1008)
    finally:
        g.stop()


def test_enabling_dlp_ends_open_sessions(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            # An unrelated change: the session goes on.
            reload_with(g, gateway_yaml(upstream.url, extra_spec=limits(tokens=100000)))
            assert respond(ws)[-1]["type"] == "response.done"
            dlp = "  dlp:\n    policies:\n      - {id: cards, action: BLOCK, check: [REQUEST], profiles: [credit-card]}\n"
            reload_with(g, gateway_yaml(upstream.url, extra_spec=dlp))
            assert "DLP" in assert_closed(ws, 1008)
    finally:
        g.stop()


def test_a_spend_limit_added_by_a_reload_ends_a_session_naming_no_model(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(wss(g, "/openai/realtime")) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            reload_with(g, gateway_yaml(upstream.url, extra_spec=limits(spend="100")))
            assert "no model" in assert_closed(ws, 1008)
    finally:
        g.stop()


def test_a_session_admitted_again_is_charged_at_the_new_prices(upstream, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=limits(spend="0.01")), DEFAULT_KEYS)
    try:
        with websockets.sync.client.connect(ws_url(g)) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            respond(ws)  # gpt-4o-realtime-preview at its list price: 19 tokens, far below $0.01
            respond(ws)
            reload_with(g, gateway_yaml(upstream.url, extra_spec=limits(spend="0.01", pricing=[(MODEL, 1000, 1000)])))
            respond(ws)
            assert assert_closed(ws, 1008) == "usage limit reached"
    finally:
        g.stop()
