"""Cloudflare's non-realtime WebSockets API: the universal endpoint over a WebSocket. The client
opens a WebSocket on the universal endpoint's URL (`/v1/{account}/{gateway}`, or the sidecar's
`/`), sends `{"type": "universal.create", "request": {eventId, provider, endpoint, headers,
query}}` and gets `{"type": "universal.created", "metadata": {cacheStatus, eventId, logId, step,
contentType}, "response": <the answer>}` — for a stream, `universal.created` then a
`universal.stream` per event and a `universal.done`. Each message is a request to the universal
endpoint, served as a POST is (keys, auth, limits, cache, DLP, logging)."""

import json
import pathlib
import socket
import threading
import time

import httpx
import pytest
import websockets
import websockets.sync.client

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, OPENAI_KEY, Sidegate, gateway_yaml
from rawhttp import Listener, cut_openai_stream

AUTH = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
SSN = "123-45-6789"


def ws_url(g, path="/v1/acct/main/"):
    return g.url.replace("http://", "ws://") + path


def connect(g, path="/v1/acct/main/", headers=None, **kw):
    return websockets.sync.client.connect(ws_url(g, path), open_timeout=5, additional_headers=headers or {},
                                          **kw)


def step(text="over a socket", model="gpt-4o-mini", **extra):
    return {"provider": "openai", "endpoint": "chat/completions", "headers": {"Content-Type": "application/json"},
            "query": {"model": model, "messages": [{"role": "user", "content": text}], **extra}}


def create(event_id, request):
    body = dict(request, eventId=event_id) if isinstance(request, dict) else request
    return json.dumps({"type": "universal.create", "request": body})


def recv(ws, timeout=10):
    return json.loads(ws.recv(timeout=timeout))


def access_lines(g):
    return [line for line in g.logs().splitlines() if " request id=" in line]


def test_a_request_is_answered_with_its_metadata_and_logged_as_a_post_is(authed_gateway, mock):
    with connect(authed_gateway, headers=AUTH) as ws:
        ws.send(create("ev-1", step()))
        answer = recv(ws)
    assert answer["type"] == "universal.created", answer
    meta = answer["metadata"]
    assert (meta["eventId"], meta["step"], meta["contentType"], meta["status"]) == \
        ("ev-1", "0", "application/json", 200), meta
    assert answer["response"]["choices"][0]["message"]["content"] == "mock reply to: over a socket"
    # The stored key replaced the step's placeholder, as on a POST.
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert mock.last()["path"] == "/v1/chat/completions"
    # Logged as a request of its own, under the log id it names, with its event id.
    line = authed_gateway.wait_log_line(meta["logId"])
    assert " provider=openai " in line and " path=chat/completions " in line and " status_code=200 " in line, line
    assert " event_id=ev-1" in line and " step=0" in line and " tokens_in=" in line, line


@pytest.mark.parametrize("path", ["/", "/v1/acct/main", "/v1/acct/main/"])
def test_the_short_and_long_forms_of_the_universal_url_both_serve_it(gateway, mock, path):
    with connect(gateway, path) as ws:
        ws.send(create("e", step()))
        assert recv(ws)["metadata"]["status"] == 200


def test_a_stream_comes_as_created_then_its_events_then_done(gateway, mock):
    with connect(gateway) as ws:
        ws.send(create("streamed", step(text="one two three", stream=True)))
        first = recv(ws)
        assert first["type"] == "universal.created" and "response" not in first, first
        assert first["metadata"]["eventId"] == "streamed"
        assert first["metadata"]["contentType"].startswith("text/event-stream"), first
        texts, events = [], []
        while (m := recv(ws))["type"] == "universal.stream":
            # Only the event id in a stream's events' metadata, as Cloudflare sends them.
            assert m["metadata"] == {"eventId": "streamed"}, m
            events.append(m["response"])
            texts += [c["delta"].get("content") or "" for c in m["response"]["choices"]]
        done = m
    assert done["type"] == "universal.done", done
    assert done["metadata"] == first["metadata"]
    assert "".join(texts) == "mock reply to: one two three"
    # Each event is the provider's chunk, as JSON; `[DONE]` is what universal.done says.
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    line = gateway.wait_log_line(done["metadata"]["logId"])
    assert " outcome=complete" in line and " status_code=200 " in line, line


def test_requests_on_one_socket_are_served_side_by_side(gateway, mock):
    slow = step(text="slow one")
    slow["headers"]["x-mock-delay-ms"] = "1500"
    with connect(gateway) as ws:
        started = time.monotonic()
        ws.send(create("slow", slow))
        for i in range(3):
            ws.send(create(f"fast-{i}", step(text=f"fast {i}")))
        got = [recv(ws) for _ in range(4)]
        elapsed = time.monotonic() - started
    order = [m["metadata"]["eventId"] for m in got]
    # The fast ones did not wait for the slow one, and each was answered once, with its own answer.
    assert order[-1] == "slow" and sorted(order[:3]) == ["fast-0", "fast-1", "fast-2"], order
    for m in got:
        text = "slow one" if m["metadata"]["eventId"] == "slow" else "fast " + m["metadata"]["eventId"][-1]
        assert m["response"]["choices"][0]["message"]["content"] == f"mock reply to: {text}"
    assert elapsed < 3, elapsed
    assert len({m["metadata"]["logId"] for m in got}) == 4


