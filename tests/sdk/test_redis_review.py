"""Review of the sidecar with a Redis that misbehaves (down at start, killed and restarted, silent,
slow, answering errors) and of what the gateway keeps there (the response cache, global rate
limits, spend and token budgets): real redis-server processes on loopback, real sidecars, the
mock provider or fixed-answer upstreams.

README "Redis: cache, rate limits and spend shared by every pod": "Redis is a help, not a
dependency: when it cannot be reached within 250 ms (500 ms for an answer, whatever the
connection does) the request is served anyway (a cache miss; a global limit counted by this pod
alone ...), `sidegate_redis_errors_total{op}` counts it and a warning is logged at most every
10 s (never the URL)." Tests marked `Failed at <sha> (mended since)` showed a bug at that commit and pass since
it was fixed; the others pin behaviour that holds.
"""

import json
import pathlib
import queue
import re
import socket
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, FixedAnswerServer, RefusingPort, Sidegate, \
    free_port, gateway_yaml
from test_redis import Redis, RedisProxy, redis_errors

CHAT = "/openai/chat/completions"
PASSWORD = "redis-pw-sgtestkey-7f3a"


@pytest.fixture
def redis(tmp_path):
    """A redis-server of the test's own."""
    r = Redis(tmp_path / "redis")
    yield r
    r.stop()


def pod_yaml(upstream, spec, gateway="{namespace: team-a, name: shared-gw}"):
    """The config of a `pod` (also for a reload)."""
    text = gateway_yaml(upstream, extra_spec="  redis: {}\n" + spec)
    return text.replace("gateway: {namespace: team-a, name: main}", f"gateway: {gateway}")


def pod(tmp, upstream, redis_url, spec, dirname, gateway="{namespace: team-a, name: shared-gw}", keys=None,
        wait_ready=True):
    """A sidecar of gateway `gateway` (the YAML of its `gateway:` line) on `redis_url`, its providers
    at `upstream`."""
    d = pathlib.Path(tmp) / dirname
    d.mkdir()
    text = pod_yaml(upstream, spec, gateway)
    return Sidegate(d, text, dict(keys or DEFAULT_KEYS, **{"redis.url": redis_url}), wait_ready=wait_ready)


def body(text, model="gpt-4o-mini"):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def post(g, text, headers=None, timeout=30, **kw):
    return httpx.post(g.url + CHAT, json=body(text, **kw), headers=headers or {}, timeout=timeout)


def timed(g, text, headers=None):
    started = time.monotonic()
    r = post(g, text, headers)
    return r, time.monotonic() - started


def warnings(g):
    return [line for line in g.logs().splitlines() if "serving without it" in line]


def served_then_limited(g, text, failure, within=4.0, every=0.1):
    """The status codes of requests `text`, one every `every` s, from the first one served up to
    the next 429, once this pod's own count of the limit is full: only Redis, counting afresh,
    serves one. `failure` if none is served within `within` s (Redis not used again)."""
    codes, deadline = [], time.monotonic() + within
    while not codes or codes[-1] != 429:
        assert time.monotonic() < deadline, f"{failure}: {codes}; {warnings(g)[-2:]}"
        code = post(g, text).status_code
        if codes or code == 200:
            codes.append(code)
        time.sleep(every)
    return codes


def rate_count(redis):
    """The gateway's global rate limit count in Redis (its only window), 0 when none."""
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:rl:*").split()
    assert len(keys) <= 1, keys
    return int(redis.cli("GET", keys[0]) or 0) if keys else 0


# Seconds: answers this late never come for the writer of the charges, which waits 5 s for each
# (README); a request waits 500 ms.
PAST_THE_WRITERS_WAIT = 6.0


