"""spec.rateLimit: 429 with code 2003 and Retry-After once the window is used up."""

import time

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, Sidegate, assert_refused_at_start, gateway_yaml

CHAT = "/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "limit me"}]}


def limited(mock, tmp_path, rate_limit, auth=False, extra=""):
    spec = f"  rateLimit: {rate_limit}\n{extra}"
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN}) if auth else DEFAULT_KEYS
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=auth, extra_spec=spec), keys)
    mock.clear()
    return g


def test_fixed_window_refuses_over_the_limit_with_2003_and_retry_after(mock, tmp_path):
    g = limited(mock, tmp_path, "{limit: 3, interval: 1h}")
    try:
        codes = [httpx.post(g.url + CHAT, json=BODY).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = httpx.post(g.url + CHAT, json=BODY)
        assert r.status_code == 429
        assert r.json() == {"success": False, "result": [], "messages": [],
                            "error": [{"code": 2003, "message": "rate limit exceeded: at most 3 requests per 3600s"}]}
        assert 1 <= int(r.headers["retry-after"]) <= 3600
        assert len(mock.requests()) == 3
        # /compat counts against the same limit.
        r = httpx.post(g.url + "/compat/chat/completions", json=dict(BODY, model="openai/gpt-4o-mini"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003)
        m = g.metrics()
        assert 'sidegate_requests_total{provider="openai",status="429"} 1' in m, m  # the route's provider
        assert 'sidegate_requests_total{provider="none",status="429"} 1' in m, m  # /compat names none yet
    finally:
        g.stop()


def test_the_openai_sdk_sees_a_rate_limit_error(mock, tmp_path):
    g = limited(mock, tmp_path, "{limit: 1, interval: 1h}")
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        client.chat.completions.create(**BODY)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(**BODY)
        assert e.value.status_code == 429
    finally:
        g.stop()


def test_a_new_window_allows_requests_again(mock, tmp_path):
    g = limited(mock, tmp_path, "{limit: 2, interval: 2s}")
    try:
        sent = 0
        while (r := httpx.post(g.url + CHAT, json=BODY)).status_code == 200:
            sent += 1
            assert sent <= 4, "at most 2 requests per window (4 across a window boundary)"
        assert r.status_code == 429
        # Retry-After is the time left in the window, rounded up: the next window starts by then.
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 2, retry
        time.sleep(retry)
        assert httpx.post(g.url + CHAT, json=BODY).status_code == 200
    finally:
        g.stop()


def test_cache_hits_are_counted_by_the_limit(mock, tmp_path):
    g = limited(mock, tmp_path, "{limit: 2, interval: 1h}", extra="  cache: {enabled: true}\n")
    try:
        statuses = [httpx.post(g.url + CHAT, json=BODY) for _ in range(2)]
        assert [r.headers["cf-aig-cache-status"] for r in statuses] == ["MISS", "HIT"]
        # Would be another hit, were hits not counted.
        r = httpx.post(g.url + CHAT, json=BODY)
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003), r.text
        assert len(mock.requests()) == 1
    finally:
        g.stop()


@pytest.mark.parametrize("header,value,counted", [
    # Every header of a provider route is read before the limit counts the request.
    ("cf-aig-metadata", "not json", False),
    ("cf-aig-request-timeout", "soon", False),
    ("cf-aig-byok-alias", "nosuchalias", False),
    ("cf-aig-skip-cache", "maybe", False),
    ("cf-aig-max-attempts", "many", False),
])
def test_a_request_refused_for_a_bad_header_value_is_not_counted(mock, tmp_path, header, value, counted):
    g = limited(mock, tmp_path, "{limit: 1, interval: 1h}")
    try:
        r = httpx.post(g.url + CHAT, json=BODY, headers={header: value})
        assert r.status_code == 400 and r.json()["error"][0]["code"] in (2100, 2040), r.text
        r = httpx.post(g.url + CHAT, json=BODY)
        if counted:
            assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003), r.text
            assert mock.requests() == []
        else:
            assert r.status_code == 200, r.text
            assert len(mock.requests()) == 1
    finally:
        g.stop()


def test_sliding_window_limits_and_recovers_once_the_last_window_slid_out(mock, tmp_path):
    # The weighting itself is unit-tested (ratelimit.rs); here: the limit holds, and two quiet
    # intervals later the whole limit is available again.
    g = limited(mock, tmp_path, "{limit: 10, interval: 2s, technique: sliding}")
    try:
        ok = sum(httpx.post(g.url + CHAT, json=BODY).status_code == 200 for _ in range(12))
        assert ok == 10
        time.sleep(4.2)
        ok = sum(httpx.post(g.url + CHAT, json=BODY).status_code == 200 for _ in range(10))
        assert ok == 10
    finally:
        g.stop()


def test_unauthenticated_requests_do_not_use_up_the_limit(mock, tmp_path):
    g = limited(mock, tmp_path, "{limit: 1, interval: 1h}", auth=True)
    try:
        for _ in range(3):
            assert httpx.post(g.url + CHAT, json=BODY).status_code == 401
        # A bad route, an unknown provider among them, is refused before the limit counts it.
        auth = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
        for path in ("/nosuch/chat/completions", "/v1/acct/other-gateway/openai/chat/completions"):
            r = httpx.post(g.url + path, json=BODY, headers=auth)
            assert (r.status_code, r.json()["error"][0]["code"]) == (404, 2001), r.text
        ok = httpx.post(g.url + CHAT, json=BODY, headers=auth)
        assert ok.status_code == 200
    finally:
        g.stop()


@pytest.mark.parametrize("spec,field", [
    ("{limit: 5, interval: 60s, scope: global}", "spec.rateLimit.scope"),
    ("{limit: 5, interval: 60s, tokensPerMinute: 0}", "spec.rateLimit.tokensPerMinute must be larger than 0"),
    ("{limit: 0, interval: 60s}", "spec.rateLimit"),
])
def test_what_cannot_be_served_is_refused_at_start(mock, tmp_path, spec, field):
    assert_refused_at_start(mock, tmp_path, f"  rateLimit: {spec}\n", field)
