"""The response cache, through the official SDKs and raw HTTP, against the mock provider.

A hit is proven by the mock: it sees one request for two answered, and the cached answer
carries the first response's id (the mock numbers its responses).
"""

import json
import time

import anthropic
import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, assert_refused_at_start, gateway_yaml

CACHE_ON = "  cache: {enabled: true, ttl: 10m}\n"
CHAT = "/openai/chat/completions"


def chat_body(text="hello cache", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def post(gw, path=CHAT, body=None, headers=None, content=None):
    kw = {"content": content} if content is not None else {"json": body or chat_body()}
    return httpx.post(gw.url + path, headers=headers or {}, timeout=10, **kw)


def cache_metric(gw, result):
    for line in gw.metrics().splitlines():
        if line.startswith(f'sidegate_cache_requests_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def cached_gateway(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


@pytest.fixture
def streaming_cache_gateway(mock, tmp_path):
    spec = "  cache: {enabled: true, streaming: true}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def test_openai_sdk_second_identical_request_is_a_hit_from_memory(cached_gateway, mock):
    client = openai.OpenAI(base_url=cached_gateway.url + "/openai", api_key="placeholder", max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello cache"}]
    )
    second = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello cache"}]
    )
    assert first.headers["cf-aig-cache-status"] == "MISS"
    assert second.headers["cf-aig-cache-status"] == "HIT"
    assert second.parse().id == first.parse().id
    assert second.parse().choices[0].message.content == "mock reply to: hello cache"
    assert second.headers["cf-aig-log-id"] != first.headers["cf-aig-log-id"]
    assert len(mock.requests()) == 1
    assert (cache_metric(cached_gateway, "miss"), cache_metric(cached_gateway, "hit")) == (1, 1)
    log_id = second.headers["cf-aig-log-id"]
    deadline = time.monotonic() + 3
    while not any(log_id in line and "cached=true" in line for line in cached_gateway.logs().splitlines()):
        assert time.monotonic() < deadline, "the hit's log line says cached=true"
        time.sleep(0.05)


def test_the_key_is_the_normalized_json_body(cached_gateway, mock):
    a = post(cached_gateway, content=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"same"}]}')
    b = post(cached_gateway, content=b'{ "messages": [ {"content": "same", "role": "user"} ],\n  "model": "gpt-4o-mini" }')
    c = post(cached_gateway, body=chat_body("different"))
    assert [r.headers["cf-aig-cache-status"] for r in (a, b, c)] == ["MISS", "HIT", "MISS"]
    assert b.content == a.content
    assert len(mock.requests()) == 2


def test_skip_cache_neither_reads_nor_stores(cached_gateway, mock):
    skip = {"cf-aig-skip-cache": "true"}
    r1 = post(cached_gateway, headers=skip)
    r2 = post(cached_gateway)
    r3 = post(cached_gateway, headers=skip)
    assert [r.headers["cf-aig-cache-status"] for r in (r1, r2, r3)] == ["MISS", "MISS", "MISS"]
    assert len(mock.requests()) == 3
    assert cache_metric(cached_gateway, "skip") == 2
    assert post(cached_gateway).headers["cf-aig-cache-status"] == "HIT"


def test_aliases_and_client_keys_never_share_entries(cached_gateway, mock):
    assert post(cached_gateway).headers["cf-aig-cache-status"] == "MISS"
    assert post(cached_gateway, headers={"cf-aig-byok-alias": "team-b"}).headers["cf-aig-cache-status"] == "MISS"
    assert post(cached_gateway, headers={"cf-aig-byok-alias": "team-b"}).headers["cf-aig-cache-status"] == "HIT"
    # groq has no stored key: each client's own key is part of the cache key.
    groq = "/groq/chat/completions"
    alice = {"authorization": "Bearer client-key-alice"}
    bob = {"authorization": "Bearer client-key-bob"}
    assert post(cached_gateway, groq, headers=alice).headers["cf-aig-cache-status"] == "MISS"
    assert post(cached_gateway, groq, headers=bob).headers["cf-aig-cache-status"] == "MISS"
    assert post(cached_gateway, groq, headers=alice).headers["cf-aig-cache-status"] == "HIT"
    assert len(mock.requests()) == 4


def test_routed_requests_with_the_clients_own_keys_never_share_entries(mock, tmp_path):
    # groq has no stored key: a route to it forwards each client's key, so the key is part of
    # the cache key even though the route, not the provider, names the entry.
    spec = CACHE_ON + "  fallbacks:\n    - name: own\n      targets:\n        - {provider: groq, model: llama-3.1-8b-instant}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        body = {"model": "fallback/own", "messages": [{"role": "user", "content": "whose key"}]}
        compat = "/compat/chat/completions"
        alice = {"authorization": "Bearer client-key-alice"}
        bob = {"authorization": "Bearer client-key-bob"}
        assert post(g, compat, body, alice).headers["cf-aig-cache-status"] == "MISS"
        assert post(g, compat, body, bob).headers["cf-aig-cache-status"] == "MISS"
        assert post(g, compat, body, alice).headers["cf-aig-cache-status"] == "HIT"
        sent = [q["headers"]["authorization"] for q in mock.requests()]
        assert sent == ["Bearer client-key-alice", "Bearer client-key-bob"]
    finally:
        g.stop()


