"""/compat with the histories, media and options real agents send, through the official openai
SDK: each provider's mock refuses what the provider refuses (blank text blocks, unsigned Gemini 3
calls, odd image types, fields it does not know), so every test here is a request the real API
would answer."""

import json

import httpx
import openai
import pytest

from conftest import Sidegate, gateway_yaml
from test_compat import BEDROCK_MODEL, COMPAT_KEYS, WEATHER_TOOL, ask, client, compat_yaml, stream_text

CLAUDE = "anthropic/claude-sonnet-4-5"
GEMINI = "google-ai-studio/gemini-2.5-flash"
GEMINI_3 = "google-ai-studio/gemini-3-pro-preview"
BEDROCK = f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"
PROVIDERS = [CLAUDE, GEMINI, BEDROCK]

# A chain whose first target fails: the conversation it started on Claude goes on on Gemini 3.
FALLBACK = """\
  fallbacks:
    - name: claude-then-gemini-3
      targets:
        - {provider: anthropic, model: mock-status-503}
        - {provider: google-ai-studio, model: gemini-3-pro-preview}
"""

PNG = "iVBORw0KGgo="
JPEG = "/9j/4AAQSkZJRg=="


@pytest.fixture
def gw(mock, tmp_path):
    g = Sidegate(tmp_path, compat_yaml(mock.url) + FALLBACK, COMPAT_KEYS)
    mock.clear()
    yield g
    g.stop()


def sent(mock):
    return json.loads(mock.last()["body"])


def tool_call(call_id, arguments='{"city": "Oslo"}'):
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def first_call(c, model):
    """The first turn of a tool loop on `model`: the assistant message as the SDK gives it."""
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "weather in Oslo?"}],
                                    tools=[WEATHER_TOOL], tool_choice="required")
    assert out.choices[0].finish_reason == "tool_calls"
    return out.choices[0].message.model_dump(exclude_none=True)


# --- blank text ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", PROVIDERS)
def test_blank_text_sent_back_is_left_out_and_the_loop_goes_on(gw, mock, model):
    # Claude answers "\n\n" before a tool call, clients send it back as content, tools return ""
    # and UIs send empty system prompts: Anthropic, Bedrock and Google refuse blank text blocks.
    c = client(gw)
    assistant = first_call(c, model)
    assistant["content"] = "\n\n"
    call_id = assistant["tool_calls"][0]["id"]
    out = c.chat.completions.create(model=model, tools=[WEATHER_TOOL], messages=[
        {"role": "system", "content": ""},
        {"role": "user", "content": "weather in Oslo?"},
        assistant,
        {"role": "tool", "tool_call_id": call_id, "content": ""},
        {"role": "assistant", "content": " "},
        {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "and now?"}]},
    ])
    assert out.choices[0].message.content.startswith("mock reply to")
    body = mock.last()["body"]
    assert '"\\n\\n"' not in body and '"text":""' not in body and '"text":" "' not in body, body


def test_an_empty_tool_result_reaches_anthropic_without_content_and_bedrock_as_empty_json(gw, mock):
    c = client(gw)
    for model in (CLAUDE, BEDROCK):
        assistant = first_call(c, model)
        call_id = assistant["tool_calls"][0]["id"]
        c.chat.completions.create(model=model, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "weather in Oslo?"}, assistant,
            {"role": "tool", "tool_call_id": call_id, "content": ""}])
        result = sent(mock)["messages"][2]["content"][0]
        if model == CLAUDE:
            assert result == {"type": "tool_result", "tool_use_id": call_id}
        else:
            assert result == {"toolResult": {"toolUseId": call_id, "content": [{"json": {}}]}}


def test_the_mocks_refuse_blank_text_in_the_providers_words(gw, mock):
    # What the fix above avoids, asked of the providers directly (passthrough sends it as is).
    r = httpx.post(gw.url + "/anthropic/v1/messages", json={"model": "claude-x", "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "\n\n"}]},
        {"role": "user", "content": "go on"}]})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "messages: text content blocks must contain non-whitespace text"
    r = httpx.post(gw.url + f"/aws-bedrock/bedrock-runtime/us-east-1/model/{BEDROCK_MODEL}/converse",
                   json={"messages": [{"role": "user", "content": [{"text": ""}]}]})
    assert r.status_code == 400 and r.headers["x-amzn-errortype"].startswith("ValidationException")
    assert "The text field in the ContentBlock object at messages.0.content.0 is blank" in r.json()["message"]


