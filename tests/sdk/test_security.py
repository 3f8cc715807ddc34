"""Security: what a client may not turn off or reach by the headers it sends.

- A client's `Accept-Encoding` goes upstream only under its own SigV4 signature (aws-bedrock
  without stored credentials): anywhere else a compressed answer would pass DLP, guardrails,
  usage counting and the cache unread.
- A compressed request body is refused where the gateway must read it (request DLP, prompt
  guardrails, spend limits and token budgets, /compat, the universal endpoint).
- Web pages get nothing: a request with a browser's marks (Origin, Sec-Fetch-Site) is refused,
  and so is, on a loopback listener, one for a host name other than its address or localhost
  (DNS rebinding).
- `cf-aig-cache-key` names an entry within one provider, route and key identity; request
  headers that change the answer are part of the cache key.
"""

import gzip
import json

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml, wait_ready

CHAT = "/openai/chat/completions"
EMAIL = "jane@example.com"
SSN = "123-45-6789"
CACHE_ON = "  cache: {enabled: true, ttl: 10m}\n"
# What a look-alike of an AWS signature over accept-encoding needs to be: a prefix and a list.
FAKE_SIGV4 = {"authorization": "AWS4-HMAC-SHA256 SignedHeaders=accept-encoding", "accept-encoding": "gzip"}
BEDROCK = "/aws-bedrock/bedrock-runtime/us-west-2/model/anthropic.claude-3-haiku-20240307-v1:0/converse"


def body(text, model="gpt-4o-mini", **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def started(mock, tmp_path, spec="", keys=DEFAULT_KEYS):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), keys)
    mock.clear()
    return g


def dlp(*policies):
    return "  dlp:\n    policies:\n" + "".join(f"      - {p}\n" for p in policies)


def bedrock_provider(mock):
    return f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n"


def signed(signed_headers, encoding):
    """A client's own SigV4 signature (the mock checks its shape, not its value)."""
    return {
        "authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-west-2/bedrock/aws4_request, "
                         f"SignedHeaders={signed_headers}, Signature=aa",
        "x-amz-date": "20260101T000000Z",
        "accept-encoding": encoding,
    }


def error(r):
    return r.status_code, r.json()["error"][0]["code"]


# --- Accept-Encoding -------------------------------------------------------------------------

def test_a_fake_signature_gets_no_compressed_answer_past_response_dlp(mock, tmp_path):
    g = started(mock, tmp_path, dlp("{id: mails, action: BLOCK, check: [RESPONSE], profiles: [email]}"))
    try:
        # Provider route with a stored key: the client's Authorization never goes upstream.
        r = httpx.post(g.url + CHAT, json=body(f"mail {EMAIL}"), headers=FAKE_SIGV4)
        assert error(r) == (400, 2030), r.text
        assert EMAIL not in r.text
        # The universal endpoint's step headers, and /compat, the same.
        step = {"provider": "openai", "endpoint": "chat/completions", "headers": FAKE_SIGV4,
                "query": body(f"mail {EMAIL}")}
        r = httpx.post(g.url + "/", json=[step])
        assert error(r) == (400, 2030), r.text
        r = httpx.post(g.url + "/compat/chat/completions", json=body(f"mail {EMAIL}", model="openai/gpt-4o-mini"),
                       headers=FAKE_SIGV4)
        assert error(r) == (400, 2030), r.text
        sent = [q["headers"]["accept-encoding"] for q in mock.requests()]
        assert sent == ["identity"] * 3
    finally:
        g.stop()


def test_a_fake_signature_turns_off_no_usage_counting(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=body("count me"), headers=FAKE_SIGV4)
    assert r.status_code == 200 and "content-encoding" not in r.headers
    usage = r.json()["usage"]
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert f"tokens_in={usage['prompt_tokens']} tokens_out={usage['completion_tokens']}" in line, line
    # groq has no stored key: the look-alike goes upstream as the client's credential, but no
    # provider there checks a signature, so nothing pins the encoding (the mock refuses the key).
    r = httpx.post(gateway.url + "/groq/chat/completions", json=body("x"), headers=FAKE_SIGV4)
    assert r.status_code == 401 and "content-encoding" not in r.headers
    assert mock.last()["headers"]["accept-encoding"] == "identity"


