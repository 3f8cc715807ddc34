"""Providers Cloudflare's gateway serves beyond SPEC.md's table (cerebras, baseten, parallel):
an app moving from Cloudflare by changing only its base URL reaches them through sidegate, with
the stored key injected, in the short and the long form, and through /compat."""

import json

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, KEY_MARKER, MockProvider, Sidegate, gateway_yaml

KEYS = dict(
    DEFAULT_KEYS,
    **{
        "cerebras.default": f"csk-{KEY_MARKER}-cerebras",
        "baseten.default": f"{KEY_MARKER}-baseten",
        "parallel.default": f"{KEY_MARKER}-parallel",
    },
)

# Cerebras' and Baseten's upstream bases end in /v1 (api.cerebras.ai/v1, inference.baseten.co/v1).
OPENAI_COMPATIBLE = ["cerebras", "baseten"]


@pytest.fixture(scope="module")
def x_api_key_mock():
    """A mock that, like Parallel, takes `x-api-key` as the key on its OpenAI-format routes."""
    m = MockProvider("--auth-header", "x-api-key")
    yield m
    m.stop()


@pytest.fixture
def gw(mock, x_api_key_mock, tmp_path):
    extra = (
        f"    cerebras: {{baseURL: '{mock.url}/v1'}}\n"
        f"    baseten: {{baseURL: '{mock.url}/v1'}}\n"
        f"    parallel: {{baseURL: '{x_api_key_mock.url}'}}\n"
    )
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), KEYS, extra_args=["--log-format", "json"])
    mock.clear()
    x_api_key_mock.clear()
    yield g
    g.stop()


def client(gw, path):
    return openai.OpenAI(base_url=gw.url + path, api_key="placeholder-from-app", max_retries=0)


def ask(c, model, text, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def request_line(g, log_id):
    """The JSON access log line of the request `log_id`."""
    return json.loads(g.wait_log_line(log_id))


@pytest.mark.parametrize("provider", OPENAI_COMPATIBLE)
def test_openai_sdk_gets_a_completion_with_the_stored_key_and_tokens_logged(gw, mock, provider):
    resp = client(gw, f"/{provider}").chat.completions.with_raw_response.create(
        model="llama3.1-8b", messages=[{"role": "user", "content": f"hello {provider}"}]
    )
    out = resp.parse()
    assert out.choices[0].message.content == f"mock reply to: hello {provider}"
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {KEYS[f'{provider}.default']}"
    assert not [h for h in seen["headers"] if h.startswith("cf-aig-")]
    line = request_line(gw, resp.headers["cf-aig-log-id"])
    assert line["provider"] == provider
    assert (line["tokens_in"], line["tokens_out"]) == (out.usage.prompt_tokens, out.usage.completion_tokens)


@pytest.mark.parametrize("provider", OPENAI_COMPATIBLE)
def test_openai_sdk_streams_with_the_stored_key(gw, mock, provider):
    stream = ask(client(gw, f"/{provider}"), "llama3.1-8b", "stream a few words please",
                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock reply to: stream a few words please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {KEYS[f'{provider}.default']}"


@pytest.mark.parametrize("provider", OPENAI_COMPATIBLE)
def test_the_long_form_reaches_the_same_provider(gw, mock, provider):
    out = ask(client(gw, f"/v1/acct/main/{provider}"), "llama3.1-8b", "long form")
    assert out.choices[0].message.content == "mock reply to: long form"
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {KEYS[f'{provider}.default']}"


@pytest.mark.parametrize("provider", OPENAI_COMPATIBLE)
def test_paths_that_repeat_the_upstream_v1_reach_it_once(gw, mock, provider):
    # Cloudflare's Baseten example posts to /baseten/v1/chat/completions; the Cerebras SDK
    # appends /v1/chat/completions to its base URL.
    out = ask(client(gw, f"/{provider}/v1"), "llama3.1-8b", "with v1")
    assert out.choices[0].message.content == "mock reply to: with v1"
    assert mock.last()["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("model", "upstream_model"), [
    ("cerebras/llama3.1-8b", "llama3.1-8b"),
    ("baseten/openai/gpt-oss-120b", "openai/gpt-oss-120b"),
])
def test_compat_reaches_them_with_the_model_after_the_provider(gw, mock, model, upstream_model):
    out = ask(client(gw, "/compat"), model, "through compat")
    assert out.choices[0].message.content == "mock reply to: through compat"
    provider = model.split("/")[0]
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {KEYS[f'{provider}.default']}"
    assert json.loads(seen["body"])["model"] == upstream_model


def test_parallel_takes_the_stored_key_in_x_api_key_on_any_path(gw, x_api_key_mock):
    out = ask(client(gw, "/parallel/v1beta"), "speed", "hello parallel")
    assert out.choices[0].message.content == "mock reply to: hello parallel"
    seen = x_api_key_mock.last()
    assert seen["path"] == "/v1beta/chat/completions"
    assert seen["headers"]["x-api-key"] == KEYS["parallel.default"]
    # The SDK's placeholder key does not go upstream beside the stored one.
    assert "authorization" not in seen["headers"]
    # Cloudflare: "route to any Parallel endpoint ... by appending the path after parallel".
    httpx.post(gw.url + "/v1/acct/main/parallel/v1/tasks/runs", json={"input": "x", "processor": "base"})
    seen = x_api_key_mock.last()
    assert seen["path"] == "/v1/tasks/runs"
    assert seen["headers"]["x-api-key"] == KEYS["parallel.default"]


def test_compat_reaches_parallel_on_its_chat_path(gw, x_api_key_mock):
    out = ask(client(gw, "/compat"), "parallel/speed", "compat parallel")
    assert out.choices[0].message.content == "mock reply to: compat parallel"
    seen = x_api_key_mock.last()
    assert seen["path"] == "/v1beta/chat/completions"
    assert seen["headers"]["x-api-key"] == KEYS["parallel.default"]


def test_provider_keys_for_them_are_used_not_reported_unused(mock, tmp_path):
    # custom-nowhere is not configured here: its key is the one reported unused (the message checked
    # against is the gateway's own).
    keys = dict(KEYS, **{"custom-nowhere.default": f"{KEY_MARKER}-nowhere"})
    extra = "".join(f"    {p}: {{baseURL: '{mock.url}/v1'}}\n" for p in ["cerebras", "baseten", "parallel"])
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), keys)
    try:
        assert "key custom-nowhere.default is unused" in g.logs()
        for provider in ["cerebras", "baseten", "parallel"]:
            assert f"key {provider}.default is unused" not in g.logs()
    finally:
        g.stop()