# --- Gemini 3 thought signatures -------------------------------------------------------------


def test_a_conversation_claude_started_goes_on_on_gemini_3_with_the_documented_signature(gw, mock):
    # Gemini 3 refuses a model turn whose first function call has no thought signature; Claude's
    # calls have none. The chain falls back from Claude to Gemini 3 mid-conversation.
    c = client(gw)
    assistant = first_call(c, CLAUDE)
    call_id = assistant["tool_calls"][0]["id"]
    messages = [{"role": "user", "content": "weather in Oslo and Rome?"},
                dict(assistant, tool_calls=[assistant["tool_calls"][0], tool_call("toolu_second")]),
                {"role": "tool", "tool_call_id": call_id, "content": "cold"},
                {"role": "tool", "tool_call_id": "toolu_second", "content": "warm"}]
    out = c.chat.completions.create(model="fallback/claude-then-gemini-3", messages=messages, tools=[WEATHER_TOOL])
    assert out.choices[0].message.content.startswith("mock reply to tool result")
    seen = mock.last()
    assert seen["path"] == "/v1beta/models/gemini-3-pro-preview:generateContent"
    calls = json.loads(seen["body"])["contents"][1]["parts"]
    # Only the first of parallel calls carries one, as Gemini 3 answers them.
    assert [p.get("thoughtSignature") for p in calls] == ["skip_thought_signature_validator", None]


def test_gemini_3_checks_signatures_of_the_current_turn_only(gw, mock):
    # The mock checks what Gemini 3 checks: an unsigned call in an earlier turn (before the last
    # user text) is accepted, one in the current turn is not.
    call = {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
    answer = {"functionResponse": {"name": "get_weather", "response": {"content": "cold"}}}
    earlier = [{"role": "user", "parts": [{"text": "weather?"}]}, {"role": "model", "parts": [call]},
               {"role": "user", "parts": [answer]}, {"role": "model", "parts": [{"text": "Cold."}]}]
    url = gw.url + "/google-ai-studio/v1beta/models/gemini-3-pro-preview:generateContent"
    r = httpx.post(url, json={"contents": earlier + [{"role": "user", "parts": [{"text": "thanks"}]}]})
    assert r.status_code == 200, r.text
    r = httpx.post(url, json={"contents": earlier[:3]})
    assert r.status_code == 400 and "missing a thought_signature" in r.json()["error"]["message"]


# --- media -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", PROVIDERS)
def test_jpg_data_urls_reach_every_provider_as_image_jpeg(gw, mock, model):
    # Browsers and tools name JPEGs image/jpg; the providers refuse that name.
    out = client(gw).chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpg;base64,{JPEG}"}}]}])
    assert out.choices[0].message.content == "mock reply to: what is it?"
    body = mock.last()["body"]
    assert "image/jpg" not in body and ('"format":"jpeg"' in body or '"image/jpeg"' in body), body


def test_images_in_tool_results_reach_anthropic_and_bedrock(gw, mock):
    c = client(gw)
    screenshot = [{"type": "text", "text": "the screen:"},
                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    for model in (CLAUDE, BEDROCK):
        assistant = first_call(c, model)
        call_id = assistant["tool_calls"][0]["id"]
        c.chat.completions.create(model=model, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "weather in Oslo?"}, assistant,
            {"role": "tool", "tool_call_id": call_id, "content": screenshot}])
        result = sent(mock)["messages"][2]["content"][0]
        if model == CLAUDE:
            assert result["content"] == [
                {"type": "text", "text": "the screen:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]
        else:
            assert result["toolResult"]["content"] == [
                {"text": "the screen:"}, {"image": {"format": "png", "source": {"bytes": PNG}}}]


@pytest.mark.parametrize("model, where", [(GEMINI, "system"), (BEDROCK, "system"), (GEMINI, "tool")])
def test_images_where_the_provider_takes_only_text_are_a_400_naming_the_part(gw, mock, model, where):
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    if where == "system":
        messages = [{"role": "system", "content": [{"type": "text", "text": "see"}, image]},
                    {"role": "user", "content": "hi"}]
    else:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [tool_call("c1")]},
                    {"role": "tool", "tool_call_id": "c1", "content": [image]}]
    mock.clear()
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    error = e.value.response.json()["error"][0]
    assert error["code"] == 2107 and f"only text parts can be expressed in a {where} message" in error["message"]
    assert mock.requests() == []


