"""DLP edge cases (profiles, encodings, action semantics) against the README's DLP section.

Request-side checks use FLAG policies (one per profile) and read `cf-aig-dlp`; response-side
checks use an upstream that answers whatever body the request asks for (`reply` field)."""

import base64
import binascii
import gzip
import json
import struct
import threading
import http.server

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml

PROFILES = ["credit-card", "us-ssn", "email", "aws-keys", "private-keys"]
CHAT = "/openai/chat/completions"


class EchoUpstream:
    """Answers each POST with the body its JSON `reply` (or `reply_b64`) asks for; `status`,
    `ctype`, `gzip` (compress the answer and say so), `coding` (only say so) optional; a body without them gets {}."""

    def __init__(self):
        self.seen = []

        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self._answer(b"")

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                self._answer(self.rfile.read(n))

            def _answer(self, raw):
                outer.seen.append((self.path, raw, dict(self.headers)))
                try:
                    req = json.loads(raw or b"{}")
                except ValueError:
                    req = {}
                if not isinstance(req, dict):
                    req = {}
                meta = req.get("meta") or {}
                if "reply_b64" in meta:
                    out = base64.b64decode(meta["reply_b64"])
                elif "reply" in meta:
                    out = meta["reply"].encode()
                else:
                    out = b'{"id":"x","choices":[{"message":{"role":"assistant","content":"ok"}}]}'
                headers = [("content-type", meta.get("ctype", "application/json"))]
                if meta.get("gzip"):
                    out = gzip.compress(out)
                    headers.append(("content-encoding", "gzip"))
                elif "coding" in meta:
                    headers.append(("content-encoding", meta["coding"]))
                self.send_response(meta.get("status", 200))
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _gateway(tmp, url, policies):
    text = gateway_yaml(url)
    text = text.replace("    custom-local:", f"    google-ai-studio: {{baseURL: '{url}/v1beta'}}\n    aws-bedrock: {{baseURL: '{url}'}}\n    custom-local:")
    text += "  dlp:\n    policies:\n" + "".join(f"      - {p}\n" for p in policies)
    return Sidegate(tmp, text, DEFAULT_KEYS)


@pytest.fixture(scope="module")
def upstream():
    u = EchoUpstream()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def req_gw(upstream, tmp_path_factory):
    g = _gateway(tmp_path_factory.mktemp("req"), upstream.url,
                 [f"{{id: r-{p}, action: FLAG, check: [REQUEST], profiles: [{p}]}}" for p in PROFILES])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def resp_gw(upstream, tmp_path_factory):
    g = _gateway(tmp_path_factory.mktemp("resp"), upstream.url,
                 [f"{{id: s-{p}, action: FLAG, check: [RESPONSE], profiles: [{p}]}}" for p in PROFILES])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def block_gw(upstream, tmp_path_factory):
    g = _gateway(tmp_path_factory.mktemp("block"), upstream.url, [
        "{id: req-block, action: BLOCK, check: [REQUEST], profiles: [us-ssn]}",
        "{id: resp-block, action: BLOCK, check: [RESPONSE], profiles: [aws-keys]}",
        "{id: both-flag, action: FLAG, check: [REQUEST, RESPONSE], profiles: [email]}",
    ])
    yield g
    g.stop()


def flagged(resp):
    h = resp.headers.get("cf-aig-dlp")
    if not h:
        return set()
    return {p for f in json.loads(h) for p in f["profiles"]}


def ask_request(gw, text, raw=None, path=CHAT, headers=None):
    data = raw if raw is not None else json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}).encode()
    r = httpx.post(gw.url + path, content=data, headers={"content-type": "application/json", **(headers or {})}, timeout=30)
    assert r.status_code == 200, r.text
    return flagged(r)


def ask_response(gw, reply, path=CHAT, **meta):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "meta": {"reply_b64": base64.b64encode(reply if isinstance(reply, bytes) else reply.encode()).decode(), **meta}}
    r = httpx.post(gw.url + path, json=body, timeout=30)
    return r


