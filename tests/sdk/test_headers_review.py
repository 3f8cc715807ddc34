"""Review of the `cf-aig-*` header contract (SPEC.md "Request headers", "Response headers"; README
"Headers"), against Cloudflare AI Gateway's: that no gateway header (nor its former name) reaches
any provider family on any route, that a bad value is a 400/2100 naming the header the client
sent whatever the gateway's settings and the route, and that the gateway's own response headers
(`cf-aig-event-id`) say the same thing on every answer.

Tests marked `# FAILS at b53322e` reproduce defects; the others hold and are kept as regression
checks. Loopback only."""

import httpx
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, FixedAnswerServer, Sidegate, gateway_yaml
from test_spec_contract import KEYS, URL_SHAPES, Recorder, config

CHAT = "/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "headers"}]}


def refused_for(r, name):
    """Asserts `r` is the gateway's 400/2100 naming header `name`."""
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["success"] is False and body["result"] == [] and body["messages"] == [], body
    (err,) = body["error"]
    assert err["code"] == 2100, err
    assert name in err["message"], err


# --- No gateway header reaches any provider family, with gateway authentication on ------------

# Every request header Cloudflare's gateway reads, valid values (so that each request is served),
# the former names Cloudflare still honours, and unknown `cf-aig-*` names in odd case.
GATEWAY_HEADERS = {
    "cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}",
    "cf-aig-byok-alias": "default",
    "cf-aig-event-id": "ev-leak",
    "cf-aig-request-timeout": "30000",
    "cf-aig-skip-cache": "true",
    "cf-aig-cache-ttl": "3600",
    "cf-aig-cache-key": "leak-key",
    "cf-aig-max-attempts": "1",
    "cf-aig-retry-delay": "0",
    "cf-aig-backoff": "constant",
    "cf-aig-collect-log": "true",
    "cf-aig-collect-log-payload": "true",
    "cf-aig-metadata": '{"team":"a","n":1}',
    "cf-aig-custom-cost": '{"total_cost":0}',
    "cf-aig-otel-trace-id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "cf-aig-otel-parent-span-id": "00f067aa0ba902b7",
    "CF-AIG-ZDR": "true",
    "Cf-Aig-Something-New": "1",
    "cf-skip-cache": "true",
    "cf-cache-ttl": "120",
    "x-app-trace": "kept",
}
FORMER_NAMES = ("cf-skip-cache", "cf-cache-ttl")


@pytest.fixture(scope="module")
def recorder():
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def authed(recorder, tmp_path_factory):
    keys = dict(KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path_factory.mktemp("headers-authed"),
                 config(recorder.url, "  authentication: {enabled: true}\n"), keys)
    yield g
    g.stop()


def assert_nothing_of_the_gateways_went(sent):
    for request in sent:
        names = request["headers"]
        assert not [h for h in names if h.startswith("cf-aig-") or h in FORMER_NAMES], names
        assert GATEWAY_TOKEN not in repr(request), request


PROVIDER_ROUTES = [(p, rest) for p, rest, *_ in URL_SHAPES] + [
    ("workers-ai", "@cf/meta/llama-3.1-8b-instruct"),
    ("google-vertex-ai", "v1/projects/p/locations/us-east1/publishers/google/models/g:generateContent"),
    ("aws-bedrock", "bedrock-runtime/us-east-1/model/m/converse"),
]


def test_no_gateway_header_reaches_any_provider_route_and_the_apps_own_do(authed, recorder):
    recorder.take()
    own_auth = {"google-vertex-ai": "Bearer own-token", "aws-bedrock": "AWS4-HMAC-SHA256 Credential=x"}
    for provider, rest in PROVIDER_ROUTES:
        headers = dict(GATEWAY_HEADERS)
        if provider in own_auth:
            # No stored key: the app's own credentials go (a named alias would be 400/2040).
            headers["authorization"] = own_auth[provider]
            del headers["cf-aig-byok-alias"]
        r = httpx.post(f"{authed.url}/v1/acct-1/main/{provider}/{rest}", json=BODY, headers=headers)
        assert r.status_code == 200, (provider, r.text)
        assert r.headers["cf-aig-event-id"] == "ev-leak", provider
        (sent,) = recorder.take()
        assert_nothing_of_the_gateways_went([sent])
        assert sent["headers"]["x-app-trace"] == "kept", (provider, sent["headers"])


