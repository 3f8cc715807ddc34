"""DLP response policies and guardrails read the text of every stream format a provider answers
in, not only SSE: Bedrock's binary event streams (converse-stream, and invoke-with-response-stream
whose `chunk`s carry the model's own events in base64) and Gemini's streamGenerateContent without
alt=sse (a JSON array of chunks). Their text deltas are joined before matching, so a card number
or a flagged phrase split across events is found. Prompt guardrails read the text a prompt
carries in tool inputs, tool results and documents.

The mock streams converse-stream itself ("mock reply to: <prompt>", one word per event); the
other two formats come from a fixed-answer server.
"""

import base64
import json
import struct
import zlib

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
BEDROCK = f"/aws-bedrock/bedrock-runtime/us-west-2/model/{MODEL}"
SIGNED = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-west-2/bedrock/aws4_request, "
                           "SignedHeaders=host;x-amz-date, Signature=aa", "x-amz-date": "20260101T000000Z"}
GEMINI_STREAM = "/custom-gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
EVENT_STREAM = "application/vnd.amazon.eventstream"
CARD = "4111 1111 1111 1111"


def frame(event_type, payload):
    """One AWS event-stream message (string headers, CRC32 checksums)."""
    headers = b""
    for name, value in ((":event-type", event_type), (":content-type", "application/json"),
                        (":message-type", "event")):
        headers += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def invoke_stream(pieces):
    """Bedrock InvokeModelWithResponseStream of an Anthropic model: its events, base64 in `bytes`."""
    events = [{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                    "model": "claude", "content": [],
                                                    "usage": {"input_tokens": 3, "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in pieces]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
               {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3,
                                                                            "outputTokenCount": 4}}]
    return b"".join(frame("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode(),
                                                 "p": "abcdefgh"}).encode()) for e in events)


def gemini_array(pieces):
    """Gemini streamGenerateContent without alt=sse, formatted as Google sends it."""
    chunks = []
    for i, p in enumerate(pieces):
        candidate = {"content": {"parts": [{"text": p}], "role": "model"}, "index": 0}
        if i == len(pieces) - 1:
            candidate["finishReason"] = "STOP"
        chunks.append(json.dumps({"candidates": [candidate], "usageMetadata": {"promptTokenCount": 2},
                                  "modelVersion": "gemini-2.5-flash", "responseId": "r1"}, indent=2))
    return ("[" + "\r\n,".join(chunks) + "\r\n]").encode()


def start(mock, tmp_path, checks, upstream=None, content_type="application/json"):
    """A gateway with `checks` (spec lines); aws-bedrock on the mock, or with `upstream` (a body)
    aws-bedrock and custom-gemini on a server answering it."""
    server = FixedAnswerServer(upstream, content_type=content_type) if upstream is not None else None
    target = server.url if server else mock.url
    spec = (f"    aws-bedrock: {{baseURL: '{target}'}}\n"
            f"    custom-gemini: {{baseURL: '{target}'}}\n"
            f"    google-ai-studio: {{baseURL: '{mock.url}'}}\n" + checks)
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    return g, server


def dlp(action, profile):
    return f"  dlp:\n    policies:\n      - {{id: out, action: {action}, check: [RESPONSE], profiles: [{profile}]}}\n"


def guardrails(mock, side):
    return f"  guardrails:\n    moderationURL: '{mock.url}/v1/moderations'\n    {side}: {{violence: block}}\n"


def converse(g, text):
    body = {"messages": [{"role": "user", "content": [{"text": text}]}]}
    return httpx.post(g.url + BEDROCK + "/converse-stream", json=body, headers=SIGNED, timeout=30)


def invoke(g):
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(g.url + BEDROCK + "/invoke-with-response-stream", json=body, headers=SIGNED, timeout=30)


def gemini(g):
    return httpx.post(g.url + GEMINI_STREAM, json={"contents": [{"parts": [{"text": "hi"}]}]},
                      headers={"x-goog-api-key": "k"}, timeout=30)


