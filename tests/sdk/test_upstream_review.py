"""Review of the sidecar's upstream connections (sidecar/src/upstream.rs, upstream/h1.rs): TLS to
upstreams with certificates made here (a root, an intermediate, leaves expired, misnamed, ...)
and trusted through --upstream-ca, an HTTP/2-only upstream, an early answer over TLS, keep-alive
and `Connection: close` over TLS, IPv6 loopback upstreams, a TLS handshake that never ends, and
the egress proxy variables. Every upstream here is a loopback socket started by the test.

Left out: a host name resolving to several addresses (one dead) needs /etc/hosts changed; the
keep-alive race itself is covered by test_upstream_keepalive.py and h1.rs's unit tests."""

import datetime
import ipaddress
import json
import pathlib
import socket
import ssl
import threading
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import DEFAULT_KEYS, OPENAI_KEY, Sidegate, gateway_yaml
from rawhttp import Listener, read_request

CHAT = "/openai/chat/completions"
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


# --- certificates ------------------------------------------------------------------------------

class Cert:
    def __init__(self, key, cert):
        self.key, self.cert = key, cert

    def pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self):
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def issue(cn, *, by=None, ca=False, names=(), start=None, end=None, server=True):
    """A certificate for `cn`, signed by `by` (else self-signed): a CA, or a server certificate
    for `names` (DNS names or IP addresses). `server=False` with `ca=True` and `names` makes what
    `openssl req -x509 -addext subjectAltName=...` makes by default: a self-signed certificate
    with CA:TRUE and the names, no key or extended key usage."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(by.cert.subject if by else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start or NOW - DAY).not_valid_after(end or NOW + 30 * DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca and server:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                            critical=True)
    if names:
        sans = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return Cert(key, b.sign((by or Cert(key, None)).key, hashes.SHA256()))


def server_context(tmp, leaf, chain=(), alpn=None):
    """A TLS server context presenting `leaf` followed by `chain`."""
    crt, key = tmp / f"server-{id(leaf)}.crt", tmp / f"server-{id(leaf)}.key"
    crt.write_bytes(leaf.pem() + b"".join(c.pem() for c in chain))
    key.write_bytes(leaf.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@pytest.fixture
def root():
    return issue("sidegate review root", ca=True)


def ca_file(tmp, *certs, prefix=b""):
    path = tmp / "upstream-ca.pem"
    path.write_bytes(prefix + b"".join(c.pem() for c in certs))
    return path


# --- upstreams ---------------------------------------------------------------------------------

def chat_answer(text, extra=b""):
    body = json.dumps({
        "id": "chatcmpl-r", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra
            + b"content-length: %d\r\n\r\n" % len(body) + body)


class Upstream:
    """A loopback upstream (a rawhttp.Listener, unless `listen=False`: then connections are
    handed to `handle` by the test; over TLS with `ctx`): each connection, once its handshake is
    done, goes to `serve(conn, index, upstream)`; by default every request on it is answered
    `conn <index>`. Request heads, TLS names asked for (SNI), ALPN protocols chosen and handshake
    errors are recorded."""

    def __init__(self, ctx=None, serve=None, listen=True):
        self.ctx = ctx
        self.heads, self.sni, self.alpn, self.errors = [], [], [], []
        self.serve = serve or answer_each
        if ctx is not None:
            ctx.sni_callback = lambda _s, name, _c: self.sni.append(name)
        if listen:
            self.listener = Listener(self.handle)
            self.port = int(self.listener.url.rsplit(":", 1)[1])
            self.url = self.listener.url.replace("http://", "https://" if ctx else "http://")

    @property
    def accepted(self):
        return self.listener.accepted

    def handle(self, conn, index):
        try:
            if self.ctx is not None:
                conn.settimeout(20)
                conn = self.ctx.wrap_socket(conn, server_side=True)
                self.alpn.append(conn.selected_alpn_protocol())
            self.serve(conn, index, self)
        except (OSError, ssl.SSLError) as e:
            self.errors.append(repr(e))
        finally:
            conn.close()

    def stop(self):
        self.listener.close()


def answer_each(conn, index, up):
    rest = b""
    while (req := read_request(conn, rest)) is not None:
        head, body, rest = req
        up.heads.append(head)
        bye = b"bye" in body
        conn.sendall(chat_answer(f"conn {index}", b"connection: close\r\n" if bye else b""))
        if bye:
            return  # closed without a close_notify, as many servers do after `Connection: close`


def post(g, prompt="hi", timeout=30, **kw):
    return httpx.post(g.url + CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
                      timeout=timeout, **kw)


def envelope(r):
    err = r.json()["error"][0]
    return r.status_code, err["code"], err["message"]


def tls_gateway(tmp, url, ca, extra_spec=""):
    return Sidegate(tmp, gateway_yaml(url, extra_spec=extra_spec), DEFAULT_KEYS,
                    extra_args=["--upstream-ca", str(ca)])


# --- certificate problems ----------------------------------------------------------------------

CERT_PROBLEMS = {
    # name: (leaf maker (root, intermediate) -> (leaf, chain sent), words the 502 must hold)
    "expired": (lambda r, i: (issue("up", by=r, names=["127.0.0.1"], start=NOW - 10 * DAY, end=NOW - 2 * DAY), ()),
                "expired"),
    "not yet valid": (lambda r, i: (issue("up", by=r, names=["127.0.0.1"], start=NOW + 2 * DAY, end=NOW + 9 * DAY), ()),
                      "not valid yet"),
    "another host's": (lambda r, i: (issue("up", by=r, names=["api.example.com"]), ()),
                       "not valid for name"),
    "intermediate not sent": (lambda r, i: (issue("up", by=i, names=["127.0.0.1"]), ()),
                              "UnknownIssuer"),
}


@pytest.mark.parametrize("problem", list(CERT_PROBLEMS))
def test_a_certificate_problem_is_a_prompt_502_naming_it(tmp_path, root, problem):
    make, words = CERT_PROBLEMS[problem]
    inter = issue("sidegate review intermediate", by=root, ca=True)
    leaf, chain = make(root, inter)
    up = Upstream(server_context(tmp_path, leaf, chain))
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root))
    try:
        started = time.monotonic()
        r = post(g)
        took = time.monotonic() - started
        status, code, message = envelope(r)
        assert (status, code) == (502, 2104), r.text
        assert words in message, message
        assert took < 5, f"{took:.1f}s"
        assert up.heads == [], "no request may go to an upstream whose certificate failed"
        assert OPENAI_KEY not in r.text
    finally:
        g.stop()
        up.stop()


def test_a_chain_sent_with_its_intermediate_verifies_against_a_root_in_a_bundle_of_several(tmp_path, root):
    # A bundle as users make them: the system's roots, an unrelated private CA, a comment, then
    # the root; the upstream sends its leaf and the intermediate.
    system = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
    prefix = (system.read_bytes() if system.is_file() else b"") + issue("unrelated", ca=True).pem() + b"# ours\n"
    inter = issue("sidegate review intermediate", by=root, ca=True)
    up = Upstream(server_context(tmp_path, issue("up", by=inter, names=["127.0.0.1"]), [inter]))
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root, prefix=prefix))
    try:
        r = post(g)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "conn 0"
    finally:
        g.stop()
        up.stop()


def test_an_upstream_demanding_a_client_certificate_is_a_502_saying_so(tmp_path, root):
    ctx = server_context(tmp_path, issue("up", by=root, names=["127.0.0.1"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=root.pem().decode())
    up = Upstream(ctx)
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root))
    try:
        status, code, message = envelope(post(g, timeout=10))
        assert (status, code) == (502, 2104) and "CertificateRequired" in message, message
        assert up.heads == []
    finally:
        g.stop()
        up.stop()


# FAILS at 0175ae4: a self-signed server certificate with CA:TRUE (what `openssl req -x509` makes by default; curl accepts it when trusted) named by --upstream-ca is refused with the Rust debug text "Other(OtherError(CaUsedAsEndEntity))"
@pytest.mark.xfail(strict=True, reason="review: a self-signed server certificate with CA:TRUE (what `openssl req -x509` makes by default; curl accepts it when trusted) named by --upstream-ca is refused with the Rust debug text \"Other(OtherError(CaUsedAsEndEntity))\"")
def test_a_self_signed_server_certificate_trusted_by_upstream_ca_is_served_or_refused_in_words(tmp_path):
    own = issue("127.0.0.1", ca=True, names=["127.0.0.1"], server=False)
    up = Upstream(server_context(tmp_path, own))
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, own))
    try:
        r = post(g, timeout=10)
        if r.status_code != 200:
            status, code, message = envelope(r)
            assert (status, code) == (502, 2104), r.text
            # Said in words a user can act on (the certificate is a CA's, used as a server's),
            # not as a Rust value.
            assert "OtherError" not in message and "CA" in message, message
    finally:
        g.stop()
        up.stop()


# --- protocols ---------------------------------------------------------------------------------

# An HTTP/2 SETTINGS frame then a GOAWAY (PROTOCOL_ERROR), as an h2-only server answers bytes
# that are not the HTTP/2 preface.
H2_SETTINGS_GOAWAY = (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                      b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01")


def test_an_upstream_speaking_only_http2_is_a_prompt_502_and_is_offered_only_http1(tmp_path, root):
    def h2_only(conn, _index, up):
        up.heads.append(conn.recv(65536))
        conn.sendall(H2_SETTINGS_GOAWAY)
        time.sleep(1)

    up = Upstream(server_context(tmp_path, issue("up", by=root, names=["127.0.0.1"]), alpn=["h2"]), h2_only)
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root))
    try:
        started = time.monotonic()
        status, code, message = envelope(post(g, timeout=10))
        assert (status, code) == (502, 2104), message
        assert time.monotonic() - started < 3
        # HTTP/2 was not offered (no ALPN agreed), and HTTP/1.1 was spoken.
        assert up.alpn == [None]
        assert up.heads[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n"), up.heads
    finally:
        g.stop()
        up.stop()


def test_over_tls_a_connection_is_reused_until_connection_close_and_names_its_host(tmp_path, root):
    # A named host on a non-default port: SNI is the name, Host the name and port. A
    # `Connection: close` answer, framed by its length and closed without a close_notify, is
    # whole, and its connection is not used again.
    up = Upstream(server_context(tmp_path, issue("up", by=root, names=["localhost"])))
    url = f"https://localhost:{up.port}"
    g = tls_gateway(tmp_path, url, ca_file(tmp_path, root))
    try:
        with httpx.Client(timeout=30) as c:
            for prompt, want in [("one", "conn 0"), ("two", "conn 0"), ("bye", "conn 0"), ("after", "conn 1")]:
                r = c.post(g.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
                assert r.status_code == 200, (prompt, r.text)
                assert r.json()["choices"][0]["message"]["content"] == want, prompt
        assert up.accepted == 2
        assert up.sni == ["localhost", "localhost"]
        assert all(f"\r\nhost: localhost:{up.port}\r\n".encode() in h.lower() + b"\r\n" for h in up.heads), up.heads
    finally:
        g.stop()
        up.stop()


def test_an_answer_sent_over_tls_before_the_long_body_was_read_is_the_answer(tmp_path, root):
    # The TLS write path (records waiting for the socket, then a flush) watches for the answer
    # too; the connection, its body unsent, is not reused.
    def early(conn, index, up):
        if index > 0:
            return answer_each(conn, index, up)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        body = b'{"error":{"message":"too large","type":"invalid_request_error"}}'
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(3)

    up = Upstream(server_context(tmp_path, issue("up", by=root, names=["127.0.0.1"])), early)
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root))
    try:
        with httpx.Client(timeout=30) as c:
            started = time.monotonic()
            r = c.post(g.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "x" * (8 << 20)}]})
            assert r.status_code == 413 and r.json()["error"]["message"] == "too large", r.text[:300]
            assert time.monotonic() - started < 2.5
            r = c.post(g.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "next"}]})
            assert r.json()["choices"][0]["message"]["content"] == "conn 1"
    finally:
        g.stop()
        up.stop()


def test_over_tls_a_long_body_cut_off_on_a_reused_connection_is_sent_again_whole(tmp_path, root):
    # The TLS variant of test_upstream_keepalive's "unread": the upstream closes the pooled
    # connection with the body unread; rustls had taken part of it into its own buffer.
    def lose_the_second(conn, index, up):
        rest = b""
        for n in range(100):
            if index == 0 and n == 1:
                read_request(conn, rest, body=False)
                return
            req = read_request(conn, rest)
            if req is None:
                return
            head, body, rest = req
            up.heads.append(head)
            conn.sendall(chat_answer(f"conn {index}: {len(body)}"))

    up = Upstream(server_context(tmp_path, issue("up", by=root, names=["127.0.0.1"])), lose_the_second)
    g = tls_gateway(tmp_path, up.url, ca_file(tmp_path, root))
    try:
        with httpx.Client(timeout=30) as c:
            assert c.post(g.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            long = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (4 << 20)}]}).encode()
            r = c.post(g.url + CHAT, content=long, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["choices"][0]["message"]["content"] == f"conn 1: {len(long)}"
        assert up.accepted == 2
    finally:
        g.stop()
        up.stop()


def refuse_early_and_close(conn, _index, up):
    """Answers 413 to the request head and closes at once, its body unread (so the kernel resets
    the connection), as a server with a body limit and no lingering close does."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    up.heads.append(data.split(b"\r\n\r\n")[0])
    body = b'{"error":{"message":"too large","type":"invalid_request_error"}}'
    conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))


