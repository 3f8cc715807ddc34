"""/compat translation fidelity, read with the official openai SDK against a scripted loopback
upstream that answers each request exactly as the provider would (shapes cited beside each).

The tests marked `# FAILS at 0b11ae6` reproduce translation bugs found in review; the others pin
edge behaviour that is right today (a regression suite). One gateway and one upstream serve the
whole module: every test scripts the next answer(s) and reads the request the gateway sent."""

import binascii
import http.server
import json
import struct
import threading

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, KEY_MARKER, Sidegate, gateway_yaml

CLAUDE = "anthropic/claude-sonnet-4-5"
GEMINI = "google-ai-studio/gemini-2.5-flash"
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
BEDROCK = f"aws-bedrock/us-east-1/{BEDROCK_MODEL}"
KEYS = dict(DEFAULT_KEYS, **{
    "google-ai-studio.default": f"AIza-{KEY_MARKER}-fidelity",
    "aws-bedrock.default": json.dumps({"accessKeyId": "AKIDMOCK", "secretAccessKey": f"{KEY_MARKER}-aws",
                                       "region": "us-east-1"}),
})
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class ScriptedUpstream:
    """A loopback HTTP/1.1 upstream: each request gets the next scripted answer (status, content
    type, body), or a plain `{}`; requests are kept as (path, headers, body)."""

    def __init__(self):
        self.answers = []
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    status, ctype, answer, headers = (outer.answers.pop(0) if outer.answers
                                                      else (200, "application/json", b"{}", ()))
                if callable(answer):
                    status, answer = answer(json.loads(body))
                    answer = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body, status=200, ctype="application/json", headers=()):
        """`body`: bytes, a JSON value, or a function of the request's JSON giving (status, JSON)."""
        if not callable(body) and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        with self.lock:
            self.answers.append((status, ctype, body, tuple(headers)))

    def reset(self):
        with self.lock:
            self.answers.clear()
            self.requests.clear()

    def last_body(self):
        """The last request's JSON body, its objects' keys in the order they were sent."""
        return json.loads(self.requests[-1][2])

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    up = ScriptedUpstream()
    extra = (f"    google-ai-studio: {{baseURL: '{up.url}'}}\n"
             f"    aws-bedrock: {{baseURL: '{up.url}'}}\n"
             "  fallbacks:\n    - name: gemini-then-openai\n      targets:\n"
             "        - {provider: google-ai-studio, model: gemini-2.5-flash}\n"
             "        - {provider: openai, model: gpt-4o-mini}\n")
    g = Sidegate(tmp_path_factory.mktemp("fidelity"), gateway_yaml(up.url, extra_spec=extra), KEYS)
    yield g, up
    g.stop()
    up.stop()


@pytest.fixture
def gw(env):
    g, up = env
    up.reset()
    return openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0, timeout=20), up


# --- provider wire shapes ------------------------------------------------------------------------

def sse(events):
    """A `text/event-stream` body of (event name or None, JSON data) pairs."""
    out = ""
    for name, data in events:
        if name:
            out += f"event: {name}\n"
        out += "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"
    return out.encode()


def anthropic_message(content, stop_reason="end_turn", usage=None):
    # Messages API response (docs.anthropic.com/en/api/messages).
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 10, "output_tokens": 5}}


def anthropic_stream(blocks, stop_reason="end_turn"):
    """An Anthropic Messages stream (docs.anthropic.com/en/docs/build-with-claude/streaming):
    message_start, per block content_block_start / _delta(s) / _stop, message_delta, message_stop.
    `blocks`: (start block, [deltas])."""
    ev = [("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})]
    for i, (start, deltas) in enumerate(blocks):
        ev.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        ev += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    ev += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                              "usage": {"output_tokens": 20}}),
           ("message_stop", {"type": "message_stop"})]
    return sse(ev)


def gemini_chunk(parts=None, finish=None, usage=None):
    # GenerateContentResponse (ai.google.dev/api/generate-content#generatecontentresponse).
    cand = {"index": 0}
    if parts is not None:
        cand["content"] = {"parts": parts, "role": "model"}
    if finish:
        cand["finishReason"] = finish
    if finish == "SAFETY":
        cand["safetyRatings"] = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]
    out = {"candidates": [cand], "modelVersion": "gemini-2.5-flash"}
    out["usageMetadata"] = usage or {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6}
    return out


def _header(name, value):
    n, v = name.encode(), value.encode()
    return bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v


