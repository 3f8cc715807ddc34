"""The bodies the sidecar holds in memory at once are bounded by spec.limits.maxBufferedBytes:
requests beyond it get 503/2110 with Retry-After: 1 (never an OOM kill of the pod's sidecar),
and the budget is free again once the requests holding it end."""

import concurrent.futures
import http.server
import re
import threading
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate

MiB = 1 << 20
URL = "/openai/chat/completions"


class GatedUpstream:
    """A provider that reads each request whole, then holds its answer until `open()`: the
    sidecar's requests stay in flight, holding their bodies, for as long as the test wants. A
    request header `x-answer-bytes: N` makes the answer a JSON document of about N bytes."""

    def __init__(self):
        self.gate = threading.Event()
        self.received = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer.lock:
                    outer.received += 1
                outer.gate.wait(30)
                size = int(self.headers.get("x-answer-bytes") or 0)
                body = b'{"id":"chatcmpl-1","object":"chat.completion","pad":"' + b"x" * size + b'","choices":[]}'
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the sidecar dropped the connection

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_received(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while self.received < n:
            assert time.monotonic() < deadline, f"upstream got {self.received} requests, not {n}"
            time.sleep(0.02)

    def stop(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    u = GatedUpstream()
    yield u
    u.stop()


def gateway(tmp_path, upstream_url, extra=""):
    config = (
        "schemaVersion: 1\n"
        "gateway: {namespace: team-a, name: main}\n"
        "spec:\n"
        "  limits: {maxRequestBody: 4Mi, maxBufferedBytes: 8Mi}\n"
        f"  providers:\n    openai: {{baseURL: '{upstream_url}/v1'}}\n"
        f"{extra}"
    )
    return Sidegate(tmp_path, config, DEFAULT_KEYS)


def metric(g, name):
    m = re.search(rf"^{name} (\S+)$", g.metrics(), re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def post(g, size, headers=None, timeout=60):
    # A JSON body of `size` bytes.
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (size - 60) + b'"}]}'
    return httpx.post(g.url + URL, content=body, headers={"content-type": "application/json", **(headers or {})},
                      timeout=timeout)


def assert_busy(r):
    assert r.status_code == 503, (r.status_code, r.text[:200])
    assert r.headers["retry-after"] == "1"
    body = r.json()
    assert body["success"] is False and body["result"] == [] and body["messages"] == []
    assert body["error"][0]["code"] == 2110
    assert "memory budget" in body["error"][0]["message"]


def test_requests_beyond_the_buffer_budget_get_503_2110_and_the_budget_frees_when_they_end(tmp_path, upstream):
    g = gateway(tmp_path, upstream.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            # Two 3 MiB bodies in flight hold 6 of the 8 MiB, until the upstream answers.
            held = [pool.submit(post, g, 3 * MiB) for _ in range(2)]
            upstream.wait_received(2)
            assert metric(g, "sidegate_buffered_bytes") > 5.9 * MiB
            # Six more large bodies at once: none fits, each is refused at once.
            refused = [pool.submit(post, g, 3 * MiB) for _ in range(6)]
            for f in refused:
                assert_busy(f.result(30))
            # One within what is left is served.
            small = pool.submit(post, g, MiB)
            upstream.wait_received(3)
            upstream.gate.set()
            assert small.result(30).status_code == 200
            for f in held:
                assert f.result(30).status_code == 200
        assert metric(g, "sidegate_buffer_refusals_total") == 6
        assert metric(g, "sidegate_buffered_bytes") == 0
        # The budget is free again: a large body is served.
        assert post(g, 3 * MiB).status_code == 200
    finally:
        g.stop()


def test_a_chunked_body_beyond_the_buffer_budget_is_refused_as_it_arrives(tmp_path, upstream):
    g = gateway(tmp_path, upstream.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            held = [pool.submit(post, g, 3 * MiB) for _ in range(2)]
            upstream.wait_received(2)

            def chunks():
                for _ in range(3):
                    yield b"y" * MiB

            r = httpx.post(g.url + URL, content=chunks(), timeout=30)
            assert_busy(r)
            upstream.gate.set()
            for f in held:
                assert f.result(30).status_code == 200
        assert metric(g, "sidegate_buffered_bytes") == 0
    finally:
        g.stop()


def test_memory_stays_bounded_under_many_concurrent_large_bodies(tmp_path, upstream):
    g = gateway(tmp_path, upstream.url)
    try:
        upstream.gate.set()
        assert post(g, 1000).status_code == 200  # warm up: connection pools, first allocations
        upstream.gate.clear()
        upstream.received = 0
        base = vm_hwm_kib(g.proc.pid)
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(post, g, 3900 * 1024) for _ in range(24)]
            # Every request has been answered (refused) or reached the upstream.
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) + upstream.received < 24:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            peak_kib = vm_hwm_kib(g.proc.pid) - base
            print(f"peak RSS growth: {peak_kib} KiB")
            upstream.gate.set()
            statuses = sorted(f.result(30).status_code for f in futures)
        # At most two bodies of 3.9 MB fit in 8 MiB; without the budget all 24 (~94 MB) would
        # be held at once.
        assert statuses.count(200) <= 2 and statuses.count(503) >= 22, statuses
        assert peak_kib < 32 * 1024, f"peak RSS grew by {peak_kib} KiB"
        assert metric(g, "sidegate_buffered_bytes") == 0
        assert post(g, 3900 * 1024).status_code == 200
    finally:
        g.stop()


def test_a_response_held_back_for_checks_that_does_not_fit_is_503_2110(tmp_path, upstream):
    dlp = "  dlp: {policies: [{id: p, action: FLAG, check: [RESPONSE], profiles: [email]}]}\n"
    g = gateway(tmp_path, upstream.url, dlp)
    try:
        upstream.gate.set()
        assert post(g, 1000, {"x-answer-bytes": str(MiB)}).status_code == 200
        r = post(g, 1000, {"x-answer-bytes": str(9 * MiB)})
        assert_busy(r)
        assert metric(g, "sidegate_buffered_bytes") == 0
        assert metric(g, "sidegate_buffer_refusals_total") == 1
        assert post(g, 1000, {"x-answer-bytes": str(MiB)}).status_code == 200
    finally:
        g.stop()


def test_a_buffer_budget_smaller_than_the_largest_request_body_is_refused_at_start(tmp_path, upstream):
    config = (
        "schemaVersion: 1\n"
        "spec:\n"
        "  limits: {maxBufferedBytes: 4Mi}\n"
        f"  providers:\n    openai: {{baseURL: '{upstream.url}/v1'}}\n"
    )
    g = Sidegate(tmp_path, config, DEFAULT_KEYS, wait_ready=False)
    try:
        assert g.proc.wait(10) == 2
        assert "spec.limits.maxBufferedBytes (4Mi) must be at least maxRequestBody (10Mi)" in g.logs()
    finally:
        g.stop()


def pad_body(size):
    # `size` bytes of JSON whose values are tiny: ~30 times its size once parsed into a tree.
    head = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"pad":['
    n = (size - len(head) - 3) // 2
    return head + b"0," * n + b"0]}"


def test_json_bodies_of_millions_of_tiny_values_are_refused_before_they_are_parsed(tmp_path, upstream):
    # 3.9 MB of `0,` is ~2M values: parsed, over 100 MB, past a budget of 8 MiB (and, with the
    # defaults, 9 MB of it past 256Mi, the sidecar's memory limit). Each path that parses the
    # body takes room for the tree first; a path that does not parse sends it on.
    g = gateway(tmp_path, upstream.url, "  cache: {enabled: true}\n")
    try:
        upstream.gate.set()
        body = pad_body(3900 * 1024)
        universal = b'[{"provider":"openai","endpoint":"chat/completions","headers":{},"query":' + body + b"}]"
        base = vm_hwm_kib(g.proc.pid)
        for path, content, headers in (
                ("/compat/chat/completions", body, {}),
                ("/", universal, {}),
                (URL, body, {}),  # the cache key normalizes the body
        ):
            r = httpx.post(g.url + path, content=content, headers={"content-type": "application/json", **headers}, timeout=60)
            assert r.status_code == 413, (path, r.status_code, r.text[:300])
            assert r.json()["error"][0]["code"] == 2102 and "too many JSON values" in r.json()["error"][0]["message"]
        grown = vm_hwm_kib(g.proc.pid) - base
        assert grown < 48 * 1024, f"peak RSS grew by {grown} KiB"
        assert upstream.received == 0
        # Not parsed (no cache): sent on as it came.
        r = httpx.post(g.url + URL, content=body, headers={"content-type": "application/json", "cf-aig-skip-cache": "true"}, timeout=60)
        assert r.status_code == 200 and upstream.received == 1, r.text[:300]
        assert metric(g, "sidegate_buffered_bytes") == 0
        # A large body of few values (an image as base64 text) parses at about its size.
        image = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"' + b"QUJD" * (900 * 1024) + b'"}]}'
        r = httpx.post(g.url + "/compat/chat/completions", content=image, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text[:300]
        # So does one whose text is full of commas and colons (CSV, code, JSON pasted as text):
        # a string is one value.
        csv = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"' + b"1,2:[3{," * (450 * 1024) + b'"}]}'
        r = httpx.post(g.url + "/compat/chat/completions", content=csv, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text[:300]
    finally:
        g.stop()


def test_a_request_dlp_reads_without_parsing_a_tree(tmp_path, upstream):
    # Request bodies are no streams: a top-level array of tiny values is scanned as text, not
    # decoded element by element into trees (which cost ~40 times its size).
    spec = "  dlp:\n    policies:\n      - {id: cards, action: BLOCK, check: [REQUEST], profiles: [credit-card]}\n"
    g = gateway(tmp_path, upstream.url, spec)
    try:
        upstream.gate.set()
        body = b"[" + pad_body(3900 * 1024) + b"]"
        base = vm_hwm_kib(g.proc.pid)
        r = httpx.post(g.url + URL, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text[:300]
        grown = vm_hwm_kib(g.proc.pid) - base
        assert grown < 48 * 1024, f"peak RSS grew by {grown} KiB"
    finally:
        g.stop()