def test_a_stream_that_breaks_off_ends_with_universal_error(mock, tmp_path):
    up = Listener(cut_openai_stream)
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f"    custom-cut: {{baseURL: '{up.url}/v1'}}\n"),
                 DEFAULT_KEYS)
    try:
        cut = dict(step(text="cut short", stream=True), provider="custom-cut",
                   headers={"authorization": "Bearer own"})
        with connect(g) as ws:
            ws.send(create("cut", cut))
            got = [recv(ws) for _ in range(3)]
            # The session goes on.
            ws.send(create("after", step()))
            assert recv(ws)["metadata"]["status"] == 200
        assert [m["type"] for m in got] == ["universal.created", "universal.stream", "universal.error"], got
        assert got[1]["response"]["choices"][0]["delta"]["content"] == "first part"
        error = got[2]
        assert error["metadata"]["eventId"] == "cut" and error["metadata"]["logId"] == got[0]["metadata"]["logId"]
        assert error["response"]["error"][0]["code"] == 2104, error
        line = g.wait_log_line(got[0]["metadata"]["logId"])
        assert " outcome=upstream_error" in line, line
    finally:
        g.stop()
        up.close()


def test_a_list_of_steps_falls_back_as_on_a_post(gateway, mock):
    anthropic = {"provider": "anthropic", "endpoint": "v1/messages", "headers": {},
                 "query": {"model": "claude-haiku-4-5", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "fall back"}]}}
    with connect(gateway) as ws:
        ws.send(json.dumps({"type": "universal.create", "eventId": "listed",
                            "request": [step(model="mock-status-503"), anthropic]}))
        answer = recv(ws)
    assert (answer["metadata"]["eventId"], answer["metadata"]["step"]) == ("listed", "1"), answer
    assert answer["response"]["content"][0]["text"] == "mock reply to: fall back"


def test_errors_are_answers_with_their_status_and_the_session_goes_on(gateway, mock):
    with connect(gateway) as ws:
        # Not a message the API has: refused (400/2108), nothing sent.
        ws.send("not json")
        bad = recv(ws)
        assert bad["type"] == "universal.created" and bad["metadata"]["status"] == 400, bad
        assert bad["response"]["error"][0]["code"] == 2108 and "not JSON" in bad["response"]["error"][0]["message"]
        ws.send(json.dumps({"type": "universal.delete", "request": {"eventId": "t"}}))
        wrong = recv(ws)
        assert wrong["metadata"]["eventId"] == "t" and "universal.create" in wrong["response"]["error"][0]["message"]
        # A malformed step: refused as on a POST, and logged.
        ws.send(create("typed", dict(step(), config={"requestTimeout": "5000"})))
        typed = recv(ws)
        assert (typed["metadata"]["eventId"], typed["metadata"]["status"]) == ("typed", 400), typed
        assert "config.requestTimeout" in typed["response"]["error"][0]["message"]
        assert " status_code=400 " in gateway.wait_log_line(typed["metadata"]["logId"])
        assert mock.requests() == []
        # The provider's own error is its answer: its body and status.
        ws.send(create("refused", step(model="mock-status-400")))
        provider = recv(ws)
        assert (provider["metadata"]["status"], provider["metadata"]["step"]) == (400, "0"), provider
        assert "error" in provider["response"]
        # And the session still serves.
        ws.send(create("after", step()))
        assert recv(ws)["metadata"]["status"] == 200


