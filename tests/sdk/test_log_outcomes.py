"""What the access log, the metrics and the spans say of requests whose answer the client did not
get as the provider sent it: an answer blocked by a DLP response policy (400/2030) or a response
guardrail (424/2017) is recorded as that refusal (its tokens still charged), on every path (a
provider's route, a cache hit, /compat, the universal endpoint); refused requests carry their log
id and metadata in their spans and name the route's provider everywhere; client metadata cannot
fake text-log fields; costs are written without float noise."""

import json
import shlex

import httpx

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, Sidegate, gateway_yaml
from test_live_reload import reload_count, wait_for
from test_otel import Collector

CHAT = "/openai/chat/completions"
SECRET = "AKIAIOSFODNN7EXAMPLE"
DLP_BLOCK = "  dlp:\n    policies:\n      - {id: no-keys-out, action: BLOCK, check: [RESPONSE], profiles: [aws-keys]}\n"
PAYLOADS = "  logging: {payloads: true}\n"


def body(text, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def start(mock, tmp_path, spec, json_logs=True, auth=False):
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN}) if auth else DEFAULT_KEYS
    args = ["--log-format", "json"] if json_logs else []
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=auth, extra_spec=spec), keys, extra_args=args)
    mock.clear()
    return g


def json_line(g, log_id):
    return json.loads(g.wait_log_line(log_id))


def metric(g, name_and_labels):
    for line in g.metrics().splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.split()[-1])
    return 0.0


def assert_recorded_as_refusal(g, r, status, code, provider="openai"):
    """The log line of response `r` (blocked by the response checks) tells what the client got;
    returns it."""
    assert r.status_code == status, r.text
    assert r.json()["error"][0]["code"] == code
    line = json_line(g, r.headers["cf-aig-log-id"])
    assert (line["status_code"], line["success"], line["outcome"]) == (status, False, "refused"), line
    assert line["provider"] == provider, line
    # The logged answer is the error the client got, never the text it blocked.
    if "response_body" in line:
        assert line["response_body"] == r.text, line
        assert SECRET not in line["response_body"] and "mock-flag" not in line["response_body"], line
    assert line["bytes"] == len(r.content), line
    return line


def test_a_response_blocked_by_dlp_is_logged_counted_and_traced_as_the_refusal(mock, tmp_path):
    collector = Collector()
    spec = DLP_BLOCK + PAYLOADS + f"  openTelemetry: {{endpoint: '{collector.url}'}}\n"
    g = start(mock, tmp_path, spec)
    try:
        r = httpx.post(g.url + CHAT, json=body(f"echo {SECRET}"))
        line = assert_recorded_as_refusal(g, r, 400, 2030)
        # The provider produced the answer: its tokens are counted and charged.
        assert line["tokens_in"] and line["tokens_out"], line
        assert line["cost"] and line["cost"] > 0, line
        assert SECRET in line["request_body"], "the request itself is logged as it came"
        assert metric(g, 'sidegate_requests_total{provider="openai",status="400"}') == 1
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 0
        assert metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}') == line["tokens_out"]
        assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') > 0
        span = collector.wait_span(r.headers["cf-aig-log-id"])
        a = span["attrs"]
        assert (a["http.response.status_code"], a["sidegate.outcome"], a["sidegate.error_code"]) == \
            (400, "refused", 2030), a
        assert a["sidegate.cost_usd"] > 0, a
        # A clean answer is still the provider's success.
        ok = httpx.post(g.url + CHAT, json=body("hello"))
        line = json_line(g, ok.headers["cf-aig-log-id"])
        assert (line["status_code"], line["success"], line["outcome"]) == (200, True, "complete"), line
        assert line["response_body"] == ok.text, line
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 1
        # The line of the refusal names its status and log id as they are.
        logs = g.logs()
        (refused,) = [x for x in logs.splitlines() if '"response refused"' in x]
        refused = json.loads(refused)
        assert (refused["status"], refused["code"], refused["log_id"]) == (400, 2030, r.headers["cf-aig-log-id"])
    finally:
        g.stop()
        collector.stop()


