"""Security edges found in review (HEAD 4501507), on loopback upstreams that record every byte.

Tests marked `# FAILS at 4501507` reproduce a confirmed bug; the others are attacks the gateway
stops today, kept as a regression suite:

- a custom provider's own key header (`authHeader`) is not among the headers the gateway treats
  as "a client key": a routed /compat cache entry made with one such key is served to another
  (or to none), the header follows a fallback to another provider, and the gateway token in it
  goes upstream; so does the gateway token in Google's `?key=`;
- a refused universal step quotes its endpoint's query, a key in it, into the error and the log;
- what stays stopped: URL steering through the path, the Host, absolute-form targets and step
  endpoints; cf-aig-authorization edge values; a Connection header naming the injected key's
  header; upstream redirects; the admin port.
"""

import json
import threading

import httpx
import pytest

from conftest import KEY_MARKER, Sidegate
from rawhttp import Listener, read_request

TOKEN = f"gw-{KEY_MARKER}-token"
OPENAI_KEY = f"sk-{KEY_MARKER}-openai-edges"
MESSAGES = [{"role": "user", "content": "hi"}]


def completion(text):
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def header_of(head, name):
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None


class Upstream:
    """A loopback upstream that records each request head (text) and body and answers it with
    `answer(head) -> (status line, body)`."""

    def __init__(self, answer=None):
        self.answer = answer or (lambda head: ("200 OK", completion("ok")))
        self.seen = []
        self.lock = threading.Lock()
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, _index):
        conn.settimeout(10)
        buf = b""
        try:
            while True:
                got = read_request(conn, buf)
                if got is None:
                    return
                head, body, buf = got
                head = head.decode("latin-1")
                with self.lock:
                    self.seen.append((head, body))
                status, out = self.answer(head)
                conn.sendall(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(out)}\r\n\r\n".encode() + out)
        except OSError:
            pass
        finally:
            conn.close()

    def heads(self):
        with self.lock:
            return [h for h, _ in self.seen]

    def close(self):
        self.listener.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def config(spec, name="main"):
    return f"schemaVersion: 1\ngateway: {{namespace: team-a, name: {name}}}\nspec:\n{spec}"


@pytest.fixture
def start(tmp_path):
    started = []

    def run(spec, keys=None):
        d = tmp_path / f"g{len(started)}"
        d.mkdir()
        g = Sidegate(d, config(spec), keys or {})
        started.append(g)
        return g

    yield run
    for g in started:
        g.stop()


def error(r):
    return r.status_code, r.json()["error"][0]["code"]


# --- a custom provider's own key header ----------------------------------------------------------

# FAILS at 4501507: a routed /compat cache key hashes only the built-in key headers, not a custom provider's authHeader
def test_a_routed_compat_answer_is_never_served_to_another_custom_provider_key(start):
    """A dynamic route (or fallback chain) to a custom provider without a stored key forwards the
    app's own key in the provider's `authHeader`. The cache must keep clients with different keys
    apart, as it does on the provider's own route and for a plain `custom-x/model`."""
    own = Upstream(lambda head: ("200 OK", completion(f"made with {header_of(head, 'x-custom-key')}")))
    try:
        g = start(
            "  cache: {enabled: true, ttl: 10m}\n"
            "  providers:\n"
            f"    custom-own: {{baseURL: '{own.url}/v1', authHeader: x-custom-key}}\n"
            "  routes:\n"
            "    - name: local\n"
            "      nodes:\n"
            "        - {id: s, type: start, next: m}\n"
            "        - {id: m, type: model, provider: custom-own, model: mm, next: e}\n"
            "        - {id: e, type: end}\n")
        url = g.url + "/compat/chat/completions"
        # Contrast: a plain model of the same provider keeps keys apart.
        plain = {"model": "custom-own/mm", "messages": MESSAGES}
        for who in ("alice-key", "bob-key"):
            r = httpx.post(url, json=plain, headers={"x-custom-key": who})
            assert r.headers["cf-aig-cache-status"] == "MISS", who
            assert r.json()["choices"][0]["message"]["content"] == f"made with {who}"
        routed = {"model": "dynamic/local", "messages": MESSAGES}
        r = httpx.post(url, json=routed, headers={"x-custom-key": "alice-key"})
        assert r.status_code == 200 and r.headers["cf-aig-cache-status"] == "MISS", r.text
        for other in ({"x-custom-key": "bob-key"}, {}):
            r = httpx.post(url, json=routed, headers=other)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] != "made with alice-key", (
                f"{other or 'no key'} got the answer made with alice's key from the cache")
    finally:
        own.close()


