"""Usage-based controls: request cost in the log line and metrics, cf-aig-custom-cost,
spec.pricing, spend limits (429/2041, per pod and shared through Redis) and token budgets
(spec.rateLimit.tokensPerMinute, 429/2003).

Costs are checked against the tokens the mock reported, as the SDKs parse them."""

import base64
import datetime
import json
import pathlib
import struct
import time
import zlib

import anthropic
import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from test_redis import redis, redis_errors  # noqa: F401  (module-scoped real redis-server fixture)

CHAT = "/openai/chat/completions"


def body(text, model="gpt-4o-mini"):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def wait_line(g, log_id, timeout=3):
    """The JSON access log line of request `log_id`, parsed."""
    return json.loads(g.wait_log_line(log_id, timeout))


def json_gateway(tmp_path, mock, spec="", keys=None, name="main"):
    d = pathlib.Path(tmp_path) / f"gw-{time.monotonic_ns()}"
    d.mkdir()
    return Sidegate(d, gateway_yaml(mock.url, extra_spec=spec, name=name), keys or DEFAULT_KEYS,
                    extra_args=["--log-format", "json"])


@pytest.fixture
def gw(mock, tmp_path):
    g = json_gateway(tmp_path, mock)
    yield g
    g.stop()


def metric(g, prefix):
    for line in g.metrics().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def test_known_models_are_priced_in_the_log_line_and_metrics(gw):
    oa = openai.OpenAI(base_url=gw.url + "/openai", api_key="placeholder", max_retries=0)
    resp = oa.chat.completions.with_raw_response.create(
        model="gpt-4o-mini-2024-07-18", messages=[{"role": "user", "content": "price me"}])
    usage = resp.parse().usage
    line = wait_line(gw, resp.headers["cf-aig-log-id"])
    expected = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert line["model"] == "gpt-4o-mini-2024-07-18"
    assert line["cost"] == pytest.approx(expected, rel=1e-9)
    assert line["custom_cost"] is False

    an = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key="placeholder", max_retries=0)
    with an.messages.stream(model="claude-haiku-4-5-20251001", max_tokens=64,
                            messages=[{"role": "user", "content": "stream a price"}]) as s:
        final = s.get_final_message()
        log_id = s.response.headers["cf-aig-log-id"]
    line = wait_line(gw, log_id)
    an_cost = (final.usage.input_tokens * 1.0 + final.usage.output_tokens * 5.0) / 1e6
    assert line["cost"] == pytest.approx(an_cost, rel=1e-9)
    assert metric(gw, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(expected)
    assert metric(gw, 'sidegate_cost_usd_total{provider="anthropic"}') == pytest.approx(an_cost)


def test_unknown_models_have_no_cost_not_a_zero_one(gw):
    r = httpx.post(gw.url + CHAT, json=body("who prices me", model="house-finetune-7b"))
    assert r.status_code == 200
    line = wait_line(gw, r.headers["cf-aig-log-id"])
    assert line["model"] == "house-finetune-7b"
    assert line["tokens_in"] > 0
    assert line["cost"] is None
    assert metric(gw, "sidegate_cost_usd_total") is None


def test_spec_pricing_prices_models_the_table_does_not_know(mock, tmp_path):
    spec = "  pricing:\n    - {model: house-finetune, inputPerMillion: '100', outputPerMillion: '1000'}\n"
    g = json_gateway(tmp_path, mock, spec)
    try:
        r = httpx.post(g.url + CHAT, json=body("now priced", model="house-finetune-7b"))
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert line["cost"] == pytest.approx((line["tokens_in"] * 100 + line["tokens_out"] * 1000) / 1e6)
    finally:
        g.stop()


def test_azure_requests_are_priced_by_their_deployment_whatever_the_body_names(mock, tmp_path):
    # Azure answers with the deployment's model: a body naming none, or a cheaper one, must not
    # go uncharged or undercharged.
    spec = ("  pricing:\n    - {model: prod-chat, inputPerMillion: '100', outputPerMillion: '1000'}\n"
            "  spendLimit: {amount: '1000', period: day}\n")
    g = json_gateway(tmp_path, mock, spec)
    try:
        path = "/azure-openai/my-resource/prod-chat/chat/completions?api-version=2024-10-21"
        chat = {"messages": [{"role": "user", "content": "no model named"}]}
        for sent in (chat, dict(chat, model="gpt-4o-mini")):
            r = httpx.post(g.url + path, json=sent, headers={"api-key": "azure-client-key"})
            assert r.status_code == 200, r.text
            line = wait_line(g, r.headers["cf-aig-log-id"])
            assert line["model"] == "prod-chat", line
            assert line["cost"] == pytest.approx((line["tokens_in"] * 100 + line["tokens_out"] * 1000) / 1e6)
    finally:
        g.stop()


def test_custom_cost_header_overrides_the_price(gw, mock):
    r = httpx.post(gw.url + CHAT, json=body("custom total"), headers={"cf-aig-custom-cost": '{"total_cost": 0.25}'})
    line = wait_line(gw, r.headers["cf-aig-log-id"])
    assert (line["cost"], line["custom_cost"]) == (0.25, True)
    assert "cf-aig-custom-cost" not in mock.last()["headers"]

    per_token = '{"per_token_in": 0.001, "per_token_out": 0.002}'
    r = httpx.post(gw.url + CHAT, json=body("custom per token", model="house-finetune"),
                   headers={"cf-aig-custom-cost": per_token})
    line = wait_line(gw, r.headers["cf-aig-log-id"])
    assert line["custom_cost"] is True
    assert line["cost"] == pytest.approx(line["tokens_in"] * 0.001 + line["tokens_out"] * 0.002)


def claude_cached_answer(fresh, read, write, out):
    return json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": fresh, "cache_read_input_tokens": read,
                  "cache_creation_input_tokens": write, "output_tokens": out},
    }).encode()


