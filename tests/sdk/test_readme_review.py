"""README review: claims of README.md about the standalone sidecar, pinned against the binary.

Each test names the README section it checks. YAML blocks are extracted from README.md itself,
so a snippet edited into something the sidecar refuses fails here.
"""

import json
import pathlib
import re
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone

import anthropic
import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, RefusingPort, Sidegate, binary, gateway_yaml
from test_redis import redis_errors

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
README_LINES = README.split("\n")
CHAT = "/openai/chat/completions"


def body(text="hi", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def code_blocks(lang):
    """(first line number, text) of every fenced block of `lang` in the README."""
    out, inside, start, buf, cur = [], False, 0, [], ""
    for i, line in enumerate(README_LINES, 1):
        if line.startswith("```"):
            if inside:
                if cur == lang:
                    out.append((start, "\n".join(buf)))
                inside = False
            else:
                inside, start, buf, cur = True, i, [], line[3:].strip()
        elif inside:
            buf.append(line)
    return out


def section(title):
    """The README text under the heading `title` (up to the next heading)."""
    m = re.search(r"^#+ " + re.escape(title) + r"\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert m, title
    return m.group(1)


_checks = [0]


def check(tmp_path, text, keys=None, name="gateway.yaml", extra=()):
    _checks[0] += 1
    cfg = tmp_path / f"{_checks[0]}-{name}"
    cfg.write_text(text)
    kd = tmp_path / f"keys-check-{_checks[0]}"
    kd.mkdir()
    for k, v in (keys or {}).items():
        (kd / k).write_text(v + "\n")
    return subprocess.run([binary("sidegate"), "--config", str(cfg), "--keys-dir", str(kd), "--check", *extra],
                          capture_output=True, text=True, timeout=30)


def err(r):
    return (r.status_code, r.json()["error"][0]["code"])


def metric(g, prefix):
    for line in g.metrics().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def away_from_minute_boundary():
    """Fixed windows reset at minute boundaries: keep a short test within one minute."""
    s = datetime.now(timezone.utc).second
    if s >= 55:
        time.sleep(61 - s)


# --- Using the sidecar: flags ---------------------------------------------------------------

def usage_block():
    (start, text), = [b for b in code_blocks("sh") if "sidegate --config FILE" in b[1]]
    return text


def test_every_flag_of_the_readme_usage_is_in_help_with_the_readme_default():
    helptext = subprocess.run([binary("sidegate"), "--help"], capture_output=True, text=True, timeout=10).stdout
    usage = usage_block()
    flags = re.findall(r"--[a-z-]+", usage)
    assert len(flags) >= 12, flags
    for f in flags:
        assert re.search(r"^\s+" + re.escape(f) + r"\b", helptext, re.M), f"{f} not in --help"
    # Defaults written in the usage line ([--listen 127.0.0.1:8787] ...) are --help's defaults.
    for flag, value in re.findall(r"\[(--[a-z-]+) ([^\]|]+)\]", usage):
        if value.isupper():  # a placeholder (DIR, FILE), not a default
            continue
        block = helptext.split("      " + flag, 1)[1].split("\n      --", 1)[0]
        assert f"[default: {value}]" in block, (flag, value, block)
    # and every option of --help is in the README's usage line
    for f in re.findall(r"^\s+(--[a-z-]+)", helptext, re.M):
        if f in ("--help", "--version"):
            continue
        assert f in usage, f"--help has {f}, the README usage line does not"


# --- YAML snippets ----------------------------------------------------------------------------

HEADER = "schemaVersion: 1\ngateway: {name: main}\n"


@pytest.mark.parametrize("start,text", [b for b in code_blocks("yaml") if "urlSecretRef" not in b[1]],
                         ids=lambda v: str(v) if isinstance(v, int) else None)
def test_every_readme_yaml_block_passes_check(tmp_path, start, text):
    r = check(tmp_path, HEADER + text + "\n")
    assert r.returncode == 0, f"README line {start}: {r.stdout}{r.stderr}"
    assert "valid (gateway main" in r.stdout


def test_the_redis_block_is_the_kubernetes_form_and_the_standalone_form_loads(tmp_path):
    (start, text), = [b for b in code_blocks("yaml") if "urlSecretRef" in b[1]]
    r = check(tmp_path, HEADER + text + "\n")
    assert r.returncode == 2 and "redis.url" in r.stderr, r.stderr
    # As the README says for standalone: `redis: {}`, the URL in keys/redis.url, a gateway name.
    standalone = text.replace("redis: {urlSecretRef: {name: redis, key: url}}", "redis: {}")
    r = check(tmp_path, HEADER + standalone + "\n", keys={"redis.url": "redis://127.0.0.1:1/0"})
    assert r.returncode == 0, r.stderr
    r = check(tmp_path, HEADER + standalone + "\n")
    assert r.returncode == 2 and "redis.url" in r.stderr
    r = check(tmp_path, "schemaVersion: 1\n" + standalone + "\n", keys={"redis.url": "redis://127.0.0.1:1/0"})
    assert r.returncode == 2 and "name" in r.stderr


INLINE_SPECS = [
    "cache: {enabled: true, ttl: 5m, maxSize: 16Mi, streaming: false}",
    "cache: {enabled: true, ttl: 60s}",
    "cache: {enabled: true, ttl: 30d, maxSize: 64Ki}",
    "retries: {maxAttempts: 3, retryDelay: 500ms, backoff: constant}",
    "retries: {maxAttempts: 3, retryDelay: 500ms, backoff: linear}",
    "retries: {maxAttempts: 3, retryDelay: 500ms, backoff: exponential}",
    "rateLimit: {limit: 100, interval: 60s, technique: fixed, scope: pod}",
    "rateLimit: {limit: 100, interval: 60s, technique: sliding, scope: pod}",
    "limits: {maxRequestBody: 10Mi, maxBufferedBytes: 64Mi}",
    "logging: {payloads: true}",
    'pricing: [{model: claude-sonnet-4-5, inputPerMillion: "3", outputPerMillion: "15", cacheReadPerMillion: "0.30"}]',
    'pricing: [{model: x, inputPerMillion: "1", outputPerMillion: "1", cacheWritePerMillion: "2", cacheWrite1hPerMillion: "3"}]',
    'spendLimit: {amount: "250.00", period: day}',
    'spendLimit: {amount: "250.00", period: week}',
]


@pytest.mark.parametrize("spec", INLINE_SPECS)
def test_inline_spec_snippets_pass_check(tmp_path, spec):
    r = check(tmp_path, HEADER + "spec:\n  " + spec + "\n")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("spec,needle", [
    ("cache: {enabled: true, ttl: 59s}", "spec.cache.ttl"),
    ("cache: {enabled: true, ttl: 31d}", "spec.cache.ttl"),
    ("cache: {enabled: true, maxSize: 63Ki}", "spec.cache.maxSize"),
    ("rateLimit: {limit: 1, interval: 60s, scope: global}", "spec.redis"),
    ("limits: {maxRequestBody: 10Mi, maxBufferedBytes: 5Mi}", "maxBufferedBytes"),
    ("dlp: {policies: [{id: x, action: BLOCK, check: [REQUEST], profiles: [nope]}]}", '"nope"'),
    ("guardrails: {moderationURL: 'http://127.0.0.1:1/m', prompt: {nope: block}}", '"nope"'),
    ("openTelemetry: {endpoint: 'ftp://x'}", "spec.openTelemetry.endpoint"),
])
def test_documented_bounds_are_refused_by_check(tmp_path, spec, needle):
    r = check(tmp_path, HEADER + "spec:\n  " + spec + "\n")
    assert r.returncode == 2 and needle in r.stderr, r.stderr


# --- example configs --------------------------------------------------------------------------

def test_examples_gateway_yaml_passes_check(tmp_path):
    r = check(tmp_path, (ROOT / "examples" / "gateway.yaml").read_text())
    assert r.returncode == 0, r.stderr


def test_demo_gateway_yaml_passes_check_once_mock_url_is_filled_in(tmp_path):
    text = (ROOT / "examples" / "demo-gateway.yaml").read_text().replace("MOCK_URL", "http://127.0.0.1:9")
    r = check(tmp_path, text, keys={"authentication.tokens": "t"})
    assert r.returncode == 0, r.stderr


def test_shared_example_gateway_yaml_passes_check(tmp_path):
    shared = pathlib.Path("/work/shared/examples/gateway.yaml")
    if not shared.exists():
        pytest.skip("no /work/shared/examples")
    r = check(tmp_path, shared.read_text())
    assert r.returncode == 0, r.stderr


# --- --check ----------------------------------------------------------------------------------

def test_check_exit_codes_warnings_and_fifo(tmp_path):
    ok = check(tmp_path, HEADER + "spec: {}\nkeys:\n  nosuch: [default]\n")
    assert ok.returncode == 0
    assert 'keys index names "nosuch", which is no provider' in ok.stdout
    bad = check(tmp_path, "schemaVersion: 1\nspec: {bogus: 1}\n")
    assert bad.returncode == 2 and "bogus" in bad.stderr and bad.stdout == ""
    fifo = tmp_path / "fifo.yaml"
    import os
    os.mkfifo(fifo)
    r = subprocess.run([binary("sidegate"), "--config", str(fifo), "--check"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "FIFO" in r.stderr
    ca = tmp_path / "ca.pem"
    ca.write_text("not a pem\n")
    r = check(tmp_path, HEADER + "spec: {}\n", extra=("--upstream-ca", str(ca)))
    assert r.returncode == 2 and "--upstream-ca" in r.stderr


# --- Routes / SDK snippets --------------------------------------------------------------------

def test_the_python_sdk_snippets_work(gateway, mock):
    client = openai.OpenAI(base_url=gateway.url + "/openai", api_key="unused", max_retries=0)
    assert client.chat.completions.create(**body()).choices[0].message.content == "mock reply to: hi"
    claude = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key="unused", max_retries=0)
    msg = claude.messages.create(model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text
    compat = openai.OpenAI(base_url=gateway.url + "/compat", api_key="unused", max_retries=0)
    r = compat.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content


def test_long_form_gateway_id(gateway, mock, tmp_path):
    assert httpx.post(gateway.url + "/v1/acct/main/openai/chat/completions", json=body()).status_code == 200
    assert err(httpx.post(gateway.url + "/v1/acct/other/openai/chat/completions", json=body())) == (404, 2001)
    d = tmp_path / "unnamed"
    d.mkdir()
    g = Sidegate(d, gateway_yaml(mock.url).replace("gateway: {namespace: team-a, name: main}\n", ""), DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + "/v1/acct/anything/openai/chat/completions", json=body()).status_code == 200
    finally:
        g.stop()


def test_provider_path_rewrites_named_in_routes(mock, tmp_path):
    extra = "".join(f"    {p}: {{baseURL: '{mock.url}{s}'}}\n" for p, s in
                    [("cerebras", "/v1"), ("cohere", ""), ("huggingface", "")])
    g = Sidegate(tmp_path, gateway_yaml(mock.url) + extra, DEFAULT_KEYS)
    try:
        for path, upstream in [("/cerebras/chat/completions", "/v1/chat/completions"),
                               ("/cerebras/v1/chat/completions", "/v1/chat/completions"),
                               ("/cohere/v1/v2/chat", "/v2/chat"),
                               ("/huggingface/gpt2", "/models/gpt2"),
                               ("/huggingface/v1/chat/completions", "/v1/chat/completions")]:
            mock.clear()
            httpx.post(g.url + path, json=body(), headers={"authorization": "Bearer x", "cf-aig-event-id": "e"})
            last = mock.last()
            assert last["path"] == upstream, path
            assert not [h for h in last["headers"] if h.startswith("cf-")], "cf-aig-* headers are stripped"
    finally:
        g.stop()


# --- Errors made by the gateway ---------------------------------------------------------------

def error_table():
    rows = {}
    for line in section("Errors made by the gateway").splitlines():
        m = re.match(r"\| (\d{3}) \| (\d{4}|—) \|", line)
        if m:
            rows.setdefault(m.group(2), set()).add(int(m.group(1)))
    return rows


ENVELOPE_KEYS = ["success", "result", "messages", "error"]


def assert_envelope(r, status, code):
    assert err(r) == (status, code), r.text
    j = r.json()
    assert list(j) == ENVELOPE_KEYS and j["success"] is False and j["result"] == [] and j["messages"] == []
    assert r.headers.get("cf-aig-log-id"), "every refusal carries cf-aig-log-id"
    assert status in error_table()[str(code)], f"{status}/{code} is not a row of the README table"


def test_error_table_rows_are_the_ones_documented():
    rows = error_table()
    expected = {"2001", "2009", "2003", "2041", "2029", "2030", "2016", "2017", "2040", "2100", "2101", "2102",
                "2103", "2111", "2104", "2105", "2106", "2107", "2108", "2109", "2110", "2112", "—"}
    assert set(rows) == expected


@pytest.fixture
def strict_gateway(mock, tmp_path):
    """Auth, DLP request+response, guardrails prompt+response, small body limits."""
    spec = ("  dlp:\n    policies:\n"
            "      - {id: no-secrets, action: BLOCK, check: [REQUEST, RESPONSE], profiles: [aws-keys, private-keys]}\n"
            "      - {id: pii, action: FLAG, check: [REQUEST], profiles: [us-ssn, credit-card, email]}\n"
            f"  guardrails:\n    moderationURL: '{mock.url}/v1/moderations'\n"
            "    prompt: {violence: block, hate: flag}\n    response: {self-harm: block}\n"
            "  limits: {maxRequestBody: 1Mi}\n")
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True, extra_spec=spec), keys, extra_args=["--client-timeout", "2"])
    mock.clear()
    yield g
    g.stop()


AUTH = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}


def test_error_table_codes_strict_gateway(strict_gateway, mock):
    g = strict_gateway
    with httpx.Client(timeout=20) as c:
        assert_envelope(c.post(g.url + CHAT, json=body()), 401, 2009)
        assert_envelope(c.post(g.url + CHAT, json=body("AKIAIOSFODNN7EXAMPLE"), headers=AUTH), 400, 2029)
        r = c.post(g.url + CHAT, json=body("123-45-6789"), headers=AUTH)
        assert r.status_code == 200
        assert json.loads(r.headers["cf-aig-dlp"]) == [{"policy": "pii", "profiles": ["us-ssn"], "check": "REQUEST"}]
        assert_envelope(c.post(g.url + CHAT, json=body("mock-flag:violence"), headers=AUTH), 424, 2016)
        assert c.post(g.url + CHAT, json=body("mock-flag:hate"), headers=AUTH).status_code == 200
        assert_envelope(c.post(g.url + CHAT, json=body("x mock-flag:self-harm"), headers=AUTH), 424, 2017)
        assert_envelope(c.post(g.url + CHAT, json=body("-----BEGIN RSA PRIVATE KEY----- ok"), headers=AUTH), 400, 2029)
        assert_envelope(c.post(g.url + CHAT, json=body(), headers={**AUTH, "cf-aig-byok-alias": "nope"}), 400, 2040)
        assert_envelope(c.post(g.url + "/compat/chat/completions", content=b"\x1f\x8b\x08\x00",
                               headers={**AUTH, "content-encoding": "gzip", "content-type": "application/json"}), 400, 2101)
        assert_envelope(c.post(g.url + "/compat/chat/completions", json=body(), headers=AUTH), 400, 2107)
        assert_envelope(c.post(g.url + "/", json=[{"provider": "openai"}], headers=AUTH), 400, 2108)
        assert_envelope(c.post(g.url + CHAT, json=body(), headers={**AUTH, "origin": "http://example.com"}), 403, 2109)
        assert_envelope(c.post(g.url + CHAT, json=body(), headers={**AUTH, "host": "evil.example"}), 403, 2109)
        assert c.post(g.url + CHAT, json=body(), headers={**AUTH, "host": "x.localhost"}).status_code == 200
        assert c.post(g.url + CHAT, json=body(), headers={**AUTH, "sec-fetch-site": "none"}).status_code == 200
        ws = {**AUTH, "upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
              "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
        assert_envelope(c.get(g.url + "/openai/realtime?model=gpt-realtime", headers=ws), 400, 2111)
        assert c.post(g.url + CHAT, json=body(), headers={**AUTH, "x-big": "a" * 70000}).status_code == 431
    with httpx.Client(timeout=20) as c:
        assert_envelope(c.post(g.url + CHAT, content=b"x" * (1024 * 1024 + 10), headers=AUTH), 413, 2102)


def test_a_response_dlp_block_is_2030(mock, tmp_path):
    spec = "  dlp:\n    policies:\n      - {id: no-secrets, action: BLOCK, check: [RESPONSE], profiles: [aws-keys]}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        assert_envelope(httpx.post(g.url + CHAT, json=body("AKIAIOSFODNN7EXAMPLE")), 400, 2030)
    finally:
        g.stop()


def test_error_table_codes_plain_gateway(gateway, mock):
    with httpx.Client(timeout=20) as c:
        assert_envelope(c.post(gateway.url + "/nope/x", json=body()), 404, 2001)
        assert_envelope(c.post(gateway.url + "/azure-openai/res", json=body()), 404, 2001)
        assert_envelope(c.post(gateway.url + "/openai/%2e%2e/anthropic/v1/messages", json=body()), 404, 2001)
        assert_envelope(c.post(gateway.url + CHAT, json=body(), headers={"cf-aig-metadata": "[1]"}), 400, 2100)
        for method in ("TRACE", "TRACK", "CONNECT", "trace"):
            r = c.request(method, gateway.url + CHAT)
            assert_envelope(r, 400, 2106)
        assert_envelope(c.post(gateway.url + CHAT, json=body(),
                               headers={"x-mock-delay-ms": "3000", "cf-aig-request-timeout": "300"}), 504, 2103)


def test_upstream_unreachable_is_502_2104(tmp_path):
    dead = RefusingPort()
    g = Sidegate(tmp_path, gateway_yaml(dead.url), DEFAULT_KEYS)
    try:
        assert_envelope(httpx.post(g.url + CHAT, json=body(), timeout=20), 502, 2104)
    finally:
        g.stop()
        dead.close()


def test_a_stalled_request_body_is_408_2101(strict_gateway):
    s = socket.create_connection(("127.0.0.1", strict_gateway.port))
    s.settimeout(10)
    s.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\ncf-aig-authorization: Bearer {GATEWAY_TOKEN}\r\n"
               "content-type: application/json\r\ncontent-length: 100\r\n\r\n{").encode())
    data = b""
    while b"}]}" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b'"code":2101' in data


