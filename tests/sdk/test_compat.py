"""The official openai SDK against /compat: one OpenAI API translated to Anthropic, Gemini
(AI Studio and Vertex), Bedrock (SigV4, event stream) and OpenAI-compatible mock upstreams."""

import json
import re
import subprocess
import time

import httpx
import openai
import pytest

from conftest import (ANTHROPIC_KEY, DEFAULT_KEYS, KEY_MARKER, OPENAI_KEY, FixedAnswerServer, Sidegate, StallingServer,
                      free_port, gateway_yaml)

GOOGLE_KEY = f"AIza-{KEY_MARKER}-google"
VERTEX_TOKEN = f"ya29.{KEY_MARKER}-vertex"
AWS_SECRET = f"{KEY_MARKER}-aws-secret"
AWS_SESSION = f"{KEY_MARKER}-aws-session"
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def compat_yaml(mock_url):
    extra = (
        f"    google-ai-studio: {{baseURL: '{mock_url}'}}\n"
        f"    google-vertex-ai: {{baseURL: '{mock_url}'}}\n"
        f"    aws-bedrock: {{baseURL: '{mock_url}'}}\n"
    )
    return gateway_yaml(mock_url, extra_spec=extra)


COMPAT_KEYS = dict(
    DEFAULT_KEYS,
    **{
        "google-ai-studio.default": GOOGLE_KEY,
        "google-vertex-ai.default": VERTEX_TOKEN,
        "aws-bedrock.default": json.dumps(
            {"accessKeyId": "AKIDMOCK", "secretAccessKey": AWS_SECRET, "sessionToken": AWS_SESSION, "region": "eu-west-1"}
        ),
    },
)


@pytest.fixture
def gw(mock, tmp_path):
    g = Sidegate(tmp_path, compat_yaml(mock.url), COMPAT_KEYS)
    mock.clear()
    yield g
    g.stop()


def client(gateway, path="/compat", **kw):
    return openai.OpenAI(base_url=gateway.url + path, api_key="placeholder-from-app", max_retries=0, **kw)


def ask(c, model, text="hello there", **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def stream_text(stream):
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def streamed_tool_calls(chunks):
    calls = {}
    for ch in chunks:
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
    return [calls[i] for i in sorted(calls)]


def finish_reasons(chunks):
    return [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]


# --- Anthropic ---------------------------------------------------------------------------


def test_anthropic_plain_completion_with_system_prompt_and_stored_key(gw, mock):
    out = client(gw).chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello claude"}],
        stop=["END"],
        temperature=0.3,
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.content == "mock reply to: hello claude"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen["headers"], "the app's placeholder key never goes upstream"
    body = json.loads(seen["body"])
    assert body["model"] == "claude-sonnet-4-5"
    assert body["system"] == "be brief"
    assert body["max_tokens"] == 4096
    assert body["stop_sequences"] == ["END"]
    assert body["temperature"] == 0.3


def test_anthropic_stream_translates_events_to_chunks_with_usage_last(gw, mock):
    stream = ask(client(gw), "anthropic/claude-sonnet-4-5", "stream a few words", stream=True,
                 stream_options={"include_usage": True})
    text, chunks = stream_text(stream)
    assert text == "mock reply to: stream a few words"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert json.loads(mock.last()["body"])["stream"] is True


def test_anthropic_tool_call_round_trip(gw, mock):
    c = client(gw)
    first = c.chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"text": "weather in Paris?"}
    body = json.loads(mock.last()["body"])
    assert body["tools"][0]["input_schema"] == WEATHER_TOOL["function"]["parameters"]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}

    second = c.chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "21C and sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert second.choices[0].message.content == "mock reply to tool result: 21C and sunny"
    sent = json.loads(mock.last()["body"])["messages"]
    assert sent[1]["content"][0] == {"type": "tool_use", "id": call.id, "name": "get_weather",
                                     "input": {"text": "weather in Paris?"}}
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "21C and sunny"}


def test_anthropic_streamed_tool_call_arguments_arrive_as_json_deltas(gw):
    stream = client(gw).chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=[{"role": "user", "content": "weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    chunks = list(stream)
    calls = streamed_tool_calls(chunks)
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"text": "weather in Oslo?"}
    assert finish_reasons(chunks) == ["tool_calls"]


NOW_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "google-ai-studio/gemini-2.5-flash",
                                   f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"])
def test_a_tool_call_without_input_carries_empty_object_arguments_streamed_or_not(gw, model):
    # Anthropic streams an empty partial_json for a tool without input, Bedrock no input delta
    # and Gemini no args (the mock does the same): the finished call still has valid JSON.
    c = client(gw)
    streamed = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "what time?"}],
                                              tools=[NOW_TOOL], stream=True))
    calls = streamed_tool_calls(streamed)
    assert [(call["name"], call["arguments"]) for call in calls] == [("get_time", "{}")], streamed
    assert finish_reasons(streamed) == ["tool_calls"]
    plain = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "what time?"}],
                                      tools=[NOW_TOOL])
    assert plain.choices[0].message.tool_calls[0].function.arguments == "{}"


