"""The access log: one line per request with SPEC.md's fields (id, created_at, provider, model,
path, status_code, success, cached, duration, tokens_in, tokens_out, cost, custom_cost, metadata,
step, event_id), refused requests included; per-request log options: cf-aig-metadata (validated,
logged), cf-aig-collect-log, and the bodies of spec.logging.payloads (cf-aig-collect-log-payload)."""

import datetime
import json
import time
import uuid

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate, binary, gateway_yaml

CHAT = "/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "log me"}]}
SPEC_FIELDS = {"id", "created_at", "provider", "model", "path", "status_code", "success", "cached", "duration",
               "tokens_in", "tokens_out", "cost", "custom_cost", "metadata", "step", "event_id"}


def wait_line(g, log_id):
    """The access log line of the request `log_id` (text or JSON, as the gateway writes them)."""
    return g.wait_log_line(log_id)


ROUTE = """  cache: {enabled: true, ttl: 10m}
  routes:
    - name: tiers
      nodes:
        - {id: s, type: start, next: down}
        - {id: down, type: model, provider: openai, model: mock-status-503, retries: 1, next: up}
        - {id: up, type: model, provider: anthropic, model: claude-haiku-4-5, next: e}
        - {id: e, type: end}
"""


@pytest.fixture
def json_gateway(mock, tmp_path):
    """JSON logs, gateway authentication, the cache and a dynamic route whose first target fails."""
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True, extra_spec=ROUTE), keys, extra_args=["--log-format", "json"])
    mock.clear()
    yield g
    g.stop()


AUTH = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}


def json_line(g, log_id):
    line = json.loads(wait_line(g, log_id))
    assert SPEC_FIELDS <= line.keys(), f"missing {SPEC_FIELDS - line.keys()}: {line}"
    assert not {"log_id", "timestamp", "status", "duration_ms"} & line.keys(), line
    assert line["id"] == log_id
    return line