def chat_json(text):
    return json.dumps({"id": "c", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


# ---------------------------------------------------------------------------------------------
# Profiles on the request side: documented formats that must be found.

FOUND = [
    ("credit-card", "card 4111 1111 1111 1111"),
    ("credit-card", "card 4111-1111-1111-1111"),
    ("credit-card", "card 4111111111111111"),
    ("credit-card", "amex 3782 822463 10005"),
    ("credit-card", "amex 378282246310005"),
    ("credit-card", "visa13 4222222222222"),
    ("credit-card", "nineteen 6011000000000000001"),
    ("credit-card", "mixed 4111 1111-1111 1111"),
    ("us-ssn", "ssn 123-45-6789"),
    ("email", "mail jane@example.com"),
    ("email", "mail jane+tag@example.com"),
    ("email", "mail jane.doe@mail.eu.example.co.uk"),
    ("email", "mail jane@xn--mnchen-3ya.de"),
    ("aws-keys", "key AKIAIOSFODNN7EXAMPLE"),
    ("aws-keys", "key ASIAIOSFODNN7EXAMPLE"),
    ("aws-keys", "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"),
    ("private-keys", "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN DSA PRIVATE KEY-----\nMIIB\n-----END DSA PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----"),
    ("private-keys", "-----BEGIN RSA PRIVATE KEY-----\r\nMIIE\r\n"),
    # Formats beyond the first patterns (FAIL at 1f8b2e4).
    ("us-ssn", "ssn 123 45 6789"),
    ("aws-keys", "backup_AKIAIOSFODNN7EXAMPLE"),
    ("aws-keys", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("private-keys", "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQ\n-----END PGP PRIVATE KEY BLOCK-----"),
    ("private-keys", "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nP2/5\n---- END SSH2 ENCRYPTED PRIVATE KEY ----"),
    ("private-keys", "PuTTY-User-Key-File-3: ssh-rsa\nPrivate-Lines: 14\nAAAA"),
]


@pytest.mark.parametrize("profile,text", FOUND, ids=[f"{p}:{t[:30]}" for p, t in FOUND])
def test_documented_formats_are_found_in_requests(req_gw, profile, text):
    assert profile in ask_request(req_gw, text)


NOT_FOUND = [
    ("credit-card", "order 4111 1111 1111 1112"),
    ("credit-card", "id 123456789012"),  # 12 digits
    ("credit-card", "twenty 41111111111111111113"),
    ("us-ssn", "ssn 000-45-6789"),
    ("us-ssn", "ssn 666-45-6789"),
    ("us-ssn", "ssn 900-45-6789"),
    ("us-ssn", "ssn 999-45-6789"),
    ("us-ssn", "ssn 123-00-6789"),
    ("us-ssn", "ssn 123-45-0000"),
    ("email", "not an address a@b"),
    ("aws-keys", "key AKIAIOSFODNN7EXAMPL"),
    ("aws-keys", "key AKIAIOSFODNN7EXAMPLEX"),
    ("private-keys", "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"),
    ("private-keys", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"),
    # Look-alikes flagged at 1f8b2e4.
    ("credit-card", "counting 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"),
    ("credit-card", "trace 00000000-0000-0000-0000-000000000000"),
    ("credit-card", "zeros 0000 0000 0000 0000"),
    ("email", "use icon@2x.png for retina"),
    ("aws-keys", "user id AIDAIOSFODNN7EXAMPLE"),
    ("us-ssn", "order 123456789"),
]


@pytest.mark.parametrize("profile,text", NOT_FOUND, ids=[f"{p}:{t[:30]}" for p, t in NOT_FOUND])
def test_look_alikes_are_not_found_in_requests(req_gw, profile, text):
    assert profile not in ask_request(req_gw, text)


# ---------------------------------------------------------------------------------------------
# A card written after other numbers (a date, an SSN): matches are searched again after one fails.

CARD_AFTER_NUMBERS = [
    "paid 2026-11-27 4111-1111-1111-1111",
    "paid 2026 11 27 4111 1111 1111 1111",
    "ref 12 34 4111 1111 1111 1111",
    "ssn 123-45-6789 4111 1111 1111 1111",
]


@pytest.mark.parametrize("text", CARD_AFTER_NUMBERS)
def test_card_after_other_numbers_is_found(req_gw, text):
    assert "credit-card" in ask_request(req_gw, text), text


def test_card_after_other_numbers_is_found_in_response_too(resp_gw):
    r = ask_response(resp_gw, chat_json("paid 2026-11-27 4111-1111-1111-1111"))
    assert r.status_code == 200
    assert "credit-card" in flagged(r)


def test_numbers_typeset_with_unicode_hyphens_and_spaces_are_found_in_requests(req_gw):
    # A non-breaking hyphen (U+2011) and a narrow no-break space (U+202F), as models typeset them.
    text = "ssn 123\u201145\u20116789, card 4111\u202f1111\u202f1111\u202f1111"
    assert ask_request(req_gw, text) == {"us-ssn", "credit-card"}


def test_a_decimal_fraction_in_a_request_is_no_card_number(req_gw):
    # 2380082847904681 passes Luhn; as a fraction it is no card number.
    assert ask_request(req_gw, "logprob -0.2380082847904681, and 12.5 4111 1111 1111 1111") == {"credit-card"}
    assert ask_request(req_gw, "logprob -0.2380082847904681") == set()


def test_a_prompt_of_refused_look_alikes_is_read_in_time_linear_in_its_size(req_gw):
    # An image name after a run of 40 KB that every address search would match again from each
    # `-` if it began again inside the refused match (minutes); linear, milliseconds.
    assert ask_request(req_gw, "a-" * 20000 + "a@icon.png, mail joe@example.com") == {"email"}


# ---------------------------------------------------------------------------------------------
# Encodings on the request side.

def test_json_unicode_escapes_are_seen_through(req_gw):
    raw = b'{"model":"m","messages":[{"role":"user","content":"ssn \\u0031\\u0032\\u0033-45-6789 mail jane\\u0040example.com key \\u0041KIAIOSFODNN7EXAMPLE card 4111\\u00201111\\u00201111\\u00201111 \\u002d\\u002d\\u002d\\u002d-BEGIN RSA PRIVATE KEY-----"}]}'
    assert ask_request(req_gw, None, raw=raw) == set(PROFILES)


def test_escaped_slash_and_upper_hex(req_gw):
    raw = b'{"model":"m","messages":[{"role":"user","content":"jane\\u0040EXAMPLE.com \\u004BEY"}]}'
    assert "email" in ask_request(req_gw, None, raw=raw)


MULTI_SHAPES = {
    "openai-multimodal": {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type": "text", "text": "ssn 123-45-6789"}]}]},
    "openai-tool-args": {"model": "gpt-4o", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"ssn": "123-45-6789"})}}]}]},
    "openai-system": {"model": "gpt-4o", "messages": [{"role": "system", "content": "ssn 123-45-6789"}, {"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("shape", sorted(MULTI_SHAPES))
def test_openai_shapes_are_checked(req_gw, shape):
    assert "us-ssn" in ask_request(req_gw, None, raw=json.dumps(MULTI_SHAPES[shape]).encode())


def test_anthropic_system_and_tool_use(req_gw):
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "system": [{"type": "text", "text": "ssn 123-45-6789"}],
            "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"k": "jane@example.com"}}]}]}
    assert {"us-ssn", "email"} <= ask_request(req_gw, None, raw=json.dumps(body).encode(), path="/anthropic/v1/messages")


def test_gemini_system_instruction_and_function_call(req_gw):
    body = {"systemInstruction": {"parts": [{"text": "ssn 123-45-6789"}]},
            "contents": [{"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"k": "jane@example.com"}}}]}]}
    got = ask_request(req_gw, None, raw=json.dumps(body).encode(),
                      path="/google-ai-studio/v1beta/models/gemini-2.5-flash:generateContent")
    assert {"us-ssn", "email"} <= got


def test_base64_text_document_in_request_is_read(req_gw):
    # FAILS at 0b11ae6: only the base64 was scanned.
    b64 = base64.b64encode(b"ssn 123-45-6789").decode()
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64}}]}]}
    assert "us-ssn" in ask_request(req_gw, None, raw=json.dumps(body).encode(), path="/anthropic/v1/messages")
    body["messages"][0]["content"][0]["source"]["media_type"] = "application/pdf"
    assert "us-ssn" not in ask_request(req_gw, None, raw=json.dumps(body).encode(), path="/anthropic/v1/messages")