def test_a_blocked_stream_and_a_blocked_cache_hit_are_refusals_too(mock, tmp_path):
    flag = DLP_BLOCK.replace("action: BLOCK", "action: FLAG")
    g = start(mock, tmp_path, flag + PAYLOADS + "  cache: {enabled: true, ttl: 10m}\n")
    try:
        # An answer stored while the policy only flagged it...
        stored = httpx.post(g.url + CHAT, json=body(f"cache {SECRET}"))
        assert stored.status_code == 200 and "no-keys-out" in stored.headers.get("cf-aig-dlp", ""), stored.text
        before = reload_count(g, "success")
        g.config.write_text(g.config.read_text().replace("action: FLAG", "action: BLOCK"))
        wait_for(lambda: reload_count(g, "success") > before, 8, "the blocking policy was not loaded")
        r = httpx.post(g.url + CHAT, json=body(f"stream {SECRET}", stream=True))
        assert_recorded_as_refusal(g, r, 400, 2030)
        # ...is refused from the cache once the policy blocks it.
        hit = httpx.post(g.url + CHAT, json=body(f"cache {SECRET}"))
        line = assert_recorded_as_refusal(g, hit, 400, 2030)
        assert line["cached"] is True, line
        assert len(mock.requests()) == 2, "the second answer came from the cache"
        # An answer the policy blocked is not stored: asked again, the provider answers again.
        for _ in range(2):
            again = httpx.post(g.url + CHAT, json=body(f"again {SECRET}"))
            line = assert_recorded_as_refusal(g, again, 400, 2030)
            assert line["cached"] is False, line
        assert len(mock.requests()) == 4
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 1
        assert metric(g, 'sidegate_requests_total{provider="openai",status="400"}') == 4
    finally:
        g.stop()


def test_compat_and_universal_answers_blocked_by_dlp_are_refusals(mock, tmp_path):
    g = start(mock, tmp_path, DLP_BLOCK + PAYLOADS)
    try:
        compat = {"model": "anthropic/claude-haiku-4-5", "messages": [{"role": "user", "content": f"echo {SECRET}"}]}
        r = httpx.post(g.url + "/compat/chat/completions", json=compat)
        assert_recorded_as_refusal(g, r, 400, 2030, provider="anthropic")
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(compat, stream=True))
        assert_recorded_as_refusal(g, r, 400, 2030, provider="anthropic")
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(compat, model="openai/gpt-4o-mini"))
        assert_recorded_as_refusal(g, r, 400, 2030)
        step = {"provider": "openai", "endpoint": "chat/completions",
                "headers": {"authorization": "Bearer placeholder", "content-type": "application/json"},
                "query": body(f"echo {SECRET}")}
        r = httpx.post(g.url + "/", json=[step])
        assert_recorded_as_refusal(g, r, 400, 2030)
        compat_step = {"provider": "compat", "endpoint": "chat/completions", "headers": {}, "query": compat}
        r = httpx.post(g.url + "/", json=[compat_step])
        assert_recorded_as_refusal(g, r, 400, 2030, provider="anthropic")
        assert metric(g, 'sidegate_requests_total{provider="anthropic",status="200"}') == 0
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 0
    finally:
        g.stop()


