"""State shared across pods through a real Redis (Debian's redis-server, started here on
loopback): the cache (`backend: redis`) and global rate limits, and serving without Redis (cache
misses, global limits counted by each pod alone).

Two sidegate processes stand for two pods of one gateway.
"""

import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, assert_refused_at_start, free_port, gateway_yaml

CHAT = "/openai/chat/completions"


class Redis:
    """A redis-server on loopback with `args` (restartable on its port, with other args)."""

    def __init__(self, workdir, *args, port=None):
        exe = shutil.which("redis-server")
        if not exe:
            pytest.fail("redis-server not installed (./test.sh installs Debian's redis-server)")
        self.exe = exe
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start(*args)

    def start(self, *args):
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args, password=None):
        auth = ["-a", password, "--no-auth-warning"] if password else []
        out = subprocess.run(["redis-cli", "-p", str(self.port), *auth, *args], capture_output=True, timeout=10)
        return out.stdout.decode(errors="replace").strip()

    def everything(self, password=None):
        """Every key and its value (all sidegate's keys are strings), as text."""
        keys = self.cli("--scan", password=password).split()
        return [(k, self.cli("GET", k, password=password)) for k in keys]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        self.proc.wait(10)


class RedisProxy:
    """A loopback TCP proxy in front of the Redis on `redis_port`: a subclass's `relay` carries
    each direction of each connection, and slows it down as it likes once `slow` is set."""

    def __init__(self, redis_port):
        self.slow = False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, args=(redis_port,), daemon=True).start()

    def _accept(self, redis_port):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", redis_port))
            except OSError:  # Redis down (restarting): refused, as Redis itself would
                client.close()
                continue
            threading.Thread(target=self.relay, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.relay, args=(upstream, client, True), daemon=True).start()

    def relay(self, src, dst, to_client):
        """Carries `src`'s bytes to `dst` until `src` ends (`to_client`: Redis's answers)."""
        raise NotImplementedError

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    r = Redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


def pod(tmp, mock, redis_url, spec, name):
    d = pathlib.Path(tmp) / name
    d.mkdir()
    extra = "  redis: {}\n" + spec
    return Sidegate(d, gateway_yaml(mock.url, extra_spec=extra, name="shared-gw"), dict(DEFAULT_KEYS, **{"redis.url": redis_url}))


def body(text):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def redis_errors(g, op=None):
    """`sidegate_redis_errors_total` of operation `op` (all operations summed when `None`)."""
    total, seen = 0.0, False
    for line in g.metrics().splitlines():
        if line.startswith("sidegate_redis_errors_total{"):
            seen = True
            if op is None or f'op="{op}"' in line:
                total += float(line.split()[-1])
    assert seen, "sidegate_redis_errors_total is not exported"
    return total


def test_a_response_cached_by_one_pod_is_a_hit_in_another(mock, tmp_path, redis):
    spec = "  cache: {enabled: true, backend: redis, ttl: 10m}\n"
    a, b = pod(tmp_path, mock, redis.url, spec, "a"), pod(tmp_path, mock, redis.url, spec, "b")
    try:
        mock.clear()
        q = body(f"shared question {uuid.uuid4()}")
        first = httpx.post(a.url + CHAT, json=q)
        assert first.headers["cf-aig-cache-status"] == "MISS"
        # The entry is written in the background: wait for it to land.
        deadline = time.monotonic() + 5
        while True:
            second = httpx.post(b.url + CHAT, json=q)
            if second.headers["cf-aig-cache-status"] == "HIT":
                break
            assert time.monotonic() < deadline, "pod b never saw pod a's entry"
            time.sleep(0.05)
        assert second.content == first.content
        assert second.headers["content-type"] == first.headers["content-type"]
        before = len(mock.requests())
        assert httpx.post(a.url + CHAT, json=q).headers["cf-aig-cache-status"] == "HIT"
        assert len(mock.requests()) == before
    finally:
        a.stop()
        b.stop()


