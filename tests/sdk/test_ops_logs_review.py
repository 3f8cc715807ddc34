"""Operations and logging as a production user meets them: every line about a request joined to
its access line by its log id, refused and served access lines alike, a second stop signal, a bad
RUST_LOG said, and a rejected reload visible on /metrics. Each test failed before its fix (the
commit named in its comment)."""

import json
import os
import pathlib
import signal
import threading
import time

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, StallingServer, gateway_yaml

MESSAGES = [{"role": "user", "content": "hi"}]


def json_lines(g):
    """The JSON log lines of `g` (`--log-format json`), parsed."""
    return [json.loads(line) for line in g.logs().splitlines() if line.startswith("{")]


def wait_for(cond, timeout, what, every=0.05):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(every)
    return value


def sample(g, name):
    """The value of the sample written exactly as `name` on /metrics, or None."""
    for line in g.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def checked_gateway(mock, tmp_path):
    """A gateway whose prompts and responses pass guardrails (hate: flag, violence: block) and a
    DLP policy flagging card numbers both ways, logging JSON."""
    spec = (f"  guardrails:\n    moderationURL: '{mock.url}/v1/moderations'\n"
            "    prompt: {violence: block, hate: flag}\n    response: {hate: flag}\n"
            "  dlp:\n    policies:\n"
            "      - {id: cards, action: FLAG, check: [REQUEST, RESPONSE], profiles: [credit-card]}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS,
                 extra_args=["--log-format", "json"])
    mock.clear()
    return g


# FAILS before the logs branch: the prompt's `guardrails: flagged` / `guardrails: blocked` lines
# and the universal/compat fallback lines had no log id (the id was drawn only once the answer
# came); the response's lines had it only inside a `response_checks` span, and a DLP FLAG match
# wrote no line at all.
def test_every_process_line_about_a_request_names_the_log_id_of_its_access_line(mock, tmp_path):
    g = checked_gateway(mock, tmp_path)
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "mock-flag:hate card 4111 1111 1111 1111"}])
        served = raw.headers["cf-aig-log-id"]
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "mock-flag:violence"}])
        assert refused.value.status_code == 424
        blocked = refused.value.response.headers["cf-aig-log-id"]
        g.wait_log_line(blocked)
        g.wait_log_line(served)
        lines = json_lines(g)
        about_served = [x for x in lines if x.get("log_id") == served]
        said = {(x["message"], x.get("side") or x.get("check")) for x in about_served}
        assert {("guardrails: flagged", "prompt"), ("guardrails: flagged", "response"),
                ("dlp: flagged", "REQUEST")} <= said, about_served
        # The DLP line names the policy, as the cf-aig-dlp header does.
        dlp = next(x for x in about_served if x["message"] == "dlp: flagged")
        assert "cards" in dlp["policies"] and json.loads(raw.headers["cf-aig-dlp"])[0]["policy"] == "cards"
        about_blocked = [x["message"] for x in lines if x.get("log_id") == blocked]
        assert about_blocked == ["guardrails: blocked", "request refused"], about_blocked
        # No line about these requests goes without its id.
        for x in lines:
            if x.get("message", "").startswith(("guardrails:", "dlp:")):
                assert x.get("log_id") in (served, blocked), x
            assert "span" not in x, x
    finally:
        g.stop()


# FAILS before the logs branch: a compat route's fallback line ("route target failed, trying the
# next") named no log id.
def test_a_fallback_line_names_the_log_id_of_the_request_it_served(mock, tmp_path, refusing_port):
    spec = (f"  providers:\n    openai: {{baseURL: '{refusing_port.url}/v1'}}\n"
            f"    anthropic: {{baseURL: '{mock.url}'}}\n"
            "  routes:\n    - name: fallback\n      nodes:\n"
            "        - {id: start, type: start, next: first}\n"
            "        - {id: first, type: model, provider: openai, model: gpt-4o-mini, next: second}\n"
            "        - {id: second, type: model, provider: anthropic, model: claude-haiku-4-5, next: end}\n"
            "        - {id: end, type: end}\n")
    text = ("schemaVersion: 1\ngateway: {namespace: team-a, name: main}\nspec:\n" + spec)
    g = Sidegate(tmp_path, text, DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        client = openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="dynamic/fallback", messages=MESSAGES)
        log_id = raw.headers["cf-aig-log-id"]
        assert raw.headers["cf-aig-provider"] == "anthropic"
        g.wait_log_line(log_id)
        (failed,) = [x for x in json_lines(g) if x.get("message") == "route target failed, trying the next"]
        assert failed["log_id"] == log_id, failed
    finally:
        g.stop()