def test_anthropic_response_format_json_schema_comes_back_as_json_content(gw, mock):
    out = ask(client(gw), "anthropic/claude-sonnet-4-5", "who are you",
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object"}}})
    assert json.loads(out.choices[0].message.content) == {"text": "who are you"}
    assert out.choices[0].finish_reason == "stop"
    assert json.loads(mock.last()["body"])["tool_choice"]["name"] == "json_response"


THINKING = {"thinking": {"type": "enabled", "budget_tokens": 2048}}


def streamed_assistant_message(chunks):
    """The assistant message a client rebuilds from a stream, as LiteLLM clients do: its tool
    calls, its reasoning_content and its thinking_blocks (each one whole, in a delta of its own)."""
    deltas = [c.delta.model_dump() for ch in chunks for c in ch.choices]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    blocks = [b for d in deltas for b in d.get("thinking_blocks") or []]
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for c in streamed_tool_calls(chunks)]
    return {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": reasoning,
            "thinking_blocks": blocks}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_thinking_tool_loop_sends_the_signed_thinking_back(gw, mock, stream):
    c = client(gw)
    question = [{"role": "user", "content": "weather in Paris?"}]
    first = c.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=question, tools=[WEATHER_TOOL],
                                      stream=stream, extra_body=THINKING)
    if stream:
        chunks = list(first)
        assert finish_reasons(chunks) == ["tool_calls"]
        assistant = streamed_assistant_message(chunks)
    else:
        assert first.choices[0].finish_reason == "tool_calls"
        assistant = first.choices[0].message.model_dump(exclude_none=True)
    assert assistant["reasoning_content"] == "mock thinking about: weather in Paris?"
    [block] = assistant["thinking_blocks"]
    assert block["type"] == "thinking" and block["thinking"] == assistant["reasoning_content"] and block["signature"]
    [call] = assistant["tool_calls"]
    assert json.loads(mock.last()["body"])["thinking"] == THINKING["thinking"]

    second = c.chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=question + [assistant, {"role": "tool", "tool_call_id": call["id"], "content": "21C and sunny"}],
        tools=[WEATHER_TOOL], stream=stream, extra_body=THINKING)
    text = stream_text(second)[0] if stream else second.choices[0].message.content
    assert text == "mock reply to tool result: 21C and sunny"
    sent = json.loads(mock.last()["body"])["messages"][1]["content"]
    # A streamed block carries its `index` among the message's blocks (for clients that merge
    # deltas by it); Anthropic gets the block itself, unchanged.
    assert sent[0] == {k: v for k, v in block.items() if k != "index"}, \
        "the thinking block goes back first and unchanged"
    assert block.get("index", 0) == 0
    assert sent[1]["type"] == "tool_use" and sent[1]["id"] == call["id"]


def test_anthropic_refuses_a_thinking_tool_turn_sent_back_without_its_thinking(gw):
    c = client(gw)
    question = [{"role": "user", "content": "weather in Paris?"}]
    first = c.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=question, tools=[WEATHER_TOOL],
                                      extra_body=THINKING)
    message = first.choices[0].message
    assistant = {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in message.tool_calls]}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="anthropic/claude-sonnet-4-5",
            messages=question + [assistant, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "x"}],
            tools=[WEATHER_TOOL], extra_body=THINKING)
    assert "Expected `thinking` or `redacted_thinking`, but found `tool_use`" in err.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_response_format_json_with_thinking_is_asked_through_an_unforced_tool(gw, mock, stream):
    out = ask(client(gw), "anthropic/claude-sonnet-4-5", "who are you", stream=stream, extra_body=THINKING,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object"}}})
    if stream:
        content, chunks = stream_text(out)
        assert finish_reasons(chunks) == ["stop"]
        assert streamed_assistant_message(chunks)["reasoning_content"] == "mock thinking about: who are you"
    else:
        content = out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].message.reasoning_content == "mock thinking about: who are you"
    assert json.loads(content) == {"text": "who are you"}
    body = json.loads(mock.last()["body"])
    assert body["tool_choice"] == {"type": "auto"}, "Anthropic refuses a forced tool while thinking"
    assert body["tools"][0]["name"] == "json_response"


def test_openai_hints_stay_home_and_anthropic_gets_its_own_ranges(gw, mock):
    out = ask(client(gw), "anthropic/claude-haiku-4-5", "hinted", temperature=1.5, safety_identifier="user-42",
              metadata={"team": "a"}, service_tier="auto", prompt_cache_key="k1")
    assert out.choices[0].message.content == "mock reply to: hinted"
    sent = json.loads(mock.last()["body"])
    assert sent["temperature"] == 1.0
    assert sent["metadata"] == {"user_id": "user-42"}
    for field in ["service_tier", "prompt_cache_key", "safety_identifier"]:
        assert field not in sent, sent
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw), "anthropic/claude-haiku-4-5", functions=[{"name": "f", "parameters": {"type": "object"}}])
    error = e.value.response.json()["error"][0]
    assert error["code"] == 2107 and "functions" in error["message"], error


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "google-ai-studio/gemini-2.5-flash",
                                   f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"])
