"""The gateway token in the provider's own auth slot, as Cloudflare's stored-key (BYOK) and
Unified Billing examples configure SDKs: `apiKey: "{cf_aig_token}"` and no cf-aig-authorization
(https://developers.cloudflare.com/ai-gateway/usage/providers/google-ai-studio/, the /compat
examples of https://developers.cloudflare.com/ai-gateway/usage/chat-completion/, and
`Authorization: Bearer {cf_api_token}` for Anthropic,
https://developers.cloudflare.com/ai-gateway/usage/providers/anthropic/). An authenticated
gateway takes it there only when a stored key replaces that header, so the token never goes
upstream; elsewhere it is 401/2009 as without a token."""

import anthropic
import httpx
import openai
import pytest

from conftest import (ANTHROPIC_KEY, DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate,
                      gateway_yaml)

GOOGLE_KEY = f"AIza-{KEY_MARKER}-google"
GEMINI_PATH = "/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi gemini"}]}]}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def authed(mock, tmp_path):
    """Authentication on; stored keys for openai, anthropic and google-ai-studio, none for groq."""
    extra = (
        f"    google-ai-studio: {{baseURL: '{mock.url}'}}\n"
        "  fallbacks:\n"
        "    - name: to-groq\n"
        "      targets: [{provider: openai, model: mock-status-503}, {provider: groq, model: llama-3.1-8b}]\n"
    )
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN, "google-ai-studio.default": GOOGLE_KEY})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True, extra_spec=extra), keys)
    mock.clear()
    yield g
    assert GATEWAY_TOKEN not in g.logs()
    g.stop()


def openai_client(g, path="/openai", api_key=GATEWAY_TOKEN, **kw):
    return openai.OpenAI(base_url=g.url + path, api_key=api_key, max_retries=0, **kw)


def assert_token_never_upstream(mock):
    for r in mock.requests():
        assert all(GATEWAY_TOKEN not in v for v in r["headers"].values()), r["headers"]


def assert_refused(response):
    assert response.status_code == 401
    assert response.json()["error"][0]["code"] == 2009


def test_the_openai_sdk_may_carry_the_gateway_token_as_its_api_key(authed, mock):
    out = openai_client(authed).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.choices[0].message.content == "mock reply to: hello"
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert_token_never_upstream(mock)


def test_the_anthropic_sdk_may_carry_it_in_x_api_key_or_as_a_bearer_token(authed, mock):
    for c in (anthropic.Anthropic(base_url=authed.url + "/anthropic", api_key=GATEWAY_TOKEN, max_retries=0),
              # Cloudflare's Anthropic BYOK example: `Authorization: Bearer {cf_api_token}`.
              anthropic.Anthropic(base_url=authed.url + "/anthropic", api_key=None, auth_token=GATEWAY_TOKEN,
                                  max_retries=0)):
        msg = c.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES)
        assert msg.content[0].text == "mock reply to: hello"
        seen = mock.last()["headers"]
        assert seen["x-api-key"] == ANTHROPIC_KEY
        assert "authorization" not in seen
    assert_token_never_upstream(mock)


def test_google_ai_studio_takes_it_in_x_goog_api_key(authed, mock):
    # What @google/genai sends for `apiKey: "{cf_aig_token}"`.
    r = httpx.post(authed.url + GEMINI_PATH, json=GEMINI_BODY, headers={"x-goog-api-key": GATEWAY_TOKEN})
    assert r.status_code == 200, r.text
    assert mock.last()["headers"]["x-goog-api-key"] == GOOGLE_KEY
    assert_token_never_upstream(mock)


def test_a_provider_without_a_stored_key_refuses_the_token_in_its_auth_header(authed, mock):
    # Forwarding it would hand the gateway token to the provider.
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(authed, "/groq").chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    assert_refused(e.value.response)
    assert mock.requests() == []


