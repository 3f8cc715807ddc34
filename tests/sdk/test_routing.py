"""/compat with dynamic routes (`model: "dynamic/<route>"`) and fallback chains
(`model: "fallback/<name>"`), through the official openai SDK."""

import json

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, Sidegate, assert_refused_at_start, gateway_yaml

ROUTES = """\
  fallbacks:
    - name: safe
      targets:
        - {provider: openai, model: mock-status-503}
        - {provider: anthropic, model: claude-haiku-4-5}
  routes:
    - name: tiered
      nodes:
        - {id: s, type: start, next: plan}
        - {id: plan, type: conditional, condition: 'metadata.plan == "paid"', then: big, else: cap}
        - {id: big, type: model, provider: openai, model: gpt-4o, next: backup}
        - {id: backup, type: model, provider: anthropic, model: claude-sonnet-4-5, next: e}
        - {id: cap, type: rate, limit: "1", interval: 1h, next: small, fallback: overflow}
        - {id: small, type: model, provider: openai, model: gpt-4o-mini, next: e}
        - {id: overflow, type: model, provider: anthropic, model: claude-haiku-4-5, next: e}
        - {id: e, type: end}
    - name: broken-first
      nodes:
        - {id: s, type: start, next: split}
        - {id: split, type: percentage, branches: [{weight: 1, next: bad}, {weight: 0, next: never}]}
        - {id: bad, type: model, provider: openai, model: mock-status-500, retries: 1, next: good}
        - {id: good, type: model, provider: anthropic, model: claude-haiku-4-5, next: e}
        - {id: never, type: model, provider: openai, model: never, next: e}
        - {id: e, type: end}
    - name: budgeted
      nodes:
        - {id: s, type: start, next: cap}
        - {id: cap, type: budget, limit: "0.0001", interval: 1h, next: premium, fallback: cheap}
        - {id: premium, type: model, provider: openai, model: gpt-4o, next: e}
        - {id: cheap, type: model, provider: openai, model: gpt-4o-mini, next: e}
        - {id: e, type: end}
"""


@pytest.fixture
def routed(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=ROUTES), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def client(g, metadata=None):
    headers = {"cf-aig-metadata": json.dumps(metadata)} if metadata else {}
    return openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0, default_headers=headers)


def ask(c, model, text="route me"):
    return c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])


def test_a_budget_node_takes_its_fallback_once_its_requests_cost_the_limit(routed, mock):
    c = client(routed)
    # gpt-4o at $2.50/M in and $10/M out: the mock's few prompt and completion tokens cost
    # more than the node's $0.0001 after two requests, not after one.
    text = "route me by budget"
    served = [ask(c, "dynamic/budgeted", text).headers["cf-aig-model"] for _ in range(3)]
    usage = ask(c, "openai/gpt-4o", text).parse().usage
    one = (usage.prompt_tokens * 2.50 + usage.completion_tokens * 10.0) / 1e6
    assert one < 0.0001 <= 2 * one, one
    assert served == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]


def test_a_fallback_chain_moves_on_when_a_target_fails(routed, mock):
    resp = ask(client(routed), "fallback/safe")
    assert resp.parse().choices[0].message.content == "mock reply to: route me"
    assert (resp.headers["cf-aig-step"], resp.headers["cf-aig-provider"], resp.headers["cf-aig-model"]) == \
        ("1", "anthropic", "claude-haiku-4-5")
    assert [r["path"] for r in mock.requests()] == ["/v1/chat/completions", "/v1/messages"]


def test_conditions_on_metadata_choose_the_model(routed, mock):
    paid = ask(client(routed, {"plan": "paid"}), "dynamic/tiered")
    assert (paid.headers["cf-aig-model"], paid.headers["cf-aig-step"]) == ("gpt-4o", "0")
    assert json.loads(mock.last()["body"])["model"] == "gpt-4o"
    free = ask(client(routed, {"plan": "free"}), "dynamic/tiered")
    assert free.headers["cf-aig-model"] == "gpt-4o-mini"


def test_a_rate_node_sends_the_overflow_to_its_fallback_branch(routed, mock):
    first = ask(client(routed), "dynamic/tiered")
    second = ask(client(routed), "dynamic/tiered")
    assert (first.headers["cf-aig-model"], second.headers["cf-aig-model"]) == ("gpt-4o-mini", "claude-haiku-4-5")
    assert second.parse().choices[0].message.content == "mock reply to: route me"