class LatencyProxy(RedisProxy):
    """A loopback TCP proxy in front of a Redis that, once `slow` is set, delivers every byte Redis
    sends `delay` seconds after it was sent, as a Redis that far away would (answers are not
    queued behind each other: each is late by `delay`, no more); `each_way`: every byte sent to
    Redis too (a command reaches it `delay` late, its answer `delay` after that)."""

    def __init__(self, redis_port, delay, each_way=False):
        self.delay = delay
        self.each_way = each_way
        super().__init__(redis_port)

    def relay(self, src, dst, to_client):
        q = queue.Queue()

        def deliver():
            while (item := q.get()) is not None:
                due, data = item
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    return
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=deliver, daemon=True).start()
        try:
            while data := src.recv(65536):
                q.put((time.monotonic() + (self.delay if (to_client or self.each_way) and self.slow else 0.0), data))
        except OSError:
            pass
        q.put(None)


# --- Redis going away and coming back -------------------------------------------------------------


def test_a_redis_down_at_start_killed_and_restarted_costs_requests_nothing_and_is_used_again(mock, tmp_path):
    # README: a Redis that cannot be reached is a cache miss and a global limit counted by this pod
    # alone, the counts kept for Redis; "after a failure the next second's requests go without
    # Redis at once"; the sidecar must find it again.
    port = free_port()
    spec = "  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 2, interval: 1h, scope: global}\n"
    g = pod(tmp_path, mock.url, f"redis://127.0.0.1:{port}/0", spec, "a")  # nothing listens there yet
    redis = None
    try:
        down = [timed(g, f"down at start {i} {uuid.uuid4()}") for i in range(3)]
        assert [r.status_code for r, _ in down] == [200, 200, 429], "2 an hour, counted by this pod"
        assert [r.headers["cf-aig-cache-status"] for r, _ in down[:2]] == ["MISS", "MISS"]
        assert max(t for _, t in down) < 0.5, [t for _, t in down]
        assert redis_errors(g) >= 3
        assert redis_errors(g, "connect") >= 1
        redis = Redis(tmp_path / "redis", port=port)
        # The two requests served meanwhile are added to Redis once it is up, once.
        deadline = time.monotonic() + 5
        while rate_count(redis) != 2:
            assert time.monotonic() < deadline, f"the counts kept never reached Redis: {redis.everything()}"
            time.sleep(0.05)
        assert post(g, "up").status_code == 429
        time.sleep(0.5)
        assert rate_count(redis) == 2
        # Killed mid-traffic (SIGKILL): requests are answered at once, by this pod's count (full).
        redis.kill()
        gone = [timed(g, "gone") for _ in range(6)]
        assert [r.status_code for r, _ in gone] == [429] * 6
        assert max(t for _, t in gone) < 0.5, [t for _, t in gone]
        # Restarted empty on the same port: counted again from zero within a couple of seconds.
        redis.start()
        codes = served_then_limited(g, "back", "Redis never used again after its restart")
        assert codes == [200, 200, 429], codes
        assert redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:rl:*")
        logs = g.logs()
        assert "serving without it" in logs
        assert f"127.0.0.1:{port}" not in logs, "the URL is never logged"
    finally:
        g.stop()
        if redis:
            redis.stop()