@pytest.mark.parametrize("coding", ["gzip", "GZIP", "identity, gzip", "br"])
def test_compressed_request_is_refused(req_gw, coding):
    data = gzip.compress(json.dumps({"model": "m", "messages": [{"role": "user", "content": "ssn 123-45-6789"}]}).encode())
    r = httpx.post(req_gw.url + CHAT, content=data, headers={"content-type": "application/json", "content-encoding": coding}, timeout=30)
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2101), r.text


# ---------------------------------------------------------------------------------------------
# Action semantics.

def test_block_request_2029_and_response_2030_and_flag_header(block_gw, upstream):
    n = len(upstream.seen)
    r = httpx.post(block_gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "ssn 123-45-6789"}]}, timeout=30)
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2029)
    assert "123-45-6789" not in r.text and "req-block" in r.text
    assert len(upstream.seen) == n, "never reached the provider"
    r = ask_response(block_gw, chat_json("key AKIAIOSFODNN7EXAMPLE"))
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030)
    assert "AKIA" not in r.text and "resp-block" in r.text
    # A response-only SSN (request policy only) is not blocked on the response side.
    r = ask_response(block_gw, chat_json("ssn 123-45-6789"))
    assert r.status_code == 200
    # FLAG on both sides lists both checks.
    r = httpx.post(block_gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "bob@example.org"}],
                                               "meta": {"reply_b64": base64.b64encode(chat_json("bob@example.org").encode()).decode()}}, timeout=30)
    assert r.status_code == 200
    assert sorted(json.loads(r.headers["cf-aig-dlp"]), key=lambda f: f["check"]) == [
        {"policy": "both-flag", "profiles": ["email"], "check": "REQUEST"},
        {"policy": "both-flag", "profiles": ["email"], "check": "RESPONSE"}]


