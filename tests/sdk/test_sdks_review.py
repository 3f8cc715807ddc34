"""Official provider SDKs other than openai/anthropic, pointed at sidegate the way Cloudflare's
provider pages configure them (developers.cloudflare.com/ai-gateway/usage/providers/...):

- google-genai: `genai.Client(http_options={"base_url": ".../google-ai-studio"})`
- mistralai:    `Mistral(server_url=".../mistral")` (the SDK adds /v1/chat/completions)
- groq:         `Groq(base_url=".../groq")` (the SDK adds /openai/v1/chat/completions)
- cohere:       `cohere.ClientV2(base_url=".../cohere")` (the SDK adds /v2/chat)
- boto3:        `boto3.client("bedrock-runtime", endpoint_url=".../aws-bedrock/bedrock-runtime/{region}")`
                with the AWS credentials stored in the gateway (BYOK: "the gateway automatically signs
                each request"), signed by the SDK with placeholder credentials or left unsigned
- anthropic:    AnthropicBedrock / AnthropicVertex with their base_url at the gateway

For each: the SDK's request reaches the upstream at the right URL with the stored key (and not the
app's placeholder), streamed and whole answers come back in a shape the SDK parses, tokens (and cost
where the model is priced) are logged, and provider errors come back unchanged so the SDK raises its
own exception. Upstreams the mock does not speak (Cohere v2, Claude on Bedrock's InvokeModel and on
Vertex's rawPredict) are small loopback servers here speaking the provider's documented wire format.

Every SDK is optional (pytest.importorskip): the CI venv (tests/requirements.txt) has none of them.
"""

import base64
import hashlib
import hmac
import http.server
import json
import re
import struct
import threading
import urllib.parse
import zlib

import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, Sidegate, gateway_yaml

GOOGLE_KEY = f"AIza-{KEY_MARKER}-google"
VERTEX_TOKEN = f"ya29.{KEY_MARKER}-vertex"
MISTRAL_KEY = f"{KEY_MARKER}-mistral"
GROQ_KEY = f"gsk_{KEY_MARKER}-groq"
COHERE_KEY = f"{KEY_MARKER}-cohere"
AWS_ACCESS = "AKIDSTORED"
AWS_SECRET = f"{KEY_MARKER}-aws-secret/K7MDENG+bPxRfiCY"
PLACEHOLDER = "placeholder-from-app"

KEYS = dict(
    DEFAULT_KEYS,
    **{
        "google-ai-studio.default": GOOGLE_KEY,
        "google-vertex-ai.default": VERTEX_TOKEN,
        "mistral.default": MISTRAL_KEY,
        "groq.default": GROQ_KEY,
        "cohere.default": COHERE_KEY,
        "aws-bedrock.default": json.dumps({"accessKeyId": AWS_ACCESS, "secretAccessKey": AWS_SECRET}),
    },
)


# --- loopback upstreams --------------------------------------------------------------------------

class Loopback:
    """A recording loopback HTTP/1.1 server; `answer(method, path, query, headers, body)` returns
    `(status, headers, body)` where body is bytes or a list of byte chunks sent chunked."""

    def __init__(self, answer):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path, _, query = self.path.partition("?")
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append({"method": self.command, "path": path, "query": query or None,
                                       "headers": headers, "body": body.decode("utf-8", "replace")})
                status, resp_headers, resp = answer(self.command, path, query, headers, body)
                self.send_response(status)
                for k, v in resp_headers:
                    self.send_header(k, v)
                if isinstance(resp, list):
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for chunk in resp:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-length", str(len(resp)))
                    self.end_headers()
                    self.wfile.write(resp)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def last(self):
        assert self.requests, "the loopback upstream received no request"
        return self.requests[-1]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _sse(events):
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


# Cohere bills `billed_units`; `tokens` also counts what Cohere adds itself (its default
# preamble), as in Cohere's own examples (billed 3 input tokens, 69 processed).
COHERE_BILLED = {"input_tokens": 4, "output_tokens": 3}
COHERE_PROCESSED = {"input_tokens": 70, "output_tokens": 3}