def test_custom_cost_prices_the_prompt_caches_tokens_at_their_own_custom_rates(tmp_path):
    # Cloudflare's custom-costs page: per_token_in, per_token_out, per_cache_read_token,
    # per_cache_write_token. 1,000 fresh, 100,000 read from the cache, 2,000 written, 300 out.
    claude = claude_cached_answer(1_000, 100_000, 2_000, 300)
    chat = json.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 10_000, "completion_tokens": 500, "total_tokens": 10_500,
                  "prompt_tokens_details": {"cached_tokens": 8_000}},
    }).encode()
    upstream = FixedAnswerServer(claude, then=[(200, claude), (200, chat)])
    g = json_gateway(tmp_path, upstream)
    try:
        ask = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        negotiated = {"per_token_in": 0.000003, "per_token_out": 0.000015,
                      "per_cache_read_token": 0.0000003, "per_cache_write_token": 0.00000375}
        r = httpx.post(g.url + "/anthropic/v1/messages", json=ask,
                       headers={"cf-aig-custom-cost": json.dumps(negotiated)})
        assert r.status_code == 200, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"], line["custom_cost"]) == (103_000, 300, True), line
        assert line["cost"] == pytest.approx(1_000 * 0.000003 + 100_000 * 0.0000003 + 2_000 * 0.00000375
                                             + 300 * 0.000015, rel=1e-9), line
        # Without cache prices, every input token is at per_token_in (not the model's cache rates).
        r = httpx.post(g.url + "/anthropic/v1/messages", json=ask,
                       headers={"cf-aig-custom-cost": '{"per_token_in": 0.000003, "per_token_out": 0.000015}'})
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert line["cost"] == pytest.approx(103_000 * 0.000003 + 300 * 0.000015, rel=1e-9), line
        # OpenAI's cached input (part of prompt_tokens) at per_cache_read_token.
        r = httpx.post(g.url + CHAT, json=body("cached"),
                       headers={"cf-aig-custom-cost": json.dumps(
                           {"per_token_in": 0.000001, "per_token_out": 0.000002, "per_cache_read_token": 0.0000001})})
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["custom_cost"]) == (10_000, True), line
        assert line["cost"] == pytest.approx(2_000 * 0.000001 + 8_000 * 0.0000001 + 500 * 0.000002, rel=1e-9), line
    finally:
        g.stop()
        upstream.stop()