def test_parallel_tool_calls_false_without_tools_means_nothing_and_is_accepted(gw, mock, model):
    # SDK wrappers often send it on every request; with no tools there is nothing to keep apart.
    out = ask(client(gw), model, "one at a time", parallel_tool_calls=False)
    assert out.choices[0].message.content == "mock reply to: one at a time"
    assert "parallel" not in mock.last()["body"]
    as_json = ask(client(gw), model, "json please", parallel_tool_calls=False,
                  response_format={"type": "json_object"})
    assert json.loads(as_json.choices[0].message.content)


def test_anthropic_errors_are_mapped_to_the_openai_error_shape(gw):
    with pytest.raises(openai.RateLimitError) as e:
        ask(client(gw), "anthropic/mock-status-429")
    body = e.value.response.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert "mock error: status 429" in body["error"]["message"]


def test_images_as_data_urls_and_links_reach_anthropic_as_image_blocks(gw, mock):
    client(gw).chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]}],
    )
    blocks = json.loads(mock.last()["body"])["messages"][0]["content"]
    assert blocks[1]["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    assert blocks[2]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}


# --- Google Gemini ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["google-ai-studio/gemini-2.5-flash",
                                   f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"])
def test_end_user_ids_are_left_out_for_providers_without_one(gw, mock, model):
    # OpenAI SDK users often set `user`; Gemini and Bedrock have no end-user id, and it changes
    # no answer: it is left out like OpenAI's other bookkeeping, not refused.
    for ids in ({"user": "u-1"}, {"safety_identifier": "u-2"}):
        out = ask(client(gw), model, "who asks", **ids)
        assert out.choices[0].message.content == "mock reply to: who asks"
        sent = mock.last()["body"]
        assert "u-1" not in sent and "u-2" not in sent, sent


def test_gemini_plain_completion_uses_generate_content_and_the_google_key(gw, mock):
    out = client(gw).chat.completions.create(
        model="google-ai-studio/gemini-2.5-flash",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello gemini"}],
        max_tokens=100,
    )
    assert out.choices[0].message.content == "mock reply to: hello gemini"
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
    body = json.loads(seen["body"])
    assert body["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hello gemini"}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 100}


def test_gemini_stream_uses_alt_sse_and_ends_with_usage(gw, mock):
    text, chunks = stream_text(ask(client(gw), "google-ai-studio/gemini-2.5-flash", "stream from gemini",
                                   stream=True, stream_options={"include_usage": True}))
    assert text == "mock reply to: stream from gemini"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 3
    seen = mock.last()
    assert seen["path"].endswith(":streamGenerateContent") and seen["query"] == "alt=sse"


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-pro-preview"])
def test_gemini_function_calls_become_tool_calls_and_results_function_responses(gw, mock, model):
    # Gemini 3 signs its function calls and refuses them back unsigned (the mock does too).
    c = client(gw)
    first = c.chat.completions.create(model=f"google-ai-studio/{model}",
                                      messages=[{"role": "user", "content": "weather in Rome?"}],
                                      tools=[WEATHER_TOOL], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and call.id
    body = json.loads(mock.last()["body"])
    assert body["tools"] == [{"functionDeclarations": [{"name": "get_weather", "description": "Current weather of a city",
                                                        "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    second = c.chat.completions.create(
        model=f"google-ai-studio/{model}",
        messages=[{"role": "user", "content": "weather in Rome?"},
                  first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 25}'}],
        tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == 'mock reply to tool result: {"temp":25}'
    contents = json.loads(mock.last()["body"])["contents"]
    assert contents[2] == {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 25}}}]}
    signed = "thoughtSignature" in contents[1]["parts"][0]
    assert signed == model.startswith("gemini-3"), contents[1]


@pytest.mark.parametrize("target", ["anthropic/claude-sonnet-4-5", f"aws-bedrock/us-east-1/{BEDROCK_MODEL}",
                                    "openai/gpt-4o-mini"])
def test_gemini_signed_tool_call_ids_are_made_valid_for_the_next_provider(gw, mock, target):
    # A conversation started on Gemini 3 (tool call ids carry thought signatures) and moved to
    # another provider: ids there are [A-Za-z0-9_-] (Anthropic, Bedrock) and at most 40 long
    # (OpenAI), and a call still matches its result.
    c = client(gw)
    first = c.chat.completions.create(model="google-ai-studio/gemini-3-pro-preview",
                                      messages=[{"role": "user", "content": "weather in Rome?"}],
                                      tools=[WEATHER_TOOL], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    assert "~ts~" in call.id
    out = c.chat.completions.create(model=target, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather in Rome?"},
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "25C"}])
    if not target.startswith("openai/"):  # the OpenAI mock does not read tool results
        assert "25C" in out.choices[0].message.content
    sent = mock.last()["body"]
    assert "~ts~" not in sent
    ids = re.findall(r'"(?:id|tool_use_id|toolUseId|tool_call_id)":"([^"]*)"', sent)
    assert len(ids) >= 2 and len(set(ids)) == 1, ids
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", ids[0]), ids