def cohere_answer(method, path, query, headers, body):
    """Cohere's Chat API (docs.cohere.com/reference/chat, chat-stream; v1: docs.cohere.com/v1/reference/chat).
    v2: a `message` with content blocks and `usage.{billed_units,tokens}`; streams are SSE
    `message-start`, `content-start`, `content-delta`..., `content-end`, `message-end` (with the usage).
    v1: `text` and `meta.{billed_units,tokens}`; streams are JSON lines `stream-start`,
    `text-generation`..., `stream-end` (with the whole `response`)."""
    req = json.loads(body or b"{}")
    json_type = [("content-type", "application/json")]
    if req.get("model") == "over-limit":
        return 429, json_type, json.dumps(
            {"id": "e1", "message": "You are using a Trial key, which is limited to 10 API calls / minute."}).encode()
    if path.endswith("/v1/chat"):
        text = "cohere says: " + req["message"]
        response = {"response_id": "r-1", "text": text, "generation_id": "g-1", "chat_history": [],
                    "finish_reason": "COMPLETE",
                    "meta": {"api_version": {"version": "1"}, "billed_units": COHERE_BILLED, "tokens": COHERE_PROCESSED}}
        if not req.get("stream"):
            return 200, json_type, json.dumps(response).encode()
        lines = [{"is_finished": False, "event_type": "stream-start", "generation_id": "g-1"}]
        lines += [{"is_finished": False, "event_type": "text-generation", "text": (" " if i else "") + w}
                  for i, w in enumerate(text.split(" "))]
        lines.append({"is_finished": True, "event_type": "stream-end", "finish_reason": "COMPLETE", "response": response})
        return 200, [("content-type", "application/stream+json")], [json.dumps(x).encode() + b"\n" for x in lines]
    if path.endswith("/v2/embed"):
        return 200, json_type, json.dumps({
            "id": "e-1", "embeddings": {"float": [[0.1, 0.2, 0.3] for _ in req["texts"]]}, "texts": req["texts"],
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 3}},
            "response_type": "embeddings_by_type"}).encode()
    if not path.endswith("/v2/chat"):
        return 404, json_type, b'{"message":"not found"}'
    text = "cohere says: " + req["messages"][-1]["content"]
    usage = {"billed_units": COHERE_BILLED, "tokens": COHERE_PROCESSED}
    if not req.get("stream"):
        return 200, json_type, json.dumps({
            "id": "c-1", "finish_reason": "COMPLETE",
            "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
            "usage": usage}).encode()
    words = text.split(" ")
    events = [("message-start", {"id": "c-1", "type": "message-start",
                                 "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "",
                                                       "tool_calls": [], "citations": []}}}),
              ("content-start", {"type": "content-start", "index": 0,
                                 "delta": {"message": {"content": {"type": "text", "text": ""}}}})]
    for i, w in enumerate(words):
        events.append(("content-delta", {"type": "content-delta", "index": 0,
                                         "delta": {"message": {"content": {"text": (" " if i else "") + w}}}}))
    events += [("content-end", {"type": "content-end", "index": 0}),
               ("message-end", {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": usage}})]
    return 200, [("content-type", "text/event-stream")], _sse(events)


def mistral_answer(method, path, query, headers, body):
    """Mistral's chat completions (docs.mistral.ai/api/#tag/chat): OpenAI-like, and a stream's last
    chunk carries `usage` without being asked (no `stream_options`, which Mistral refuses)."""
    req = json.loads(body or b"{}")
    json_type = [("content-type", "application/json")]
    if not path.endswith("/v1/chat/completions"):
        return 404, json_type, b'{"detail":"Not Found"}'
    if req.get("model") == "over-limit":
        return 429, json_type, b'{"object":"error","message":"Requests rate limit exceeded","type":"rate_limited","param":null,"code":"1300"}'
    text = "mistral says: " + req["messages"][-1]["content"]
    usage = {"prompt_tokens": 6, "total_tokens": 10, "completion_tokens": 4}
    base = {"id": "m-1", "created": 1700000000, "model": req["model"]}
    if not req.get("stream"):
        return 200, json_type, json.dumps(dict(base, object="chat.completion", usage=usage, choices=[
            {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": None},
             "finish_reason": "stop"}])).encode()
    chunks = [dict(base, object="chat.completion.chunk",
                   choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    chunks += [dict(base, object="chat.completion.chunk",
                    choices=[{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}])
               for i, w in enumerate(text.split(" "))]
    chunks.append(dict(base, object="chat.completion.chunk", usage=usage,
                       choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]))
    return 200, [("content-type", "text/event-stream")], \
        [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def _es_header(name, value):
    n, v = name.encode(), value.encode()
    return struct.pack("B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v


def eventstream_frame(headers, payload):
    """One `application/vnd.amazon.eventstream` message (prelude, headers, payload, CRC32s)."""
    hdrs = b"".join(_es_header(k, v) for k, v in headers)
    total = 12 + len(hdrs) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hdrs))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    msg = prelude + hdrs + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def anthropic_message(model, text, usage):
    return {"id": "msg_lb_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage}


def anthropic_events(model, text):
    """Anthropic's streaming events (docs.anthropic.com/en/api/messages-streaming)."""
    out = [{"type": "message_start", "message": dict(anthropic_message(model, "", {"input_tokens": 5, "output_tokens": 1}),
                                                    content=[], stop_reason=None)},
           {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}]
    for i, w in enumerate(text.split(" ")):
        out.append({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": (" " if i else "") + w}})
    out += [{"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 4}},
            {"type": "message_stop"}]
    return out


def claude_on_bedrock_answer(method, path, query, headers, body):
    """Bedrock InvokeModel / InvokeModelWithResponseStream for Claude
    (docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_InvokeModelWithResponseStream.html):
    the body is Anthropic's Messages body with `anthropic_version: bedrock-2023-05-31`; a stream is
    eventstream `chunk` events whose payload `{"bytes": base64(<Anthropic event JSON>)}`; the last one
    carries `amazon-bedrock-invocationMetrics`."""
    if not headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential="):
        return 403, [("content-type", "application/json"), ("x-amzn-errortype", "MissingAuthenticationTokenException")], \
            b'{"message":"Missing Authentication Token"}'
    req = json.loads(body)
    model = urllib.parse.unquote(path.split("/model/", 1)[1].rsplit("/", 1)[0])
    if model == "over-limit":
        return 429, [("content-type", "application/json"), ("x-amzn-errortype", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")], \
            b'{"message":"Too many requests, please wait before trying again."}'
    text = "claude on bedrock says: " + req["messages"][-1]["content"]
    if path.endswith("/invoke"):
        return 200, [("content-type", "application/json"), ("x-amzn-bedrock-input-token-count", "5"),
                     ("x-amzn-bedrock-output-token-count", "4")], \
            json.dumps(anthropic_message(model, text, {"input_tokens": 5, "output_tokens": 4})).encode()
    frames = []
    events = anthropic_events(model, text)
    events[-1]["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 5, "outputTokenCount": 4,
                                                      "invocationLatency": 100, "firstByteLatency": 50}
    for ev in events:
        payload = json.dumps({"bytes": base64.b64encode(json.dumps(ev).encode()).decode()}).encode()
        frames.append(eventstream_frame([(":event-type", "chunk"), (":content-type", "application/json"),
                                         (":message-type", "event")], payload))
    return 200, [("content-type", "application/vnd.amazon.eventstream")], frames


def claude_on_vertex_answer(method, path, query, headers, body):
    """Vertex AI's Claude endpoints (`publishers/anthropic/models/{m}:rawPredict` and
    `:streamRawPredict`): Anthropic's Messages API with `anthropic_version: vertex-2023-10-16`."""
    if not headers.get("authorization", "").startswith("Bearer "):
        return 401, [("content-type", "application/json")], \
            b'{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}'
    req = json.loads(body)
    model = path.rsplit("/", 1)[1].split(":")[0]
    if model == "over-limit":
        return 429, [("content-type", "application/json")], json.dumps({"error": {
            "code": 429, "message": "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model",
            "status": "RESOURCE_EXHAUSTED"}}).encode()
    text = "claude on vertex says: " + req["messages"][-1]["content"]
    if path.endswith(":rawPredict"):
        return 200, [("content-type", "application/json")], \
            json.dumps(anthropic_message(model, text, {"input_tokens": 5, "output_tokens": 4})).encode()
    return 200, [("content-type", "text/event-stream")], \
        [f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode() for ev in anthropic_events(model, text)]


# --- the gateway ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohere_up():
    s = Loopback(cohere_answer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mistral_up():
    s = Loopback(mistral_answer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(mock, cohere_up, mistral_up, tmp_path_factory):
    extra = (
        f"    google-ai-studio: {{baseURL: '{mock.url}'}}\n"
        f"    mistral: {{baseURL: '{mistral_up.url}'}}\n"
        f"    cohere: {{baseURL: '{cohere_up.url}'}}\n"
        f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n"
        f"    google-vertex-ai: {{baseURL: '{mock.url}'}}\n"
    )
    g = Sidegate(tmp_path_factory.mktemp("sdks"), gateway_yaml(mock.url, extra_spec=extra), KEYS,
                 extra_args=["--log-format", "json"])
    yield g
    g.stop()


def log_line(g, log_id):
    return json.loads(g.wait_log_line(log_id))


def _request_lines(g):
    return [json.loads(line) for line in g.logs().splitlines()
            if line.startswith("{") and '"message":"request"' in line]


def log_mark(g):
    """How many access log lines `g` has written so far (wait a moment for pending ones)."""
    import time
    time.sleep(0.3)  # access log lines are flushed every 200 ms
    return len(_request_lines(g))


def last_log_line(g, provider, path_end, after=0):
    """The last JSON access log line after the first `after` ones of `provider` whose path ends
    with `path_end` (for SDKs that hide the response headers, so no `cf-aig-log-id`)."""
    import time
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in _request_lines(g)[after:]
                 if line.get("provider") == provider and str(line.get("path")).endswith(path_end)]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"no access log line for {provider} ...{path_end!r}"
        time.sleep(0.05)


def no_placeholder(headers):
    assert not [k for k, v in headers.items() if PLACEHOLDER in v], headers


# --- AWS SigV4 (docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html) ------------------

def _aws_enc(s):
    return urllib.parse.quote(s, safe="-_.~")


def signed_by(seen, access, secret):
    """Whether `seen` (as the upstream received it) carries a valid SigV4 signature by `access`/`secret`."""
    m = re.match(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                 r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$", seen["headers"]["authorization"])
    assert m, seen["headers"]["authorization"]
    key_id, date, region, service, signed, signature = m.groups()
    canonical_uri = "/".join(_aws_enc(s) for s in seen["path"].split("/"))
    pairs = sorted((_aws_enc(urllib.parse.unquote(k)), _aws_enc(urllib.parse.unquote(v)))
                   for k, _, v in (p.partition("=") for p in (seen["query"] or "").split("&") if p))
    canonical_headers = "".join(f"{h}:{' '.join(seen['headers'][h].split())}\n" for h in signed.split(";"))
    creq = "\n".join([seen["method"], canonical_uri, "&".join(f"{k}={v}" for k, v in pairs), canonical_headers,
                      signed, hashlib.sha256(seen["body"].encode()).hexdigest()])
    sts = "\n".join(["AWS4-HMAC-SHA256", seen["headers"]["x-amz-date"], f"{date}/{region}/{service}/aws4_request",
                     hashlib.sha256(creq.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return key_id == access and hmac.new(k, sts.encode(), hashlib.sha256).hexdigest() == signature, (region, service)


# === google-genai ================================================================================

def genai_client(g, prefix="/google-ai-studio"):
    genai = pytest.importorskip("google.genai")
    from google.genai import types
    return genai.Client(api_key=PLACEHOLDER, http_options=types.HttpOptions(base_url=g.url + prefix))


@pytest.mark.parametrize("prefix", ["/google-ai-studio", "/v1/acct/main/google-ai-studio"])
def test_genai_generate_content_gets_the_stored_key_and_is_logged(gw, mock, prefix):
    mock.clear()
    mark = log_mark(gw)
    c = genai_client(gw, prefix)
    out = c.models.generate_content(model="gemini-2.5-flash", contents="hello genai")
    assert out.text == "mock reply to: hello genai"
    seen = mock.last()
    assert re.fullmatch(r"/v1(beta)?/models/gemini-2.5-flash:generateContent", seen["path"]), seen["path"]
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
    no_placeholder(seen["headers"])
    assert not [h for h in seen["headers"] if h.startswith("cf-aig-")]
    line = last_log_line(gw, "google-ai-studio", "gemini-2.5-flash:generateContent", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (out.usage_metadata.prompt_token_count,
                                                       out.usage_metadata.candidates_token_count)
    assert line["cost"] and line["cost"] > 0


def test_genai_stream_comes_back_parsed_and_counted(gw, mock):
    mock.clear()
    mark = log_mark(gw)
    c = genai_client(gw)
    chunks = list(c.models.generate_content_stream(model="gemini-2.5-flash", contents="stream some words"))
    assert "".join(c.text or "" for c in chunks) == "mock reply to: stream some words"
    seen = mock.last()
    assert re.fullmatch(r"/v1(beta)?/models/gemini-2.5-flash:streamGenerateContent", seen["path"]), seen["path"]
    assert seen["query"] == "alt=sse"
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
    line = last_log_line(gw, "google-ai-studio", "gemini-2.5-flash:streamGenerateContent", after=mark)
    last_usage = chunks[-1].usage_metadata
    assert (line["tokens_in"], line["tokens_out"]) == (last_usage.prompt_token_count, last_usage.candidates_token_count)


def test_genai_embeddings_and_errors_pass_through(gw, mock):
    c = genai_client(gw)
    from google.genai import errors
    emb = c.models.embed_content(model="text-embedding-004", contents="embed me")
    assert len(emb.embeddings[0].values) == 8
    with pytest.raises(errors.ClientError) as e:
        c.models.generate_content(model="mock-status-429", contents="x")
    assert e.value.code == 429
    assert e.value.status == "RESOURCE_EXHAUSTED" or e.value.details["error"]["code"] == 429


def test_genai_vertex_mode_gets_the_stored_token(gw, mock):
    """genai with vertexai=True and the base URL at /google-vertex-ai (the app's own credentials
    are a placeholder token): the stored Vertex token replaces it."""
    pytest.importorskip("google.genai")
    from google import genai
    from google.genai import types
    from google.oauth2.credentials import Credentials
    c = genai.Client(vertexai=True, project="my-proj", location="us-central1",
                     credentials=Credentials(token=PLACEHOLDER),
                     http_options=types.HttpOptions(base_url=gw.url + "/google-vertex-ai", api_version="v1"))
    mock.clear()
    out = c.models.generate_content(model="gemini-2.5-flash", contents="hello vertex")
    assert out.text == "mock reply to: hello vertex"
    seen = mock.last()
    assert seen["path"] == "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
    assert seen["headers"]["authorization"] == f"Bearer {VERTEX_TOKEN}"
    no_placeholder(seen["headers"])


# === mistralai ===================================================================================

def mistral_client(g, prefix="/mistral"):
    pytest.importorskip("mistralai")
    from mistralai.client import Mistral
    return Mistral(api_key=PLACEHOLDER, server_url=g.url + prefix)


@pytest.mark.parametrize("prefix", ["/mistral", "/v1/acct/main/mistral"])
def test_mistral_sdk_completes_with_the_stored_key_and_is_logged(gw, mistral_up, prefix):
    mark = log_mark(gw)
    out = mistral_client(gw, prefix).chat.complete(model="mistral-large-latest",
                                                   messages=[{"role": "user", "content": "hello mistral"}])
    assert out.choices[0].message.content == "mistral says: hello mistral"
    seen = mistral_up.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {MISTRAL_KEY}"
    no_placeholder(seen["headers"])
    line = last_log_line(gw, "mistral", "chat/completions", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert line["cost"] and line["cost"] > 0


def test_mistral_sdk_streams_and_the_usage_it_always_sends_is_counted(gw, mistral_up):
    mark = log_mark(gw)
    events = list(mistral_client(gw).chat.stream(model="mistral-small-latest",
                                                 messages=[{"role": "user", "content": "stream mistral words"}]))
    text = "".join(ev.data.choices[0].delta.content or "" for ev in events if ev.data.choices)
    assert text == "mistral says: stream mistral words"
    seen = mistral_up.last()
    assert "stream_options" not in json.loads(seen["body"]), "Mistral answers 422 to stream_options"
    assert seen["headers"]["authorization"] == f"Bearer {MISTRAL_KEY}"
    usage = events[-1].data.usage
    line = last_log_line(gw, "mistral", "chat/completions", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_mistral_sdk_raises_on_a_provider_error(gw):
    pytest.importorskip("mistralai")
    from mistralai.client import errors
    with pytest.raises(errors.SDKError) as e:
        mistral_client(gw).chat.complete(model="over-limit", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert json.loads(e.value.body)["type"] == "rate_limited"


# === groq ========================================================================================

def groq_client(g, prefix="/groq"):
    groq = pytest.importorskip("groq")
    return groq.Groq(api_key=PLACEHOLDER, base_url=g.url + prefix, max_retries=0)


@pytest.mark.parametrize("prefix", ["/groq", "/v1/acct/main/groq"])
def test_groq_sdk_completes_and_streams_with_the_stored_key(gw, mock, prefix):
    mock.clear()
    c = groq_client(gw, prefix)
    raw = c.chat.completions.with_raw_response.create(model="llama-3.1-8b-instant",
                                                      messages=[{"role": "user", "content": "hello groq"}])
    out = raw.parse()
    assert out.choices[0].message.content == "mock reply to: hello groq"
    seen = mock.last()
    assert seen["path"] == "/openai/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {GROQ_KEY}"
    line = log_line(gw, raw.headers["cf-aig-log-id"])
    assert (line["tokens_in"], line["tokens_out"]) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert line["cost"] and line["cost"] > 0
    raw = c.chat.completions.with_raw_response.create(model="llama-3.1-8b-instant", stream=True,
                                                      messages=[{"role": "user", "content": "stream groq"}])
    chunks = list(raw.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "mock reply to: stream groq"
    assert mock.last()["headers"]["authorization"] == f"Bearer {GROQ_KEY}"



def groq_answer(method, path, query, headers, body):
    """Groq's chat completions stream (console.groq.com/docs/api-reference#chat-create): its last
    chunk reports the usage under `x_groq.usage` without being asked."""
    req = json.loads(body)
    text = "groq says: " + req["messages"][-1]["content"]
    base = {"id": "chatcmpl-g1", "object": "chat.completion.chunk", "created": 1700000000, "model": req["model"],
            "system_fingerprint": "fp_1"}
    chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}])]
    chunks += [dict(base, choices=[{"index": 0, "delta": {"content": (" " if i else "") + w}, "logprobs": None,
                                    "finish_reason": None}]) for i, w in enumerate(text.split(" "))]
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                       x_groq={"id": "req_g1", "usage": {"queue_time": 0.01, "prompt_tokens": 12, "prompt_time": 0.001,
                                                         "completion_tokens": 5, "completion_time": 0.01,
                                                         "total_tokens": 17, "total_time": 0.011}}))
    return 200, [("content-type", "text/event-stream")], \
        [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def test_groq_stream_usage_groq_always_sends_is_counted(mock, tmp_path):
    groq = pytest.importorskip("groq")
    up = Loopback(groq_answer)
    yaml = gateway_yaml(mock.url).replace(f"groq: {{baseURL: '{mock.url}/openai/v1'}}", f"groq: {{baseURL: '{up.url}/openai/v1'}}")
    g = Sidegate(tmp_path, yaml, KEYS, extra_args=["--log-format", "json"])
    try:
        c = groq.Groq(api_key=PLACEHOLDER, base_url=g.url + "/groq", max_retries=0)
        raw = c.chat.completions.with_raw_response.create(model="llama-3.1-8b-instant", stream=True,
                                                          messages=[{"role": "user", "content": "stream groq"}])
        chunks = list(raw.parse())
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "groq says: stream groq"
        assert up.last()["path"] == "/openai/v1/chat/completions"
        assert up.last()["headers"]["authorization"] == f"Bearer {GROQ_KEY}"
        line = log_line(g, raw.headers["cf-aig-log-id"])
        assert (line["tokens_in"], line["tokens_out"]) == (12, 5)
        assert line["cost"] and line["cost"] > 0
    finally:
        g.stop()
        up.stop()


def test_groq_sdk_raises_its_rate_limit_error(gw):
    groq = pytest.importorskip("groq")
    with pytest.raises(groq.RateLimitError) as e:
        groq_client(gw).chat.completions.create(model="mock-status-429", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert "mock error" in json.dumps(e.value.body)


# === cohere (v2 client) ==========================================================================

def cohere_client(g, prefix="/cohere"):
    cohere = pytest.importorskip("cohere")
    return cohere.ClientV2(api_key=PLACEHOLDER, base_url=g.url + prefix)


@pytest.mark.parametrize("prefix", ["/cohere", "/v1/acct/main/cohere"])
def test_cohere_v2_chat_gets_the_stored_key_and_is_logged(gw, cohere_up, prefix):
    mark = log_mark(gw)
    out = cohere_client(gw, prefix).chat(model="command-r-plus", messages=[{"role": "user", "content": "hello cohere"}])
    assert out.message.content[0].text == "cohere says: hello cohere"
    seen = cohere_up.last()
    assert seen["path"] == "/v2/chat"
    assert seen["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    no_placeholder(seen["headers"])
    line = last_log_line(gw, "cohere", "v2/chat", after=mark)
    assert line["provider"] == "cohere"
    assert (line["tokens_in"], line["tokens_out"]) == (4, 3), "Cohere's billed units"


def test_cohere_v2_chat_stream_parses_and_is_counted(gw, cohere_up):
    mark = log_mark(gw)
    events = list(cohere_client(gw).chat_stream(model="command-r-plus",
                                                 messages=[{"role": "user", "content": "stream cohere"}]))
    text = "".join(ev.delta.message.content.text for ev in events if ev.type == "content-delta")
    assert text == "cohere says: stream cohere"
    assert events[-1].type == "message-end"
    assert cohere_up.last()["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    line = last_log_line(gw, "cohere", "v2/chat", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (4, 3), "Cohere's billed units"


def test_cohere_sdk_raises_its_too_many_requests_error(gw):
    cohere = pytest.importorskip("cohere")
    with pytest.raises(cohere.TooManyRequestsError) as e:
        cohere_client(gw).chat(model="over-limit", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert "Trial key" in e.value.body["message"]


# === boto3 bedrock-runtime =======================================================================

def bedrock_client(g, region="us-east-1", unsigned=False, account_prefix=""):
    boto3 = pytest.importorskip("boto3")
    from botocore import UNSIGNED
    from botocore.config import Config
    cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, signature_version=UNSIGNED if unsigned else None)
    return boto3.client("bedrock-runtime", region_name=region,
                        endpoint_url=f"{g.url}{account_prefix}/aws-bedrock/bedrock-runtime/{region}",
                        aws_access_key_id="AKIDPLACEHOLDER", aws_secret_access_key=PLACEHOLDER,
                        aws_session_token=f"session-{PLACEHOLDER}", config=cfg)


MODEL = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.mark.parametrize(("unsigned", "account_prefix"), [(False, ""), (True, ""), (False, "/v1/acct/main")],
                         ids=["sdk-signed", "unsigned", "long-form"])
def test_boto3_converse_is_signed_by_the_gateway_with_the_stored_credentials(gw, mock, unsigned, account_prefix):
    mock.clear()
    mark = log_mark(gw)
    out = bedrock_client(gw, "us-west-2", unsigned, account_prefix).converse(
        modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hello bedrock"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "mock reply to: hello bedrock"
    seen = mock.last()
    assert seen["path"] == f"/model/{urllib.parse.quote(MODEL, safe='')}/converse"
    ok, (region, service) = signed_by(seen, AWS_ACCESS, AWS_SECRET)
    assert (region, service) == ("us-west-2", "bedrock")
    assert ok, "the upstream request does not carry a valid signature by the stored credentials"
    assert "AKIDPLACEHOLDER" not in json.dumps(seen["headers"])
    no_placeholder(seen["headers"])  # nor the app's session token (x-amz-security-token)
    line = last_log_line(gw, "aws-bedrock", "/converse", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (out["usage"]["inputTokens"], out["usage"]["outputTokens"])
    assert line["cost"] and line["cost"] > 0


def test_boto3_converse_stream_parses_and_is_counted(gw, mock):
    mock.clear()
    mark = log_mark(gw)
    resp = bedrock_client(gw).converse_stream(modelId=MODEL,
                                              messages=[{"role": "user", "content": [{"text": "stream bedrock"}]}])
    events = list(resp["stream"])
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == "mock reply to: stream bedrock"
    usage = next(e["metadata"]["usage"] for e in events if "metadata" in e)
    seen = mock.last()
    assert seen["path"].endswith("/converse-stream")
    assert signed_by(seen, AWS_ACCESS, AWS_SECRET)[0]
    line = last_log_line(gw, "aws-bedrock", "/converse-stream", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (usage["inputTokens"], usage["outputTokens"])


def test_boto3_raises_the_providers_error_code(gw):
    c = bedrock_client(gw)
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError) as e:
        c.converse(modelId="mock-status-429", messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert e.value.response["Error"]["Code"] == "ThrottlingException"
    assert "mock error" in e.value.response["Error"]["Message"]


# === anthropic's AnthropicBedrock / AnthropicVertex ==============================================

@pytest.fixture(scope="module")
def claude_gw(tmp_path_factory, mock):
    bedrock, vertex = Loopback(claude_on_bedrock_answer), Loopback(claude_on_vertex_answer)
    extra = (f"    aws-bedrock: {{baseURL: '{bedrock.url}'}}\n"
             f"    google-vertex-ai: {{baseURL: '{vertex.url}'}}\n")
    g = Sidegate(tmp_path_factory.mktemp("claude"), gateway_yaml(mock.url, extra_spec=extra), KEYS,
                 extra_args=["--log-format", "json"])
    yield g, bedrock, vertex
    g.stop()
    bedrock.stop()
    vertex.stop()


CLAUDE_BEDROCK = "anthropic.claude-3-haiku-20240307-v1:0"


def test_anthropic_bedrock_client_invokes_and_streams_through_the_gateway(claude_gw):
    anthropic = pytest.importorskip("anthropic")
    g, bedrock, _ = claude_gw
    mark = log_mark(g)
    c = anthropic.AnthropicBedrock(aws_access_key="AKIDPLACEHOLDER", aws_secret_key=PLACEHOLDER,
                                   aws_region="us-east-1", base_url=f"{g.url}/aws-bedrock/bedrock-runtime/us-east-1",
                                   max_retries=0)
    msg = c.messages.create(model=CLAUDE_BEDROCK, max_tokens=50, messages=[{"role": "user", "content": "hi there"}])
    assert msg.content[0].text == "claude on bedrock says: hi there"
    seen = bedrock.last()
    assert urllib.parse.unquote(seen["path"]) == f"/model/{CLAUDE_BEDROCK}/invoke"
    assert signed_by(seen, AWS_ACCESS, AWS_SECRET)[0]
    line = last_log_line(g, "aws-bedrock", "/invoke", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)
    assert line["cost"] and line["cost"] > 0
    with c.messages.stream(model=CLAUDE_BEDROCK, max_tokens=50,
                           messages=[{"role": "user", "content": "stream it"}]) as s:
        text = "".join(s.text_stream)
    assert text == "claude on bedrock says: stream it"
    seen = bedrock.last()
    assert seen["path"].endswith("/invoke-with-response-stream")
    assert signed_by(seen, AWS_ACCESS, AWS_SECRET)[0]
    line = last_log_line(g, "aws-bedrock", "/invoke-with-response-stream", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)


def test_anthropic_vertex_client_gets_the_stored_token(claude_gw):
    anthropic = pytest.importorskip("anthropic")
    g, _, vertex = claude_gw
    mark = log_mark(g)
    c = anthropic.AnthropicVertex(region="us-east5", project_id="my-proj", access_token=PLACEHOLDER,
                                  base_url=f"{g.url}/google-vertex-ai/v1", max_retries=0)
    msg = c.messages.create(model="claude-3-5-haiku@20241022", max_tokens=50,
                            messages=[{"role": "user", "content": "hi vertex"}])
    assert msg.content[0].text == "claude on vertex says: hi vertex"
    seen = vertex.last()
    assert seen["path"] == ("/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/"
                            "claude-3-5-haiku@20241022:rawPredict")
    assert seen["headers"]["authorization"] == f"Bearer {VERTEX_TOKEN}"
    no_placeholder(seen["headers"])
    line = last_log_line(g, "google-vertex-ai", ":rawPredict", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)
    assert line["cost"] and line["cost"] > 0
    with c.messages.stream(model="claude-3-5-haiku@20241022", max_tokens=50,
                           messages=[{"role": "user", "content": "stream vertex"}]) as s:
        text = "".join(s.text_stream)
    assert text == "claude on vertex says: stream vertex"
    assert vertex.last()["path"].endswith(":streamRawPredict")
    line = last_log_line(g, "google-vertex-ai", ":streamRawPredict", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)


def cohere_v1(gw):
    cohere = pytest.importorskip("cohere")
    return cohere.Client(api_key=PLACEHOLDER, base_url=gw.url + "/cohere")


# FAILS at eef83f2: usage.rs scans only `"usage` objects; Cohere v1 answers count in meta.billed_units, so tokens_in/out are null
def test_cohere_v1_client_chat_is_counted(gw, cohere_up):
    """Cloudflare's Cohere page shows the v1 Chat API (`/cohere/v1/chat` with `message`, and
    `cohere.Client`), whose answers carry their counts in `meta.billed_units`, not in a `usage`."""
    mark = log_mark(gw)
    out = cohere_v1(gw).chat(model="command-r-plus", message="hello v1")
    assert out.text == "cohere says: hello v1"
    seen = cohere_up.last()
    assert seen["path"] == "/v1/chat"
    assert seen["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    no_placeholder(seen["headers"])
    line = last_log_line(gw, "cohere", "v1/chat", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (4, 3), "Cohere's billed units"


# FAILS at eef83f2: same: the stream-end event's response.meta.billed_units is never read (usage.rs NEEDLE is `"usage` only)
def test_cohere_v1_client_stream_is_counted(gw, cohere_up):
    mark = log_mark(gw)
    events = list(cohere_v1(gw).chat_stream(model="command-r-plus", message="stream v1"))
    assert "".join(e.text for e in events if e.event_type == "text-generation") == "cohere says: stream v1"
    assert events[-1].event_type == "stream-end"
    assert cohere_up.last()["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    line = last_log_line(gw, "cohere", "v1/chat", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (4, 3), "Cohere's billed units"


# FAILS at eef83f2: providers.rs upstream_uri (Plain, `_ => ("", route.rest)`) keeps cohere's rest as is: Cloudflare's SDK base .../cohere/v1 + the SDK's v1/chat reaches api.cohere.ai/v1/v1/chat
@pytest.mark.parametrize("client", ["Client", "ClientV2"])
def test_cohere_sdk_with_the_base_url_cloudflare_documents(gw, cohere_up, client):
    """Cloudflare's Cohere page (developers.cloudflare.com/ai-gateway/usage/providers/cohere/):
    `cohere.Client(api_key=..., base_url=f".../cohere/v1")` then `co.chat(message=..., model=...)`.
    The current SDK's own base is https://api.cohere.com and it appends `v1/chat` (`v2/chat` for
    ClientV2), so the request arrives as /cohere/v1/v1/chat; Cohere has no /v1/v1 or /v1/v2 API."""
    cohere = pytest.importorskip("cohere")
    cohere_up.requests.clear()
    c = getattr(cohere, client)(api_key=PLACEHOLDER, base_url=gw.url + "/cohere/v1")
    if client == "Client":
        assert c.chat(message="documented base", model="command-r-plus").text == "cohere says: documented base"
        assert cohere_up.last()["path"] == "/v1/chat"
    else:
        out = c.chat(model="command-r-plus", messages=[{"role": "user", "content": "documented base"}])
        assert out.message.content[0].text == "cohere says: documented base"
        assert cohere_up.last()["path"] == "/v2/chat"


def test_boto3_invoke_model_for_claude_as_cloudflares_example_url_is_counted(claude_gw):
    """Cloudflare's Bedrock page: `.../aws-bedrock/bedrock-runtime/us-east-1/model/{model}/invoke`;
    boto3's invoke_model and invoke_model_with_response_stream with a Claude body."""
    pytest.importorskip("boto3")
    g, bedrock, _ = claude_gw
    c = bedrock_client(g)
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "boto invoke"}]})
    mark = log_mark(g)
    out = json.loads(c.invoke_model(modelId=CLAUDE_BEDROCK, body=body)["body"].read())
    assert out["content"][0]["text"] == "claude on bedrock says: boto invoke"
    assert signed_by(bedrock.last(), AWS_ACCESS, AWS_SECRET)[0]
    line = last_log_line(g, "aws-bedrock", "/invoke", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)
    mark = log_mark(g)
    resp = c.invoke_model_with_response_stream(modelId=CLAUDE_BEDROCK, body=body)
    events = [json.loads(e["chunk"]["bytes"]) for e in resp["body"]]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "claude on bedrock says: boto invoke"
    assert signed_by(bedrock.last(), AWS_ACCESS, AWS_SECRET)[0]
    line = last_log_line(g, "aws-bedrock", "/invoke-with-response-stream", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (5, 4)


def test_anthropic_bedrock_and_vertex_clients_raise_their_errors(claude_gw):
    anthropic = pytest.importorskip("anthropic")
    g, bedrock, vertex = claude_gw
    b = anthropic.AnthropicBedrock(aws_access_key="AKIDPLACEHOLDER", aws_secret_key=PLACEHOLDER,
                                   aws_region="us-east-1", base_url=f"{g.url}/aws-bedrock/bedrock-runtime/us-east-1",
                                   max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as e:
        b.messages.create(model="over-limit", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.response.headers.get("x-amzn-errortype", "").startswith("ThrottlingException")
    assert "Too many requests" in e.value.response.text
    v = anthropic.AnthropicVertex(region="us-east5", project_id="my-proj", access_token=PLACEHOLDER,
                                  base_url=f"{g.url}/google-vertex-ai/v1", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as e:
        v.messages.create(model="over-limit", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


@pytest.fixture(scope="module")
def authed_gw(mock, tmp_path_factory):
    extra = (f"    google-ai-studio: {{baseURL: '{mock.url}'}}\n"
             f"    aws-bedrock: {{baseURL: '{mock.url}'}}\n")
    g = Sidegate(tmp_path_factory.mktemp("authed"), gateway_yaml(mock.url, auth=True, extra_spec=extra),
                 dict(KEYS, **{"authentication.tokens": GATEWAY_TOKEN}), extra_args=["--log-format", "json"])
    yield g
    g.stop()


def test_genai_on_an_authenticated_gateway_as_cloudflare_configures_it(authed_gw, mock):
    """Cloudflare's google-ai-studio page: httpOptions `{baseUrl, headers: {'cf-aig-authorization':
    'Bearer {token}'}}`, the stored key used (BYOK)."""
    genai = pytest.importorskip("google.genai")
    from google.genai import errors, types
    c = genai.Client(api_key=PLACEHOLDER, http_options=types.HttpOptions(
        base_url=authed_gw.url + "/google-ai-studio", headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}))
    mock.clear()
    assert c.models.generate_content(model="gemini-2.5-flash", contents="authed").text == "mock reply to: authed"
    seen = mock.last()
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
    assert "cf-aig-authorization" not in seen["headers"]
    bad = genai.Client(api_key=PLACEHOLDER, http_options=types.HttpOptions(base_url=authed_gw.url + "/google-ai-studio"))
    with pytest.raises(errors.ClientError) as e:
        bad.models.generate_content(model="gemini-2.5-flash", contents="no token")
    assert e.value.code == 401


def test_boto3_on_an_authenticated_gateway_as_cloudflare_configures_it(authed_gw, mock):
    """boto3 with endpoint_url at the gateway, unsigned (the gateway signs with the stored
    credentials) and `cf-aig-authorization` added by a before-sign hook."""
    pytest.importorskip("boto3")
    for unsigned in (True, False):
        c = bedrock_client(authed_gw, unsigned=unsigned)
        c.meta.events.register_first(
            "before-sign.*.*", lambda request, **kw: request.headers.add_header("cf-aig-authorization",
                                                                               f"Bearer {GATEWAY_TOKEN}"))
        mock.clear()
        out = c.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "authed bedrock"}]}])
        assert out["output"]["message"]["content"][0]["text"] == "mock reply to: authed bedrock"
        seen = mock.last()
        assert "cf-aig-authorization" not in seen["headers"]
        assert signed_by(seen, AWS_ACCESS, AWS_SECRET)[0]


# FAILS at eef83f2: same: /v2/embed states its tokens in meta.billed_units, which usage.rs never reads
def test_cohere_v2_embed_is_counted(gw, cohere_up):
    """Cohere's Embed API (docs.cohere.com/reference/embed) states its tokens in
    `meta.billed_units.input_tokens`."""
    cohere = pytest.importorskip("cohere")
    mark = log_mark(gw)
    out = cohere.ClientV2(api_key=PLACEHOLDER, base_url=gw.url + "/cohere").embed(
        model="embed-english-v3.0", texts=["one two three"], input_type="search_document", embedding_types=["float"])
    assert out.embeddings.float_ == [[0.1, 0.2, 0.3]]
    assert cohere_up.last()["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    line = last_log_line(gw, "cohere", "v2/embed", after=mark)
    assert line["tokens_in"] == 3


# FAILS at eef83f2: cost.rs BUILTIN has no Cohere model, so a Cohere answer with tokens logs cost null
def test_cohere_chat_is_priced(gw, cohere_up):
    """SPEC.md's logs carry `cost`; Cohere's models have published prices
    (cohere.com/pricing: Command R+ $2.50/$10 per million tokens), as Mistral's and Groq's do here."""
    cohere = pytest.importorskip("cohere")
    mark = log_mark(gw)
    cohere.ClientV2(api_key=PLACEHOLDER, base_url=gw.url + "/cohere").chat(
        model="command-r-plus-08-2024", messages=[{"role": "user", "content": "price me"}])
    line = last_log_line(gw, "cohere", "v2/chat", after=mark)
    assert (line["tokens_in"], line["tokens_out"]) == (4, 3)
    assert line["cost"] and line["cost"] > 0, line


def test_genai_listing_and_counting_pass_through(gw, mock):
    c = genai_client(gw)
    mock.clear()
    try:
        c.models.count_tokens(model="gemini-2.5-flash", contents="count me")
    except Exception:
        pass  # the mock has no countTokens; only what reached it matters here
    seen = mock.last()
    assert seen["path"].endswith("/models/gemini-2.5-flash:countTokens")
    assert seen["headers"]["x-goog-api-key"] == GOOGLE_KEY
