"""Review of the universal endpoint (`POST /`, long form `POST /v1/{account}/{gateway}`): edges of
Cloudflare's contract not covered by test_universal.py and test_realtime_universal_edges.py — the
shape of a step list and the 400s it gets, which setting wins for a step's timeout, a stream that
breaks after its first bytes, a provider's 4xx, and Cloudflare's non-realtime WebSockets API,
which is the universal endpoint over `wss://`.

The public contract: Cloudflare's Universal Endpoint page (an array of step objects `provider`,
`endpoint`, `authorization`, `headers`, `query`), its Fallbacks page ("triggers your fallback if a
model request returns an error"; `cf-aig-step`), its request-handling page (a step's `config`), the
"Header configuration hierarchy" (provider-level headers over request-level headers over gateway
settings) and the Non-realtime WebSockets API (`universal.create` sent over a WebSocket opened on
the universal endpoint's URL, answered with `universal.created`). README "Universal endpoint":
"a malformed list is a 400/2108 naming the step and field".
"""

import json

import httpx
import pytest
import websockets.sync.client

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, OPENAI_KEY, Sidegate, gateway_yaml
from rawhttp import Listener, cut_openai_stream


def chat_step(model="gpt-4o-mini", text="review hello", **extra):
    return {"provider": "openai", "endpoint": "chat/completions", "headers": {},
            "query": {"model": model, "messages": [{"role": "user", "content": text}]}, **extra}


def anthropic_step(text="review hello"):
    return {"provider": "anthropic", "endpoint": "v1/messages", "headers": {},
            "query": {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}}


def access_lines(g):
    return [line for line in g.logs().splitlines() if " request id=" in line]


# --- the shape of a step list ------------------------------------------------------------------


# Failed at b53322e (mended since): a step written as a JSON array is read field by field in the order of the gateway's own struct (provider, endpoint, authorization, headers, query, config) and sent upstream
def test_a_step_that_is_a_json_array_is_refused_not_read_by_position(gateway, mock):
    # Cloudflare's steps are objects; a list of values has no field names to be read by. serde
    # reads a struct from a sequence too, so universal.rs `parse` (serde_json::from_value into
    # `Step`) serves this as an OpenAI request.
    positional = ["openai", "chat/completions", None, {},
                  {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "read by position"}]}]
    r = httpx.post(gateway.url + "/", json=[positional])
    assert r.status_code == 400, f"served: {r.status_code} {r.headers.get('cf-aig-step')} {r.text[:200]}"
    err = r.json()["error"][0]
    assert err["code"] == 2108 and "steps[0]" in err["message"], err
    assert mock.requests() == []


# Failed at b53322e (mended since): a step field of the wrong JSON type is refused as "steps[0]: invalid type: ..., expected u64" (serde's message, without the field's name), where the README promises a 400/2108 "naming the step and field"
@pytest.mark.parametrize("extra,field", [
    # Header values are strings: a client may well write the timeout as one.
    ({"config": {"requestTimeout": "5000"}}, "requestTimeout"),
    ({"headers": {"x-title": 5}}, "headers"),
    # A JavaScript client's unset field: serde's "expected struct StepConfig" names a Rust type.
    ({"config": None}, "config"),
])
def test_a_step_field_of_the_wrong_type_is_named_in_the_400(gateway, mock, extra, field):
    r = httpx.post(gateway.url + "/", json=[chat_step(), chat_step(**extra)])
    assert r.status_code == 400, r.text
    err = r.json()["error"][0]
    assert err["code"] == 2108 and "steps[1]" in err["message"], err
    assert field in err["message"], f"the message does not name {field!r}: {err['message']}"
    assert mock.requests() == []


# --- what a step's settings are and when it fails ------------------------------------------------