def test_request_only_policy_does_not_check_responses(req_gw):
    r = ask_response(req_gw, chat_json("ssn 123-45-6789"))
    assert r.status_code == 200 and "cf-aig-dlp" not in r.headers


def test_error_responses_are_checked_too(block_gw):
    r = ask_response(block_gw, json.dumps({"error": {"message": "bad key AKIAIOSFODNN7EXAMPLE"}}), status=400)
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030), r.text


def test_response_gzip_from_upstream_that_ignores_identity(block_gw, upstream):
    # FAILS at 3b06763: the compressed answer was checked compressed, and the key went through.
    r = ask_response(block_gw, chat_json("key AKIAIOSFODNN7EXAMPLE"), gzip=True)
    seen_ae = {k.lower(): v for k, v in upstream.seen[-1][2].items()}.get("accept-encoding")
    assert seen_ae == "identity"
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030), r.text


def test_response_gzip_is_delivered_decoded_with_its_flags(resp_gw):
    # FAILS at 3b06763: not flagged (read compressed).
    r = ask_response(resp_gw, chat_json("mail jane@example.com"), gzip=True)
    assert r.status_code == 200, r.text
    assert "content-encoding" not in r.headers
    assert r.json()["choices"][0]["message"]["content"] == "mail jane@example.com"
    assert "email" in flagged(r)


def test_response_in_a_coding_the_gateway_cannot_read_is_a_502(resp_gw):
    # FAILS at 3b06763: delivered unread.
    r = ask_response(resp_gw, chat_json("mail jane@example.com"), coding="br")
    assert (r.status_code, r.json()["error"][0]["code"]) == (502, 2104), r.text
    assert "br" in r.json()["error"][0]["message"]


# ---------------------------------------------------------------------------------------------
# Response-side streams.

def sse(events, prefix=""):
    return prefix + "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def openai_stream(pieces):
    return [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]


SPLIT = ["card 4111 11", "11 1111 ", "1111 thanks"]


def test_sse_split_card_is_found(resp_gw):
    r = ask_response(resp_gw, sse(openai_stream(SPLIT)), ctype="text/event-stream")
    assert "credit-card" in flagged(r)


