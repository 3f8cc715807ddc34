"""Edges of the charges kept for the gateway's Redis, against real redis-server processes on
loopback and real sidecars.

README "Redis: cache, rate limits and spend shared by every pod": a batch whose answer never came
is sent again with its number and applied at most once, even when Redis evicted the key that
keeps the number (then it is dropped, counted); the sidecar warns when Redis may evict keys; at a
stop, charges kept for a Redis the config no longer names are written to it for the same 3 s, or
logged as lost; while Redis cannot be read a global token budget starts from the gateway's total
last read plus what this pod used since, as the spend limit does.
"""

import json
import signal
import time
import uuid

import httpx

from test_redis import Redis, redis_errors
from test_redis_outages import charged, code, dropped, probe, settled, spend_in_redis
from test_redis_review import LatencyProxy, pod

CHAT = "/openai/chat/completions"
PW = "sgtest-edges-pw-5b2e"


def marker_keys(redis):
    return redis.cli("--scan", "--pattern", "sidegate:team-a/shared-gw:charges:*").split()


def spend_day(redis):
    return round(spend_in_redis(redis).get("day", 0.0), 9)


def test_a_batch_sent_again_after_redis_evicted_its_marker_is_not_applied_twice(mock, tmp_path):
    # Redis applies each command at once, its answers reach the pod 0.8 s later (past the 500 ms it
    # waits): the batch is sent again with its number. Meanwhile Redis evicts the pod's marker key
    # (an allkeys-lru Redis under memory pressure; deleted here, deterministically): the number
    # alone can no longer tell that the batch was applied.
    redis = Redis(tmp_path / "redis")
    proxy = LatencyProxy(redis.port, 0.8)
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
        deadline = time.monotonic() + 5
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