# SPEC.md's providers whose stored key goes upstream as `Authorization: Bearer <key>` (cohere:
# SPEC allows `Token` or Bearer; the gateway sends Bearer, which Cohere's API takes). Each is
# pointed at its own base on the mock (its path as in SPEC's base, under a prefix of its own), so
# the path also shows which provider's base a request reached. (provider, base path on the mock,
# client path, upstream path); groq's base is conftest's `/openai/v1`.
BEARER_PROVIDERS = [
    ("groq", None, "/groq/chat/completions", "/openai/v1/chat/completions"),
    ("mistral", "/mistral-up", "/mistral/v1/chat/completions", "/mistral-up/v1/chat/completions"),
    ("cohere", "/cohere-up", "/cohere/compatibility/v1/chat/completions",
     "/cohere-up/compatibility/v1/chat/completions"),
    ("deepseek", "/deepseek-up", "/deepseek/chat/completions", "/deepseek-up/chat/completions"),
    ("grok", "/grok-up", "/grok/v1/chat/completions", "/grok-up/v1/chat/completions"),
    ("perplexity-ai", "/perplexity-up", "/perplexity-ai/chat/completions", "/perplexity-up/chat/completions"),
    ("openrouter", "/openrouter-up/api", "/openrouter/v1/chat/completions",
     "/openrouter-up/api/v1/chat/completions"),
    ("huggingface", "/huggingface-up", "/huggingface/v1/chat/completions", "/huggingface-up/v1/chat/completions"),
    # Workers AI's account comes from the long form; its base is .../accounts/{account}/ai, run/ added.
    ("workers-ai", "/client/v4/accounts/{account}/ai", "/v1/acct123/main/workers-ai/@cf/meta/llama-3.1-8b-instruct",
     "/client/v4/accounts/acct123/ai/run/@cf/meta/llama-3.1-8b-instruct"),
]
BEARER_KEYS = dict(DEFAULT_KEYS, **{f"{p}.default": f"{KEY_MARKER}-stored-{p}" for p, *_ in BEARER_PROVIDERS})


@pytest.fixture(scope="module")
def bearer_gw(mock, tmp_path_factory):
    extra = "".join(f"    {p}: {{baseURL: '{mock.url}{base}'}}\n" for p, base, *_ in BEARER_PROVIDERS if base)
    g = Sidegate(tmp_path_factory.mktemp("bearer"), gateway_yaml(mock.url, extra_spec=extra), BEARER_KEYS)
    yield g
    g.stop()


@pytest.mark.parametrize(("provider", "base", "path", "upstream_path"), BEARER_PROVIDERS,
                         ids=[p for p, *_ in BEARER_PROVIDERS])
def test_the_stored_key_replaces_the_apps_placeholder_as_bearer(bearer_gw, mock, provider, base, path, upstream_path):
    mock.clear()
    placeholder = "Bearer placeholder-from-app"
    r = httpx.post(bearer_gw.url + path, headers={"authorization": placeholder},
                   json={"model": "m", "messages": [{"role": "user", "content": f"key for {provider}"}]})
    (seen,) = mock.requests()
    assert seen["path"] == upstream_path
    # Exactly the stored key, once (repeated headers are recorded joined with ", ").
    assert seen["headers"].get("authorization") == f"Bearer {BEARER_KEYS[f'{provider}.default']}"
    assert not [h for h, v in seen["headers"].items() if "placeholder" in v], seen["headers"]
    assert r.status_code != 401, r.text
