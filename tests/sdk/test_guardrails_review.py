"""Review of the guardrails (r170, at 263510d): what text of each provider's answers and prompts
reaches the moderation service, the universal endpoint's steps, the log of a blocked prompt, and
what holds (reloads, answers of every non-streamed format, long streams, concurrent checks).

The moderation service is test_guardrails_edges' scripted `Moderation` (a category flagged when
an input holds `mock-flag:<category>`); upstreams are fixed-answer servers speaking the
providers' wire formats. Tests marked `# Failed at 263510d (mended since)` reproduce defects
found in review."""

import json
import threading
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from test_guardrails_edges import Moderation, chat, completion, metric, sse
from test_live_reload import reload_count, wait_for
from test_log_outcomes import json_line

CHAT = "/openai/chat/completions"
WORKERS = "/v1/acct123/main/workers-ai/@cf/meta/llama-3.1-8b-instruct"
SIGNED = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-west-2/bedrock/aws4_request, "
                           "SignedHeaders=host;x-amz-date, Signature=aa", "x-amz-date": "20260101T000000Z"}
SSE = "text/event-stream"


@pytest.fixture
def moderation():
    m = Moderation()
    yield m
    m.stop()


def guarded(tmp_path, upstream_url, moderation, rules, extra="", args=()):
    """A gateway whose providers (workers-ai, huggingface, cohere, aws-bedrock, google-ai-studio
    too) all point at `upstream_url`, with guardrails `rules` on `moderation`."""
    spec = (f"    workers-ai: {{baseURL: '{upstream_url}/client/v4/accounts/{{account}}/ai'}}\n"
            f"    huggingface: {{baseURL: '{upstream_url}'}}\n"
            f"    cohere: {{baseURL: '{upstream_url}'}}\n"
            f"    aws-bedrock: {{baseURL: '{upstream_url}'}}\n"
            f"    google-ai-studio: {{baseURL: '{upstream_url}'}}\n"
            f"  guardrails:\n    moderationURL: '{moderation.url}'\n{rules}{extra}")
    keys = dict(DEFAULT_KEYS, **{"workers-ai.default": "cf-acct-key", "huggingface.default": "hf-key"})
    return Sidegate(tmp_path, gateway_yaml(upstream_url, extra_spec=spec), keys, extra_args=list(args))


def data_events(*events):
    """An SSE body of `data:` lines only (OpenAI chat, Workers AI), ended by `[DONE]`."""
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


def chunk(delta, model="gpt-4o-mini"):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def assert_blocked_answer(r, moderation):
    assert r.status_code == 424, f"served ({r.status_code}): {r.text[:160]!r}; moderated: {moderation.text()!r}"
    assert r.json()["error"][0]["code"] == 2017, r.text


# --- defects ---------------------------------------------------------------------------------

