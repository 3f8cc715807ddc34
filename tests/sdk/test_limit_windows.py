"""Limits across windows and reloads: a sliding rate limit's Retry-After is when a request
passes again (per pod and in Redis), and a spend limit whose period a reload changed still
counts the answers that were in flight under the old one."""

import json
import re
import threading
import time

import httpx

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from test_redis import pod, redis  # noqa: F401  (module-scoped real redis-server fixture)

CHAT = "/openai/chat/completions"


def body(text="window"):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def refused_then_passes_after_retry_after(g):
    """Fills a 2-per-2 s sliding limit, then waits the Retry-After of its refusal: the retry
    passes. Before the fix Retry-After was the rest of the window, where the full previous
    window still weighed almost wholly, and the retry was refused again."""
    sent = 0
    while (r := httpx.post(g.url + CHAT, json=body())).status_code == 200:
        sent += 1
        assert sent <= 4, "at most 2 requests per window (4 across a boundary)"
    assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003), r.text
    retry = int(r.headers["retry-after"])
    # The window's rest and, at most, the part of the next one the previous count outweighs.
    assert 1 <= retry <= 4, retry
    time.sleep(retry)
    again = httpx.post(g.url + CHAT, json=body())
    assert again.status_code == 200, (retry, again.status_code, again.headers.get("retry-after"))


def test_a_pods_sliding_limit_lets_a_request_through_after_its_retry_after(mock, tmp_path):
    spec = "  rateLimit: {limit: 2, interval: 2s, technique: sliding}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        refused_then_passes_after_retry_after(g)
    finally:
        g.stop()


def test_a_global_sliding_limit_lets_a_request_through_after_its_retry_after(mock, tmp_path, redis):  # noqa: F811
    spec = "  rateLimit: {limit: 2, interval: 2s, technique: sliding, scope: global}\n"
    g = pod(tmp_path, mock, redis.url, spec, "a")
    try:
        refused_then_passes_after_retry_after(g)
    finally:
        g.stop()


def reloads(g):
    m = re.search(r'sidegate_config_reloads_total\{result="success"\} (\d+)', g.metrics())
    return int(m.group(1)) if m else 0


def charged(g, usd, text, **headers):
    return httpx.post(g.url + CHAT, json=body(text),
                      headers={"cf-aig-custom-cost": json.dumps({"total_cost": usd}), **headers}, timeout=30)


def test_answers_in_flight_across_a_period_change_count_against_the_new_period(mock, tmp_path):
    # $5 a week becomes $5 a month while a $3 answer admitted under the week's limit streams;
    # then a $3 answer of the month's. The pod kept one period's sum: the stream's charge made it
    # the week's, the month's charge started the month afresh, and $3 + $3 (and more) went
    # through the $5 monthly limit.
    week = gateway_yaml(mock.url, extra_spec="  spendLimit: {amount: '5', period: week}\n")
    month = gateway_yaml(mock.url, extra_spec="  spendLimit: {amount: '5', period: month}\n")
    g = Sidegate(tmp_path, week, DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        stream = {}

        def slow():
            body_ = dict(body("a slow stream that is charged once it ends"), stream=True)
            with httpx.stream("POST", g.url + CHAT, json=body_, timeout=30,
                              headers={"cf-aig-custom-cost": json.dumps({"total_cost": 3}),
                                       "x-mock-chunk-delay-ms": "300"}) as r:
                stream["status"] = r.status_code
                stream["log_id"] = r.headers.get("cf-aig-log-id")
                stream["body"] = r.read()

        t = threading.Thread(target=slow)
        before = reloads(g)
        t.start()
        deadline = time.monotonic() + 5
        while "status" not in stream:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.01)
        g.config.write_text(month)
        while reloads(g) == before:
            assert time.monotonic() < deadline, "the month's config was not loaded"
            time.sleep(0.02)
        assert t.is_alive(), "the stream ended before the reload: slow it down"
        r = charged(g, 3, "the month's own answer")
        assert r.status_code == 200, r.text
        g.wait_log_line(r.headers["cf-aig-log-id"])
        t.join(30)
        assert stream["status"] == 200, stream
        g.wait_log_line(stream["log_id"])
        # $6 spent this month: the limit refuses.
        r = charged(g, 3, "one too many")
        assert r.status_code == 429, "$6 spent this month went through a $5 monthly limit"
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2041), r.text
        assert r.json()["error"][0]["message"] == "spend limit exceeded: 5 USD per month reached"
    finally:
        g.stop()