def test_gemini_safety_blocked_prompt_is_a_content_filter_refusal(gw):
    out = ask(client(gw), "google-ai-studio/gemini-2.5-flash", "mock-blocked please")
    assert out.choices[0].finish_reason == "content_filter"
    assert out.choices[0].message.content is None
    assert "blockReason SAFETY" in out.choices[0].message.refusal
    _, chunks = stream_text(ask(client(gw), "google-ai-studio/gemini-2.5-flash", "mock-blocked", stream=True))
    assert finish_reasons(chunks) == ["content_filter"]


def test_gemini_errors_are_mapped_to_the_openai_error_shape(gw):
    with pytest.raises(openai.RateLimitError) as e:
        ask(client(gw), "google-ai-studio/mock-status-429")
    assert e.value.response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"


def test_gemini_embeddings_as_floats_and_base64(gw, mock):
    c = client(gw)
    out = c.embeddings.create(model="google-ai-studio/text-embedding-004", input=["one", "two"], encoding_format="float")
    assert [d.index for d in out.data] == [0, 1]
    assert len(out.data[0].embedding) == 8
    assert mock.last()["path"] == "/v1beta/models/text-embedding-004:batchEmbedContents"
    default = c.embeddings.create(model="google-ai-studio/text-embedding-004", input="one")  # SDK asks for base64
    assert default.data[0].embedding == pytest.approx(out.data[0].embedding, rel=1e-6)


def test_vertex_uses_the_project_region_path_and_a_bearer_token(gw, mock):
    out = ask(client(gw), "google-vertex-ai/my-proj/us-central1/gemini-2.5-flash", "hello vertex")
    assert out.choices[0].message.content == "mock reply to: hello vertex"
    seen = mock.last()
    assert seen["path"] == "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
    assert seen["headers"]["authorization"] == f"Bearer {VERTEX_TOKEN}"
    emb = client(gw).embeddings.create(model="google-vertex-ai/my-proj/us-central1/text-embedding-005", input="x")
    assert len(emb.data[0].embedding) == 8 and emb.usage.prompt_tokens == 1
    assert mock.last()["path"].endswith("text-embedding-005:predict")
    # gemini-embedding-001 on Vertex takes one text per request (the mock refuses a list, as
    # Vertex does): a list is sent one text per request and the answers joined in order.
    model = "google-vertex-ai/my-proj/us-central1/gemini-embedding-001"
    one = client(gw).embeddings.create(model=model, input="x", encoding_format="float")
    mock.clear()
    texts = [f"text number {i}" for i in range(11)]
    many = client(gw).embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == list(range(11))
    singles = [client(gw).embeddings.create(model=model, input=t, encoding_format="float") for t in texts]
    assert [d.embedding for d in many.data] == [s.data[0].embedding for s in singles]
    assert many.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles) == 33
    assert len(one.data) == 1
    sent = [json.loads(r["body"])["instances"] for r in mock.requests()[:11]]
    assert sorted(i[0]["content"] for i in sent) == sorted(texts) and all(len(i) == 1 for i in sent)
    # A failing part fails the whole request with that part's error.
    mock.clear()
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).embeddings.create(model=model, input=["a"] * 300)
    assert "at most 256 texts" in e.value.response.json()["error"][0]["message"]
    assert mock.requests() == []


VERTEX_PATH = "/google-vertex-ai/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"


def service_account(token_uri, email=f"{KEY_MARKER}-sa@my-proj.iam.gserviceaccount.com"):
    """A Google service-account key file (a fresh RSA key) whose tokens come from `token_uri`.
    The default email carries the key marker, so a token minted for it (`ya29.mock-<email>`)
    that reached a log would fail the log scan."""
    pem = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                         capture_output=True, text=True, check=True).stdout
    return {"type": "service_account", "project_id": "my-proj", "private_key_id": "k1", "private_key": pem,
            "client_email": email, "token_uri": token_uri}


def vertex_gateway(mock, tmp_path, token_uri, **kw):
    """A gateway whose google-vertex-ai key is a service account getting its tokens from `token_uri`."""
    sa = service_account(token_uri, **kw)
    keys = dict(COMPAT_KEYS, **{"google-vertex-ai.default": json.dumps(sa)})
    return Sidegate(tmp_path, compat_yaml(mock.url), keys), sa


def generate(g, **kw):
    """A Vertex generateContent request through the gateway's passthrough route."""
    return httpx.post(g.url + VERTEX_PATH, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, **kw)


def test_vertex_service_account_keys_are_exchanged_for_cached_tokens(mock, tmp_path):
    g, sa = vertex_gateway(mock, tmp_path, f"{mock.url}/token")
    pem = sa["private_key"]
    try:
        mock.clear()
        for _ in range(2):
            r = generate(g)
            assert r.status_code == 200, r.text
        out = ask(client(g), "google-vertex-ai/my-proj/us-central1/gemini-2.5-flash", "via compat")
        assert out.choices[0].message.content == "mock reply to: via compat"
        seen = mock.requests()
        tokens = [q for q in seen if q["path"] == "/token"]
        assert len(tokens) == 1, "one exchange, then the cached token"
        assert "jwt-bearer" in tokens[0]["body"]
        calls = [q for q in seen if q["path"] != "/token"]
        assert len(calls) == 3
        for q in calls:
            assert q["headers"]["authorization"] == f"Bearer ya29.mock-{sa['client_email']}"
        assert pem.splitlines()[1] not in g.logs()
    finally:
        g.stop()


