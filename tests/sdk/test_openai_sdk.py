"""The official openai SDK through sidegate to a mock OpenAI-compatible provider."""

import json
import re
import time

import httpx
import openai
import pytest

from conftest import KEY_MARKER, OPENAI_KEY


def per_response_fields_masked(direct, through):
    """`direct` with its response id and creation time replaced by those of `through`."""
    got = json.loads(through)
    out = re.sub(rb'"id":"[^"]*"', b'"id":' + json.dumps(got["id"]).encode(), direct, count=1)
    return re.sub(rb'"created":\d+', b'"created":' + str(got["created"]).encode(), out, count=1)


def client(gateway, path="/openai", **kw):
    return openai.OpenAI(base_url=gateway.url + path, api_key="placeholder-from-app", max_retries=0, **kw)


def test_chat_completion_gets_exactly_what_the_provider_sent_with_the_stored_key(gateway, mock):
    headers = {"cf-aig-metadata": '{"team": "a"}', "cf-aig-event-id": "evt-42"}
    resp = client(gateway, default_headers=headers).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    completion = resp.parse()
    assert completion.choices[0].message.content == "mock reply to: hello there"
    assert resp.headers["cf-aig-event-id"] == "evt-42"
    log_id = resp.headers["cf-aig-log-id"]
    assert len(log_id) == 26
    assert completion.usage.total_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not [h for h in seen["headers"] if h.startswith("cf-aig-")]
    assert seen["headers"]["host"] == mock.addr
    assert json.loads(seen["body"])["messages"][0]["content"] == "hello there"
    # What the SDK received is byte for byte what the mock produced (but for the per-response
    # id and creation time), with the provider's response headers.
    direct = httpx.post(mock.url + "/v1/chat/completions", headers={"authorization": "Bearer direct"},
                        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})
    assert resp.http_response.content == per_response_fields_masked(direct.content, resp.http_response.content)
    n = completion.id.removeprefix("chatcmpl-mock-")
    assert resp.headers["x-request-id"] == f"req_mock_{n}"
    provider_headers = [h for h in direct.headers if h.startswith(("openai-", "x-ratelimit-"))]
    assert "openai-processing-ms" in provider_headers and "x-ratelimit-remaining-tokens" in provider_headers
    for h in provider_headers:
        assert resp.headers.get(h) == direct.headers[h], h
    deadline = time.monotonic() + 3
    while log_id not in gateway.logs():
        assert time.monotonic() < deadline, "the log line carries the same id as the response header"
        time.sleep(0.05)


def test_streaming_chunks_arrive_in_order_with_usage(gateway, mock):
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me a few words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock reply to: stream me a few words please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


def test_long_form_url_reaches_the_same_provider(gateway, mock):
    c = client(gateway, path="/v1/my-account/main/openai")
    out = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "long"}])
    assert out.choices[0].message.content == "mock reply to: long"
    assert mock.last()["path"] == "/v1/chat/completions"


def test_long_form_with_another_gateway_id_is_404_2001(gateway):
    with pytest.raises(openai.NotFoundError) as e:
        client(gateway, path="/v1/acct/other-gateway/openai").chat.completions.create(model="m", messages=[])
    assert e.value.body is not None
    assert e.value.response.json()["error"][0]["code"] == 2001


def test_byok_alias_selects_the_named_key(gateway, mock):
    c = client(gateway, default_headers={"cf-aig-byok-alias": "team-b"})
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}])
    assert mock.last()["headers"]["authorization"] == f"Bearer sk-{KEY_MARKER}-openai-teamb"


def test_unknown_alias_is_400_2040_in_the_spec_envelope(gateway, mock):
    c = client(gateway, default_headers={"cf-aig-byok-alias": "nope"})
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    body = e.value.response.json()
    assert body["success"] is False and body["result"] == [] and body["messages"] == []
    assert body["error"][0]["code"] == 2040
    assert mock.requests() == [], "nothing may reach the provider"


def test_provider_errors_pass_through_unchanged(gateway, mock):
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).chat.completions.create(model="mock-status-429", messages=[{"role": "user", "content": "x"}])
    direct = httpx.post(mock.url + "/v1/chat/completions", headers={"authorization": "Bearer direct"},
                        json={"model": "mock-status-429", "messages": [{"role": "user", "content": "x"}]})
    assert e.value.response.status_code == 429
    assert e.value.response.content == direct.content
    assert e.value.response.headers.get("retry-after") == direct.headers.get("retry-after")


def test_without_a_stored_key_the_clients_own_key_is_forwarded(gateway, mock):
    c = openai.OpenAI(base_url=gateway.url + "/groq", api_key="gsk-client-own", max_retries=0)
    c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "g"}])
    seen = mock.last()
    assert seen["path"] == "/openai/v1/chat/completions"
    assert seen["headers"]["authorization"] == "Bearer gsk-client-own"


def test_without_any_key_the_providers_401_passes_through(gateway, mock):
    # groq has no stored key and the client sends none: the provider's refusal reaches the app.
    r = httpx.post(gateway.url + "/groq/chat/completions",
                   json={"model": "llama", "messages": [{"role": "user", "content": "no key"}]})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "authorization" not in mock.last()["headers"]