def test_no_gateway_header_reaches_a_provider_through_compat_or_a_universal_step(authed, recorder):
    recorder.take()
    for model in ["groq/llama-3.1-8b-instant", "anthropic/claude-haiku-4-5", "google-ai-studio/gemini-2.5-flash",
                  "mistral/mistral-small-latest"]:
        # The recorder answers in OpenAI's shape: a translated provider's answer may not read back,
        # but its request was sent.
        httpx.post(f"{authed.url}/compat/chat/completions", json={**BODY, "model": model},
                   headers=GATEWAY_HEADERS)
    sent = recorder.take()
    assert len(sent) == 4, [s["path"] for s in sent]
    assert_nothing_of_the_gateways_went(sent)
    # The steps carry gateway headers of their own, in any case, beside the request's.
    own = {"CF-AIG-Authorization": f"Bearer {GATEWAY_TOKEN}", "Cf-Aig-Cache-Ttl": "0", "cf-skip-cache": "true",
           "CF-AIG-METADATA": '{"step":1}', "x-step-own": "kept"}
    steps = [
        {"provider": "openai", "endpoint": "chat/completions", "headers": own,
         "query": {**BODY, "messages": [{"role": "user", "content": "FAIL500"}]}},
        {"provider": "anthropic", "endpoint": "v1/messages", "headers": own,
         "query": {**BODY, "messages": [{"role": "user", "content": "FAIL500"}]}},
        {"provider": "compat", "endpoint": "chat/completions", "headers": own,
         "query": {**BODY, "model": "groq/llama-3.1-8b-instant"}},
    ]
    r = httpx.post(f"{authed.url}/", json=steps, headers=GATEWAY_HEADERS)
    assert (r.status_code, r.headers.get("cf-aig-step")) == (200, "2"), r.text
    sent = recorder.take()
    assert len(sent) == 3, [s["path"] for s in sent]
    assert_nothing_of_the_gateways_went(sent)
    assert [s["headers"].get("x-step-own") for s in sent[:2]] == ["kept", "kept"]


# --- A bad value is refused whatever the gateway's settings and the route ---------------------

# Failed at b53322e (mended since): a malformed cf-aig-collect-log-payload is let through (200) unless the gateway logs payloads and the request does not say cf-aig-collect-log: false (telemetry.rs LogOptions::from_headers reads it only then), while a payload-logging gateway refuses the same request 400/2100: one app's request passes in one cluster and fails in the next
def test_a_malformed_collect_log_payload_is_refused_whatever_the_gateway_logs(gateway, mock):
    for headers in [{"cf-aig-collect-log-payload": "maybe"},
                    {"cf-aig-collect-log": "false", "cf-aig-collect-log-payload": "maybe"}]:
        r = httpx.post(gateway.url + CHAT, json=BODY, headers=headers)
        refused_for(r, "cf-aig-collect-log-payload")
    assert mock.requests() == []


# Failed at b53322e (mended since): a bad value in a former header name (cf-cache-ttl, cf-skip-cache, which Cloudflare still honours) is refused naming cf-aig-cache-ttl / cf-aig-skip-cache, headers the client never sent (cache.rs want, headers.rs GatewayHeaders::flag name the current header)
def test_a_bad_former_header_name_is_refused_naming_the_header_sent(gateway, mock):
    for name, bad in [("cf-cache-ttl", "soon"), ("cf-skip-cache", "yes")]:
        r = httpx.post(gateway.url + CHAT, json=BODY, headers={name: bad})
        refused_for(r, f"header {name}:")
    assert mock.requests() == []


UPGRADE = {"connection": "Upgrade", "upgrade": "websocket",
           "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13"}


# Failed at b53322e (mended since): a WebSocket upgrade with a malformed cf-aig-cache-ttl / cf-aig-skip-cache / cf-aig-max-attempts / cf-aig-retry-delay / cf-aig-backoff goes to the provider (proxy.rs checks cache::want and retries only `(!upgrade)`), while the same header on every other request, and a bad cf-aig-metadata or cf-aig-request-timeout on the upgrade, is 400/2100 ("the upgrade is admitted like any request")
def test_a_websocket_upgrade_with_a_malformed_gateway_header_is_refused_like_any_request(gateway, mock):
    url = gateway.url + "/openai/realtime?model=gpt-4o-realtime-preview"
    # Checked on an upgrade as on any request:
    for name, bad in [("cf-aig-metadata", "nope"), ("cf-aig-request-timeout", "soon")]:
        refused_for(httpx.get(url, headers={**UPGRADE, name: bad}), name)
    assert mock.requests() == []
    for name, bad in [("cf-aig-cache-ttl", "soon"), ("cf-aig-skip-cache", "maybe"), ("cf-aig-max-attempts", "9"),
                      ("cf-aig-retry-delay", "-1"), ("cf-aig-backoff", "quadratic")]:
        # Refused on a plain request...
        refused_for(httpx.post(gateway.url + CHAT, json=BODY, headers={name: bad}), name)
        # ...and on an upgrade, before the provider is asked.
        r = httpx.get(url, headers={**UPGRADE, name: bad})
        refused_for(r, name)
        assert mock.requests() == [], name


# --- cf-aig-event-id: what a universal step's own says ------------------------------------------