# FAILS at 0175ae4: an upstream that answers 413 to a long body and closes (the unread body makes its kernel reset the connection) gets the client a 502 "Connection reset by peer" although its 413 is readable in the socket: the write error ends the request without reading what came (h1.rs write_request; hyper-util's client above 64 MiB likewise); SDKs then retry the upload
@pytest.mark.xfail(strict=True, reason="review: an upstream that answers 413 to a long body and closes (the unread body makes its kernel reset the connection) gets the client a 502 \"Connection reset by peer\" although its 413 is readable in the socket: the write error ends the request without reading what came (h1.rs write_request; hyper-util's client above 64 MiB likewise); SDKs then retry the upload")
@pytest.mark.parametrize("mib", [8, 65], ids=["in-task client", "hyper-util client"])
def test_an_early_refusal_followed_by_a_reset_is_still_the_answer(tmp_path, mib):
    up = Upstream(serve=refuse_early_and_close)
    spec = "  limits: {maxRequestBody: 100Mi, maxBufferedBytes: 200Mi}\n"
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (mib << 20)}]}).encode()
        # The answer and the reset arrive microseconds apart: which the gateway sees first is a
        # race, so the exchange is tried a few times; each must end with the upstream's answer.
        answers = []
        for _ in range(5):
            r = httpx.post(g.url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
            answers.append((r.status_code, r.text[:200]))
        assert len(up.heads) == 5, "each request reached the upstream"
        assert [a[0] for a in answers] == [413] * 5, answers
        assert all("too large" in a[1] for a in answers)
    finally:
        g.stop()
        up.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_an_ipv6_loopback_upstream(tmp_path, root, tls):
    sock = socket.socket(socket.AF_INET6)
    try:
        sock.bind(("::1", 0))
    except OSError:
        sock.close()
        pytest.skip("no IPv6 loopback")
    sock.listen(8)
    ctx = server_context(tmp_path, issue("up", by=root, names=["::1"])) if tls else None
    up = Upstream(ctx, listen=False)
    port = sock.getsockname()[1]

    def accept():
        index = 0
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=up.handle, args=(conn, index), daemon=True).start()
            index += 1

    threading.Thread(target=accept, daemon=True).start()
    url = f"{'https' if tls else 'http'}://[::1]:{port}"
    g = tls_gateway(tmp_path, url, ca_file(tmp_path, root))
    try:
        r = post(g, timeout=10)
        assert r.status_code == 200, r.text
        assert f"\r\nhost: [::1]:{port}\r\n".encode() in up.heads[0] + b"\r\n", up.heads
    finally:
        g.stop()
        sock.close()