# FAILS at 6727912: the 503/2105 before a first config carries no cf-aig-log-id, though the README says every response, refusals too, carries one
def test_no_config_yet_is_503_2105_and_unready(mock, tmp_path):
    g = Sidegate(tmp_path, "not: [valid", DEFAULT_KEYS, extra_args=["--wait-for-config"], wait_ready=False)
    try:
        deadline = time.time() + 10
        while True:
            try:
                if httpx.get(g.admin + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.05)
        assert httpx.get(g.admin + "/readyz").status_code != 200
        unready = httpx.post(g.url + CHAT, json=body())
        assert err(unready) == (503, 2105)
        g.config.write_text(gateway_yaml(mock.url))
        g.proc.send_signal(signal.SIGHUP)
        g.wait_ready()
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200
        # "every response — a refusal by the gateway too — carries cf-aig-log-id"
        assert unready.headers.get("cf-aig-log-id"), "the 503/2105 before a first config has no cf-aig-log-id"
    finally:
        g.stop()


def test_buffer_budget_refusal_is_503_2110_with_retry_after(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  limits: {maxRequestBody: 1Mi, maxBufferedBytes: 1Mi}\n"),
                 DEFAULT_KEYS)
    s = socket.create_connection(("127.0.0.1", g.port))
    try:
        s.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   f"content-length: 1000000\r\n\r\n").encode() + b" " * 700000)
        deadline = time.time() + 5
        while metric(g, "sidegate_buffered_bytes ") < 600000:
            assert time.time() < deadline, "the held body is not counted"
            time.sleep(0.05)
        r = httpx.post(g.url + CHAT, content=b" " * 600000, headers={"content-type": "application/json"})
        assert_envelope(r, 503, 2110)
        assert r.headers["retry-after"] == "1"
        assert metric(g, "sidegate_buffer_refusals_total") == 1
    finally:
        s.close()
        g.stop()


