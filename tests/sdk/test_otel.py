"""OpenTelemetry export (spec.openTelemetry): one GenAI span per request, posted as OTLP/HTTP
JSON to a collector stub on loopback; the client's trace (traceparent or cf-aig-otel-*) is
joined; a collector that is down never affects requests."""

import http.server
import json
import re
import signal
import threading
import time

import anthropic
import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, KEY_MARKER, Sidegate, assert_refused_at_start, gateway_yaml

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


class Collector:
    """An OTLP/HTTP collector stub: keeps every JSON body posted to /v1/traces."""

    def __init__(self, status=200, endless=False):
        self.bodies = []
        self.paths = []
        self.content_types = []
        self.sent = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(n)
                collector.paths.append(self.path)
                collector.content_types.append(self.headers.get("content-type"))
                if status == 200:
                    collector.bodies.append(json.loads(raw))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if endless:
                    # An answer that never ends (a broken collector or proxy): chunks of
                    # whitespace until the reader goes away, 60 s at most.
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
                    deadline = time.monotonic() + 60
                    try:
                        while time.monotonic() < deadline:
                            self.wfile.write(chunk)
                            collector.sent += len(chunk)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        if endless:
            Handler.protocol_version = "HTTP/1.1"  # chunked framing
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self):
        """Every span received, with its attributes and its resource's as plain dicts."""
        out = []
        for body in list(self.bodies):
            for rs in body["resourceSpans"]:
                resource = attributes(rs["resource"])
                for ss in rs["scopeSpans"]:
                    for s in ss["spans"]:
                        out.append(dict(s, attrs=attributes(s), resource=resource))
        return out

    def wait_span(self, log_id, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.spans():
                if s["attrs"].get("sidegate.log_id") == log_id:
                    return s
            time.sleep(0.05)
        raise AssertionError(f"no span for {log_id}; got {self.spans()}")

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def value(v):
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        assert isinstance(v["intValue"], str), "OTLP JSON writes 64-bit integers as strings"
        return int(v["intValue"])
    if "doubleValue" in v:
        return v["doubleValue"]
    if "boolValue" in v:
        return v["boolValue"]
    raise AssertionError(f"unexpected attribute value {v}")


def attributes(obj):
    return {a["key"]: value(a["value"]) for a in obj.get("attributes", [])}


def otel_gateway(mock, tmp_path, endpoint, service="checkout", more_providers=""):
    spec = more_providers + f"  openTelemetry: {{endpoint: '{endpoint}', serviceName: {service}}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    return g


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


@pytest.fixture
def traced(mock, tmp_path, collector):
    g = otel_gateway(mock, tmp_path, collector.url)
    yield g
    g.stop()


def metric(g, name):
    for line in g.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_an_openai_sdk_request_becomes_a_gen_ai_client_span(traced, collector):
    oa = openai.OpenAI(base_url=traced.url + "/openai", api_key="placeholder", max_retries=0)
    before = time.time_ns()
    resp = oa.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "trace me"}],
        extra_headers={"cf-aig-metadata": '{"team": "payments", "tier": 2, "paid": true}'})
    after = time.time_ns()
    usage = resp.parse().usage
    s = collector.wait_span(resp.headers["cf-aig-log-id"])
    assert collector.paths[0] == "/v1/traces"
    assert collector.content_types[0] == "application/json"
    assert s["resource"]["service.name"] == "checkout"
    assert s["resource"]["sidegate.gateway"] == "team-a/main"
    assert s["name"] == "chat gpt-4o-mini"
    assert s["kind"] == 3  # SPAN_KIND_CLIENT
    assert HEX32.match(s["traceId"]) and HEX16.match(s["spanId"])
    assert "parentSpanId" not in s
    start, end = int(s["startTimeUnixNano"]), int(s["endTimeUnixNano"])
    # Wall-clock times around the request: a second's slack, for a loaded machine may pause
    # the sidecar between the last byte written and the span's end (50 ms failed once).
    assert before - 1_000_000_000 <= start <= end <= after + 1_000_000_000
    a = s["attrs"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.system"] == a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert a["http.response.status_code"] == 200
    assert a["sidegate.cached"] is False
    expected = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert a["sidegate.cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert (a["sidegate.metadata.team"], a["sidegate.metadata.tier"], a["sidegate.metadata.paid"]) == (
        "payments", 2, True)
    assert s["status"].get("code", 0) == 0
    # Keys, headers and bodies stay out of spans.
    raw = json.dumps(collector.bodies)
    assert "sgtestkey" not in raw and "trace me" not in raw and "placeholder" not in raw
    assert metric(traced, "sidegate_otel_spans_exported_total") >= 1


def test_an_anthropic_sdk_stream_becomes_a_span_with_its_usage(traced, collector):
    an = anthropic.Anthropic(base_url=traced.url + "/anthropic", api_key="placeholder", max_retries=0)
    with an.messages.stream(model="claude-haiku-4-5", max_tokens=64,
                            messages=[{"role": "user", "content": "stream a trace"}]) as st:
        final = st.get_final_message()
        log_id = st.response.headers["cf-aig-log-id"]
    s = collector.wait_span(log_id)
    a = s["attrs"]
    assert s["name"] == "chat claude-haiku-4-5"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-haiku-4-5"
    assert a["gen_ai.usage.input_tokens"] == final.usage.input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == final.usage.output_tokens > 0
    assert a["http.response.status_code"] == 200


def test_the_clients_trace_is_joined_from_traceparent_or_cf_aig_otel_headers(traced, collector, mock):
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    oa = openai.OpenAI(base_url=traced.url + "/openai", api_key="placeholder", max_retries=0)
    r1 = oa.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "w3c"}],
        extra_headers={"traceparent": f"00-{trace}-{parent}-01"})
    an = anthropic.Anthropic(base_url=traced.url + "/anthropic", api_key="placeholder", max_retries=0)
    trace2, parent2 = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    r2 = an.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "cf"}],
        extra_headers={"cf-aig-otel-trace-id": trace2.upper(), "cf-aig-otel-parent-span-id": parent2})
    s1 = collector.wait_span(r1.headers["cf-aig-log-id"])
    s2 = collector.wait_span(r2.headers["cf-aig-log-id"])
    assert (s1["traceId"], s1["parentSpanId"]) == (trace, parent)
    assert (s2["traceId"], s2["parentSpanId"]) == (trace2, parent2)
    assert s1["spanId"] not in (parent, s2["spanId"])
    # The cf-aig-otel-* headers never reach the provider; traceparent is the client's own.
    sent = [q["headers"] for q in mock.requests()]
    assert sent[0]["traceparent"] == f"00-{trace}-{parent}-01"
    assert not any(k.lower().startswith("cf-aig-") for h in sent for k in h)