def moderated(mock):
    """The inputs the gateway sent to the moderation endpoint."""
    return [json.loads(r["body"])["input"] for r in mock.requests() if r["path"].endswith("/moderations")]


# --- DLP on responses ---------------------------------------------------------------------

def test_dlp_reads_a_bedrock_converse_stream_word_by_word(mock, tmp_path):
    # The mock sends one word per event: the card's groups are in four binary frames.
    g, _ = start(mock, tmp_path, dlp("BLOCK", "credit-card"))
    try:
        r = converse(g, f"card {CARD}")
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030), r.text
        assert "4111" not in r.text
        ok = converse(g, "card 4111 1111 1111 1112")
        assert ok.status_code == 200 and ok.headers["content-type"] == EVENT_STREAM
    finally:
        g.stop()
    g, _ = start(mock, tmp_path, dlp("FLAG", "credit-card"))
    try:
        r = converse(g, f"card {CARD}")
        assert r.status_code == 200 and r.headers["content-type"] == EVENT_STREAM
        assert json.loads(r.headers["cf-aig-dlp"]) == [{"policy": "out", "profiles": ["credit-card"],
                                                        "check": "RESPONSE"}]
        assert b"1111" in r.content, "the stream itself is delivered as it came"
    finally:
        g.stop()


@pytest.mark.parametrize("fmt", ["invoke-with-response-stream", "gemini"])
@pytest.mark.parametrize("action", ["BLOCK", "FLAG"])
def test_dlp_reads_invoke_streams_and_gemini_json_streams(mock, tmp_path, fmt, action):
    pieces = ["Your card is 4111 11", "11 1111 1111, ssn 123-4", "5-6789."]
    upstream, content_type, send = ((invoke_stream(pieces), EVENT_STREAM, invoke) if fmt != "gemini"
                                    else (gemini_array(pieces), "application/json", gemini))
    g, server = start(mock, tmp_path, dlp(action, "credit-card, us-ssn"), upstream, content_type)
    try:
        r = send(g)
        if action == "BLOCK":
            assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030), r.text
            assert "credit-card" in r.text and "us-ssn" in r.text
        else:
            assert r.status_code == 200 and r.content == upstream
            assert json.loads(r.headers["cf-aig-dlp"]) == [{"policy": "out", "profiles": ["credit-card", "us-ssn"],
                                                            "check": "RESPONSE"}]
    finally:
        g.stop()
        server.stop()


@pytest.mark.parametrize("fmt", ["invoke-with-response-stream", "gemini"])
def test_clean_streams_pass_the_dlp_untouched(mock, tmp_path, fmt):
    pieces = ["order 4111 11", "11 1111 1112 ships ", "today"]
    upstream, content_type, send = ((invoke_stream(pieces), EVENT_STREAM, invoke) if fmt != "gemini"
                                    else (gemini_array(pieces), "application/json", gemini))
    g, server = start(mock, tmp_path, dlp("BLOCK", "credit-card"), upstream, content_type)
    try:
        r = send(g)
        assert r.status_code == 200 and r.content == upstream and "cf-aig-dlp" not in r.headers
    finally:
        g.stop()
        server.stop()


# --- guardrails on responses --------------------------------------------------------------

def test_response_guardrails_moderate_the_text_of_a_converse_stream(mock, tmp_path):
    g, _ = start(mock, tmp_path, guardrails(mock, "response"))
    try:
        r = converse(g, "say mock-flag:violence")
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
        # The model's words, not the frames' bytes (binary preludes, JSON, padding).
        assert moderated(mock) == ["mock reply to: say mock-flag:violence"]
        mock.clear()
        assert converse(g, "say hello").status_code == 200
        assert moderated(mock) == ["mock reply to: say hello"]
    finally:
        g.stop()