# Failed at 4bb2082 (mended since): a reconnect refused for its password leaves the pod without Redis until it restarts: the redis crate's ConnectionManager keeps a failed non-I/O reconnect for good and Shared::call never replaces it.
def test_a_reconnect_refused_once_for_its_password_does_not_leave_the_pod_without_redis(mock, tmp_path):
    # A Redis restarted without its password (a config put right a moment later), or a password
    # rolled back: the sidecar fails open meanwhile, as README says, and must use Redis again once
    # the password in its redis.url works again, as it does after any other outage.
    redis = Redis(tmp_path / "redis", "--requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"
    g = pod(tmp_path, mock.url, url, "  rateLimit: {limit: 3, interval: 1h, scope: global}\n", "a")
    try:
        assert [post(g, "counted").status_code for _ in range(4)] == [200, 200, 200, 429]
        # Redis back from a restart without its password: the reconnect's AUTH is refused.
        redis.kill()
        redis.start("--requirepass", "")
        assert [post(g, "no password").status_code for _ in range(2)] == [429, 429]  # this pod's count
        time.sleep(1.2)  # past the back-off: the failed reconnect is what the next call finds
        assert post(g, "no password").status_code == 429
        # Restarted again (empty) with its password: Redis must count again soon (3 an hour from
        # zero, where this pod alone refuses), as after a restart with nothing changed (the test above).
        redis.kill()
        redis.start("--requirepass", PASSWORD)
        codes = served_then_limited(g, "password back", "Redis never used again once its password worked",
                                    within=5, every=0.2)
        assert codes == [200, 200, 200, 429], codes
        logs = g.logs()
        assert PASSWORD not in logs and url not in logs
    finally:
        g.stop()
        redis.stop()


# --- a Redis that answers late, or not at all ------------------------------------------------------


def test_a_silent_redis_bounds_every_request_with_every_feature_on(mock, tmp_path):
    # A server that accepts and reads but never writes (a hung Redis, a black-holing proxy): no
    # request waits for it longer than one answer's bound (500 ms) and a connection attempt, with
    # the cache, a global rate limit, a token budget and a spend limit all asking Redis.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)
    held = []

    def swallow(conn):
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def accept():
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=swallow, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    spec = ("  cache: {enabled: true, backend: redis}\n"
            "  rateLimit: {limit: 1, interval: 1h, scope: global, tokensPerMinute: 10}\n"
            "  spendLimit: {amount: '0.000001', period: day}\n")
    g = pod(tmp_path, mock.url, f"redis://127.0.0.1:{silent.getsockname()[1]}/0", spec, "a")
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: timed(g, f"silent {i} {uuid.uuid4()}"), range(32)))
        codes = sorted(r.status_code for r, _ in got)
        assert codes == [200] + [429] * 31, "the limits, counted by this pod"
        slowest = max(t for _, t in got)
        assert slowest < 1.2, f"a request waited {slowest:.2f}s for a silent Redis"
        assert held, "the sidecar did try the silent Redis"
        assert redis_errors(g) >= 32
        assert any("timed out" in w for w in warnings(g)), warnings(g)
    finally:
        g.stop()
        silent.close()
        for c in held:
            c.close()


# Failed at 4bb2082 (mended since): a Redis 400 ms away adds 400 ms per check (rate limit, spend, tokens, cache: 1.6 s a request), never counted nor warned: each call has its own 500 ms bound, the request none.
def test_a_slow_redis_costs_a_request_one_answers_wait_not_one_per_check(mock, tmp_path, redis):
    # README: the request is served anyway when Redis cannot answer within 500 ms. A Redis whose
    # answers take 400 ms (within that bound, say across regions) is asked one after the other
    # for the global rate limit, the spend, the token budget and the cache: each wait is within
    # its bound, their sum is not; a request should wait for Redis about one answer's bound
    # (one deadline for all its checks, or the checks in one round trip).
    proxy = LatencyProxy(redis.port, 0.4)
    spec = ("  cache: {enabled: true, backend: redis}\n"
            "  rateLimit: {limit: 1000, interval: 1h, scope: global, tokensPerMinute: 10000000}\n"
            "  spendLimit: {amount: '1000', period: day}\n")
    g = pod(tmp_path, mock.url, proxy.url, spec, "a")
    try:
        fast = [timed(g, f"near {i} {uuid.uuid4()}")[1] for i in range(2)]  # connected, scripts loaded
        proxy.slow = True
        took = []
        for i in range(3):
            r, t = timed(g, f"far {i} {uuid.uuid4()}")
            assert r.status_code == 200
            took.append(t)
        assert statistics.median(took) < 1.1, \
            f"requests took {[round(t, 2) for t in took]}s with Redis 0.4 s away (near: {[round(t, 2) for t in fast]})"
    finally:
        g.stop()
        proxy.close()


