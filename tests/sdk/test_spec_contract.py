"""SPEC.md's wire contract, section by section, against a scripted loopback upstream that
records exactly what the gateway sends: every provider's URL shape and auth header (short and
long form, with query strings), the `cf-aig-*` request headers (bounds, case, stripping), the
response headers, the error envelope and codes, and the universal endpoint.

Tests marked `# FAILS at 9f8bb62` reproduce deviations from SPEC.md; the others hold and are
kept as a regression suite. Loopback only; one gateway and one upstream per module."""

import http.server
import json
import threading

import httpx
import pytest

from conftest import KEY_MARKER, Sidegate

PROVIDERS_WITH_KEYS = [
    "openai", "anthropic", "azure-openai", "google-ai-studio", "groq", "mistral", "cohere",
    "deepseek", "grok", "perplexity-ai", "openrouter", "huggingface", "workers-ai",
]


def key(provider):
    return f"{KEY_MARKER}-{provider}"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
OK_BODY = json.dumps({
    "id": "x", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
}).encode()


class Recorder:
    """A loopback upstream recording every request (method, path with query, headers, body).
    It answers 500 when the body holds FAIL500, else 200 with an OpenAI chat completion."""

    def __init__(self):
        self.requests = []
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _do(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                rec.requests.append({
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                })
                status = 500 if b"FAIL500" in body else 200
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(OK_BODY)))
                self.end_headers()
                self.wfile.write(OK_BODY)

            do_GET = do_POST = do_PUT = do_DELETE = _do

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self):
        got, self.requests = self.requests, []
        return got

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def config(r, extra=""):
    return f"""schemaVersion: 1
gateway: {{namespace: team-a, name: main}}
spec:
{extra}  providers:
    openai: {{baseURL: '{r}/v1'}}
    anthropic: {{baseURL: '{r}'}}
    azure-openai: {{baseURL: '{r}/az/{{resource}}/openai/deployments/{{deployment}}'}}
    aws-bedrock: {{baseURL: '{r}/bedrock/{{region}}'}}
    google-ai-studio: {{baseURL: '{r}'}}
    google-vertex-ai: {{baseURL: '{r}/vertex/{{region}}'}}
    groq: {{baseURL: '{r}/openai/v1'}}
    mistral: {{baseURL: '{r}'}}
    cohere: {{baseURL: '{r}'}}
    deepseek: {{baseURL: '{r}'}}
    grok: {{baseURL: '{r}'}}
    perplexity-ai: {{baseURL: '{r}'}}
    openrouter: {{baseURL: '{r}/api'}}
    huggingface: {{baseURL: '{r}'}}
    workers-ai: {{baseURL: '{r}/client/v4/accounts/{{account}}/ai'}}
    custom-local: {{baseURL: '{r}/custom', authHeader: x-custom-key}}
"""


KEYS = {f"{p}.default": key(p) for p in PROVIDERS_WITH_KEYS}
KEYS["openai.team-b"] = key("openai-b")
KEYS["custom-local.default"] = key("custom-local")


@pytest.fixture(scope="module")
def upstream():
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    g = Sidegate(tmp_path_factory.mktemp("spec"), config(upstream.url), KEYS,
                 extra_args=["--log-format", "json"])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def cached_gw(upstream, tmp_path_factory):
    g = Sidegate(tmp_path_factory.mktemp("spec-cache"), config(upstream.url, "  cache: {enabled: true}\n"), KEYS)
    yield g
    g.stop()


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


def envelope(r):
    body = r.json()
    assert set(body) == {"success", "result", "messages", "error"}, body
    assert body["success"] is False and body["result"] == [] and body["messages"] == [], body
    assert isinstance(body["error"], list) and len(body["error"]) == 1, body
    return r.status_code, body["error"][0]["code"]


def only(upstream):
    got = upstream.take()
    assert len(got) == 1, got
    return got[0]


# --- Addresses: providers, upstream bases, auth headers (SPEC.md "Addresses") ----------------