def test_a_routed_compat_answer_is_never_served_to_another_bearer_key(start, upstream):
    """The same with the key in `Authorization` (a built-in key header): entries stay apart."""
    g = start(
        "  cache: {enabled: true, ttl: 10m}\n"
        "  providers:\n"
        f"    groq: {{baseURL: '{upstream.url}/openai/v1'}}\n"
        "  fallbacks:\n"
        "    - name: chain\n"
        "      targets: [{provider: groq, model: llama-3.1-8b}]\n")
    body = {"model": "fallback/chain", "messages": MESSAGES}
    statuses = [httpx.post(g.url + "/compat/chat/completions", json=body,
                           headers={"authorization": f"Bearer {who}"}).headers["cf-aig-cache-status"]
                for who in ("alice", "bob", "alice")]
    assert statuses == ["MISS", "MISS", "HIT"]


# FAILS at 4501507: on fallback, a custom provider's key header (its authHeader) is forwarded to the next, public provider
def test_a_custom_providers_key_does_not_follow_a_fallback_to_another_provider(start):
    down = Upstream(lambda head: ("503 Service Unavailable", b"{}"))
    public = Upstream()
    try:
        g = start(
            "  providers:\n"
            f"    custom-own: {{baseURL: '{down.url}/v1', authHeader: x-custom-key}}\n"
            f"    openai: {{baseURL: '{public.url}/v1'}}\n"
            "  fallbacks:\n"
            "    - name: chain\n"
            "      targets: [{provider: custom-own, model: local}, {provider: openai, model: gpt-4o-mini}]\n",
            {"openai.default": OPENAI_KEY})
        r = httpx.post(g.url + "/compat/chat/completions", json={"model": "fallback/chain", "messages": MESSAGES},
                       headers={"x-custom-key": "self-hosted-secret"})
        assert r.status_code == 200 and r.headers["cf-aig-provider"] == "openai", r.text
        assert header_of(down.heads()[-1], "x-custom-key") == "self-hosted-secret"
        sent = public.heads()[-1]
        assert header_of(sent, "authorization") == f"Bearer {OPENAI_KEY}"
        assert "self-hosted-secret" not in sent, "the custom provider's key reached api.openai.com's stand-in"
    finally:
        down.close()
        public.close()


def authed(start, upstream, keys=None):
    return start(
        "  authentication: {enabled: true}\n"
        "  providers:\n"
        f"    custom-own: {{baseURL: '{upstream.url}/v1', authHeader: x-custom-key}}\n"
        f"    google-ai-studio: {{baseURL: '{upstream.url}'}}\n"
        f"    groq: {{baseURL: '{upstream.url}/openai/v1'}}\n",
        {"authentication.tokens": TOKEN, **(keys or {})})


AUTH = {"cf-aig-authorization": f"Bearer {TOKEN}"}


def test_the_gateway_token_in_a_builtin_key_header_is_refused_without_a_stored_key(start, upstream):
    g = authed(start, upstream)
    r = httpx.post(g.url + "/groq/chat/completions", json={"model": "m", "messages": MESSAGES},
                   headers={**AUTH, "authorization": f"Bearer {TOKEN}"})
    assert error(r) == (401, 2009)
    assert upstream.heads() == []