def test_a_malformed_cf_aig_otel_trace_id_is_400_2100_and_not_sent(traced, mock, collector):
    for name, bad in [("cf-aig-otel-trace-id", "not-a-trace-id"),
                      ("cf-aig-otel-parent-span-id", "00f067aa0ba902b7ff")]:
        r = httpx.post(traced.url + "/openai/chat/completions",
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                       headers={name: bad})
        assert r.status_code == 400
        body = r.json()
        assert body["success"] is False
        assert body["error"][0]["code"] == 2100 and name in body["error"][0]["message"]
    assert mock.requests() == []
    # The refusals are spans too, each in a new trace (the bad id is not used).
    deadline = time.monotonic() + 10
    while len(collector.spans()) < 2:
        assert time.monotonic() < deadline, collector.spans()
        time.sleep(0.05)
    for s in collector.spans():
        assert s["attrs"]["http.response.status_code"] == 400
        assert s["attrs"]["sidegate.error_code"] == 2100
        assert s["attrs"]["sidegate.outcome"] == "refused"
        assert HEX32.match(s["traceId"]) and "parentSpanId" not in s
        assert s["status"].get("code", 0) == 0


def test_an_unreachable_provider_is_an_error_span_in_the_clients_trace(mock, tmp_path, collector, refusing_port):
    down = f"    deepseek: {{baseURL: '{refusing_port.url}'}}\n"
    g = otel_gateway(mock, tmp_path, collector.url, more_providers=down)
    try:
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        r = httpx.post(g.url + "/deepseek/chat/completions",
                       json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}]},
                       headers={"cf-aig-otel-trace-id": trace, "authorization": "Bearer placeholder"})
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104)
        deadline = time.monotonic() + 10
        while not collector.spans():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [s] = collector.spans()
        assert s["traceId"] == trace and "parentSpanId" not in s
        assert s["status"]["code"] == 2
        assert s["name"] == "chat"
        assert s["attrs"]["gen_ai.provider.name"] == "deepseek"
        assert s["attrs"]["http.response.status_code"] == 502
        assert s["attrs"]["error.type"] == "502"
        assert s["attrs"]["sidegate.error_code"] == 2104
    finally:
        g.stop()


