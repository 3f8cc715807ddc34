"""The official anthropic SDK through sidegate to a mock Anthropic provider."""

import anthropic
import pytest

from conftest import ANTHROPIC_KEY


def client(gateway, **kw):
    return anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key="placeholder-from-app", max_retries=0, **kw)


def test_message_uses_the_stored_key_and_a_default_version(gateway, mock):
    msg = client(gateway).messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}]
    )
    assert msg.content[0].text == "mock reply to: hi claude"
    assert msg.usage.output_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert seen["headers"]["anthropic-version"]  # the SDK sends one; it is kept


def test_anthropic_version_is_added_when_the_client_sends_none(gateway, mock):
    import httpx

    r = httpx.post(
        gateway.url + "/anthropic/v1/messages",
        json={"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "raw"}]},
    )
    assert r.status_code == 200, r.text
    assert mock.last()["headers"]["anthropic-version"] == "2023-06-01"


def test_streaming_events_arrive_in_order(gateway, mock):
    with client(gateway).messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "stream please now"}]
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start"
    assert "content_block_delta" in types
    assert types[-1] == "message_stop"
    assert final.content[0].text == "mock reply to: stream please now"
    assert final.usage.output_tokens > 0


def test_provider_errors_pass_through_unchanged(gateway, mock):
    with pytest.raises(anthropic.InternalServerError) as e:
        client(gateway).messages.create(model="mock-status-500", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    body = e.value.response.json()
    assert body["type"] == "error"
    assert e.value.response.status_code == 500


def test_gateway_token_is_required_and_never_forwarded(authed_gateway, mock):
    from conftest import GATEWAY_TOKEN

    with pytest.raises(anthropic.AuthenticationError) as e:
        client(authed_gateway).messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.response.json()["error"][0] == {"code": 2009, "message": "Unauthorized"}
    ok = client(authed_gateway, default_headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"})
    ok.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "y"}])
    assert "cf-aig-authorization" not in mock.last()["headers"]
