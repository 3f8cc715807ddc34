"""Review of what DLP and prompt guardrails read of a request (e4bd67f..e2697ff,
`text::request_pieces`): forms, bodies and base64 documents that a provider's own parser reads
but the gateway does not.

Each evasion was checked against a real server-side parser: Go's `mime/multipart` and
`encoding/json` (gin's `ShouldBindJSON`, so Ollama and other Go servers, decodes with a
`json.Decoder`), Starlette 1.10 with python-multipart 0.0.34 (FastAPI servers: vLLM, LiteLLM),
Python's `json` and `base64`, and proto3 JSON (Gemini), which takes URL-safe base64 for bytes.
Tests marked `# Failed at e2697ff (mended since)` reproduced a defect, mended since."""

import base64
import json
import random

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from test_guardrails_edges import Moderation

CHAT = "/openai/chat/completions"
BLOCK = ("  dlp:\n    policies:\n"
         "      - {id: pii, action: BLOCK, check: [REQUEST], profiles: [email, credit-card, us-ssn]}\n")
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00\x01" * 500
PROMPT = b"spell joe@example.com right"


@pytest.fixture
def up():
    u = FixedAnswerServer(b'{"id": "file-1", "object": "file", "text": "ok"}')
    yield u
    u.stop()


@pytest.fixture
def gw(tmp_path, up):
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=BLOCK), DEFAULT_KEYS)
    yield g
    g.stop()


def form(parts, boundary="b0undary7f3a", nl=b"\r\n", close=True):
    """A multipart body, byte for byte: `parts` are (disposition, content type or None, data)."""
    b = boundary.encode()
    body = b""
    for disposition, content_type, data in parts:
        body += b"--" + b + nl + b"Content-Disposition: form-data; " + disposition.encode() + nl
        if content_type:
            body += b"Content-Type: " + content_type.encode() + nl
        body += nl + data + nl
    if close:
        body += b"--" + b + b"--" + nl
    return body