def test_a_token_endpoint_that_stalls_fails_in_bounded_time(mock, tmp_path):
    stall = StallingServer()
    # The error names the account (no secret; the default email carries the log-scan marker).
    g, _ = vertex_gateway(mock, tmp_path, stall.url + "/token", email="stalled-sa@my-proj.iam.gserviceaccount.com")
    try:
        t0 = time.monotonic()
        r = generate(g, timeout=30)
        assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104)
        assert "no answer within 10s" in r.json()["error"][0]["message"]
        assert time.monotonic() - t0 < 20, "bounded by the token exchange timeout (10 s)"
    finally:
        g.stop()
        stall.stop()


def test_a_route_target_whose_token_cannot_be_minted_falls_back_to_the_next(mock, tmp_path):
    # Google's token endpoint refusing is that target failing: the chain moves on.
    # The failure names the account (no secret; the default email carries the log-scan marker).
    sa = service_account(f"http://127.0.0.1:{free_port()}/token", email="unminted-sa@my-proj.iam.gserviceaccount.com")
    keys = dict(COMPAT_KEYS, **{"google-vertex-ai.default": json.dumps(sa)})
    chain = ("  fallbacks:\n    - name: vertex-then-openai\n      targets:\n"
             "        - {provider: google-vertex-ai, model: my-proj/us-central1/gemini-2.5-flash}\n"
             "        - {provider: openai, model: gpt-4o-mini}\n")
    g = Sidegate(tmp_path, compat_yaml(mock.url) + chain, keys)
    try:
        out = ask(client(g), "fallback/vertex-then-openai", "either will do")
        assert out.choices[0].message.content == "mock reply to: either will do"
        assert mock.last()["path"] == "/v1/chat/completions"
        assert "route target failed, trying the next" in g.logs()
    finally:
        g.stop()


def test_an_apps_own_azure_key_goes_into_api_key(gw, mock):
    # No stored azure-openai key: the OpenAI SDK sends the app's key as a Bearer token, Azure
    # wants it in `api-key`.
    c = client(gw, default_query={"api-version": "2024-10-21"})
    c.api_key = "azure-app-key"
    out = ask(c, "azure-openai/my-resource/gpt4o-deploy", "hi azure")
    assert out.choices[0].message.content == "mock reply to: hi azure"
    seen = mock.last()
    assert seen["path"] == "/openai/deployments/gpt4o-deploy/chat/completions"
    assert seen["headers"]["api-key"] == "azure-app-key"
    assert "authorization" not in seen["headers"]


def test_a_custom_provider_in_anthropic_format_gets_the_api_version(mock, tmp_path):
    extra = f"    custom-claude: {{baseURL: '{mock.url}', format: anthropic, authHeader: x-api-key}}\n"
    keys = dict(COMPAT_KEYS, **{"custom-claude.default": f"{KEY_MARKER}-custom-claude"})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra), keys)
    try:
        mock.clear()
        out = ask(client(g), "custom-claude/claude-haiku-4-5", "via a custom provider")
        assert out.choices[0].message.content == "mock reply to: via a custom provider"
        seen = mock.last()["headers"]
        assert seen["anthropic-version"] == "2023-06-01" and seen["x-api-key"] == f"{KEY_MARKER}-custom-claude"
    finally:
        g.stop()