def test_identical_requests_at_once_wait_for_the_entry_written_to_redis(mock, tmp_path, redis):
    from concurrent.futures import ThreadPoolExecutor
    spec = "  cache: {enabled: true, backend: redis, ttl: 10m}\n"
    a = pod(tmp_path, mock, redis.url, spec, "a")
    try:
        mock.clear()
        q = body(f"stampede {uuid.uuid4()}")
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: httpx.post(a.url + CHAT, json=q, headers={"x-mock-delay-ms": "300"}, timeout=10), range(5)))
        assert [r.status_code for r in answers] == [200] * 5
        assert sorted(r.headers["cf-aig-cache-status"] for r in answers) == ["HIT"] * 4 + ["MISS"]
        assert len(mock.requests()) == 1
    finally:
        a.stop()


def test_a_global_rate_limit_is_shared_by_the_pods(mock, tmp_path, redis):
    spec = "  rateLimit: {limit: 3, interval: 1h, scope: global}\n"
    a, b = pod(tmp_path, mock, redis.url, spec, "a"), pod(tmp_path, mock, redis.url, spec, "b")
    try:
        codes = [httpx.post(g.url + CHAT, json=body("limit")).status_code for g in (a, b, a, b, a)]
        assert codes == [200, 200, 200, 429, 429]
        r = httpx.post(b.url + CHAT, json=body("limit"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003)
        assert int(r.headers["retry-after"]) >= 1
    finally:
        a.stop()
        b.stop()


def test_without_redis_the_gateway_serves_counts_its_global_limit_alone_and_says_so(mock, tmp_path, refusing_port):
    # README: a cache miss, and a global limit counted by this pod alone with the same limit
    # (generous by the number of pods, never off).
    dead = f"redis://127.0.0.1:{refusing_port.port}/0"
    spec = "  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 2, interval: 1h, scope: global}\n"
    g = pod(tmp_path, mock, dead, spec, "a")
    try:
        got = [httpx.post(g.url + CHAT, json=body("no redis"), timeout=10) for _ in range(3)]
        assert [r.status_code for r in got] == [200, 200, 429]
        assert [r.headers["cf-aig-cache-status"] for r in got[:2]] == ["MISS", "MISS"]
        r = got[-1]
        assert redis_errors(g) >= 3
        assert redis_errors(g, "connect") >= 1, g.metrics()
        assert "serving without it" in g.logs()
        g.wait_log_line(r.headers["cf-aig-log-id"])  # the last line is out
        assert dead not in g.logs()
    finally:
        g.stop()


def test_a_redis_that_never_answers_costs_requests_little(mock, tmp_path):
    # A listener that accepts and then says nothing: every Redis call would time out. The
    # requests must not queue behind each other's connection attempts.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    spec = "  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 1, interval: 1h, scope: global}\n"
    g = pod(tmp_path, mock, f"redis://127.0.0.1:{silent.getsockname()[1]}/0", spec, "a")
    try:
        from concurrent.futures import ThreadPoolExecutor
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(lambda i: httpx.post(g.url + CHAT, json=body(f"silent {i}"), timeout=30).status_code,
                                  range(40)))
        took = time.monotonic() - started
        assert sorted(codes) == [200] + [429] * 39, "the limit of 1, counted by this pod"
        assert took < 5, f"40 requests took {took:.1f}s with a silent Redis"
    finally:
        g.stop()
        silent.close()