def test_model_nodes_retry_then_fall_back_and_streams_work(routed, mock):
    stream = client(routed).chat.completions.create(
        model="dynamic/broken-first", messages=[{"role": "user", "content": "stream on"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "mock reply to: stream on"
    paths = [r["path"] for r in mock.requests()]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/messages"], \
        "1 retry (2 attempts, as Cloudflare counts a model node's retries), then the next node"


def test_a_cache_hit_on_a_route_says_what_served_the_answer(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=ROUTES + "  cache: {enabled: true}\n"), DEFAULT_KEYS)
    try:
        c = client(g)
        miss, hit = ask(c, "fallback/safe", "cache me"), ask(c, "fallback/safe", "cache me")
        assert (miss.headers["cf-aig-cache-status"], hit.headers["cf-aig-cache-status"]) == ("MISS", "HIT")
        served = ("cf-aig-step", "cf-aig-provider", "cf-aig-model")
        assert [hit.headers.get(h) for h in served] == [miss.headers[h] for h in served] == \
            ["1", "anthropic", "claude-haiku-4-5"]
        assert hit.headers["cf-aig-log-id"] != miss.headers["cf-aig-log-id"]
        assert hit.parse().choices[0].message.content == "mock reply to: cache me"
    finally:
        g.stop()


def test_unknown_routes_and_chains_are_400_2107(routed, mock):
    for model in ["dynamic/nope", "fallback/nope"]:
        r = httpx.post(routed.url + "/compat/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        err = r.json()["error"][0]
        assert err["code"] == 2107 and model.split("/")[1] in err["message"]
    assert mock.requests() == []


@pytest.mark.parametrize("spec,needle", [
    ("  routes:\n    - name: r\n      nodes:\n        - {id: s, type: start, next: b}\n"
     "        - {id: b, type: budget, limit: 'ten', interval: 1h, next: s, fallback: s}\n        - {id: e, type: end}\n",
     "spec.routes[0].nodes[1].limit must be an amount of USD"),
    ("  routes:\n    - name: r\n      nodes:\n        - {id: s, type: start, next: m}\n"
     "        - {id: m, type: model, provider: openai, model: x, next: gone}\n        - {id: e, type: end}\n", '"gone"'),
    # A node that times out at once would send every request upstream and throw its answer away.
    ("  routes:\n    - name: r\n      nodes:\n        - {id: s, type: start, next: m}\n"
     "        - {id: m, type: model, provider: openai, model: x, timeout: 0ms, next: e}\n        - {id: e, type: end}\n",
     "spec.routes[0].nodes[1].timeout must be 1ms to 1h, got 0ms"),
    ("  routes:\n    - name: r\n      nodes:\n        - {id: s, type: start, next: m}\n"
     "        - {id: m, type: model, provider: openai, model: x, retries: 5, next: e}\n        - {id: e, type: end}\n",
     "spec.routes[0].nodes[1].retries must be 0 to 4 retries, got 5"),
    # The last of two routes of one name would win silently.
    ("  routes:\n" + "".join("    - name: twice\n      nodes:\n        - {id: s, type: start, next: e}\n"
                             "        - {id: e, type: end}\n" for _ in range(2)),
     'spec.routes[1].name: duplicate route name "twice"'),
    ("  fallbacks:\n" + "    - {name: twice, targets: [{provider: openai, model: x}]}\n" * 2,
     'spec.fallbacks[1].name: duplicate fallback name "twice"'),
])
def test_bad_routes_are_refused_at_start(mock, tmp_path, spec, needle):
    assert_refused_at_start(mock, tmp_path, spec, needle)


LIMITED = """\
  routes:
    - name: capped
      nodes:
        - {id: s, type: start, next: cap}
        - {id: cap, type: rate, limit: "1", interval: 1h, next: m, fallback: e}
        - {id: m, type: model, provider: openai, model: gpt-4o-mini, next: e}
        - {id: e, type: end}
    - name: priced
      nodes:
        - {id: s, type: start, next: spend}
        - {id: spend, type: budget, limit: "0.000001", interval: 1h, next: m, fallback: e}
        - {id: m, type: model, provider: openai, model: gpt-4o, next: e}
        - {id: e, type: end}
    - name: picky
      nodes:
        - {id: s, type: start, next: cap}
        - {id: cap, type: rate, limit: "1", interval: 1h, next: claude, fallback: e}
        - {id: claude, type: model, provider: anthropic, model: claude-haiku-4-5, next: gpt}
        - {id: gpt, type: model, provider: openai, model: gpt-4o-mini, next: e}
        - {id: e, type: end}
"""


@pytest.fixture
def limited(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=LIMITED), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def post(g, model, headers=None, **body):
    return httpx.post(g.url + "/compat/chat/completions", headers=headers or {},
                      json={"model": model, "messages": [{"role": "user", "content": "route me"}]} | body)


@pytest.mark.parametrize("route,code", [("capped", 2003), ("priced", 2041)])
def test_a_limit_node_that_leads_to_end_is_a_429_with_retry_after(limited, mock, route, code):
    assert post(limited, f"dynamic/{route}").status_code == 200
    r = post(limited, f"dynamic/{route}")
    assert (r.status_code, r.json()["error"][0]["code"]) == (429, code), r.text
    assert f'route "{route}"' in r.json()["error"][0]["message"], r.text
    assert 0 < int(r.headers["retry-after"]) <= 3600
    assert len(mock.requests()) == 1


def test_a_rate_node_counts_only_requests_sent_upstream(mock, tmp_path):
    # A cache hit (or a request the gateway refuses) spends nothing of a provider's quota.
    spec = LIMITED.replace('limit: "1", interval: 1h, next: m', 'limit: "2", interval: 1h, next: m') + \
        "  cache: {enabled: true}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        statuses = [(r.status_code, r.headers.get("cf-aig-cache-status")) for r in (
            post(g, "dynamic/capped"), post(g, "dynamic/capped"), post(g, "dynamic/capped", user="b"),
            post(g, "dynamic/capped", user="c"))]
        assert statuses == [(200, "MISS"), (200, "HIT"), (200, "MISS"), (429, None)], statuses
    finally:
        g.stop()


def test_a_target_that_cannot_take_the_request_hands_it_to_the_next(limited, mock):
    # Anthropic takes no `n` > 1; the route's next target does.
    r = post(limited, "dynamic/picky", n=2)
    assert (r.status_code, r.headers["cf-aig-step"], r.headers["cf-aig-model"]) == (200, "1", "gpt-4o-mini"), r.text
    assert [q["path"] for q in mock.requests()] == ["/v1/chat/completions"]


def test_a_routes_missing_alias_is_refused_before_any_target_is_sent(mock, tmp_path):
    # Only openai has a `team` key: the anthropic fallback would be refused for it after
    # openai's failure, hiding that failure; refused up front, whatever openai does.
    keys = dict(DEFAULT_KEYS, **{"openai.team": DEFAULT_KEYS["openai.default"]})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=ROUTES), keys)
    try:
        mock.clear()
        r = post(g, "fallback/safe", headers={"cf-aig-byok-alias": "team"})
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2040), r.text
        assert mock.requests() == []
    finally:
        g.stop()


