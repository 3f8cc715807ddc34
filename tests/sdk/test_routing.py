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
