"""The gateway's limits shared in a real Redis (Debian's redis-server on loopback), where review
165's defects of one pod's limits (test_limits_review) had their Redis-shared twins: spend summed
in floating point, and requests the spend limit or the token budget refused still counted by the
rate limit.

README "Cost, spend limits and token budgets" and "Rate limit": spend is counted in whole
billionths of a USD, in Redis on the `INCRBYFLOAT` keys pods of every version share; requests
refused by the limits are not counted.
"""

import signal
import time

import httpx

from test_cache import reload_config
from test_redis import Redis
from test_redis_outages import charged, code, probe, rate_in_redis, settled, spend_in_redis
from test_redis_review import pod, pod_yaml

CHAT = "/openai/chat/completions"
ONE_DOLLAR = "  spendLimit: {amount: '1.00', period: day}\n"


def day_key(redis):
    keys = redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:spend:day:*").split()
    assert len(keys) == 1, keys
    return keys[0]


def test_ten_dimes_of_two_pods_and_an_older_pods_reach_a_one_dollar_spend_limit(mock, tmp_path):
    # Two pods spend $0.40, and a pod of an older version (which sends its charges as 12-decimal
    # floats to the same key, as sidegate always did) $0.20: the gateway's $1.00 is spent.
    redis = Redis(tmp_path / "redis")
    a, b = pod(tmp_path, mock.url, redis.url, ONE_DOLLAR, "a"), pod(tmp_path, mock.url, redis.url, ONE_DOLLAR, "b")
    try:
        for i in range(4):
            assert charged(a if i % 2 else b, 0.1).status_code == 200
        settled("the pods' spend", lambda: spend_in_redis(redis).get("day"), 0.4, within=3)
        for _ in range(2):
            redis.cli("INCRBYFLOAT", day_key(redis), "0.100000000000")
        for i in range(4):
            assert charged(a if i % 2 else b, 0.1).status_code == 200
        settled("the gateway's spend", lambda: spend_in_redis(redis).get("day"), 1.0)
        # A float an older pod reads as it always did.
        assert float(redis.cli("GET", day_key(redis))) == 1.0
        assert code(probe(a)) == (429, 2041)
        assert code(probe(b)) == (429, 2041)
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_ten_dimes_reach_a_one_dollar_spend_limit_while_redis_is_stopped(mock, tmp_path):
    # Redis stopped, the pod's own count decides: ten $0.10 answers are its $1.00 (in floating
    # point they made 0.9999999999999999, and an eleventh request passed).
    redis = Redis(tmp_path / "redis")
    g = pod(tmp_path, mock.url, redis.url, ONE_DOLLAR, "a")
    try:
        assert probe(g).status_code == 500  # connected, read: nothing spent
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(10):
                assert charged(g, 0.1).status_code == 200, i
            mock.clear()
            assert code(charged(g, 0.1)) == (429, 2041), "$1.00 spent, yet a request passed"
            assert mock.requests() == []
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        settled("the spend made while Redis was stopped", lambda: spend_in_redis(redis).get("day"), 1.0)
    finally:
        g.stop()
        redis.stop()


def test_requests_the_global_token_budget_refuses_are_given_back_to_the_global_rate_limit(mock, tmp_path):
    redis = Redis(tmp_path / "redis")
    spec = "  rateLimit: {limit: 3, interval: 1h, scope: global, tokensPerMinute: 1}\n"
    g = pod(tmp_path, mock.url, redis.url, spec, "a")
    try:
        r = charged(g, 0.001, "use the minute's tokens")
        assert r.status_code == 200, r.text
        settled("the served request's count", lambda: rate_in_redis(redis), 1, within=3)
        for _ in range(2):
            r = probe(g)
            assert code(r) == (429, 2003) and "token budget" in r.json()["error"][0]["message"], r.text
        # Counted as they were asked, given back in the background.
        settled("the count after the token budget's refusals", lambda: rate_in_redis(redis), 1)
        # The token budget dropped: the same limit and interval, the same windows in Redis.
        reload_config(g, pod_yaml(mock.url, "  rateLimit: {limit: 3, interval: 1h, scope: global}\n"))
        got = [code(probe(g)) for _ in range(3)]
        assert got == [500, 500, (429, 2003)], got
        settled("the count", lambda: rate_in_redis(redis), 3)
    finally:
        g.stop()
        redis.stop()


def test_requests_the_shared_spend_limit_refuses_are_not_counted_by_a_pods_rate_limit(mock, tmp_path):
    # With spec.redis, a pod's own rate limit is asked at once with the spend read from Redis.
    redis = Redis(tmp_path / "redis")
    rate = "  rateLimit: {limit: 3, interval: 1h}\n"
    g = pod(tmp_path, mock.url, redis.url, rate + "  spendLimit: {amount: '0.01', period: day}\n", "a")
    try:
        assert charged(g, 0.02).status_code == 200
        settled("the spend", lambda: spend_in_redis(redis).get("day"), 0.02, within=3)
        for _ in range(3):
            assert code(probe(g)) == (429, 2041)
        reload_config(g, pod_yaml(mock.url, rate + "  spendLimit: {amount: '10', period: day}\n"))
        got = [code(probe(g)) for _ in range(3)]
        assert got == [500, 500, (429, 2003)], got
    finally:
        g.stop()
        redis.stop()


def test_a_global_rate_limit_refusal_names_its_interval_and_counts(mock, tmp_path):
    redis = Redis(tmp_path / "redis")
    g = pod(tmp_path, mock.url, redis.url, "  rateLimit: {limit: 1, interval: 1500ms, scope: global}\n", "a")
    try:
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(g.url + CHAT, json={"model": "mock-status-500", "messages": []}, timeout=30)
            if r.status_code == 429:
                break
            assert time.monotonic() < deadline, "never refused"
        assert r.json()["error"][0]["message"] == "rate limit exceeded: at most 1 request per 1.5s", r.text
    finally:
        g.stop()
        redis.stop()