def frame(kind, payload, message_type="event"):
    """One AWS event-stream message as ConverseStream sends it: `:event-type` for events,
    `:exception-type` for exceptions (docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ConverseStream.html)."""
    type_header = ":event-type" if message_type == "event" else ":exception-type"
    headers = (_header(type_header, kind) + _header(":content-type", "application/json")
               + _header(":message-type", message_type))
    payload = json.dumps(payload).encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


EVENT_STREAM = "application/vnd.amazon.eventstream"


def converse(content, stop_reason="end_turn", usage=None):
    # Converse response (docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html).
    return {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop_reason,
            "usage": usage or {"inputTokens": 9, "outputTokens": 3, "totalTokens": 12},
            "metrics": {"latencyMs": 10}}


def chat(c, model, text="hi", **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def collect(stream):
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    refusal = "".join(ch.choices[0].delta.refusal or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    return text, refusal, finish, chunks


# =================================================================================================
# Bugs
# =================================================================================================

# A JSON schema whose property order carries meaning: the reasoning first, then the answer.
ORDERED_SCHEMA = {"type": "object",
                  "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
                  "required": ["reasoning", "answer"], "additionalProperties": False}
ORDER = ["reasoning", "answer"]


# FAILS at 0b11ae6: every request body /compat builds or rewrites goes through serde_json's Map, a
# BTreeMap without the `preserve_order` feature, so JSON schema properties reach the provider sorted
# ("answer" before "reasoning"); OpenAI's Structured Outputs (and Gemini's JSON schema) produce keys
# in the schema's order, so the model answers before it reasons. Claude's and Bedrock's JSON answers
# (the JSON tool's input, re-serialized) come back with their keys sorted too.
@pytest.mark.parametrize("model", ["openai/gpt-4o-2024-08-06", GEMINI, CLAUDE, BEDROCK])
def test_json_schema_property_order_reaches_the_provider_as_the_client_wrote_it(gw, model):
    c, up = gw
    if model.startswith("openai/"):
        up.answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": '{"reasoning":"r","answer":"a"}'}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})
    elif model == GEMINI:
        up.answer(gemini_chunk([{"text": '{"reasoning":"r","answer":"a"}'}], "STOP"))
    elif model == CLAUDE:
        up.answer(anthropic_message([{"type": "tool_use", "id": "toolu_1", "name": "json_response",
                                      "input": {"reasoning": "r", "answer": "a"}}], "tool_use"))
    else:
        up.answer(converse([{"toolUse": {"toolUseId": "tooluse_1", "name": "json_response",
                                         "input": {"reasoning": "r", "answer": "a"}}}], "tool_use"))
    out = chat(c, model, "why?", response_format={
        "type": "json_schema", "json_schema": {"name": "why", "schema": ORDERED_SCHEMA, "strict": True}})
    assert json.loads(out.choices[0].message.content) == {"reasoning": "r", "answer": "a"}
    # The answer keeps the order the model wrote it in (Anthropic's and Bedrock's come from the
    # JSON tool's input, re-serialized by the gateway).
    assert list(json.loads(out.choices[0].message.content)) == ORDER, out.choices[0].message.content
    body = up.last_body()
    schema = {
        "openai": lambda b: b["response_format"]["json_schema"]["schema"],
        "google-ai-studio": lambda b: b["generationConfig"]["responseJsonSchema"],
        "anthropic": lambda b: b["tools"][0]["input_schema"],
        "aws-bedrock": lambda b: b["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"],
    }[model.split("/")[0]](body)
    assert list(schema["properties"]) == ORDER, schema


# FAILS at 0b11ae6: same cause, for tool parameters (the order in which the model fills in a call's
# arguments).
@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", CLAUDE])
def test_tool_parameter_order_reaches_the_provider_as_the_client_wrote_it(gw, model):
    c, up = gw
    if model == CLAUDE:
        up.answer(anthropic_message([{"type": "text", "text": "ok"}]))
    else:
        up.answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    tool = {"type": "function", "function": {"name": "decide", "parameters": ORDERED_SCHEMA}}
    chat(c, model, "decide", tools=[tool])
    body = up.last_body()
    params = body["tools"][0]["function"]["parameters"] if model.startswith("openai/") else body["tools"][0]["input_schema"]
    assert list(params["properties"]) == ORDER, params


# FAILS at 0b11ae6: a streamed answer with two thinking blocks (Claude's thinking followed by a
# redacted_thinking block, as Anthropic documents) sends two `delta.thinking_blocks` lists whose
# entries carry no `index`; the openai SDK's own stream helper (`chat.completions.stream`, which
# merges list deltas by `index`) raises RuntimeError("Expected list delta entry to have an `index`
# key") and the answer is lost.
def test_two_thinking_blocks_in_one_stream_survive_the_sdks_stream_helper(gw):
    c, up = gw
    up.answer(anthropic_stream([
        ({"type": "thinking", "thinking": ""}, [{"type": "thinking_delta", "thinking": "Let me think."},
                                                {"type": "signature_delta", "signature": "sig-1"}]),
        ({"type": "redacted_thinking", "data": "EncryptedThoughts"}, []),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Hi."}]),
    ]), ctype="text/event-stream")
    with c.chat.completions.stream(model=CLAUDE, messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"thinking": {"type": "enabled", "budget_tokens": 1024}}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Hi."
    blocks = message.model_dump()["thinking_blocks"]
    assert [b["type"] for b in blocks] == ["thinking", "redacted_thinking"], blocks


# FAILS at 0b11ae6: an assistant prefill (the last message is the assistant's, which Claude goes on
# from) is sent with its trailing whitespace, which Anthropic refuses: 400 "messages: final
# assistant content cannot end with trailing whitespace". OpenAI takes the same conversation.
def test_an_assistant_prefill_with_trailing_whitespace_is_answered_by_claude(gw):
    c, up = gw

    def anthropic(body):
        # The check Anthropic's API makes on a final assistant turn, then its answer.
        last = body["messages"][-1]
        text = last["content"] if isinstance(last["content"], str) else last["content"][-1].get("text", "")
        if last["role"] == "assistant" and text != text.rstrip():
            return 400, {"type": "error", "error": {"type": "invalid_request_error",
                         "message": "messages: final assistant content cannot end with trailing whitespace"}}
        return 200, anthropic_message([{"type": "text", "text": " 42"}])

    up.answer(anthropic)
    try:
        out = c.chat.completions.create(model=CLAUDE, messages=[
            {"role": "user", "content": "What is 6 x 7? Answer after the colon."},
            {"role": "assistant", "content": "The answer is: "}])
    except openai.BadRequestError as e:
        pytest.fail(f"the prefill reached Anthropic with its trailing whitespace: {e.message}")
    finally:
        sent = up.last_body()["messages"][-1]
    assert out.choices[0].message.content == " 42"
    assert sent["role"] == "assistant" and sent["content"][-1]["text"] == "The answer is:", sent


# FAILS at 0b11ae6: a Gemini stream that had written text and then stops with finishReason SAFETY
# gets a refusal delta ("the response was blocked ...") besides its content, while the same answer
# unstreamed has content and no refusal: the stream checks only the last chunk for text.
def test_a_gemini_stream_blocked_after_some_text_ends_as_the_plain_answer_does(gw):
    c, up = gw
    up.answer(gemini_chunk([{"text": "Here is the start"}], "SAFETY"))
    plain = chat(c, GEMINI, "tell me")
    assert plain.choices[0].finish_reason == "content_filter"
    assert (plain.choices[0].message.content, plain.choices[0].message.refusal) == ("Here is the start", None)
    up.answer(sse([(None, gemini_chunk([{"text": "Here is the start"}])),
                   (None, gemini_chunk(None, "SAFETY"))]), ctype="text/event-stream")
    text, refusal, finish, _ = collect(chat(c, GEMINI, "tell me", stream=True))
    assert (text, finish) == ("Here is the start", ["content_filter"])
    assert refusal == "", refusal


# =================================================================================================
# Edge behaviour that is right (regression suite)
# =================================================================================================

def test_anthropic_parallel_tool_calls_stream_with_their_own_indexes_and_usage_last(gw):
    c, up = gw
    up.answer(anthropic_stream([
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Checking both."}]),
        ({"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"city": "Os'}, {"type": "input_json_delta", "partial_json": 'lo"}'}]),
        ({"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {}},
         [{"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}]),
    ], stop_reason="tool_use"), ctype="text/event-stream")
    text, _, finish, chunks = collect(chat(c, CLAUDE, "weather?", tools=[WEATHER_TOOL], stream=True,
                                           stream_options={"include_usage": True}))
    calls = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            call = calls.setdefault(tc.index, {"id": None, "args": ""})
            call["id"] = tc.id or call["id"]
            call["args"] += tc.function.arguments or ""
    assert text == "Checking both." and finish == ["tool_calls"]
    assert {i: (v["id"], json.loads(v["args"])) for i, v in calls.items()} == {
        0: ("toolu_A", {"city": "Oslo"}), 1: ("toolu_B", {"city": "Rome"})}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 30
    body = up.last_body()
    assert body["stream"] is True and body["tools"][0]["name"] == "get_weather"


def test_anthropic_cache_reads_and_writes_count_in_prompt_tokens_reads_as_cached(gw):
    c, up = gw
    up.answer(anthropic_message([{"type": "text", "text": "ok"}], usage={
        "input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000, "output_tokens": 7}))
    u = chat(c, CLAUDE).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3210, 7, 3217)
    assert u.prompt_tokens_details.cached_tokens == 3000


@pytest.mark.parametrize("stop, finish", [("max_tokens", "length"), ("stop_sequence", "stop"),
                                          ("refusal", "content_filter"), ("model_context_window_exceeded", "length")])
def test_anthropic_stop_reasons(gw, stop, finish):
    c, up = gw
    up.answer(anthropic_message([{"type": "text", "text": "partial"}], stop))
    assert chat(c, CLAUDE, stop=["END"]).choices[0].finish_reason == finish
    assert up.last_body()["stop_sequences"] == ["END"]


def test_anthropic_overloaded_keeps_its_status_in_the_openai_error_shape(gw):
    c, up = gw
    # Anthropic's 529 (docs.anthropic.com/en/api/errors).
    up.answer({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, status=529)
    with pytest.raises(openai.InternalServerError) as e:
        chat(c, CLAUDE)
    assert e.value.status_code == 529
    assert e.value.response.json()["error"] == {"message": "Overloaded", "type": "overloaded_error",
                                                "param": None, "code": None}


def test_an_anthropic_error_event_mid_stream_is_raised_by_the_sdk(gw):
    c, up = gw
    up.answer(sse([("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]),
        ctype="text/event-stream")
    with pytest.raises(openai.APIError, match="Overloaded"):
        list(chat(c, CLAUDE, stream=True))


def test_gemini_stream_with_a_blocked_prompt_is_a_content_filter_refusal(gw):
    c, up = gw
    # A prompt blocked in a stream: one chunk with promptFeedback and no candidates.
    up.answer(sse([(None, {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                           "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
                           "modelVersion": "gemini-2.5-flash"})]), ctype="text/event-stream")
    text, refusal, finish, _ = collect(chat(c, GEMINI, stream=True))
    assert (text, finish) == ("", ["content_filter"]) and "PROHIBITED_CONTENT" in refusal


def test_gemini_parallel_calls_stream_with_their_own_indexes_and_results_go_back_by_name(gw):
    c, up = gw
    up.answer(sse([(None, gemini_chunk([{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}])),
                   (None, gemini_chunk([{"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}], "STOP"))]),
              ctype="text/event-stream")
    _, _, finish, chunks = collect(chat(c, GEMINI, "weather?", tools=[WEATHER_TOOL], stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert finish == ["tool_calls"] and [tc.index for tc in calls] == [0, 1]
    assert len({tc.id for tc in calls}) == 2
    up.answer(gemini_chunk([{"text": "Cold and warm."}], "STOP"))
    out = c.chat.completions.create(model=GEMINI, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
            for tc in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "-3C"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": [{"type": "text", "text": "24C"}]}])
    assert out.choices[0].message.content == "Cold and warm."
    contents = up.last_body()["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert [p["functionResponse"] for p in contents[2]["parts"]] == [
        {"name": "get_weather", "response": {"content": "-3C"}}, {"name": "get_weather", "response": {"content": "24C"}}]


def test_gemini_thinking_and_cache_usage(gw):
    c, up = gw
    up.answer(gemini_chunk([{"text": "thought", "thought": True}, {"text": "answer"}], "MAX_TOKENS", usage={
        "promptTokenCount": 1000, "cachedContentTokenCount": 600, "candidatesTokenCount": 10,
        "thoughtsTokenCount": 90, "totalTokenCount": 1100}))
    out = chat(c, GEMINI, max_completion_tokens=100)
    assert (out.choices[0].finish_reason, out.choices[0].message.content) == ("length", "answer")
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (1000, 100, 1100)
    assert (u.prompt_tokens_details.cached_tokens, u.completion_tokens_details.reasoning_tokens) == (600, 90)
    assert up.last_body()["generationConfig"]["maxOutputTokens"] == 100


@pytest.mark.parametrize("stop, finish", [("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter"),
                                          ("max_tokens", "length"), ("stop_sequence", "stop"),
                                          ("model_context_window_exceeded", "length")])
def test_bedrock_stop_reasons(gw, stop, finish):
    c, up = gw
    up.answer(converse([{"text": "partial"}], stop))
    assert chat(c, BEDROCK).choices[0].finish_reason == finish


def test_bedrock_stream_exception_mid_stream_is_raised_by_the_sdk(gw):
    c, up = gw
    up.answer(frame("messageStart", {"role": "assistant"})
              + frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}})
              + frame("throttlingException", {"message": "Too many tokens, please wait"}, message_type="exception"),
              ctype=EVENT_STREAM)
    with pytest.raises(openai.APIError, match="Too many tokens"):
        list(chat(c, BEDROCK, stream=True))


def test_bedrock_streamed_tool_calls_and_cache_usage(gw):
    c, up = gw
    up.answer(frame("messageStart", {"role": "assistant"})
              + frame("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "tooluse_a", "name": "get_weather"}}})
              + frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '{"city":'}}})
              + frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '"Bergen"}'}}})
              + frame("contentBlockStop", {"contentBlockIndex": 0})
              + frame("contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tooluse_b", "name": "get_weather"}}})
              + frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city":"Pau"}'}}})
              + frame("contentBlockStop", {"contentBlockIndex": 1})
              + frame("messageStop", {"stopReason": "tool_use"})
              + frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 8, "totalTokens": 513,
                                             "cacheReadInputTokens": 500}, "metrics": {"latencyMs": 9}}),
              ctype=EVENT_STREAM)
    _, _, finish, chunks = collect(chat(c, BEDROCK, "weather?", tools=[WEATHER_TOOL], stream=True,
                                        stream_options={"include_usage": True}))
    args = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert finish == ["tool_calls"]
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "Bergen"}, 1: {"city": "Pau"}}
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (505, 8, 500)


def test_unicode_split_inside_a_character_across_reads_is_kept(gw):
    c, up = gw
    # One Anthropic text delta holding multi-byte characters; the gateway reads the body in
    # whatever pieces the socket gives, and the translation must not depend on them.
    text = "Grüße 😀 " * 3000
    up.answer(anthropic_stream([({"type": "text", "text": ""}, [{"type": "text_delta", "text": text}])]),
              ctype="text/event-stream")
    got, _, finish, _ = collect(chat(c, CLAUDE, stream=True))
    assert got == text and finish == ["stop"]


def test_max_completion_tokens_wins_over_max_tokens_and_system_and_developer_join(gw):
    c, up = gw
    up.answer(anthropic_message([{"type": "text", "text": "ok"}]))
    c.chat.completions.create(model=CLAUDE, max_tokens=50, max_completion_tokens=70, top_p=0.5, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/4AAQ"}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    body = up.last_body()
    assert (body["max_tokens"], body["top_p"], body["system"]) == (70, 0.5, "Be brief.\n\nUse metric units.")
    assert [b["type"] for b in body["messages"][0]["content"]] == ["text", "image", "image"]
    assert body["messages"][0]["content"][1]["source"]["media_type"] == "image/jpeg"
    assert body["messages"][0]["content"][2]["source"] == {"type": "url", "url": "https://example.com/a.png"}


def test_openai_format_answers_pass_through_unchanged(gw):
    c, up = gw
    answer = {"id": "chatcmpl-x", "object": "chat.completion", "created": 7, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                           "message": {"role": "assistant", "content": "fine", "refusal": None}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    up.answer(answer)
    g_url = str(c.base_url).rstrip("/")
    r = httpx.post(g_url + "/chat/completions", json={"model": "openai/gpt-4o-mini",
                                                     "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert r.json() == answer
    assert up.last_body()["model"] == "gpt-4o-mini"


# --- output of the model that is not valid ------------------------------------------------------
#
# Gemini's finishReason MALFORMED_FUNCTION_CALL / UNEXPECTED_TOOL_CALL and Bedrock's stopReason
# malformed_model_output / malformed_tool_use: no answer, though billed. OpenAI answers its own
# invalid output with a 500 {"error": {"message": "The model produced invalid content. ...",
# "type": "model_error", "param": null, "code": null}} (as its SDKs and the projects that log
# them report), not a finished empty answer an agent loop would take as done.

INVALID = [
    (GEMINI, "MALFORMED_FUNCTION_CALL"),
    (GEMINI, "UNEXPECTED_TOOL_CALL"),
    (BEDROCK, "malformed_model_output"),
    (BEDROCK, "malformed_tool_use"),
]


def invalid_answer(model, reason):
    if model == GEMINI:
        chunk = gemini_chunk(finish=reason, usage={"promptTokenCount": 1000, "candidatesTokenCount": 20,
                                                    "totalTokenCount": 1020})
        chunk["candidates"][0]["finishMessage"] = "Malformed function call: get_weather(city=)"
        return chunk, " tokens_in=1000 tokens_out=20 "
    return converse([], reason, usage={"inputTokens": 900, "outputTokens": 30, "totalTokens": 930}), \
        " tokens_in=900 tokens_out=30 "


def log_line(env, log_id):
    g, _ = env
    return g.wait_log_line(log_id)


@pytest.mark.parametrize("model, reason", INVALID)
def test_output_the_model_could_not_form_is_openais_500_model_error_its_tokens_counted(env, gw, model, reason):
    c, up = gw
    answer, tokens = invalid_answer(model, reason)
    up.answer(answer)
    # Neither retried (it was billed) nor taken for a finished empty answer.
    with pytest.raises(openai.InternalServerError) as e:
        chat(c, model, "weather in Oslo?", tools=[WEATHER_TOOL],
             extra_headers={"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "0"})
    err = e.value
    assert (err.status_code, err.type, err.code) == (500, "model_error", reason)
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    message = body["message"]
    assert message.startswith("The model produced invalid content ("), message
    assert reason in message and "Consider modifying your prompt" in message
    if model == GEMINI:
        assert "Malformed function call: get_weather(city=)" in message
    assert len(up.requests) == 1
    # The provider billed it: logged with the status the client got, its tokens and cost counted.
    line = log_line(env, err.response.headers["cf-aig-log-id"])
    assert " status_code=500 " in line and " outcome=upstream_error" in line, line
    assert tokens in line and " cost=" in line, line
    if model == GEMINI:
        assert " cost=0.00035" in line, line  # 1000 × $0.30/M + 20 × $2.50/M


@pytest.mark.parametrize("model, reason", [(GEMINI, "MALFORMED_FUNCTION_CALL"), (BEDROCK, "malformed_tool_use")])
def test_a_stream_whose_model_output_is_not_valid_ends_with_an_error_the_sdk_raises(env, gw, model, reason):
    c, up = gw
    if model == GEMINI:
        up.answer(sse([(None, gemini_chunk([{"text": "Let me check"}])),
                       (None, gemini_chunk(finish=reason, usage={"promptTokenCount": 1000, "candidatesTokenCount": 20,
                                                                  "totalTokenCount": 1020}))]),
                  ctype="text/event-stream")
        tokens = " tokens_in=1000 tokens_out=20 "
    else:
        up.answer(frame("messageStart", {"role": "assistant"})
                  + frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Let me check"}})
                  + frame("messageStop", {"stopReason": reason})
                  + frame("metadata", {"usage": {"inputTokens": 900, "outputTokens": 30, "totalTokens": 930},
                                       "metrics": {"latencyMs": 9}}),
                  ctype=EVENT_STREAM)
        tokens = " tokens_in=900 tokens_out=30 "
    stream = chat(c, model, "weather in Oslo?", tools=[WEATHER_TOOL], stream=True,
                  stream_options={"include_usage": True})
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
    assert (e.value.type, e.value.code) == ("model_error", reason)
    assert e.value.message.startswith("The model produced invalid content (")
    # What came before the failure came; no finish said the answer was done.
    assert "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices) == "Let me check"
    assert not [ch for ch in got if ch.choices and ch.choices[0].finish_reason]
    line = log_line(env, stream.response.headers["cf-aig-log-id"])
    assert " outcome=upstream_error" in line and tokens in line and " cost=" in line, line


def test_output_the_model_could_not_form_is_not_handed_to_the_fallback(env, gw):
    # Billed: the request is counted with this answer, not dropped for the next target's.
    c, up = gw
    answer, tokens = invalid_answer(GEMINI, "MALFORMED_FUNCTION_CALL")
    up.answer(answer)
    with pytest.raises(openai.InternalServerError) as e:
        chat(c, "fallback/gemini-then-openai", "weather in Oslo?", tools=[WEATHER_TOOL])
    assert (e.value.code, e.value.response.headers.get("cf-aig-step")) == ("MALFORMED_FUNCTION_CALL", "0")
    assert [path for path, _, _ in up.requests] == ["/v1beta/models/gemini-2.5-flash:generateContent"]
    line = log_line(env, e.value.response.headers["cf-aig-log-id"])
    assert tokens in line and " step=0" in line, line