# FAILS at 4501507: token_in_key_header looks only at the built-in key headers, not a custom provider's authHeader
@pytest.mark.parametrize("way", ["provider route", "compat", "universal step"])
def test_the_gateway_token_never_goes_upstream_in_a_custom_providers_key_header(start, upstream, way):
    g = authed(start, upstream)
    chat = {"model": "mm", "messages": MESSAGES}
    if way == "provider route":
        r = httpx.post(g.url + "/custom-own/chat/completions", json=chat, headers={**AUTH, "x-custom-key": TOKEN})
    elif way == "compat":
        r = httpx.post(g.url + "/compat/chat/completions", json={**chat, "model": "custom-own/mm"},
                       headers={**AUTH, "x-custom-key": TOKEN})
    else:
        step = {"provider": "custom-own", "endpoint": "chat/completions", "headers": {"x-custom-key": TOKEN},
                "query": chat}
        r = httpx.post(g.url + "/", json=[step], headers=AUTH)
    assert all(TOKEN not in h for h in upstream.heads()), "the gateway token went upstream as the client's key"
    assert error(r) == (401, 2009)


# FAILS at 4501507: the gateway token in Google's `?key=` goes upstream when no stored key replaces it
def test_the_gateway_token_never_goes_upstream_as_googles_key_parameter(start, upstream):
    g = authed(start, upstream)
    path = "/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent"
    r = httpx.post(g.url + path + f"?key={TOKEN}", json={"contents": []}, headers=AUTH)
    assert all(TOKEN not in h for h in upstream.heads()), "the gateway token went to Google in the query"
    assert error(r) == (401, 2009)


def test_a_stored_google_key_replaces_the_key_parameter(start, upstream):
    g = authed(start, upstream, {"google-ai-studio.default": f"AIza-{KEY_MARKER}-stored"})
    path = "/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent"
    r = httpx.post(g.url + path + f"?key={TOKEN}&alt=sse", json={"contents": []}, headers=AUTH)
    assert r.status_code == 200, r.text
    head = upstream.heads()[-1]
    assert head.startswith("POST /v1beta/models/gemini-2.5-flash:generateContent?alt=sse HTTP/1.1"), head
    assert TOKEN not in head and header_of(head, "x-goog-api-key") == f"AIza-{KEY_MARKER}-stored"


# --- keys quoted back ------------------------------------------------------------------------------

# FAILS at 4501507: a refused step endpoint is quoted with its query, a key in it too, into the error and the log line
def test_a_refused_step_endpoint_does_not_quote_a_key_from_its_query(start, upstream):
    g = start(f"  providers:\n    google-ai-studio: {{baseURL: '{upstream.url}'}}\n")
    key = f"AIza-{KEY_MARKER}-own"
    step = {"provider": "google-ai-studio", "endpoint": f"m:generateContent?key={key}#frag",
            "query": {"contents": []}}
    r = httpx.post(g.url + "/", json=[step])
    assert error(r) == (400, 2108)
    assert upstream.heads() == []
    assert "steps[0].endpoint" in r.text
    assert key not in r.text, r.text
    g.wait_log_line(r.headers["cf-aig-log-id"])
    assert key not in g.logs()


# --- URL steering: stopped -------------------------------------------------------------------------

STEERING = [
    "/openai/..%2f..%2fadmin",
    "/openai/v1/%2e%2e/%2E%2e/x",
    "/openai/..%5cx",
    "/openai/a/..\\..\\x",
    "/azure-openai/evil.example/dep/chat/completions?api-version=1",
    "/azure-openai/evil.example%2f/dep/chat/completions",
    "/azure-openai/res@evil.example/dep/chat/completions",
    # A deployment in the template's path is a path segment (dots allowed: `gpt-4.1`), never
    # `..` or anything past letters, digits, `-`, `_` and `.`.
    "/azure-openai/res/dep@evil/chat/completions",
    "/azure-openai/res/%2e%2e/chat/completions",
    "/aws-bedrock/bedrock-runtime/us-east-1@evil.example/model/m/converse",
    "/aws-bedrock/bedrock-runtime/evil.example%23/model/m/converse",
    "/google-vertex-ai/v1/projects/p/locations/evil.example/publishers/google/models/g:generateContent",
    "/google-vertex-ai/v1/projects/p/locations/a%2fb/publishers/google/models/g:generateContent",
    "/v1/evil.example/main/workers-ai/@cf/meta/llama",
    "/v1/acct%2f..%2f/main/workers-ai/@cf/meta/llama",
]