def test_custom_provider_uses_its_configured_auth_header(gateway, mock):
    client(gateway, path="/custom-local").chat.completions.create(model="local", messages=[{"role": "user", "content": "c"}])
    seen = mock.last()
    assert seen["headers"]["x-custom-key"] == f"{KEY_MARKER}-custom"
    assert "authorization" not in seen["headers"], "the app's placeholder key must not leak upstream"


def test_azure_url_shape_maps_deployment_and_keeps_query(gateway, mock):
    r = httpx.post(
        gateway.url + "/azure-openai/my-resource/gpt4o-deploy/chat/completions?api-version=2024-10-21",
        headers={"api-key": "azure-client-key"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "az"}]},
    )
    assert r.status_code == 200, r.text
    seen = mock.last()
    assert seen["path"] == "/openai/deployments/gpt4o-deploy/chat/completions"
    assert seen["query"] == "api-version=2024-10-21"
    assert seen["headers"]["api-key"] == "azure-client-key"


def test_the_azure_sdk_client_pointed_at_the_gateway_reaches_its_deployment(gateway, mock):
    # AzureOpenAI appends /openai/deployments/{model}/... to its azure_endpoint, which for the
    # gateway is /azure-openai/{resource}: the deployment is read from that path too.
    c = openai.AzureOpenAI(azure_endpoint=gateway.url + "/azure-openai/my-resource",
                           api_version="2024-10-21", api_key="azure-client-key", max_retries=0)
    out = c.chat.completions.create(model="gpt4o-deploy", messages=[{"role": "user", "content": "sdk"}])
    assert out.choices[0].message.content == "mock reply to: sdk"
    seen = mock.last()
    assert seen["path"] == "/openai/deployments/gpt4o-deploy/chat/completions"
    assert seen["query"] == "api-version=2024-10-21"
    assert seen["headers"]["api-key"] == "azure-client-key"


def test_azure_deployments_named_with_dots_and_underscores_are_reached(gateway, mock):
    # Azure deployment names take dots and underscores (a deployment named after its model,
    # `gpt-4.1`): they go into the path, not the host (providers.rs unit tests: `.` and `..`
    # segments are still refused).
    c = openai.AzureOpenAI(azure_endpoint=gateway.url + "/azure-openai/my-resource",
                           api_version="2024-10-21", api_key="azure-client-key", max_retries=0)
    for deployment in ("gpt-4.1", "gpt-4.1-mini_eu"):
        out = c.chat.completions.create(model=deployment, messages=[{"role": "user", "content": "dots"}])
        assert out.choices[0].message.content == "mock reply to: dots"
        assert mock.last()["path"] == f"/openai/deployments/{deployment}/chat/completions"


def test_embeddings_and_models_pass_through(gateway, mock):
    c = client(gateway)
    emb = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    models = c.models.list()
    assert len(models.data) > 0
    assert mock.last()["path"] == "/v1/models"


def test_first_streamed_byte_arrives_before_the_stream_ends(gateway, mock):
    # 20+ chunks, 150 ms apart: a buffering proxy would hold the first byte for ~3 s.
    start = time.monotonic()
    with httpx.stream(
        "POST",
        gateway.url + "/openai/chat/completions",
        headers={"x-mock-chunk-delay-ms": "150"},
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "one two three four five six seven eight"}]},
        timeout=30,
    ) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - start
        rest = first + b"".join(chunks)
        total = time.monotonic() - start
    assert first.startswith(b"data: ")
    assert rest.endswith(b"data: [DONE]\n\n")
    assert total > 1.5, "the mock's chunk delay did not apply"
    assert first_at < total / 3, f"first byte after {first_at:.2f}s of {total:.2f}s: buffered"


def test_client_disconnect_cancels_the_upstream_stream(gateway, mock):
    before = mock.stats()["streams_cancelled"]
    with httpx.stream(
        "POST",
        gateway.url + "/openai/chat/completions",
        headers={"x-mock-chunk-delay-ms": "200"},
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b c d e f g h i j"}]},
        timeout=30,
    ) as r:
        next(r.iter_raw())
    # Closed after the first chunk: the upstream stream must be dropped too.
    deadline = time.monotonic() + 5
    while mock.stats()["streams_cancelled"] == before:
        assert time.monotonic() < deadline, "upstream stream still running after the client left"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while 'outcome="cancelled"' not in gateway.logs() and "outcome=cancelled" not in gateway.logs():
        assert time.monotonic() < deadline, "sidegate did not log the cancelled response"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while 'sidegate_responses_cancelled_total{provider="openai"} 1' not in gateway.metrics():
        assert time.monotonic() < deadline, "the cancelled response was not counted"
        time.sleep(0.05)


def test_request_timeout_header_gives_504_in_the_envelope(gateway, mock):
    r = httpx.post(
        gateway.url + "/openai/chat/completions",
        headers={"cf-aig-request-timeout": "200", "x-mock-delay-ms": "3000"},
        json={"model": "m", "messages": [{"role": "user", "content": "slow"}]},
        timeout=10,
    )
    assert r.status_code == 504
    assert r.json()["error"][0]["code"] == 2103


def test_groq_sdk_paths_under_the_groq_route_reach_groqs_openai_base(gateway, mock):
    # The groq SDK appends /openai/v1/chat/completions to its base URL (.../groq).
    c = openai.OpenAI(base_url=gateway.url + "/groq/openai/v1", api_key="gsk-client-own", max_retries=0)
    c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "g"}])
    assert mock.last()["path"] == "/openai/v1/chat/completions"