def test_requests_signed_by_the_client_are_keyed_by_their_signature(mock, tmp_path):
    # No stored AWS credentials: the client's SigV4 signature goes upstream. An access key id
    # is no secret, so only the same signed request may be answered from the cache.
    spec = f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        path = "/aws-bedrock/bedrock-runtime/us-west-2/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
        body = {"messages": [{"role": "user", "content": [{"text": "signed"}]}]}
        def signed(who, sig):
            return {"authorization": f"AWS4-HMAC-SHA256 Credential={who}/20260101/us-west-2/bedrock/aws4_request, "
                                     f"SignedHeaders=host;x-amz-date, Signature={sig}", "x-amz-date": "20260101T000000Z"}
        assert post(g, path, body, signed("AKIDALICE", "aa")).headers["cf-aig-cache-status"] == "MISS"
        assert post(g, path, body, signed("AKIDALICE", "bb")).headers["cf-aig-cache-status"] == "MISS"
        assert post(g, path, body, signed("AKIDALICE", "aa")).headers["cf-aig-cache-status"] == "HIT"
        assert len(mock.requests()) == 2
    finally:
        g.stop()


def test_custom_cache_key_names_the_entry_in_place_of_the_body(cached_gateway, mock):
    k = {"cf-aig-cache-key": "daily-greeting"}
    a = post(cached_gateway, body=chat_body("one"), headers=k)
    b = post(cached_gateway, body=chat_body("two"), headers=k)
    assert (a.headers["cf-aig-cache-status"], b.headers["cf-aig-cache-status"]) == ("MISS", "HIT")
    assert b.json()["choices"][0]["message"]["content"] == "mock reply to: one"


def test_provider_errors_are_never_cached(cached_gateway, mock):
    for _ in range(2):
        r = post(cached_gateway, body=chat_body(model="mock-status-429"))
        assert r.status_code == 429
        assert r.headers["cf-aig-cache-status"] == "MISS"
    assert len(mock.requests()) == 2


def test_streams_are_not_cached_unless_configured(cached_gateway, mock):
    client = openai.OpenAI(base_url=cached_gateway.url + "/openai", api_key="placeholder", max_retries=0)
    for _ in range(2):
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "mock reply to: stream me"
    assert len(mock.requests()) == 2


def test_configured_streams_are_replayed_from_the_cache(streaming_cache_gateway, mock):
    client = openai.OpenAI(base_url=streaming_cache_gateway.url + "/openai", api_key="placeholder", max_retries=0)

    def run():
        resp = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me"}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(resp.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return resp.headers["cf-aig-cache-status"], text, chunks[-1].usage.total_tokens

    first, second = run(), run()
    assert first[0] == "MISS" and second[0] == "HIT"
    assert first[1:] == second[1:] and first[1] == "mock reply to: stream me"
    assert len(mock.requests()) == 1


def wait_for_request(mock, text, timeout=5):
    """Waits until the mock has received a request whose body holds `text`."""
    deadline = time.monotonic() + timeout
    while not any(text in q["body"] for q in mock.requests()):
        assert time.monotonic() < deadline, f"the mock never received the request for {text!r}"
        time.sleep(0.02)


def test_an_identical_stream_does_not_wait_for_one_being_cached(streaming_cache_gateway, mock):
    # The first stream takes ~3 s (31 events, 100 ms apart); an identical request arriving
    # meanwhile gets its own stream at once instead of a replay after the first one ends.
    import threading
    text = "slow identical streams " + " ".join(f"w{i:02}" for i in range(25))
    body = chat_body(text, stream=True)
    slow = {"x-mock-chunk-delay-ms": "100"}
    first = {}
    leader_done = threading.Event()

    def leader():
        try:
            with httpx.stream("POST", streaming_cache_gateway.url + CHAT, json=body, headers=slow, timeout=30) as r:
                first["status"] = r.headers["cf-aig-cache-status"]
                first["body"] = r.read()
        finally:
            leader_done.set()

    t = threading.Thread(target=leader)
    t.start()
    wait_for_request(mock, text)  # the leader's stream is under way
    with httpx.stream("POST", streaming_cache_gateway.url + CHAT, json=body, headers=slow, timeout=30) as r:
        chunks = r.iter_raw()
        second = next(chunks)
        assert not leader_done.is_set(), "the second stream started only after the first one ended"
        assert r.headers["cf-aig-cache-status"] == "MISS"
        second += b"".join(chunks)
    t.join()
    assert first["status"] == "MISS" and len(mock.requests()) == 2
    assert first["body"].rstrip().endswith(b"data: [DONE]") and second.rstrip().endswith(b"data: [DONE]")
    assert post(streaming_cache_gateway, body=body).headers["cf-aig-cache-status"] == "HIT"