def test_a_5xx_from_the_provider_is_an_error_span(traced, collector):
    r = httpx.post(traced.url + "/openai/chat/completions",
                   json={"model": "mock-status-500", "messages": [{"role": "user", "content": "x"}]},
                   headers={"cf-aig-max-attempts": "1"})
    assert r.status_code == 500
    s = collector.wait_span(r.headers["cf-aig-log-id"])
    assert s["status"]["code"] == 2  # STATUS_CODE_ERROR
    assert s["attrs"]["http.response.status_code"] == 500
    assert s["attrs"]["error.type"] == "500"


def test_spans_still_queued_are_exported_on_shutdown(mock, tmp_path, collector):
    g = otel_gateway(mock, tmp_path, collector.url)
    try:
        r = httpx.post(g.url + "/openai/chat/completions",
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bye"}]})
        assert r.status_code == 200
    finally:
        g.stop()  # well before the 2 s batch timer
    assert g.proc.returncode == 0
    assert [s["attrs"]["sidegate.log_id"] for s in collector.spans()] == [r.headers["cf-aig-log-id"]]


@pytest.mark.parametrize("down", ["unreachable", "500"])
def test_with_the_collector_down_requests_succeed_and_lost_spans_are_counted(mock, tmp_path, down, refusing_port):
    if down == "unreachable":
        endpoint, stub = refusing_port.url, None
    else:
        stub = Collector(status=500)
        endpoint = stub.url
    g = otel_gateway(mock, tmp_path, endpoint)
    try:
        oa = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        for batch in (1, 2):
            raw = oa.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "still works"}])
            assert raw.parse().choices[0].message.content
            deadline = time.monotonic() + 10
            while (metric(g, "sidegate_otel_spans_failed_total") or 0) < batch:
                assert time.monotonic() < deadline, g.metrics()
                time.sleep(0.05)
        assert metric(g, "sidegate_otel_spans_exported_total") == 0
        assert metric(g, "sidegate_otel_spans_dropped_total") == 0
        # Two failed batches within 10 s: one warning.
        assert g.logs().count("OpenTelemetry export failed") == 1
        g.wait_log_line(raw.headers["cf-aig-log-id"])  # the last line is out
        assert KEY_MARKER not in g.logs()
    finally:
        g.stop()
        if stub:
            stub.stop()


def test_an_invalid_endpoint_is_refused_at_load_naming_the_field(mock, tmp_path):
    assert_refused_at_start(mock, tmp_path, "  openTelemetry: {endpoint: 'otel-collector:4317'}\n",
                            "spec.openTelemetry.endpoint", "otel-collector:4317")


def test_a_collector_answer_that_never_ends_is_read_to_64_kib_and_the_export_counts(mock, tmp_path):
    """The answer is read only so the connection can be reused: a collector (or a proxy in front
    of it) that keeps sending must neither hold the exporter until its timeout nor fill memory."""
    stub = Collector(endless=True)
    g = otel_gateway(mock, tmp_path, stub.url)
    try:
        for batch in (1, 2):
            r = httpx.post(g.url + "/openai/chat/completions",
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            started = time.monotonic()
            # The 2 s batch timer, then the post: well within the 10 s export timeout.
            while (metric(g, "sidegate_otel_spans_exported_total") or 0) < batch:
                assert time.monotonic() - started < 6, g.logs() + g.metrics()
                time.sleep(0.05)
        assert metric(g, "sidegate_otel_spans_failed_total") == 0
        # The gateway stopped reading near 64 KiB; the kernel's socket buffers hold the rest.
        assert stub.sent < 16 * 1024 * 1024, stub.sent
        assert len(stub.spans()) == 2
    finally:
        g.stop()
        stub.stop()


def test_a_stream_cut_at_the_shutdown_grace_deadline_still_gets_its_span(mock, tmp_path, collector):
    spec = f"  openTelemetry: {{endpoint: '{collector.url}', serviceName: checkout}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS,
                 extra_args=["--shutdown-grace", "1"])
    try:
        body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "a long stream"}]}
        # ~4 s of events (500 ms each) against a grace period of 1 s: cut off by the exit.
        with httpx.stream("POST", g.url + "/openai/chat/completions", json=body, timeout=20,
                          headers={"x-mock-chunk-delay-ms": "500"}) as r:
            log_id = r.headers["cf-aig-log-id"]
            chunks = r.iter_raw()
            next(chunks)
            g.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):
                b"".join(chunks)
        assert g.proc.wait(15) == 0
    finally:
        g.stop()
    span = collector.wait_span(log_id, timeout=1)
    assert span["attrs"]["sidegate.outcome"] == "cancelled", span
    assert span["name"].startswith("chat"), span