# Failed at 263510d (mended since): text.rs TEXT_KEYS lacks Workers AI's (and Ollama /api/generate's) `response`: their streams' text is never moderated (no call at all), and a non-streamed answer with tool_calls is moderated as the tool arguments only
@pytest.mark.parametrize("case", ["workers-ai-stream", "workers-ai-tool-calls", "ollama-generate-stream"])
def test_a_workers_ai_answer_is_moderated_by_its_response_text(tmp_path, moderation, case):
    if case == "workers-ai-stream":
        # Workers AI's own stream: `data: {"response": "<token>"}` events, then [DONE].
        path, body, ctype = WORKERS, data_events(*({"response": t, "p": "abcdef"} for t in
                                                   ["Sure: mock-fl", "ag:violence", " now"])), SSE
        req = {"prompt": "tell me", "stream": True}
    elif case == "workers-ai-tool-calls":
        # A Llama 3.1 answer with text beside its tool call (Workers AI's envelope).
        path, ctype = WORKERS, "application/json"
        body = json.dumps({"result": {"response": "Sure: mock-flag:violence",
                                      "tool_calls": [{"name": "lookup", "arguments": {"q": "weather"}}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
                           "success": True, "errors": [], "messages": []}).encode()
        req = {"prompt": "tell me", "tools": [{"name": "lookup", "description": "d", "parameters": {}}]}
    else:
        # Ollama's /api/generate streams JSON lines whose text is `response` (its /api/chat twin,
        # `message.content`, is blocked: test_guardrails_edges).
        path, ctype = "/custom-local/api/generate", "application/x-ndjson"
        lines = [{"model": "llama3", "created_at": "2026-01-01T00:00:00Z", "response": t, "done": False}
                 for t in ["Sure: mock-fl", "ag:violence", " now"]]
        lines.append({"model": "llama3", "created_at": "2026-01-01T00:00:01Z", "response": "", "done": True,
                      "eval_count": 3})
        body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        req = {"model": "llama3", "prompt": "tell me", "stream": True}
    up = FixedAnswerServer(body, content_type=ctype)
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + path, json=req, timeout=30)
        assert_blocked_answer(r, moderation)
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): a chat completion streamed with audio output (gpt-4o-audio-preview) carries its words in `delta.audio.transcript`, which text.rs never reads in a stream: the moderation service is not even called
def test_a_streamed_audio_answers_transcript_is_moderated(tmp_path, moderation):
    model = "gpt-4o-audio-preview"
    events = [chunk({"role": "assistant", "content": None, "refusal": None}, model)]
    events += [chunk({"audio": {"id": "audio_1", "transcript": t}}, model)
               for t in ["Sure: mock-fl", "ag:violence", " now"]]
    events += [chunk({"audio": {"id": "audio_1", "data": "AAAA" * 100}}, model)]
    up = FixedAnswerServer(data_events(*events), content_type=SSE)
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        req = chat("say it", model=model, stream=True, modalities=["text", "audio"],
                   audio={"voice": "alloy", "format": "pcm16"})
        r = httpx.post(g.url + CHAT, json=req, timeout=30)
        assert_blocked_answer(r, moderation)
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): the reasoning text Groq (`reasoning_format: parsed`) and OpenRouter return in `message.reasoning` / `delta.reasoning` is not moderated (DeepSeek's `reasoning_content` is): TEXT_KEYS lacks `reasoning`
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_reasoning_text_of_a_groq_answer_is_moderated(tmp_path, moderation, stream):
    model = "qwen/qwen3-32b"
    if stream:
        body = data_events(chunk({"role": "assistant", "content": ""}, model),
                           chunk({"reasoning": "They want mock-fl"}, model),
                           chunk({"reasoning": "ag:violence details."}, model),
                           chunk({"content": "Here it is."}, model))
    else:
        body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                           "choices": [{"index": 0, "finish_reason": "stop", "message": {
                               "role": "assistant", "content": "Here it is.",
                               "reasoning": "They want mock-flag:violence details."}}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}).encode()
    up = FixedAnswerServer(body, content_type=SSE if stream else "application/json")
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        req = chat("hi", model=model, stream=stream, reasoning_format="parsed")
        r = httpx.post(g.url + "/groq/chat/completions", json=req, headers={"authorization": "Bearer gsk-own"},
                       timeout=30)
        assert moderation.seen, "the answer was never moderated"
        assert_blocked_answer(r, moderation)
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): universal.rs joins every step's query into one JSON array for text::of_request, whose "every string when the body has no known text field" applies to the whole array: a step whose API keeps its prompt elsewhere (Hugging Face's `inputs`) is never moderated beside a chat step, and is served when the chat step fails
def test_each_universal_steps_query_is_read_as_the_body_it_is(tmp_path, moderation):
    hf = {"provider": "huggingface", "endpoint": "models/gpt2", "headers": {},
          "query": {"inputs": "mock-flag:violence", "parameters": {"max_new_tokens": 5}}}
    chat_step = {"provider": "openai", "endpoint": "chat/completions", "headers": {}, "query": chat("hello")}
    up = FixedAnswerServer(b'[{"generated_text": "ok"}]')
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        # Alone, the Hugging Face step's prompt is read (the body has no known text field)...
        r = httpx.post(g.url + "/", json=[hf], timeout=30)
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), r.text
    finally:
        g.stop()
        up.stop()
    # ...but not after a chat step (one that fails: the HF step then serves).
    up = FixedAnswerServer(b'{"error": {"message": "down"}}', status=500,
                           then=[(200, b'[{"generated_text": "ok"}]')])
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/", json=[chat_step, hf], timeout=30)
        assert r.status_code == 424, (f"served by step {r.headers.get('cf-aig-step')} ({r.status_code}); "
                                      f"moderated: {moderation.seen[-1]['inputs']!r}")
        assert r.json()["error"][0]["code"] == 2016
    finally:
        g.stop()
        up.stop()