URL_SHAPES = [
    # (client path after the provider, upstream path at the recorder, auth header, auth value)
    ("openai", "chat/completions?foo=1", "/v1/chat/completions?foo=1", "authorization", f"Bearer {key('openai')}"),
    ("anthropic", "v1/messages", "/v1/messages", "x-api-key", key("anthropic")),
    ("azure-openai", "res1/dep1/chat/completions?api-version=2024-02-01",
     "/az/res1/openai/deployments/dep1/chat/completions?api-version=2024-02-01", "api-key", key("azure-openai")),
    ("google-ai-studio", "v1beta/models/gemini-2.5-flash:generateContent",
     "/v1beta/models/gemini-2.5-flash:generateContent", "x-goog-api-key", key("google-ai-studio")),
    ("groq", "chat/completions", "/openai/v1/chat/completions", "authorization", f"Bearer {key('groq')}"),
    ("mistral", "v1/chat/completions", "/v1/chat/completions", "authorization", f"Bearer {key('mistral')}"),
    ("cohere", "v2/chat", "/v2/chat", "authorization", f"Bearer {key('cohere')}"),
    ("deepseek", "chat/completions", "/chat/completions", "authorization", f"Bearer {key('deepseek')}"),
    ("grok", "v1/chat/completions", "/v1/chat/completions", "authorization", f"Bearer {key('grok')}"),
    ("perplexity-ai", "chat/completions", "/chat/completions", "authorization", f"Bearer {key('perplexity-ai')}"),
    ("openrouter", "v1/chat/completions", "/api/v1/chat/completions", "authorization", f"Bearer {key('openrouter')}"),
    ("huggingface", "bigcode/starcoder", "/models/bigcode/starcoder", "authorization", f"Bearer {key('huggingface')}"),
    ("custom-local", "chat/completions", "/custom/chat/completions", "x-custom-key", key("custom-local")),
]


@pytest.mark.parametrize("form", ["short", "long"])
@pytest.mark.parametrize("provider,rest,upstream_path,auth,value", URL_SHAPES, ids=[s[0] for s in URL_SHAPES])
def test_each_provider_gets_its_url_shape_and_stored_key(gw, upstream, client, form, provider, rest, upstream_path, auth, value):
    prefix = "" if form == "short" else "/v1/acct-1/main"
    upstream.take()
    r = client.post(f"{gw.url}{prefix}/{provider}/{rest}", json=CHAT,
                    headers={"authorization": "Bearer placeholder", "x-api-key": "placeholder"})
    assert r.status_code == 200, r.text
    got = only(upstream)
    assert got["path"] == upstream_path
    assert got["headers"][auth] == value
    assert json.loads(got["body"]) == CHAT


def test_workers_ai_takes_the_long_form_account_and_adds_run(gw, upstream, client):
    upstream.take()
    r = client.post(f"{gw.url}/v1/acc9/main/workers-ai/@cf/meta/llama-3.1-8b-instruct", json=CHAT)
    assert r.status_code == 200, r.text
    got = only(upstream)
    assert got["path"] == "/client/v4/accounts/acc9/ai/run/@cf/meta/llama-3.1-8b-instruct"
    assert got["headers"]["authorization"] == f"Bearer {key('workers-ai')}"


def test_vertex_and_bedrock_without_stored_credentials_forward_the_clients_auth(gw, upstream, client):
    upstream.take()
    r = client.post(f"{gw.url}/google-vertex-ai/v1/projects/p/locations/us-east1/publishers/google/models/g:generateContent",
                    json=CHAT, headers={"authorization": "Bearer own-token"})
    assert r.status_code == 200
    got = only(upstream)
    assert got["path"] == "/vertex/us-east1/v1/projects/p/locations/us-east1/publishers/google/models/g:generateContent"
    assert got["headers"]["authorization"] == "Bearer own-token"
    r = client.post(f"{gw.url}/aws-bedrock/bedrock-runtime/us-east-1/model/m/converse", json=CHAT,
                    headers={"authorization": "AWS4-HMAC-SHA256 Credential=x"})
    assert r.status_code == 200
    got = only(upstream)
    assert got["path"] == "/bedrock/us-east-1/model/m/converse"
    assert got["headers"]["authorization"] == "AWS4-HMAC-SHA256 Credential=x"


def test_google_key_parameter_goes_when_the_stored_key_replaces_it(gw, upstream, client):
    upstream.take()
    r = client.post(f"{gw.url}/google-ai-studio/v1beta/models/g:streamGenerateContent?key=client&alt=sse", json=CHAT)
    assert r.status_code == 200
    got = only(upstream)
    assert got["path"] == "/v1beta/models/g:streamGenerateContent?alt=sse"
    assert got["headers"]["x-goog-api-key"] == key("google-ai-studio")


def test_anthropic_version_is_added_when_absent_and_kept_when_sent(gw, upstream, client):
    upstream.take()
    client.post(f"{gw.url}/anthropic/v1/messages", json=CHAT)
    assert only(upstream)["headers"]["anthropic-version"] == "2023-06-01"
    client.post(f"{gw.url}/anthropic/v1/messages", json=CHAT, headers={"anthropic-version": "2024-01-01"})
    assert only(upstream)["headers"]["anthropic-version"] == "2024-01-01"