def test_malformed_custom_cost_is_400_and_never_sent(gw, mock):
    mock.clear()
    for bad in ["cheap", '{"total_cost": -1}', '{"per_token_in": 0.1}', '{"price": 1}', '{"total_cost": "1"}',
                # Cache prices go beside per_token_in and per_token_out, never on their own or with a total.
                '{"per_cache_read_token": 0.1}', '{"total_cost": 1, "per_cache_write_token": 0.1}',
                '{"per_token_in": 0.1, "per_token_out": 0.1, "per_cache_read_token": -1}',
                '{"per_token_in": 0.1, "per_token_out": 0.1, "per_cache_token": 0.1}']:
        r = httpx.post(gw.url + CHAT, json=body("bad cost"), headers={"cf-aig-custom-cost": bad})
        assert r.status_code == 400, bad
        err = r.json()["error"][0]
        assert err["code"] == 2100 and "cf-aig-custom-cost" in err["message"], err
    assert mock.requests() == []


def seconds_to_utc_midnight():
    now = datetime.datetime.now(datetime.timezone.utc)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def spend(g, usd, text="spend"):
    """A request that costs `usd`; its cost is counted once its log line is written."""
    r = httpx.post(g.url + CHAT, json=body(text), headers={"cf-aig-custom-cost": json.dumps({"total_cost": usd})})
    if r.status_code == 200:
        wait_line(g, r.headers["cf-aig-log-id"])
    return r


def assert_spend_limited(r):
    assert r.status_code == 429, r.text
    assert r.json() == {"success": False, "result": [], "messages": [],
                        "error": [{"code": 2041, "message": "spend limit exceeded: 0.01 USD per day reached"}]}
    retry = int(r.headers["retry-after"])
    # The gateway rounds the wait up to a whole second, and the clock has moved on since it answered.
    assert 0 < retry <= seconds_to_utc_midnight() + 2, retry


def test_spend_limit_refuses_with_2041_once_the_period_spend_reaches_it(mock, tmp_path):
    g = json_gateway(tmp_path, mock, "  spendLimit: {amount: '0.01', period: day}\n")
    try:
        # A failed request is not charged, even with a custom cost.
        failed = httpx.post(g.url + CHAT, json=body("fail", model="mock-status-500"),
                            headers={"cf-aig-custom-cost": '{"total_cost": 1}'})
        assert failed.status_code == 500
        assert wait_line(g, failed.headers["cf-aig-log-id"])["cost"] is None
        assert spend(g, 0.006).status_code == 200
        assert spend(g, 0.006).status_code == 200, "0.006 spent is under the limit"
        mock.clear()
        assert_spend_limited(spend(g, 0.006))
        # The SDKs see a 429 too, and nothing reaches the provider.
        oa = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "more"}])
        assert e.value.status_code == 429
        assert mock.requests() == []
    finally:
        g.stop()


def test_under_a_spend_limit_an_unpriced_model_is_warned_about_once(mock, tmp_path):
    g = json_gateway(tmp_path, mock, "  spendLimit: {amount: '0.01', period: day}\n")
    try:
        for model in ["house-finetune-7b", "house-finetune-7b", "gpt-4o-mini", "other-house-model"]:
            r = httpx.post(g.url + CHAT, json=body("who prices me", model=model))
            assert r.status_code == 200
            line = wait_line(g, r.headers["cf-aig-log-id"])
            assert (line["cost"] is None) == (model != "gpt-4o-mini"), line
        warnings = [json.loads(l) for l in g.logs().splitlines() if "has no price" in l]
        assert [(w["level"], w["provider"], w["model"]) for w in warnings] == [
            ("WARN", "openai", "house-finetune-7b"), ("WARN", "openai", "other-house-model")], warnings
        assert "spec.pricing" in warnings[0]["message"]
    finally:
        g.stop()


