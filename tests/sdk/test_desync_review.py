"""Review of HTTP message handling between client, sidecar and upstream (desync, smuggling,
hop-by-hop headers), on raw sockets: what the existing robustness tests (test_http1_robustness.py,
test_http1_server.py, test_security_edges.py) do not cover. The upstream is a loopback socket
that records every request head it reads and answers what the test tells it to."""

import gzip
import json
import socket
import struct
import threading
import time

import pytest

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from rawhttp import Listener, read_request

CHAT = b"/openai/chat/completions"


def ok(tag):
    body = json.dumps({"id": tag, "object": "chat.completion", "model": "gpt-4o-mini", "choices": []}).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class RecordingUpstream:
    """Records each request (head, body) it reads; answers with `self.answer(head)` (raw bytes),
    keeping the connection for the next request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = []
        self.answer = lambda head: ok("upstream")
        self.listener = Listener(self._serve)
        self.url = self.listener.url

    def _serve(self, conn, _index):
        conn.settimeout(10)
        buf = b""
        try:
            while (got := read_request(conn, buf)) is not None:
                head, body, buf = got
                with self.lock:
                    self.seen.append((head, body))
                    answer = self.answer
                conn.sendall(answer(head))
        except OSError:
            pass
        finally:
            conn.close()

    def reset(self, answer=None):
        with self.lock:
            self.seen = []
            self.answer = answer or (lambda head: ok("upstream"))

    def heads(self):
        with self.lock:
            return [h for h, _ in self.seen]


@pytest.fixture(scope="module")
def upstream():
    up = RecordingUpstream()
    yield up
    up.listener.close()


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    g = Sidegate(tmp_path_factory.mktemp("desync"), gateway_yaml(
        upstream.url, extra_spec="  requestTimeout: 3000ms\n  limits: {maxRequestBody: 16Ki}\n"), DEFAULT_KEYS)
    yield g
    g.stop()


@pytest.fixture
def up(upstream, gw):
    upstream.reset()
    yield upstream


def chat_body(content="hi"):
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).encode()


def post(extra=b"", body=None, host=b"Host: localhost\r\n", path=CHAT):
    body = chat_body() if body is None else body
    return (b"POST %s HTTP/1.1\r\n%sContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, host, extra, len(body), body))


def parse_answers(data):
    """The whole answers in `data` (1xx skipped): [(status, {name: [values]}, body)]."""
    answers = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return answers
        head, rest = data[:end], data[end + 4:]
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line[9:12])
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower().decode(), []).append(value.strip().decode("latin-1"))
        if 100 <= status < 200:
            data = rest
            continue
        if "transfer-encoding" in headers:
            body, at = b"", 0
            while True:
                eol = rest.find(b"\r\n", at)
                if eol < 0:
                    return answers
                size = int(rest[at:eol], 16)
                if len(rest) < eol + 4 + size:
                    return answers
                body += rest[eol + 2:eol + 2 + size]
                at = eol + 4 + size
                if size == 0:
                    break
            data = rest[at:]
        else:
            length = int(headers.get("content-length", ["0"])[0])
            if len(rest) < length:
                return answers
            body, data = rest[:length], rest[length:]
        answers.append((status, headers, body))


def exchange(g, *parts, pause=0.3, wait=4, until=None, shut=False, linger=False):
    """Sends `parts` (`pause` apart, Nagle off) on one connection, optionally shuts the sending
    side, and reads until `until` answers are whole (and, with `linger`, a second more to see
    whether the gateway closes), the gateway closes, or `wait`: (answers, closed). (A client
    that half-closes with one request outstanding is taken as gone, as hyper takes it.)"""
    s = socket.create_connection(("127.0.0.1", g.port), timeout=wait)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data, closed = b"", False
    with s:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            try:
                s.sendall(part)
            except OSError:
                break
        if shut:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if until is not None and len(parse_answers(data)) >= until:
                if not linger:
                    break
                deadline = min(deadline, time.monotonic() + 1.0)
    return parse_answers(data), closed


def envelope(body):
    doc = json.loads(body)
    return doc["success"] is False and isinstance(doc["error"], list) and doc["error"]


# --- client -> sidecar: request framing ---------------------------------------------------------

# A chunked request whose trailer section ends with bare LFs (`x-t: 1\n\n`) is answered, and the
# request pipelined after it is silently swallowed as more trailer bytes: hyper's chunked decoder
# (hyper 1.12 proto/h1/decode.rs read_trailer/read_end_cr, used for every chunked request body the
# gateway hands to hyper, server/h1.rs:286 -> Parsed::Other) treats LF as an ordinary trailer byte
# and reads on to the next CRLFCRLF. A front end or client that takes LF as a line end (RFC 9112
# §2.2 lets it; the gateway's own upstream decoder does, upstream/h1.rs decode_chunked) sees two
# requests where the gateway sees one ("funky chunks" trailer variant).
# FAILS at eef83f2: the pipelined GET vanishes into the first request's trailers (one 200, no 400).
# Mended for chunked bodies up to 64 KiB, which the gateway's own server now reads with a strict
# decoder (chunked.rs); a larger one is still hyper's (the xfail below).
def test_a_bare_lf_in_request_trailers_does_not_swallow_the_next_request(gw, up):
    bare_lf_trailers_then_a_get(gw, up, chat_body("first"))


# Not mended: a chunked body not all read by 64 KiB is hyper's to decode as it comes (server/h1.rs
# hands the connection over), and hyper 1.x reads a bare LF in trailers as a trailer byte. Only the client's
# own pipelined request is lost (nothing reaches the provider unframed); strict: it fails loudly
# once mended.
@pytest.mark.xfail(strict=True, reason="hyper's chunked decoder takes a bare LF in trailers as data")
def test_a_bare_lf_in_the_trailers_of_a_large_chunked_body_does_not_swallow_the_next_request(
        up, tmp_path_factory):
    # The module's gateway takes 16 KiB at most: this one the default 10 MiB.
    roomy = Sidegate(tmp_path_factory.mktemp("desync-large"), gateway_yaml(
        up.url, extra_spec="  requestTimeout: 3000ms\n"), DEFAULT_KEYS)
    try:
        bare_lf_trailers_then_a_get(roomy, up, chat_body("x" * (1024 * 1024)))
    finally:
        roomy.stop()


def bare_lf_trailers_then_a_get(gw, up, body):
    first = (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nx-t: 1\n\n" % (CHAT, len(body), body))
    hidden = b"GET /openai/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answers, closed = exchange(gw, first + hidden, wait=3, until=2)
    statuses = [a[0] for a in answers]
    # Either the trailer is refused (400, connection closed, nothing sent upstream), or both
    # requests are read as the LF-terminated lines say: never one answered and one vanished.
    refused = statuses == [400] and closed and up.heads() == []
    both = len(answers) == 2 and len(up.heads()) == 2
    assert refused or both, f"answers {statuses}, upstream saw {[h.split(b' HTTP')[0] for h in up.heads()]}"


# A request with two Host lines (`localhost` and `evil.example`), or with none, is served (200,
# sent upstream). RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request that lacks Host
# or has more than one Host field line. The gateway's loopback check (proxy.rs:1251 admit_client)
# reads only the first Host (headers.rs:294 `host.get_or_insert`): the second is never judged.
# FAILS at eef83f2: two Host lines, or none, are served 200 instead of refused 400.
@pytest.mark.parametrize("host", [b"Host: localhost\r\nHost: evil.example\r\n",
                                  b"Host: localhost\r\nHost: localhost\r\n",
                                  b""], ids=["conflicting", "repeated", "missing"])
def test_a_request_with_two_host_lines_or_none_is_400(gw, up, host):
    answers, closed = exchange(gw, post(host=host), until=1)
    assert answers, "no answer"
    status, _, body = answers[0]
    assert status == 400, f"{status} {body[:200]!r}"
    assert envelope(body)
    assert up.heads() == []


def test_an_expect_request_refused_before_its_body_is_read_does_not_take_the_body_as_a_request(gw, up):
    # Refused on a gateway header (unknown BYOK alias, 400 2040) before the body is read, so
    # no 100 Continue; the client sends the body anyway (RFC 9110 §10.1.1 lets it), and that
    # body is a whole request: it must be read and dropped, or the connection closed.
    inner = post(body=chat_body("smuggled"))
    head = (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"cf-aig-byok-alias: no-such-alias\r\nContent-Length: %d\r\n\r\n" % (CHAT, len(inner)))
    answers, _ = exchange(gw, head, inner, pause=0.5, wait=2, until=2)
    assert [a[0] for a in answers] == [400], answers
    assert up.heads() == []


def test_a_chunked_body_over_the_limit_is_413_and_its_rest_is_never_a_request(gw, up):
    inner = post(body=chat_body("smuggled"))
    pad = b"x" * 20000
    head = (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (CHAT, len(pad), pad))
    answers, closed = exchange(gw, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner) + inner, wait=3, until=2)
    assert [a[0] for a in answers] == [413], answers
    assert envelope(answers[0][2])
    assert closed
    assert up.heads() == []


def test_hop_by_hop_and_connection_listed_request_headers_never_go_upstream(gw, up):
    extra = (b"Connection: keep-alive, x-listed, content-type, authorization\r\nX-Listed: 1\r\n"
             b"TE: trailers\r\nUpgrade: h2c\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
             b"Proxy-Authorization: Basic YTpi\r\nTrailer: x-t\r\nAuthorization: Bearer placeholder\r\n"
             b"X-Kept: yes\r\n")
    answers, _ = exchange(gw, post(extra=extra), until=1)
    assert [a[0] for a in answers] == [200], answers
    [head] = up.heads()
    names = [line.split(b":")[0].strip().lower() for line in head.split(b"\r\n")[1:]]
    for gone in (b"x-listed", b"te", b"upgrade", b"keep-alive", b"proxy-connection",
                 b"proxy-authorization", b"trailer", b"connection", b"transfer-encoding"):
        assert gone not in names, head
    assert b"x-kept" in names
    # The stored key replaces the client's placeholder even when Connection names the header.
    assert names.count(b"authorization") == 1 and b"Bearer placeholder" not in head, head
    assert names.count(b"content-length") == 1, head


# --- upstream -> sidecar: response framing -------------------------------------------------------

# An upstream answering `Transfer-Encoding: gzip, chunked` gets its chunked framing decoded and its
# `Transfer-Encoding` dropped (hop-by-hop), but the gzip transfer coding is never undone: the
# client gets gzip bytes labelled application/json with no coding named, and response DLP,
# guardrails and usage counting read compressed bytes (the gateway otherwise refuses compressed
# answers where it reads them). upstream/h1.rs:879-900 `framing` looks only at the last coding.
# RFC 9112 §6.1/§7: a recipient removing Transfer-Encoding must decode every coding it lists; one
# it cannot decode is an error (502), never passed on as identity.
# FAILS at eef83f2: the gzip-coded body reaches the client as a plain 200 body, TE gzip dropped.
def test_a_transfer_coding_the_gateway_does_not_decode_is_never_passed_on_as_identity(gw, up):
    plain = ok("gz").split(b"\r\n\r\n", 1)[1]
    coded = gzip.compress(plain)
    up.reset(lambda head: b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                          b"transfer-encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(coded), coded))
    answers, _ = exchange(gw, post(), until=1)
    assert answers, "no answer"
    status, headers, body = answers[0]
    assert not body.startswith(b"\x1f\x8b"), f"{status}: gzip bytes passed on as identity ({headers})"
    assert status == 502 or body == plain, (status, body[:200])


def test_an_upstream_connection_header_naming_framing_headers_does_not_break_the_answer(gw, up):
    # `Connection: content-length` (or transfer-encoding) from an upstream: the header goes, the
    # answer is still framed once, whole, and the connection reused cleanly after it.
    answers_in_order = iter([
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: content-length, date\r\n"
        b"content-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: transfer-encoding\r\n"
        b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ])
    up.reset(lambda head: next(answers_in_order, ok("third")))
    answers, _ = exchange(gw, post() + post() + post(), until=3)
    assert [(a[0], a[2]) for a in answers[:2]] == [(200, b"{}"), (200, b"{}")], answers
    assert json.loads(answers[2][2])["id"] == "third"
    for _, headers, _ in answers:
        assert "connection" not in headers
        assert len(headers.get("content-length", [])) + len(headers.get("transfer-encoding", [])) == 1, headers


# --- h2c: header validation before anything goes upstream ----------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def hpack_int(n, bits, first=0):
    top = (1 << bits) - 1
    if n < top:
        return bytes([first | n])
    out = [first | top]
    n -= top
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + [n])


def literal(name, value):
    """An HPACK literal field without indexing, new name, no Huffman: any bytes go on the wire."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def h2c_request(g, fields, body, wait=4):
    """One request on stream 1 of a new h2c connection: 'ok' when an answer's HEADERS came for it,
    'refused' when the stream was reset or the connection sent GOAWAY."""
    s = socket.create_connection(("127.0.0.1", g.port), timeout=wait)
    with s:
        s.sendall(PREFACE + frame(4, 0, 0, b"") + frame(1, 0x4, 1, b"".join(literal(n, v) for n, v in fields))
                  + frame(0, 0x1, 1, body))
        data, deadline = b"", time.monotonic() + wait
        while time.monotonic() < deadline:
            while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
                length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
                stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
                data = data[9 + length:]
                if kind == 4 and not flags & 1:
                    s.sendall(frame(4, 1, 0, b""))
                if kind == 7 or (kind == 3 and stream == 1):
                    return "refused"
                if kind == 1 and stream == 1:
                    return "ok"
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return "nothing"
            if not chunk:
                return "refused"
            data += chunk
    return "nothing"