def test_a_steps_timeout_is_its_config_then_its_headers_then_the_requests(gateway, mock):
    # Cloudflare's hierarchy: provider-level (the step's own) settings over the request's; the
    # README puts a step's `config` above the cf-aig-* headers among its `headers`. Step 0 takes
    # 600 ms to answer: with 150 ms it hands over to step 1, with 3 s it answers itself.
    def slow(timeout_header=None, config=None):
        step = chat_step(text="slow step")
        step["headers"]["x-mock-delay-ms"] = "600"
        if timeout_header:
            step["headers"]["cf-aig-request-timeout"] = timeout_header
        if config:
            step["config"] = {"requestTimeout": config}
        return step

    cases = [
        # (request header, step header, step config) -> the step that answered
        (("150", None, None), "1"),
        (("150", "3000", None), "0"),
        ((None, "150", 3000), "0"),
        (("3000", "3000", 150), "1"),
    ]
    got = []
    for (request, header, config), _ in cases:
        headers = {"cf-aig-request-timeout": request} if request else {}
        r = httpx.post(gateway.url + "/", json=[slow(header, config), chat_step()], headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        got.append(r.headers["cf-aig-step"])
    assert got == [want for _, want in cases]


def test_a_providers_4xx_hands_over_to_the_next_step_and_only_the_answer_is_logged(gateway, mock):
    # Fallbacks: "Cloudflare triggers your fallback if a model request returns an error" — a
    # 400 (a parameter one provider refuses) is one.
    r = httpx.post(gateway.url + "/", json=[chat_step(model="mock-status-400"), anthropic_step()])
    assert (r.status_code, r.headers["cf-aig-step"], r.headers["cf-aig-provider"]) == (200, "1", "anthropic"), r.text
    assert [q["path"] for q in mock.requests()] == ["/v1/chat/completions", "/v1/messages"]
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert access_lines(gateway) == [line], access_lines(gateway)
    assert " provider=anthropic " in line and " status_code=200 " in line and line.endswith(" step=1"), line


def test_a_stream_that_breaks_after_its_first_bytes_stays_with_its_step(mock, tmp_path):
    # Bytes of step 0's stream reached the client: the next step must not be sent (its answer
    # would be spliced onto the first one's), and the client must see the break, not a clean end.
    up = Listener(cut_openai_stream)
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f"    custom-cut: {{baseURL: '{up.url}/v1'}}\n"),
                 DEFAULT_KEYS)
    try:
        mock.clear()
        cut = dict(chat_step(text="cut short"), provider="custom-cut", headers={"authorization": "Bearer own"})
        cut["query"]["stream"] = True
        backup = chat_step(text="never sent")
        got, broke = b"", None
        with httpx.stream("POST", g.url + "/", json=[cut, backup], timeout=10) as r:
            assert (r.status_code, r.headers["cf-aig-step"], r.headers["cf-aig-provider"]) == (200, "0", "custom-cut")
            try:
                for chunk in r.iter_bytes():
                    got += chunk
            except httpx.TransportError as e:
                broke = e
        assert b'"content":"first part"' in got and b"[DONE]" not in got, got
        assert broke is not None, "the stream ended as if it were whole"
        assert mock.requests() == []
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert " provider=custom-cut " in line and " outcome=upstream_error" in line and " step=0" in line, line
    finally:
        g.stop()
        up.close()


# --- the universal endpoint over WebSocket -------------------------------------------------------


# Failed at b53322e (mended since): Cloudflare's non-realtime WebSockets API is not served: the upgrade on the universal endpoint's URL (wss://.../v1/{account}/{gateway}) is refused 404 "GET / not found" (proxy.rs Route::Universal -> universal::serve takes POST only)
def test_the_non_realtime_websocket_api_answers_universal_create(authed_gateway, mock):
    # Cloudflare: "Modify your Universal Endpoint URL by replacing https:// with wss://", send
    # {"type": "universal.create", "request": {eventId, provider, endpoint, headers, query}} and
    # get {"type": "universal.created", "metadata": {cacheStatus, eventId, logId, step, ...},
    # "response": <the provider's answer>}.
    url = authed_gateway.url.replace("http://", "ws://") + "/v1/acct/main"
    with websockets.sync.client.connect(url, open_timeout=5, additional_headers={
            "cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}) as ws:
        ws.send(json.dumps({"type": "universal.create", "request": {
            "eventId": "my-request", "provider": "openai", "endpoint": "chat/completions",
            "headers": {"Content-Type": "application/json"},
            "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "over a socket"}]}}}))
        answer = json.loads(ws.recv(timeout=10))
    assert answer["type"] == "universal.created", answer
    assert (answer["metadata"]["eventId"], str(answer["metadata"]["step"])) == ("my-request", "0"), answer
    assert answer["response"]["choices"][0]["message"]["content"] == "mock reply to: over a socket"
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
