"""Edges of the charges kept for the gateway's Redis, against real redis-server processes on
loopback and real sidecars.

README "Redis: cache, rate limits and spend shared by every pod": a batch whose answer never came
is sent again with its number and applied at most once, even when Redis evicted the key that
keeps the number (then it is dropped, counted); the sidecar warns when Redis may evict keys; at a
stop, charges kept for a Redis the config no longer names are written to it for the same 3 s, or
logged as lost; while Redis cannot be read a global token budget and a route's global budget
node start from the total last read plus what this pod used since, as the spend limit does.
"""

import json
import signal
import time
import uuid

import httpx

from route_yaml import route, routes
from test_redis import Redis, redis_errors
from test_redis_outages import charged, code, dropped, probe, settled, spend_in_redis
from test_redis_review import PAST_THE_WRITERS_WAIT, LatencyProxy, pod

CHAT = "/openai/chat/completions"
PW = "sgtest-edges-pw-5b2e"


def marker_keys(redis):
    return redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:charges:*").split()


def spend_day(redis):
    return round(spend_in_redis(redis).get("day", 0.0), 9)


def test_a_batch_sent_again_after_redis_evicted_its_marker_is_not_applied_twice(mock, tmp_path):
    # Redis applies each command at once, its answers reach the pod 6 s later (past the 5 s its
    # writer waits): the batch is sent again with its number. Meanwhile Redis evicts the pod's marker key
    # (an allkeys-lru Redis under memory pressure; deleted here, deterministically): the number
    # alone can no longer tell that the batch was applied.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, PAST_THE_WRITERS_WAIT)
    g = pod(tmp_path, mock.url, proxy.url, "  spendLimit: {amount: '100', period: day}\n", "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the first charge", lambda: spend_day(redis), 0.001, within=3)
        assert len(marker_keys(redis)) == 1, redis.everything()
        proxy.slow = True
        assert charged(g, 0.002).status_code == 200
        deadline = time.monotonic() + 3
        while spend_day(redis) != 0.003:  # applied, its answer on its way
            assert time.monotonic() < deadline, redis.everything()
            time.sleep(0.02)
        for k in marker_keys(redis):
            redis.cli("DEL", k)  # evicted
        deadline = time.monotonic() + 8
        while redis_errors(g, "charge") < 1:  # the answer came too late: sent again
            assert time.monotonic() < deadline, g.metrics()
            time.sleep(0.05)
        proxy.slow = False
        time.sleep(2.5)  # sent again, answered at once
        settled("the spend after the batch was sent again (applied twice?)", lambda: spend_day(redis), 0.003)
        assert dropped(g, "unconfirmed") == 3, g.metrics()  # its day, week and month
        lost = [line for line in g.logs().splitlines() if "no longer holds its marker" in line]
        assert len(lost) == 1 and "spend_usd=0.002" in lost[0], g.logs()[-2000:]
        # The writer goes on: the next charges land, once.
        assert charged(g, 0.004).status_code == 200
        settled("the next charge", lambda: spend_day(redis), 0.007)
    finally:
        g.stop()
        proxy.close()
        redis.stop()


def test_a_batch_sent_again_to_a_redis_restarted_without_its_data_is_applied(mock, tmp_path):
    # As above, but Redis is restarted (no persistence) before the batch is sent again: it lost
    # the marker and what the first try did together (another run_id), so the batch is applied.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, PAST_THE_WRITERS_WAIT)
    g = pod(tmp_path, mock.url, proxy.url, "  spendLimit: {amount: '100', period: day}\n", "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the first charge", lambda: spend_day(redis), 0.001, within=3)
        proxy.slow = True
        assert charged(g, 0.002).status_code == 200
        deadline = time.monotonic() + 3
        while spend_day(redis) != 0.003:  # applied, its answer on its way
            assert time.monotonic() < deadline, redis.everything()
            time.sleep(0.02)
        redis.kill()
        redis.start()
        proxy.slow = False
        settled("the spend after the batch was sent again", lambda: spend_day(redis), 0.002, within=15)
        assert dropped(g, "unconfirmed") == 0, g.metrics()
    finally:
        g.stop()
        proxy.close()
        redis.stop()


