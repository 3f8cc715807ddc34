"""Global limits and charges while the gateway's Redis cannot be used (stopped, slow, out of memory,
down), against real redis-server processes on loopback and real sidecars.

README "Redis: cache, rate limits and spend shared by every pod": while Redis cannot be used a
global limit is counted by each pod alone, with the same limit (never off), and the charges made
meanwhile (spend, tokens, the counts of windows still open) are kept in memory and added to Redis
once it answers, once each; those of a window that ended first are dropped, counted;
`sidegate_redis_errors_total{op}` says which operation failed.
"""

import json
import signal
import time
import uuid

import httpx

from conftest import RefusingPort, free_port
from route_yaml import route, routes
from test_redis import Redis, redis_errors
from test_redis_review import PAST_THE_WRITERS_WAIT, LatencyProxy, pod
from test_route_keys import answer, route_counts, served, user

CHAT = "/openai/chat/completions"


def charged(g, usd, text=None):
    """A request costing `usd` (`cf-aig-custom-cost`); once it is served its cost is charged (its
    log line is out)."""
    r = httpx.post(g.url + CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text or f"spend {uuid.uuid4()}"}]},
                   headers={"cf-aig-custom-cost": json.dumps({"total_cost": usd})}, timeout=30)
    if r.status_code == 200:
        g.wait_log_line(r.headers["cf-aig-log-id"])
    return r


def probe(g):
    """A request that costs nothing (the mock answers 500): it only reads the limits."""
    return httpx.post(g.url + CHAT, json={"model": "mock-status-500", "messages": [{"role": "user", "content": "probe"}]},
                      timeout=30)


def code(r):
    return r.status_code if r.status_code != 429 else (429, r.json()["error"][0]["code"])


def spend_in_redis(redis):
    """The gateway's spend keys (day, week, month) in Redis and their values."""
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:spend:*").split()
    return {k.split(":")[3]: float(redis.cli("GET", k)) for k in keys}


def rate_in_redis(redis):
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:rl:*").split()
    return sum(int(redis.cli("GET", k)) for k in keys)


def settled(what, read, want, within=8.0):
    """Waits until `read()` is `want`, then checks it stays so (nothing written twice)."""
    deadline = time.monotonic() + within
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"{what}: {got}, not {want}"
        time.sleep(0.05)
    time.sleep(1.5)  # past a retry of the writer
    assert read() == want, f"{what} changed after it settled"


def test_a_spend_limit_holds_per_pod_while_redis_is_stopped_and_the_spend_made_lands_once_after(mock, tmp_path):
    redis = Redis(tmp_path / "redis")
    g = pod(tmp_path, mock.url, redis.url, "  spendLimit: {amount: '0.01', period: day}\n", "a")
    try:
        assert charged(g, 0.004).status_code == 200
        settled("the spend before", lambda: set(spend_in_redis(redis).values()), {0.004}, within=3)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            # 0.004 before, 0.004 and 0.004 during: this pod's own count reaches the limit.
            during = [code(charged(g, 0.004)) for _ in range(3)]
            assert during == [200, 200, (429, 2041)], during
            # Stopped long enough for the spend to be sent (and go unanswered: 5 s) more than once.
            time.sleep(6)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        settled("the spend made while Redis was stopped", lambda: spend_in_redis(redis),
                {"day": 0.012, "week": 0.012, "month": 0.012})
        assert code(probe(g)) == (429, 2041)
        assert redis_errors(g, "limits") >= 1
        assert redis_errors(g, "charge") >= 1
    finally:
        g.stop()
        redis.stop()


