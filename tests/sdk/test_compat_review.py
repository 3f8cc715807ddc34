"""Review of /compat (one OpenAI chat API translated to Anthropic Messages, Gemini generateContent
and Bedrock Converse), read with the official openai SDK against a scripted loopback upstream that
answers as each provider does (helpers of test_compat_fidelity; shapes cited there and beside the
checks below).

Tests marked `# Failed at 91770b5 (mended since)` reproduce defects found in review: requests an
OpenAI client sends that the translation turned into something the provider refuses or reads
otherwise. The
others pin behaviour that is right today and that the other /compat modules do not check yet.
One gateway and one upstream serve the whole module."""

import json
import re

import openai
import pydantic
import pytest

# The fidelity tests' gateway and scripted upstream (one each for this module too).
from test_compat_fidelity import (BEDROCK, CLAUDE, EVENT_STREAM, GEMINI, WEATHER_TOOL, anthropic_message,  # noqa: F401
                                  env, gw, chat, collect, converse, frame, gemini_chunk, sse)

PDF = "data:application/pdf;base64,JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDw+PgplbmRvYmoKdHJhaWxlcgo8PD4+CiUlRU9GCg=="
ANSWER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "verdict": {"type": "string"}},
                 "required": ["city", "verdict"], "additionalProperties": False}


def provider_of(model):
    return model.split("/")[0]


def answer_ok(up, model, text="ok"):
    """The provider's plain answer `text`, in its own shape."""
    up.answer({"anthropic": lambda: anthropic_message([{"type": "text", "text": text}]),
               "google-ai-studio": lambda: gemini_chunk([{"text": text}], "STOP"),
               "aws-bedrock": lambda: converse([{"text": text}])}[provider_of(model)]())


def turns(model, body):
    """(role, content) of each turn of a translated request, in the provider's words."""
    if provider_of(model) == "google-ai-studio":
        return [(t["role"], t["parts"]) for t in body["contents"]]
    return [(t["role"], t["content"]) for t in body["messages"]]


# --- Bedrock Converse's document rules (docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_DocumentBlock.html):
# `name` holds only alphanumerics, whitespace (no more than one in a row), hyphens, parentheses and
# square brackets; and a request's documents have names of their own (Bedrock's ValidationException
# "Messages can't contain duplicate document names. Rename the document and retry your request.").
DOCUMENT_NAME = re.compile(r"^[A-Za-z0-9\-()\[\]]+(?: [A-Za-z0-9\-()\[\]]+)*$")


def document_names(body):
    return [block["document"]["name"] for m in body["messages"] for block in m["content"] if "document" in block]


def bedrock_checking_documents(body):
    names = document_names(body)
    for name in names:
        if not (1 <= len(name) <= 200 and re.fullmatch(r"[A-Za-z0-9\s\-()\[\]]+", name)) or re.search(r"\s\s", name):
            return 400, {"message": f"The document name {name!r} is not valid: it can only contain alphanumeric "
                                    "characters, whitespace characters (no more than one in a row), hyphens, "
                                    "parentheses and square brackets."}
    if len(set(names)) != len(names):
        return 400, {"message": "Messages can't contain duplicate document names. Rename the document and retry "
                                "your request."}
    return 200, converse([{"text": "Both read."}])


# =================================================================================================
# Defects
# =================================================================================================

# Every file part sent without a `filename` (optional in OpenAI's file part, and the SDKs' examples
# leave it out) becomes a Bedrock document named "document", so a conversation that attaches two of
# them — here one per turn, as a chat app does — is refused by Bedrock ("Messages can't contain
# duplicate document names"), for good: each later turn sends the history again.
# (bedrock.rs `user_blocks`: `file.filename.unwrap_or("document")`, no name made unique per request.)
# Failed at 91770b5 (mended since): two untitled files are both sent as Bedrock documents named "document", which Bedrock refuses
def test_untitled_files_reach_bedrock_under_names_of_their_own(gw):
    c, up = gw
    up.answer(bedrock_checking_documents)
    try:
        out = c.chat.completions.create(model=BEDROCK, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Read this invoice."},
                                         {"type": "file", "file": {"file_data": PDF}}]},
            {"role": "assistant", "content": "Read. It is due in March."},
            {"role": "user", "content": [{"type": "text", "text": "And this one: same due date?"},
                                         {"type": "file", "file": {"file_data": PDF}}]}])
    except openai.BadRequestError as e:
        pytest.fail(f"Bedrock refused the translated request: {e.message}; names sent: "
                    f"{document_names(up.last_body())}")
    assert out.choices[0].message.content == "Both read."
    names = document_names(up.last_body())
    assert len(names) == 2 and len(set(names)) == 2, names