def test_a_served_request_is_logged_with_the_spec_fields(json_gateway, mock):
    before = datetime.datetime.now(datetime.timezone.utc)
    r = httpx.post(json_gateway.url + CHAT, json=BODY, headers={
        **AUTH, "cf-aig-metadata": '{"team": "a", "n": 2}', "cf-aig-event-id": "order-42"})
    assert r.status_code == 200 and r.headers["cf-aig-event-id"] == "order-42"
    line = json_line(json_gateway, r.headers["cf-aig-log-id"])
    created = datetime.datetime.fromisoformat(line["created_at"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(seconds=1) <= created <= datetime.datetime.now(datetime.timezone.utc)
    usage = r.json()["usage"]
    assert {k: line[k] for k in ("provider", "model", "path", "status_code", "success", "cached", "custom_cost",
                                 "metadata", "step", "event_id", "tokens_in", "tokens_out", "outcome", "method")} == {
        "provider": "openai", "model": "gpt-4o-mini", "path": "chat/completions", "status_code": 200,
        "success": True, "cached": False, "custom_cost": False, "metadata": {"team": "a", "n": 2}, "step": None,
        "event_id": "order-42", "tokens_in": usage["prompt_tokens"], "tokens_out": usage["completion_tokens"],
        "outcome": "complete", "method": "POST"}
    assert isinstance(line["duration"], float) and line["duration"] > 0
    assert line["cost"] > 0
    # A provider error is logged as it came, and is no success.
    r = httpx.post(json_gateway.url + CHAT, json=dict(BODY, model="mock-status-500"), headers=AUTH)
    line = json_line(json_gateway, r.headers["cf-aig-log-id"])
    assert (line["status_code"], line["success"], line["event_id"], line["metadata"]) == (500, False, None, None)


def test_a_cache_hit_through_a_dynamic_route_logs_what_answered(json_gateway, mock):
    c = openai.OpenAI(base_url=json_gateway.url + "/compat", api_key="placeholder", max_retries=0, default_headers=AUTH)

    def ask():
        return c.chat.completions.with_raw_response.create(
            model="dynamic/tiers", messages=[{"role": "user", "content": "cache my route"}],
            extra_headers={"cf-aig-event-id": "evt-hit"})

    miss = ask()
    assert (miss.headers["cf-aig-cache-status"], miss.headers["cf-aig-step"]) == ("MISS", "1")
    line = json_line(json_gateway, miss.headers["cf-aig-log-id"])
    assert (line["provider"], line["model"], line["step"], line["cached"]) == \
        ("anthropic", "claude-haiku-4-5", 1, False)
    hit = ask()
    assert hit.headers["cf-aig-cache-status"] == "HIT"
    line = json_line(json_gateway, hit.headers["cf-aig-log-id"])
    assert {k: line[k] for k in ("provider", "model", "step", "cached", "success", "path", "event_id", "cost")} == {
        "provider": "anthropic", "model": "claude-haiku-4-5", "step": 1, "cached": True, "success": True,
        "path": "compat/chat/completions", "event_id": "evt-hit", "cost": None}
    assert 'provider="dynamic/' not in json_gateway.metrics()


def test_a_refused_request_gets_a_log_id_and_a_line(json_gateway, mock):
    client_key = f"sk-{KEY_MARKER}-client-own"
    wrong_token = f"Bearer wrong-{KEY_MARKER}"
    r = httpx.post(json_gateway.url + CHAT, json=BODY, headers={
        "cf-aig-authorization": wrong_token, "authorization": f"Bearer {client_key}",
        "cf-aig-metadata": '{"team": "a"}', "cf-aig-event-id": "evt-401"})
    assert (r.status_code, r.json()["error"][0]["code"]) == (401, 2009)
    assert r.headers["cf-aig-event-id"] == "evt-401" and len(r.headers["cf-aig-log-id"]) == 26
    line = json_line(json_gateway, r.headers["cf-aig-log-id"])
    assert {k: line[k] for k in ("provider", "model", "path", "status_code", "success", "cached", "outcome",
                                 "metadata", "event_id", "tokens_in", "cost", "step")} == {
        "provider": "openai", "model": None, "path": "chat/completions", "status_code": 401, "success": False,
        "cached": False, "outcome": "refused", "metadata": {"team": "a"}, "event_id": "evt-401",
        "tokens_in": None, "cost": None, "step": None}
    assert line["bytes"] == len(r.content)
    # Bad metadata is the refusal: logged without it. An unknown route names no provider: `none`,
    # as in sidegate_requests_total.
    bad = httpx.post(json_gateway.url + CHAT, json=BODY, headers={**AUTH, "cf-aig-metadata": "[1]"})
    line = json_line(json_gateway, bad.headers["cf-aig-log-id"])
    assert (line["status_code"], line["metadata"], line["provider"]) == (400, None, "openai")
    nowhere = httpx.post(json_gateway.url + "/nowhere/x", json=BODY, headers=AUTH)
    line = json_line(json_gateway, nowhere.headers["cf-aig-log-id"])
    assert (line["status_code"], line["provider"], line["path"]) == (404, "none", "nowhere/x")
    # cf-aig-collect-log: false holds for refusals too.
    quiet = httpx.post(json_gateway.url + CHAT, json=BODY, headers={"cf-aig-collect-log": "false"})
    assert quiet.status_code == 401 and "cf-aig-log-id" in quiet.headers
    marker = httpx.post(json_gateway.url + CHAT, json=BODY)
    wait_line(json_gateway, marker.headers["cf-aig-log-id"])
    assert quiet.headers["cf-aig-log-id"] not in json_gateway.logs()
    logs = json_gateway.logs()
    assert client_key not in logs and wrong_token not in logs and GATEWAY_TOKEN not in logs
    assert mock.requests() == []


def test_a_request_the_client_gives_up_on_before_its_answer_is_logged_as_cancelled(json_gateway, mock):
    # The provider takes 3 s to answer; the client leaves after 0.5 s.
    headers = {**AUTH, "x-mock-delay-ms": "3000", "cf-aig-event-id": "evt-gone", "cf-aig-metadata": '{"team": "a"}'}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(json_gateway.url + CHAT, json=BODY, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 5
    while '"event_id":"evt-gone"' not in json_gateway.logs():
        assert time.monotonic() < deadline, "no line for the request the client gave up on"
        time.sleep(0.05)
    (line,) = [json.loads(l) for l in json_gateway.logs().splitlines() if '"event_id":"evt-gone"' in l]
    assert {k: line[k] for k in ("provider", "path", "status_code", "success", "outcome", "metadata")} == {
        "provider": "openai", "path": "chat/completions", "status_code": 499, "success": False,
        "outcome": "cancelled", "metadata": {"team": "a"}}
    assert 'sidegate_requests_total{provider="openai",status="499"} 1' in json_gateway.metrics()


def test_a_rate_limited_request_is_logged_as_refused(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  rateLimit: {limit: 1, interval: 1h}\n"), DEFAULT_KEYS)
    try:
        assert httpx.post(g.url + CHAT, json=BODY).status_code == 200
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(BODY, model="openai/gpt-4o-mini"),
                       headers={"cf-aig-event-id": "evt 429"})
        assert r.status_code == 429
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert f" request id={r.headers['cf-aig-log-id']} provider=none method=POST path=compat/chat/completions " \
               "status_code=429 success=false duration=" in line, line
        assert line.rstrip().endswith(' outcome=refused event_id="evt 429"'), line
    finally:
        g.stop()


def test_text_lines_use_the_spec_names(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"cf-aig-event-id": "evt-text"})
    line = wait_line(gateway, r.headers["cf-aig-log-id"])
    assert f" INFO request id={r.headers['cf-aig-log-id']} provider=openai method=POST path=chat/completions " \
           "status_code=200 success=true duration=" in line, line
    assert line.rstrip().endswith(" event_id=evt-text"), line
    assert "log_id=" not in line and " status=" not in line and "duration_ms=" not in line


def test_metadata_is_logged_with_the_request(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"cf-aig-metadata": '{"team": "a", "user_plan": "paid", "n": 2}'})
    assert r.status_code == 200
    line = wait_line(gateway, r.headers["cf-aig-log-id"])
    meta = json.loads(line.split(" metadata=", 1)[1])
    assert meta == {"team": "a", "user_plan": "paid", "n": 2}
    assert "cf-aig-metadata" not in mock.last()["headers"]


def test_metadata_past_five_entries_is_ignored_not_refused(gateway, mock):
    # Cloudflare: "only the first five will be saved; additional entries will be ignored".
    sent = '{"f": 6, "a": 1, "b": "two", "c": true, "d": 4.5, "e": "five", "g": {"nested": 1}}'
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"cf-aig-metadata": sent})
    assert r.status_code == 200, r.text
    line = wait_line(gateway, r.headers["cf-aig-log-id"])
    assert line.split(" metadata=", 1)[1].split(" ", 1)[0] == '{"f":6,"a":1,"b":"two","c":true,"d":4.5}', line


