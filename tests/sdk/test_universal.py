"""The universal endpoint: POST / with a JSON array of steps, tried in order (fallback)."""

import json
import uuid

import httpx
import pytest

from conftest import ANTHROPIC_KEY, DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate, gateway_yaml


def openai_step(model="gpt-4o-mini", text="universal hello", **extra):
    return {"provider": "openai", "endpoint": "chat/completions",
            "headers": {"authorization": "Bearer placeholder", "content-type": "application/json"},
            "query": {"model": model, "messages": [{"role": "user", "content": text}]}, **extra}


def anthropic_step(text="universal hello"):
    return {"provider": "anthropic", "endpoint": "v1/messages",
            "headers": {"x-api-key": "placeholder"},
            "query": {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}}


def compat_step(model="anthropic/claude-haiku-4-5", text="universal hello", endpoint="chat/completions", **extra):
    """A step served by /compat (Cloudflare's unified API): an OpenAI-format body."""
    return {"provider": "compat", "endpoint": endpoint, "headers": {},
            "query": {"model": model, "messages": [{"role": "user", "content": text}]}, **extra}


def access_lines(g):
    return [line for line in g.logs().splitlines() if " request id=" in line]


def test_the_first_step_that_succeeds_answers_with_its_index(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[openai_step(model="mock-status-503"), anthropic_step()],
                   headers={"cf-aig-event-id": "evt-7"})
    assert r.status_code == 200
    assert r.headers["cf-aig-step"] == "1"
    # What served it, as for a dynamic route.
    assert (r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == ("anthropic", "claude-haiku-4-5")
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert " provider=anthropic " in line and " step=1 " in line and " model=claude-haiku-4-5" in line, line
    assert r.headers["cf-aig-event-id"] == "evt-7" and len(r.headers["cf-aig-log-id"]) == 26
    assert r.json()["content"][0]["text"] == "mock reply to: universal hello"
    first, second = mock.requests()
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert second["path"] == "/v1/messages"
    assert second["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert second["headers"]["anthropic-version"] == "2023-06-01"
    assert json.loads(second["body"])["max_tokens"] == 64


def test_a_successful_first_step_is_the_only_one_sent(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[openai_step(), anthropic_step()])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0")
    assert (r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == ("openai", "gpt-4o-mini")
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: universal hello"
    assert len(mock.requests()) == 1


def test_when_every_step_fails_the_last_answer_passes_through(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[openai_step(model="mock-status-500"), openai_step(model="mock-status-429")])
    assert (r.status_code, r.headers["cf-aig-step"]) == (429, "1")
    direct = httpx.post(mock.url + "/v1/chat/completions", headers={"authorization": "Bearer direct"},
                        json=openai_step(model="mock-status-429")["query"])
    assert r.content == direct.content


def test_a_step_timeout_falls_back_to_the_next(gateway, mock):
    slow = openai_step(config={"requestTimeout": 100})
    slow["headers"]["x-mock-delay-ms"] = "1000"
    r = httpx.post(gateway.url + "/", json=[slow, anthropic_step()])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1")


def test_when_the_last_step_gets_no_answer_the_gateway_error_names_the_step(gateway, mock):
    slow = openai_step(config={"requestTimeout": 100})
    slow["headers"]["x-mock-delay-ms"] = "1000"
    r = httpx.post(gateway.url + "/", json=[openai_step(model="mock-status-503"), slow],
                   headers={"cf-aig-event-id": "evt-504"})
    assert (r.status_code, r.json()["error"][0]["code"]) == (504, 2103)
    assert (r.headers["cf-aig-step"], r.headers["cf-aig-event-id"]) == ("1", "evt-504")
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert " status_code=504 " in line and " outcome=upstream_error" in line and " step=1" in line, line


def test_step_retries_come_from_its_config(gateway, mock):
    step = openai_step(config={"maxAttempts": 2, "retryDelay": 0})
    step["headers"]["x-mock-fail-first"] = f"1;{uuid.uuid4().hex}"
    r = httpx.post(gateway.url + "/", json=step)
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0")
    assert len(mock.requests()) == 2


def test_the_byok_alias_applies_to_every_step(mock, tmp_path):
    keys = dict(DEFAULT_KEYS, **{"anthropic.team-b": f"sk-ant-{KEY_MARKER}-teamb"})
    g = Sidegate(tmp_path, gateway_yaml(mock.url), keys)
    try:
        mock.clear()
        r = httpx.post(g.url + "/", json=[openai_step(model="mock-status-503"), anthropic_step()],
                       headers={"cf-aig-byok-alias": "team-b"})
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
        first, second = mock.requests()
        assert first["headers"]["authorization"] == f"Bearer {DEFAULT_KEYS['openai.team-b']}"
        assert second["headers"]["x-api-key"] == keys["anthropic.team-b"]
    finally:
        g.stop()


@pytest.fixture
def cached(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  cache: {enabled: true}\n"), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def test_the_step_that_answered_is_cached_and_a_hit_answers_as_it_did(cached, mock):
    steps = [openai_step(model="mock-status-503"), anthropic_step(text="cache the fallback")]
    first = httpx.post(cached.url + "/", json=steps)
    assert (first.status_code, first.headers["cf-aig-step"], first.headers["cf-aig-cache-status"]) == (200, "1", "MISS")
    assert len(mock.requests()) == 2
    mock.clear()
    second = httpx.post(cached.url + "/", json=steps)
    assert (second.status_code, second.headers["cf-aig-cache-status"]) == (200, "HIT")
    assert second.content == first.content
    for h in ["cf-aig-step", "cf-aig-provider", "cf-aig-model"]:
        assert second.headers[h] == first.headers[h], h
    # The failed step is tried again (errors are not stored); the one that answered is not.
    assert [r["path"] for r in mock.requests()] == ["/v1/chat/completions"]
    line = cached.wait_log_line(second.headers["cf-aig-log-id"])
    assert " provider=anthropic " in line and " cached=true" in line and " step=1" in line, line
    # The same request with cf-aig-skip-cache goes to the provider again.
    mock.clear()
    skipped = httpx.post(cached.url + "/", json=steps, headers={"cf-aig-skip-cache": "true"})
    assert skipped.json()["id"] != first.json()["id"] and len(mock.requests()) == 2


def test_a_step_is_cached_at_its_index_apart_from_the_providers_own_route(cached, mock):
    step = openai_step(text="where am I cached")
    at_0 = httpx.post(cached.url + "/", json=[step])
    at_1 = httpx.post(cached.url + "/", json=[openai_step(model="mock-status-503"), step])
    direct = httpx.post(cached.url + "/openai/chat/completions", json=step["query"])
    assert [r.headers["cf-aig-cache-status"] for r in (at_0, at_1, direct)] == ["MISS", "MISS", "MISS"]
    assert (at_0.headers["cf-aig-step"], at_1.headers["cf-aig-step"]) == ("0", "1")
    assert "cf-aig-step" not in direct.headers
    again = httpx.post(cached.url + "/", json=[step])
    assert (again.headers["cf-aig-cache-status"], again.headers["cf-aig-step"]) == ("HIT", "0")
    assert again.json()["id"] == at_0.json()["id"]


def test_steps_with_other_credentials_never_share_entries(cached, mock):
    def groq(key):
        step = openai_step(text="whose answer")
        return dict(step, provider="groq", headers=dict(step["headers"], authorization=f"Bearer {key}"))

    # groq has no stored key: the step's own key goes upstream, and keys the entry.
    a, b, a_again = (httpx.post(cached.url + "/", json=[groq(k)]) for k in ["client-key-a", "client-key-b", "client-key-a"])
    assert [r.headers["cf-aig-cache-status"] for r in (a, b, a_again)] == ["MISS", "MISS", "HIT"]
    assert a_again.json()["id"] == a.json()["id"] != b.json()["id"]
    # A stored key is chosen by alias: another alias, another entry.
    default, team_b, default_again = (
        httpx.post(cached.url + "/", json=[openai_step(text="whose alias")], headers=h)
        for h in [{}, {"cf-aig-byok-alias": "team-b"}, {}])
    assert [r.headers["cf-aig-cache-status"] for r in (default, team_b, default_again)] == ["MISS", "MISS", "HIT"]
    # A custom cache key stands for the body, never for the credentials.
    custom = {"cf-aig-cache-key": "shared-name"}
    a, b, a_again = (httpx.post(cached.url + "/", json=[groq(k)], headers=custom)
                     for k in ["client-key-a", "client-key-b", "client-key-a"])
    assert [r.headers["cf-aig-cache-status"] for r in (a, b, a_again)] == ["MISS", "MISS", "HIT"]


def test_a_steps_authorization_field_is_its_authorization_header(gateway, mock):
    # Cloudflare's step field: "the content of the Authorization HTTP Header".
    step = openai_step(text="own key")
    step = dict(step, provider="groq", authorization="Bearer client-groq-key",
                headers={"content-type": "application/json"})
    r = httpx.post(gateway.url + "/", json=[step])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
    assert mock.last()["headers"]["authorization"] == "Bearer client-groq-key"
    # The step's headers win over the field.
    step["headers"]["authorization"] = "Bearer from-headers"
    httpx.post(gateway.url + "/", json=[step])
    assert mock.last()["headers"]["authorization"] == "Bearer from-headers"


def test_a_steps_own_gateway_headers_override_the_requests(gateway, mock):
    # Cloudflare's hierarchy example: the request caches for an hour, the OpenAI step says 0.
    no_cache = openai_step(text="never cached")
    no_cache["headers"]["cf-aig-cache-ttl"] = "0"
    hour = {"cf-aig-cache-ttl": "3600"}
    a, b = (httpx.post(gateway.url + "/", json=[no_cache], headers=hour) for _ in range(2))
    # The gateway's cache is off: with the step's TTL 0 the request has no caching to report.
    assert not any("cf-aig-cache-status" in r.headers for r in (a, b))
    assert a.json()["id"] != b.json()["id"] and len(mock.requests()) == 2
    assert not any(h.startswith("cf-aig-") for h in mock.last()["headers"]), mock.last()["headers"]
    # A step's TTL turns the cache on for it alone; its alias picks its stored key.
    mock.clear()
    cached = openai_step(text="cached by the step")
    cached["headers"].update({"cf-aig-cache-ttl": "600", "cf-aig-byok-alias": "team-b"})
    c, d = (httpx.post(gateway.url + "/", json=[cached]) for _ in range(2))
    assert [r.headers["cf-aig-cache-status"] for r in (c, d)] == ["MISS", "HIT"]
    assert len(mock.requests()) == 1
    assert mock.last()["headers"]["authorization"] == f"Bearer {DEFAULT_KEYS['openai.team-b']}"
    # The step's retry headers: two attempts, as the request's would give.
    mock.clear()
    retried = openai_step(text="retried by the step")
    retried["headers"].update({"cf-aig-max-attempts": "2", "cf-aig-retry-delay": "0",
                               "x-mock-fail-first": f"1;{uuid.uuid4().hex}"})
    r = httpx.post(gateway.url + "/", json=[retried])
    assert r.status_code == 200 and len(mock.requests()) == 2


def test_long_form_url_and_a_single_step_object(gateway, mock):
    r = httpx.post(gateway.url + "/v1/acct/main", json=openai_step())
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0")


def test_long_form_account_reaches_workers_ai_steps(mock, tmp_path):
    # Cloudflare's own fallback example: a workers-ai step, its account taken from the URL.
    extra = f"    workers-ai: {{baseURL: '{mock.url}/client/v4/accounts/{{account}}/ai'}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), DEFAULT_KEYS)
    try:
        mock.clear()
        step = {"provider": "workers-ai", "endpoint": "@cf/meta/llama-3.1-8b-instruct",
                "headers": {"authorization": "Bearer cf-token"}, "query": {"prompt": "hi"}}
        r = httpx.post(g.url + "/v1/acct123/main", json=[step])
        assert r.headers["cf-aig-step"] == "0", r.text
        (seen,) = mock.requests()
        assert seen["path"] == "/client/v4/accounts/acct123/ai/run/@cf/meta/llama-3.1-8b-instruct"
        # The short form has no account to give.
        r = httpx.post(g.url + "/", json=[step])
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2108), r.text
        assert "needs an account id" in r.text
    finally:
        g.stop()


@pytest.mark.parametrize("body,needle", [
    ([], "1 to 16 steps"),
    ({"provider": "openai"}, "steps[0]: missing field `endpoint`"),
    ([{"provider": "nope", "endpoint": "x", "query": {}}], "steps[0].provider: unknown provider"),
    ([{"provider": "openai", "endpoint": "x", "query": {}, "headers": {"bad header": "v"}}], "steps[0].headers"),
    ([{"provider": "openai", "endpoint": "x", "query": {}, "config": {"maxAttempts": 9}}], "steps[0].config.maxAttempts"),
    ([{"provider": "openai", "endpoint": "x", "query": {}, "headers": {"cf-aig-max-attempts": "9"}}],
     "steps[0].headers: invalid header cf-aig-max-attempts"),
    ([{"provider": "openai", "endpoint": "x", "query": {}, "authorization": "bad\nvalue"}], "steps[0].authorization"),
    ([{"provider": "openai", "endpoint": "../x", "query": {}}], "steps[0].endpoint"),
    # A fragment would leave the model priced and logged ("unpriced") apart from the one sent.
    ([{"provider": "openai", "endpoint": "chat/completions#/models/unpriced", "query": {"model": "gpt-4o"}}],
     "steps[0].endpoint: \"chat/completions#/models/unpriced\" is not a URL path"),
    ([{"provider": "openai", "endpoint": "chat/completions\nINFO forged", "query": {}}],
     "steps[0].endpoint: \"chat/completions\\nINFO forged\" is not a URL path"),
    ([{"provider": "compat", "endpoint": "chat/completions#x", "query": {"model": "openai/gpt-4o"}}],
     "steps[0].endpoint"),
])
def test_bad_steps_are_400_2108_naming_the_step(gateway, mock, body, needle):
    r = httpx.post(gateway.url + "/", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"][0]
    assert err["code"] == 2108 and needle in err["message"], err
    assert mock.requests() == []


def test_get_on_the_universal_endpoint_is_404(gateway):
    r = httpx.get(gateway.url + "/")
    assert (r.status_code, r.json()["error"][0]["code"]) == (404, 2001)


def test_a_compat_step_after_a_failed_step_answers_in_the_openai_shape(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[openai_step(model="mock-status-503"), compat_step()])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
    assert (r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == ("anthropic", "claude-haiku-4-5")
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == "mock reply to: universal hello"
    assert out["usage"]["prompt_tokens"] > 0
    first, second = mock.requests()
    assert first["path"] == "/v1/chat/completions"
    assert second["path"] == "/v1/messages" and second["headers"]["x-api-key"] == ANTHROPIC_KEY
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert " provider=anthropic " in line and " path=compat/chat/completions " in line and line.endswith(" step=1"), line


@pytest.mark.parametrize("endpoint", ["chat/completions", "chat/completion", "/chat/completion"])
def test_a_compat_step_that_succeeds_first_is_the_only_one_sent(gateway, mock, endpoint):
    # Cloudflare's dynamic-routing example names the endpoint "chat/completion".
    r = httpx.post(gateway.url + "/", json=[compat_step(model="openai/gpt-4o-mini", endpoint=endpoint), anthropic_step()])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
    assert (r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == ("openai", "gpt-4o-mini")
    assert r.json()["choices"][0]["message"]["content"] == "mock reply to: universal hello"
    (seen,) = mock.requests()
    assert seen["path"] == "/v1/chat/completions" and seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini"


def test_a_failed_compat_step_hands_over_and_leaves_no_log_line(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[compat_step(model="anthropic/mock-status-503"), openai_step()])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "1"), r.text
    assert [q["path"] for q in mock.requests()] == ["/v1/messages", "/v1/chat/completions"]
    # Only the step that served is logged (and charged): the dropped answer never reached a record.
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert access_lines(gateway) == [line], access_lines(gateway)
    assert " provider=openai " in line and line.endswith(" step=1"), line


def test_a_compat_step_that_fails_last_answers_with_its_translated_error(gateway, mock):
    r = httpx.post(gateway.url + "/", json=[openai_step(model="mock-status-503"),
                                            compat_step(model="anthropic/mock-status-429")])
    assert (r.status_code, r.headers["cf-aig-step"]) == (429, "1"), r.text
    assert "message" in r.json()["error"], r.text
    line = gateway.wait_log_line(r.headers["cf-aig-log-id"])
    assert " status_code=429 " in line and line.endswith(" step=1"), line


def test_a_compat_step_falls_back_along_its_chain_and_names_the_universal_step(mock, tmp_path):
    chain = ("  fallbacks:\n    - name: safe\n      targets:\n"
             "        - {provider: openai, model: mock-status-503}\n"
             "        - {provider: anthropic, model: claude-haiku-4-5}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=chain), DEFAULT_KEYS)
    try:
        mock.clear()
        r = httpx.post(g.url + "/", json=[compat_step(model="fallback/safe"), openai_step()])
        assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
        assert (r.headers["cf-aig-provider"], r.headers["cf-aig-model"]) == ("anthropic", "claude-haiku-4-5")
        assert [q["path"] for q in mock.requests()] == ["/v1/chat/completions", "/v1/messages"]
    finally:
        g.stop()


def test_a_compat_step_is_cached_at_its_index(cached, mock):
    steps = [openai_step(model="mock-status-503"), compat_step(text="cache the compat step")]
    first = httpx.post(cached.url + "/", json=steps)
    assert (first.status_code, first.headers["cf-aig-step"], first.headers["cf-aig-cache-status"]) == (200, "1", "MISS")
    mock.clear()
    second = httpx.post(cached.url + "/", json=steps)
    assert (second.headers["cf-aig-cache-status"], second.content) == ("HIT", first.content)
    for h in ["cf-aig-step", "cf-aig-provider", "cf-aig-model"]:
        assert second.headers[h] == first.headers[h], h
    assert [q["path"] for q in mock.requests()] == ["/v1/chat/completions"]
    # The same body through /compat itself is another entry.
    direct = httpx.post(cached.url + "/compat/chat/completions", json=steps[1]["query"])
    assert direct.headers["cf-aig-cache-status"] == "MISS"


def test_a_compat_steps_config_and_gateway_headers_apply_to_it(gateway, mock):
    step = compat_step(model="openai/gpt-4o-mini", config={"maxAttempts": 2, "retryDelay": 0})
    step["headers"] = {"x-mock-fail-first": f"1;{uuid.uuid4().hex}", "cf-aig-byok-alias": "team-b"}
    r = httpx.post(gateway.url + "/", json=[step])
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
    assert len(mock.requests()) == 2
    assert mock.last()["headers"]["authorization"] == f"Bearer {DEFAULT_KEYS['openai.team-b']}"
    assert not any(h.startswith("cf-aig-") for h in mock.last()["headers"]), mock.last()["headers"]


@pytest.mark.parametrize("step,needle", [
    (compat_step(model="nope/model-x"), 'steps[1].query.model: unknown provider "nope"'),
    (compat_step(model="claude-haiku-4-5"), "steps[1].query.model: model"),
    (compat_step(model="dynamic/nope"), "steps[1].query.model"),
    (dict(compat_step(), query={"messages": []}), "steps[1].query.model"),
    (compat_step(endpoint="v1/messages"), "steps[1].endpoint"),
    (compat_step(config={"maxAttempts": 9}), "steps[1].config.maxAttempts"),
    (dict(compat_step(), headers={"cf-aig-request-timeout": "0"}), "steps[1].headers: invalid header cf-aig-request-timeout"),
])
def test_bad_compat_steps_are_400_2108_naming_the_step_before_any_is_sent(gateway, mock, step, needle):
    r = httpx.post(gateway.url + "/", json=[openai_step(), step])
    assert r.status_code == 400, r.text
    err = r.json()["error"][0]
    assert err["code"] == 2108 and needle in err["message"], err
    assert mock.requests() == []


def test_a_gateway_token_in_a_key_header_is_refused_with_compat_steps(authed_gateway, mock):
    r = httpx.post(authed_gateway.url + "/", json=[compat_step()], headers={"authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert (r.status_code, r.json()["error"][0]["code"]) == (401, 2009)
    r = httpx.post(authed_gateway.url + "/", json=[compat_step()], headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert (r.status_code, r.headers["cf-aig-step"]) == (200, "0"), r.text
    assert mock.last()["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_a_compat_steps_missing_alias_is_refused_before_any_step_is_sent(gateway, mock):
    step = dict(compat_step(), headers={"cf-aig-byok-alias": "nobody"})
    r = httpx.post(gateway.url + "/", json=[openai_step(), step])
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2040), r.text
    assert mock.requests() == []


def test_a_compat_step_whose_route_could_send_its_key_to_two_providers_is_refused(mock, tmp_path):
    # groq and mistral have no stored key: the step's groq key would reach mistral after
    # groq's failure. Refused before any step is sent.
    spec = (f"    mistral: {{baseURL: '{mock.url}/v1'}}\n  fallbacks:\n    - name: two-own\n      targets:\n"
            "        - {provider: groq, model: mock-status-503}\n        - {provider: mistral, model: m}\n")
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        mock.clear()
        step = compat_step(model="fallback/two-own") | {"headers": {"authorization": "Bearer gsk-step-own-key"}}
        r = httpx.post(g.url + "/", json=[step, openai_step()])
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2108), r.text
        message = r.json()["error"][0]["message"]
        assert "steps[0]" in message and "groq, mistral" in message and "gsk-step" not in message, message
        assert mock.requests() == []
    finally:
        g.stop()


# A step's `config.backoff`, as cf-aig-backoff is for a request: how the wait grows between its
# attempts (retryDelay times 1, 1, 1 / 1, 2, 3 / 1, 2, 4).
import time  # noqa: E402


@pytest.mark.parametrize("backoff", ["fibonacci", "", "linearly"])
def test_a_bad_step_backoff_is_400_2108_naming_it(gateway, mock, backoff):
    for steps, needle in [
        ([openai_step(config={"backoff": backoff})], "steps[0].config.backoff"),
        ([openai_step(), compat_step(config={"backoff": backoff})], "steps[1].config.backoff"),
    ]:
        r = httpx.post(gateway.url + "/", json=steps)
        assert r.status_code == 400, r.text
        err = r.json()["error"][0]
        assert err["code"] == 2108 and needle in err["message"], err
        assert "constant, linear or exponential" in err["message"], err
    assert mock.requests() == []


# Four attempts 300 ms apart at first: the three waits add up to at least this much. Only lower
# bounds (a loaded machine only adds time); the gateway's own backoff is constant, so a step
# whose backoff were ignored would wait 0.9 s in all.
STEP_BACKOFF_WAITS = [("constant", 0.9), ("linear", 1.8), ("exponential", 2.1)]


@pytest.mark.parametrize(("backoff", "at_least"), STEP_BACKOFF_WAITS)
def test_a_steps_backoff_spaces_its_attempts(gateway, mock, backoff, at_least):
    step = openai_step(model="mock-status-503", config={"maxAttempts": 4, "retryDelay": 300, "backoff": backoff})
    t0 = time.monotonic()
    r = httpx.post(gateway.url + "/", json=[step], timeout=30)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert len(mock.requests()) == 4
    assert elapsed >= at_least, elapsed


def test_a_compat_steps_backoff_spaces_its_attempts(gateway, mock):
    step = compat_step(model="openai/mock-status-503",
                       config={"maxAttempts": 4, "retryDelay": 300, "backoff": "Linear"})
    t0 = time.monotonic()
    r = httpx.post(gateway.url + "/", json=[step], timeout=30)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert len(mock.requests()) == 4
    assert elapsed >= 1.8, elapsed


@pytest.mark.parametrize("kind", ["provider", "compat"])
def test_a_gateway_token_in_a_steps_own_key_header_is_refused_before_any_step_is_sent(authed_gateway, mock, kind):
    # groq has no stored key: the step's Authorization would go upstream as its key. A provider
    # step and a compat step are refused alike: the whole request, with no step named.
    own = {"authorization": f"Bearer {GATEWAY_TOKEN}"}
    step = ({"provider": "groq", "endpoint": "chat/completions", "headers": own,
             "query": {"model": "llama-3.1-8b-instant", "messages": [{"role": "user", "content": "hi"}]}}
            if kind == "provider" else dict(compat_step(model="groq/llama-3.1-8b-instant"), headers=own))
    r = httpx.post(authed_gateway.url + "/", json=[openai_step(model="mock-status-503"), step],
                   headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert (r.status_code, r.json()["error"][0]["code"]) == (401, 2009), r.text
    assert "cf-aig-step" not in r.headers, dict(r.headers)
    assert mock.requests() == []


def test_a_failed_last_step_is_logged_at_its_own_endpoint_with_its_own_event_id(mock, tmp_path, refusing_port):
    extra = f"    custom-dead: {{baseURL: '{refusing_port.url}/v1'}}\n"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), DEFAULT_KEYS)
    try:
        dead = {"provider": "custom-dead", "endpoint": "chat/completions",
                "headers": {"cf-aig-event-id": "dead-step", "cf-aig-metadata": '{"step":"dead"}'},
                "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
        r = httpx.post(g.url + "/v1/acct/main", json=[openai_step(model="mock-status-503"), dead],
                       headers={"cf-aig-event-id": "request-ev"})
        assert (r.status_code, r.json()["error"][0]["code"], r.headers["cf-aig-step"]) == (502, 2104, "1"), r.text
        assert r.headers["cf-aig-event-id"] == "dead-step"
        line = g.wait_log_line(r.headers["cf-aig-log-id"])
        assert " provider=custom-dead " in line and " path=chat/completions " in line, line
        assert " event_id=dead-step" in line and "dead" in line.split(" metadata=")[1], line
    finally:
        g.stop()