def test_a_redis_700_ms_away_each_way_gets_a_pods_spend_and_the_other_pods_see_it(mock, tmp_path):
    # Every command takes 0.7 s to reach Redis and its answer 0.7 s to come back (a Redis far away,
    # or loaded), from the pod's start: no request can wait for it (500 ms), so pod a serves on
    # its own count, but its charges are written in the background, where an answer 1.4 s away
    # (2.8 s for a script Redis does not hold yet: EVALSHA, NOSCRIPT, EVAL) can be waited for.
    # Pod b, next to Redis, must then see a's spend, once, and so must it see a's later charges.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, 0.7, each_way=True)
    proxy.slow = True
    spec = "  spendLimit: {amount: '0.003', period: day}\n"
    a = pod(tmp_path, mock.url, proxy.url, spec, "a")
    b = pod(tmp_path, mock.url, redis.url, spec, "b")
    try:
        assert charged(b, 0.0015).status_code == 200
        settled("b's spend", lambda: spend_day(redis), 0.0015, within=3)
        assert code(probe(b)) == 500, "b has room"
        began = time.monotonic()
        assert charged(a, 0.002).status_code == 200  # a's own count has room
        while code(probe(b)) != (429, 2041):  # 0.0035 of 0.003 once b sees a's spend
            assert time.monotonic() - began < 20, f"a's spend never reached Redis: {redis.everything()}"
            time.sleep(0.1)
        print(f"pod b saw pod a's spend {time.monotonic() - began:.1f} s after a's request began")
        settled("the gateway's spend in Redis", lambda: spend_day(redis), 0.0035)
        assert charged(a, 0.0005).status_code == 200
        settled("a's next charge", lambda: spend_day(redis), 0.004, within=10)
        assert dropped(a, "unconfirmed") == 0, a.metrics()
    finally:
        a.stop()
        b.stop()
        proxy.close()
        redis.stop()