# --- timeouts ----------------------------------------------------------------------------------

# FAILS at 0175ae4: a request body over 64 MiB takes hyper-util's client, whose TLS handshake has no bound (HttpConnector's connect timeout covers TCP only): an upstream that accepts and never answers the handshake holds it until the request timeout (600 s by default), then 504
@pytest.mark.xfail(strict=True, reason="review: a request body over 64 MiB takes hyper-util's client, whose TLS handshake has no bound (HttpConnector's connect timeout covers TCP only): an upstream that accepts and never answers the handshake holds it until the request timeout (600 s by default), then 504")
def test_a_tls_handshake_that_never_ends_is_cut_at_the_connect_timeout_for_a_large_body_too(tmp_path):
    stop = threading.Event()
    silent = Listener(lambda conn, _i: (stop.wait(30), conn.close()))
    url = silent.url.replace("http://", "https://")
    # Room for a body over 64 MiB; the request timeout (13 s) above the 10 s connect bound.
    spec = "  requestTimeout: 13s\n  limits: {maxRequestBody: 100Mi, maxBufferedBytes: 200Mi}\n"
    g = Sidegate(tmp_path, gateway_yaml(url, extra_spec=spec), DEFAULT_KEYS)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (65 << 20)}]}).encode()
        started = time.monotonic()
        r = httpx.post(g.url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=40)
        took = time.monotonic() - started
        assert r.status_code == 502 and r.json()["error"][0]["code"] == 2104, (r.status_code, r.text, f"{took:.1f}s")
        assert "handshake" in r.json()["error"][0]["message"].lower(), r.text
        assert took < 12, f"{took:.1f}s"
    finally:
        stop.set()
        g.stop()
        silent.close()