def test_under_a_spend_limit_a_provider_whose_answers_have_no_token_counts_is_warned_about_once(mock, tmp_path):
    g = json_gateway(tmp_path, mock, "  spendLimit: {amount: '0.01', period: day}\n")
    try:
        # custom-* providers are not asked for stream usage: their streams report no tokens.
        for _ in range(2):
            _, line = stream_without_usage(g, "/custom-local", "gpt-4o-mini")
            assert (line["tokens_in"], line["cost"]) == (None, None), line
        # A request that names no model is no model's work: no warning for it.
        assert httpx.get(g.url + "/openai/models").status_code == 200
        warnings = [json.loads(l) for l in g.logs().splitlines() if "no token counts" in l]
        assert [(w["level"], w["provider"], w["model"]) for w in warnings] == [
            ("WARN", "custom-local", "gpt-4o-mini")], warnings
    finally:
        g.stop()


def test_without_a_spend_limit_unpriced_models_are_not_warned_about(gw):
    r = httpx.post(gw.url + CHAT, json=body("who prices me", model="house-finetune-7b"))
    wait_line(gw, r.headers["cf-aig-log-id"])
    assert "has no price" not in gw.logs()


def test_the_app_cannot_lower_what_the_spend_limit_is_charged(mock, tmp_path):
    # cf-aig-custom-cost sets the logged cost, but the spend limit is charged at least the
    # model's price; and the price is the top-level model's, not a "model" nested elsewhere.
    spec = ("  spendLimit: {amount: '0.01', period: day}\n"
            "  pricing:\n    - {model: dear-model, inputPerMillion: '5000', outputPerMillion: '5000'}\n")
    for case in ("custom cost zero", "nested decoy"):
        g = json_gateway(tmp_path, mock, spec)
        try:
            if case == "custom cost zero":
                r = httpx.post(g.url + CHAT, json=body("free?", model="dear-model"),
                               headers={"cf-aig-custom-cost": '{"total_cost": 0}'})
            else:
                decoy = {"metadata": {"model": "unpriced-model"}, **body("cheap?", model="dear-model")}
                r = httpx.post(g.url + CHAT, json=decoy)
            assert r.status_code == 200, r.text
            line = wait_line(g, r.headers["cf-aig-log-id"])
            assert line["model"] == "dear-model", (case, line)
            priced = (line["tokens_in"] + line["tokens_out"]) * 5000 / 1e6
            assert priced > 0.01, "one request must cost more than the limit"
            assert line["cost"] == (0 if case == "custom cost zero" else pytest.approx(priced)), line
            assert_spend_limited(spend(g, 0))
        finally:
            g.stop()


def probe(g):
    """A request that costs nothing and uses no tokens (the mock answers 500, without usage),
    so that a refusal of it can only come from what was spent or used before it."""
    return httpx.post(g.url + CHAT, json=body("probe", model="mock-status-500"))


def wait_refused(g, code, what, timeout=3):
    """Probes `g` until it refuses with `code` (usage written to Redis lands in the background)."""
    deadline = time.monotonic() + timeout
    while (r := probe(g)).status_code == 500:
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    assert (r.status_code, r.json()["error"][0]["code"]) == (429, code), r.text
    return r


def test_spend_is_shared_by_the_pods_through_redis(mock, tmp_path, redis):  # noqa: F811
    spec = "  redis: {}\n  spendLimit: {amount: '0.01', period: day}\n"
    keys = dict(DEFAULT_KEYS, **{"redis.url": redis.url})
    name = f"spend-{time.monotonic_ns()}"
    a = json_gateway(tmp_path, mock, spec, keys, name=name)
    b = json_gateway(tmp_path, mock, spec, keys, name=name)
    try:
        # Each pod spends 0.006, under the limit alone; only their sum (0.012) reaches it.
        assert spend(a, 0.006).status_code == 200
        assert spend(b, 0.006).status_code == 200, "0.006 (or nothing yet) seen by pod b"
        # Probes cost nothing, so each pod refuses only once the other's spend is added in Redis.
        assert_spend_limited(wait_refused(a, 2041, "pod a never saw pod b's spend"))
        assert_spend_limited(wait_refused(b, 2041, "pod b never saw pod a's spend"))
    finally:
        a.stop()
        b.stop()