# A file name is made fit for Bedrock by dropping the characters it refuses, which leaves two spaces
# where one stood between words ("Q3 results – summary.pdf", an en dash, becomes
# "Q3 results  summarypdf"), and Bedrock refuses a document name with more than one whitespace in a
# row: the request the client sent is valid for OpenAI and never answered.
# (bedrock.rs `user_blocks`: the name's characters are filtered one by one, whitespace runs kept.)
# Failed at 91770b5 (mended since): a filename with a dropped character between spaces gives a document name Bedrock refuses (two spaces)
def test_bedrock_document_names_have_no_whitespace_runs_after_unsupported_characters_go(gw):
    c, up = gw
    up.answer(bedrock_checking_documents)
    try:
        out = c.chat.completions.create(model=BEDROCK, messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_data": PDF, "filename": "Q3 results – summary (final).pdf"}},
            {"type": "text", "text": "Summarize."}]}])
    except openai.BadRequestError as e:
        pytest.fail(f"Bedrock refused the translated request: {e.message}; names sent: "
                    f"{document_names(up.last_body())}")
    assert out.choices[0].message.content == "Both read."
    [name] = document_names(up.last_body())
    assert DOCUMENT_NAME.fullmatch(name), name


# A conversation that ends with a system or developer message (an instruction
# after the assistant's answer: "now rate it", a reflection step) is answered by OpenAI as a new
# assistant message. /compat lifts the instruction into the provider's system prompt and sends the
# turns as they are, ending on the assistant's: a prefill, which Claude continues ("Soft rain on the
# roof ..." goes on instead of a rating; newer Claude models refuse it: "This model does not support
# assistant message prefill. The conversation must end with a user message."), as do Bedrock and
# Gemini. It should be refused (400 naming the message), as a trailing blank user message is, or
# sent so that the conversation ends on a turn the model answers.
# (openai.rs `ends_where_sent` checks only conversations whose last message is the user's or a
# tool's.)
# Failed at 91770b5 (mended since): a trailing developer message is lifted into the system prompt and the turns go as an assistant prefill
@pytest.mark.parametrize("model", [CLAUDE, BEDROCK, GEMINI])
def test_a_trailing_developer_message_is_answered_not_sent_as_a_prefill(gw, model):
    c, up = gw
    answer_ok(up, model, "7/10")
    messages = [{"role": "user", "content": "Write a haiku about rain."},
                {"role": "assistant", "content": "Soft rain on the roof"},
                {"role": "developer", "content": "Now rate the haiku above from 1 to 10."}]
    try:
        c.chat.completions.create(model=model, messages=messages)
    except openai.BadRequestError as e:
        # A refusal naming the message is a right answer too: nothing reached the provider.
        assert e.response.json()["error"][0]["code"] == 2107 and "messages[2]" in e.response.json()["error"][0]["message"]
        assert up.requests == []
        return
    sent = turns(model, up.last_body())
    assert sent[-1][0] == "user", f"sent as a prefill of the assistant's turn: {sent}"