def test_metadata_in_json_logs_is_an_object(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=BODY, headers={"cf-aig-metadata": '{"team":"b"}'})
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert json.loads(line)["metadata"] == {"team": "b"}
    finally:
        g.stop()


def test_collect_log_false_writes_no_line_but_still_counts(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"cf-aig-collect-log": "false"})
    assert r.status_code == 200
    marker = httpx.post(gateway.url + CHAT, json=BODY)
    wait_line(gateway, marker.headers["cf-aig-log-id"])
    assert r.headers["cf-aig-log-id"] not in gateway.logs()
    assert 'sidegate_requests_total{provider="openai",status="200"} 2' in gateway.metrics()


def test_invalid_metadata_is_400_2100(gateway, mock):
    for bad in ['{"a": {"b": 1}}', "[1, 2]", '{"a": null}', "nope"]:
        r = httpx.post(gateway.url + CHAT, json=BODY, headers={"cf-aig-metadata": bad})
        assert r.status_code == 400, bad
        err = r.json()["error"][0]
        assert err["code"] == 2100 and "cf-aig-metadata" in err["message"]
    assert mock.requests() == []


def test_token_counts_from_responses_are_logged_and_counted(gateway, mock):
    import anthropic
    import openai

    oa = openai.OpenAI(base_url=gateway.url + "/openai", api_key="placeholder", max_retries=0)
    resp = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "count my tokens"}])
    usage = resp.parse().usage
    line = wait_line(gateway, resp.headers["cf-aig-log-id"])
    assert f"tokens_in={usage.prompt_tokens} tokens_out={usage.completion_tokens}" in line, line

    stream = oa.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream and count"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream.parse())
    last = chunks[-1].usage
    line = wait_line(gateway, stream.headers["cf-aig-log-id"])
    assert f"tokens_in={last.prompt_tokens} tokens_out={last.completion_tokens}" in line, line

    an = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key="placeholder", max_retries=0)
    with an.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "anthropic counts"}]) as s:
        final = s.get_final_message()
        log_id = s.response.headers["cf-aig-log-id"]
    line = wait_line(gateway, log_id)
    assert f"tokens_in={final.usage.input_tokens} tokens_out={final.usage.output_tokens}" in line, line

    metrics = gateway.metrics()
    total_in = usage.prompt_tokens + last.prompt_tokens
    assert f'sidegate_tokens_total{{provider="openai",direction="input"}} {total_in}' in metrics, metrics
    assert f'sidegate_tokens_total{{provider="anthropic",direction="output"}} {final.usage.output_tokens}' in metrics