# Failed at 4bb2082 (mended since): with Redis down, identical requests at once still wait for the first one's whole answer (which cannot be stored) and only then call upstream: twice the latency.
def test_identical_requests_at_once_do_not_wait_for_each_other_while_redis_is_down(mock, tmp_path):
    # README "Response cache": identical requests that miss at the same time wait for the first
    # one's response to be stored, and "when that response cannot be stored ... they go upstream
    # themselves at once". With the gateway's Redis unreachable nothing can be stored, and the
    # sidecar knows it before anyone goes upstream (its read failed); waiting for the first
    # answer only to call upstream afterwards doubles their latency (up to 30 s more).
    dead = RefusingPort()
    g = pod(tmp_path, mock.url, f"redis://127.0.0.1:{dead.port}/0", "  cache: {enabled: true, backend: redis}\n", "a")
    try:
        q = f"same question {uuid.uuid4()}"
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda _: timed(g, q, {"x-mock-delay-ms": "1500"}), range(3)))
        assert [(r.status_code, r.headers["cf-aig-cache-status"]) for r, _ in got] == [(200, "MISS")] * 3
        took = sorted(round(t, 2) for _, t in got)
        assert took[-1] < 2.6, f"answers of a 1.5 s upstream took {took}s"
    finally:
        g.stop()
        dead.close()


# --- a Redis that answers errors ------------------------------------------------------------------


def _oom(tmp):
    r = Redis(tmp, "--maxmemory-policy", "noeviction")
    # Its memory now past maxmemory (a Redis filled by other apps, or by big cache entries): every
    # write is refused, reads are answered.
    r.cli("CONFIG", "SET", "maxmemory", "100kb")
    if not r.cli("SET", "probe", "1").startswith("OOM"):
        r.stop()
        pytest.fail("redis-server kept taking writes past maxmemory")
    return r, r.url


def _readonly(tmp):
    r = Redis(tmp, "--replicaof", "127.0.0.1", str(free_port()))  # a replica whose primary is gone
    return r, r.url


def _noauth(tmp):
    r = Redis(tmp, "--requirepass", PASSWORD)
    return r, r.url  # no password in the URL


def _wrong_password(tmp):
    r = Redis(tmp, "--requirepass", PASSWORD)
    return r, f"redis://:wrong-{PASSWORD}@127.0.0.1:{r.port}/0"


def _no_such_database(tmp):
    r = Redis(tmp)
    return r, f"redis://127.0.0.1:{r.port}/99"


@pytest.mark.parametrize("make, says", [
    (_oom, "OOM"),
    (_readonly, "read only replica"),
    (_noauth, "NOAUTH"),
    (_wrong_password, "Password authentication failed"),
    (_no_such_database, "DB index is out of range"),
], ids=["oom", "readonly", "noauth", "wrong-password", "no-such-database"])
def test_a_redis_answering_errors_is_done_without_at_once_counts_and_says_why(mock, tmp_path, make, says):
    # README: served anyway (a cache miss, the global limit counted by this pod alone), counted, a
    # warning at most every 10 s, never the URL. An error answer is no reason to wait: each
    # request stays fast.
    redis, url = make(tmp_path / "redis")
    spec = ("  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 3, interval: 1h, scope: global}\n"
            "  spendLimit: {amount: '1000', period: day}\n")
    g = pod(tmp_path, mock.url, url, spec, "a")
    try:
        q = f"errors {uuid.uuid4()}"
        got = [timed(g, q) for _ in range(4)]
        assert [r.status_code for r, _ in got] == [200] * 3 + [429], "the limit of 3, counted by this pod"
        assert [r.headers["cf-aig-cache-status"] for r, _ in got[:3]] == ["MISS"] * 3
        assert max(t for _, t in got) < 0.5, [t for _, t in got]
        assert redis_errors(g) >= 4
        said = g.wait_for_log("serving without it")
        assert any(says in w for w in warnings(g)), warnings(g)
        assert PASSWORD not in said and url not in said
    finally:
        g.stop()
        redis.stop()