# An agent with tools and a structured output type (the OpenAI Agents SDK sends
# `tools` with `response_format: json_schema` on every turn of such an agent) is refused for Claude
# and Bedrock: 400 "response_format json together with tools cannot be expressed". It can: the JSON
# tool is offered beside the agent's tools, unforced, with the instruction to answer through it —
# what /compat already does for Claude's extended thinking (README) — so the model calls a tool or
# answers in JSON. (anthropic.rs and bedrock.rs `request`: `!tools.is_empty() || tool_choice` → 400.)
# Failed at 91770b5 (mended since): tools with response_format json_schema is a 400 "cannot be expressed" for Claude and Bedrock
@pytest.mark.parametrize("model", [CLAUDE, BEDROCK])
def test_an_agent_with_tools_and_a_structured_output_type_is_served(gw, model):
    c, up = gw
    if model == CLAUDE:
        up.answer(anthropic_message([{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                      "input": {"city": "Oslo"}}], "tool_use"))
    else:
        up.answer(converse([{"toolUse": {"toolUseId": "tooluse_01", "name": "get_weather",
                                         "input": {"city": "Oslo"}}}], "tool_use"))
    try:
        out = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Is Oslo warm today? Give a verdict."}],
            tools=[WEATHER_TOOL],
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": ANSWER_SCHEMA,
                                                                    "strict": True}})
    except openai.BadRequestError as e:
        pytest.fail(f"refused: {e.response.text}")
    call = out.choices[0].message.tool_calls[0]
    assert (out.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments)) == (
        "tool_calls", "get_weather", {"city": "Oslo"})
    body = up.last_body()
    if model == CLAUDE:
        offered, choice = [t["name"] for t in body["tools"]], body.get("tool_choice") or {}
        forced = choice.get("type") == "tool" and choice.get("name") != "get_weather"
    else:
        offered = [t["toolSpec"]["name"] for t in body["toolConfig"]["tools"] if "toolSpec" in t]
        choice = body["toolConfig"].get("toolChoice") or {}
        forced = "tool" in choice and choice["tool"]["name"] != "get_weather"
    assert "get_weather" in offered and not forced, body
    # The schema goes with the request (as a tool's input schema or the provider's own format).
    assert json.dumps(ANSWER_SCHEMA) in json.dumps(body), body


# =================================================================================================
# Behaviour that is right (checks the other modules do not make)
# =================================================================================================

@pytest.mark.parametrize("model, choice, expected", [
    (CLAUDE, "none", {"type": "none"}),
    (CLAUDE, "required", {"type": "any"}),
    (GEMINI, "none", {"functionCallingConfig": {"mode": "NONE"}}),
    (GEMINI, {"type": "function", "function": {"name": "get_weather"}},
     {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}),
    (BEDROCK, "required", {"any": {}}),
    (BEDROCK, {"type": "function", "function": {"name": "get_weather"}}, {"tool": {"name": "get_weather"}}),
])
def test_tool_choice_reaches_each_provider_in_its_words(gw, model, choice, expected):
    c, up = gw
    answer_ok(up, model)
    chat(c, model, "weather?", tools=[WEATHER_TOOL], tool_choice=choice)
    body = up.last_body()
    got = {"anthropic": lambda: body["tool_choice"], "google-ai-studio": lambda: body["toolConfig"],
           "aws-bedrock": lambda: body["toolConfig"]["toolChoice"]}[provider_of(model)]()
    assert got == expected


def test_tool_choice_none_with_tools_is_a_400_for_bedrock_and_nothing_is_sent(gw):
    c, up = gw
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, BEDROCK, "weather?", tools=[WEATHER_TOOL], tool_choice="none")
    error = e.value.response.json()["error"][0]
    assert error["code"] == 2107 and "tool_choice none" in error["message"]
    assert up.requests == []


@pytest.mark.parametrize("model", [CLAUDE, GEMINI, BEDROCK])
def test_parallel_calls_answered_by_array_tool_results_around_a_developer_note_stay_one_turn(gw, model):
    c, up = gw
    answer_ok(up, model, "Cold in Oslo, warm in Rome.")
    out = c.chat.completions.create(model=model, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "-3C"},
                                                               {"type": "text", "text": "snow"}]},
        {"role": "developer", "content": "Answer in one sentence."},
        {"role": "tool", "tool_call_id": "call_b", "content": "24C"}])
    assert out.choices[0].message.content == "Cold in Oslo, warm in Rome."
    body = up.last_body()
    sent = turns(model, body)
    assert [role for role, _ in sent] == ["user", "model" if model == GEMINI else "assistant", "user"]
    results = sent[2][1]
    if model == CLAUDE:
        assert results == [{"type": "tool_result", "tool_use_id": "call_a", "content": "-3C\nsnow"},
                           {"type": "tool_result", "tool_use_id": "call_b", "content": "24C"}]
        assert body["system"] == "Answer in one sentence."
    elif model == GEMINI:
        assert [p["functionResponse"] for p in results] == [
            {"name": "get_weather", "response": {"content": "-3C\nsnow"}},
            {"name": "get_weather", "response": {"content": "24C"}}]
        assert body["systemInstruction"] == {"parts": [{"text": "Answer in one sentence."}]}
    else:
        assert results == [{"toolResult": {"toolUseId": "call_a", "content": [{"text": "-3C"}, {"text": "snow"}]}},
                           {"toolResult": {"toolUseId": "call_b", "content": [{"text": "24C"}]}}]
        assert body["system"] == [{"text": "Answer in one sentence."}]