def test_without_redis_spend_and_token_limits_are_counted_by_the_pod(mock, tmp_path, refusing_port):
    # README: while Redis cannot be read, the spend limit and a global token budget are checked
    # against this pod's own counts, with the same limits.
    dead = f"redis://127.0.0.1:{refusing_port.port}/0"
    spec = ("  redis: {}\n  spendLimit: {amount: '0.01', period: day}\n"
            "  rateLimit: {limit: 1000, interval: 60s, scope: global, tokensPerMinute: 1000000}\n")
    g = json_gateway(tmp_path, mock, spec, dict(DEFAULT_KEYS, **{"redis.url": dead}))
    try:
        assert spend(g, 1.0).status_code == 200
        assert_spend_limited(wait_refused(g, 2041, "this pod's own spend was not counted"))
        errors = redis_errors(g)
        assert errors >= 2
        assert dead not in g.logs()
    finally:
        g.stop()
    # The token budget alone: tokens of one answer use it up.
    spec = ("  redis: {}\n"
            "  rateLimit: {limit: 1000, interval: 60s, scope: global, tokensPerMinute: 1}\n")
    g = json_gateway(tmp_path, mock, spec, dict(DEFAULT_KEYS, **{"redis.url": dead}))
    try:
        assert httpx.post(g.url + CHAT, json=body("use the tokens")).status_code == 200
        r = wait_refused(g, 2003, "this pod's own tokens were not counted")
        assert "token budget of 1 token per minute" in r.json()["error"][0]["message"]
    finally:
        g.stop()


@pytest.mark.parametrize("checks", [
    "",
    # Answers held back whole for DLP response checks are recorded after the check.
    "  dlp:\n    policies:\n      - {id: cards, action: BLOCK, check: [RESPONSE], profiles: [credit-card]}\n",
])
def test_usage_in_answers_that_are_not_a_models_work_is_not_counted(mock, tmp_path, checks):
    # A batch's status carries the batch's usage: polling it spends nothing now.
    batches = FixedAnswerServer(json.dumps({
        "id": "batch_1", "object": "batch", "status": "completed",
        "usage": {"input_tokens": 500000, "output_tokens": 200000, "total_tokens": 700000}}).encode())
    spec = (f"  rateLimit: {{limit: 1000, interval: 60s, tokensPerMinute: 1000}}\n"
            f"  spendLimit: {{amount: '0.01', period: day}}\n{checks}")
    yaml = gateway_yaml(mock.url, extra_spec=spec).replace(
        "  providers:\n", f"  providers:\n    custom-batch: {{baseURL: '{batches.url}/v1'}}\n", 1)
    g = Sidegate(tmp_path, yaml, DEFAULT_KEYS, extra_args=["--log-format", "json"])
    try:
        r = httpx.get(g.url + "/custom-batch/batches/batch_1")
        assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == 500000
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"], line["cost"]) == (None, None, None), line
        # The budget is untouched: a model's answer is served.
        assert httpx.post(g.url + CHAT, json=body("after the poll")).status_code == 200
    finally:
        g.stop()
        batches.stop()


def test_token_budget_refuses_with_2003_once_the_minute_is_spent(mock, tmp_path):
    g = json_gateway(tmp_path, mock, "  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 30}\n")
    try:
        used = 0
        codes = []
        while used < 30:
            r = httpx.post(g.url + CHAT, json=body("spend some tokens"))
            codes.append(r.status_code)
            line = wait_line(g, r.headers["cf-aig-log-id"])
            used += line["tokens_in"] + line["tokens_out"]
            assert len(codes) < 30, "the mock reported no tokens"
        assert set(codes) == {200}
        r = httpx.post(g.url + CHAT, json=body("one more"))
        assert r.status_code == 429
        err = r.json()["error"][0]
        assert err["code"] == 2003 and "token budget of 30 tokens per minute" in err["message"], err
        assert 1 <= int(r.headers["retry-after"]) <= 60
    finally:
        g.stop()