def post(g, path, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(g.url + path, content=body, headers=headers, timeout=60)


def assert_blocked(r):
    assert r.status_code == 400, f"not blocked: {r.status_code} {r.text[:300]}"
    assert r.json()["error"][0]["code"] == 2029, r.text


TRANSCRIPTION = [('name="model"', None, b"whisper-1"),
                 ('name="file"; filename="a.wav"', "audio/wav", AUDIO),
                 ('name="prompt"', None, PROMPT)]


# Failed at e2697ff (mended since): a form the gateway cannot split (boundary over 70 chars, quoted boundary with ';', two boundary params, no closing delimiter, LF line ends) is read as one body, and its audio file's NUL hides the prompt field from DLP
@pytest.mark.parametrize("content_type,body", [
    # Go and Starlette take a boundary of any length (RFC 2046's 70 is not enforced).
    ("multipart/form-data; boundary=" + "x" * 71, form(TRANSCRIPTION, "x" * 71)),
    # A quoted boundary holding ';' (Go's mime.ParseMediaType and Starlette read quoted strings).
    ('multipart/form-data; boundary="ab;cd"', form(TRANSCRIPTION, "ab;cd")),
    # Starlette takes the last `boundary` parameter, the gateway the first.
    ("multipart/form-data; boundary=zzz; boundary=b0undary7f3a", form(TRANSCRIPTION)),
    # Starlette hands over the fields of a form without its closing delimiter.
    ("multipart/form-data; boundary=b0undary7f3a",
     form([TRANSCRIPTION[0], TRANSCRIPTION[2], TRANSCRIPTION[1]], close=False)),
    # Go's multipart reader takes LF-only line ends.
    ("multipart/form-data; boundary=b0undary7f3a", form(TRANSCRIPTION, nl=b"\n")),
], ids=["boundary-71", "quoted-boundary", "two-boundaries", "no-close", "lf-only"])
def test_a_form_servers_parse_is_read_part_by_part(gw, content_type, body):
    assert_blocked(post(gw, "/openai/audio/transcriptions", body, content_type))


# Failed at e2697ff (mended since): a prompt field given a binary file name the server ignores (Go: filename="" is a field; Starlette: filename* is not a file name) and a NUL byte is skipped as a binary file
@pytest.mark.parametrize("disposition", [
    'name="prompt"; filename=""',
    "name=\"prompt\"; filename*=UTF-8''p.bin",
], ids=["empty-filename", "filename-star"])
def test_a_field_the_server_reads_as_a_field_is_read(gw, disposition):
    body = form([('name="model"', None, b"gpt-image-1"),
                 ('name="image"; filename="a.png"', "image/png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
                 (disposition, "application/octet-stream", b"draw joe@example.com \x00")])
    assert_blocked(post(gw, "/openai/images/edits", body, "multipart/form-data; boundary=b0undary7f3a"))


# Failed at e2697ff (mended since): a text file's name as servers read it (a quoted name holding ';', RFC 6266's filename* over filename, a percent-encoded filename*) is not seen, so with a NUL byte and application/octet-stream the file is skipped
@pytest.mark.parametrize("disposition", [
    'name="file"; filename="notes;v2.txt"',  # Go and Starlette: notes;v2.txt
    "name=\"file\"; filename=\"notes.bin\"; filename*=UTF-8''notes.txt",  # Go: notes.txt
    "name=\"file\"; filename*=UTF-8''notes%2Etxt",  # Go: notes.txt
], ids=["quoted-semicolon", "filename-star-wins", "percent-encoded"])
def test_a_text_file_name_as_servers_read_it_is_seen(gw, disposition):
    body = form([('name="purpose"', None, b"user_data"),
                 (disposition, "application/octet-stream", b"contact: joe@example.com\n\x00")])
    assert_blocked(post(gw, "/openai/files", body, "multipart/form-data; boundary=b0undary7f3a"))


# Failed at e2697ff (mended since): Go's multipart reader decodes a quoted-printable part (=40 is '@'); DLP reads the encoded bytes
def test_a_quoted_printable_field_is_read_decoded(gw):
    body = (b"--bb\r\nContent-Disposition: form-data; name=\"prompt\"\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nspell joe=40example.com right\r\n--bb--\r\n")
    assert_blocked(post(gw, "/openai/audio/transcriptions", body, "multipart/form-data; boundary=bb"))


# Failed at e2697ff (mended since): a JSON body with a NUL after the document and no JSON Content-Type is not read; Go's json.Decoder (gin ShouldBindJSON: Ollama) reads the document and ignores what follows
@pytest.mark.parametrize("content_type", ["application/octet-stream", None])
def test_a_json_body_with_a_trailing_nul_is_read(gw, content_type):
    raw = b'{"model": "llama3", "messages": [{"role": "user", "content": "mail joe@example.com"}]}\n\x00'
    assert_blocked(post(gw, CHAT, raw, content_type))


def gemini_doc(data):
    return json.dumps({"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "text/plain", "data": data}}]}]}).encode()


# Failed at e2697ff (mended since): a Gemini inlineData text document in URL-safe base64 (proto3 JSON accepts it for bytes) is not decoded: its address passes
def test_a_text_document_in_url_safe_base64_is_read(gw):
    text = b"mail joe@example.com ~~~ ???"
    data = base64.urlsafe_b64encode(text).decode()
    assert "-" in data and "_" in data
    assert_blocked(post(gw, CHAT, gemini_doc(data), "application/json"))


# Failed at e2697ff (mended since): base64 whose last character has non-zero spare bits (Python's and Go's default decoders take it) is not decoded: the document's address passes
def test_a_text_document_with_loose_base64_padding_bits_is_read(gw):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    data = base64.b64encode(b"mail joe@example.com").decode().rstrip("=")
    data = data[:-1] + alphabet[alphabet.index(data[-1]) | 1] + "="
    assert base64.b64decode(data) == b"mail joe@example.com"  # as a Python server reads it
    body = json.dumps({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": data}}]}]}).encode()
    assert_blocked(post(gw, "/anthropic/v1/messages", body, "application/json"))


# Failed at e2697ff (mended since): a body with a UTF-8 byte order mark (Python's json and Node's body-parser take it) is no JSON to the gateway, so its base64 text documents are not decoded
def test_a_json_body_with_a_utf8_bom_has_its_documents_read(gw):
    doc = base64.b64encode(b"mail joe@example.com").decode()
    body = json.dumps({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": doc}}]}]}).encode()
    assert json.loads(b"\xef\xbb\xbf" + body)["max_tokens"] == 5
    assert_blocked(post(gw, "/anthropic/v1/messages", b"\xef\xbb\xbf" + body, "application/json"))


# Failed at e2697ff (mended since): a batch JSONL file of two or more lines is no JSON document, so the base64 text documents of its requests are never decoded (one line is)
def test_base64_documents_in_a_batch_file_are_read(gw):
    doc = base64.b64encode(b"mail joe@example.com").decode()
    line = json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "a.txt", "file_data": "data:text/plain;base64," + doc}}]}]}})
    ok = json.dumps({"custom_id": "2", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})
    jsonl = (line + "\n" + ok + "\n").encode()
    body = form([('name="purpose"', None, b"batch"),
                 ('name="file"; filename="in.jsonl"', "application/octet-stream", jsonl)])
    assert_blocked(post(gw, "/openai/files", body, "multipart/form-data; boundary=b0undary7f3a"))