def test_bedrock_holds_temperature_to_one_and_takes_stop_and_max_completion_tokens(gw):
    c, up = gw
    answer_ok(up, BEDROCK)
    chat(c, BEDROCK, temperature=1.8, top_p=0.9, stop="END", max_tokens=10, max_completion_tokens=20)
    assert up.last_body()["inferenceConfig"] == {"maxTokens": 20, "temperature": 1.0, "topP": 0.9,
                                                 "stopSequences": ["END"]}
    # Gemini takes OpenAI's whole 0..2 range.
    answer_ok(up, GEMINI)
    chat(c, GEMINI, temperature=1.8, seed=7, stop=["a", "b"])
    assert up.last_body()["generationConfig"] == {"temperature": 1.8, "stopSequences": ["a", "b"], "seed": 7}


@pytest.mark.parametrize("model", [CLAUDE, GEMINI, BEDROCK])
@pytest.mark.parametrize("field, value", [("logprobs", True), ("top_logprobs", 2), ("n", 3)])
def test_fields_no_translated_provider_has_are_refused_naming_them(gw, model, field, value):
    c, up = gw
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, model, **{field: value})
    error = e.value.response.json()["error"][0]
    assert error["code"] == 2107 and f"field {field} " in error["message"], error
    assert up.requests == []


def test_a_gemini_error_mid_stream_is_raised_by_the_sdk(gw):
    c, up = gw
    # Gemini ends a failing stream with an error object as its last event.
    up.answer(sse([(None, gemini_chunk([{"text": "Hel"}])),
                   (None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})]),
              ctype="text/event-stream")
    seen = []
    with pytest.raises(openai.APIError, match="The model is overloaded"):
        for ch in chat(c, GEMINI, stream=True):
            seen.append(ch)
    assert "".join(ch.choices[0].delta.content or "" for ch in seen if ch.choices) == "Hel"


def test_gemini_recitation_and_bedrock_guardrail_streams_finish_as_content_filter(gw):
    c, up = gw
    up.answer(gemini_chunk(None, "RECITATION"))
    out = chat(c, GEMINI)
    assert out.choices[0].finish_reason == "content_filter" and "RECITATION" in out.choices[0].message.refusal
    up.answer(frame("messageStart", {"role": "assistant"})
              + frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Sorry, I can't help."}})
              + frame("contentBlockStop", {"contentBlockIndex": 0})
              + frame("messageStop", {"stopReason": "guardrail_intervened"})
              + frame("metadata", {"usage": {"inputTokens": 4, "outputTokens": 5, "totalTokens": 9},
                                   "metrics": {"latencyMs": 3}}), ctype=EVENT_STREAM)
    text, _, finish, chunks = collect(chat(c, BEDROCK, stream=True, stream_options={"include_usage": True}))
    assert (text, finish) == ("Sorry, I can't help.", ["content_filter"])
    assert chunks[-1].usage.total_tokens == 9


class Verdict(pydantic.BaseModel):
    city: str
    verdict: str