H2_BASE = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost"),
           (b":path", CHAT), (b"content-type", b"application/json")]
H2_BAD = {
    "CRLF in a value": H2_BASE + [(b"x-a", b"b\r\nx-injected: 1")],
    "LF in a value": H2_BASE + [(b"x-a", b"b\nx-injected: 1")],
    "NUL in a value": H2_BASE + [(b"x-a", b"b\x00c")],
    "transfer-encoding": H2_BASE + [(b"transfer-encoding", b"chunked")],
    "connection": H2_BASE + [(b"connection", b"keep-alive")],
    "keep-alive": H2_BASE + [(b"keep-alive", b"timeout=5")],
    "upgrade": H2_BASE + [(b"upgrade", b"websocket")],
    "te other than trailers": H2_BASE + [(b"te", b"gzip")],
    "uppercase name": H2_BASE + [(b"X-Upper", b"1")],
    "colon in a name": H2_BASE + [(b"x:a", b"1")],
    "content-length below the data": H2_BASE + [(b"content-length", b"2")],
    "pseudo-header after a field": H2_BASE[:3] + H2_BASE[4:] + H2_BASE[3:4],
    "no :path": H2_BASE[:3] + H2_BASE[4:],
    "two :path": H2_BASE + [(b":path", b"/openai/models")],
    "CRLF in :path": H2_BASE[:3] + [(b":path", CHAT + b" HTTP/1.1\r\nx-injected: 1")] + H2_BASE[4:],
}


def test_h2c_requests_go_upstream_when_well_formed(gw, up):
    assert h2c_request(gw, H2_BASE + [(b"te", b"trailers")], chat_body()) == "ok"
    [head] = up.heads()
    assert b"\r\nte:" not in head.lower()


@pytest.mark.parametrize("name", list(H2_BAD))
def test_h2c_malformed_requests_are_refused_and_never_go_upstream(gw, up, name):
    assert h2c_request(gw, H2_BAD[name], chat_body()) == "refused"
    time.sleep(0.1)
    assert up.heads() == []