@pytest.mark.parametrize("path", [
    "/v1/acct/other/openai/chat/completions",
    "/v1/acct/other/compat/chat/completions",
    "/v1/acct/other",
    "/nope/chat/completions",
])
def test_another_gateway_id_or_unknown_provider_is_404_2001(gw, upstream, client, path):
    upstream.take()
    r = client.post(gw.url + path, json=CHAT)
    assert envelope(r) == (404, 2001)
    assert "cf-aig-log-id" in r.headers
    assert upstream.take() == []


# FAILS at 9f8bb62: SPEC "Errors made by the gateway": "gateway not found / bad route | 404 | 2001" — malformed provider routes get 400/2106
@pytest.mark.parametrize("path", [
    "/azure-openai/only-resource",
    "/aws-bedrock/us-east-1/model/m/converse",
    "/google-vertex-ai/v1/projects/p/publishers/google/models/g:generateContent",
])
def test_a_provider_route_in_the_wrong_shape_is_a_bad_route_404_2001(gw, upstream, client, path):
    upstream.take()
    r = client.post(gw.url + path, json=CHAT)
    assert envelope(r) == (404, 2001), r.text
    assert upstream.take() == []


# --- Request headers (SPEC.md "Request headers") -----------------------------------------------

def test_no_cf_aig_header_goes_upstream_and_other_headers_do(gw, upstream, client):
    upstream.take()
    r = client.post(f"{gw.url}/openai/chat/completions", json=CHAT, headers={
        "cf-aig-metadata": '{"a": 1}', "CF-AIG-EVENT-ID": "ev", "cf-aig-whatever": "1",
        "cf-aig-authorization": "Bearer t", "cf-aig-skip-cache": "true", "cf-skip-cache": "true",
        "cf-cache-ttl": "100", "openai-organization": "org-1", "x-custom": "kept",
    })
    assert r.status_code == 200
    sent = only(upstream)["headers"]
    assert not [h for h in sent if h.startswith("cf-aig-") or h in ("cf-skip-cache", "cf-cache-ttl")], sent
    assert sent["openai-organization"] == "org-1" and sent["x-custom"] == "kept"


@pytest.mark.parametrize("name,value,ok", [
    ("cf-aig-cache-ttl", "59", False), ("cf-aig-cache-ttl", "60", True),
    ("cf-aig-cache-ttl", "2592000", True), ("cf-aig-cache-ttl", "2592001", False),
    ("cf-aig-max-attempts", "5", True), ("cf-aig-max-attempts", "6", False),
    ("cf-aig-retry-delay", "5000", True), ("cf-aig-retry-delay", "5001", False),
    ("cf-aig-backoff", "exponential", True), ("cf-aig-backoff", "quadratic", False),
    ("cf-aig-metadata", '{"a":{"b":1}}', False), ("cf-aig-metadata", '{"a":1,"b":"x","c":true}', True),
    ("cf-aig-custom-cost", '{"total_cost":0.5}', True), ("cf-aig-custom-cost", "cheap", False),
    ("cf-aig-request-timeout", "soon", False),
])
def test_gateway_header_bounds(gw, upstream, client, name, value, ok):
    upstream.take()
    r = client.post(f"{gw.url}/openai/chat/completions?bounds={name}", json=CHAT, headers={name: value})
    if ok:
        assert r.status_code == 200, r.text
    else:
        status, code = envelope(r)
        assert status == 400 and code != 2001, r.text
        assert upstream.take() == []


def test_byok_alias_picks_the_key_and_an_unknown_one_is_400_2040(gw, upstream, client):
    upstream.take()
    r = client.post(f"{gw.url}/openai/chat/completions", json=CHAT, headers={"cf-aig-byok-alias": "team-b"})
    assert r.status_code == 200
    assert only(upstream)["headers"]["authorization"] == f"Bearer {key('openai-b')}"
    r = client.post(f"{gw.url}/openai/chat/completions", json=CHAT, headers={"cf-aig-byok-alias": "nope"})
    assert envelope(r) == (400, 2040)
    assert upstream.take() == []


def test_event_id_is_echoed_and_every_answer_has_a_log_id(gw, client):
    r = client.post(f"{gw.url}/openai/chat/completions", json=CHAT, headers={"cf-aig-event-id": "ev-1"})
    assert r.headers["cf-aig-event-id"] == "ev-1" and r.headers["cf-aig-log-id"]
    r = client.post(f"{gw.url}/nope/x", json=CHAT, headers={"cf-aig-event-id": "ev-2"})
    assert r.headers["cf-aig-event-id"] == "ev-2" and r.headers["cf-aig-log-id"]


# --- Caching (SPEC.md "Response headers", "Gateway features") ----------------------------------