def test_a_global_token_budget_is_shared_by_the_pods(mock, tmp_path, redis):  # noqa: F811
    # Sliding: tokens counted just before a minute boundary still weigh on the next minute, so a
    # boundary between pod a's request and pod b's probes does not empty the budget.
    spec = ("  redis: {}\n"
            "  rateLimit: {limit: 1000, interval: 60s, scope: global, technique: sliding, tokensPerMinute: 1}\n")
    keys = dict(DEFAULT_KEYS, **{"redis.url": redis.url})
    name = f"tokens-{time.monotonic_ns()}"
    a = json_gateway(tmp_path, mock, spec, keys, name=name)
    b = json_gateway(tmp_path, mock, spec, keys, name=name)
    try:
        assert probe(b).status_code == 500, "nothing used yet: pod b lets a request through"
        r = httpx.post(a.url + CHAT, json=body("global tokens"))
        assert r.status_code == 200
        assert wait_line(a, r.headers["cf-aig-log-id"])["tokens_in"] > 1
        # Pod b's probes use no tokens: only pod a's, counted in Redis, can spend its budget.
        r = wait_refused(b, 2003, "pod b never saw pod a's tokens")
        assert "token budget of 1 token per minute" in r.json()["error"][0]["message"]
    finally:
        a.stop()
        b.stop()


# --- Streams that did not ask for usage -----------------------------------------------------

STREAM_SPEC = (
    "    google-ai-studio: {{baseURL: '{url}'}}\n"
    "    aws-bedrock: {{baseURL: '{url}'}}\n"
    "  pricing:\n    - {{model: dear-model, inputPerMillion: '5000', outputPerMillion: '5000'}}\n"
)
STREAM_KEYS = dict(DEFAULT_KEYS, **{
    "google-ai-studio.default": "AIza-mock-google",
    "aws-bedrock.default": json.dumps({"accessKeyId": "AKIDMOCK", "secretAccessKey": "mock-secret", "region": "eu-west-1"}),
})
STREAMED_ROUTES = [
    ("/openai", "dear-model"),
    ("/groq", "dear-model"),
    ("/compat", "openai/dear-model"),
    ("/compat", "groq/dear-model"),
    ("/compat", "anthropic/dear-model"),
    ("/compat", "google-ai-studio/dear-model"),
    ("/compat", "aws-bedrock/us-east-1/dear-model"),
]


def stream_without_usage(g, path, model, text="count my stream"):
    """Streams a completion through the openai SDK without stream_options; its chunks and log line."""
    oa = openai.OpenAI(base_url=g.url + path, api_key="placeholder", max_retries=0)
    raw = oa.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True)
    chunks = list(raw.parse())
    return chunks, wait_line(g, raw.headers["cf-aig-log-id"])


@pytest.mark.parametrize("path,model", STREAMED_ROUTES)
def test_a_stream_without_include_usage_is_logged_with_its_tokens_and_charged_to_the_spend_limit(
        mock, tmp_path, path, model):
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        chunks, line = stream_without_usage(g, path, model)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "mock reply to: count my stream"
        # The client did not ask for usage: no chunk carries it, none comes without choices.
        assert all(c.choices and c.usage is None for c in chunks), chunks[-2:]
        assert line["tokens_in"] > 0 and line["tokens_out"] > 0, line
        assert line["cost"] == pytest.approx((line["tokens_in"] + line["tokens_out"]) * 5000 / 1e6), line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()


def leave_at_finish_reason(g, path, model, **extra):
    """Streams a completion through the openai SDK, one event every 100 ms, and closes the stream
    at the chunk that carries `finish_reason` (as apps that stop there do); its log id."""
    oa = openai.OpenAI(base_url=g.url + path, api_key="placeholder", max_retries=0)
    raw = oa.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "count my stream"}], stream=True,
        extra_headers={"x-mock-chunk-delay-ms": "100"}, **extra)
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            break
    else:
        pytest.fail("the stream ended without a finish_reason")
    stream.close()
    return raw.headers["cf-aig-log-id"]