@pytest.fixture
def templated(start, upstream):
    """Providers whose upstream host takes a part of the request, pointed at loopback templates."""
    return start(
        "  providers:\n"
        f"    openai: {{baseURL: '{upstream.url}/v1'}}\n"
        f"    azure-openai: {{baseURL: '{upstream.url}/{{resource}}/openai/deployments/{{deployment}}'}}\n"
        f"    aws-bedrock: {{baseURL: '{upstream.url}/{{region}}'}}\n"
        f"    google-vertex-ai: {{baseURL: '{upstream.url}/{{region}}'}}\n"
        f"    workers-ai: {{baseURL: '{upstream.url}/accounts/{{account}}/ai'}}\n",
        {"openai.default": OPENAI_KEY, "azure-openai.default": f"az-{KEY_MARKER}",
         "google-vertex-ai.default": f"ya29-{KEY_MARKER}", "workers-ai.default": f"cf-{KEY_MARKER}"})


def test_request_paths_cannot_steer_a_stored_key(templated, upstream):
    for path in STEERING:
        r = httpx.post(templated.url + path, json={"messages": MESSAGES})
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
    assert upstream.heads() == [], "a steering path reached an upstream"
    # The same routes with well-formed parts go where their templates say.
    r = httpx.post(templated.url + "/azure-openai/res/dep/chat/completions?api-version=1", json={})
    assert r.status_code == 200, r.text
    assert upstream.heads()[-1].startswith("POST /res/openai/deployments/dep/chat/completions?api-version=1 ")