def test_cache_status_and_key_selecting_headers(cached_gw, upstream, client):
    url = f"{cached_gw.url}/openai/chat/completions?c=1"
    body = {**CHAT, "messages": [{"role": "user", "content": "cache me"}]}
    upstream.take()
    assert client.post(url, json=body).headers["cf-aig-cache-status"] == "MISS"
    assert client.post(url, json=body).headers["cf-aig-cache-status"] == "HIT"
    assert len(upstream.take()) == 1
    # The alias selects another key: another entry.
    r = client.post(url, json=body, headers={"cf-aig-byok-alias": "team-b"})
    assert r.headers["cf-aig-cache-status"] == "MISS"
    # Another query string is another path.
    r = client.post(url.replace("c=1", "c=2"), json=body)
    assert r.headers["cf-aig-cache-status"] == "MISS"
    r = client.post(url, json=body, headers={"cf-aig-skip-cache": "true"})
    assert r.headers["cf-aig-cache-status"] == "MISS"
    assert len(upstream.take()) == 3


# --- Universal endpoint (SPEC.md "Addresses", universal row) -----------------------------------

def step(provider, endpoint, body=CHAT, **more):
    return {"provider": provider, "endpoint": endpoint, "headers": {}, "query": body, **more}


FAIL = {**CHAT, "messages": [{"role": "user", "content": "FAIL500"}]}


def test_universal_steps_are_tried_in_order_until_one_succeeds(gw, upstream, client):
    upstream.take()
    r = client.post(gw.url + "/", json=[step("openai", "chat/completions", FAIL), step("anthropic", "v1/messages")])
    assert r.status_code == 200
    assert (r.headers["cf-aig-step"], r.headers["cf-aig-provider"]) == ("1", "anthropic")
    assert [q["path"] for q in upstream.take()] == ["/v1/chat/completions", "/v1/messages"]
    r = client.post(gw.url + "/v1/acct/main", json=[step("openai", "chat/completions"), step("anthropic", "v1/messages")])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0")
    assert len(upstream.take()) == 1
    r = client.post(gw.url + "/", json=[step("openai", "chat/completions", FAIL), step("groq", "chat/completions", FAIL)])
    assert (r.status_code, r.headers["cf-aig-step"]) == (500, "1")


def test_universal_step_headers_apply_to_their_step_and_never_go_upstream(gw, upstream, client):
    upstream.take()
    s = step("openai", "chat/completions", headers={"CF-AIG-BYOK-ALIAS": "team-b", "cf-aig-foo": "1", "x-own": "y"})
    r = client.post(gw.url + "/", json=[s], headers={"cf-aig-event-id": "e1"})
    assert r.status_code == 200 and r.headers["cf-aig-event-id"] == "e1"
    sent = only(upstream)["headers"]
    assert sent["authorization"] == f"Bearer {key('openai-b')}" and sent["x-own"] == "y"
    assert not [h for h in sent if h.startswith("cf-aig-")]


def test_universal_workers_ai_step_takes_the_long_form_account(gw, upstream, client):
    upstream.take()
    r = client.post(gw.url + "/v1/acc7/main", json=[step("workers-ai", "@cf/meta/llama")])
    assert r.status_code == 200
    assert only(upstream)["path"] == "/client/v4/accounts/acc7/ai/run/@cf/meta/llama"


# FAILS at 9f8bb62: SPEC "Response headers": `cf-aig-model` is "what actually served a dynamic or fallback request" — an azure-openai step names the body's model, not the deployment that served it (and is logged and priced by it)
def test_a_universal_azure_step_is_served_by_its_deployment(gw, upstream, client):
    body = {**CHAT, "model": "gpt-4o-mini"}
    upstream.take()
    direct = client.post(f"{gw.url}/azure-openai/res/gpt-4o/chat/completions?api-version=1", json=body)
    assert direct.status_code == 200
    direct_line = json.loads(gw.wait_log_line(direct.headers["cf-aig-log-id"]))
    assert direct_line["model"] == "gpt-4o"  # the passthrough route: the deployment decides
    r = client.post(gw.url + "/", json=[step("azure-openai", "res/gpt-4o/chat/completions?api-version=1", body)])
    assert r.status_code == 200
    assert only_paths(upstream) == ["/az/res/openai/deployments/gpt-4o/chat/completions?api-version=1"] * 2
    line = json.loads(gw.wait_log_line(r.headers["cf-aig-log-id"]))
    assert r.headers["cf-aig-model"] == "gpt-4o", r.headers
    assert (line["model"], line["cost"]) == ("gpt-4o", direct_line["cost"]), line


def only_paths(upstream):
    return [q["path"] for q in upstream.take()]
