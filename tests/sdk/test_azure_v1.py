"""Azure OpenAI's v1 API (`https://{resource}.openai.azure.com/openai/v1/...`, the model in the
body, no `api-version`) through `/azure-openai/{resource}/openai/v1/...`, with the official
openai SDK's `OpenAI` client as Azure's docs use it. The mock serves the resource: conftest
points azure-openai at `{mock}/openai/deployments/{deployment}`, whose v1 API is `{mock}/openai/v1`."""

import json
import pathlib
import time

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, KEY_MARKER, Sidegate, gateway_yaml

AZURE_KEY = f"{KEY_MARKER}-azure-0001"
KEYS = dict(DEFAULT_KEYS, **{"azure-openai.default": AZURE_KEY})
# A deployment named otherwise than its model, priced in spec.pricing: its price shows that the
# body's model decided.
SPEC = ("  pricing:\n    - {model: prod-chat, inputPerMillion: '100', outputPerMillion: '1000'}\n"
        "  spendLimit: {amount: '1000', period: day}\n"
        "  cache: {enabled: true}\n"
        "  dlp:\n    policies:\n"
        "      - {id: no-ssn, action: BLOCK, check: [REQUEST], profiles: [us-ssn]}\n")
SSN = "123-45-6789"


def start(tmp_path, mock, spec=SPEC, keys=KEYS):
    d = pathlib.Path(tmp_path) / f"gw-{time.monotonic_ns()}"
    d.mkdir()
    g = Sidegate(d, gateway_yaml(mock.url, extra_spec=spec), keys, extra_args=["--log-format", "json"])
    mock.clear()
    return g


@pytest.fixture
def gw(mock, tmp_path):
    g = start(tmp_path, mock)
    yield g
    g.stop()


def v1_client(g, resource="my-resource", api_key="placeholder-from-app"):
    return openai.OpenAI(base_url=f"{g.url}/azure-openai/{resource}/openai/v1", api_key=api_key, max_retries=0)


def line_of(g, log_id):
    return json.loads(g.wait_log_line(log_id))