def test_a_redis_that_may_evict_keys_is_warned_about_once_and_one_that_will_not_say_is_used_quietly(mock, tmp_path):
    evicting = Redis(tmp_path / "lru", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    # A managed Redis refusing INFO (and CONFIG): nothing to warn about, nothing to complain of.
    silent = Redis(tmp_path / "silent", "--rename-command", "INFO", "sgtest-hidden-info", "--rename-command", "CONFIG", "sgtest-hidden-config")
    spec = "  spendLimit: {amount: '100', period: day}\n"
    a = pod(tmp_path, mock.url, evicting.url, spec, "a")
    b = pod(tmp_path, mock.url, silent.url, spec, "b")
    try:
        for g in (a, b):
            for _ in range(2):
                assert charged(g, 0.001).status_code == 200
        settled("pod a's spend", lambda: spend_day(evicting), 0.002, within=3)
        settled("pod b's spend", lambda: spend_day(silent), 0.002, within=3)
        warned = [line for line in a.logs().splitlines() if "redis may evict keys" in line]
        assert len(warned) == 1 and "allkeys-lru" in warned[0], a.logs()[-2000:]
        assert "redis may evict keys" not in b.logs()
        assert " WARN " not in b.logs() and '"WARN"' not in b.logs(), b.logs()[-2000:]
        assert redis_errors(b) == 0, b.metrics()
    finally:
        a.stop()
        b.stop()
        evicting.stop()
        silent.stop()


def reload_redis_url(g, url):
    """Points the pod at the Redis at `url` (the keys Secret's redis.url updated) and waits for it."""
    loaded = g.logs().count("config loaded")
    (g.keys_dir / "redis.url").write_text(url + "\n")
    deadline = time.monotonic() + 10
    while g.logs().count("config loaded") <= loaded:
        assert time.monotonic() < deadline, "the new redis.url was not loaded"
        time.sleep(0.1)


def test_at_a_stop_charges_kept_for_the_redis_the_config_moved_away_from_are_written_to_it(mock, tmp_path):
    # The gateway moves to another Redis (redis.url changed) while its first Redis refuses the pod
    # (its password changed under it): what the pod charged meanwhile belongs to the first one,
    # and is written there once it takes the pod again — within the 3 s a stop gives, when the pod
    # stops right then.
    first, second = Redis(tmp_path / "first"), Redis(tmp_path / "second")
    g = pod(tmp_path, mock.url, first.url, "  spendLimit: {amount: '100', period: day}\n", "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the spend before", lambda: spend_day(first), 0.001, within=3)
        first.cli("CONFIG", "SET", "requirepass", PW)
        first.cli("CLIENT", "KILL", "TYPE", "normal", password=PW)  # the pod's connection
        assert charged(g, 0.004).status_code == 200  # served by the pod's own count, kept
        deadline = time.monotonic() + 5
        while redis_errors(g, "charge") < 1:
            assert time.monotonic() < deadline, g.metrics()
            time.sleep(0.1)
        reload_redis_url(g, second.url)
        assert charged(g, 0.002).status_code == 200
        settled("the second Redis's spend", lambda: spend_day(second), 0.002, within=3)
        began = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        first.cli("CONFIG", "SET", "requirepass", "", password=PW)  # the pod is let in again
        g.proc.wait(10)
        assert time.monotonic() - began < 4.5
        assert spend_day(first) == 0.005, f"the first Redis's spend after the stop: {spend_day(first)}, not 0.005"
        assert spend_day(second) == 0.002
        assert "charges not written to redis at shutdown" not in g.logs(), g.logs()[-2000:]
    finally:
        g.stop()
        first.stop()
        second.stop()


def test_at_a_stop_charges_kept_for_a_former_redis_that_is_gone_are_logged_as_lost_within_3_s(mock, tmp_path):
    first, second = Redis(tmp_path / "first"), Redis(tmp_path / "second")
    g = pod(tmp_path, mock.url, first.url, "  spendLimit: {amount: '100', period: day}\n", "a")
    try:
        assert charged(g, 0.001).status_code == 200
        settled("the spend before", lambda: spend_day(first), 0.001, within=3)
        first.kill()
        assert charged(g, 0.25).status_code == 200  # kept for the first Redis
        reload_redis_url(g, second.url)
        assert charged(g, 0.002).status_code == 200
        settled("the second Redis's spend", lambda: spend_day(second), 0.002, within=3)
        began = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        g.proc.wait(10)
        took = time.monotonic() - began
        assert took < 4.5, f"the stop took {took:.1f} s"
        lost = [line for line in g.logs().splitlines() if "charges not written to redis at shutdown" in line]
        assert len(lost) == 1, g.logs()[-3000:]
        assert "spend_usd=0.25" in lost[0] and "keys=3" in lost[0] and "redis=former" in lost[0], lost[0]
    finally:
        g.stop()
        second.stop()


def tokens_in_redis(redis):
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:tpm:*").split()
    return sum(int(redis.cli("GET", k)) for k in keys)


def away_from_a_minutes_end(margin=20):
    """Waits until the wall-clock minute (the token budget's window in Redis) has `margin` s left."""
    while 60 - time.time() % 60 < margin:
        time.sleep(0.5)


def test_while_redis_is_stopped_a_global_token_budget_counts_from_the_gateways_total_it_last_read(mock, tmp_path):
    # Pod b used most of the gateway's 100 tokens a minute; pod a, which used none, read that
    # total before Redis stopped. Its own count alone would let it use 100 more by itself; the
    # gateway's budget must not start again from the pod's own share (as the spend limit does not).
    redis = Redis(tmp_path / "redis")
    spec = "  rateLimit: {limit: 1000, interval: 1h, scope: global, tokensPerMinute: 100, technique: sliding}\n"
    a, b = pod(tmp_path, mock.url, redis.url, spec, "a"), pod(tmp_path, mock.url, redis.url, spec, "b")
    try:
        away_from_a_minutes_end()
        assert code(charged(b, 0, "same")) == 200
        settled("one answer's tokens", lambda: tokens_in_redis(redis) > 0, True, within=3)
        per = tokens_in_redis(redis)  # each answer to "same" uses as many
        while (before := tokens_in_redis(redis)) + per < 100:
            assert code(charged(b, 0, "same")) == 200
            deadline = time.monotonic() + 3
            while tokens_in_redis(redis) == before:  # written before the next is sent
                assert time.monotonic() < deadline
                time.sleep(0.02)
        used = tokens_in_redis(redis)
        assert code(probe(a)) == 500  # read: under the budget
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            got = [code(charged(a, 0, "same")) for _ in range(4)]
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        # `used` and one more answer reach the budget: the pod's second request is refused.
        assert got == [200, (429, 2003), (429, 2003), (429, 2003)], (used, per, got)
        assert redis_errors(a, "limits") >= 1
    finally:
        a.stop()
        b.stop()
        redis.stop()


def through_budget(g, usd):
    """The model a request through route `b` (its budget node) was sent to; its cost `usd`."""
    r = httpx.post(g.url + "/compat/chat/completions",
                   json={"model": "dynamic/b", "messages": [{"role": "user", "content": f"budget {uuid.uuid4()}"}]},
                   headers={"cf-aig-custom-cost": json.dumps({"total_cost": usd})}, timeout=30)
    assert r.status_code == 200, r.text
    g.wait_log_line(r.headers["cf-aig-log-id"])
    return r.headers["cf-aig-model"]


def budget_in_redis(redis):
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:route:*").split()
    return sum(int(redis.cli("GET", k)) for k in keys) / 1e9


def test_while_redis_is_stopped_a_global_budget_node_counts_from_the_total_it_last_read(mock, tmp_path):
    # A route's budget node of $0.0035 a day for the whole gateway: pod b spent 0.002 through it,
    # pod a 0.001 (reading b's 0.002 first). With Redis stopped, pod a's own 0.001 would let it
    # spend 0.003 more by itself before the fallback.
    redis = Redis(tmp_path / "redis")
    spec = routes(route("b", 'type: budget, limit: "0.0035", interval: 1d, scope: global'))
    a, b = pod(tmp_path, mock.url, redis.url, spec, "a"), pod(tmp_path, mock.url, redis.url, spec, "b")
    try:
        for _ in range(2):
            assert through_budget(b, 0.001) == "gpt-4o"
        settled("pod b's spend through the node", lambda: round(budget_in_redis(redis), 9), 0.002, within=3)
        assert through_budget(a, 0.001) == "gpt-4o"
        settled("the node's spend", lambda: round(budget_in_redis(redis), 9), 0.003, within=3)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            got = [through_budget(a, 0.001) for _ in range(3)]
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        # 0.003 read (a's own since included) is under 0.0035: one more, then the fallback.
        assert got == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"], got
        assert redis_errors(a, "route_node") >= 1
        settled("the node's spend once Redis is back", lambda: round(budget_in_redis(redis), 9), 0.004)
    finally:
        a.stop()
        b.stop()
        redis.stop()