def violence_in_russian(inputs):
    """A moderation service that flags `violence` for the Russian word for it."""
    cats = [{"violence": "насилие" in i} for i in inputs]
    return 200, json.dumps({"results": [{"flagged": c["violence"], "categories": c} for c in cats]}).encode()


# Failed at 263510d (mended since): a tool result or tool-call arguments sent as a JSON string (json.dumps, as the SDK docs do) reach the moderation service as `\u043d\u0430...` escapes, not the text the model reads: non-English tool output is never moderated
@pytest.mark.parametrize("where", ["openai-tool-message", "openai-tool-arguments", "anthropic-tool-result"])
def test_tool_text_sent_as_a_json_string_is_moderated_as_its_text(tmp_path, where):
    m = Moderation(answer=violence_in_russian)
    up = FixedAnswerServer(completion("fine"))
    g = guarded(tmp_path, up.url, m, "    prompt: {violence: block}\n")
    found = json.dumps({"page": "статья про насилие"})  # ensure_ascii: \u-escaped, as Python sends it
    call = {"id": "t1", "type": "function", "function": {"name": "search", "arguments": json.dumps({"q": "x"})}}
    if where == "openai-tool-message":
        path, body = CHAT, {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "t1", "content": found}]}
    elif where == "openai-tool-arguments":
        call["function"]["arguments"] = found
        path, body = CHAT, {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "t1", "content": "done"}]}
    else:
        path, body = "/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": found}]}]}
    try:
        # The same words as plain text are blocked.
        assert httpx.post(g.url + CHAT, json=chat("статья про насилие")).status_code == 424
        r = httpx.post(g.url + path, json=body, timeout=30)
        assert r.status_code == 424, f"served ({r.status_code}); moderated: {m.seen[-1]['inputs']!r}"
        assert r.json()["error"][0]["code"] == 2016
    finally:
        g.stop()
        up.stop()
        m.stop()


# Failed at 263510d (mended since): with `logging: {payloads: true}` the access line of a prompt the guardrails blocked has neither `request_body` (what was blocked) nor `response_body` (the error), though a blocked answer's line carries both (Gateway::refuse logs no payloads)
def test_a_blocked_prompt_is_logged_with_its_payloads(tmp_path, moderation):
    up = FixedAnswerServer(completion("fine"))
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n",
                extra="  logging: {payloads: true}\n", args=["--log-format", "json"])
    try:
        r = httpx.post(g.url + CHAT, json=chat("tell me mock-flag:violence"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), r.text
        line = json_line(g, r.headers["cf-aig-log-id"])
        assert (line["status_code"], line["outcome"]) == (424, "refused"), line
        assert "mock-flag:violence" in (line.get("request_body") or ""), f"the blocked prompt is not logged: {line}"
        assert line.get("response_body") == r.text, line
    finally:
        g.stop()
        up.stop()


def responses_object(text, instructions, status="completed"):
    """A Responses API response object (OpenAI echoes the request's `instructions` in it)."""
    output = [] if text is None else [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                       "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": "gpt-4o-mini",
            "instructions": instructions, "output": output,
            "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8} if status == "completed" else None}


# Failed at 263510d (mended since): the response check reads text the answer echoes of the request (the Responses API's `instructions`, Cohere v1's `chat_history`): a prompt the operator lets through (`flag`) blocks every answer to it as a "response" violation
@pytest.mark.parametrize("api", ["responses-instructions", "cohere-v1-chat-history"])
def test_the_response_check_reads_the_answer_not_the_prompt_it_echoes(tmp_path, moderation, api):
    prompt = "Summarise this film review about mock-flag:violence in westerns."
    if api == "responses-instructions":
        path, req = "/openai/responses", {"model": "gpt-4o-mini", "instructions": prompt, "input": "go"}
        answer = responses_object("A calm two-line summary.", prompt)
    else:
        path, req = "/cohere/v1/chat", {"model": "command-r", "message": prompt}
        answer = {"response_id": "r1", "text": "A calm two-line summary.", "generation_id": "g1",
                  "chat_history": [{"role": "USER", "message": prompt},
                                   {"role": "CHATBOT", "message": "A calm two-line summary."}],
                  "finish_reason": "COMPLETE", "meta": {"billed_units": {"input_tokens": 9, "output_tokens": 5}}}
    up = FixedAnswerServer(json.dumps(answer).encode())
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: flag}\n    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + path, json=req, headers={"authorization": "Bearer own-key"}, timeout=30)
        assert metric(g, "flag") == 1, "the prompt was not flagged"
        assert r.status_code == 200, f"blocked ({r.text[:120]}); the response check read {moderation.seen[-1]['inputs']!r}"
    finally:
        g.stop()
        up.stop()


