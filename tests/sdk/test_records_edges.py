"""Edges of what the sidecar records about requests: access log lines (text and JSON) under
hostile client values, dropped-line accounting when stderr stops draining, metric label
cardinality from client input, and OpenTelemetry export against strict or stalled collectors."""

import http.server
import json
import re
import socket
import subprocess
import threading
import time
import unicodedata

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, drain_stderr, gateway_yaml, start_with_stderr_piped

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
INT64 = (-(2**63), 2**63 - 1)


def raw_request(g, path: bytes, headers: bytes = b"", body: bytes | None = None):
    """Sends one HTTP/1.1 request with bytes the SDKs would not send; returns (status, headers)."""
    body = json.dumps(CHAT).encode() if body is None else body
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    try:
        s.sendall(
            b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    head = out.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    return status, hdrs


def text_fields(line: str) -> dict:
    """Parses a text access line the way README describes it: `key=value` pairs, a value bare
    (visible ASCII, no quote) or quoted and escaped like a JSON string. Fails on anything else."""
    head = " INFO request "
    assert head in line, line
    rest = line.rstrip("\n").split(head, 1)[1]
    dec = json.JSONDecoder()
    fields, i = {}, 0
    while i < len(rest):
        m = re.compile(r"([a-z_]+)=").match(rest, i)
        assert m, f"no key at {i}: {rest[i:i + 60]!r} in {line!r}"
        key, i = m.group(1), m.end()
        if rest[i:i + 1] == '"':
            try:
                val, i = dec.raw_decode(rest, i)
            except json.JSONDecodeError as e:
                raise AssertionError(f"quoted value of {key} does not end where it should ({e}): {line!r}")
        else:
            j = rest.find(" ", i)
            j = len(rest) if j < 0 else j
            val = rest[i:j]
            assert '"' not in val and all(c.isascii() and c.isprintable() for c in val), (
                f"bare value of {key} is not plain visible ASCII: {val!r} in {line!r}")
            i = j
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = val
        if i < len(rest):
            assert rest[i] == " ", f"junk after {key}: {rest[i:i + 40]!r}"
            i += 1
    return fields


def log_line_bytes(g, log_id, timeout=5):
    """The access line of `log_id` as the bytes stderr got (text or JSON)."""
    deadline = time.monotonic() + timeout
    needles = (f" request id={log_id} ".encode(), f'"id":"{log_id}"'.encode())
    while True:
        for line in open(g.log_path, "rb").read().split(b"\n"):
            if any(n in line for n in needles) and b"request refused" not in line:
                return line
        assert time.monotonic() < deadline, f"no access line for {log_id}"
        time.sleep(0.05)


@pytest.fixture
def text_gateway(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    yield g
    g.stop()


@pytest.fixture
def json_gateway(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  logging: {payloads: true}\n"),
                 DEFAULT_KEYS, extra_args=["--log-format", "json"])
    yield g
    g.stop()


# Failed at 491b9b9 (mended since): the text line writes `path` bare (access_log.rs text_line:
# "Request paths are visible ASCII without spaces"), but `"` is visible ASCII and the HTTP parser
# lets it through: `path="v1/chat/completions status_code=200 ...` opens a quoted value that
# swallows the following fields for any logfmt reader; provider/model/event_id holding `"` are
# quoted.
def test_a_path_holding_a_quote_is_quoted_in_the_text_line(text_gateway):
    status, hdrs = raw_request(text_gateway, b'/openai/"v1/chat/completions')
    line = log_line_bytes(text_gateway, hdrs["cf-aig-log-id"]).decode()
    fields = text_fields(line)
    assert fields["path"] == '"v1/chat/completions', line
    assert fields["status_code"] == str(status), line


# Failed at 491b9b9 (mended since): C1 control characters (U+0085 NEL, U+009B CSI) from a client's
# cf-aig-event-id (obs-text bytes C2 85 / C2 9B), the body's model name and the request path
# (written bare, access_log.rs:266) reach the text line raw: json_str (access_log.rs) escapes only <
# U+0020, and text_value quotes but does not escape them. NEL is a line break to Unicode-aware
# readers; CSI starts an ANSI sequence on 8-bit terminals. The process's own lines escape every
# `char::is_control` (OneLine).
def test_c1_control_characters_never_reach_a_text_line_raw(text_gateway):
    body = json.dumps(dict(CHAT, model="gpt\u0085x\u009b[2Jy")).encode()
    _, hdrs = raw_request(text_gateway, b"/openai/v1/chat/completions",
                          b"cf-aig-event-id: ev\xc2\x85a\xc2\x9b[31mb\r\n", body)
    # A path past ASCII (the HTTP parser takes UTF-8 in the request target) is written bare.
    _, path_hdrs = raw_request(text_gateway, b"/openai/\xc2\x9b[2Jv1/chat/completions")
    raws = [log_line_bytes(text_gateway, h["cf-aig-log-id"]) for h in (hdrs, path_hdrs)]
    for raw in raws:
        controls = [hex(ord(c)) for c in raw.decode() if unicodedata.category(c) == "Cc"]
        assert controls == [], f"control characters {controls} raw in {raw!r}"
    fields = text_fields(raws[0].decode())
    assert fields["event_id"] == "ev\u0085a\u009b[31mb"
    assert fields["model"] == "gpt\u0085x\u009b[2Jy"
    assert text_fields(raws[1].decode())["path"] == "\u009b[2Jv1/chat/completions"


def test_json_lines_stay_parseable_and_exact_under_hostile_values(json_gateway):
    meta = '{"k\\u0085\\u2028":"v\\u001b[2J","a b":"x\\"y\\\\","n":18446744073709551615}'
    body = json.dumps(dict(CHAT, model="m\"\\\n\u001b\u009b", messages=[
        {"role": "user", "content": "line\nbreak \"quoted\" \\ \u0000 \u2028"}])).encode()
    cases = [
        (b'/openai/"v1/chat/completions', b"", None),
        (b"/openai/v1/chat/completions", b"cf-aig-event-id: a\xff\xc2\x85\"\\\tq x=1\r\n", None),
        (b"/openai/v1/chat/completions", b"cf-aig-metadata: " + meta.encode() + b"\r\n", None),
        (b"/openai/v1/chat/completions", b"", body),
        (b"/zz\"q/%0a/a", b"cf-aig-event-id: \"}{\r\n", None),
    ]
    for path, headers, b in cases:
        _, hdrs = raw_request(json_gateway, path, headers, b)
        raw = log_line_bytes(json_gateway, hdrs["cf-aig-log-id"])
        v = json.loads(raw)
        assert v["id"] == hdrs["cf-aig-log-id"] and v["message"] == "request", raw
        if b"metadata" in headers:
            assert v["metadata"]["a b"] == 'x"y\\' and v["metadata"]["k\u0085\u2028"] == "v\u001b[2J"
        if b is not None:
            assert v["model"] == "m\"\\\n\u001b\u009b"
            assert json.loads(v["request_body"]) == json.loads(b)
    assert b"sgtestkey" not in open(json_gateway.log_path, "rb").read()


def test_client_chosen_providers_models_and_paths_add_no_metric_labels(text_gateway):
    c = httpx.Client(timeout=10)

    def burst(lo, hi):
        for i in range(lo, hi):
            c.post(f"{text_gateway.url}/zz{i}/chat/completions", json=CHAT)
            c.post(f"{text_gateway.url}/custom-zz{i}/v1/chat/completions", json=CHAT)
            c.post(f"{text_gateway.url}/compat/chat/completions", json=dict(CHAT, model=f"zz{i}/m"))
            c.post(f"{text_gateway.url}/", json=[{"provider": f"zz{i}", "endpoint": "chat/completions",
                                                   "headers": {}, "query": CHAT}])
            c.post(f"{text_gateway.url}/openai/v1/chat/completions", json=dict(CHAT, model=f"model-{i}"))
            c.post(f"{text_gateway.url}/openai/v1/x{i}", json=CHAT)

    burst(0, 5)
    before = text_gateway.metrics()
    burst(5, 25)
    after = text_gateway.metrics()
    c.close()
    labels = set(re.findall(r'provider="([^"]*)"', after))
    assert labels <= {"none", "openai"}, labels
    series = lambda text: {l.rsplit(" ", 1)[0] for l in text.splitlines() if l and not l.startswith("#")}
    assert series(after) == series(before), series(after) ^ series(before)


class StrictCollector:
    """An OTLP/HTTP JSON collector that decodes like protojson: an `intValue` outside int64 makes
    the whole request a 400 (as the OpenTelemetry Collector answers), else 200."""

    def __init__(self):
        self.bodies, self.rejected = [], []
        me = self

        def bad_ints(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k == "intValue" and not INT64[0] <= int(v) <= INT64[1]:
                        yield v
                    yield from bad_ints(v)
            elif isinstance(o, list):
                for v in o:
                    yield from bad_ints(v)

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                doc = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                bad = list(bad_ints(doc))
                (me.rejected if bad else me.bodies).append(doc)
                self.send_response(400 if bad else 200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def log_ids(self):
        return {a["value"].get("stringValue") for b in self.bodies for rs in b["resourceSpans"]
                for ss in rs["scopeSpans"] for s in ss["spans"] for a in s["attributes"]
                if a["key"] == "sidegate.log_id"}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def metric(g, name):
    for line in g.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# Failed at 491b9b9 (mended since): otel.rs any_value writes a cf-aig-metadata integer as `intValue`
# whatever its size; `{"n": 18446744073709551615}` becomes intValue "18446744073709551615", outside
# OTLP's int64 (OTEP 0178: such integers go as string_value). A collector decoding OTLP JSON refuses
# the whole POST, so one client's header loses every span batched with it (here another request's
# span; sidegate_otel_spans_failed_total 2).
def test_a_metadata_integer_past_int64_does_not_lose_the_batch(mock, tmp_path):
    col = StrictCollector()
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f"  openTelemetry: {{endpoint: '{col.url}'}}\n"),
                 DEFAULT_KEYS)
    try:
        a = httpx.post(f"{g.url}/openai/v1/chat/completions", json=CHAT,
                       headers={"cf-aig-metadata": '{"n": 18446744073709551615}'})
        b = httpx.post(f"{g.url}/openai/v1/chat/completions", json=CHAT)
        assert a.status_code == b.status_code == 200
        deadline = time.monotonic() + 8
        while metric(g, "sidegate_otel_spans_exported_total") + metric(g, "sidegate_otel_spans_failed_total") < 2:
            assert time.monotonic() < deadline, g.metrics()
            time.sleep(0.1)
        assert col.rejected == [], "the collector refused a batch for an out-of-range intValue"
        assert {a.headers["cf-aig-log-id"], b.headers["cf-aig-log-id"]} <= col.log_ids()
        assert metric(g, "sidegate_otel_spans_failed_total") == 0
    finally:
        g.stop()
        col.stop()


def test_a_stalled_collector_neither_slows_requests_nor_the_admin_port(mock, tmp_path):
    release = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(20)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=f"  openTelemetry: {{endpoint: '{url}'}}\n"),
                 DEFAULT_KEYS)
    try:
        with httpx.Client(timeout=5) as c:
            c.post(f"{g.url}/openai/v1/chat/completions", json=CHAT)
            time.sleep(2.3)  # the first batch is posted and stalls
            t0 = time.monotonic()
            for _ in range(40):
                assert c.post(f"{g.url}/openai/v1/chat/completions", json=CHAT).status_code == 200
            assert time.monotonic() - t0 < 4
            assert httpx.get(f"{g.admin}/metrics", timeout=2).status_code == 200
            assert metric(g, "sidegate_otel_spans_dropped_total") == 0
        # Shutdown exports what is queued for at most 3 s, the stalled post notwithstanding.
        t0 = time.monotonic()
        g.proc.terminate()
        assert g.proc.wait(10) == 0
        assert time.monotonic() - t0 < 6
    finally:
        release.set()
        g.stop()
        srv.shutdown()
        srv.server_close()


def test_lines_dropped_while_stderr_is_stuck_are_all_accounted_for(mock, tmp_path):
    """stderr is a pipe nobody reads while 160 requests with ~40 KiB payload lines pass (past
    the 4 MiB bound); once it drains, every request is either a line or in a dropped count."""
    proc, url, _ = start_with_stderr_piped(mock, tmp_path, env={"RUST_LOG": "warn"})
    try:
        n = 160
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 40000}])
        with httpx.Client(timeout=10) as c:
            t0 = time.monotonic()
            for _ in range(n):
                assert c.post(f"{url}/openai/v1/chat/completions", json=big).status_code == 200
            assert time.monotonic() - t0 < 20

        def counts(got):
            return (got.count(b" INFO request id="),
                    sum(int(x) for x in re.findall(rb"WARN (\d+) log lines dropped", got)))
        lines, dropped = counts(drain_stderr(proc, lambda got: sum(counts(got)) >= n))
        assert dropped > 0, "4 MiB were passed: some lines must have been dropped"
        assert lines + dropped == n, (lines, dropped)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