@pytest.mark.parametrize("path,model", STREAMED_ROUTES)
@pytest.mark.parametrize("usage", [False, True], ids=["usage-asked-by-the-gateway", "usage-asked-by-the-client"])
def test_a_stream_left_at_its_finish_reason_is_charged_for_the_usage_that_follows(
        mock, tmp_path, path, model, usage):
    # The usage comes after the finish_reason chunk (100 ms later here): the client left before
    # it, so the sidecar reads the rest of the answer for it; the line still says cancelled.
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        extra = {"stream_options": {"include_usage": True}} if usage else {}
        line = wait_line(g, leave_at_finish_reason(g, path, model, **extra))
        # /compat's Anthropic, Gemini and Bedrock streams send their finish_reason with the usage,
        # once the provider's stream has ended: those lines are complete.
        assert line["outcome"] == ("complete" if path == "/compat" and "openai/" not in model
                                   and "groq/" not in model else "cancelled"), line
        assert line["tokens_in"] > 0 and line["tokens_out"] > 0, line
        assert line["cost"] == pytest.approx((line["tokens_in"] + line["tokens_out"]) * 5000 / 1e6), line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()


def test_a_bedrock_stream_left_at_its_message_stop_is_charged_for_the_metadata_that_follows(mock, tmp_path):
    # ConverseStream sends the usage in a `metadata` event after `messageStop`.
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        with httpx.stream("POST", g.url + "/aws-bedrock/bedrock-runtime/us-east-1/model/dear-model/converse-stream",
                          headers={"x-mock-chunk-delay-ms": "100"},
                          json={"messages": [{"role": "user", "content": [{"text": "count my stream"}]}]}) as r:
            assert r.status_code == 200, r.read()
            seen = b""
            for data in r.iter_raw():
                seen += data
                if b"messageStop" in seen:
                    break
            assert b"metadata" not in seen, "the usage came with messageStop: nothing to test"
            log_id = r.headers["cf-aig-log-id"]
        line = wait_line(g, log_id)
        assert line["outcome"] == "cancelled" and line["tokens_in"] > 0 and line["tokens_out"] > 0, line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()


def event_stream(events):
    """Bedrock InvokeModelWithResponseStream framing of `events` (the model's JSON events):
    `chunk` messages whose payload is `{"bytes": base64}`, with AWS's CRC32s."""
    out = b""
    for e in events:
        payload = json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode(), "p": "abcd"}).encode()
        headers = b"".join(bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v for n, v in [
            (b":event-type", b"chunk"), (b":content-type", b"application/json"), (b":message-type", b"event")])
        prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
        message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
        out += message + struct.pack(">I", zlib.crc32(message))
    return out