def test_upstream_answers_come_uncompressed_whatever_the_client_accepts(gateway, mock):
    # The mock gzips JSON for clients that accept it, as the providers' CDNs do; token counting
    # (and DLP, guardrails, /compat, the cache) read the answer's bytes.
    direct = httpx.post(mock.url + "/v1/chat/completions", json=BODY,
                        headers={"authorization": "Bearer x", "accept-encoding": "gzip"})
    assert direct.headers["content-encoding"] == "gzip"
    mock.clear()
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"accept-encoding": "gzip, deflate, br"})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert mock.last()["headers"]["accept-encoding"] == "identity"
    usage = r.json()["usage"]
    line = wait_line(gateway, r.headers["cf-aig-log-id"])
    assert f"tokens_in={usage['prompt_tokens']} tokens_out={usage['completion_tokens']}" in line, line


@pytest.fixture
def payload_gateway(mock, tmp_path):
    spec = "  logging: {payloads: true}\n  cache: {enabled: true}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    mock.clear()
    yield g
    g.stop()


def test_payload_logging_puts_both_bodies_in_the_log_line(payload_gateway, mock):
    client = openai.OpenAI(base_url=payload_gateway.url + "/openai", api_key="placeholder", max_retries=0)
    resp = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "log my words"}])
    line = json.loads(wait_line(payload_gateway, resp.headers["cf-aig-log-id"]))
    assert json.loads(line["request_body"])["messages"][0]["content"] == "log my words"
    assert json.loads(line["response_body"])["choices"][0]["message"]["content"] == "mock reply to: log my words"
    assert "payload_truncated" not in line
    # A cache hit logs the cached body it served.
    hit = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "log my words"}])
    assert hit.headers["cf-aig-cache-status"] == "HIT"
    line = json.loads(wait_line(payload_gateway, hit.headers["cf-aig-log-id"]))
    assert line["cached"] is True
    assert json.loads(line["response_body"])["choices"][0]["message"]["content"] == "mock reply to: log my words"
    # Provider keys travel in headers, never in a logged body.
    assert OPENAI_KEY not in payload_gateway.logs()