def test_sse_split_tool_arguments(resp_gw):
    ev = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]}
          for p in ['{"ssn":"123-4', '5-6789"}']]
    r = ask_response(resp_gw, sse(ev), ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


def test_anthropic_sse_split_with_pings(resp_gw):
    body = "".join(
        f"event: ping\ndata: {{\"type\":\"ping\"}}\n\nevent: content_block_delta\ndata: {json.dumps({'type': 'content_block_delta', 'index': 0, 'delta': {'type': 'text_delta', 'text': p}})}\n\n"
        for p in ["mail jane", "@exam", "ple.com"])
    r = ask_response(resp_gw, body, path="/anthropic/v1/messages", ctype="text/event-stream")
    assert "email" in flagged(r)


def test_gemini_array_stream_split(resp_gw):
    chunks = [{"candidates": [{"content": {"parts": [{"text": p}], "role": "model"}}]} for p in ["ssn 123-4", "5-6789"]]
    r = ask_response(resp_gw, json.dumps(chunks, indent=2),
                     path="/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent")
    assert "us-ssn" in flagged(r), r.text[:200]


def test_sse_stream_starting_with_blank_line(resp_gw):
    # A valid SSE stream may start with an empty line (or a newline after a keepalive).
    r = ask_response(resp_gw, sse(openai_stream(SPLIT), prefix="\n"), ctype="text/event-stream")
    assert "credit-card" in flagged(r)


def test_reasoning_content_deltas(resp_gw):
    ev = [{"choices": [{"index": 0, "delta": {"reasoning_content": p}}]} for p in ["ssn 123-4", "5-6789"]]
    r = ask_response(resp_gw, sse(ev), ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


def test_responses_api_with_done_events(resp_gw):
    ev = [{"type": "response.output_text.delta", "delta": p} for p in ["ssn 123-4", "5-6789"]]
    ev.append({"type": "response.output_text.done", "text": "ssn 123-45-6789"})
    r = ask_response(resp_gw, sse(ev), path="/openai/responses", ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


# Bedrock event stream framing.

def es_message(event_type, payload: bytes):
    hdrs = b""
    for name, value in [(":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")]:
        hdrs += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
    total = 12 + len(hdrs) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hdrs))
    prelude += struct.pack(">I", binascii.crc32(prelude) & 0xffffffff)
    msg = prelude + hdrs + payload
    return msg + struct.pack(">I", binascii.crc32(msg) & 0xffffffff)


def test_split_in_plain_sse_via_json_unicode(resp_gw):
    # The split text itself written with \u escapes in the SSE JSON.
    body = "data: {\"choices\":[{\"delta\":{\"content\":\"ssn 123\\u002d4\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"5-6789\"}}]}\n\n"
    r = ask_response(resp_gw, body, ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


# ---------------------------------------------------------------------------------------------
# More stream shapes.

SIGNED = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDALICE/20260101/us-west-2/bedrock/aws4_request, "
                           "SignedHeaders=host;x-amz-date, Signature=aa", "x-amz-date": "20260101T000000Z"}


def bedrock(gw, model, op, reply):
    body = {"prompt": "hi", "meta": {"reply_b64": base64.b64encode(reply).decode(),
                                     "ctype": "application/vnd.amazon.eventstream"}}
    return httpx.post(f"{gw.url}/aws-bedrock/bedrock-runtime/us-west-2/model/{model}/{op}", json=body,
                      headers=SIGNED, timeout=30)


def invoke_chunks(events):
    return b"".join(es_message("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode()}).encode())
                    for e in events)


def test_bedrock_invoke_stream_anthropic_whole_ssn(resp_gw):
    r = bedrock(resp_gw, "anthropic.claude-3-haiku-20240307-v1:0", "invoke-with-response-stream",
                invoke_chunks([{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ssn 123-45-6789"}}]))
    assert r.status_code == 200, r.text[:200]
    assert "us-ssn" in flagged(r)


@pytest.mark.parametrize("model,events", [
    ("meta.llama3-8b-instruct-v1:0", [{"generation": "ssn 123-45-6789", "stop_reason": None}]),
    ("amazon.titan-text-express-v1", [{"outputText": "ssn 123-45-6789", "index": 0}]),
    ("mistral.mistral-7b-instruct-v0:2", [{"outputs": [{"text": "ssn 123-45-6789", "stop_reason": None}]}]),
    ("cohere.command-r-v1:0", [{"event_type": "text-generation", "text": "ssn 123-45-6789"}]),
    ("amazon.nova-lite-v1:0", [{"contentBlockDelta": {"delta": {"text": "ssn 123-45-6789"}, "contentBlockIndex": 0}}]),
    ("deepseek.r1-v1:0", [{"choices": [{"text": "ssn 123-45-6789"}]}]),
])
def test_bedrock_invoke_stream_other_model_families(resp_gw, model, events):
    r = bedrock(resp_gw, model, "invoke-with-response-stream", invoke_chunks(events))
    assert r.status_code == 200, r.text[:200]
    assert "us-ssn" in flagged(r), f"{model}: base64 chunk not read"


def test_bedrock_converse_stream_split(resp_gw):
    body = b"".join(es_message("contentBlockDelta", json.dumps({"contentBlockIndex": 0, "delta": {"text": p}}).encode())
                    for p in ["ssn 123-4", "5-6789"])
    r = bedrock(resp_gw, "anthropic.claude-3-haiku-20240307-v1:0", "converse-stream", body)
    assert r.status_code == 200, r.text[:200]
    assert "us-ssn" in flagged(r)


def test_gemini_sse_split(resp_gw):
    chunks = [{"candidates": [{"content": {"parts": [{"text": p}], "role": "model"}}]} for p in ["ssn 123-4", "5-6789"]]
    r = ask_response(resp_gw, "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks),
                     path="/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                     ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


def test_openai_n2_interleaved_choices_split_card(resp_gw):
    # FAILS at 3b06763: the choices' deltas were joined in arrival order.
    ev = [{"choices": [{"index": 0, "delta": {"content": "card 4111 11"}}]},
          {"choices": [{"index": 1, "delta": {"content": "hello "}}]},
          {"choices": [{"index": 0, "delta": {"content": "11 1111 1111"}}]},
          {"choices": [{"index": 1, "delta": {"content": "world"}}]}]
    r = ask_response(resp_gw, sse(ev), ctype="text/event-stream")
    assert "credit-card" in flagged(r)


def test_gemini_two_candidates_split_ssn(resp_gw):
    # FAILS at 3b06763: as above.
    chunks = [{"candidates": [{"index": 0, "content": {"parts": [{"text": "ssn 123-4"}]}},
                              {"index": 1, "content": {"parts": [{"text": "other "}]}}]},
              {"candidates": [{"index": 0, "content": {"parts": [{"text": "5-6789"}]}},
                              {"index": 1, "content": {"parts": [{"text": "text"}]}}]}]
    r = ask_response(resp_gw, "".join(f"data: {json.dumps(c)}\n\n" for c in chunks),
                     path="/google-ai-studio/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                     ctype="text/event-stream")
    assert "us-ssn" in flagged(r)


def test_bedrock_llama_invoke_stream_is_blocked(block_gw):
    # BLOCK on RESPONSE for aws-keys: a Llama model's invoke stream carrying a key (in base64).
    r = bedrock(block_gw, "meta.llama3-8b-instruct-v1:0", "invoke-with-response-stream",
                invoke_chunks([{"generation": "your key is AKIAIOSFODNN7EXAMPLE", "stop_reason": None}]))
    assert r.status_code == 400, f"delivered {r.status_code} ({len(r.content)} bytes) with the key in base64"


def test_universal_endpoint_queries_checked(block_gw, upstream):
    n = len(upstream.seen)
    steps = [{"provider": "openai", "endpoint": "chat/completions", "headers": {"authorization": "Bearer x"},
              "query": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ssn 123\u002d45-6789"}]}}]
    r = httpx.post(block_gw.url + "/", json=steps, timeout=30)
    assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2029), r.text
    assert len(upstream.seen) == n


def test_cache_hit_still_carries_flags(upstream, tmp_path):
    text = gateway_yaml(upstream.url) + "  cache: {enabled: true}\n  dlp:\n    policies:\n" \
        "      - {id: f, action: FLAG, check: [REQUEST, RESPONSE], profiles: [email]}\n"
    g = Sidegate(tmp_path, text, DEFAULT_KEYS)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "a@example.com"}],
                "meta": {"reply_b64": base64.b64encode(chat_json("b@example.com").encode()).decode()}}
        heads = []
        for _ in range(2):
            r = httpx.post(g.url + CHAT, json=body, timeout=30)
            heads.append((r.headers.get("cf-aig-cache-status"), r.headers.get("cf-aig-dlp")))
        assert heads[1][0] == "HIT"
        assert {f["check"] for f in json.loads(heads[1][1] or "[]")} == {"REQUEST", "RESPONSE"}, heads
    finally:
        g.stop()