# FAILS before the logs branch: the universal endpoint's `universal step failed` named no log id.
def test_a_universal_step_failure_names_the_log_id_of_the_request(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        steps = [{"provider": "openai", "endpoint": "chat/completions", "headers": {},
                  "query": {"model": "mock-status-503", "messages": MESSAGES}},
                 {"provider": "anthropic", "endpoint": "v1/messages", "headers": {},
                  "query": {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": MESSAGES}}]
        r = httpx.post(g.url + "/", json=steps)
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
        log_id = r.headers["cf-aig-log-id"]
        g.wait_log_line(log_id)
        (failed,) = [x for x in json_lines(g) if x.get("message") == "universal step failed, trying the next"]
        assert (failed["step"], failed["log_id"]) == (0, log_id), failed
    finally:
        g.stop()


# FAILS before the logs branch: `retrying upstream` named no log id.
def test_a_retry_line_names_the_log_id_of_the_request_it_retried(tmp_path):
    upstream = FixedAnswerServer(b'{"error": {"message": "busy"}}', status=503,
                                 then=[(200, b'{"id": "c", "object": "chat.completion", "choices": []}')])
    spec = "  retries: {maxAttempts: 2, retryDelay: 10ms, backoff: constant}\n"
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec=spec), DEFAULT_KEYS,
                 extra_args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + "/openai/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
        assert r.status_code == 200, r.text
        log_id = r.headers["cf-aig-log-id"]
        g.wait_log_line(log_id)
        (retry,) = [x for x in json_lines(g) if x.get("message") == "retrying upstream"]
        assert retry["log_id"] == log_id, retry
    finally:
        g.stop()
        upstream.stop()


# FAILS before the logs branch: a refusal for an unknown provider logged `path` as requested,
# `/nowhere/x` (and `/v1/acct/main/nowhere/x` in the long form), where every other access line
# names the path after the gateway without its leading slash (`chat/completions`).
def test_refused_and_served_access_lines_write_path_and_fields_alike(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        served = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        wanted = {
            "/nowhere/x": "nowhere/x",
            "/v1/acct/main/nowhere/x": "nowhere/x",
            "/v1/acct/main/openai/chat/completions": "chat/completions",
        }
        lines = {}
        for path in wanted:
            r = httpx.post(g.url + path, json={"model": "gpt-4o-mini", "messages": MESSAGES},
                           headers={"cf-aig-metadata": "not json"} if "openai" in path else {})
            assert r.status_code in (400, 404), r.text
            lines[path] = json.loads(g.wait_log_line(r.headers["cf-aig-log-id"]))
        served_line = json.loads(g.wait_log_line(served.headers["cf-aig-log-id"]))
        assert served_line["path"] == "chat/completions"
        assert {p: x["path"] for p, x in lines.items()} == wanted
        # The same fields, in the same order (SPEC.md's and the gateway's own), either way.
        for x in lines.values():
            assert list(x) == list(served_line), (list(x), list(served_line))
            assert x["outcome"] == "refused" and x["success"] is False
    finally:
        g.stop()


def _stalled_request(g, results):
    try:
        results.append(httpx.post(g.url + "/openai/chat/completions", timeout=60,
                                  json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code)
    except httpx.HTTPError as e:
        results.append(repr(e))


@pytest.mark.parametrize("first,second,status", [
    (signal.SIGTERM, signal.SIGTERM, 128 + 15),
    (signal.SIGINT, signal.SIGTERM, 128 + 15),
    (signal.SIGTERM, signal.SIGINT, 128 + 2),
])
# FAILS before the logs branch: a second signal was ignored; the sidecar waited out the whole
# --shutdown-grace (30 s here) for the stalled request.
def test_a_second_stop_signal_during_the_grace_exits_at_once(tmp_path, first, second, status):
    stall = StallingServer()
    g = Sidegate(tmp_path, gateway_yaml(stall.url), DEFAULT_KEYS, extra_args=["--shutdown-grace", "30"])
    results = []
    try:
        t = threading.Thread(target=_stalled_request, args=(g, results), daemon=True)
        t.start()
        wait_for(lambda: stall.held, 10, "the request did not reach the upstream")
        g.proc.send_signal(first)
        g.wait_for_log("signal received")
        g.wait_for_log("shutting down: new connections refused")
        time.sleep(0.3)
        assert g.proc.poll() is None, "the first signal ended the drain at once"
        signalled = time.monotonic()
        g.proc.send_signal(second)
        assert g.proc.wait(5) == status
        assert time.monotonic() - signalled < 3
        assert "second signal during the shutdown: exiting now" in g.logs()
    finally:
        g.stop()
        stall.stop()


# FAILS before the logs branch: a RUST_LOG directive that does not parse turned the whole filter
# into `info` without a word; `RUST_LOG=warning` (a bare word, read as a target) logged nothing.
@pytest.mark.parametrize("rust_log,ignored,kept_debug", [
    ("debug,hyper=lots", '"hyper=lots"', True),
    ("warning", '"warning": not a level', False),
])
def test_a_bad_rust_log_is_said_once_naming_the_directive(mock, tmp_path, monkeypatch, rust_log, ignored,
                                                           kept_debug):
    monkeypatch.setenv("SIDEGATE_TEST_RUST_LOG", rust_log)
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        lines = json_lines(g)
        said = [x for x in lines if x.get("message") == "RUST_LOG: directives ignored"]
        assert len(said) == 1, lines
        assert ignored in said[0]["ignored"] and said[0]["level"] == "WARN", said
        assert said[0]["filter"] == ("debug" if kept_debug else "info"), said
        # What was kept (or the info fallback) still logs the start, and the requests.
        assert any(x.get("message") == "sidegate listening" for x in lines)
        r = httpx.post(g.url + "/openai/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
        g.wait_log_line(r.headers["cf-aig-log-id"])
        assert any(x.get("level") == "DEBUG" for x in json_lines(g)) == kept_debug
    finally:
        g.stop()


# FAILS before the logs branch: /metrics had only the reload counters; nothing told that the
# config serving is an older one kept after a rejected reload, nor since when it was loaded.
def test_a_rejected_reload_reads_0_on_metrics_until_a_valid_config_is_back(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    ok, when = "sidegate_config_last_reload_successful", "sidegate_config_last_reload_success_timestamp_seconds"
    try:
        assert sample(g, ok) == 1
        started = sample(g, when)
        assert abs(started - time.time()) < 60, started
        good = g.config.read_text()
        g.config.write_text(good + "  bogusField: 1\n")
        g.wait_for_log("config reload rejected")
        wait_for(lambda: sample(g, ok) == 0, 5, "the gauge did not drop to 0")
        assert sample(g, when) == started
        # The same good config back (unchanged from what serves): valid again.
        g.config.write_text(good)
        wait_for(lambda: sample(g, ok) == 1, 10, "the gauge did not come back to 1")
        assert sample(g, when) > started
        # An edit that changes the config is a successful reload too.
        g.config.write_text(good.replace("name: main", "name: other"))
        wait_for(lambda: 'gateway="team-a/other"' in g.metrics(), 10, "the edit was not loaded")
        assert sample(g, ok) == 1
        text = g.metrics()
        assert "# TYPE sidegate_config_last_reload_successful gauge" in text
        assert "# TYPE sidegate_config_last_reload_success_timestamp_seconds gauge" in text
    finally:
        g.stop()