def test_a_bedrock_invoke_stream_is_counted_and_charged(tmp_path):
    # The AnthropicBedrock clients stream through InvokeModelWithResponseStream: the usage is in
    # base64 inside the event-stream framing (the model's events, then Bedrock's metrics).
    upstream = FixedAnswerServer(event_stream([
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "content": [], "model": "claude", "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": 12, "outputTokenCount": 7, "invocationLatency": 50, "firstByteLatency": 20}},
    ]), content_type="application/vnd.amazon.eventstream")
    spec = STREAM_SPEC.format(url=upstream.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, upstream, spec, STREAM_KEYS)
    try:
        r = httpx.post(g.url + "/aws-bedrock/bedrock-runtime/us-east-1/model/dear-model/invoke-with-response-stream",
                       json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"]) == (12, 7), line
        assert line["cost"] == pytest.approx(19 * 5000 / 1e6), line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()
        upstream.stop()


def test_a_bedrock_invoke_of_a_model_without_usage_in_its_body_is_counted_from_bedrocks_headers(tmp_path):
    # InvokeModel of Llama, Titan, Mistral, ...: the body has its own fields (or none), Bedrock's
    # response headers have the counts.
    upstream = FixedAnswerServer(
        json.dumps({"generation": "hi", "prompt_token_count": None, "stop_reason": "stop"}).encode(),
        headers=[("x-amzn-bedrock-input-token-count", "20"), ("x-amzn-bedrock-output-token-count", "3")])
    spec = STREAM_SPEC.format(url=upstream.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, upstream, spec, STREAM_KEYS)
    try:
        r = httpx.post(g.url + "/aws-bedrock/bedrock-runtime/us-east-1/model/dear-model/invoke",
                       json={"prompt": "hi", "max_gen_len": 16})
        assert r.status_code == 200, r.text
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"]) == (20, 3), line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()
        upstream.stop()


def test_a_stream_left_before_its_finish_reason_is_not_read_on(mock, tmp_path):
    # Reading on would have the provider write (and bill) the whole answer: the upstream stream
    # is dropped with the client, and the answer is not charged (README, "Known gaps").
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        before = mock.stats()["streams_cancelled"]
        with httpx.stream("POST", g.url + CHAT, headers={"x-mock-chunk-delay-ms": "200"},
                          json=body("a b c d e f g h i j") | {"stream": True}) as r:
            next(r.iter_raw())
            log_id = r.headers["cf-aig-log-id"]
        line = wait_line(g, log_id)
        assert line["outcome"] == "cancelled" and line.get("tokens_out") is None, line
        deadline = time.monotonic() + 5
        while mock.stats()["streams_cancelled"] == before:
            assert time.monotonic() < deadline, "the upstream stream went on after the client left"
            time.sleep(0.05)
        assert spend(g, 0).status_code == 200
    finally:
        g.stop()


def test_a_universal_stream_step_without_include_usage_is_charged_to_the_spend_limit(mock, tmp_path):
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '0.01', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        step = {"provider": "openai", "endpoint": "chat/completions",
                "query": {"model": "dear-model", "stream": True,
                          "messages": [{"role": "user", "content": "count my stream"}]}}
        r = httpx.post(g.url + "/", json=[step])
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        assert '"choices":[]' not in r.text, "the client did not ask for the usage chunk"
        assert json.loads(mock.last()["body"])["stream_options"] == {"include_usage": True}
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert line["tokens_in"] > 0 and line["tokens_out"] > 0 and line["step"] == 0, line
        assert_spend_limited(spend(g, 0))
    finally:
        g.stop()


def test_a_stream_that_asked_for_usage_still_gets_it(mock, tmp_path):
    spec = STREAM_SPEC.format(url=mock.url) + "  spendLimit: {amount: '100', period: day}\n"
    g = json_gateway(tmp_path, mock, spec, STREAM_KEYS)
    try:
        for path, model in [("/openai", "gpt-4o-mini"), ("/compat", "openai/gpt-4o-mini")]:
            oa = openai.OpenAI(base_url=g.url + path, api_key="placeholder", max_retries=0)
            chunks = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, stream_options={"include_usage": True}))
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, (path, chunks[-1])
    finally:
        g.stop()


def test_without_limits_a_passthrough_stream_goes_upstream_unchanged(gw, mock):
    # Only a gateway with a spend limit or token budget needs a stream's tokens before the log:
    # without one the passthrough body is the client's, byte for byte.
    sent = json.dumps(body("as it came") | {"stream": True}).encode()
    r = httpx.post(gw.url + CHAT, content=sent, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert mock.last()["body"] == sent.decode()
    assert '"choices":[]' not in r.text


def test_a_token_budget_counts_streams_that_did_not_ask_for_usage(mock, tmp_path):
    g = json_gateway(tmp_path, mock, "  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 20}\n")
    try:
        _, line = stream_without_usage(g, "/openai", "gpt-4o-mini", "spend some tokens in a longer stream of words please")
        assert line["tokens_in"] + line["tokens_out"] >= 20, line
        assert json.loads(mock.last()["body"])["stream_options"] == {"include_usage": True}
        r = httpx.post(g.url + CHAT, json=body("one more"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003), r.text
    finally:
        g.stop()


def test_a_stream_asked_for_with_an_escaped_key_is_counted_too(mock, tmp_path):
    # The provider decodes "\u0073tream" to "stream" and streams: the gateway must see it too.
    g = json_gateway(tmp_path, mock, "  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 20}\n")
    try:
        sent = ('{"model":"gpt-4o-mini","\\u0073tream":true,'
                '"messages":[{"role":"user","content":"spend some tokens in a longer stream of words please"}]}')
        r = httpx.post(g.url + CHAT, content=sent, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        assert '"choices":[]' not in r.text
        assert json.loads(mock.last()["body"])["stream_options"] == {"include_usage": True}
        line = wait_line(g, r.headers["cf-aig-log-id"])
        assert line["tokens_in"] + line["tokens_out"] >= 20, line
        r = httpx.post(g.url + CHAT, json=body("one more"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (429, 2003), r.text
    finally:
        g.stop()