@pytest.mark.parametrize("model", [CLAUDE, BEDROCK])
def test_the_sdks_parse_helper_gets_its_pydantic_answer(gw, model):
    c, up = gw
    if model == CLAUDE:
        up.answer(anthropic_message([{"type": "text", "text": "Here you go."},
                                     {"type": "tool_use", "id": "toolu_1", "name": "json_response",
                                      "input": {"city": "Oslo", "verdict": "cold"}}], "tool_use"))
    else:
        up.answer(converse([{"toolUse": {"toolUseId": "tooluse_1", "name": "json_response",
                                         "input": {"city": "Oslo", "verdict": "cold"}}}], "tool_use"))
    out = c.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Oslo?"}],
                                   response_format=Verdict)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.parsed == Verdict(city="Oslo", verdict="cold")


# =================================================================================================
# Around the mended defects
# =================================================================================================

AGENT_TURN = [{"role": "user", "content": "Is Oslo warm today? Give a verdict."},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_w1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
              {"role": "tool", "tool_call_id": "call_w1", "content": "-3C, snow"}]
VERDICT_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": ANSWER_SCHEMA, "strict": True}}


@pytest.mark.parametrize("model", [CLAUDE, BEDROCK])
def test_an_agent_with_tools_gets_its_structured_final_answer_as_content(gw, model):
    c, up = gw
    answer = {"city": "Oslo", "verdict": "cold"}
    if model == CLAUDE:
        up.answer(anthropic_message([{"type": "text", "text": "Here is my verdict."},
                                     {"type": "tool_use", "id": "toolu_02", "name": "json_response",
                                      "input": answer}], "tool_use"))
    else:
        up.answer(converse([{"text": "Here is my verdict."},
                            {"toolUse": {"toolUseId": "tooluse_02", "name": "json_response", "input": answer}}],
                           "tool_use"))
    out = c.chat.completions.create(model=model, messages=AGENT_TURN, tools=[WEATHER_TOOL],
                                    response_format=VERDICT_FORMAT)
    choice = out.choices[0]
    assert (choice.finish_reason, choice.message.tool_calls) == ("stop", None)
    assert json.loads(choice.message.content) == answer
    # The instruction to answer through the JSON tool went with the request.
    body = up.last_body()
    system = body["system"] if model == CLAUDE else " ".join(b["text"] for b in body["system"])
    assert "json_response" in system, body


def test_an_agent_with_tools_and_an_output_type_streams_its_tool_call_from_claude(gw):
    c, up = gw
    up.answer(sse([
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Let me check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                           "usage": {"output_tokens": 20}}),
        ("message_stop", {"type": "message_stop"})]), ctype="text/event-stream")
    text, _, finish, chunks = collect(c.chat.completions.create(
        model=CLAUDE, messages=AGENT_TURN[:1], tools=[WEATHER_TOOL], response_format=VERDICT_FORMAT, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert (text, finish) == ("Let me check.", ["tool_calls"])
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Oslo"}


def test_a_claude_refusal_before_any_text_says_so_in_message_refusal(gw):
    c, up = gw
    # stop_reason "refusal" (docs.anthropic.com/en/api/handling-stop-reasons).
    up.answer(anthropic_message([], "refusal"))
    out = chat(c, CLAUDE)
    assert out.choices[0].finish_reason == "content_filter"
    assert out.choices[0].message.content is None and "refusal" in out.choices[0].message.refusal
    up.answer(sse([
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"})]), ctype="text/event-stream")
    text, refusal, finish, _ = collect(chat(c, CLAUDE, stream=True))
    assert (text, finish) == ("", ["content_filter"]) and "refusal" in refusal


def test_a_stream_event_too_large_to_translate_ends_the_stream_with_an_error_the_sdk_raises(gw):
    c, up = gw
    # Gemini streams a generated image as base64 in one event: here one of 9 MiB.
    image = "A" * (9 << 20)
    up.answer(sse([(None, gemini_chunk([{"text": "Hel"}])),
                   (None, gemini_chunk([{"inlineData": {"mimeType": "image/png", "data": image}}])),
                   (None, gemini_chunk([{"text": "lo"}], "STOP"))]), ctype="text/event-stream")
    seen = []
    with pytest.raises(openai.APIError, match="larger than 8 MiB"):
        for ch in chat(c, GEMINI, stream=True):
            seen.append(ch)
    assert "".join(ch.choices[0].delta.content or "" for ch in seen if ch.choices) == "Hel"
    assert not any(ch.choices and ch.choices[0].finish_reason for ch in seen)
