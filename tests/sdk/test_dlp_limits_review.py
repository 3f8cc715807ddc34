"""Review of the bounds on DLP/guardrail form reading (8dfc7c7..7056a57): at most three
boundaries, what is read and decoded counted against 3 x body + 64 KiB, at most 10,000 parts,
fields also decoded by a UTF-16/32 `charset` of the form's Content-Type.

What passes here was checked and holds at 7056a57: forms as the SDKs and servers send them
(OpenAI SDK image edit with 16 images, a JSONL batch file, a large base64 or quoted-printable
text part, `boundary` with an equal `boundary*`) are read and forwarded with DLP on; the
worst case still allowed (a ~9.5 MB form read ~3 times) costs bounded CPU and memory.

What fails: fields a Starlette server decodes by a `charset` the checks do not recognise
(RFC 2231 `charset*`, Python's codec-name spellings), and a part whose quoted-printable data Go
decodes but the checks read only as sent (two boundaries giving the same data under different
header blocks: the checks keep the first split's headers).
"""

import io
import os
import re
import struct
import zlib

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml

BLOCK = ("  dlp:\n    policies:\n"
         "      - {id: pii, action: BLOCK, check: [REQUEST], profiles: [email, credit-card, us-ssn]}\n")
PATH = "/openai/audio/transcriptions"
ADDRESS = "spell joe@example.com right"


@pytest.fixture
def up():
    u = FixedAnswerServer(b'{"text": "ok", "data": [], "id": "file-1", "object": "file", "bytes": 1,'
                          b' "created_at": 1, "filename": "b.jsonl", "purpose": "batch", "created": 1}')
    yield u
    u.stop()


@pytest.fixture
def dlp(tmp_path, up):
    d = tmp_path / "on"
    d.mkdir()
    g = Sidegate(d, gateway_yaml(up.url, extra_spec=BLOCK), DEFAULT_KEYS)
    yield g
    g.stop()


def post(g, body, content_type, path=PATH, timeout=60):
    return httpx.post(g.url + path, content=body, headers={"content-type": content_type}, timeout=timeout)


def assert_blocked(r):
    assert r.status_code == 400, f"not blocked: {r.status_code} {r.text[:300]}"
    assert r.json()["error"][0]["code"] == 2029, r.text[:300]


def field_form(value: bytes, boundary=b"b0", name=b"prompt"):
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n"
            + value + b"\r\n--" + boundary + b"--\r\n")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    return int(re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)) >> 10


def png(seed: int, size=200_000) -> bytes:
    """A real PNG of noise (binary, NUL bytes), about `size` bytes."""
    w = 256
    h = size // (w * 3) + 1
    raw = b"".join(b"\x00" + os.urandom(w * 3) for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# Defects (fail at 7056a57)
# ---------------------------------------------------------------------------------------------

# Failed at 7056a57 (mended since): Starlette takes the form's charset from python-multipart's parse_options_header, which reads RFC 2231 parameters through email.message (`charset*=utf-8''utf-16-le` -> "utf-16-le", and it wins over a plain `charset`); the checks read only plain `charset` parameters, so the UTF-16 prompt's address reaches the server unread
@pytest.mark.parametrize("params", [
    "charset*=utf-8''utf-16-le; boundary=b0",
    "charset=utf-8; boundary=b0; charset*0=utf-16; charset*1=-le",
])
def test_a_form_charset_given_in_rfc2231_form_is_read(dlp, params):
    body = field_form(ADDRESS.encode("utf-16-le"))
    assert_blocked(post(dlp, body, "multipart/form-data; " + params))


# Failed at 7056a57 (mended since): Python looks codecs up by a normalised name (any run of punctuation is one `_`, then aliases): `bytes.decode("utf/16/le")`, `"utf+16+le"`, `"UnicodeLittleUnmarked"` are UTF-16-LE to Starlette's `_user_safe_decode`; `wide_charset` only drops `-`, `_` and spaces and knows no such alias, so these fields are read as NUL-interleaved bytes
@pytest.mark.parametrize("charset", ['"utf/16/le"', "utf+16+le", "UnicodeLittleUnmarked", '"utf:16:le"'])
def test_a_form_charset_spelled_as_python_reads_it_is_read(dlp, charset):
    assert ADDRESS.encode("utf-16-le").decode(charset.strip('"')) == ADDRESS
    body = field_form(ADDRESS.encode("utf-16-le"))
    assert_blocked(post(dlp, body, f"multipart/form-data; charset={charset}; boundary=b0"))


def shadowed_qp_form():
    """`boundary=B1; boundary*=utf-8''B1--`: Go reads `boundary*` (B1--). Its one part is a
    quoted-printable prompt. Split by B1 (the checks' first split), the same data lies in one
    part whose header block starts earlier and whose first Content-Transfer-Encoding is 8bit."""
    return (b"--B1\r\n"
            b"Content-Disposition: form-data; name=\"note\"\r\n"
            b"Content-Transfer-Encoding: 8bit\n"
            b"--B1--\r\n"
            b"Content-Disposition: form-data; name=\"prompt\"\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
            b"\r\n"
            b"spell joe=40example=2Ecom right\r\n"
            b"--B1----\r\n")


# Failed at 7056a57 (mended since): parts are read once by where their data lies, whatever header block a split gives them; split by `boundary` B1 the prompt's data has a block whose first Content-Transfer-Encoding is 8bit, split by `boundary*` (Go's choice: mime.ParseMediaType lets `boundary*` override `boundary`) the same data is quoted-printable, which Go's multipart reader decodes to joe@example.com; the checks keep the first and never decode it
def test_a_part_encoded_only_in_another_splits_headers_is_decoded(dlp):
    body = shadowed_qp_form()
    assert_blocked(post(dlp, body, "multipart/form-data; boundary=B1; boundary*=utf-8''B1--"))


# ---------------------------------------------------------------------------------------------
# Checked and holding at 7056a57
# ---------------------------------------------------------------------------------------------

def test_the_go_view_of_the_shadowed_form_is_the_address():
    """The form above as Go's mime/multipart reads it (boundary B1--, quoted-printable decoded):
    a sanity check of the test's own construction, by Python's quopri as Go's decoder."""
    import quopri
    body = shadowed_qp_form()
    start = body.index(b"--B1--\r\n") + len(b"--B1--\r\n")
    head, _, rest = body[start:].partition(b"\r\n\r\n")
    data = rest[:rest.index(b"\r\n--B1--")]
    assert b"quoted-printable" in head
    assert quopri.decodestring(data) == ADDRESS.encode()


def test_the_shadowed_form_split_by_boundary_star_alone_is_blocked(dlp):
    """Control for the defect above: given only Go's boundary, the checks decode the part."""
    assert_blocked(post(dlp, shadowed_qp_form(), "multipart/form-data; boundary*=utf-8''B1--"))


def test_openai_sdk_image_edit_with_sixteen_images_passes(dlp):
    client = openai.OpenAI(base_url=dlp.url + "/openai", api_key="sk-test", max_retries=0)
    images = [(f"i{i}.png", io.BytesIO(png(i)), "image/png") for i in range(16)]
    client.images.edit(model="gpt-image-1", image=images, prompt="put them in a row")


def test_openai_sdk_batch_jsonl_upload_passes(dlp):
    client = openai.OpenAI(base_url=dlp.url + "/openai", api_key="sk-test", max_retries=0)
    line = ('{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", "body": '
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "summarise item %d '
            + "lorem ipsum " * 40 + '"}]}}\n')
    jsonl = "".join(line % (i, i) for i in range(8000)).encode()
    assert len(jsonl) > 4_000_000
    client.files.create(file=("batch.jsonl", jsonl, "application/jsonl"), purpose="batch")
    # And the checks do read it: an address in its last line is refused.
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("batch.jsonl", jsonl + b'{"x": "joe@example.com"}\n'), purpose="batch")