def test_an_answer_that_cannot_be_translated_is_a_502_in_the_gateway_envelope(tmp_path):
    srv = FixedAnswerServer(b"<html>captive portal</html>")
    g = Sidegate(tmp_path, compat_yaml(srv.url), COMPAT_KEYS)
    try:
        r = httpx.post(g.url + "/compat/chat/completions",
                       json={"model": "anthropic/claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 502, r.text
        err = r.json()["error"][0]
        assert r.json()["success"] is False and err["code"] == 2104
        assert "anthropic response could not be translated" in err["message"]
    finally:
        g.stop()
        srv.stop()


def test_a_stored_google_key_replaces_the_clients_key_parameter(gw, mock):
    # Google AI Studio also takes a key as ?key=: the client's goes when the stored key is used.
    body = {"contents": [{"role": "user", "parts": [{"text": "native"}]}]}
    r = httpx.post(gw.url + "/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent?key=placeholder&alt=json",
                   json=body)
    assert r.status_code == 200, r.text
    seen = mock.last()
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
    assert seen["query"] == "alt=json", seen


def test_a_translated_answer_that_stalls_ends_in_a_504_not_a_hang(tmp_path):
    # A JSON answer is translated whole: an upstream that sends its head and then nothing more
    # ends within the request timeout, as a gateway error.
    stall = StallingServer()
    g = Sidegate(tmp_path, compat_yaml(stall.url) + "  requestTimeout: 1500ms\n", COMPAT_KEYS)
    try:
        t0 = time.monotonic()
        r = httpx.post(g.url + "/compat/chat/completions", timeout=30,
                       json={"model": "anthropic/claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]})
        took = time.monotonic() - t0
        assert (r.status_code, r.json()["error"][0]["code"]) == (504, 2103), r.text
        assert "stalled: no data for 1500 ms" in r.json()["error"][0]["message"]
        assert 1.4 < took < 10, took
    finally:
        g.stop()
        stall.stop()


def test_a_failing_part_of_a_list_sent_one_text_per_request_is_the_answer(tmp_path):
    # The first text's request succeeds, a later one is refused: the client gets that refusal
    # (translated), not a list with a hole.
    ok = json.dumps({"predictions": [{"embeddings": {"values": [0.5] * 8, "statistics": {"token_count": 1}}}]}).encode()
    quota = json.dumps({"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}).encode()
    srv = FixedAnswerServer(ok, then=[(429, quota)])
    g = Sidegate(tmp_path, compat_yaml(srv.url), COMPAT_KEYS)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client(g).embeddings.create(model="google-vertex-ai/my-proj/us-central1/gemini-embedding-001",
                                        input=["a", "b", "c"])
        assert "Quota exceeded" in str(e.value)
    finally:
        g.stop()
        srv.stop()


def test_a_token_lifetime_too_large_for_the_clock_is_held_to_a_day(mock, tmp_path):
    server = FixedAnswerServer(json.dumps({"access_token": f"ya29.{KEY_MARKER}-forever", "expires_in": 2**64 - 1}).encode())
    g, _ = vertex_gateway(mock, tmp_path, f"{server.url}/token")
    try:
        mock.clear()
        for _ in range(2):
            r = generate(g)
            assert r.status_code == 200, r.text
        assert mock.last()["headers"]["authorization"] == f"Bearer ya29.{KEY_MARKER}-forever"
        assert g.proc.poll() is None, "the sidecar is still running"
    finally:
        g.stop()
        server.stop()


def test_universal_steps_get_minted_tokens_and_stored_aws_signatures(mock, tmp_path):
    g, sa = vertex_gateway(mock, tmp_path, f"{mock.url}/token")
    try:
        mock.clear()
        vertex = {"provider": "google-vertex-ai", "endpoint": VERTEX_PATH.removeprefix("/google-vertex-ai/"),
                  "query": {"contents": [{"role": "user", "parts": [{"text": "universal vertex"}]}]}}
        r = httpx.post(g.url + "/", json=[vertex])
        assert r.status_code == 200, r.text
        assert mock.last()["headers"]["authorization"] == f"Bearer ya29.mock-{sa['client_email']}"
        bedrock = {"provider": "aws-bedrock", "endpoint": f"bedrock-runtime/us-west-2/model/{BEDROCK_MODEL}/converse",
                   "headers": {"authorization": "AWS4-HMAC-SHA256 Credential=CLIENTKEY/x, SignedHeaders=host, Signature=00"},
                   "query": {"messages": [{"role": "user", "content": [{"text": "universal bedrock"}]}]}}
        r = httpx.post(g.url + "/", json=[bedrock])
        assert r.status_code == 200, r.text
        assert r.json()["output"]["message"]["content"][0]["text"] == "mock reply to: universal bedrock"
        seen = mock.last()["headers"]
        assert seen["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK/")
        assert "/us-west-2/bedrock/aws4_request" in seen["authorization"]
        assert seen["x-amz-security-token"] == AWS_SESSION
    finally:
        g.stop()


# --- AWS Bedrock --------------------------------------------------------------------------


def test_bedrock_converse_is_signed_with_sigv4_by_the_gateway(gw, mock):
    out = ask(client(gw), f"aws-bedrock/us-east-1/{BEDROCK_MODEL}", "hello bedrock", max_tokens=50)
    assert out.choices[0].message.content == "mock reply to: hello bedrock"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    auth = seen["headers"]["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK/") and "/us-east-1/bedrock/aws4_request" in auth
    assert seen["headers"]["x-amz-security-token"] == AWS_SESSION
    assert seen["headers"]["x-amz-date"]
    assert json.loads(seen["body"])["inferenceConfig"] == {"maxTokens": 50}


def test_bedrock_passthrough_is_signed_by_the_gateway_with_the_stored_credentials(gw, mock):
    body = {"messages": [{"role": "user", "content": [{"text": "raw converse"}]}]}
    client_sig = {"authorization": "AWS4-HMAC-SHA256 Credential=CLIENTKEY/20260101/us-west-2/bedrock/aws4_request, SignedHeaders=host, Signature=00",
                  "x-amz-date": "20260101T000000Z"}
    r = httpx.post(gw.url + f"/aws-bedrock/bedrock-runtime/us-west-2/model/{BEDROCK_MODEL}/converse", json=body, headers=client_sig)
    assert r.status_code == 200, r.text
    assert r.json()["output"]["message"]["content"][0]["text"] == "mock reply to: raw converse"
    seen = mock.last()["headers"]
    assert seen["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK/")
    assert "/us-west-2/bedrock/aws4_request" in seen["authorization"]
    assert seen["x-amz-date"] != "20260101T000000Z" and seen["x-amz-security-token"] == AWS_SESSION


def test_bedrock_passthrough_signs_with_the_credentials_of_the_alias(mock, tmp_path):
    team_b = {"accessKeyId": "AKIDTEAMB", "secretAccessKey": f"{KEY_MARKER}-team-b", "region": "us-east-1"}
    g = Sidegate(tmp_path, compat_yaml(mock.url), dict(COMPAT_KEYS, **{"aws-bedrock.team-b": json.dumps(team_b)}))
    try:
        url = g.url + f"/aws-bedrock/bedrock-runtime/us-east-1/model/{BEDROCK_MODEL}/converse"
        body = {"messages": [{"role": "user", "content": [{"text": "x"}]}]}
        for alias, key_id in (("team-b", "AKIDTEAMB"), ("default", "AKIDMOCK")):
            mock.clear()
            r = httpx.post(url, json=body, headers={"cf-aig-byok-alias": alias})
            assert r.status_code == 200, (alias, r.text)
            assert mock.last()["headers"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={key_id}/")
    finally:
        g.stop()


def test_bedrock_passthrough_without_stored_credentials_keeps_the_clients_signature(mock, tmp_path):
    keys = {k: v for k, v in COMPAT_KEYS.items() if not k.startswith("aws-bedrock")}
    g = Sidegate(tmp_path, compat_yaml(mock.url), keys)
    try:
        mock.clear()
        client_sig = {"authorization": "AWS4-HMAC-SHA256 Credential=CLIENTKEY/20260101/us-west-2/bedrock/aws4_request, SignedHeaders=host, Signature=00"}
        httpx.post(g.url + f"/aws-bedrock/bedrock-runtime/us-west-2/model/{BEDROCK_MODEL}/converse",
                   json={"messages": [{"role": "user", "content": [{"text": "x"}]}]}, headers=client_sig)
        assert mock.last()["headers"]["authorization"] == client_sig["authorization"]
        r = httpx.post(g.url + f"/aws-bedrock/bedrock-runtime/us-west-2/model/{BEDROCK_MODEL}/converse",
                       json={}, headers={"cf-aig-byok-alias": "nope"})
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2040)
    finally:
        g.stop()


def test_bedrock_region_defaults_to_the_key_file(gw, mock):
    ask(client(gw), f"aws-bedrock/{BEDROCK_MODEL}")
    assert "/eu-west-1/bedrock/aws4_request" in mock.last()["headers"]["authorization"]


def test_bedrock_converse_stream_event_frames_become_chunks(gw, mock):
    text, chunks = stream_text(ask(client(gw), f"aws-bedrock/us-east-1/{BEDROCK_MODEL}", "stream from bedrock",
                                   stream=True, stream_options={"include_usage": True}))
    assert text == "mock reply to: stream from bedrock"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 3
    assert mock.last()["path"].endswith("/converse-stream")


def test_bedrock_streamed_tool_use(gw, mock):
    chunks = list(client(gw).chat.completions.create(
        model=f"aws-bedrock/us-east-1/{BEDROCK_MODEL}", messages=[{"role": "user", "content": "weather in Lima?"}],
        tools=[WEATHER_TOOL], stream=True))
    calls = streamed_tool_calls(chunks)
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"text": "weather in Lima?"}
    assert finish_reasons(chunks) == ["tool_calls"]
    tool_config = json.loads(mock.last()["body"])["toolConfig"]
    assert tool_config["tools"][0]["toolSpec"]["inputSchema"] == {"json": WEATHER_TOOL["function"]["parameters"]}


def test_bedrock_conversation_with_tool_calls_but_no_tools_declares_the_called_tools(gw, mock):
    # Bedrock refuses toolUse/toolResult blocks without a toolConfig (the mock too); an agent's
    # last turn often sends the history without tools, asking for text.
    c = client(gw)
    model = f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"
    first = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "weather in Lima?"}],
                                      tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    second = c.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "weather in Lima?"},
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C"},
    ])
    assert second.choices[0].message.content == "mock reply to tool result: 18C"
    tools = json.loads(mock.last()["body"])["toolConfig"]["tools"]
    assert [t["toolSpec"]["name"] for t in tools] == ["get_weather"]