def test_the_host_and_an_absolute_target_cannot_name_another_server(templated, upstream):
    port = templated.port
    for target, host in [
        ("http://evil.example/openai/chat/completions", f"127.0.0.1:{port}"),
        ("http://127.0.0.1@evil.example/openai/chat/completions", f"127.0.0.1:{port}"),
        ("/openai/chat/completions", "evil.example"),
        ("/openai/chat/completions", f"127.0.0.1.evil.example:{port}"),
        ("/openai/chat/completions", f"localhost.evil.example:{port}"),
    ]:
        out = raw_request(port, f"POST {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 2\r\n"
                                "connection: close\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 403 "), (target, host, out[:200])
    assert upstream.heads() == []
    # The upstream's Host is its own, whatever the client's said.
    out = raw_request(port, f"POST http://127.0.0.1:{port}/openai/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                            "content-length: 2\r\nconnection: close\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    head = upstream.heads()[-1]
    assert head.startswith("POST /v1/chat/completions HTTP/1.1")
    assert header_of(head, "host") == upstream.url.removeprefix("http://")


@pytest.mark.parametrize("endpoint", [
    "//evil.example/x", "@evil.example/x", "../x", "%2e%2e/x", "a/%2E%2E%2fb", "chat?x=1#y", "ch\\at",
])
def test_a_step_endpoint_cannot_leave_its_providers_base(templated, upstream, endpoint):
    step = {"provider": "openai", "endpoint": endpoint, "query": {"model": "m", "messages": MESSAGES}}
    r = httpx.post(templated.url + "/", json=[step])
    for head in upstream.heads():
        assert head.split(" ")[1].startswith("/v1/"), head
        assert header_of(head, "host") == upstream.url.removeprefix("http://")
    if r.status_code != 200:
        assert error(r) == (400, 2108), r.text
        assert upstream.heads() == []


# --- gateway authentication edges: stopped -------------------------------------------------------

@pytest.mark.parametrize("headers", [
    [("cf-aig-authorization", "")],
    [("cf-aig-authorization", "Bearer")],
    [("cf-aig-authorization", TOKEN)],
    [("cf-aig-authorization", f"Basic {TOKEN}")],
    [("cf-aig-authorization", f"Bearer {TOKEN}x")],
    [("cf-aig-authorization", f"Bearer {TOKEN[:-1]}")],
    [("CF-AIG-AUTHORIZATION", f"Bearer {TOKEN}"), ("cf-aig-authorization", "Bearer other")],
    [("cf-aig-authorization", f"Bearer {TOKEN}"), ("Cf-Aig-Authorization", f"Bearer {TOKEN}")],
    [("cf-aig-authorization", "Bearer other"), ("authorization", f"Bearer {TOKEN}")],
    [("x-api-key", "not-the-token")],
])
def test_gateway_token_edge_values_are_refused(start, upstream, headers):
    g = start("  authentication: {enabled: true}\n  providers:\n"
              f"    openai: {{baseURL: '{upstream.url}/v1'}}\n",
              {"authentication.tokens": TOKEN, "openai.default": OPENAI_KEY})
    r = httpx.post(g.url + "/openai/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=headers)
    assert error(r) == (401, 2009), r.text
    r = httpx.get(g.url + "/openai/models", headers=headers)
    assert error(r) == (401, 2009), r.text
    assert upstream.heads() == []


def test_the_admin_port_proxies_nothing(start, upstream):
    g = start(f"  providers:\n    openai: {{baseURL: '{upstream.url}/v1'}}\n", {"openai.default": OPENAI_KEY})
    for path in ("/openai/chat/completions", "/compat/chat/completions", "/"):
        r = httpx.post(g.admin + path, json={"model": "openai/m", "messages": MESSAGES})
        assert r.status_code == 404, (path, r.status_code)
        assert OPENAI_KEY not in r.text
    assert upstream.heads() == []


# --- hop-by-hop and redirects: stopped -------------------------------------------------------------

def test_a_connection_header_naming_the_key_header_does_not_remove_the_injected_key(start, upstream):
    g = start(f"  providers:\n    openai: {{baseURL: '{upstream.url}/v1'}}\n"
              f"    anthropic: {{baseURL: '{upstream.url}'}}\n",
              {"openai.default": OPENAI_KEY, "anthropic.default": f"sk-ant-{KEY_MARKER}"})
    for path, name, want in [("/openai/chat/completions", "authorization", f"Bearer {OPENAI_KEY}"),
                             ("/anthropic/v1/messages", "x-api-key", f"sk-ant-{KEY_MARKER}")]:
        out = raw_request(g.port, f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close, {name}\r\n"
                                  f"{name}: placeholder\r\ncontent-length: 2\r\n\r\n{{}}")
        assert out.startswith(b"HTTP/1.1 200 "), out[:300]
        head = upstream.heads()[-1]
        assert header_of(head, name) == want, head
        assert "placeholder" not in head


def test_an_upstream_redirect_is_passed_back_not_followed_with_the_key(start):
    elsewhere = Upstream()
    redirecting = Upstream(lambda head: ("307 Temporary Redirect\r\nlocation: " + elsewhere.url + "/steal", b"{}"))
    try:
        g = start(f"  providers:\n    openai: {{baseURL: '{redirecting.url}/v1'}}\n", {"openai.default": OPENAI_KEY})
        r = httpx.post(g.url + "/openai/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert r.status_code == 307 and r.headers["location"] == elsewhere.url + "/steal"
        assert elsewhere.heads() == []
    finally:
        elsewhere.close()
        redirecting.close()


def raw_request(port, text, timeout=5):
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(text.encode("latin-1"))
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()