@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_one_large_encoded_text_part_passes_and_is_read(dlp, cte):
    import base64
    import quopri
    text = ("caf\u00e9 na\u00efve r\u00e9sum\u00e9 " * 200_000).encode()  # ~4.6 MB
    enc = base64.encodebytes(text) if cte == "base64" else quopri.encodestring(text)
    form = lambda data: (b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.txt\"\r\n"
                         b"Content-Type: text/plain\r\nContent-Transfer-Encoding: " + cte.encode()
                         + b"\r\n\r\n" + data + b"\r\n--b0--\r\n")
    r = post(dlp, form(enc), "multipart/form-data; boundary=b0")
    assert r.status_code == 200, r.text[:300]
    secret = base64.encodebytes(text + b" joe@example.com") if cte == "base64" else \
        quopri.encodestring(text) + b"\njoe=40example=2Ecom"
    assert_blocked(post(dlp, form(secret), "multipart/form-data; boundary=b0"))


def test_boundary_with_an_equal_boundary_star_passes(dlp):
    body = field_form(b"hello there", boundary=b"b0")
    r = post(dlp, body, "multipart/form-data; boundary=b0; boundary*=utf-8''b0")
    assert r.status_code == 200, r.text[:300]


def test_a_utf16_field_of_wide_text_in_a_wide_charset_passes(dlp):
    # CJK in UTF-16: 2 bytes each, 3 once decoded: read ~2.5 times its size, under the bound.
    value = ("\u6f22\u5b57\u306e\u6587\u7ae0 " * 400_000).encode("utf-16-le")
    r = post(dlp, field_form(value), "multipart/form-data; charset=utf-16-le; boundary=b0")
    assert r.status_code == 200, r.text[:300]


def test_the_worst_form_still_read_costs_bounded_cpu_and_memory(dlp):
    """A ~9.5 MB undeclared file, quoted-printable, that decodes into JSON whose strings are
    0xFF bytes: read as sent (1x), decoded (1x), its leading JSON cut into UTF-8 where each
    0xFF becomes U+FFFD (1x): just under 3x + 64 KiB, so it is read, not refused."""
    k = 3_150_000
    data = b'{"a":"' + b"=FF" * k + b'"}=00'
    body = (b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            + data + b"\r\n--b0--\r\n")
    assert len(body) < 10 * 1024 * 1024
    base = peak_rss_mib(dlp.proc.pid)
    before = cpu_seconds(dlp.proc.pid)
    r = post(dlp, body, "multipart/form-data; boundary=b0", timeout=120)
    spent = cpu_seconds(dlp.proc.pid) - before
    grew = peak_rss_mib(dlp.proc.pid) - base
    print(f"\nworst allowed form: {len(body) / 1e6:.1f} MB, status {r.status_code}, "
          f"{spent:.2f} s CPU, peak RSS +{grew} MiB")
    assert r.status_code == 200, r.text[:300]
    assert spent < 20, f"{spent:.1f} s of CPU"
    assert grew < 160, f"peak RSS grew by {grew} MiB"