def test_streams_are_logged_as_the_client_got_them_and_long_bodies_are_cut(payload_gateway, mock):
    client = openai.OpenAI(base_url=payload_gateway.url + "/openai", api_key="placeholder", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "stream and log"}]) as resp:
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        log_id = resp.headers["cf-aig-log-id"]
    line = json.loads(wait_line(payload_gateway, log_id))
    assert line["response_body"].startswith("data: ") and line["response_body"].rstrip().endswith("data: [DONE]")
    assert text and all(w in line["response_body"] for w in text.split())
    long = "x" * (40 * 1024)
    r = httpx.post(payload_gateway.url + CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": long}]}, timeout=10)
    line = json.loads(wait_line(payload_gateway, r.headers["cf-aig-log-id"]))
    assert line["payload_truncated"] is True
    assert len(line["request_body"]) == 32 * 1024


def test_collect_log_payload_false_logs_the_request_without_bodies(payload_gateway, mock):
    r = httpx.post(payload_gateway.url + CHAT, json=BODY, headers={"cf-aig-collect-log-payload": "false"})
    line = json.loads(wait_line(payload_gateway, r.headers["cf-aig-log-id"]))
    assert line["status_code"] == 200 and "request_body" not in line and "response_body" not in line
    assert "cf-aig-collect-log-payload" not in mock.last()["headers"]
    bad = httpx.post(payload_gateway.url + CHAT, json=BODY, headers={"cf-aig-collect-log-payload": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"][0]["code"] == 2100


def test_compat_logs_the_bodies_the_client_sent_and_got(payload_gateway, mock):
    client = openai.OpenAI(base_url=payload_gateway.url + "/compat", api_key="placeholder", max_retries=0)
    resp = client.chat.completions.with_raw_response.create(
        model="anthropic/claude-haiku-4-5", messages=[{"role": "user", "content": "translate and log"}])
    line = json.loads(wait_line(payload_gateway, resp.headers["cf-aig-log-id"]))
    assert json.loads(line["request_body"])["model"] == "anthropic/claude-haiku-4-5"
    # The OpenAI-shaped answer the client got, not Anthropic's wire format.
    assert json.loads(line["response_body"])["object"] == "chat.completion"


def test_universal_requests_log_the_answering_steps_body_never_the_step_headers(payload_gateway, mock):
    # Universal steps may carry the client's own provider keys in their `headers`: the log line
    # gets the body of the step that answered, which is what the provider was sent.
    client_key = f"sk-{KEY_MARKER}-client-own"
    steps = [{"provider": "custom-local", "endpoint": "chat/completions",
              "headers": {"x-custom-key": client_key, "x-mock-fail-first": f"1;{uuid.uuid4().hex}"},
              "query": {"model": "first-try", "messages": [{"role": "user", "content": "one"}]}},
             {"provider": "openai", "endpoint": "chat/completions", "headers": {"authorization": f"Bearer {client_key}"},
              "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "two"}]}}]
    r = httpx.post(payload_gateway.url + "/", json=steps)
    assert r.status_code == 200 and r.headers["cf-aig-step"] == "1", r.text
    line = json.loads(wait_line(payload_gateway, r.headers["cf-aig-log-id"]))
    assert json.loads(line["request_body"]) == steps[1]["query"]
    assert client_key not in payload_gateway.logs()


def test_a_log_pipe_that_stops_draining_stalls_neither_requests_nor_probes(mock, tmp_path):
    """stderr is a pipe nobody reads (a stuck log collector): requests and /healthz go on, the
    lines past the held limit are dropped, and their count is logged once the pipe drains."""
    import fcntl
    import os
    import subprocess
    import time

    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  logging: {payloads: true}\n"), DEFAULT_KEYS,
                 wait_ready=False)
    g.stop()
    proc = subprocess.Popen(
        [binary("sidegate"), "--config", str(g.config), "--keys-dir", str(g.keys_dir),
         "--listen", f"127.0.0.1:{g.port}", "--admin", f"127.0.0.1:{g.admin_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, RUST_LOG="debug"))
    try:
        g.proc = proc
        g.wait_ready()
        big = dict(BODY, messages=[{"role": "user", "content": "x" * 32 * 1024}])
        with httpx.Client(timeout=5) as c:
            # Each line carries ~40 KB of payload: the 64 KiB pipe is full after two, the 4 MiB
            # the gateway holds after ~100.
            for i in range(160):
                assert c.post(g.url + CHAT, json=big).status_code == 200, i
                if i % 40 == 0:
                    assert c.get(g.admin + "/healthz").status_code == 200, i
        fd = proc.stderr.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        got, deadline = b"", time.monotonic() + 10
        while b"log lines dropped" not in got:
            assert time.monotonic() < deadline, got[-500:]
            try:
                got += os.read(fd, 1 << 20) or b""
            except BlockingIOError:
                time.sleep(0.02)
        quiet = time.monotonic() + 1
        while time.monotonic() < quiet:
            try:
                more = os.read(fd, 1 << 20)
                got += more
                quiet = time.monotonic() + 1
            except BlockingIOError:
                time.sleep(0.02)
        note = got[got.index(b"WARN "):].split(b"\n")[0].decode()
        assert int(note.split()[1]) > 0, note
        # What was kept is whole lines, in order.
        ids = [json.loads(l[l.index(b"{"):])["id"] if l.startswith(b"{") else l.split(b" id=")[1].split()[0]
               for l in got.split(b"\n") if b" request id=" in l]
        assert len(ids) > 50, len(ids)
    finally:
        proc.kill()
        proc.wait()


def test_duration_is_in_milliseconds(json_gateway, mock):
    # SPEC.md: duration (ms). The mock holds its answer 300 ms: in seconds it would be ~0.3, in
    # microseconds ~300000. (This gateway caches: no cache hit.)
    no_cache = {**AUTH, "cf-aig-skip-cache": "true"}
    r = httpx.post(json_gateway.url + CHAT, json=BODY, headers={**no_cache, "x-mock-delay-ms": "300"})
    assert r.status_code == 200
    line = json_line(json_gateway, r.headers["cf-aig-log-id"])
    assert (line["outcome"], line["cached"]) == ("complete", False), line
    assert 300 <= line["duration"] < 30000, line
    # A request the upstream failed (the attempt timed out after 300 ms) is timed the same way.
    r = httpx.post(json_gateway.url + CHAT, json=BODY, headers={
        **no_cache, "x-mock-delay-ms": "3000", "cf-aig-request-timeout": "300", "cf-aig-max-attempts": "1"})
    assert r.status_code == 504, r.text
    line = json_line(json_gateway, r.headers["cf-aig-log-id"])
    assert line["outcome"] == "upstream_error", line
    assert 300 <= line["duration"] < 30000, line


def test_text_lines_give_the_duration_in_milliseconds(gateway, mock):
    r = httpx.post(gateway.url + CHAT, json=BODY, headers={"x-mock-delay-ms": "300", "cf-aig-skip-cache": "true"})
    assert r.status_code == 200
    line = wait_line(gateway, r.headers["cf-aig-log-id"])
    duration = float(line.split(" duration=")[1].split()[0])
    assert 300 <= duration < 30000, line
