"""Review of the multipart/form-data reading for DLP and prompt guardrails (2795088..be240d4,
`multipart::read`, `text::read_request`): crafted forms that cost the gateway far more CPU and
memory than their size, and a form field that a Starlette server decodes but the checks do not
read.

Measured at be240d4 (debug build, 2 cores):
- 4,000 `boundary=` parameters (a 64 KB Content-Type) on a 1 MB body: 41 s of CPU per request
  with DLP on (0.1 s off): every boundary splits the whole body twice.
- 200 nested boundaries, each opening a quoted-printable part that runs to the end of a 5 MB
  body: 98 s of CPU and a 991 MB peak RSS (30 MB with DLP off), far past maxBufferedBytes
  (64 MiB): each split gives one more overlapping part, each decoded into an owned copy.
- 1,000,000 empty parts in a 10 MB form: 3.9 s CPU and a 177 MB peak (0.5 s, 66 MB off).
"""

import os
import re
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml

BLOCK = ("  dlp:\n    policies:\n"
         "      - {id: pii, action: BLOCK, check: [REQUEST], profiles: [email, credit-card, us-ssn]}\n")
PATH = "/openai/audio/transcriptions"


@pytest.fixture
def up():
    u = FixedAnswerServer(b'{"text": "ok"}')
    yield u
    u.stop()


def gateway(tmp_path, up, spec, name):
    d = tmp_path / name
    d.mkdir()
    return Sidegate(d, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) >> 10


def send(g, body, content_type, timeout):
    """Posts the form; the status, or None when no answer came within `timeout` seconds."""
    try:
        return httpx.post(g.url + PATH, content=body, headers={"content-type": content_type},
                          timeout=timeout).status_code
    except httpx.TimeoutException:
        return None


# Failed at be240d4 (mended since): every `boundary` parameter split the whole body twice: 4,000 of them (a 64 KB header) on a 1 MB body took ~41 s of CPU per request with DLP on; now only the first and last `boundary` (and `boundary*`) are read
def test_many_boundary_parameters_do_not_multiply_the_work(tmp_path, up):
    n = 4000
    content_type = "multipart/form-data" + "".join(";boundary=b%05d" % i for i in range(n))
    assert len(content_type) < 64 * 1024
    last = b"b%05d" % (n - 1)
    body = (b"--" + last + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF\x00" + b"-" * 1_000_000 + b"\r\n--" + last + b"--\r\n")
    g = gateway(tmp_path, up, BLOCK, "on")
    try:
        before = cpu_seconds(g.proc.pid)
        status = send(g, body, content_type, timeout=20)
        spent = cpu_seconds(g.proc.pid) - before
        assert status is not None, "no answer in 20 s"
        assert spent < 5, f"{spent:.1f} s of CPU for one 1 MB form"
    finally:
        g.stop()


# Failed at be240d4 (mended since): nested boundaries each opened a quoted-printable part over the rest of the body, each decoded into its own copy (not counted in maxBufferedBytes): ~1 GB RSS and ~100 s CPU for a 5 MB body; now two boundaries at most, and what is read and decoded is bounded by 3x the body (past it: 400/2101)
def test_nested_boundaries_do_not_multiply_decoded_copies(tmp_path, up):
    k = 150
    content_type = "multipart/form-data" + "".join(";boundary=b%04d" % i for i in range(k))
    head = b"".join(b"--b%04d\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" % i for i in range(k))
    body = head + b"hello world " * (4_000_000 // 12)
    g = gateway(tmp_path, up, BLOCK, "on")
    try:
        base = peak_rss_mib(g.proc.pid)
        before = cpu_seconds(g.proc.pid)
        status = send(g, body, content_type, timeout=30)
        spent = cpu_seconds(g.proc.pid) - before
        peak = peak_rss_mib(g.proc.pid)
        assert status is not None, "no answer in 30 s"
        # The body itself (4 MB) and the default budget (64 MiB) are far below this.
        assert peak - base < 160, f"peak RSS grew by {peak - base} MiB for a 4 MB form"
        assert spent < 10, f"{spent:.1f} s of CPU for one 4 MB form"
    finally:
        g.stop()


# Failed at be240d4 (mended since): a form of 1,000,000 empty parts (10 MB) cost ~110 MiB more peak memory with DLP on than off (two splits, a hash set and a piece per part, none counted in maxBufferedBytes); now a form of more than 10,000 parts is refused (400/2101) while checks are on
def test_many_tiny_parts_stay_within_the_buffer_budget(tmp_path, up):
    body = b"--b\r\n\r\nx\r\n" * 1_000_000 + b"--b--\r\n"
    peaks = {}
    for name, spec in (("off", ""), ("on", BLOCK)):
        g = gateway(tmp_path, up, spec, name)
        try:
            r = httpx.post(g.url + PATH, content=body,
                           headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
            if name == "off":
                assert r.status_code == 200, r.text[:200]
            else:
                # More parts than the checks read (10,000): refused, not read.
                assert r.status_code == 400, r.text[:200]
                assert r.json()["error"][0]["code"] == 2101, r.text
                assert "10000 parts" in r.json()["error"][0]["message"], r.text
            peaks[name] = peak_rss_mib(g.proc.pid)
        finally:
            g.stop()
    assert peaks["on"] - peaks["off"] < 64, peaks


def utf16_form(boundary=b"b0"):
    field = "prompt".encode("utf-16-le")
    value = "spell joe@example.com right".encode("utf-16-le")
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + field + b"\"\r\n\r\n"
            + value + b"\r\n--" + boundary + b"--\r\n")


# Failed at be240d4 (mended since): Starlette (FastAPI servers: vLLM, LiteLLM) decodes every field by the form's own `charset` parameter; sent as `charset=utf-16-le`, the prompt field's address reached the server while DLP read NUL-interleaved bytes; now fields are read decoded by a UTF-16/32 charset too
def test_a_form_in_a_wide_charset_is_read_as_its_text(tmp_path, up):
    # Starlette 0.4x, formparsers.MultiPartParser.parse: `charset = params.get(b"charset", "utf-8")`,
    # then each field `_user_safe_decode(data, charset)` -> {"prompt": "spell joe@example.com right"}.
    g = gateway(tmp_path, up, BLOCK, "on")
    try:
        r = httpx.post(g.url + PATH, content=utf16_form(),
                       headers={"content-type": "multipart/form-data; charset=utf-16-le; boundary=b0"}, timeout=30)
        assert r.status_code == 400, f"not blocked: {r.status_code} {r.text[:200]}"
        assert r.json()["error"][0]["code"] == 2029, r.text
    finally:
        g.stop()