# Failed at e2697ff (mended since): a file declared and named binary is read as text when it holds no NUL byte; 3 MB of such random bytes hold an address about one time in ten (measured 6/60), and this one is refused
def test_a_binary_upload_without_nul_bytes_is_not_read(gw):
    blob = random.Random(12).randbytes(3 << 20).replace(b"\x00", b"\x01")  # holds "n@q.FP"
    body = form([('name="purpose"', None, b"user_data"),
                 ('name="file"; filename="blob.bin"', "application/octet-stream", blob)])
    r = post(gw, "/openai/files", body, "multipart/form-data; boundary=b0undary7f3a")
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"


# Failed at e2697ff (mended since): prompt guardrails now send a form's every field (model name, response format) to the moderation service, a call per upload that holds no prompt
def test_a_form_without_prompt_text_calls_no_moderation(tmp_path, up):
    m = Moderation()
    spec = f"  guardrails:\n    moderationURL: '{m.url}'\n    prompt: {{violence: block}}\n"
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        body = form([('name="model"', None, b"whisper-1"),
                     ('name="response_format"', None, b"json"),
                     ('name="file"; filename="a.wav"', "audio/wav", AUDIO)])
        r = post(g, "/openai/audio/transcriptions", body, "multipart/form-data; boundary=b0undary7f3a")
        assert r.status_code == 200, r.text[:300]
        assert m.seen == [], f"moderation asked about {m.seen[0]['inputs']!r}"
    finally:
        g.stop()
        m.stop()


def test_well_formed_forms_and_bodies_are_still_read(gw):
    """The forms and documents as SDKs send them are read (controls for the tests above)."""
    assert_blocked(post(gw, "/openai/audio/transcriptions", form(TRANSCRIPTION),
                        "multipart/form-data; boundary=b0undary7f3a"))
    data = base64.b64encode(b"mail joe@example.com ~~~ ???").decode()
    assert_blocked(post(gw, CHAT, gemini_doc(data), "application/json"))
    raw = b'{"model": "llama3", "messages": [{"role": "user", "content": "mail joe@example.com"}]}'
    assert_blocked(post(gw, CHAT, raw, "application/octet-stream"))


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; boundary=zzz",  # no delimiter line of it in the body
    "multipart/form-data",  # no boundary at all
], ids=["wrong-boundary", "no-boundary"])
def test_a_form_the_gateway_cannot_split_is_refused_where_checks_read_it(tmp_path, gw, up, content_type):
    """A form none of the boundaries given splits is refused (400/2101, the envelope) while
    request checks are on, rather than read as one blob whose audio NUL hides its prompt; with
    no checks it goes upstream as sent."""
    body = form(TRANSCRIPTION)
    r = post(gw, "/openai/audio/transcriptions", body, content_type)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"][0]
    assert error["code"] == 2101 and "multipart/form-data" in error["message"], r.text
    # The same form with its boundary given is read part by part: its prompt is blocked.
    assert_blocked(post(gw, "/openai/audio/transcriptions", body, "multipart/form-data; boundary=b0undary7f3a"))
    (tmp_path / "plain").mkdir()
    plain = Sidegate(tmp_path / "plain", gateway_yaml(up.url), DEFAULT_KEYS)
    try:
        r = post(plain, "/openai/audio/transcriptions", body, content_type)
        assert r.status_code == 200, r.text[:300]
    finally:
        plain.stop()


def test_a_quoted_printable_binary_file_stays_unread_and_a_base64_field_is_read(gw):
    """Decoding a transfer encoding does not make a binary file text; a base64 part (python-
    multipart's form parser decodes it) is read decoded."""
    qp_audio = b"".join(b"=%02X" % b for b in AUDIO)
    body = (b"--bb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + qp_audio +
            b"\r\n--bb--\r\n")
    r = post(gw, "/openai/audio/transcriptions", body, "multipart/form-data; boundary=bb")
    assert r.status_code == 200, r.text[:300]
    b64 = base64.b64encode(PROMPT)
    body = (b"--bb\r\nContent-Disposition: form-data; name=\"prompt\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"\r\n--bb--\r\n")
    assert_blocked(post(gw, "/openai/audio/transcriptions", body, "multipart/form-data; boundary=bb"))
