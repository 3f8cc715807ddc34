"""DLP and prompt guardrails read text that holds a byte that is no UTF-8 (a JSON body, a form's
text field or text file): one such byte must not hide the whole body or part from them, as a
provider may read the text around it (Go's and JavaScript's JSON readers replace it). Nor may
JSON in UTF-16 or UTF-32, which Python's json reads. Binary uploads (a NUL byte, declared and
named binary) stay unread: their random bytes would make false matches.

Tests marked `# FAILS at e4bd67f` reproduce the evasion; the others pin behaviour that holds."""

import json
import os

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from test_guardrails_edges import Moderation

CHAT = "/openai/chat/completions"
MiB = 1 << 20
BLOCK = ("  dlp:\n    policies:\n"
         "      - {id: pii, action: BLOCK, check: [REQUEST], profiles: [email, credit-card, us-ssn]}\n")


@pytest.fixture
def up():
    u = FixedAnswerServer(b'{"id": "file-1", "object": "file", "text": "ok"}')
    yield u
    u.stop()


def form(*parts):
    """A multipart/form-data body, byte for byte: `parts` are (disposition, content type or None,
    data) triples. Returns (content type header, body)."""
    boundary = "b0undary7f3a"
    body = b""
    for disposition, content_type, data in parts:
        body += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def assert_blocked(r):
    assert r.status_code == 400, f"not blocked: {r.status_code} {r.text[:300]}"
    assert r.json()["error"][0]["code"] == 2029, r.text


AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00\x01" * 500


# FAILS at e4bd67f: one invalid byte in a form's text part hides the part from DLP: an address passes a BLOCK policy
@pytest.mark.parametrize("path,parts", [
    # A batch file as the OpenAI SDK sends it (a .jsonl file goes as application/octet-stream).
    ("/openai/files", [('name="purpose"', None, b"batch"),
                       ('name="file"; filename="in.jsonl"', "application/octet-stream",
                        b'{"custom_id": "1", "body": {"input": "mail joe@example.com"}}\xff\n')]),
    # A transcription's prompt field next to its audio file.
    ("/openai/audio/transcriptions", [('name="model"', None, b"whisper-1"),
                                      ('name="file"; filename="a.wav"', "audio/wav", AUDIO),
                                      ('name="prompt"', None, b"spell joe@example.com \xff right")]),
    # A text file declared text.
    ("/openai/files", [('name="purpose"', None, b"user_data"),
                       ('name="file"; filename="notes"', "text/plain", b"caf\xe9: 4111 1111 1111 1111")]),
], ids=["jsonl-file", "prompt-field", "text-file"])
def test_a_form_text_part_with_an_invalid_byte_is_still_read(tmp_path, up, path, parts):
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=BLOCK), DEFAULT_KEYS)
    try:
        content_type, body = form(*parts)
        assert_blocked(httpx.post(g.url + path, content=body, headers={"content-type": content_type}, timeout=30))
        # The same form without the address goes through: the byte itself is no reason to refuse.
        clean = body.replace(b"joe@example.com", b"joe at home").replace(b"4111 1111 1111 1111", b"card")
        r = httpx.post(g.url + path, content=clean, headers={"content-type": content_type}, timeout=30)
        assert r.status_code == 200, r.text[:300]
    finally:
        g.stop()


# FAILS at e4bd67f: a JSON body with one invalid byte in a string is not read by DLP: an address or a card number passes a BLOCK policy
@pytest.mark.parametrize("raw", [
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mail joe@example.com \xff"}]}',
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xc3\x28 card 4111 1111 1111 1111"}]}',
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "my ssn is 123-45-6789"}], "x": "\xfe"}',
], ids=["email", "card", "ssn-elsewhere"])
def test_a_json_body_with_an_invalid_byte_is_still_read(tmp_path, mock, raw):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=BLOCK), DEFAULT_KEYS)
    mock.clear()
    try:
        for headers in ({"content-type": "application/json"}, {}):
            assert_blocked(httpx.post(g.url + CHAT, content=raw, headers=headers))
        assert mock.requests() == [], "a blocked request reached the provider"
    finally:
        g.stop()


# FAILS at e4bd67f: a JSON body in UTF-16 (which Python's json, and so FastAPI servers, read) is no text DLP reads: its address passes a BLOCK policy
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be"])
@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
def test_a_json_body_in_utf16_or_utf32_is_read(tmp_path, mock, encoding, content_type):
    raw = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mail joe@example.com"}]})
    raw = raw.encode(encoding)
    assert json.loads(raw)["messages"][0]["content"] == "mail joe@example.com"  # as a Python server reads it
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=BLOCK), DEFAULT_KEYS)
    mock.clear()
    try:
        assert_blocked(httpx.post(g.url + CHAT, content=raw, headers={"content-type": content_type}))
        assert mock.requests() == []
    finally:
        g.stop()


def test_a_binary_upload_is_still_not_read(tmp_path, up):
    """3 MB of random bytes read as text would make a false match now and then (an `x@y.io`
    among them): a file declared and named binary, holding NUL bytes, is not read."""
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=BLOCK), DEFAULT_KEYS)
    try:
        blob = os.urandom(MiB) + b"\x00 joe@example.com \xff" + os.urandom(2 * MiB)
        for name, content_type in [("blob.bin", "application/octet-stream"), ("a.wav", "audio/wav"),
                                   ("photo.png", "image/png")]:
            content, body = form(('name="purpose"', None, b"user_data"),
                                 (f'name="file"; filename="{name}"', content_type, blob))
            r = httpx.post(g.url + "/openai/files", content=body, headers={"content-type": content}, timeout=60)
            assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:300]}"
    finally:
        g.stop()


# FAILS at e4bd67f: prompt guardrails read nothing of a JSON body with one invalid byte (nor of a form with a binary file): a flagged prompt is served
@pytest.mark.parametrize("kind", ["json", "form-prompt"])
def test_prompt_guardrails_read_text_with_an_invalid_byte(tmp_path, up, kind):
    if kind == "json":
        path, content_type = CHAT, "application/json"
        raw = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say mock-flag:violence \xff"}]}'
    else:
        path = "/openai/audio/transcriptions"
        content_type, raw = form(('name="model"', None, b"whisper-1"),
                                 ('name="file"; filename="a.wav"', "audio/wav", AUDIO),
                                 ('name="prompt"', None, b"mock-flag:violence \xff"))
    m = Moderation()
    spec = f"  guardrails:\n    moderationURL: '{m.url}'\n    prompt: {{violence: block}}\n"
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        r = httpx.post(g.url + path, content=raw, headers={"content-type": content_type}, timeout=30)
        assert r.status_code == 424, f"served unblocked: {r.status_code}; moderated: {m.text()!r}"
        assert r.json()["error"][0]["code"] == 2016
        assert "WAVEfmt" not in m.text(), "the audio file went to the moderation service"
    finally:
        g.stop()
        m.stop()