def test_a_response_blocked_by_a_guardrail_is_a_424_refusal_with_its_log_id_on_its_lines(mock, tmp_path):
    spec = f"  guardrails:\n    moderationURL: '{mock.url}/v1/moderations'\n    response: {{self-harm: block, violence: flag}}\n"
    g = start(mock, tmp_path, spec + PAYLOADS, json_logs=False)
    try:
        r = httpx.post(g.url + CHAT, json=body("say mock-flag:self-harm"))
        assert r.status_code == 424 and r.json()["error"][0]["code"] == 2017, r.text
        log_id = r.headers["cf-aig-log-id"]
        line = g.wait_log_line(log_id)
        assert " provider=openai " in line and " status_code=424 success=false " in line, line
        assert " outcome=refused " in line, line
        assert "mock reply" not in line.split(" response_body=", 1)[1], line
        assert metric(g, 'sidegate_requests_total{provider="openai",status="424"}') == 1
        assert metric(g, 'sidegate_requests_total{provider="openai",status="200"}') == 0
        logs = g.logs().splitlines()
        (refused,) = [x for x in logs if " response refused " in x]
        assert " status=424 code=2017 " in refused and f" log_id={log_id}" in refused, refused
        assert "Some(" not in refused, refused
        (blocked,) = [x for x in logs if "guardrails: blocked" in x]
        assert log_id in blocked, blocked
        # A flagged answer goes through; its line names the request too.
        ok = httpx.post(g.url + CHAT, json=body("say mock-flag:violence"))
        assert ok.status_code == 200
        line = g.wait_log_line(ok.headers["cf-aig-log-id"])
        assert " status_code=200 success=true " in line and " outcome=complete" in line, line
        (flagged,) = [x for x in g.logs().splitlines() if "guardrails: flagged" in x]
        assert ok.headers["cf-aig-log-id"] in flagged, flagged
    finally:
        g.stop()


def test_a_refused_request_span_carries_its_log_id_and_metadata(mock, tmp_path):
    collector = Collector()
    spec = f"  openTelemetry: {{endpoint: '{collector.url}'}}\n"
    g = start(mock, tmp_path, spec)
    try:
        r = httpx.post(g.url + CHAT, json=body("hi"), headers={
            "cf-aig-custom-cost": "not a cost", "cf-aig-metadata": '{"team": "a", "n": 2}'})
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2100), r.text
        span = collector.wait_span(r.headers["cf-aig-log-id"])
        a = span["attrs"]
        assert (a["sidegate.outcome"], a["sidegate.error_code"]) == ("refused", 2100), a
        assert (a["sidegate.metadata.team"], a["sidegate.metadata.n"]) == ("a", 2), a
        assert a["gen_ai.provider.name"] == "openai", a
        # A bad metadata header itself: the span has the id, and no metadata.
        r = httpx.post(g.url + CHAT, json=body("hi"), headers={"cf-aig-metadata": "[1]"})
        assert r.status_code == 400
        a = collector.wait_span(r.headers["cf-aig-log-id"])["attrs"]
        assert not [k for k in a if k.startswith("sidegate.metadata.")], a
    finally:
        g.stop()
        collector.stop()


def test_a_refused_request_names_the_routes_provider_in_its_lines_and_metric(mock, tmp_path):
    g = start(mock, tmp_path, "", json_logs=False, auth=True)
    try:
        r = httpx.post(g.url + CHAT, json=body("hi"))
        assert r.status_code == 401
        log_id = r.headers["cf-aig-log-id"]
        line = g.wait_log_line(log_id)
        assert " provider=openai " in line and " outcome=refused" in line, line
        (refused,) = [x for x in g.logs().splitlines() if " request refused " in x and log_id in x]
        assert " provider=openai " in refused and " status=401 code=2009 " in refused, refused
        assert metric(g, 'sidegate_requests_total{provider="openai",status="401"}') == 1
        assert metric(g, 'sidegate_requests_total{provider="none",status="401"}') == 0
        # A route that names no known provider is still "none".
        r = httpx.post(g.url + "/nowhere/chat/completions", json=body("hi"))
        assert r.status_code in (400, 401, 404)
        assert metric(g, f'sidegate_requests_total{{provider="none",status="{r.status_code}"}}') == 1
    finally:
        g.stop()


def test_metadata_cannot_fake_text_log_fields(gateway, mock):
    forged = '{"team":"a status_code=200 success=true outcome=complete"}'
    r = httpx.post(gateway.url + CHAT, json=body("hi"),
                   headers={"cf-aig-metadata": forged, "cf-aig-custom-cost": "nope"})
    assert r.status_code == 400
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    fields = dict(t.split("=", 1) for t in shlex.split(line.split(" INFO request ", 1)[1]))
    assert (fields["status_code"], fields["success"], fields["outcome"]) == ("400", "false", "refused"), line
    assert json.loads(fields["metadata"]) == json.loads(forged), line
    keys = [t.split("=", 1)[0] for t in shlex.split(line.split(" INFO request ", 1)[1])]
    assert len(keys) == len(set(keys)), line