# --- what is kept in Redis, and whose it is ---------------------------------------------------------


def test_no_key_token_or_metadata_value_reaches_redis_and_gateways_keep_apart(mock, tmp_path, redis):
    # README: keys are prefixed `sidegate:{namespace/name}:`; cache keys are SHA-256 digests (a
    # client's own provider key goes into the digest, never in clear); DESIGN: keys are never
    # logged nor stored. Two gateways on one Redis share no entry and no limit.
    spec = ("  authentication: {enabled: true}\n  cache: {enabled: true, backend: redis}\n"
            "  rateLimit: {limit: 4, interval: 1h, scope: global, tokensPerMinute: 100000}\n"
            "  spendLimit: {amount: '1000', period: day}\n")
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    a = pod(tmp_path, mock.url, redis.url, spec, "a", keys=keys)
    b = pod(tmp_path, mock.url, redis.url, spec, "b", gateway="{namespace: team-a, name: other-gw}", keys=keys)
    client_key = f"gsk-{KEY_MARKER}-client-own"
    secret_user = "user-7a1e-not-for-redis"
    headers = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}",
               "cf-aig-metadata": json.dumps({"user_id": secret_user})}
    try:
        q = body("what is kept")
        for _ in range(2):
            assert httpx.post(a.url + CHAT, json=q, headers=headers).status_code == 200
            # groq: no stored key, the client's own goes upstream and into the cache key's digest
            r = httpx.post(a.url + "/groq/chat/completions", json=dict(q, model="llama-3.1-8b-instant"),
                           headers=dict(headers, authorization=f"Bearer {client_key}"))
            assert r.status_code == 200
        deadline = time.monotonic() + 5
        while len(redis.cli("--scan", "--pattern", "*:cache:*").split()) < 2:
            assert time.monotonic() < deadline, "the entries never landed in Redis"
            time.sleep(0.05)
        stored = redis.everything()
        kinds = {k.split(":")[2] for k, _ in stored}
        assert kinds <= {"cache", "rl", "tpm", "spend", "charges"}, stored
        # The marker of the charges each pod wrote: a number under a random name.
        assert all(v.isdigit() and re.fullmatch(r"[0-9a-f]{16}", k.split(":")[3])
                   for k, v in stored if k.split(":")[2] == "charges"), stored
        assert all(k.startswith("sidegate:team-a/shared-gw:") for k, _ in stored), stored
        for k, v in stored:
            for secret in (KEY_MARKER, GATEWAY_TOKEN, client_key, secret_user, "Bearer"):
                assert secret not in k and secret not in v, (secret, k)
        # The other gateway: its own entries and its own limit (4 an hour, the first gateway's used up).
        first = httpx.post(b.url + CHAT, json=q, headers=headers)
        assert (first.status_code, first.headers["cf-aig-cache-status"]) == (200, "MISS")
        assert httpx.post(a.url + CHAT, json=q, headers=headers).status_code == 429
        assert any(k.startswith("sidegate:team-a/other-gw:rl:") for k, _ in redis.everything())
    finally:
        a.stop()
        b.stop()