def test_bedrock_errors_are_mapped_to_the_openai_error_shape(gw):
    with pytest.raises(openai.RateLimitError) as e:
        ask(client(gw), "aws-bedrock/us-east-1/mock-status-429")
    err = e.value.response.json()["error"]
    assert err["code"] == "ThrottlingException" and "status 429" in err["message"]


def test_bedrock_embeddings_titan_and_cohere(gw, mock):
    c = client(gw)
    titan = c.embeddings.create(model="aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0", input="hello", dimensions=8)
    assert len(titan.data[0].embedding) == 8 and titan.usage.prompt_tokens == 1
    assert json.loads(mock.last()["body"]) == {"inputText": "hello", "dimensions": 8}
    cohere = c.embeddings.create(model="aws-bedrock/us-east-1/cohere.embed-english-v3", input=["a", "b"])
    assert len(cohere.data) == 2
    assert mock.last()["path"] == "/model/cohere.embed-english-v3/invoke"
    # Titan takes one text per request: a list goes one text per signed request, joined in order.
    mock.clear()
    many = c.embeddings.create(model="aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0", input=["one two", "three"],
                               encoding_format="float")
    assert [d.index for d in many.data] == [0, 1] and many.usage.prompt_tokens == 3
    bodies = sorted(json.loads(r["body"])["inputText"] for r in mock.requests())
    assert bodies == ["one two", "three"]
    assert all(r["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 ") for r in mock.requests())
    # An empty list is refused by the gateway, never sent as an empty body.
    mock.clear()
    r = httpx.post(gw.url + "/compat/embeddings", json={"model": "aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0", "input": []})
    assert r.status_code == 400 and "one input per request" in r.text, r.text
    assert mock.requests() == []