# --- options -------------------------------------------------------------------------------


def test_strict_tools_and_schemas_are_answered_without_passing_strict_on(gw, mock):
    # The OpenAI Agents SDK sets strict on every tool; Anthropic's and Bedrock's strict tool use
    # and Gemini's VALIDATED mode are features of some models and API versions only, which the
    # others refuse: the tools go as plain tools, and the answer comes.
    strict_tool = {"type": "function", "function": dict(WEATHER_TOOL["function"], strict=True)}
    c = client(gw)
    for model in PROVIDERS:
        assert ask(c, model, "weather?", tools=[strict_tool]).choices, model
        assert '"strict"' not in mock.last()["body"], (model, mock.last()["body"])
    schema = {"type": "json_schema", "json_schema": {"name": "w", "strict": True, "schema": {"type": "object"}}}
    ask(c, CLAUDE, "json", response_format=schema)
    assert sent(mock)["tools"][0] == {"name": "json_response", "description": "Respond with w as JSON.",
                                      "input_schema": {"type": "object"}}


def test_without_max_tokens_claude_gets_room_beyond_its_thinking_budget(gw, mock):
    # Anthropic wants budget_tokens below max_tokens (the mock too).
    out = ask(client(gw), CLAUDE, "think hard", extra_body={"thinking": {"type": "enabled", "budget_tokens": 8000}})
    assert out.choices[0].message.reasoning_content == "mock thinking about: think hard"
    assert sent(mock)["max_tokens"] == 8000 + 4096


def test_arguments_cut_off_mid_json_go_on_as_a_raw_wrapper(gw, mock):
    # A history whose call was cut off by max_tokens: OpenAI's arguments do not always parse.
    c = client(gw)
    for model in PROVIDERS:
        assistant = first_call(c, model)
        call = assistant["tool_calls"][0]
        call["function"]["arguments"] = '{"city": "Os'
        out = c.chat.completions.create(model=model, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "weather in Oslo?"}, assistant,
            {"role": "tool", "tool_call_id": call["id"], "content": "cut off"}])
        assert "cut off" in out.choices[0].message.content
        assert json.dumps({"_raw": '{"city": "Os'}, separators=(",", ":")) in mock.last()["body"]


def test_anthropic_refuses_fields_it_does_not_know_and_the_error_says_so(gw):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(gw), CLAUDE, extra_body={"frobnicate": 1})
    assert e.value.response.json()["error"]["message"] == "frobnicate: Extra inputs are not permitted"


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", PROVIDERS)
def test_streamed_chunks_carry_usage_null_until_the_usage_chunk(gw, model):
    # OpenAI: "All other chunks will also include a usage field, but with a null value."
    body = {"model": model, "messages": [{"role": "user", "content": "count me"}], "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(gw.url + "/compat/chat/completions", json=body)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert len(chunks) > 2
    assert all("usage" in ch and ch["usage"] is None for ch in chunks[:-1]), chunks
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_anthropic_stream_usage_matches_the_plain_answer(gw, mock):
    # The mock's message_delta repeats the input side, as current Anthropic does.
    c = client(gw)
    plain = ask(c, CLAUDE, "same usage please")
    streamed = stream_text(ask(c, CLAUDE, "same usage please", stream=True, stream_options={"include_usage": True}))
    usage = streamed[1][-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_thought_summaries_come_back_as_reasoning_content(gw, stream):
    thoughts = {"generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    out = ask(client(gw), GEMINI, "why is the sky blue", stream=stream, extra_body=thoughts)
    if stream:
        chunks = list(out)
        deltas = [ch.choices[0].delta.model_dump() for ch in chunks if ch.choices]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
    else:
        reasoning = out.choices[0].message.reasoning_content
        content = out.choices[0].message.content
        assert out.usage.completion_tokens_details.reasoning_tokens > 0
    assert reasoning == "mock thinking about: why is the sky blue"
    assert content == "mock reply to: why is the sky blue"


def test_bedrock_answers_name_the_model_not_the_region(gw):
    c = client(gw)
    assert ask(c, BEDROCK).model == BEDROCK_MODEL
    _, chunks = stream_text(ask(c, BEDROCK, stream=True))
    assert {ch.model for ch in chunks} == {BEDROCK_MODEL}
    emb = c.embeddings.create(model="aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0", input=["a", "b"])
    assert emb.model == "amazon.titan-embed-text-v2:0"