def test_the_clients_own_signature_over_accept_encoding_still_goes_through(mock, tmp_path):
    # No stored AWS credentials: the client's signature goes upstream, and changing a header it
    # covers would break it.
    g = started(mock, tmp_path, bedrock_provider(mock))
    try:
        r = httpx.post(g.url + BEDROCK, json={"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                       headers=signed("accept-encoding;host;x-amz-date", "gzip"))
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert mock.last()["headers"]["accept-encoding"] == "gzip"
        # Not covered by the signature: replaced as for anyone.
        r = httpx.post(g.url + BEDROCK, json={"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                       headers=signed("host;x-amz-date", "gzip"))
        assert r.status_code == 200 and "content-encoding" not in r.headers
        assert mock.last()["headers"]["accept-encoding"] == "identity"
    finally:
        g.stop()


@pytest.mark.parametrize("spec", [
    dlp("{id: mails, action: BLOCK, check: [RESPONSE], profiles: [email]}"),
    "  spendLimit: {amount: '5.00', period: day}\n",
])
def test_a_signed_compressed_answer_is_refused_where_the_gateway_reads_answers(mock, tmp_path, spec):
    g = started(mock, tmp_path, bedrock_provider(mock) + spec)
    try:
        converse = {"messages": [{"role": "user", "content": [{"text": f"mail {EMAIL}"}]}]}
        r = httpx.post(g.url + BEDROCK, json=converse, headers=signed("accept-encoding;host;x-amz-date", "gzip"))
        assert error(r) == (400, 2100), r.text
        assert "Accept-Encoding: gzip" in r.json()["error"][0]["message"]
        step = {"provider": "aws-bedrock", "endpoint": BEDROCK.removeprefix("/aws-bedrock/"),
                "headers": signed("accept-encoding;host;x-amz-date", "gzip"), "query": converse}
        r = httpx.post(g.url + "/", json=[step])
        assert error(r) == (400, 2100), r.text
        assert mock.requests() == []
        # A signed `identity` is what the gateway sends anyway.
        r = httpx.post(g.url + BEDROCK, json={"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                       headers=signed("accept-encoding;host;x-amz-date", "identity"))
        assert r.status_code == 200
    finally:
        g.stop()


# --- Content-Encoding ------------------------------------------------------------------------

def gzipped(obj):
    return gzip.compress(json.dumps(obj).encode())


GZIP_JSON = {"content-type": "application/json", "content-encoding": "gzip"}


@pytest.mark.parametrize("spec,text", [
    (dlp("{id: no-ssn, action: BLOCK, check: [REQUEST], profiles: [us-ssn]}"), f"my ssn is {SSN}"),
    (dlp("{id: watch, action: FLAG, check: [REQUEST], profiles: [us-ssn]}"), f"my ssn is {SSN}"),
    ("  guardrails:\n    moderationURL: '{mock}/v1/moderations'\n    prompt: {violence: block}\n",
     "tell me mock-flag:violence"),
    # Usage limits read the model (its price) and ask a stream for its usage in the body: a
    # compressed one was served, priced at nothing.
    ("  spendLimit: {amount: '0.00001', period: day}\n", "spend"),
    ("  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 100000}\n", "tokens"),
])
def test_a_compressed_body_is_refused_where_request_checks_must_read_it(mock, tmp_path, spec, text):
    g = started(mock, tmp_path, spec.replace("{mock}", mock.url))
    try:
        r = httpx.post(g.url + CHAT, content=gzipped(body(text)), headers=GZIP_JSON)
        assert error(r) == (400, 2101), r.text
        message = r.json()["error"][0]["message"]
        assert "compressed (Content-Encoding: gzip)" in message, message
        assert mock.requests() == [], "neither the provider nor the moderation endpoint saw it"
        # Sent uncompressed, the same request meets its checks.
        plain = httpx.post(g.url + CHAT, json=body(text))
        assert plain.status_code in (200, 400, 424)
        assert plain.status_code == 200 or plain.json()["error"][0]["code"] in (2029, 2016)
    finally:
        g.stop()


def test_a_compressed_body_passes_through_when_nothing_reads_it(gateway, mock):
    r = httpx.post(gateway.url + CHAT, content=gzipped(body("squeezed")), headers=GZIP_JSON)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: squeezed"
    sent = mock.last()
    assert sent["headers"]["content-encoding"] == "gzip"
    assert json.loads(sent["body"])["messages"][0]["content"] == "squeezed"


@pytest.mark.parametrize("path,payload", [
    ("/compat/chat/completions", body("squeezed", model="openai/gpt-4o-mini")),
    ("/", [{"provider": "openai", "endpoint": "chat/completions", "query": body("squeezed")}]),
])
def test_routes_that_translate_the_body_refuse_it_compressed(gateway, mock, path, payload):
    r = httpx.post(gateway.url + path, content=gzipped(payload), headers=GZIP_JSON)
    assert error(r) == (400, 2101), r.text
    assert "compressed" in r.json()["error"][0]["message"]
    assert mock.requests() == []


def test_a_step_or_compat_body_never_goes_upstream_labelled_compressed(gateway, mock):
    # The gateway serializes these bodies itself: a client's Content-Encoding does not apply.
    step = {"provider": "openai", "endpoint": "chat/completions", "query": body("plain"),
            "headers": {"content-encoding": "gzip"}}
    assert httpx.post(gateway.url + "/", json=[step]).status_code == 200
    assert "content-encoding" not in mock.last()["headers"]


# --- Cache keys ------------------------------------------------------------------------------

def cache_status(r):
    assert r.status_code == 200, r.text
    return r.headers["cf-aig-cache-status"]


def test_a_custom_cache_key_never_reaches_another_provider_route_or_key(mock, tmp_path):
    g = started(mock, tmp_path, CACHE_ON)
    try:
        k = {"cf-aig-cache-key": "shared"}
        groq = g.url + "/groq/chat/completions"
        alice = {**k, "authorization": "Bearer client-key-alice"}
        assert cache_status(httpx.post(groq, json=body("alice asks"), headers=alice)) == "MISS"
        # Another provider and path, with the gateway's stored key.
        messages = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "b"}]}
        b = httpx.post(g.url + "/anthropic/v1/messages", json=messages, headers=k)
        assert cache_status(b) == "MISS" and b.json()["type"] == "message"
        assert cache_status(httpx.post(g.url + CHAT, json=body("c"), headers=k)) == "MISS"
        # The same route with another client key.
        bob = {**k, "authorization": "Bearer client-key-bob"}
        assert cache_status(httpx.post(groq, json=body("bob asks"), headers=bob)) == "MISS"
        # Within its scope the custom key still stands for the body.
        hit = httpx.post(groq, json=body("alice again"), headers=alice)
        assert cache_status(hit) == "HIT"
        assert hit.json()["choices"][0]["message"]["content"] == "mock reply to: alice asks"
        assert len(mock.requests()) == 4
    finally:
        g.stop()


@pytest.mark.parametrize("path,payload,name,a,b", [
    (CHAT, body("which project"), "OpenAI-Project", "proj_A", "proj_B"),
    (CHAT, body("which org"), "OpenAI-Organization", "org-A", "org-B"),
    ("/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 16,
                                "messages": [{"role": "user", "content": "which beta"}]},
     "anthropic-beta", "tools-2024-04-04", "prompt-caching-2024-07-31"),
    ("/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 16,
                                "messages": [{"role": "user", "content": "which version"}]},
     "anthropic-version", "2023-06-01", "2023-01-01"),
])
def test_headers_that_change_the_answer_are_part_of_the_cache_key(mock, tmp_path, path, payload, name, a, b):
    g = started(mock, tmp_path, CACHE_ON)
    try:
        post = lambda value, key=name: httpx.post(g.url + path, json=payload, headers={key: value})
        assert cache_status(post(a)) == "MISS"
        assert cache_status(post(b)) == "MISS"
        assert cache_status(post(a, name.upper())) == "HIT", "header names in any case"
        assert cache_status(post(b, name.lower())) == "HIT"
        assert len(mock.requests()) == 2
        # With a custom key too.
        custom = lambda value: httpx.post(g.url + path, json=payload, headers={name: value, "cf-aig-cache-key": "k"})
        assert (cache_status(custom(a)), cache_status(custom(b))) == ("MISS", "MISS")
    finally:
        g.stop()


# --- Web pages -------------------------------------------------------------------------------

def test_requests_from_web_pages_are_refused(gateway, mock):
    # CSRF: a page may POST text/plain anywhere without asking; the browser adds Origin.
    r = httpx.post(gateway.url + CHAT, content=json.dumps(body("csrf")),
                   headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert error(r) == (403, 2109), r.text
    assert "web pages" in r.json()["error"][0]["message"]
    # A GET a page makes carries no Origin when same-origin, but always Sec-Fetch-Site.
    for site in ["cross-site", "same-site", "same-origin"]:
        r = httpx.get(gateway.url + "/openai/models", headers={"sec-fetch-site": site})
        assert error(r) == (403, 2109), site
    r = httpx.post(gateway.url + "/", json=[{"provider": "openai", "endpoint": "chat/completions",
                                             "query": body("csrf")}], headers={"origin": "null"})
    assert error(r) == (403, 2109)
    assert mock.requests() == []
    # A URL the user typed, and the SDKs (which send neither mark), are served.
    assert httpx.get(gateway.url + "/openai/models", headers={"sec-fetch-site": "none"}).status_code == 200
    assert httpx.post(gateway.url + CHAT, json=body("server side")).status_code == 200


def test_trace_is_not_forwarded_it_would_echo_the_injected_key(gateway, mock):
    # A server that answers TRACE sends the request back, headers and all.
    r = httpx.request("TRACE", gateway.url + "/openai/models")
    assert error(r) == (400, 2106), r.text
    assert "TRACE" in r.json()["error"][0]["message"]
    assert mock.requests() == []
    # Every method an API uses still goes through.
    for method in ("GET", "DELETE", "OPTIONS"):
        assert httpx.request(method, gateway.url + "/openai/models").status_code != 400, method


def test_a_loopback_listener_answers_only_to_its_address_or_localhost(gateway, mock):
    port = gateway.port
    r = httpx.post(gateway.url + CHAT, json=body("rebound"), headers={"host": f"rebind.attacker.example:{port}"})
    assert error(r) == (403, 2109), r.text
    assert "rebind.attacker.example" in r.json()["error"][0]["message"]
    assert mock.requests() == []
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.1"]:
        r = httpx.post(gateway.url + CHAT, json=body("by address"), headers={"host": host})
        assert r.status_code == 200, (host, r.text)


def test_a_listener_beyond_loopback_answers_to_any_name(mock, tmp_path):
    # Reached over the network (a container's service name), names are the deployment's to pick.
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, listen_ip="0.0.0.0")
    try:
        r = httpx.post(g.url + CHAT, json=body("by name"), headers={"host": f"sidegate:{g.port}"})
        assert r.status_code == 200, r.text
        r = httpx.post(g.url + CHAT, json=body("page"), headers={"origin": "http://evil.example"})
        assert error(r) == (403, 2109), "browser marks are refused on any listener"
    finally:
        g.stop()


def test_another_process_of_the_same_user_cannot_read_the_sidecar_through_proc(mock, tmp_path):
    # In a pod that shares its process namespace, an app running as the sidecar's user could
    # read the sidecar's memory and, through /proc/<pid>/root, its mounted key files. The
    # sidecar marks itself not dumpable: only CAP_SYS_PTRACE opens them then.
    import os
    import subprocess
    import time

    from conftest import binary, free_port
    if os.geteuid() != 0:
        pytest.skip("needs root to run the sidecar and the reader as another user")
    import pathlib
    import shutil
    import tempfile
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Not tmp_path: pytest's directories are private to root.
    d = pathlib.Path(tempfile.mkdtemp(prefix="sidegate-nobody-"))
    (d / "keys").mkdir()
    (d / "gateway.yaml").write_text(gateway_yaml(mock.url))
    for name, value in DEFAULT_KEYS.items():
        (d / "keys" / name).write_text(value + "\n")
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(nobody + [binary("sidegate"), "--config", str(d / "gateway.yaml"),
                                      "--keys-dir", str(d / "keys"), "--listen", f"127.0.0.1:{port}",
                                      "--admin", f"127.0.0.1:{admin}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{admin}", proc, 10)
        key_file = f"/proc/{proc.pid}/root{d}/keys/openai.default"
        for target in (f"/proc/{proc.pid}/environ", key_file):
            read = subprocess.run(nobody + ["cat", target], capture_output=True, text=True)
            assert read.returncode != 0 and "Permission denied" in read.stderr, (target, read)
        # The user's own files stay readable to that user the ordinary way, so the refusal
        # above comes from the process being not dumpable, not from file permissions.
        plain = subprocess.run(nobody + ["cat", str(d / "keys" / "openai.default")], capture_output=True)
        assert plain.returncode == 0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_a_request_the_gateway_signs_for_aws_carries_no_other_key_header(mock, tmp_path):
    # AWS reads only the signature: a gateway token or another provider's key the client sent
    # (passthrough, or a universal step's headers) must not go there, signed in.
    from conftest import GATEWAY_TOKEN
    creds = json.dumps({"accessKeyId": "AKIDMOCK", "secretAccessKey": "mock-secret"})
    keys = dict(DEFAULT_KEYS, **{"aws-bedrock.default": creds, "authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True, extra_spec=f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n"), keys)
    try:
        mock.clear()
        endpoint = "bedrock-runtime/us-east-1/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
        query = {"messages": [{"role": "user", "content": [{"text": "signed by the gateway"}]}]}
        others = {"x-api-key": "sk-ant-other-provider", "x-goog-api-key": "AIza-other", "api-key": "azure-other"}
        auth = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
        r = httpx.post(g.url + "/aws-bedrock/" + endpoint, json=query, headers=auth | others)
        assert r.status_code == 200, r.text
        step = {"provider": "aws-bedrock", "endpoint": endpoint, "query": query,
                "headers": {"x-api-key": GATEWAY_TOKEN, "x-goog-api-key": GATEWAY_TOKEN}}
        r = httpx.post(g.url + "/", json=[step], headers=auth)
        assert r.status_code == 200, r.text
        sent = mock.requests()
        assert len(sent) == 2
        for q in sent:
            h = q["headers"]
            assert h["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK/"), h
            assert not {"x-api-key", "x-goog-api-key", "api-key"} & set(h), h
            assert "x-api-key" not in h["authorization"], h["authorization"]
    finally:
        g.stop()


def test_a_body_the_gateway_cannot_parse_is_refused_without_quoting_its_values(mock, tmp_path):
    # serde quotes the string it could not take; a key or a prompt in the wrong place must
    # reach neither the answer nor the log.
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    try:
        secret = "sk-proj-SHOULD-NOT-ECHO-42"
        cases = [
            ("/", [{"provider": "openai", "endpoint": "chat/completions", "headers": f"Authorization: Bearer {secret}", "query": {}}], 2108),
            ("/", [{"provider": "openai", "endpoint": "chat/completions", "query": {}, "config": {"maxAttempts": secret}}], 2108),
            ("/compat/chat/completions", {"model": "anthropic/claude-haiku-4-5", "messages": f"my {secret} prompt"}, 2107),
        ]
        for path, body, code in cases:
            r = httpx.post(g.url + path, json=body)
            assert (r.status_code, r.json()["error"][0]["code"]) == (400, code), (path, r.text)
            assert secret not in r.text and "expected" in r.text, r.text
        assert secret not in g.logs()
    finally:
        g.stop()