# --- OpenAI-compatible providers ---------------------------------------------------------


def test_openai_compatible_providers_get_the_model_rewritten_and_the_response_unchanged(gw, mock):
    out = ask(client(gw), "openai/gpt-4o-mini", "hello openai")
    assert out.id.startswith("chatcmpl-mock-")
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini"
    text, _ = stream_text(ask(client(gw), "groq/llama-3.3-70b", "groq stream", stream=True))
    assert text == "mock reply to: groq stream"
    assert mock.last()["path"] == "/openai/v1/chat/completions"
    emb = client(gw).embeddings.create(model="openai/text-embedding-3-small", input="x")
    assert len(emb.data[0].embedding) == 8


# --- Gateway errors -------------------------------------------------------------------------


@pytest.mark.parametrize("model, needle", [
    ("gpt-4o", "{provider}/{model}"),
    ("nosuch/model-x", "unknown provider"),
    ("dynamic/support", 'no dynamic route named "support"'),
])
def test_bad_model_strings_are_400_in_the_spec_envelope(gw, mock, model, needle):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw), model)
    body = e.value.response.json()
    assert body["success"] is False and body["error"][0]["code"] == 2107
    assert needle in body["error"][0]["message"]
    assert mock.requests() == []


def test_fields_a_provider_cannot_express_are_400_naming_the_field(gw, mock):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw), "anthropic/claude-sonnet-4-5", presence_penalty=0.5)
    assert "presence_penalty" in e.value.response.json()["error"][0]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw), "anthropic/claude-sonnet-4-5", n=2)
    assert "field n " in e.value.response.json()["error"][0]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).embeddings.create(model="anthropic/claude-sonnet-4-5", input="x")
    assert "has no embeddings" in e.value.response.json()["error"][0]["message"]
    assert mock.requests() == []


def test_unknown_fields_are_kept_where_the_provider_accepts_them(gw, mock):
    ask(client(gw), "anthropic/claude-sonnet-4-5", extra_body={"top_k": 4})
    assert json.loads(mock.last()["body"])["top_k"] == 4
    ask(client(gw), "google-ai-studio/gemini-2.5-flash",
        extra_body={"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]})
    assert json.loads(mock.last()["body"])["safetySettings"][0]["threshold"] == "BLOCK_NONE"


def test_long_form_and_byok_alias(gw, mock):
    out = ask(client(gw, path="/v1/acct-1/main/compat"), "anthropic/claude-sonnet-4-5", "long form")
    assert out.choices[0].message.content == "mock reply to: long form"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw, default_headers={"cf-aig-byok-alias": "nope"}), f"aws-bedrock/{BEDROCK_MODEL}")
    assert e.value.response.json()["error"][0]["code"] == 2040


def test_without_a_stored_key_the_apps_own_key_goes_in_the_providers_header(mock, tmp_path):
    g = Sidegate(tmp_path, compat_yaml(mock.url), {})
    try:
        c = openai.OpenAI(base_url=g.url + "/compat", api_key=f"{KEY_MARKER}-apps-own", max_retries=0)
        ask(c, "google-ai-studio/gemini-2.5-flash")
        assert mock.last()["headers"]["x-goog-api-key"] == f"{KEY_MARKER}-apps-own"
        ask(c, "anthropic/claude-sonnet-4-5")
        assert mock.last()["headers"]["x-api-key"] == f"{KEY_MARKER}-apps-own"
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, f"aws-bedrock/{BEDROCK_MODEL}")
        assert "aws-bedrock.default" in e.value.response.json()["error"][0]["message"]
    finally:
        g.stop()


def test_passthrough_routes_are_unchanged_by_compat(gw, mock):
    r = httpx.post(gw.url + "/anthropic/v1/messages",
                   json={"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "raw"}]})
    assert r.json()["type"] == "message"


def test_no_key_reaches_the_gateway_log(gw):
    ask(client(gw), f"aws-bedrock/us-east-1/{BEDROCK_MODEL}")
    ask(client(gw), "google-ai-studio/gemini-2.5-flash")
    assert KEY_MARKER not in gw.logs()