def responses_stream(text, instructions, deltas=200):
    """A Responses API stream as OpenAI sends it: the text in deltas, then again whole in its
    `.done` events and in `response.completed`."""
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [{"type": "response.created", "response": responses_object(None, instructions, "in_progress")},
              {"type": "response.output_item.added", "output_index": 0, "item": dict(item, content=[])},
              {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": ""}}]
    step = max(1, len(text) // deltas)
    events += [{"type": "response.output_text.delta", **at, "delta": text[i:i + step]}
               for i in range(0, len(text), step)]
    events += [{"type": "response.output_text.done", **at, "text": text},
               {"type": "response.content_part.done", **at, "part": item["content"][0]},
               {"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": responses_object(text, instructions)}]
    return sse(*events)


# Failed at 263510d (mended since): a Responses stream's text is sent to moderation five times (its deltas, then the `.done`, `content_part.done`, `output_item.done` and `response.completed` copies), so a 440 KB answer is refused 424/2017 "too long" while the same answer unstreamed is served
def test_a_long_responses_stream_is_moderated_once_as_its_unstreamed_twin_is(tmp_path, moderation):
    text = "calm words " * 40_000  # 440 KB, about 100k tokens
    up = FixedAnswerServer(json.dumps(responses_object(text, "Be brief.")).encode())
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/responses", json={"model": "gpt-4o-mini", "input": "q"}, timeout=60)
        assert r.status_code == 200, r.text[:200]
    finally:
        g.stop()
        up.stop()
    moderation.seen.clear()
    up = FixedAnswerServer(responses_stream(text, "Be brief."), content_type=SSE)
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + "/openai/responses", json={"model": "gpt-4o-mini", "input": "q", "stream": True},
                       timeout=60)
        assert r.status_code == 200, f"{r.text[:200]}; moderated {sum(len(i) for s in moderation.seen for i in s['inputs'])} chars"
        assert r.text.rstrip().endswith("}") and "response.completed" in r.text
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): an answer the response guardrails blocked is stored in the cache: the same request is then refused from the cache (HIT) for the whole TTL, the provider never asked again
def test_an_answer_the_guardrails_blocked_is_not_cached(tmp_path, moderation):
    up = FixedAnswerServer(completion("here: mock-flag:violence"), then=[(200, completion("a calm answer"))])
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n", extra="  cache: {enabled: true}\n")
    try:
        r = httpx.post(g.url + CHAT, json=chat("same question"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017), r.text
        time.sleep(0.3)
        again = httpx.post(g.url + CHAT, json=chat("same question"))
        assert again.status_code == 200, (f"{again.status_code} cf-aig-cache-status="
                                          f"{again.headers.get('cf-aig-cache-status')}: the refused answer was replayed")
        assert "a calm answer" in again.text
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): a Responses request's reusable-prompt `variables` (text substituted into the stored prompt) are not moderated beside an `input`: text.rs reads only TEXT_KEYS once a body has one
def test_the_variables_of_a_responses_prompt_template_are_moderated(tmp_path, moderation):
    up = FixedAnswerServer(json.dumps(responses_object("ok", None)).encode())
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        req = {"model": "gpt-4o-mini", "input": "write about the topic",
               "prompt": {"id": "pmpt_123", "version": "2", "variables": {"topic": "mock-flag:violence"}}}
        r = httpx.post(g.url + "/openai/responses", json=req, timeout=30)
        assert r.status_code == 424, f"served; moderated: {moderation.text()!r}"
        assert r.json()["error"][0]["code"] == 2016
    finally:
        g.stop()
        up.stop()


# Failed at 263510d (mended since): Cohere's tool results are not moderated: v2's `{"type": "document", "document": {"data": json.dumps(result)}}` (Cohere's own tool-use example; text.rs reads `document.data` only when it is no string) and v1's `tool_results[].outputs` objects
@pytest.mark.parametrize("api", ["v2-document-data", "v1-tool-results"])
def test_cohere_tool_results_are_moderated(tmp_path, moderation, api):
    result = {"headline": "mock-flag:violence", "source": "news"}
    if api == "v2-document-data":
        path, req = "/cohere/v2/chat", {"model": "command-a-03-2025", "messages": [
            {"role": "user", "content": "what is in the news?"},
            {"role": "assistant", "tool_plan": "I will search.", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "news", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t1",
             "content": [{"type": "document", "document": {"data": json.dumps(result)}}]}]}
    else:
        path, req = "/cohere/v1/chat", {"model": "command-r", "message": "",
                                        "chat_history": [{"role": "USER", "message": "what is in the news?"}],
                                        "tool_results": [{"call": {"name": "news", "parameters": {}},
                                                          "outputs": [result]}]}
    up = FixedAnswerServer(b'{"id": "c1", "finish_reason": "COMPLETE", "text": "ok"}')
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        r = httpx.post(g.url + path, json=req, headers={"authorization": "Bearer own-key"}, timeout=30)
        assert r.status_code == 424, f"served; moderated: {moderation.text()!r}"
        assert r.json()["error"][0]["code"] == 2016
    finally:
        g.stop()
        up.stop()


# --- behaviour that holds --------------------------------------------------------------------

def test_a_reload_changes_the_guardrails_for_the_next_request_and_a_bad_one_keeps_them(tmp_path, moderation):
    up = FixedAnswerServer(completion("a calm answer"))
    g = guarded(tmp_path, up.url, moderation, "    prompt: {violence: block}\n")
    try:
        assert httpx.post(g.url + CHAT, json=chat("mock-flag:violence")).status_code == 424
        good = g.config.read_text()
        # block -> flag, and a response category added.
        before = reload_count(g, "success")
        g.config.write_text(good.replace("prompt: {violence: block}",
                                         "prompt: {violence: flag}\n    response: {hate: block}"))
        wait_for(lambda: reload_count(g, "success") > before, 8, "guardrails not reloaded")
        r = httpx.post(g.url + CHAT, json=chat("mock-flag:violence"))
        assert r.status_code == 200 and metric(g, "flag") == 1, r.text
        # An unknown category is refused at reload; the last good guardrails stay.
        before = reload_count(g, "error")
        g.config.write_text(g.config.read_text().replace("response: {hate: block}", "response: {gore: block}"))
        wait_for(lambda: reload_count(g, "error") > before, 8, "bad guardrails not refused")
        assert "gore" in g.logs()
        r = httpx.post(g.url + CHAT, json=chat("mock-flag:violence"))
        assert r.status_code == 200 and metric(g, "flag") == 2, r.text
        # Guardrails removed: nothing is sent to the moderation service any more.
        before = reload_count(g, "success")
        g.config.write_text(good.replace("    prompt: {violence: block}\n", ""))
        wait_for(lambda: reload_count(g, "success") > before, 8, "removal not reloaded")
        seen = len(moderation.seen)
        assert httpx.post(g.url + CHAT, json=chat("mock-flag:violence")).status_code == 200
        assert len(moderation.seen) == seen
    finally:
        g.stop()
        up.stop()


ANSWERS = {
    "anthropic": ("/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 9,
                                             "messages": [{"role": "user", "content": "q"}]},
                  {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                   "content": [{"type": "thinking", "thinking": "fine", "signature": "c2ln"},
                               {"type": "text", "text": "Sure: mock-flag:violence"}],
                   "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 5}}),
    "gemini": ("/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent",
               {"contents": [{"role": "user", "parts": [{"text": "q"}]}]},
               {"candidates": [{"content": {"role": "model", "parts": [{"text": "Sure: mock-flag:violence"}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 5, "totalTokenCount": 7}}),
    "bedrock-converse": ("/aws-bedrock/bedrock-runtime/us-west-2/model/anthropic.claude-3-haiku-20240307-v1:0/converse",
                         {"messages": [{"role": "user", "content": [{"text": "q"}]}]},
                         {"output": {"message": {"role": "assistant", "content": [{"text": "Sure: mock-flag:violence"}]}},
                          "stopReason": "end_turn", "usage": {"inputTokens": 3, "outputTokens": 5, "totalTokens": 8},
                          "metrics": {"latencyMs": 100}}),
    "responses": ("/openai/responses", {"model": "gpt-4o-mini", "input": "q"},
                  {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o-mini",
                   "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": "Sure: mock-flag:violence",
                                            "annotations": []}]}],
                   "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}}),
    "cohere-v2": ("/cohere/v2/chat", {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "q"}]},
                  {"id": "c1", "finish_reason": "COMPLETE",
                   "message": {"role": "assistant", "content": [{"type": "text", "text": "Sure: mock-flag:violence"}]},
                   "usage": {"tokens": {"input_tokens": 3, "output_tokens": 5}}}),
    "workers-ai": (WORKERS, {"prompt": "q"},
                   {"result": {"response": "Sure: mock-flag:violence",
                               "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
                    "success": True, "errors": [], "messages": []}),
}


@pytest.mark.parametrize("fmt", list(ANSWERS))
def test_a_non_streamed_answer_of_each_format_is_moderated_by_its_text(tmp_path, moderation, fmt):
    path, req, answer = ANSWERS[fmt]
    up = FixedAnswerServer(json.dumps(answer).encode())
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        r = httpx.post(g.url + path, json=req, headers=dict(SIGNED, **{"x-goog-api-key": "own"}), timeout=30)
        assert_blocked_answer(r, moderation)
        # The model's words, not the envelope's ids and names.
        assert "msg_1" not in moderation.text() and "resp_1" not in moderation.text(), moderation.text()
    finally:
        g.stop()
        up.stop()


def test_a_long_stream_is_checked_whole_in_bounded_time(tmp_path, moderation):
    # ~11 MB of chat chunks, the flagged phrase split over the last two: held, read, blocked.
    pieces = ["word "] * 60_000 + ["mock-fl", "ag:violence"]
    up = FixedAnswerServer(data_events(*(chunk({"content": p}) for p in pieces)), content_type=SSE)
    g = guarded(tmp_path, up.url, moderation, "    response: {violence: block}\n")
    try:
        t0 = time.monotonic()
        r = httpx.post(g.url + CHAT, json=chat("hi", stream=True), timeout=60)
        assert_blocked_answer(r, moderation)
        assert time.monotonic() - t0 < 20
        # 300 KB of text: five overlapping inputs of one moderation request.
        assert [len(s["inputs"]) for s in moderation.seen] == [5]
    finally:
        g.stop()
        up.stop()


def test_slow_moderation_checks_run_side_by_side(tmp_path):
    m = Moderation(delay=1.0)
    up = FixedAnswerServer(completion("fine"))
    g = guarded(tmp_path, up.url, m, "    prompt: {violence: block}\n")
    try:
        codes = []

        def one(i):
            codes.append(httpx.post(g.url + CHAT, json=chat(f"hello {i}"), timeout=30).status_code)

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 6
        assert time.monotonic() - t0 < 3.5, "the checks waited for one another"
    finally:
        g.stop()
        up.stop()
        m.stop()
