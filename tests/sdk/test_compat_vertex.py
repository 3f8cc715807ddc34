"""Vertex on /compat named as Cloudflare names it: `google-vertex-ai/google/gemini-2.5-pro`
({publisher}/{model}), the project and region taken from the stored service-account key — its
`project_id`, and the region Cloudflare stores with the key (a `region` field of the JSON)
(https://developers.cloudflare.com/ai-gateway/usage/providers/vertex/)."""

import json

import openai
import pytest

from conftest import GATEWAY_TOKEN, Sidegate
from test_compat import COMPAT_KEYS, ask, client, compat_yaml, service_account

REGION = "europe-west4"
FLASH = "/v1/projects/my-proj/locations/europe-west4/publishers/google/models/gemini-2.5-flash"


def vertex_gateway(mock, tmp_path, auth=False, **fields):
    """A gateway whose google-vertex-ai key is a service account (project my-proj) with `fields`
    added, its tokens minted by the mock."""
    sa = dict(service_account(f"{mock.url}/token"), **fields)
    keys = dict(COMPAT_KEYS, **{"google-vertex-ai.default": json.dumps(sa)})
    yaml = compat_yaml(mock.url)
    if auth:
        yaml = yaml.replace("spec:\n", "spec:\n  authentication: {enabled: true}\n", 1)
        keys["authentication.tokens"] = GATEWAY_TOKEN
    g = Sidegate(tmp_path, yaml, keys)
    mock.clear()
    return g, sa


@pytest.fixture
def regional(mock, tmp_path):
    g, sa = vertex_gateway(mock, tmp_path, region=REGION)
    yield g, sa
    g.stop()


def calls(mock):
    return [r for r in mock.requests() if r["path"] != "/token"]


def test_publisher_model_takes_project_and_region_from_the_stored_key(regional, mock):
    g, sa = regional
    out = ask(client(g), "google-vertex-ai/google/gemini-2.5-flash", "hello vertex")
    assert out.choices[0].message.content == "mock reply to: hello vertex"
    [seen] = calls(mock)
    assert seen["path"] == f"{FLASH}:generateContent"
    assert seen["headers"]["authorization"] == f"Bearer ya29.mock-{sa['client_email']}"


def test_publisher_model_streams_and_embeds_too(regional, mock):
    g, _ = regional
    stream = client(g).chat.completions.create(model="google-vertex-ai/google/gemini-2.5-flash",
                                               messages=[{"role": "user", "content": "streamed"}], stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == "mock reply to: streamed"
    emb = client(g).embeddings.create(model="google-vertex-ai/google/text-embedding-005", input="x")
    assert len(emb.data[0].embedding) == 8
    assert [(r["path"], r["query"]) for r in calls(mock)] == [
        (f"{FLASH}:streamGenerateContent", "alt=sse"),
        ("/v1/projects/my-proj/locations/europe-west4/publishers/google/models/text-embedding-005:predict", None),
    ]


def test_the_project_and_region_forms_still_name_their_own(regional, mock):
    g, _ = regional
    ask(client(g), "google-vertex-ai/other-proj/us-east4/gemini-2.5-flash")
    ask(client(g), "google-vertex-ai/projects/p2/locations/us-central1/publishers/google/models/gemini-2.5-flash")
    assert [r["path"] for r in calls(mock)] == [
        "/v1/projects/other-proj/locations/us-east4/publishers/google/models/gemini-2.5-flash:generateContent",
        "/v1/projects/p2/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent",
    ]


def test_only_google_models_have_the_gemini_api(regional, mock):
    g, _ = regional
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(g), "google-vertex-ai/anthropic/claude-sonnet-4-5")
    assert "publisher \"anthropic\"" in e.value.response.json()["error"][0]["message"]
    assert calls(mock) == []


def test_a_key_without_a_region_is_a_400_naming_it(mock, tmp_path):
    g, _ = vertex_gateway(mock, tmp_path)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            ask(client(g), "google-vertex-ai/google/gemini-2.5-pro")
        message = e.value.response.json()["error"][0]["message"]
        assert "\"region\"" in message and "google-vertex-ai.default" in message, message
        assert calls(mock) == []
    finally:
        g.stop()


def test_an_access_token_key_has_no_project_or_region(mock, tmp_path):
    # COMPAT_KEYS' google-vertex-ai key is a ready access token, not a service-account JSON.
    g = Sidegate(tmp_path, compat_yaml(mock.url), COMPAT_KEYS)
    try:
        mock.clear()
        with pytest.raises(openai.BadRequestError) as e:
            ask(client(g), "google-vertex-ai/google/gemini-2.5-pro")
        message = e.value.response.json()["error"][0]["message"]
        assert "service-account" in message and "{project}/{region}/{model}" in message, message
        assert mock.requests() == []
    finally:
        g.stop()


def test_an_authenticated_gateway_takes_the_token_as_api_key_for_a_stored_service_account(mock, tmp_path):
    g, sa = vertex_gateway(mock, tmp_path, auth=True, region=REGION)
    try:
        c = openai.OpenAI(base_url=g.url + "/compat", api_key=GATEWAY_TOKEN, max_retries=0)
        out = ask(c, "google-vertex-ai/google/gemini-2.5-flash", "authed")
        assert out.choices[0].message.content == "mock reply to: authed"
        [seen] = calls(mock)
        assert seen["path"] == f"{FLASH}:generateContent"
        assert seen["headers"]["authorization"] == f"Bearer ya29.mock-{sa['client_email']}"
        assert GATEWAY_TOKEN not in g.logs()
    finally:
        g.stop()


def test_blank_text_never_reaches_vertex(regional, mock):
    # Vertex refuses a text part that is blank ("empty text parameter", the mock too); Claude's
    # "\n\n" before a tool call comes back in histories moved to Gemini.
    g, _ = regional
    out = client(g).chat.completions.create(model="google-vertex-ai/google/gemini-2.5-flash", messages=[
        {"role": "system", "content": " "},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "\n\n"},
        {"role": "user", "content": [{"type": "text", "text": "\n"}, {"type": "text", "text": "and now?"}]}])
    # The assistant turn left with nothing is left out: the user turns around it merge.
    assert out.choices[0].message.content == "mock reply to: weather? and now?"
    [seen] = calls(mock)
    body = json.loads(seen["body"])
    assert "systemInstruction" not in body
    assert body["contents"] == [{"role": "user", "parts": [{"text": "weather?"}, {"text": "and now?"}]}]