def test_the_token_in_the_auth_header_is_refused_there_with_cf_aig_authorization_too(authed, mock):
    # cf-aig-authorization lets the request in, but the key header still holds the token and
    # no stored key replaces it: it would go upstream as the client's own key.
    c = openai_client(authed, "/groq", default_headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    assert_refused(e.value.response)
    assert mock.requests() == []
    # Where a stored key replaces it, both together are fine.
    c = openai_client(authed, default_headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    assert_token_never_upstream(mock)


def test_a_wrong_token_or_none_is_refused(authed, mock):
    for key in ("gw-wrong-token", "sk-placeholder"):
        with pytest.raises(openai.AuthenticationError) as e:
            openai_client(authed, api_key=key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert_refused(e.value.response)
    r = httpx.post(authed.url + GEMINI_PATH, json=GEMINI_BODY, headers={"x-goog-api-key": "AIza-not-the-token"})
    assert_refused(r)
    assert mock.requests() == []


def test_a_wrong_cf_aig_authorization_is_refused_whatever_the_auth_header_holds(authed, mock):
    c = openai_client(authed, default_headers={"cf-aig-authorization": "Bearer gw-wrong-token"})
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert_refused(e.value.response)
    # The documented way still works, with the app's own placeholder key replaced.
    c = openai_client(authed, api_key="placeholder", default_headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_repeated_cf_aig_authorization_is_refused_whichever_comes_first(authed, mock):
    good, wrong = ("cf-aig-authorization", f"Bearer {GATEWAY_TOKEN}"), ("cf-aig-authorization", "Bearer gw-wrong")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    for headers in ([good, wrong], [wrong, good], [good, good]):
        assert_refused(httpx.post(authed.url + "/openai/chat/completions", json=body, headers=headers))
    assert mock.requests() == []
    assert httpx.post(authed.url + "/openai/chat/completions", json=body, headers=[good]).status_code == 200


def test_compat_takes_the_token_as_the_openai_sdks_api_key(authed, mock):
    c = openai_client(authed, "/compat")
    for model in ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "google-ai-studio/gemini-2.5-flash"):
        out = c.chat.completions.create(model=model, messages=MESSAGES)
        assert out.choices[0].message.content == "mock reply to: hello", model
    sent = [r["headers"] for r in mock.requests()]
    assert [h.get("authorization") or h.get("x-api-key") or h.get("x-goog-api-key") for h in sent] == [
        f"Bearer {OPENAI_KEY}", ANTHROPIC_KEY, GOOGLE_KEY]
    assert_token_never_upstream(mock)


def test_compat_refuses_it_for_a_target_without_a_stored_key(authed, mock):
    c = openai_client(authed, "/compat")
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="groq/llama-3.1-8b", messages=MESSAGES)
    assert_refused(e.value.response)
    assert mock.requests() == []
    # A fallback chain whose next target has no stored key is refused before any is tried: a
    # failure of the first must not turn into the client's 401.
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="fallback/to-groq", messages=MESSAGES)
    assert_refused(e.value.response)
    assert mock.requests() == []
    assert_token_never_upstream(mock)


def test_the_universal_endpoint_wants_cf_aig_authorization(authed, mock):
    step = {"provider": "openai", "endpoint": "chat/completions",
            "query": {"model": "gpt-4o-mini", "messages": MESSAGES}}
    r = httpx.post(authed.url + "/", json=[step], headers={"authorization": f"Bearer {GATEWAY_TOKEN}"})
    assert_refused(r)
    assert mock.requests() == []


def test_a_universal_step_may_not_carry_the_token_as_its_key(authed, mock):
    # groq has no stored key: the step's own `authorization` would go upstream as its key.
    auth = {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}
    for where in ({"headers": {"authorization": f"Bearer {GATEWAY_TOKEN}"}},
                  {"authorization": f"Bearer {GATEWAY_TOKEN}"}):
        step = {"provider": "groq", "endpoint": "chat/completions",
                "query": {"model": "llama-3.1-8b", "messages": MESSAGES}, **where}
        r = httpx.post(authed.url + "/", json=[step], headers=auth)
        assert_refused(r)
    assert mock.requests() == []
    # A key of the step's own goes through.
    step = {"provider": "groq", "endpoint": "chat/completions", "authorization": "Bearer gsk-own-key",
            "query": {"model": "llama-3.1-8b", "messages": MESSAGES}}
    r = httpx.post(authed.url + "/", json=[step], headers=auth)
    assert r.status_code == 200, r.text
    assert mock.last()["headers"]["authorization"] == "Bearer gsk-own-key"
    assert_token_never_upstream(mock)