def test_a_paused_redis_is_used_again_once_it_answers(mock, tmp_path):
    (tmp_path / "paused").mkdir()
    r = Redis(tmp_path / "paused")
    spec = "  rateLimit: {limit: 2, interval: 1h, scope: global}\n"
    g = pod(tmp_path, mock, r.url, spec, "a")
    try:
        assert httpx.post(g.url + CHAT, json=body("one")).status_code == 200
        r.proc.send_signal(signal.SIGSTOP)
        try:
            # A timeout, then the pod's own count at once: its second request of 2, then refusals.
            codes = [httpx.post(g.url + CHAT, json=body(f"paused {i}"), timeout=10).status_code for i in range(5)]
            assert codes == [200, 429, 429, 429, 429], codes
        finally:
            r.proc.send_signal(signal.SIGCONT)
        # The count asked of the stopped Redis is run once it resumes, and not asked again.
        key = None
        deadline = time.monotonic() + 5
        while not key or r.cli("GET", key) != "2":
            assert time.monotonic() < deadline, r.everything()
            key = (r.cli("--scan", "--pattern", "*:rl:*").split() or [None])[0]
            time.sleep(0.05)
        time.sleep(0.3)
        assert r.cli("GET", key) == "2"
        # Redis forgets: this pod alone would refuse (2 of 2), Redis counts afresh.
        r.cli("FLUSHALL")
        time.sleep(1.2)  # past the back-off
        codes = [httpx.post(g.url + CHAT, json=body("again"), timeout=10).status_code for _ in range(3)]
        assert codes == [200, 200, 429], codes
    finally:
        g.stop()
        r.stop()


def test_redis_without_a_url_file_is_refused_at_start(mock, tmp_path):
    assert_refused_at_start(mock, tmp_path, "  redis: {}\n", "no redis.url file")


def test_after_a_failure_the_next_seconds_requests_go_without_redis_at_once(mock, tmp_path):
    # With its connection made already: a Redis that stops answering costs the request that
    # found out a timeout, not every request of the back-off second another one.
    (tmp_path / "stopped").mkdir()
    r = Redis(tmp_path / "stopped")
    g = pod(tmp_path, mock, r.url, "  cache: {enabled: true, backend: redis, ttl: 10m}\n", "a")
    try:
        warm = body(f"warm {uuid.uuid4()}")
        assert httpx.post(g.url + CHAT, json=warm).headers["cf-aig-cache-status"] == "MISS"
        # The connection is made and the background write is done: nothing is in flight.
        deadline = time.monotonic() + 5
        while httpx.post(g.url + CHAT, json=warm).headers["cf-aig-cache-status"] != "HIT":
            assert time.monotonic() < deadline, "the entry never landed in Redis"
            time.sleep(0.05)
        r.proc.send_signal(signal.SIGSTOP)
        try:
            took = []
            for i in range(4):
                started = time.monotonic()
                resp = httpx.post(g.url + CHAT, json=body(f"stopped {i} {uuid.uuid4()}"), timeout=10)
                took.append(time.monotonic() - started)
                assert (resp.status_code, resp.headers["cf-aig-cache-status"]) == (200, "MISS")
        finally:
            r.proc.send_signal(signal.SIGCONT)
        # Redis answers within 250 ms or not at all.
        assert took[0] >= 0.25, f"the first request did not wait for the stopped Redis: {took}"
        # The median of the three: each would wait >= 0.25 s for Redis; one of them slow for
        # the machine's load (a debug build on a busy CI runner) is no wait for Redis.
        assert sorted(took[1:])[1] < 0.2, f"requests during the back-off waited for Redis: {took}"
    finally:
        g.stop()
        r.stop()


def test_redis_for_a_gateway_without_a_name_is_refused_at_start(mock, tmp_path, redis):
    # Its keys would be another unnamed gateway's on the same Redis: cache entries, limits, spend.
    yaml = gateway_yaml(mock.url, extra_spec="  redis: {}\n")
    unnamed = yaml.replace("gateway: {namespace: team-a, name: main}\n", "")
    assert unnamed != yaml
    g = Sidegate(tmp_path, unnamed, dict(DEFAULT_KEYS, **{"redis.url": redis.url}), wait_ready=False)
    try:
        assert g.proc.wait(10) == 2
        assert "spec.redis needs the gateway's name (gateway: {name: ...})" in g.logs()
    finally:
        g.stop()