def test_the_cache_answers_a_repeated_request_with_its_status(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  cache: {enabled: true, ttl: 10m}\n"), DEFAULT_KEYS)
    try:
        mock.clear()
        with connect(g) as ws:
            ws.send(create("a", step(text="cache me")))
            miss = recv(ws)
            ws.send(create("b", step(text="cache me")))
            hit = recv(ws)
        assert (miss["metadata"]["cacheStatus"], hit["metadata"]["cacheStatus"]) == ("MISS", "HIT")
        assert hit["metadata"]["eventId"] == "b" and hit["response"] == miss["response"]
        assert len(mock.requests()) == 1
    finally:
        g.stop()


def test_the_session_needs_the_gateway_token_and_each_request_is_checked_with_it(authed_gateway, mock):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        connect(authed_gateway).close()
    assert refused.value.response.status_code == 401
    # The token never stands in a provider key header here: no one provider's key it replaces.
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        connect(authed_gateway, headers={"authorization": f"Bearer {GATEWAY_TOKEN}"}).close()
    assert refused.value.response.status_code == 401
    # A gateway token in a step's own key header would go upstream: refused as on a POST.
    with connect(authed_gateway, headers=AUTH) as ws:
        own = step()
        own["headers"] = {"authorization": f"Bearer {GATEWAY_TOKEN}"}
        own["provider"] = "groq"
        ws.send(create("leak", own))
        answer = recv(ws)
    assert (answer["metadata"]["status"], answer["response"]["error"][0]["code"]) == (401, 2009), answer
    assert mock.requests() == []


def test_the_upgrades_gateway_headers_are_checked_and_apply_to_every_request(gateway, mock):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        connect(gateway, headers={"cf-aig-cache-ttl": "soon"}).close()
    assert refused.value.response.status_code == 400
    with connect(gateway, headers={"cf-aig-metadata": '{"team":"sockets"}'}) as ws:
        ws.send(create("m", step()))
        answer = recv(ws)
    line = gateway.wait_log_line(answer["metadata"]["logId"])
    assert "sockets" in line, line


def test_limits_count_each_request(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  rateLimit: {limit: 2, interval: 60s}\n"), DEFAULT_KEYS)
    try:
        with connect(g) as ws:
            got = []
            for i in range(3):
                ws.send(create(f"r{i}", step()))
                got.append(recv(ws))
        assert [m["metadata"]["status"] for m in got] == [200, 200, 429], got
        assert got[2]["response"]["error"][0]["code"] == 2003
    finally:
        g.stop()


def test_dlp_checks_each_request_as_on_a_post(mock, tmp_path):
    spec = "  dlp:\n    policies:\n      - {id: no-ssn, action: BLOCK, check: [REQUEST], profiles: [us-ssn]}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        with connect(g) as ws:
            ws.send(create("blocked", step(text=f"my ssn is {SSN}")))
            blocked = recv(ws)
            ws.send(create("clean", step(text="nothing to see")))
            clean = recv(ws)
        assert (blocked["metadata"]["status"], blocked["response"]["error"][0]["code"]) == (400, 2029), blocked
        assert SSN not in json.dumps(blocked)
        assert clean["metadata"]["status"] == 200
        assert len(mock.requests()) == 1
    finally:
        g.stop()


def test_a_message_over_the_request_body_limit_closes_the_session_with_1009(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  limits: {maxRequestBody: 2Ki}\n"), DEFAULT_KEYS)
    try:
        mock.clear()
        with connect(g) as ws:
            ws.send(create("small", step()))
            assert recv(ws)["metadata"]["status"] == 200
            ws.send(create("big", step(text="x" * 4096)))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                recv(ws)
        assert closed.value.rcvd.code == 1009, closed.value
        assert len(mock.requests()) == 1
    finally:
        g.stop()


def test_pings_are_answered(gateway):
    with connect(gateway) as ws:
        assert ws.ping(b"are you there").wait(5)


def raw_upgrade(g, path="/v1/acct/main"):
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{g.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return s, head


def test_the_handshake_is_rfc_6455s_and_an_unmasked_frame_ends_the_session(gateway):
    s, head = raw_upgrade(gateway)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head
        # RFC 6455's own example key and its answer.
        assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head.replace(b"Sec-WebSocket-Accept", b"sec-websocket-accept"), head
        s.sendall(b"\x81\x02hi")  # a client's frame must be masked
        close = s.recv(64)
        assert close[0] == 0x88 and int.from_bytes(close[2:4], "big") == 1002, close
    finally:
        s.close()


def test_a_bad_handshake_is_refused(gateway):
    r = httpx.get(gateway.url + "/v1/acct/main", headers={"upgrade": "websocket", "connection": "upgrade",
                                                            "sec-websocket-version": "8",
                                                            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2111), r.text


def test_closing_the_socket_gives_up_the_requests_still_running(gateway, mock):
    slow = step(text="never read")
    slow["headers"]["x-mock-delay-ms"] = "3000"
    with connect(gateway) as ws:
        ws.send(create("left", slow))
        time.sleep(0.5)
    # Logged as cancelled (499), as a POST whose client left.
    deadline = time.monotonic() + 5
    while not any(" status_code=499 " in line for line in access_lines(gateway)):
        assert time.monotonic() < deadline, access_lines(gateway)
        time.sleep(0.1)


def test_a_stopping_gateway_closes_the_session_with_1001(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--shutdown-grace", "1"])
    try:
        with connect(g) as ws:
            ws.send(create("before", step()))
            assert recv(ws)["metadata"]["status"] == 200
            threading.Timer(0.2, g.proc.terminate).start()
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1001, closed.value
        g.proc.wait(10)
    finally:
        g.stop()


def test_the_readmes_example_runs_as_it_is(gateway, mock):
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    block = next(b for b in (part.split("```")[0] for part in readme.split("```python\n")[1:])
                 if "universal.create" in b)
    printed = []
    exec(block.replace("ws://127.0.0.1:8787/", ws_url(gateway, "/")), {"print": printed.append})
    (answer,) = printed
    assert (answer["type"], answer["metadata"]["eventId"], answer["metadata"]["status"]) == \
        ("universal.created", "my-request", 200), answer
    assert answer["response"]["choices"][0]["message"]["content"] == "mock reply to: Hi"