def test_while_redis_is_stopped_a_pod_counts_spend_from_the_gateways_total_it_last_read(mock, tmp_path):
    # Pod b spent 0.009 of the gateway's 0.01; pod a, which spent nothing, read that total before
    # Redis stopped: its own spend alone (0.002) would let it go on to 0.01 by itself.
    redis = Redis(tmp_path / "redis")
    spec = "  spendLimit: {amount: '0.01', period: day}\n"
    a, b = pod(tmp_path, mock.url, redis.url, spec, "a"), pod(tmp_path, mock.url, redis.url, spec, "b")
    try:
        assert charged(b, 0.009).status_code == 200
        settled("pod b's spend", lambda: spend_in_redis(redis).get("day"), 0.009, within=3)
        assert probe(a).status_code == 500  # read: 0.009, under the limit
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            got = [code(charged(a, 0.002)) for _ in range(2)]
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        assert got == [200, (429, 2041)], got
        settled("the gateway's spend", lambda: spend_in_redis(redis).get("day"), 0.011)
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_charges_and_counts_whose_answers_came_too_late_are_counted_once(mock, tmp_path):
    # Redis applies each command at once, but its answers reach the pod 6 s later, past the 500 ms
    # a request waits and the 5 s the writer of the charges waits: each write's answer times out
    # though Redis did it. Sent again, a charge must not be counted twice; a rate count taken as
    # made (its answer read late, within 10 s) must not be counted again.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, PAST_THE_WRITERS_WAIT)
    spec = ("  rateLimit: {limit: 1000, interval: 1h, scope: global}\n"
            "  spendLimit: {amount: '1000', period: day}\n")
    g = pod(tmp_path, mock.url, proxy.url, spec, "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the first charge", lambda: spend_in_redis(redis).get("day"), 0.001, within=3)
        proxy.slow = True
        n = 0
        ends = time.monotonic() + 4
        while time.monotonic() < ends:
            assert charged(g, 0.001).status_code == 200
            n += 1
            time.sleep(0.2)
        time.sleep(3)  # the writer's first batch went unanswered (5 s), and is sent again
        proxy.slow = False
        settled("the spend", lambda: round(spend_in_redis(redis).get("day", 0), 9), round(0.001 * (n + 1), 9),
                within=15)
        settled("the rate limit's count", lambda: rate_in_redis(redis), n + 1)
        assert redis_errors(g, "charge") >= 1, g.metrics()
    finally:
        g.stop()
        proxy.close()
        redis.stop()


def test_a_stop_while_the_charges_batch_waits_for_its_answer_logs_it_as_perhaps_applied(mock, tmp_path):
    # Redis stops answering (SIGSTOP) while the pod's writer has sent a batch and waits for its
    # answer (5 s), and the pod stops (3 s to write): Redis may still apply it once it goes on,
    # so the log of what was not written must not say it is simply lost.
    redis = Redis(tmp_path / "redis")
    g = pod(tmp_path, mock.url, redis.url, "  spendLimit: {amount: '100', period: day}\n", "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the spend before", lambda: spend_in_redis(redis).get("day"), 0.001, within=3)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            assert charged(g, 0.25).status_code == 200
            time.sleep(0.5)  # the batch is sent
            g.proc.send_signal(signal.SIGTERM)
            g.proc.wait(10)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        lost = [line for line in g.logs().splitlines() if "charges not written to redis at shutdown" in line]
        assert len(lost) == 1, g.logs()[-3000:]
        assert "spend_usd=0.25" in lost[0] and "unanswered_batches=1" in lost[0], lost[0]
        settled("the spend Redis applied once it went on", lambda: spend_in_redis(redis).get("day"), 0.251)
    finally:
        g.stop()
        redis.stop()


def test_spend_refused_by_a_redis_out_of_memory_is_kept_counted_and_written_once_it_takes_writes(mock, tmp_path):
    redis = Redis(tmp_path / "redis", "--maxmemory-policy", "noeviction")
    g = pod(tmp_path, mock.url, redis.url, "  spendLimit: {amount: '0.01', period: day}\n", "a")
    try:
        assert charged(g, 0.004).status_code == 200
        settled("the spend before", lambda: spend_in_redis(redis).get("day"), 0.004, within=3)
        # Past maxmemory: writes are refused, reads answered.
        redis.cli("CONFIG", "SET", "maxmemory", "100kb")
        assert redis.cli("SET", "probe", "1").startswith("OOM")
        got = []
        for _ in range(3):
            got.append(code(charged(g, 0.004)))
            time.sleep(0.2)  # the charge's first write is refused (and it waits again)
        # Redis's 0.004 and the 0.008 waiting in this pod: the limit is reached.
        assert got == [200, 200, (429, 2041)], got
        assert spend_in_redis(redis).get("day") == 0.004
        redis.cli("CONFIG", "SET", "maxmemory", "0")
        settled("the spend kept while Redis refused writes", lambda: spend_in_redis(redis),
                {"day": 0.012, "week": 0.012, "month": 0.012})
        assert redis_errors(g, "charge") >= 1
    finally:
        g.stop()
        redis.stop()