def significant_digits(number_text):
    mantissa = number_text.lower().split("e")[0].lstrip("-")
    return len(mantissa.replace(".", "").lstrip("0"))


def test_costs_are_logged_and_traced_without_float_noise(mock, tmp_path):
    collector = Collector()
    g = start(mock, tmp_path, f"  openTelemetry: {{endpoint: '{collector.url}'}}\n")
    try:
        # The mock's usage grows with the prompt: some of these sums of price times tokens land
        # on float noise (0.000016800000000000002).
        ids = []
        for n in range(1, 25):
            r = httpx.post(g.url + CHAT, json=body("word " * n))
            assert r.status_code == 200
            ids.append(r.headers["cf-aig-log-id"])
        for log_id in ids:
            raw = g.wait_log_line(log_id)
            cost = raw.split('"cost":', 1)[1].split(",", 1)[0]
            assert cost != "null" and significant_digits(cost) <= 12, raw
            usd = collector.wait_span(log_id)["attrs"]["sidegate.cost_usd"]
            assert significant_digits(repr(usd)) <= 12, usd
    finally:
        g.stop()
        collector.stop()


def test_a_request_refused_after_its_body_was_read_logs_the_model_it_names(mock, tmp_path):
    # A refusal before the body is read (401, a rate limit) cannot know the model; one after
    # (a DLP block, a timeout with every retry spent — logged upstream_error —, a client gone
    # while it waited) logs it, as a served request's line does.
    spec = ("  requestTimeout: 300ms\n  dlp:\n    policies:\n"
            "      - {id: no-keys-in, action: BLOCK, check: [REQUEST], profiles: [aws-keys]}\n")
    g = start(mock, tmp_path, spec)
    try:
        blocked = httpx.post(g.url + CHAT, json=body(f"echo {SECRET}"))
        line = assert_recorded_as_refusal(g, blocked, 400, 2029)
        assert line["model"] == "gpt-4o-mini", line
        slow = httpx.post(g.url + CHAT, json=body("hi", model="gpt-4o"), headers={"x-mock-delay-ms": "2000"})
        assert slow.status_code == 504, slow.text
        line = json_line(g, slow.headers["cf-aig-log-id"])
        assert (line["outcome"], line["model"]) == ("upstream_error", "gpt-4o"), line
        # The client leaves while the provider takes its time: cancelled, 499, with the model.
        cancelled_before = g.logs().count('"status_code":499')
        try:
            httpx.post(g.url + CHAT, json=body("hi", model="gpt-4o-nano"), timeout=0.1,
                       headers={"x-mock-delay-ms": "2000"})
        except httpx.TimeoutException:
            pass
        logs = g.wait_for_log('"model":"gpt-4o-nano"')
        (line,) = [json.loads(l) for l in logs.splitlines() if '"model":"gpt-4o-nano"' in l]
        assert (line["status_code"], line["outcome"]) == (499, "cancelled"), line
        assert g.logs().count('"status_code":499') == cancelled_before + 1
        # /compat: the model of the target it was refused before.
        compat = httpx.post(g.url + "/compat/chat/completions",
                            json=dict(body(f"echo {SECRET}"), model="openai/gpt-4.1-mini"))
        line = assert_recorded_as_refusal(g, compat, 400, 2029)
        assert line["model"] == "gpt-4.1-mini", line
        # Refused before the body was read: no model.
        unknown = httpx.post(g.url + CHAT, json=body("hi"), headers={"cf-aig-byok-alias": "nope"})
        assert unknown.status_code == 400, unknown.text
        assert json_line(g, unknown.headers["cf-aig-log-id"])["model"] is None
    finally:
        g.stop()