def test_the_openai_sdk_reaches_the_resources_v1_api_with_the_stored_key(gw, mock):
    resp = v1_client(gw).chat.completions.with_raw_response.create(
        model="prod-chat", messages=[{"role": "user", "content": "via v1"}])
    assert resp.parse().choices[0].message.content == "mock reply to: via v1"
    seen = mock.last()
    assert seen["path"] == "/openai/v1/chat/completions"
    assert seen["query"] in (None, ""), seen["query"]
    assert seen["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in seen["headers"], "the app's placeholder must not go upstream"
    assert json.loads(seen["body"])["model"] == "prod-chat"
    # The body's model is the request's: logged and priced as it is.
    line = line_of(gw, resp.headers["cf-aig-log-id"])
    assert (line["provider"], line["model"]) == ("azure-openai", "prod-chat"), line
    assert line["cost"] == pytest.approx((line["tokens_in"] * 100 + line["tokens_out"] * 1000) / 1e6)

    emb = v1_client(gw).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2
    assert mock.last()["path"] == "/openai/v1/embeddings"
    assert mock.last()["headers"]["api-key"] == AZURE_KEY


def test_a_v1_stream_is_asked_for_its_usage_and_charged(gw, mock):
    # As on OpenAI: under a spend limit the gateway asks for the usage chunk (no api-version
    # needed on v1) and keeps it out of the client's stream.
    stream = v1_client(gw).chat.completions.with_raw_response.create(
        model="prod-chat", messages=[{"role": "user", "content": "count my stream"}], stream=True)
    chunks = list(stream.parse())
    assert chunks and all(c.choices for c in chunks), "the client did not ask for the usage chunk"
    assert json.loads(mock.last()["body"])["stream_options"] == {"include_usage": True}
    line = line_of(gw, stream.headers["cf-aig-log-id"])
    assert line["model"] == "prod-chat" and line["tokens_in"] > 0 and line["tokens_out"] > 0, line
    assert line["cost"] == pytest.approx((line["tokens_in"] * 100 + line["tokens_out"] * 1000) / 1e6)


def test_v1_answers_are_cached_by_their_body_and_dlp_checks_them(gw, mock):
    c = v1_client(gw)
    ask = lambda model, text: c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}])
    first, second = ask("prod-chat", "cache me"), ask("prod-chat", "cache me")
    assert mock.last()["path"] == "/openai/v1/chat/completions"
    other = ask("gpt-4.1", "cache me")
    assert [r.headers["cf-aig-cache-status"] for r in (first, second, other)] == ["MISS", "HIT", "MISS"]
    # Another resource is another upstream: not the first one's answer.
    again = v1_client(gw, "other-resource").chat.completions.with_raw_response.create(
        model="prod-chat", messages=[{"role": "user", "content": "cache me"}])
    assert again.headers["cf-aig-cache-status"] == "MISS"

    mock.clear()
    r = httpx.post(f"{gw.url}/azure-openai/my-resource/openai/v1/chat/completions",
                   json={"model": "prod-chat", "messages": [{"role": "user", "content": f"my ssn is {SSN}"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"][0]
    assert err["code"] == 2029 and 'policy "no-ssn"' in err["message"], err
    assert mock.requests() == []


def test_without_a_stored_key_the_apps_key_goes_as_its_bearer_token(mock, tmp_path):
    # Azure's v1 API takes an API key as a bearer token, as the OpenAI client sends it.
    g = start(tmp_path, mock, spec="", keys=DEFAULT_KEYS)
    try:
        out = v1_client(g, api_key="azure-app-key").chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "own key"}])
        assert out.choices[0].message.content == "mock reply to: own key"
        seen = mock.last()
        assert seen["path"] == "/openai/v1/chat/completions"
        assert seen["headers"]["authorization"] == "Bearer azure-app-key"
    finally:
        g.stop()


def test_universal_steps_and_compat_models_name_the_v1_api(gw, mock):
    # A universal step's endpoint, as a route's path: the model is the step's body's.
    step = {"provider": "azure-openai", "endpoint": "my-resource/openai/v1/chat/completions",
            "headers": {}, "query": {"model": "prod-chat", "messages": [{"role": "user", "content": "step"}]}}
    r = httpx.post(gw.url + "/", json=[step])
    assert r.status_code == 200, r.text
    assert r.headers["cf-aig-model"] == "prod-chat"
    seen = mock.last()
    assert (seen["path"], seen["headers"]["api-key"]) == ("/openai/v1/chat/completions", AZURE_KEY)
    assert line_of(gw, r.headers["cf-aig-log-id"])["model"] == "prod-chat"

    # /compat (and so a dynamic route's target): azure-openai/{resource}/openai/v1/{model}.
    c = openai.OpenAI(base_url=gw.url + "/compat", api_key="placeholder", max_retries=0)
    out = c.chat.completions.with_raw_response.create(
        model="azure-openai/my-resource/openai/v1/prod-chat", messages=[{"role": "user", "content": "compat"}])
    assert out.parse().choices[0].message.content == "mock reply to: compat"
    seen = mock.last()
    assert seen["path"] == "/openai/v1/chat/completions"
    assert seen["query"] in (None, ""), "no api-version is added on v1"
    assert json.loads(seen["body"])["model"] == "prod-chat"
    line = line_of(gw, out.headers["cf-aig-log-id"])
    assert line["cost"] == pytest.approx((line["tokens_in"] * 100 + line["tokens_out"] * 1000) / 1e6)


def test_a_base_url_without_a_deployment_segment_has_no_v1_api(mock, tmp_path):
    spec_base = f"    azure-openai: {{baseURL: '{mock.url}/{{resource}}'}}\n"
    yaml = gateway_yaml(mock.url).replace(
        f"    azure-openai: {{baseURL: '{mock.url}/openai/deployments/{{deployment}}'}}\n", spec_base)
    assert spec_base in yaml
    d = pathlib.Path(tmp_path) / "nov1"
    d.mkdir()
    g = Sidegate(d, yaml, KEYS)
    try:
        mock.clear()
        r = httpx.post(f"{g.url}/azure-openai/res/openai/v1/chat/completions",
                       json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404, r.text
        err = r.json()["error"][0]
        assert err["code"] == 2001 and "/deployments/{deployment}" in err["message"], err
        assert mock.requests() == []
    finally:
        g.stop()