# Failed at 4bb2082 (mended since): a gateway named `team-a/main` (no namespace) is loaded and gets the prefix `sidegate:team-a/main:` of gateway `main` in namespace `team-a`: their limits and cache entries are one.
def test_gateways_whose_names_read_alike_in_the_prefix_never_share_limits_or_entries(mock, tmp_path, redis):
    # README: a config with spec.redis and no name is refused "as unnamed gateways sharing a Redis
    # would share its keys"; the prefix is `sidegate:{namespace/name}:` or `sidegate:{name}:`
    # without a namespace, so a standalone name holding a `/` is another gateway's prefix. Either
    # such a name is refused at load, naming gateway.name, or the two are kept apart.
    spec = "  cache: {enabled: true, backend: redis}\n  rateLimit: {limit: 1, interval: 1h, scope: global}\n"
    a = pod(tmp_path, mock.url, redis.url, spec, "a", gateway="{namespace: team-a, name: main}")
    b = pod(tmp_path, mock.url, redis.url, spec, "b", gateway="{name: team-a/main}", wait_ready=False)
    try:
        q = f"alike {uuid.uuid4()}"
        assert post(a, q).status_code == 200
        deadline = time.monotonic() + 5
        while not redis.cli("--scan", "--pattern", "*:cache:*"):
            assert time.monotonic() < deadline, "the entry never landed in Redis"
            time.sleep(0.05)
        try:
            b.wait_ready(10)
        except RuntimeError:
            assert b.proc.returncode == 2 and "gateway.name" in b.logs(), b.logs()[-2000:]
            return  # refused at load: fine
        r = post(b, q)
        assert (r.status_code, r.headers.get("cf-aig-cache-status")) == (200, "MISS"), \
            (r.status_code, r.text[:200], redis.cli("--scan"))
    finally:
        a.stop()
        b.stop()


def test_entries_up_to_an_eighth_of_max_size_are_shared_and_bigger_ones_never_written(tmp_path, redis):
    # README: a body that "outgrows an eighth of `maxSize` is not stored" (64Ki: 8192 bytes), in
    # Redis as in memory; up to it, one pod's answer is a hit in another.
    def answer(n):
        head, tail = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"content":"', b'"}}]}'
        return head + b"a" * (n - len(head) - len(tail)) + tail

    fits, outgrows = answer(8192), answer(8193)
    upstream = FixedAnswerServer(fits, then=[(200, outgrows)])
    spec = "  cache: {enabled: true, backend: redis, maxSize: 64Ki}\n"
    a = pod(tmp_path, upstream.url, redis.url, spec, "a")
    b = pod(tmp_path, upstream.url, redis.url, spec, "b")
    try:
        small, big = f"fits {uuid.uuid4()}", f"outgrows {uuid.uuid4()}"
        assert post(a, small).content == fits
        assert post(a, big).content == outgrows
        deadline = time.monotonic() + 5
        while (r := post(b, small)).headers["cf-aig-cache-status"] != "HIT":
            assert time.monotonic() < deadline, "the 8192-byte answer never became a hit in the other pod"
            time.sleep(0.05)
        assert r.content == fits
        assert post(b, big).headers["cf-aig-cache-status"] == "MISS"
        time.sleep(0.3)
        assert len(redis.cli("--scan", "--pattern", "*:cache:*").split()) == 1
    finally:
        a.stop()
        b.stop()
        upstream.stop()


def test_identical_requests_at_once_in_two_pods_go_upstream_at_most_once_per_pod(mock, tmp_path, redis):
    # README: no stampede within one sidecar; across pods each pod's first miss goes upstream (the
    # others in that pod wait for it and are hits): at most one upstream call per pod.
    spec = "  cache: {enabled: true, backend: redis}\n"
    a = pod(tmp_path, mock.url, redis.url, spec, "a")
    b = pod(tmp_path, mock.url, redis.url, spec, "b")
    try:
        mock.clear()
        q = f"stampede {uuid.uuid4()}"
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: post((a, b)[i % 2], q, {"x-mock-delay-ms": "400"}), range(6)))
        assert [r.status_code for r in got] == [200] * 6
        statuses = sorted(r.headers["cf-aig-cache-status"] for r in got)
        upstream = sum(1 for m in mock.requests() if q in m["body"])
        assert 1 <= upstream <= 2, upstream
        assert statuses.count("MISS") == upstream, statuses
    finally:
        a.stop()
        b.stop()