@pytest.mark.parametrize("fmt", ["invoke-with-response-stream", "gemini"])
def test_response_guardrails_moderate_invoke_streams_and_gemini_json_streams(mock, tmp_path, fmt):
    # The flagged phrase is split across two events.
    pieces = ["Sure: mock-fl", "ag:violence", " done"]
    upstream, content_type, send = ((invoke_stream(pieces), EVENT_STREAM, invoke) if fmt != "gemini"
                                    else (gemini_array(pieces), "application/json", gemini))
    g, server = start(mock, tmp_path, guardrails(mock, "response"), upstream, content_type)
    try:
        r = send(g)
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
        assert moderated(mock) == ["Sure: mock-flag:violence done"]
    finally:
        g.stop()
        server.stop()


# --- guardrails on prompts: tool inputs, tool results, documents ---------------------------

FLAG = "please mock-flag:violence"

ANTHROPIC_PROMPTS = {
    "tool_use input": [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                           "input": {"query": {"words": [FLAG]}}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "none"}]}],
    "tool_result blocks": [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": FLAG}]}]}],
    "text document": [
        {"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": FLAG}},
            {"type": "text", "text": "summarize"}]}],
}


@pytest.mark.parametrize("case", sorted(ANTHROPIC_PROMPTS))
def test_prompt_guardrails_read_anthropic_tool_inputs_results_and_documents(mock, tmp_path, case):
    g, _ = start(mock, tmp_path, guardrails(mock, "prompt"))
    try:
        body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": ANTHROPIC_PROMPTS[case]}
        r = httpx.post(g.url + "/anthropic/v1/messages", json=body, timeout=30)
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), r.text
        assert [q["path"] for q in mock.requests()] == ["/v1/moderations"], "never sent upstream"
        assert any(FLAG in i for i in moderated(mock))
    finally:
        g.stop()


def test_prompt_guardrails_read_gemini_function_calls_and_responses(mock, tmp_path):
    g, _ = start(mock, tmp_path, guardrails(mock, "prompt"))
    try:
        call = {"functionCall": {"name": "lookup", "args": {"q": {"deep": FLAG}}}}
        result = {"functionResponse": {"name": "lookup", "response": {"result": [FLAG]}}}
        for part in (call, result):
            body = {"contents": [{"role": "user", "parts": [{"text": "look it up"}]},
                                 {"role": "model" if part is call else "user", "parts": [part]}]}
            r = httpx.post(g.url + "/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent",
                           json=body, headers={"x-goog-api-key": "k"}, timeout=30)
            assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), (part, r.text)
        assert [q["path"] for q in mock.requests()] == ["/v1/moderations"] * 2
    finally:
        g.stop()


def test_prompt_guardrails_read_bedrock_tool_use_and_json_tool_results(mock, tmp_path):
    g, _ = start(mock, tmp_path, guardrails(mock, "prompt"))
    try:
        use = {"toolUse": {"toolUseId": "tooluse_1", "name": "lookup", "input": {"q": FLAG}}}
        result = {"toolResult": {"toolUseId": "tooluse_1", "content": [{"json": {"rows": [{"v": FLAG}]}}]}}
        for block in (use, result):
            body = {"messages": [{"role": "user", "content": [{"text": "look it up"}]},
                                 {"role": "assistant" if block is use else "user", "content": [block]}]}
            r = httpx.post(g.url + BEDROCK + "/converse", json=body, headers=SIGNED, timeout=30)
            assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), (block, r.text)
        assert [q["path"] for q in mock.requests()] == ["/v1/moderations"] * 2
    finally:
        g.stop()


def test_prompt_guardrails_read_openai_tool_messages_and_responses_api_outputs(mock, tmp_path):
    g, _ = start(mock, tmp_path, guardrails(mock, "prompt"))
    try:
        chat = {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": FLAG}]}
        responses = {"model": "gpt-4o-mini", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look it up"}]},
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": FLAG}]}
        for path, body in (("/openai/chat/completions", chat), ("/openai/responses", responses)):
            r = httpx.post(g.url + path, json=body, timeout=30)
            assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), (path, r.text)
        assert [q["path"] for q in mock.requests()] == ["/v1/moderations"] * 2
    finally:
        g.stop()