def test_a_route_nodes_count_whose_answer_came_too_late_is_given_back_when_its_request_is_not_sent(mock, tmp_path):
    # A rate node gives back the count of a request it let through that never went upstream (a
    # cache hit). One whose count's answer never came is given back too: Redis counted it.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, 0.8)
    spec = routes(route("r", 'type: rate, limit: "2", interval: 1h, key: metadata.user_id, scope: global')) \
        + "  cache: {enabled: true}\n"
    g = pod(tmp_path, mock.url, proxy.url, spec, "a")
    try:
        u = user(f"u-{uuid.uuid4().hex}")
        assert served(g, "dynamic/r", u, "cache me") == "gpt-4o"
        settled("the first count", lambda: sorted(route_counts(redis).values()), [1.0], within=3)
        proxy.slow = True
        hit = answer(g, "dynamic/r", u, "cache me")
        assert (hit["cf-aig-cache-status"], hit["cf-aig-model"]) == ("HIT", "gpt-4o")
        time.sleep(1.5)
        proxy.slow = False
        # Counted (late) by Redis, then given back: 1 again.
        settled("the hit's count given back", lambda: sorted(route_counts(redis).values()), [1.0])
        assert served(g, "dynamic/r", u, "not cached") == "gpt-4o"
        assert served(g, "dynamic/r", u, "over") == "gpt-4o-mini"
        assert redis_errors(g, "route_node") >= 1
    finally:
        g.stop()
        proxy.close()
        redis.stop()


def test_counts_of_a_window_that_ended_before_redis_came_back_are_dropped_and_counted(mock, tmp_path):
    port = free_port()
    g = pod(tmp_path, mock.url, f"redis://127.0.0.1:{port}/0",
            "  rateLimit: {limit: 5, interval: 2s, scope: global}\n", "a")  # nothing listens there yet
    redis = None
    try:
        assert code(charged(g, 0)) == 200  # counted by this pod, kept for Redis
        deadline = time.monotonic() + 6
        while dropped(g, "window_ended") < 1:
            assert time.monotonic() < deadline, g.metrics()
            time.sleep(0.1)
        # Redis up: nothing waits for it any more, nothing is written.
        redis = Redis(tmp_path / "redis", port=port)
        time.sleep(2.5)
        assert redis.cli("--scan") == "", redis.everything()
        assert dropped(g, "full") == 0
    finally:
        g.stop()
        if redis:
            redis.stop()


def dropped(g, reason):
    for line in g.metrics().splitlines():
        if line.startswith(f'sidegate_redis_charges_dropped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no sidegate_redis_charges_dropped_total for {reason}")


def test_redis_errors_say_which_operation_failed(mock, tmp_path):
    dead = RefusingPort()
    spec = ("  cache: {enabled: true, backend: redis}\n"
            "  rateLimit: {limit: 100, interval: 1h, scope: global}\n"
            "  spendLimit: {amount: '100', period: day}\n"
            + routes(route("r", 'type: rate, limit: "5", interval: 1h, key: metadata.user_id, scope: global')))
    g = pod(tmp_path, mock.url, f"redis://127.0.0.1:{dead.port}/0", spec, "a")
    try:
        text = g.metrics()
        for op in ["limits", "charge", "cache_get", "cache_set", "route_node", "connect"]:
            assert f'sidegate_redis_errors_total{{op="{op}"}} 0' in text, (op, text)
        assert charged(g, 0.001).status_code == 200
        assert served(g, "dynamic/r", user("someone")) == "gpt-4o"
        deadline = time.monotonic() + 3
        while redis_errors(g, "charge") < 1:
            assert time.monotonic() < deadline, g.metrics()
            time.sleep(0.05)
        for op in ["connect", "limits", "cache_get", "route_node"]:
            assert redis_errors(g, op) >= 1, (op, g.metrics())
    finally:
        g.stop()
        dead.close()