@pytest.fixture
def stepped(mock, tmp_path, refusing_port):
    """Cache on, and a custom provider whose address refuses connections."""
    extra = (f"    custom-dead: {{baseURL: '{refusing_port.url}/v1'}}\n"
             "  cache: {enabled: true, ttl: 10m}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def universal(g, steps, **headers):
    return httpx.post(g.url + "/", json=steps, headers=headers)


# Failed at b53322e (mended since): a universal step's own cf-aig-event-id (which overrides the request's: its log line says event_id=<step's>) is echoed when the provider answers, but a cache hit of that step echoes the request's event id, or none (proxy.rs cache_lookup tags the hit with the universal request's `parts` headers), and so does the gateway's own error at that step (universal.rs `gw.refuse(snap, parts, ...)`)
def test_a_universal_steps_own_event_id_is_echoed_on_every_answer_that_step_gives(stepped, mock):
    served = [{"provider": "openai", "endpoint": "chat/completions", "headers": {"cf-aig-event-id": "step-ev"},
               "query": {**BODY, "messages": [{"role": "user", "content": "event ids"}]}}]
    miss = universal(stepped, served, **{"cf-aig-event-id": "req-ev"})
    assert (miss.status_code, miss.headers["cf-aig-cache-status"]) == (200, "MISS"), miss.text
    assert miss.headers["cf-aig-event-id"] == "step-ev"
    assert " event_id=step-ev" in stepped.wait_log_line(miss.headers["cf-aig-log-id"])
    hit = universal(stepped, served, **{"cf-aig-event-id": "req-ev"})
    assert (hit.status_code, hit.headers["cf-aig-cache-status"]) == (200, "HIT"), hit.text
    # Its log line says the step's...
    assert " event_id=step-ev" in stepped.wait_log_line(hit.headers["cf-aig-log-id"])
    # ...and so must its answer.
    assert hit.headers.get("cf-aig-event-id") == "step-ev", dict(hit.headers)
    bare = universal(stepped, served)
    assert bare.headers["cf-aig-cache-status"] == "HIT"
    assert bare.headers.get("cf-aig-event-id") == "step-ev", dict(bare.headers)
    # The gateway's own error at that step (its provider refuses the connection).
    dead = [{**served[0], "provider": "custom-dead"}]
    failed = universal(stepped, dead, **{"cf-aig-event-id": "req-ev"})
    assert (failed.status_code, failed.json()["error"][0]["code"]) == (502, 2104), failed.text
    assert failed.headers.get("cf-aig-event-id") == "step-ev", dict(failed.headers)


# --- An upstream's own cf-aig-* response headers never pass for the gateway's ----------------

UPSTREAM_OWN = [("cf-aig-event-id", "upstream-ev"), ("cf-aig-log-id", "upstream-id"), ("cf-aig-step", "7"),
                ("cf-aig-cache-status", "HIT"), ("cf-aig-dlp", "[]"), ("cf-aig-provider", "evil"),
                ("cf-aig-model", "evil-model"), ("CF-AIG-Custom", "x")]


def test_an_upstreams_own_gateway_headers_pass_neither_compat_nor_a_step_nor_an_error(mock, tmp_path):
    ok = FixedAnswerServer(
        b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}',
        headers=UPSTREAM_OWN)
    failing = FixedAnswerServer(b'{"error":{"message":"down","type":"server_error"}}', status=500,
                                headers=UPSTREAM_OWN)
    extra = (f"    custom-gw: {{baseURL: '{ok.url}/v1'}}\n"
             f"    custom-down: {{baseURL: '{failing.url}/v1'}}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), DEFAULT_KEYS)
    try:
        step = {"provider": "custom-gw", "endpoint": "chat/completions", "headers": {}, "query": BODY}
        answers = {
            "provider route": httpx.post(g.url + "/custom-gw/chat/completions", json=BODY),
            "compat": httpx.post(g.url + "/compat/chat/completions", json={**BODY, "model": "custom-gw/gpt-4o-mini"}),
            "universal": httpx.post(g.url + "/", json=[step]),
            "compat step": httpx.post(g.url + "/", json=[{**step, "provider": "compat",
                                                            "query": {**BODY, "model": "custom-gw/gpt-4o-mini"}}]),
            "provider error": httpx.post(g.url + "/custom-down/chat/completions", json=BODY),
            "universal error": httpx.post(g.url + "/", json=[{**step, "provider": "custom-down"}]),
        }
        for what, r in answers.items():
            assert r.status_code in (200, 500), (what, r.status_code, r.text)
            assert "cf-aig-event-id" not in r.headers, (what, dict(r.headers))
            assert r.headers["cf-aig-log-id"] != "upstream-id", what
            for name in ("cf-aig-cache-status", "cf-aig-dlp", "cf-aig-custom"):
                assert name not in r.headers, (what, name, dict(r.headers))
            assert r.headers.get("cf-aig-step") in (None, "0"), (what, dict(r.headers))
            assert "evil" not in r.headers.get("cf-aig-provider", "") + r.headers.get("cf-aig-model", ""), what
        # The client's own event id is the one echoed.
        r = httpx.post(g.url + "/compat/chat/completions", json={**BODY, "model": "custom-gw/gpt-4o-mini"},
                       headers={"cf-aig-event-id": "mine"})
        assert r.headers["cf-aig-event-id"] == "mine"
    finally:
        g.stop()
        ok.stop()
        failing.stop()