def test_a_stream_cut_off_by_the_client_is_not_stored(streaming_cache_gateway, mock):
    body = chat_body("slow stream cut off by its client", stream=True)
    cancelled = mock.stats()["streams_cancelled"]
    with httpx.stream("POST", streaming_cache_gateway.url + CHAT, json=body,
                      headers={"x-mock-chunk-delay-ms": "200"}, timeout=10) as r:
        assert r.headers["cf-aig-cache-status"] == "MISS"
        next(r.iter_raw())  # first bytes, then hang up
    # Once the mock sees its stream cancelled, the gateway has noticed the hang-up.
    deadline = time.monotonic() + 5
    while mock.stats()["streams_cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the upstream stream was not cancelled"
        time.sleep(0.05)
    whole = post(streaming_cache_gateway, body=body)
    assert whole.headers["cf-aig-cache-status"] == "MISS"
    assert whole.text.rstrip().endswith("data: [DONE]")
    hit = post(streaming_cache_gateway, body=body)
    assert hit.headers["cf-aig-cache-status"] == "HIT"
    assert hit.text.rstrip().endswith("data: [DONE]")
    assert hit.content == whole.content


def reload_count(g):
    for line in g.metrics().splitlines():
        if line.startswith('sidegate_config_reloads_total{result="success"}'):
            return float(line.split()[-1])
    return 0.0


def reload_config(g, text):
    before = reload_count(g)
    g.config.write_text(text)
    deadline = time.monotonic() + 5
    while reload_count(g) == before:
        assert time.monotonic() < deadline, "the edited config was not reloaded"
        time.sleep(0.05)


def test_the_cache_survives_config_reloads_unless_max_size_changes(mock, tmp_path):
    spec = "  cache: {enabled: true, ttl: 10m, maxSize: 1Mi}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        body = chat_body("kept across reloads")
        assert post(g, body=body).headers["cf-aig-cache-status"] == "MISS"
        # An edit of everything but maxSize: another ttl, a rate limit, another provider.
        edited = (f"    mistral: {{baseURL: '{mock.url}/v1'}}\n" + spec.replace("ttl: 10m", "ttl: 20m")
                  + "  rateLimit: {limit: 1000, interval: 60s}\n")
        reload_config(g, gateway_yaml(mock.url, extra_spec=edited))
        assert post(g, body=body).headers["cf-aig-cache-status"] == "HIT"
        assert len(mock.requests()) == 1
        # A new maxSize empties it.
        reload_config(g, gateway_yaml(mock.url, extra_spec=edited.replace("maxSize: 1Mi", "maxSize: 2Mi")))
        assert post(g, body=body).headers["cf-aig-cache-status"] == "MISS"
        assert len(mock.requests()) == 2
    finally:
        g.stop()


def test_compat_and_routed_entries_are_keyed_by_where_their_targets_go(mock, tmp_path):
    # A reload pointing a route's target (or a /compat model's provider) at another upstream
    # leaves the former one's entries unused; one that moves a provider the route never
    # reaches keeps them.
    def answer(who):
        return json.dumps({"id": f"chatcmpl-{who}", "object": "chat.completion", "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": who}}]}).encode()

    old, new = FixedAnswerServer(answer("old")), FixedAnswerServer(answer("new"))
    spec = ("    custom-llm: {baseURL: '%s/v1'}\n    mistral: {baseURL: '%s/v1'}\n" + CACHE_ON
            + "  fallbacks:\n    - name: chain\n      targets:\n        - {provider: custom-llm, model: m}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec % (old.url, old.url)), DEFAULT_KEYS)
    try:
        own = {"authorization": "Bearer client-key"}

        def ask(model):
            r = post(g, "/compat/chat/completions", {**chat_body("where to"), "model": model}, own)
            assert r.status_code == 200, r.text
            return r.headers["cf-aig-cache-status"], r.json()["choices"][0]["message"]["content"]

        for model in ("custom-llm/m", "fallback/chain"):
            assert [ask(model) for _ in range(2)] == [("MISS", "old"), ("HIT", "old")]
        # Another provider moved: the entries stay.
        reload_config(g, gateway_yaml(mock.url, extra_spec=spec % (old.url, new.url)))
        for model in ("custom-llm/m", "fallback/chain"):
            assert ask(model) == ("HIT", "old")
        # The target moved: the new upstream answers.
        reload_config(g, gateway_yaml(mock.url, extra_spec=spec % (new.url, new.url)))
        for model in ("custom-llm/m", "fallback/chain"):
            assert [ask(model) for _ in range(2)] == [("MISS", "new"), ("HIT", "new")]
    finally:
        g.stop()
        old.stop()
        new.stop()


def test_cache_ttl_header_turns_the_cache_on_for_one_request(gateway, mock):
    plain = post(gateway)
    assert "cf-aig-cache-status" not in plain.headers
    ttl = {"cf-aig-cache-ttl": "120"}
    assert post(gateway, headers=ttl).headers["cf-aig-cache-status"] == "MISS"
    hit = post(gateway, headers=ttl)
    assert hit.headers["cf-aig-cache-status"] == "HIT"
    assert len(mock.requests()) == 2


def test_a_custom_cache_key_alone_caches_for_five_minutes_when_the_gateway_cache_is_off(gateway, mock):
    # Cloudflare: "If caching is not enabled for the gateway, responses will be cached for 5
    # minutes by default."
    k = {"cf-aig-cache-key": "responseA"}
    a = post(gateway, body=chat_body("one"), headers=k)
    b = post(gateway, body=chat_body("two"), headers=k)
    assert (a.headers["cf-aig-cache-status"], b.headers["cf-aig-cache-status"]) == ("MISS", "HIT")
    assert b.json()["choices"][0]["message"]["content"] == "mock reply to: one"
    assert len(mock.requests()) == 1
    assert "cf-aig-cache-status" not in post(gateway, body=chat_body("one")).headers


def test_a_cache_ttl_of_zero_turns_the_cache_off_for_the_request(cached_gateway, mock):
    zero = {"cf-aig-cache-ttl": "0"}
    first = post(cached_gateway, headers=zero)
    second = post(cached_gateway, headers=zero)
    assert [r.status_code for r in (first, second)] == [200, 200]
    assert [r.headers["cf-aig-cache-status"] for r in (first, second)] == ["MISS", "MISS"]
    assert first.json()["id"] != second.json()["id"] and len(mock.requests()) == 2
    # Nothing was stored either.
    assert post(cached_gateway).headers["cf-aig-cache-status"] == "MISS"


def test_the_former_skip_cache_header_still_works_and_never_goes_upstream(cached_gateway, mock):
    # Cloudflare: "cf-cache-ttl is now cf-aig-cache-ttl, cf-skip-cache is now cf-aig-skip-cache
    # ... the old headers will still function".
    post(cached_gateway)
    skipped = post(cached_gateway, headers={"cf-skip-cache": "true"})
    assert skipped.headers["cf-aig-cache-status"] == "MISS" and len(mock.requests()) == 2
    assert "cf-skip-cache" not in mock.last()["headers"]


def test_the_former_cache_ttl_header_still_works_and_never_goes_upstream(gateway, mock):
    ttl = {"cf-cache-ttl": "120"}
    assert [post(gateway, headers=ttl).headers["cf-aig-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    assert len(mock.requests()) == 1 and "cf-cache-ttl" not in mock.last()["headers"]
    bad = post(gateway, headers={"cf-cache-ttl": "59"})
    assert (bad.status_code, bad.json()["error"][0]["code"]) == (400, 2100)


@pytest.mark.parametrize("header,value", [
    ("cf-aig-cache-ttl", "59"),
    ("cf-aig-cache-ttl", "2592001"),
    ("cf-aig-cache-ttl", "1"),
    ("cf-aig-cache-ttl", "an hour"),
    ("cf-aig-skip-cache", "maybe"),
])
def test_bad_cache_headers_are_400_2100_naming_the_header(cached_gateway, mock, header, value):
    r = post(cached_gateway, headers={header: value})
    assert r.status_code == 400
    err = r.json()["error"][0]
    assert err["code"] == 2100 and header in err["message"]
    assert mock.requests() == []


def test_anthropic_sdk_and_compat_hits(cached_gateway, mock):
    client = anthropic.Anthropic(base_url=cached_gateway.url + "/anthropic", api_key="placeholder", max_retries=0)
    statuses = []
    for _ in range(2):
        resp = client.messages.with_raw_response.create(
            model="claude-opus-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}]
        )
        statuses.append(resp.headers["cf-aig-cache-status"])
        assert resp.parse().content[0].text == "mock reply to: hi claude"
    assert statuses == ["MISS", "HIT"]
    compat = openai.OpenAI(base_url=cached_gateway.url + "/compat", api_key="placeholder", max_retries=0)
    got = []
    for _ in range(2):
        resp = compat.chat.completions.with_raw_response.create(
            model="anthropic/claude-opus-4-5", messages=[{"role": "user", "content": "via compat"}]
        )
        got.append((resp.headers["cf-aig-cache-status"], resp.parse().choices[0].message.content))
    assert got == [("MISS", "mock reply to: via compat"), ("HIT", "mock reply to: via compat")]
    assert len(mock.requests()) == 2


@pytest.mark.parametrize("spec,field", [
    ("  cache: {enabled: true, ttl: 10s}\n", "spec.cache.ttl"),
    ("  cache: {enabled: true, maxSize: 1Ki}\n", "spec.cache.maxSize"),
])
def test_bad_cache_config_is_refused_at_start_naming_the_field(mock, tmp_path, spec, field):
    assert_refused_at_start(mock, tmp_path, spec, field)


def _concurrently(n, fn):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def test_identical_requests_at_the_same_time_make_one_upstream_call(cached_gateway, mock):
    body = chat_body("stampede")
    slow = {"x-mock-delay-ms": "400"}
    answers = _concurrently(6, lambda: post(cached_gateway, body=body, headers=slow))
    assert [r.status_code for r in answers] == [200] * 6
    assert len(mock.requests()) == 1
    statuses = sorted(r.headers["cf-aig-cache-status"] for r in answers)
    assert statuses == ["HIT"] * 5 + ["MISS"]
    assert len({r.json()["id"] for r in answers}) == 1
    assert cache_metric(cached_gateway, "hit") == 5


def test_an_identical_request_waits_for_the_first_no_longer_than_its_own_timeout(cached_gateway, mock):
    # The first takes 3 s; an identical one that gives the provider 500 ms waits at most that
    # long for it, then calls upstream itself and times out there (it waited 3 s for a hit).
    import threading
    body = chat_body("patience")
    slow = {"x-mock-delay-ms": "3000"}
    first = threading.Thread(target=lambda: post(cached_gateway, body=body, headers=slow))
    first.start()
    time.sleep(0.2)
    started = time.monotonic()
    r = post(cached_gateway, body=body, headers={**slow, "cf-aig-request-timeout": "500"})
    took = time.monotonic() - started
    first.join()
    assert (r.status_code, r.json()["error"][0]["code"]) == (504, 2103), r.text
    assert took < 2.0, f"answered after {took:.1f} s"


def test_identical_requests_waiting_on_an_uncacheable_answer_each_call_upstream(cached_gateway, mock):
    # A 500 is not stored: the waiting requests go upstream themselves once it arrives, and
    # none of them hangs.
    body = chat_body("broken", model="mock-status-500")
    slow = {"x-mock-delay-ms": "300"}
    answers = _concurrently(4, lambda: post(cached_gateway, body=body, headers=slow))
    assert [r.status_code for r in answers] == [500] * 4
    assert len(mock.requests()) == 4


def test_an_upstreams_own_cf_aig_headers_are_not_taken_for_the_gateways(mock, tmp_path):
    """An upstream that is itself an AI gateway (or any upstream) may answer with cf-aig-*
    headers: they must not reach the client as this gateway's, nor be stored with the answer and
    name a hit's provider, model and step (a metric label the upstream would choose)."""
    server = FixedAnswerServer(
        b'{"id":"chatcmpl-up","object":"chat.completion","model":"gpt-4o-mini","choices":[]}',
        headers=[("cf-aig-provider", "evil-label"), ("cf-aig-model", "not-the-model"), ("cf-aig-step", "7"),
                 ("cf-aig-cache-status", "HIT"), ("cf-aig-log-id", "upstream-id")])
    yaml = gateway_yaml(mock.url, extra_spec="").replace(
        "  providers:\n",
        f"  providers:\n    custom-gw: {{baseURL: '{server.url}/v1'}}\n", 1) + CACHE_ON
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS)
    try:
        miss, hit = (post(g, "/custom-gw/chat/completions") for _ in range(2))
        for r, status in [(miss, "MISS"), (hit, "HIT")]:
            assert r.status_code == 200, r.text
            assert r.headers["cf-aig-cache-status"] == status
            assert r.headers["cf-aig-log-id"] != "upstream-id"
            assert not any(r.headers.get(h) for h in ("cf-aig-provider", "cf-aig-model", "cf-aig-step")), r.headers
        line = g.wait_log_line(hit.headers["cf-aig-log-id"])
        assert " provider=custom-gw " in line and "evil-label" not in line and "not-the-model" not in line, line
        assert "evil-label" not in g.metrics()
    finally:
        g.stop()
        server.stop()


def test_long_form_accounts_that_reach_the_upstream_url_never_share_entries(mock, tmp_path):
    # workers-ai without an accountId takes it from the long-form URL: another account is
    # another upstream, whose answers another account must not get.
    server = FixedAnswerServer(b'{"result": {"response": "for account a"}, "success": true}',
                               then=[(200, b'{"result": {"response": "for account b"}, "success": true}')])
    extra = f"    workers-ai: {{baseURL: '{server.url}/client/v4/accounts/{{account}}/ai'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), DEFAULT_KEYS)
    try:
        def ask(account):
            return httpx.post(f"{g.url}/v1/{account}/main/workers-ai/@cf/meta/llama-3.1-8b-instruct",
                              headers={"authorization": "Bearer cf-token"}, json={"prompt": "hi"})
        a, a_again, b = ask("acct-a"), ask("acct-a"), ask("acct-b")
        assert [r.headers["cf-aig-cache-status"] for r in (a, a_again, b)] == ["MISS", "HIT", "MISS"]
        assert (a_again.json()["result"]["response"], b.json()["result"]["response"]) == (
            "for account a", "for account b")
    finally:
        g.stop()
        server.stop()


def numbered_server(n=12, **kw):
    """A server whose answers are numbered, {"n": 1}, {"n": 2}, ...: a repeated number is a replay."""
    return FixedAnswerServer(b'{"n": 1}', then=[(200, b'{"n": %d}' % i) for i in range(2, n)], **kw)


def test_only_posts_to_inference_endpoints_are_cached(mock, tmp_path):
    # A status poll, a run, a background response: state the provider keeps, which a replay
    # would freeze for the TTL (a poll never seeing its job finish, a run never started).
    server = numbered_server()
    spec = f"    custom-state: {{baseURL: '{server.url}/v1'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        own = {"authorization": "Bearer client-key"}
        def twice(method, path, body=None):
            return [httpx.request(method, g.url + "/custom-state/" + path, json=body, headers=own, timeout=10)
                    for _ in range(2)]
        for method, path, body in [
            ("GET", "responses/resp_1", None),
            ("GET", "batches/batch_1", None),
            ("POST", "threads/thread_1/runs", {"assistant_id": "asst_1"}),
            ("POST", "responses", {"model": "gpt-4o-mini", "input": "later", "background": True}),
        ]:
            answers = twice(method, path, body)
            assert [r.status_code for r in answers] == [200, 200], (method, path)
            assert answers[0].json()["n"] != answers[1].json()["n"], f"{method} {path} was replayed"
            assert [r.headers["cf-aig-cache-status"] for r in answers] == ["MISS", "MISS"]
        # The model's answers still are.
        for path, body in [("chat/completions", chat_body()), ("responses", {"model": "gpt-4o-mini", "input": "now"})]:
            answers = twice("POST", path, body)
            assert [r.headers["cf-aig-cache-status"] for r in answers] == ["MISS", "HIT"], path
            assert answers[0].json() == answers[1].json()
    finally:
        g.stop()
        server.stop()


ANTHROPIC_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                   b'"role":"assistant","content":[],"model":"claude-haiku-4-5","usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
                   b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
                   b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}\n\n')
ANTHROPIC_END = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
                 b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}\n\n'
                 b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