def test_rate_limit_429_2003_and_spend_limit_429_2041(mock, tmp_path):
    away_from_minute_boundary()
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  rateLimit: {limit: 2, interval: 3600s}\n"), DEFAULT_KEYS)
    try:
        # refused for a bad header: not counted
        assert err(httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-metadata": "x"})) == (400, 2100)
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200
        r = httpx.post(g.url + CHAT, json=body())
        assert_envelope(r, 429, 2003)
        assert int(r.headers["retry-after"]) > 0
    finally:
        g.stop()
    d = tmp_path / "spend"
    d.mkdir()
    g = Sidegate(d, gateway_yaml(mock.url, extra_spec='  spendLimit: {amount: "0.000001", period: day}\n'), DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200  # costs 0.00000255
        r = httpx.post(g.url + CHAT, json=body())
        assert_envelope(r, 429, 2041)
        now = datetime.now(timezone.utc)
        to_midnight = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
        assert 0 < int(r.headers["retry-after"]) <= to_midnight + 1
    finally:
        g.stop()
    d = tmp_path / "tpm"
    d.mkdir()
    away_from_minute_boundary()
    g = Sidegate(d, gateway_yaml(mock.url, extra_spec="  rateLimit: {limit: 100, interval: 60s, tokensPerMinute: 5}\n"),
                 DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200  # 1 + 4 tokens
        r = httpx.post(g.url + CHAT, json=body())
        assert_envelope(r, 429, 2003)
        assert "retry-after" in r.headers
    finally:
        g.stop()


# --- Headers ----------------------------------------------------------------------------------

def test_cache_headers_and_legacy_names(gateway, mock):
    g = gateway
    with httpx.Client() as c:
        def post(text, **h):
            return c.post(g.url + CHAT, json=body(text), headers=h)
        assert post("a", **{"cf-aig-cache-ttl": "60"}).headers["cf-aig-cache-status"] == "MISS"
        assert post("a", **{"cf-aig-cache-ttl": "60"}).headers["cf-aig-cache-status"] == "HIT"
        for bad in ("59", "2592001"):
            assert err(post("a", **{"cf-aig-cache-ttl": bad})) == (400, 2100)
        assert post("a", **{"cf-aig-cache-ttl": "2592000"}).status_code == 200
        assert "cf-aig-cache-status" not in post("a", **{"cf-aig-cache-ttl": "0"}).headers
        # former names
        assert post("b", **{"cf-cache-ttl": "60"}).headers["cf-aig-cache-status"] == "MISS"
        assert post("b", **{"cf-cache-ttl": "60"}).headers["cf-aig-cache-status"] == "HIT"
        assert post("b", **{"cf-cache-ttl": "60", "cf-skip-cache": "true"}).headers["cf-aig-cache-status"] == "MISS"
        # cf-aig-cache-key on its own turns the cache on and names the entry in place of the body
        assert post("c", **{"cf-aig-cache-key": "k1"}).headers["cf-aig-cache-status"] == "MISS"
        hit = post("d", **{"cf-aig-cache-key": "k1"})
        assert hit.headers["cf-aig-cache-status"] == "HIT" and "mock reply to: c" in hit.text
        for r in mock.requests():
            assert not [h for h in r["headers"] if h.startswith("cf-")], r["headers"]
    m = g.metrics()
    for result in ("hit", "miss", "skip"):
        assert f'sidegate_cache_requests_total{{result="{result}"}}' in m


def test_request_headers_validation(gateway, mock):
    with httpx.Client() as c:
        def post(**h):
            return c.post(gateway.url + CHAT, json=body(), headers=h)
        assert err(post(**{"cf-aig-max-attempts": "6"})) == (400, 2100)
        assert err(post(**{"cf-aig-max-attempts": "0"})) == (400, 2100)
        assert post(**{"cf-aig-max-attempts": "5"}).status_code == 200
        assert err(post(**{"cf-aig-retry-delay": "5001"})) == (400, 2100)
        assert post(**{"cf-aig-retry-delay": "5000"}).status_code == 200
        assert err(post(**{"cf-aig-custom-cost": '{"total_cost": 1000001}'})) == (400, 2100)
        assert err(post(**{"cf-aig-custom-cost": '{"per_token_in": 2, "per_token_out": 0}'})) == (400, 2100)
        assert post(**{"cf-aig-custom-cost": '{"per_token_in": 0.000001, "per_token_out": 0.000002}'}).status_code == 200
        assert post(**{"cf-aig-byok-alias": "team-b"}).status_code == 200
        assert mock.last()["headers"]["authorization"] == f"Bearer {DEFAULT_KEYS['openai.team-b']}"
        r = post(**{"cf-aig-event-id": "order-42"})
        assert r.headers["cf-aig-event-id"] == "order-42"


def test_retries_are_logged_and_counted(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=body(), headers={"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0",
                                                             "x-mock-fail-first": "1;readme-retry"})
    assert r.status_code == 200
    assert "retrying upstream" in gateway.wait_for_log("retrying upstream")
    assert metric(gateway, 'sidegate_upstream_retries_total{provider="openai"}') == 1


# --- Access log -------------------------------------------------------------------------------

def readme_sample_log_lines():
    (start, text), = [b for b in code_blocks("") if " INFO request id=" in b[1]]
    text_line, json_line = text.split("\n")
    return text_line, json.loads(json_line)


def test_json_access_log_lines_carry_the_readme_fields(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=body(), headers={
            "cf-aig-event-id": "order-42",
            "cf-aig-metadata": json.dumps({f"k{i}": i for i in range(7)})})
        line = json.loads(g.wait_log_line(r.headers["cf-aig-log-id"]))
        _, sample = readme_sample_log_lines()
        assert list(line) == list(sample), "key order of the README's JSON sample"
        assert line["id"] == r.headers["cf-aig-log-id"]
        assert line["event_id"] == "order-42"
        assert line["metadata"] == {f"k{i}": i for i in range(5)}, "only the first 5 metadata entries"
        assert (line["tokens_in"], line["tokens_out"]) == (1, 4)
        assert line["cost"] == pytest.approx(1 * 0.15e-6 + 4 * 0.6e-6)
        assert line["outcome"] == "complete" and line["success"] is True and line["path"] == "chat/completions"
        refused = httpx.post(g.url + "/nope/x", json=body())
        rl = json.loads(g.wait_log_line(refused.headers["cf-aig-log-id"]))
        assert (rl["outcome"], rl["status_code"]) == ("refused", 404)
        silent = httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-collect-log": "false"})
        httpx.post(g.url + CHAT, json=body("after"))
        time.sleep(0.6)
        assert silent.headers["cf-aig-log-id"] not in g.logs()
    finally:
        g.stop()


def test_text_access_log_line_has_the_readme_shape(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=body(), headers={"cf-aig-event-id": "order-42"})
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    sample, _ = readme_sample_log_lines()
    names = lambda s: re.findall(r" ([a-z_]+)=", s.split(" request ", 1)[1] if " request " in s else s)
    sample_names = ["id"] + names(sample)
    got = ["id"] + names(line)
    assert got == sample_names, f"README sample: {sample_names}\nbinary:        {got}"
    assert "cached=" not in line, "text lines write cached=true for hits only"


def test_payload_logging_and_opt_out(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  logging: {payloads: true}\n"), DEFAULT_KEYS,
                 extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=body("payload-me"))
        line = json.loads(g.wait_log_line(r.headers["cf-aig-log-id"]))
        assert "payload-me" in line["request_body"] and "mock reply to: payload-me" in line["response_body"]
        r = httpx.post(g.url + CHAT, json=body("keep-out"), headers={"cf-aig-collect-log-payload": "false"})
        line = json.loads(g.wait_log_line(r.headers["cf-aig-log-id"]))
        assert line.get("request_body") is None and line.get("response_body") is None
    finally:
        g.stop()


# --- Admin port / metrics / reload ------------------------------------------------------------

def readme_metrics():
    text = section("Admin port")
    return re.findall(r"`(sidegate_[a-z_]+)(?:\{([a-z,]+)\})?`", text)


def test_every_metric_the_readme_lists_is_served_with_its_labels(mock, tmp_path):
    spec = (f"  guardrails:\n    moderationURL: '{mock.url}/v1/moderations'\n    prompt: {{hate: flag}}\n"
            "  cache: {enabled: true}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        assert httpx.get(g.admin + "/healthz").status_code == 200
        assert httpx.get(g.admin + "/readyz").status_code == 200
        httpx.post(g.url + CHAT, json=body("mock-flag:hate"))
        httpx.post(g.url + CHAT, json=body("mock-flag:hate"))  # a cache hit
        httpx.post(g.url + CHAT, json=body("r"), headers={"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0",
                                                          "x-mock-fail-first": "1;readme-metrics"})
        with pytest.raises(httpx.TimeoutException):
            httpx.post(g.url + CHAT, json=body("slow"), headers={"x-mock-delay-ms": "2000"}, timeout=0.3)
        g.config.write_text(g.config.read_text() + "  requestTimeout: 100s\n")
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 5
        while "sidegate_config_reloads_total" not in g.metrics() or "sidegate_responses_cancelled_total" not in g.metrics():
            assert time.time() < deadline, g.metrics()
            time.sleep(0.1)
        served = {}
        for line in g.metrics().splitlines():
            m = re.match(r"(sidegate_[a-z_]+)(?:\{(.*)\})? ", line)
            if m:
                labels = {kv.split("=", 1)[0] for kv in re.findall(r'[a-z_]+="[^"]*"', m.group(2) or "")}
                name = re.sub(r"_(sum|count|bucket)$", "", m.group(1)) if "_seconds_" in m.group(1) else m.group(1)
                served.setdefault(name, set()).update(labels)
        listed = readme_metrics()
        assert len(listed) >= 16
        assert set(served) == {n for n, _ in listed}, "series served but not in the README (or the reverse)"
        for name, labels in listed:
            assert name in served, f"README lists {name}, /metrics has no such series"
            if labels:
                assert served[name] - {"le"} == set(labels.split(",")), (name, served[name])
    finally:
        g.stop()


def test_sighup_reloads_and_a_bad_config_keeps_the_last_good(gateway, mock):
    g = gateway
    assert httpx.post(g.url + CHAT, json=body()).status_code == 200
    good = g.config.read_text()
    g.config.write_text(good + "  authentication: {enabled: true}\n")
    g.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while httpx.post(g.url + CHAT, json=body()).status_code != 401:
        assert time.time() < deadline
        time.sleep(0.1)
    g.config.write_text("schemaVersion: 1\nspec: {bogus: 1}\n")
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log("config reload rejected")
    assert err(httpx.post(g.url + CHAT, json=body())) == (401, 2009), "the last good config keeps serving"
    assert 'sidegate_config_reloads_total{result="error"}' in g.metrics()
    assert 'gateway="team-a/main"' in g.metrics()


# FAILS at 6727912: a refusal of an unknown provider is logged with provider null (JSON) / no provider= field (text), not `none` as README says ("under the provider their route names, else `none`, in the log line and sidegate_requests_total"); the metric does say none
def test_a_refusal_without_provider_is_logged_under_none(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        refused = httpx.post(g.url + "/nope/x", json=body())
        assert 'sidegate_requests_total{provider="none",status="404"} 1' in g.metrics()
        rl = json.loads(g.wait_log_line(refused.headers["cf-aig-log-id"]))
        assert rl["provider"] == "none", rl
    finally:
        g.stop()


# FAILS at 6727912: once the config file is gone and the keys directory empty, the 503/2105 has no cf-aig-log-id and writes no access log line (only a `request refused` line with no id); README says every response carries cf-aig-log-id and that only the 503 before a *first* config loads goes unlogged
def test_a_dropped_config_refuses_with_503_2105_logged_with_its_log_id(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        g.config.unlink()
        for f in g.keys_dir.iterdir():
            f.unlink()
        deadline = time.time() + 10
        while httpx.get(g.admin + "/readyz").status_code == 200:
            assert time.time() < deadline, "still ready after its config and keys are gone"
            time.sleep(0.1)
        r = httpx.post(g.url + CHAT, json=body())
        assert err(r) == (503, 2105)
        assert not [l for l in g.metrics().splitlines() if l.startswith("sidegate_config_info{")]
        assert r.headers.get("cf-aig-log-id"), "no cf-aig-log-id on the 503/2105"
        # No config says how to log it (README): no access line, its process line names its id.
        g.wait_for_log(r.headers['cf-aig-log-id'])
    finally:
        g.stop()


# --- DLP profiles -----------------------------------------------------------------------------

@pytest.fixture
def dlp_flag_all(mock, tmp_path):
    spec = ("  dlp:\n    policies:\n"
            "      - {id: all, action: FLAG, check: [REQUEST], profiles: [credit-card, us-ssn, email, aws-keys, private-keys]}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    yield g
    g.stop()


@pytest.mark.parametrize("text,profile", [
    ("4111111111111111", "credit-card"), ("4111 1111 1111 1111", "credit-card"),
    ("4111-1111-1111-1111", "credit-card"), ("411 111 111 111 1111", "credit-card"),
    ("4111 1111 1111 1112", None), ("04111111111111111", None),
    ("123-45-6789", "us-ssn"), ("123 45 6789", "us-ssn"), ("000-45-6789", None), ("123-00-6789", None),
    ("jane@example.com", "email"), ("icon@2x.png", None),
    ("AKIAIOSFODNN7EXAMPLE", "aws-keys"), ("ASIAIOSFODNN7EXAMPLE", "aws-keys"), ("x_AKIAIOSFODNN7EXAMPLE", "aws-keys"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws-keys"),
    ('"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "aws-keys"),
    ("-----BEGIN RSA PRIVATE KEY-----", "private-keys"), ("-----BEGIN PGP PRIVATE KEY BLOCK-----", "private-keys"),
    ("---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----", "private-keys"), ("PuTTY-User-Key-File-3: ssh-ed25519", "private-keys"),
])
def test_dlp_profiles_match_what_the_readme_says(dlp_flag_all, text, profile):
    r = httpx.post(dlp_flag_all.url + CHAT, json=body(text))
    assert r.status_code == 200
    flags = json.loads(r.headers["cf-aig-dlp"]) if "cf-aig-dlp" in r.headers else []
    assert [p for f in flags for p in f["profiles"]] == ([profile] if profile else []), text


def test_guardrails_fail_open_counted_as_error(mock, tmp_path):
    spec = "  guardrails:\n    moderationURL: 'http://127.0.0.1:9/v1/moderations'\n    prompt: {violence: block}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + CHAT, json=body(), timeout=30).status_code == 200
        assert metric(g, 'sidegate_guardrails_total{result="error"}') == 1
    finally:
        g.stop()


# --- OpenTelemetry headers --------------------------------------------------------------------

def test_otel_headers_checked_with_or_without_an_exporter(gateway, mock, tmp_path):
    # Without spec.openTelemetry the ids are not used, but a malformed one is still refused, as
    # every other cf-aig-* header is whatever the gateway's settings (once let through).
    mock.clear()
    for bad, named in [({"cf-aig-otel-trace-id": "zz"}, "cf-aig-otel-trace-id"),
                       ({"cf-aig-otel-trace-id": "0" * 32}, "cf-aig-otel-trace-id"),
                       ({"cf-aig-otel-trace-id": "a" * 32, "cf-aig-otel-parent-span-id": "xyz"},
                        "cf-aig-otel-parent-span-id"),
                       ({"cf-aig-otel-parent-span-id": "0" * 16}, "cf-aig-otel-parent-span-id")]:
        r = httpx.post(gateway.url + CHAT, json=body(), headers=bad)
        assert err(r) == (400, 2100), bad
        assert named in r.json()["error"][0]["message"], (bad, r.text)
    assert mock.requests() == []
    ok = {"cf-aig-otel-trace-id": "A" * 32, "cf-aig-otel-parent-span-id": "b" * 16}
    assert httpx.post(gateway.url + CHAT, json=body(), headers=ok).status_code == 200
    from conftest import FixedAnswerServer
    collector = FixedAnswerServer(b"{}")
    d = tmp_path / "otel"
    d.mkdir()
    g = Sidegate(d, gateway_yaml(mock.url, extra_spec=f"  openTelemetry: {{endpoint: '{collector.url}'}}\n"), DEFAULT_KEYS)
    try:
        for bad in ({"cf-aig-otel-trace-id": "zz"}, {"cf-aig-otel-trace-id": "0" * 32},
                    {"cf-aig-otel-trace-id": "a" * 32, "cf-aig-otel-parent-span-id": "xyz"}):
            assert err(httpx.post(g.url + CHAT, json=body(), headers=bad)) == (400, 2100), bad
        ok = {"cf-aig-otel-trace-id": "a" * 32, "cf-aig-otel-parent-span-id": "b" * 16}
        assert httpx.post(g.url + CHAT, json=body(), headers=ok).status_code == 200
        assert httpx.post(g.url + CHAT, json=body(), headers={"traceparent": "garbage"}).status_code == 200
        deadline = time.time() + 8
        while metric(g, "sidegate_otel_spans_exported_total") < 1:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        g.stop()
        collector.stop()


# --- Universal endpoint and dynamic routes: the README's own examples -------------------------

def test_the_universal_endpoint_json_examples_are_served(gateway, mock):
    for start, text in code_blocks("json"):
        steps = json.loads(text)
        for url in (gateway.url + "/", gateway.url + "/v1/acct/main"):
            r = httpx.post(url, json=steps, timeout=30)
            assert r.status_code == 200, (start, r.text)
            assert r.headers["cf-aig-step"] == "0" and r.headers["cf-aig-provider"] == "openai"
    # The first step failing hands over to the next
    steps = json.loads(code_blocks("json")[0][1])
    steps[0]["query"]["model"] = "mock-status-500"
    steps[0]["config"]["maxAttempts"] = 1
    r = httpx.post(gateway.url + "/", json=steps, timeout=30)
    assert r.status_code == 200 and r.headers["cf-aig-step"] == "1" and r.headers["cf-aig-provider"] == "anthropic"


def test_the_dynamic_routes_yaml_example_is_served(mock, tmp_path):
    (start, text), = [b for b in code_blocks("yaml") if "routes:" in b[1]]
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=text.replace("spec:\n", "", 1)), DEFAULT_KEYS)
    try:
        def ask(model, **h):
            return httpx.post(g.url + "/compat/chat/completions", headers=h, timeout=30,
                              json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        r = ask("fallback/chat")
        assert (r.status_code, r.headers["cf-aig-provider"], r.headers["cf-aig-step"]) == (200, "openai", "0")
        r = ask("dynamic/support", **{"cf-aig-metadata": '{"plan": "paid"}'})
        assert (r.status_code, r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == (200, "anthropic", "claude-sonnet-4-5")
        r = ask("dynamic/support", **{"cf-aig-metadata": '{"plan": "free"}'})
        assert r.status_code == 200 and r.headers["cf-aig-provider"] in ("openai", "anthropic")
    finally:
        g.stop()


# --- Shutdown ---------------------------------------------------------------------------------

def test_shutdown_delay_longer_than_grace_is_cut_with_a_warning_and_still_serves(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--shutdown-delay", "10", "--shutdown-grace", "2"])
    try:
        assert "--shutdown-delay is part of --shutdown-grace and longer than it" in g.logs()
        g.proc.send_signal(signal.SIGTERM)
        started = time.time()
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200, "new requests are served during the delay"
        g.proc.wait(10)
        assert time.time() - started < 5 and g.proc.returncode == 0
    finally:
        g.stop()


# --- Authentication ---------------------------------------------------------------------------

def test_gateway_token_rules(authed_gateway, mock):
    g = authed_gateway
    tok = f"Bearer {GATEWAY_TOKEN}"
    with httpx.Client() as c:
        assert c.post(g.url + CHAT, json=body(), headers={"cf-aig-authorization": tok}).status_code == 200
        assert err(c.post(g.url + CHAT, json=body(), headers={"cf-aig-authorization": "Bearer wrong"})) == (401, 2009)
        twice = c.post(g.url + CHAT, json=body(), headers=[("cf-aig-authorization", tok), ("cf-aig-authorization", tok)])
        assert err(twice) == (401, 2009), "the header sent more than once"
        # The token may stand in the provider's auth header where a stored key replaces it ...
        mock.clear()
        assert c.post(g.url + CHAT, json=body(), headers={"authorization": tok}).status_code == 200
        assert mock.last()["headers"]["authorization"] == f"Bearer {DEFAULT_KEYS['openai.default']}"
        # ... and nowhere else: groq has no stored key here.
        assert err(c.post(g.url + "/groq/chat/completions", json=body(), headers={"authorization": tok})) == (401, 2009)
        assert err(c.post(g.url + "/", json=[{"provider": "openai", "endpoint": "chat/completions",
                                               "headers": {}, "query": body()}], headers={"authorization": tok})) == (401, 2009)


def test_a_key_rotated_in_the_keys_directory_is_sent_after_sighup(gateway, mock):
    (gateway.keys_dir / "openai.default").write_text("sk-sgtestkey-rotated\n")
    gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while True:
        mock.clear()
        httpx.post(gateway.url + CHAT, json=body())
        if mock.last()["headers"]["authorization"] == "Bearer sk-sgtestkey-rotated":
            break
        assert time.time() < deadline, "the rotated key is not sent"
        time.sleep(0.1)


def test_an_empty_key_file_is_skipped_with_a_warning(tmp_path):
    r = check(tmp_path, HEADER + "spec: {}\n", keys={"openai.default": "", "anthropic.default": "sk-ant-x"})
    assert r.returncode == 0, r.stderr
    assert "openai.default" in r.stdout and "1 stored key(s)" in r.stdout, r.stdout


# --- Compressed bodies, cache of non-inference requests, rate-limit counting ------------------

def test_a_compressed_body_is_refused_where_dlp_reads_it_and_passes_elsewhere(gateway, mock, tmp_path):
    import gzip
    gz = gzip.compress(json.dumps(body()).encode())
    h = {"content-encoding": "gzip", "content-type": "application/json"}
    assert httpx.post(gateway.url + CHAT, content=gz, headers=h).status_code == 200
    d = tmp_path / "dlp"
    d.mkdir()
    spec = "  dlp:\n    policies:\n      - {id: p, action: BLOCK, check: [REQUEST], profiles: [email]}\n"
    g = Sidegate(d, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        assert_envelope(httpx.post(g.url + CHAT, content=gz, headers=h), 400, 2101)
    finally:
        g.stop()


def test_non_inference_requests_bypass_the_cache_but_say_miss(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  cache: {enabled: true}\n"), DEFAULT_KEYS)
    try:
        mock.clear()
        for _ in range(2):
            r = httpx.get(g.url + "/openai/models")
            assert r.status_code == 200 and r.headers.get("cf-aig-cache-status") == "MISS"
        assert len(mock.requests()) == 2
        for _ in range(2):
            r = httpx.post(g.url + CHAT, json=body("same"))
        assert r.headers["cf-aig-cache-status"] == "HIT"
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert "cached=true" in line
    finally:
        g.stop()


def test_rate_limit_counts_cache_hits_and_body_refusals_not_bad_headers(mock, tmp_path):
    away_from_minute_boundary()
    spec = "  rateLimit: {limit: 3, interval: 3600s}\n  limits: {maxRequestBody: 1Ki}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        ttl = {"cf-aig-cache-ttl": "60"}
        assert err(httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-byok-alias": "x", "cf-aig-metadata": "!"})) == (400, 2100)
        assert err(httpx.post(g.url + "/nope/x", json=body())) == (404, 2001)
        assert err(httpx.post(g.url + CHAT, json=body("x" * 2000))) == (413, 2102)  # counted: 1
        assert httpx.post(g.url + CHAT, json=body(), headers=ttl).status_code == 200  # 2
        assert httpx.post(g.url + CHAT, json=body(), headers=ttl).headers["cf-aig-cache-status"] == "HIT"  # 3
        assert err(httpx.post(g.url + CHAT, json=body(), headers=ttl)) == (429, 2003)
    finally:
        g.stop()


def test_compat_anthropic_max_tokens_defaults_to_4096(gateway, mock):
    mock.clear()
    r = httpx.post(gateway.url + "/compat/chat/completions",
                   json={"model": "anthropic/claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert json.loads(mock.last()["body"])["max_tokens"] == 4096


# --- Cost ------------------------------------------------------------------------------------

def test_cost_table_pricing_and_unknown_models(mock, tmp_path):
    (start, text), = [b for b in code_blocks("yaml") if "pricing:" in b[1]]
    spec = text.replace("spec:\n", "", 1).replace('amount: "250.00"', 'amount: "1000.00"')
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        def cost(model):
            r = httpx.post(g.url + CHAT, json={**body(), "model": model})
            assert r.status_code == 200
            line = json.loads(g.wait_log_line(r.headers["cf-aig-log-id"]))
            assert (line["tokens_in"], line["tokens_out"]) == (1, 4)
            return line["cost"]
        assert cost("gpt-4o-mini") == pytest.approx(0.15e-6 + 4 * 0.6e-6)
        assert cost("gpt-4o-mini-2024-07-18") == pytest.approx(0.15e-6 + 4 * 0.6e-6), "longest table name it continues"
        assert cost("house-llm") == pytest.approx(0.5e-6 + 4 * 1.5e-6), "the README's spec.pricing entry"
        assert cost("totally-unknown-model") is None, "no cost, not 0"
        g.wait_for_log("give it one in spec.pricing")
        # a cache hit costs nothing
        ttl = {"cf-aig-cache-ttl": "60"}
        httpx.post(g.url + CHAT, json=body("c"), headers=ttl)
        hit = httpx.post(g.url + CHAT, json=body("c"), headers=ttl)
        line = json.loads(g.wait_log_line(hit.headers["cf-aig-log-id"]))
        assert line["cached"] is True and not line["cost"]
    finally:
        g.stop()


@pytest.mark.parametrize("period", ["week", "month"])
def test_spend_limit_retry_after_reaches_the_period_end(mock, tmp_path, period):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f'  spendLimit: {{amount: "0.000001", period: {period}}}\n'),
                 DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + CHAT, json=body()).status_code == 200
        r = httpx.post(g.url + CHAT, json=body())
        assert err(r) == (429, 2041)
        now = datetime.now(timezone.utc)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        from datetime import timedelta
        if period == "week":
            end = midnight + timedelta(days=7 - now.weekday())
        else:
            end = (midnight.replace(day=1) + timedelta(days=32)).replace(day=1)
        expected = (end - now).total_seconds()
        assert abs(int(r.headers["retry-after"]) - expected) <= 2, (r.headers["retry-after"], expected)
    finally:
        g.stop()


# --- Retries ---------------------------------------------------------------------------------

def retry_waits(g, log_id):
    g.wait_log_line(log_id)
    return [json.loads(l)["wait_ms"] for l in g.logs().splitlines() if '"retrying upstream"' in l]


@pytest.mark.parametrize("backoff,expected", [("constant", [40, 40, 40]), ("linear", [40, 80, 120]),
                                              ("exponential", [40, 80, 160])])
def test_retry_backoff_waits(mock, tmp_path, backoff, expected):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=body(), headers={
            "cf-aig-max-attempts": "4", "cf-aig-retry-delay": "40", "cf-aig-backoff": backoff,
            "x-mock-fail-first": f"3;readme-{backoff}"})
        assert r.status_code == 200
        assert retry_waits(g, r.headers["cf-aig-log-id"]) == expected
    finally:
        g.stop()


def test_retry_default_delay_is_100ms_and_4xx_is_not_retried(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-max-attempts": "2", "x-mock-fail-first": "1;readme-default"})
        assert r.status_code == 200
        assert retry_waits(g, r.headers["cf-aig-log-id"]) == [100]
        r = httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-max-attempts": "3", "x-mock-fail-first": "1;readme-400;400"})
        assert r.status_code == 400
        assert retry_waits(g, r.headers["cf-aig-log-id"]) == [100], "no retry of a 400"
    finally:
        g.stop()


def test_a_provider_asking_for_more_than_60s_gets_no_retry(tmp_path):
    from conftest import FixedAnswerServer
    srv = FixedAnswerServer(b'{"error": {"message": "slow down"}}', status=429, headers=[("retry-after", "120")])
    g = Sidegate(tmp_path, gateway_yaml(srv.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        started = time.time()
        r = httpx.post(g.url + CHAT, json=body(), headers={"cf-aig-max-attempts": "3"}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "120"
        assert time.time() - started < 5
        assert retry_waits(g, r.headers["cf-aig-log-id"]) == []
    finally:
        g.stop()
        srv.stop()


# --- Redis fails open -------------------------------------------------------------------------

def test_an_unreachable_redis_fails_open_and_is_counted(mock, tmp_path):
    dead = RefusingPort()
    spec = "  redis: {}\n  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 600, interval: 60s, scope: global}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), dict(DEFAULT_KEYS, **{"redis.url": f"redis://127.0.0.1:{dead.port}/0"}))
    try:
        started = time.time()
        r = httpx.post(g.url + CHAT, json=body(), timeout=10)
        assert r.status_code == 200 and time.time() - started < 2
        assert redis_errors(g) >= 1
    finally:
        g.stop()
        dead.close()


# --- HTTP framing of a 413 (not a README sentence; found while checking the 413/2102 row) ------

# FAILS at 6727912: a chunked body over maxRequestBody is answered 413/2102 and the connection is then closed, but the answer carries no `Connection: close`; a keep-alive client (httpx's pool) that reuses it gets "Server disconnected without sending a response" on its next request
def test_a_413_that_ends_the_connection_says_connection_close(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  limits: {maxRequestBody: 1Ki}\n"), DEFAULT_KEYS)
    s = socket.create_connection(("127.0.0.1", g.port))
    try:
        s.settimeout(5)
        s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n"
                  + b"800\r\n" + b"x" * 2048 + b"\r\n")
        data = b""
        closed = False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except socket.timeout:
            pass
        assert data.startswith(b"HTTP/1.1 413") and b'"code":2102' in data, data[:200]
        if closed:
            assert b"connection: close" in data.lower(), data.split(b"\r\n\r\n")[0]
    finally:
        s.close()
        g.stop()


# --- Providers named in the README are providers of the sidecar -------------------------------

README_PROVIDERS = ["openai", "anthropic", "azure-openai", "aws-bedrock", "google-ai-studio", "google-vertex-ai", "groq",
                    "mistral", "cohere", "deepseek", "grok", "openrouter", "perplexity-ai", "huggingface", "workers-ai",
                    "cerebras", "baseten", "parallel", "replicate", "elevenlabs", "cartesia", "fal", "ideogram"]


def test_every_provider_the_readme_names_is_known(tmp_path, gateway):
    para = section("Routes").split("Providers: ", 1)[1].split("Every upstream base URL", 1)[0]
    for p in README_PROVIDERS:
        assert f"`{p}`" in para, p
    index = "".join(f"  {p}: [default]\n" for p in README_PROVIDERS)
    r = check(tmp_path, HEADER + "spec: {}\nkeys:\n" + index)
    assert r.returncode == 0 and "no provider" not in r.stdout, r.stdout
    # (no request to them: their default upstreams are on the internet)
    assert err(httpx.post(gateway.url + "/not-a-provider/x", json=body())) == (404, 2001)


@pytest.mark.parametrize("node,needle", [
    ("retries: 5", "retries must be 0 to 4"), ("timeout: 2h", "timeout must be 1ms to 1h")])
def test_route_node_bounds_are_refused_with_the_node_path(tmp_path, node, needle):
    spec = ("spec:\n  routes:\n    - name: r\n      nodes:\n        - {id: start, type: start, next: m}\n"
            f"        - {{id: m, type: model, provider: openai, model: gpt-4o-mini, {node}, next: end}}\n"
            "        - {id: end, type: end}\n")
    r = check(tmp_path, HEADER + spec)
    assert r.returncode == 2 and "spec.routes[0].nodes[1]" in r.stderr and needle in r.stderr, r.stderr


def test_universal_endpoint_takes_at_most_16_steps(gateway, mock):
    step = {"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": body()}
    assert httpx.post(gateway.url + "/", json=[step] * 16).status_code == 200
    assert err(httpx.post(gateway.url + "/", json=[step] * 17)) == (400, 2108)
    assert httpx.post(gateway.url + "/", json=step).status_code == 200, "or one step"


def test_expect_is_dropped_and_metadata_quoted_in_text_logs(gateway, mock):
    mock.clear()
    r = httpx.post(gateway.url + CHAT, json=body(), headers={"expect": "100-continue",
                                                             "cf-aig-metadata": '{"team": "a b"}'})
    assert r.status_code == 200
    assert "expect" not in mock.last()["headers"]
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert 'metadata="{\\"team\\":\\"a b\\"}"' in line, line


def test_compat_embeddings_route(gateway, mock):
    r = httpx.post(gateway.url + "/compat/embeddings", json={"model": "openai/text-embedding-3-small", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_examples_logging_enabled_false_writes_no_access_line_and_queries_never_logged(mock, tmp_path):
    # examples/gateway.yaml documents `logging: {enabled: true}  # one log line per request (never
    # keys, never query strings)`; the README itself never names spec.logging.enabled.
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  logging: {enabled: false}\n"), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + CHAT + "?api-version=q-secret", json=body())
        httpx.post(g.url + CHAT, json=body("after"))
        time.sleep(0.6)
        assert r.headers["cf-aig-log-id"] not in g.logs() and "q-secret" not in g.logs()
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 2, "still counted"
    finally:
        g.stop()


def test_a_plain_edit_of_a_key_file_is_picked_up_without_sighup(gateway, mock):
    (gateway.keys_dir / "openai.default").write_text("sk-sgtestkey-edited\n")
    deadline = time.time() + 8
    while True:
        mock.clear()
        httpx.post(gateway.url + CHAT, json=body())
        if mock.last()["headers"]["authorization"] == "Bearer sk-sgtestkey-edited":
            break
        assert time.time() < deadline, "the edited key is not sent"
        time.sleep(0.2)


def test_grok_paths_with_and_without_v1_reach_the_same_upstream_path(mock, tmp_path):
    # README: `/grok/chat/completions` and `/grok/v1/chat/completions` both reach
    # https://api.x.ai/v1/chat/completions. The base URL the sidecar joins them to is the host
    # (https://api.x.ai): an override written as `.../v1`, like cerebras' documented default,
    # would reach /v1/v1/... (the README does not say which form grok/deepseek/openrouter take).
    g = Sidegate(tmp_path, gateway_yaml(mock.url) + f"    grok: {{baseURL: '{mock.url}'}}\n", DEFAULT_KEYS)
    try:
        for path in ("/grok/chat/completions", "/grok/v1/chat/completions"):
            mock.clear()
            assert httpx.post(g.url + path, json=body(), headers={"authorization": "Bearer x"}).status_code == 200
            assert mock.last()["path"] == "/v1/chat/completions", path
    finally:
        g.stop()