# --- egress proxies ----------------------------------------------------------------------------

class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that tunnels every CONNECT to `to_port` on 127.0.0.1,
    whatever host it names, and records the request lines."""

    def __init__(self, to_port):
        self.to_port = to_port
        self.connects = []
        self.listener = Listener(self._handle)
        self.url = self.listener.url

    def _handle(self, conn, _index):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.connects.append(data.split(b"\r\n", 1)[0].decode())
            with socket.create_connection(("127.0.0.1", self.to_port)) as to:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=pipe, args=(conn, to), daemon=True).start()
                pipe(to, conn)

    def stop(self):
        self.listener.close()


def pipe(a, b):
    try:
        while chunk := a.recv(65536):
            b.sendall(chunk)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# FAILS at 0175ae4: HTTPS_PROXY (the egress proxy many clusters require; --help names "an egress proxy" for --upstream-ca) is ignored without a word: the sidecar resolves and connects directly, nothing is logged, README says nothing
@pytest.mark.xfail(strict=True, reason="review: HTTPS_PROXY (the egress proxy many clusters require; --help names \"an egress proxy\" for --upstream-ca) is ignored without a word: the sidecar resolves and connects directly, nothing is logged, README says nothing")
def test_an_https_proxy_in_the_environment_is_used_or_said_to_be_ignored(tmp_path, root, monkeypatch):
    # `upstream.invalid` (RFC 6761: never resolves) is reachable only through the proxy.
    up = Upstream(server_context(tmp_path, issue("up", by=root, names=["upstream.invalid"])))
    proxy = ConnectProxy(up.port)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    # The test's own clients (readiness, requests) reach the gateway directly.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")
    g = tls_gateway(tmp_path, "https://upstream.invalid", ca_file(tmp_path, root), extra_spec="  requestTimeout: 10s\n")
    try:
        r = post(g, timeout=20)
        used = r.status_code == 200 and any(c.startswith("CONNECT upstream.invalid:443 ") for c in proxy.connects)
        said = "HTTPS_PROXY" in g.logs()
        assert used or said, (r.status_code, r.text[:300], proxy.connects)
    finally:
        g.stop()
        proxy.stop()
        up.stop()