def test_without_an_alias_a_target_without_stored_credentials_does_not_refuse_the_route(mock, tmp_path):
    # A Bedrock fallback with no AWS credentials can never serve, but the request may never
    # reach it: openai answers (the check above is for an alias the client names).
    spec = "  fallbacks:\n    - name: to-bedrock\n      targets:\n" \
           "        - {provider: openai, model: gpt-4o-mini}\n        - {provider: aws-bedrock, model: us-east-1/m}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        r = post(g, "fallback/to-bedrock")
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
    finally:
        g.stop()


OWN_KEYS = """\
    mistral: {baseURL: '%(url)s/v1'}
    custom-a: {baseURL: '%(url)s/v1'}
    custom-b: {baseURL: '%(url)s/v1'}
  fallbacks:
    - name: two-custom
      targets:
        - {provider: custom-a, model: mock-status-503}
        - {provider: custom-b, model: local-model}
    - name: two-own
      targets:
        - {provider: groq, model: mock-status-503}
        - {provider: mistral, model: mistral-small-latest}
    - name: one-own
      targets:
        - {provider: groq, model: mock-status-503}
        - {provider: openai, model: gpt-4o-mini}
"""


def test_a_route_that_could_send_the_apps_own_key_to_two_providers_is_refused(mock, tmp_path):
    # Neither groq nor mistral has a stored key: after groq's failure the app's groq key would
    # go to mistral. Refused before anything is sent; without a key header nothing can leak.
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=OWN_KEYS % {"url": mock.url}), DEFAULT_KEYS)
    try:
        # Said when the config loads, not only when a request is refused.
        assert "fallback/two-own reaches groq, mistral without a stored key" in g.logs()
        assert "fallback/one-own reaches" not in g.logs() and "two-custom reaches" not in g.logs()
        mock.clear()
        r = post(g, "fallback/two-own", headers={"authorization": "Bearer gsk-apps-own-groq-key"})
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2107), r.text
        message = r.json()["error"][0]["message"]
        assert "groq, mistral" in message and "gsk-apps-own" not in message, message
        assert mock.requests() == []
        # One provider on the app's key, the others on stored keys: the app's key reaches groq only.
        r = post(g, "fallback/one-own", headers={"authorization": "Bearer gsk-apps-own-groq-key"})
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
        sent = [(q["path"], q["headers"]["authorization"]) for q in mock.requests()]
        assert sent[0] == ("/openai/v1/chat/completions", "Bearer gsk-apps-own-groq-key"), sent
        assert sent[1][0] == "/v1/chat/completions" and "gsk-apps-own" not in sent[1][1], sent
        # No key header: nothing to leak, the targets answer for themselves (groq fails, mistral
        # refuses the missing key with its own 401).
        assert post(g, "fallback/two-own").status_code == 401
        # The platform's own servers (custom providers) take the OpenAI SDK's placeholder key.
        r = post(g, "fallback/two-custom", headers={"authorization": "Bearer unused"})
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
    finally:
        g.stop()