RESPONSES_START = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}\n\n'
                   b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hel"}\n\n')


@pytest.mark.parametrize("path,stream,whole", [
    ("v1/messages", ANTHROPIC_START + ANTHROPIC_END, True),
    ("v1/messages", ANTHROPIC_START + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n', False),
    ("v1/messages", ANTHROPIC_START, False),
    ("v1/responses", RESPONSES_START + b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","status":"completed"}}\n\n', True),
    ("v1/responses", RESPONSES_START + b'event: response.failed\ndata: {"type":"response.failed","response":{"id":"resp_1","status":"failed"}}\n\n', False),
    ("v1/responses", RESPONSES_START + b'event: error\ndata: {"type":"error","code":"server_error","message":"boom"}\n\n', False),
    ("v1/responses", RESPONSES_START, False),
], ids=["anthropic-whole", "anthropic-error-event", "anthropic-no-message-stop", "responses-whole",
        "responses-failed", "responses-error-event", "responses-no-completed"])
def test_a_stream_that_failed_in_band_or_ended_without_its_last_event_is_not_stored(mock, tmp_path, path, stream, whole):
    # The provider's 200 stream carries its failure as an event, or just stops: a replay of it
    # would serve that failure as an answer for the whole TTL.
    server = FixedAnswerServer(stream, content_type="text/event-stream")
    spec = f"    custom-sse: {{baseURL: '{server.url}'}}\n  cache: {{enabled: true, streaming: true}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        body = {"model": "m", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        answers = [post(g, "/custom-sse/" + path, body, {"x-api-key": "client-key"}) for _ in range(2)]
        assert [r.status_code for r in answers] == [200, 200]
        assert answers[0].content == stream
        statuses = [r.headers["cf-aig-cache-status"] for r in answers]
        assert statuses == (["MISS", "HIT"] if whole else ["MISS", "MISS"])
    finally:
        g.stop()
        server.stop()


BEDROCK_STREAM = "/aws-bedrock/bedrock-runtime/us-west-2/model/anthropic.claude-3-haiku-20240307-v1:0/converse-stream"
SIGNED = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-west-2/bedrock/aws4_request, "
                           "SignedHeaders=host;x-amz-date, Signature=aa", "x-amz-date": "20260101T000000Z"}


@pytest.mark.parametrize("streaming", [False, True])
def test_bedrock_and_gemini_streams_are_streams(mock, tmp_path, streaming):
    # Bedrock's binary event streams, and Gemini's JSON stream (no alt=sse): stored only with
    # `streaming: true`, and then only whole.
    gemini_json = (b'[{"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}]}\r\n,'
                   b'{"candidates": [{"content": {"parts": [{"text": "lo"}], "role": "model"}, "finishReason": "STOP", "index": 0}],'
                   b' "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}}\r\n]')
    server = FixedAnswerServer(gemini_json)
    spec = (f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n    google-ai-studio: {{baseURL: '{mock.url}'}}\n"
            f"    custom-gemini: {{baseURL: '{server.url}'}}\n"
            f"  cache: {{enabled: true, streaming: {str(streaming).lower()}}}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        expected = ["MISS", "HIT"] if streaming else ["MISS", "MISS"]
        bedrock = [post(g, BEDROCK_STREAM, {"messages": [{"role": "user", "content": [{"text": "stream"}]}]}, SIGNED)
                   for _ in range(2)]
        assert [r.status_code for r in bedrock] == [200, 200]
        assert bedrock[0].headers["content-type"] == "application/vnd.amazon.eventstream"
        assert [r.headers["cf-aig-cache-status"] for r in bedrock] == expected
        assert len(mock.requests()) == (1 if streaming else 2)
        gemini_path = "/custom-gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        gemini = [post(g, gemini_path, {"contents": [{"parts": [{"text": "hi"}]}]}, {"x-goog-api-key": "k"})
                  for _ in range(2)]
        assert [r.headers["cf-aig-cache-status"] for r in gemini] == expected
        assert gemini[1].content == gemini_json
        # Gemini's SSE stream (alt=sse) and Anthropic's, as the mock writes them, end whole.
        sse = [post(g, "/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                    {"contents": [{"parts": [{"text": "hi"}]}]}, {"x-goog-api-key": "k"}) for _ in range(2)]
        assert sse[0].headers["content-type"].startswith("text/event-stream")
        assert [r.headers["cf-aig-cache-status"] for r in sse] == expected
        claude = [post(g, "/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 16, "stream": True,
                                                     "messages": [{"role": "user", "content": "stream"}]})
                  for _ in range(2)]
        assert [r.headers["cf-aig-cache-status"] for r in claude] == expected
        assert (claude[1].content == claude[0].content) == streaming, "a replay, or the mock's next message"
    finally:
        g.stop()
        server.stop()


def test_an_identical_request_does_not_wait_for_a_bedrock_stream(mock, tmp_path):
    # As for SSE streams: a replay would reach the second client only after the whole stream.
    import threading
    spec = f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n  cache: {{enabled: true, streaming: true}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        text = "slow bedrock stream " + " ".join(f"w{i:02}" for i in range(20))
        body = {"messages": [{"role": "user", "content": [{"text": text}]}]}
        slow = {**SIGNED, "x-mock-chunk-delay-ms": "100"}
        leader_done = threading.Event()

        def leader():
            try:
                post(g, BEDROCK_STREAM, body, slow)
            finally:
                leader_done.set()

        t = threading.Thread(target=leader)
        t.start()
        wait_for_request(mock, text)
        with httpx.stream("POST", g.url + BEDROCK_STREAM, json=body, headers=slow, timeout=30) as r:
            chunks = r.iter_raw()
            next(chunks)
            assert not leader_done.is_set(), "the second stream started only after the first one ended"
            assert r.headers["cf-aig-cache-status"] == "MISS"
            b"".join(chunks)
        t.join()
        assert len(mock.requests()) == 2
    finally:
        g.stop()


ROUTED_SPEC = CACHE_ON + """\
  routes:
    - name: plan
      nodes:
        - {id: s, type: start, next: c}
        - {id: c, type: conditional, condition: 'metadata.plan == "paid"', then: big, else: small}
        - {id: big, type: model, provider: anthropic, model: claude-sonnet-4-5, next: e}
        - {id: small, type: model, provider: openai, model: gpt-4o-mini, next: e}
        - {id: e, type: end}
"""


def test_a_conditional_branch_never_answers_with_another_branchs_entry(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=ROUTED_SPEC), DEFAULT_KEYS)
    try:
        body = {"model": "dynamic/plan", "messages": [{"role": "user", "content": "which model"}]}
        def ask(plan):
            r = post(g, "/compat/chat/completions", body, {"cf-aig-metadata": f'{{"plan": "{plan}"}}'})
            assert r.status_code == 200, r.text
            return r.headers["cf-aig-cache-status"], r.headers["cf-aig-model"]
        assert ask("free") == ("MISS", "gpt-4o-mini")
        assert ask("paid") == ("MISS", "claude-sonnet-4-5")
        assert ask("paid") == ("HIT", "claude-sonnet-4-5")
        assert ask("free") == ("HIT", "gpt-4o-mini")
    finally:
        g.stop()


def test_bedrock_guardrail_headers_are_part_of_the_key(mock, tmp_path):
    # Another guardrail (or none) is another answer: a cached unguarded answer must not reach a
    # request that names a guardrail.
    spec = f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        path = BEDROCK_STREAM.removesuffix("-stream")
        body = {"messages": [{"role": "user", "content": [{"text": "guard me"}]}]}
        guarded = {**SIGNED, "x-amzn-bedrock-guardrailidentifier": "gr-1", "x-amzn-bedrock-guardrailversion": "1"}
        statuses = [post(g, path, body, h).headers["cf-aig-cache-status"]
                    for h in (SIGNED, guarded, {**guarded, "x-amzn-bedrock-guardrailversion": "2"},
                              {**guarded, "x-amzn-bedrock-trace": "ENABLED"}, guarded)]
        assert statuses == ["MISS", "MISS", "MISS", "MISS", "HIT"]
    finally:
        g.stop()


def test_a_compat_requests_query_is_part_of_the_key(mock, tmp_path):
    # The client's api-version goes to Azure: another version, another answer.
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    try:
        mock.clear()
        body = {"model": "azure-openai/res/dep", "messages": [{"role": "user", "content": "versioned"}]}
        key = {"authorization": "Bearer client-azure-key"}
        statuses = [post(g, f"/compat/chat/completions?api-version={v}", body, key).headers["cf-aig-cache-status"]
                    for v in ("2024-10-21", "2025-01-01-preview", "2024-10-21")]
        assert statuses == ["MISS", "MISS", "HIT"]
        assert [q["query"] for q in mock.requests()] == ["api-version=2024-10-21", "api-version=2025-01-01-preview"]
    finally:
        g.stop()


def test_a_hit_does_not_repeat_the_first_responses_own_headers(mock, tmp_path):
    own = [("set-cookie", "__cf_bm=session-of-the-first; path=/"), ("x-request-id", "req_first"),
           ("request-id", "req_first"), ("cf-ray", "8f00-SJC"), ("openai-processing-ms", "120"),
           ("x-ratelimit-remaining-requests", "99"), ("anthropic-ratelimit-tokens-remaining", "1000"),
           ("openai-version", "2020-10-01")]
    server = FixedAnswerServer(b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}', headers=own)
    spec = f"    custom-own: {{baseURL: '{server.url}/v1'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        miss, hit = (post(g, "/custom-own/chat/completions", headers={"authorization": "Bearer k"}) for _ in range(2))
        assert (miss.headers["cf-aig-cache-status"], hit.headers["cf-aig-cache-status"]) == ("MISS", "HIT")
        for name, value in own:
            assert miss.headers.get(name) == value, name
        assert hit.headers.get("openai-version") == "2020-10-01", "the answer's own headers stay"
        left = [name for name, _ in own[:-1] if name in hit.headers]
        assert left == [], f"the hit repeats {left}"
    finally:
        g.stop()
        server.stop()


def test_a_body_that_ends_where_the_upstream_closes_is_passed_on_but_not_stored(tmp_path):
    # No length and no chunks over plain HTTP: a body cut off by a lost connection looks the
    # same as a whole one, so it is never replayed from the cache.
    import http.server
    import threading

    served = []

    class CloseDelimited(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            served.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()  # no content-length: the body ends with the connection
            self.wfile.write(b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CloseDelimited)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    g = Sidegate(tmp_path, gateway_yaml(url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    try:
        for _ in range(2):
            r = post(g, "/openai/chat/completions")
            assert r.status_code == 200 and r.json()["id"] == "chatcmpl-1", r.text
            assert r.headers["cf-aig-cache-status"] == "MISS"
        assert len(served) == 2
    finally:
        g.stop()
        server.shutdown()
        server.server_close()


def test_a_cache_hit_the_client_left_before_taking_is_logged_cancelled_and_one_taken_complete(tmp_path):
    # 8 MiB cannot fit in the loopback socket buffers: a client that closes after the head got
    # a little of it. A hit goes out like any answer: `complete` only once the client took it.
    import json
    import re
    import socket

    answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * (8 << 20)},
                                      "finish_reason": "stop"}]}).encode()
    upstream = FixedAnswerServer(answer)
    g = Sidegate(tmp_path, gateway_yaml(upstream.url, extra_spec="  cache: {enabled: true, maxSize: 128Mi}\n"),
                 DEFAULT_KEYS, extra_args=["--client-timeout", "1"])
    try:
        body = json.dumps(chat_body("big")).encode()
        # The same request each time (its Accept is part of the key).
        plain = {"content-type": "application/json", "accept": "*/*"}
        first = post(g, content=body, headers=plain)
        assert first.status_code == 200 and first.headers["cf-aig-cache-status"] == "MISS"
        taken = post(g, content=body, headers=plain)
        assert taken.status_code == 200 and taken.headers["cf-aig-cache-status"] == "HIT"
        assert len(taken.content) == len(answer)
        line = g.wait_log_line(taken.headers["cf-aig-log-id"], timeout=10)
        assert "outcome=complete" in line and "success=true" in line, line
        with socket.create_connection(("127.0.0.1", g.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
        head = head[:head.index(b"\r\n\r\n")]
        assert head.startswith(b"HTTP/1.1 200") and b"cf-aig-cache-status: hit" in head.lower(), head
        log_id = re.search(rb"(?i)cf-aig-log-id: (\S+)", head).group(1).decode()
        line = g.wait_log_line(log_id, timeout=10)
        assert "outcome=cancelled" in line and "success=false" in line and "cached=true" in line, line
    finally:
        g.stop()
        upstream.stop()


def test_a_gateway_error_after_the_cache_missed_says_so_and_a_refusal_before_it_does_not(tmp_path, refusing_port):
    # README: responses of a request the cache was on for carry cf-aig-cache-status; the
    # gateway's own 502 (the upstream refused the connection) once the cache was looked up is
    # one, on every route: a provider's, /compat (a model, a fallback chain), a universal step.
    spec = CACHE_ON + "  fallbacks:\n    - name: chain\n      targets:\n        - {provider: openai, model: gpt-4o-mini}\n"
    g = Sidegate(tmp_path, gateway_yaml(refusing_port.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        compat = "/compat/chat/completions"
        step = {"provider": "openai", "endpoint": "chat/completions", "headers": {},
                "query": chat_body("universal")}
        refused = [
            post(g),
            post(g, compat, {**chat_body(), "model": "openai/gpt-4o-mini"}),
            post(g, compat, {**chat_body(), "model": "fallback/chain"}),
            httpx.post(g.url + "/", json=[step], timeout=10),
            httpx.post(g.url + "/", json=[{**step, "provider": "compat", "query": {**chat_body(), "model": "openai/gpt-4o-mini"}}],
                       timeout=10),
        ]
        for r in refused:
            assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104), r.text
            assert r.headers.get("cf-aig-cache-status") == "MISS", (r.request.url, dict(r.headers))
        # Skipped for the request (TTL 0), as its answer would; refused before the cache was
        # looked up (a bad gateway header), none.
        off = post(g, headers={"cf-aig-cache-ttl": "0"})
        assert off.status_code == 502 and off.headers.get("cf-aig-cache-status") == "MISS"
        bad = post(g, headers={"cf-aig-request-timeout": "soon"})
        assert bad.status_code == 400 and "cf-aig-cache-status" not in bad.headers
    finally:
        g.stop()
