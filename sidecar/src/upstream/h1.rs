//! HTTP/1.1 to upstreams, plain or over TLS, run inside the request's task.
//!
//! The common request (a small buffered body, no framing headers of its own) is written in one
//! `writev`, the response head is parsed with `httparse` (as hyper does), and the body is read
//! straight from the connection's buffer: whatever a read brought in is decoded (chunked
//! framing removed) and handed on as one frame. No connection task, no per-chunk channel
//! hand-off. Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when
//! `Transfer-Encoding` ends in `chunked` (trailers are read and dropped: the client side never
//! asked for them, `TE` being hop-by-hop); else `Content-Length`; else until the connection
//! closes. A connection goes back to the pool only after a complete, keep-alive response with
//! nothing read past its end, for no longer than the upstream's `Keep-Alive: timeout` allows
//! (less a margin); dropping a body mid-way closes the connection. A request lost with a
//! pooled connection the upstream closed as it went out — the connection closed or reset
//! before any byte of an answer — is sent again, once, on a new connection.
//!
//! HTTPS upstreams get the same path over rustls, offering only `http/1.1` by ALPN: HTTP/1.1
//! with keep-alive is what the providers' own SDKs speak, and in `bench/run --tls` it served 32
//! concurrent streams at about three times the rate hyper's HTTP/2 client did over one
//! multiplexed connection (0.58–0.67× direct against 0.20×).

use std::future::poll_fn;
use std::io::{self, BufRead as _, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufRead, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower_service::Service as _;

use crate::chunked::{self, Chunked};
use crate::headers::{KnownNames, RawHeaders, has_token};

use super::{BodyError, CONNECT_TIMEOUT, IDLE_TIMEOUT, MAX_IDLE_PER_HOST, UpstreamError};

/// Largest request body sent on this path (beyond the gateway's default limit of 10 MiB; larger
/// ones take the general client). Long prompts are the common case for agents: a body the
/// socket does not take at once is written while watching for an early answer (an error the
/// upstream sends before reading it all), which then is the response.
pub const MAX_BODY: usize = 64 << 20;
/// Largest response head accepted (hyper's default buffer limit).
const MAX_HEAD: usize = 400 * 1024;
/// Most response headers accepted (hyper's default).
const MAX_HEADERS: usize = 100;
/// First read size of a connection.
const READ_CHUNK: usize = 8 * 1024;
/// Largest read size.
const MAX_READ: usize = 128 * 1024;
/// A request header that makes a POST safe to send twice (the IETF draft's name; Stripe's and
/// others' APIs take it).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How soon after a pooled connection was taken its loss, with no byte of an answer, is the
/// keep-alive race (the upstream closed it idle as the request went out: a replayable request
/// is sent again on a new one); later, the upstream may have worked on the request, which is
/// not sent twice.
const RESEND_WITHIN: Duration = Duration::from_secs(1);

/// Whether `req` can take this path: a buffered body of known length and no framing or upgrade
/// headers of its own.
pub fn eligible(req: &Request<Full<Bytes>>) -> bool {
    use http_body::Body as _;
    let h = req.headers();
    req.method() != Method::CONNECT
        && req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_BODY as u64)
        && !h.keys().any(|n| FRAMING.contains(n))
}

/// Request headers that would change this path's framing or connection handling (one pass over
/// the few headers a request has costs less than a lookup of each).
const FRAMING: [header::HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::UPGRADE,
    header::CONNECTION,
];

/// A connection's transport.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    /// Sends what TLS still holds (records the socket did not take yet).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(_) => Poll::Ready(Ok(())),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// One connection and the bytes read from it not consumed yet.
struct Conn {
    io: Io,
    buf: BytesMut,
    /// Bytes asked for by the next read: grows while reads fill it.
    read_size: usize,
    /// Header names of this connection's earlier responses.
    names: KnownNames,
    /// How long the connection may wait idle in the pool, from its last response.
    keep_idle: Duration,
}

impl Conn {
    /// Reads more into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let tcp = match &mut self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => {
                // rustls hands on one record's plaintext at a time; a read from the socket
                // usually decrypts several (a burst of stream events): take them all, so they
                // leave as one frame like a plain read.
                let first = ready!(Pin::new(&mut **tls).poll_fill_buf(cx))?;
                let mut n = first.len();
                self.buf.extend_from_slice(first);
                Pin::new(&mut **tls).consume(n);
                let mut plaintext = tls.get_mut().1.reader();
                while n > 0 && n < MAX_READ {
                    let more = match plaintext.fill_buf() {
                        Ok(more) if !more.is_empty() => more,
                        _ => break,
                    };
                    let len = more.len();
                    self.buf.extend_from_slice(more);
                    plaintext.consume(len);
                    n += len;
                }
                return Poll::Ready(Ok(n));
            }
        };
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
                self.buf.reserve(self.read_size);
            }
            let room = self.buf.capacity() - self.buf.len();
            match tcp.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) if n > 0 && n < room => {
                    // A short read drained the socket: forget its readiness (as tokio's
                    // `AsyncRead` does), so the idle check of a pooled connection costs no
                    // syscall.
                    let _ = tcp.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                    return Poll::Ready(Ok(n));
                }
                Ok(n) => {
                    if n == room && self.read_size < MAX_READ {
                        self.read_size *= 2;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// While a request is still being written: ready when the upstream has answered already
    /// (bytes read into the buffer); an error when it closed instead.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(incomplete())),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Whether an idle connection is still usable: not closed by the upstream, nothing unasked
    /// for sent on it (over TLS, a record of any kind — a close_notify, say — counts as
    /// something sent: the connection is dropped, costing at most a new handshake).
    fn still_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.tcp().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

struct Idle {
    conn: Box<Conn>,
    /// When it is no longer to be used.
    expires: Instant,
}

#[derive(Default)]
struct Host {
    idle: Vec<Idle>,
    host_header: Option<HeaderValue>,
}

/// Where connections go: the authority, over TLS or not.
#[derive(Clone)]
struct Origin {
    tls: bool,
    authority: Authority,
}

impl Origin {
    /// The origin of an `http` or `https` URI with an authority.
    fn of(uri: &Uri) -> Option<Self> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return None,
        };
        Some(Self {
            tls,
            authority: uri.authority()?.clone(),
        })
    }

    fn is(&self, other: &Self) -> bool {
        // The same provider's authority is the same string each time: compare bytes before
        // the case-insensitive comparison.
        self.tls == other.tls
            && (self.authority.as_str() == other.authority.as_str()
                || self.authority == other.authority)
    }
}

/// Idle connections per upstream origin (a sidecar talks to a handful: a list beats hashing).
pub struct Pool {
    connector: HttpConnector,
    tls: TlsConnector,
    handshake_timeout: std::time::Duration,
    hosts: Mutex<Vec<(Origin, Host)>>,
    sweeping: std::sync::atomic::AtomicBool,
}

fn host_entry<'a>(hosts: &'a mut Vec<(Origin, Host)>, origin: &Origin) -> &'a mut Host {
    let i = match hosts.iter().position(|(o, _)| o.is(origin)) {
        Some(i) => i,
        None => {
            hosts.push((origin.clone(), Host::default()));
            hosts.len() - 1
        }
    };
    &mut hosts[i].1
}

/// `Host` for a URI: host, and port unless it is the scheme's default (as hyper-util sets it).
fn host_header(uri: &Uri) -> HeaderValue {
    let host = uri.host().unwrap_or_default();
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let value = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

fn send_error(e: impl Into<BodyError>) -> UpstreamError {
    UpstreamError {
        kind: "SendRequest",
        source: e.into(),
    }
}

/// The message hyper gives for a connection that closed before the response was complete.
fn incomplete() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before message completed",
    )
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid HTTP response: {what}"),
    )
}

impl Pool {
    /// A pool connecting with `connector` (which must accept `https` URIs too), and over TLS
    /// with `tls` (whose ALPN protocols, if any, must be `http/1.1` alone).
    pub fn new(connector: HttpConnector, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            connector,
            tls: TlsConnector::from(tls),
            handshake_timeout: CONNECT_TIMEOUT,
            hosts: Mutex::new(Vec::new()),
            sweeping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Idle connections now.
    pub fn idle(&self) -> usize {
        self.hosts
            .lock()
            .map_or(0, |h| h.iter().map(|(_, h)| h.idle.len()).sum())
    }

    /// Sends an [`eligible`] request with an `http` or `https` absolute URI.
    pub async fn request(
        self: &Arc<Self>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        let Some(origin) = Origin::of(&parts.uri) else {
            return Err(send_error(invalid("not an http or https URI")));
        };
        let (mut idle, host) = self.checkout(&origin, &parts.uri);
        let head = encode_head(&parts, host, body.len());
        let is_head = parts.method == Method::HEAD;
        // Sent again after a lost connection that may have read it only when doing it twice
        // does no harm: an idempotent method, or a request its client made safe to repeat.
        // An LLM call is a POST, and one the upstream read and then lost may have been billed.
        // (Asked only then: a header lookup by name costs every request.)
        let replayable =
            || parts.method.is_idempotent() || parts.headers.contains_key(IDEMPOTENCY_KEY);
        let (mut conn, written, (resp, framing, keep_idle)) = loop {
            // When a pooled connection was taken: only such a connection may have been closed
            // by the upstream as the request went out.
            let (mut conn, taken_at) = match idle.take() {
                Some((c, at)) => (c, Some(at)),
                None => (self.connect(&origin, &parts.uri).await?, None),
            };
            let reused = taken_at.is_some();
            let lost = match write_request(&mut conn, &head, &body).await {
                Ok(written) => match read_head(&mut conn, is_head).await {
                    Ok(parsed) => break (conn, written, parsed),
                    // Lost at once, not after the upstream had time to work on the request (a
                    // crash mid-answer must not have it done twice).
                    Err((e, received))
                        if !received
                            && connection_lost(&e)
                            && taken_at.is_some_and(|at| at.elapsed() < RESEND_WITHIN)
                            && replayable() =>
                    {
                        e
                    }
                    Err((e, _)) => return Err(send_error(e)),
                },
                // A reused connection the upstream closed before the request went out (the
                // first write failed, so nothing was sent): another one, like hyper-util.
                Err((e, 0)) if reused => {
                    tracing::debug!(error = %e, "pooled upstream connection closed; reconnecting");
                    idle = self.checkout(&origin, &parts.uri).0;
                    continue;
                }
                // A failed write says no answer had come (one would have ended the writing).
                Err((e, _)) if reused && connection_lost(&e) => e,
                Err((e, _)) => return Err(send_error(e)),
            };
            // The keep-alive race: the upstream closed the idle connection as the request went
            // out, so it never read it (a server closing an idle connection has no request in
            // progress on it) — or, sent whole, it read it and failed, which cannot be told
            // apart: then only a replayable request is sent again, as Go's transport and
            // nginx do (a POST is not: the client, or a retry policy, decides; the providers'
            // SDKs retry a 502). The request is in memory, whole: sent again, once, on a new
            // connection — `idle` is empty, and a new connection is never `reused`. Within this
            // one attempt: retry policies and their counts see one.
            tracing::debug!(error = %lost, "pooled upstream connection lost before any answer; resending on a new one");
        };
        conn.keep_idle = keep_idle.unwrap_or(Duration::ZERO);
        let mut body = Body {
            conn: Some(conn),
            framing,
            // Answered before the request was all sent: the rest of it would be read as the
            // next request.
            keep_alive: keep_idle.is_some() && matches!(written, Written::All),
            pool: Arc::downgrade(self),
            origin,
        };
        let mut resp = resp;
        if matches!(body.framing, Framing::Close) && !body.origin.tls {
            resp.extensions_mut().insert(super::UnframedBody);
        }
        if matches!(body.framing, Framing::Done) {
            body.release();
        }
        Ok(resp.map(|()| body))
    }

    fn checkout(&self, origin: &Origin, uri: &Uri) -> (Option<(Box<Conn>, Instant)>, HeaderValue) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let host = host_entry(&mut hosts, origin);
        let header = host
            .host_header
            .get_or_insert_with(|| host_header(uri))
            .clone();
        if host.idle.is_empty() {
            return (None, header);
        }
        let now = Instant::now();
        while let Some(idle) = host.idle.pop() {
            if now < idle.expires && idle.conn.still_idle() {
                return (Some((idle.conn, now)), header);
            }
        }
        (None, header)
    }

    async fn connect(
        self: &Arc<Self>,
        origin: &Origin,
        uri: &Uri,
    ) -> Result<Box<Conn>, UpstreamError> {
        let connect_error = |e: BodyError| UpstreamError {
            kind: "Connect",
            source: e,
        };
        let tcp = self
            .connector
            .clone()
            .call(uri.clone())
            .await
            .map_err(|e| connect_error(Box::new(e)))?
            .into_inner();
        let io = if origin.tls {
            // `[::1]` in a URI is the address `::1` to TLS.
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name =
                ServerName::try_from(host.to_owned()).map_err(|e| connect_error(Box::new(e)))?;
            // Bounded like the TCP connect: a server that accepts and then says nothing fails
            // here, not at the end of the request's timeout.
            let tls = tokio::time::timeout(self.handshake_timeout, self.tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    connect_error(Box::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    )))
                })?
                .map_err(|e| connect_error(Box::new(e)))?;
            Io::Tls(Box::new(tls))
        } else {
            Io::Plain(tcp)
        };
        self.start_sweeper();
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            read_size: READ_CHUNK,
            names: KnownNames::default(),
            keep_idle: IDLE_TIMEOUT,
        }))
    }

    fn put(&self, origin: &Origin, conn: Box<Conn>) {
        if conn.keep_idle.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let host = host_entry(&mut hosts, origin);
        host.idle.retain(|i| now < i.expires);
        if host.idle.len() < MAX_IDLE_PER_HOST {
            host.idle.push(Idle {
                expires: now + conn.keep_idle,
                conn,
            });
        }
    }

    /// Closes connections idle for longer than they may be ([`IDLE_TIMEOUT`], or less as the
    /// upstream's `Keep-Alive` asked) or closed by the upstream, every so often, for as long as
    /// the pool lives.
    fn start_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                let now = Instant::now();
                let mut hosts = pool.hosts.lock().unwrap_or_else(|p| p.into_inner());
                for (_, host) in hosts.iter_mut() {
                    host.idle.retain(|i| now < i.expires && i.conn.still_idle());
                }
                hosts.retain(|(_, h)| !h.idle.is_empty());
            }
        });
    }
}

/// Request line and headers, as hyper writes them: origin-form target, `Host` unless the
/// request has one, `Content-Length` when there is a body.
fn encode_head(parts: &http::request::Parts, host: HeaderValue, body_len: usize) -> Vec<u8> {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let target = if target.is_empty() { "/" } else { target };
    let mut size = parts.method.as_str().len() + target.len() + 64;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // An empty body is announced too where the method has one (RFC 9110 §8.6: some front ends
    // answer a bodiless POST without a length with 411).
    if body_len > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body_len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How much of a request went out.
enum Written {
    All,
    /// The upstream answered (or began to) before the body was all sent.
    Answered,
}

/// Writes `head` then `body`, in one `writev` when the socket takes it all (over TLS, in as
/// few records as they fit). While the socket takes no more, a response arriving ends the
/// writing: the upstream refused the request without reading it all, and its answer is the
/// response (as hyper's client does). On error, also says how many bytes had gone out.
async fn write_request(
    conn: &mut Conn,
    head: &[u8],
    body: &[u8],
) -> Result<Written, (io::Error, usize)> {
    let (mut h, mut b) = (head, body);
    let mut sent = 0;
    while !h.is_empty() || !b.is_empty() {
        let step = poll_fn(|cx| {
            if let Poll::Ready(r) = conn
                .io
                .poll_write_vectored(cx, &[IoSlice::new(h), IoSlice::new(b)])
            {
                return Poll::Ready(r.map(Some));
            }
            conn.poll_answer(cx).map(|r| r.map(|()| None))
        })
        .await;
        let n = match step {
            Ok(Some(n)) => n,
            Ok(None) if final_answer_begun(&mut conn.buf) => return Ok(Written::Answered),
            Ok(None) => continue,
            // Part of an answer came before the write failed or the upstream closed: it is
            // read as the answer, or found cut off (never sent again).
            Err(_) if !conn.buf.is_empty() => return Ok(Written::Answered),
            Err(e) => return Err((e, sent)),
        };
        if n == 0 {
            return Err((io::ErrorKind::WriteZero.into(), sent));
        }
        sent += n;
        let from_head = n.min(h.len());
        h = &h[from_head..];
        b = &b[n - from_head..];
    }
    // Over TLS the last records may still wait for the socket: watched the same way.
    loop {
        let flushed = poll_fn(|cx| {
            if let Poll::Ready(r) = conn.io.poll_flush(cx) {
                return Poll::Ready(r.map(|()| true));
            }
            conn.poll_answer(cx).map(|r| r.map(|()| false))
        })
        .await;
        match flushed {
            Ok(true) => return Ok(Written::All),
            Ok(false) if final_answer_begun(&mut conn.buf) => return Ok(Written::Answered),
            Ok(false) => {}
            Err(_) if !conn.buf.is_empty() => return Ok(Written::Answered),
            Err(e) => return Err((e, sent)),
        }
    }
}

/// Whether what the upstream sent while the request was still going out begins its final
/// answer, which ends the writing. Interim answers (`100 Continue` unasked, `103 Early
/// Hints`) are taken off `buf` and the request goes on (RFC 9110 §15.2); so does it while the
/// head that came is not whole yet (up to [`MAX_HEAD`]). A head that does not parse ends the
/// writing too: `read_head` tells of it.
fn final_answer_begun(buf: &mut BytesMut) -> bool {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let (parsed, status) = parse_response(buf, &mut slots);
        let interim = match status {
            Ok(httparse::Status::Complete(len))
                if len <= MAX_HEAD
                    && parsed
                        .code
                        .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                len
            }
            Ok(httparse::Status::Partial) => return buf.len() >= MAX_HEAD,
            _ => return true,
        };
        buf.advance(interim);
        if buf.is_empty() {
            return false;
        }
    }
}

/// How the response body is delimited.
enum Framing {
    /// `remaining` bytes.
    Length(u64),
    /// Chunked, in this decoder state.
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
    /// Nothing (more) to read.
    Done,
}

/// Whether an error is the connection lost under the request — closed (a FIN, or over TLS a
/// close_notify or a bare FIN) or reset by the upstream — rather than a bad or late answer.
fn connection_lost(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// A response head: the response, how its body is delimited, and how long its connection may
/// then wait idle for another request (`None`: it is not to be reused).
type Head = (Response<()>, Framing, Option<Duration>);

/// Reads and parses the response head (skipping 1xx interim responses). On error, also says
/// whether any byte of a response had come.
async fn read_head(conn: &mut Conn, is_head: bool) -> Result<Head, (io::Error, bool)> {
    let mut received = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, &mut conn.names, is_head) {
                Ok(Some(parsed)) => return Ok(parsed),
                Ok(None) => {}
                Err(e) => return Err((e, true)),
            }
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err((invalid("head too large"), true));
        }
        match poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) => return Err((incomplete(), received)),
            Ok(_) => received = true,
            Err(e) => return Err((e, received)),
        }
    }
}

/// Parses the response head at the start of `buf`, its headers into `slots` (uninitialized:
/// the parser writes the headers it finds, nothing has to clear a hundred slots).
fn parse_response<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> (httparse::Response<'h, 'b>, httparse::Result<usize>) {
    let mut parsed = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        slots,
    );
    (parsed, status)
}

/// Parses one response head from `buf` (consuming it), or `None` when more bytes are needed.
/// Interim 1xx responses are consumed and skipped.
fn parse_head(
    buf: &mut BytesMut,
    names: &mut KnownNames,
    is_head: bool,
) -> io::Result<Option<Head>> {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let (parsed, status) = parse_response(buf, &mut slots);
        let len = match status {
            // However it came: in parts (see `read_head`) or with one read.
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                return Err(invalid("head too large"));
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(invalid(&e.to_string())),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| invalid("status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // `eligible` requests ask for no upgrade: a switch nobody asked for is no answer.
            return Err(invalid(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        }
        if status.is_informational() {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values share the head's bytes.
        let base = buf.as_ptr() as usize;
        let mut fields = Vec::with_capacity(parsed.headers.len());
        let mut keep_idle = IDLE_TIMEOUT;
        // Headers the gateway never reads stay bytes (`RawHeaders`).
        let mut raw = Vec::new();
        for (i, h) in parsed.headers.iter().enumerate() {
            // Read here, from the bytes at hand, rather than looked up in the map after.
            if h.name.len() == KEEP_ALIVE.len() && h.name.eq_ignore_ascii_case(KEEP_ALIVE) {
                keep_idle = keep_idle.min(keep_alive_idle(h.value));
            }
            let Some(name) = names
                .response_header(i, h.name.as_bytes())
                .map_err(|_| invalid("header name"))?
            else {
                if raw.is_empty() {
                    raw.reserve(1024);
                }
                // The line as it came, up to the end of its value.
                let from = h.name.as_ptr() as usize - base;
                let to = h.value.as_ptr() as usize - base + h.value.len();
                RawHeaders::push(&mut raw, &buf[from..to]);
                continue;
            };
            let start = h.value.as_ptr() as usize - base;
            fields.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(fields.len());
        for (name, a, b) in fields {
            let value = HeaderValue::from_maybe_shared(head.slice(a..b))
                .map_err(|_| invalid("header value"))?;
            headers.append(name, value);
        }
        if version == Version::HTTP_10 && headers.contains_key(header::TRANSFER_ENCODING) {
            // As hyper: HTTP/1.0 has no transfer codings.
            return Err(invalid("transfer-encoding in HTTP/1.0"));
        }
        let framing = framing(status, is_head, &mut headers)?;
        // No reuse after a body delimited by the close, or a switch of protocols.
        let keep_alive = keep_alive(version, &headers) && !matches!(framing, Framing::Close);
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        if !raw.is_empty() {
            let raw = RawHeaders(raw.into());
            if lists_other_headers(&headers) {
                // Hop-by-hop by name: left to `strip_response_headers`, which reads the map.
                raw.append_to(&mut headers);
            } else {
                resp.extensions_mut().insert(raw);
            }
        }
        *resp.headers_mut() = headers;
        return Ok(Some((resp, framing, keep_alive.then_some(keep_idle))));
    }
}

/// The response header with the upstream's keep-alive parameters (RFC 2068 §19.7.1.1).
const KEEP_ALIVE: &str = "keep-alive";

/// Left of the upstream's own idle timeout when a connection is last reused: a request must
/// reach it before its timer fires, and the two clocks started a network trip apart (Node's
/// agent keeps the same second).
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);

/// How long a connection may wait idle by the value of `Keep-Alive` (`timeout=5, max=100`):
/// the upstream's `timeout` less [`KEEP_ALIVE_MARGIN`]; [`IDLE_TIMEOUT`] when it gives none.
fn keep_alive_idle(value: &[u8]) -> Duration {
    value
        .split(|&b| b == b',')
        .find_map(|param| {
            let eq = param.iter().position(|&b| b == b'=')?;
            if !param[..eq].trim_ascii().eq_ignore_ascii_case(b"timeout") {
                return None;
            }
            let secs = std::str::from_utf8(param[eq + 1..].trim_ascii()).ok()?;
            let secs: u64 = secs.trim_matches('"').parse().ok()?;
            Some(Duration::from_secs(secs).saturating_sub(KEEP_ALIVE_MARGIN))
        })
        .map_or(IDLE_TIMEOUT, |d| d.min(IDLE_TIMEOUT))
}

/// Whether a `Connection` header names other headers (hop-by-hop for this connection) than
/// its usual `close` and `keep-alive` options.
fn lists_other_headers(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
            })
    })
}

fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    if has_token(headers, header::CONNECTION, "close") {
        return false;
    }
    version == Version::HTTP_11 || has_token(headers, header::CONNECTION, "keep-alive")
}

/// The last transfer coding a response lists (`None` inside: it lists none), or `None` when it
/// lists one the gateway does not undo. The gateway removes Transfer-Encoding, so it must undo
/// every coding listed (RFC 9112 §7): it undoes `chunked` alone (`identity` changes nothing).
/// Another (`gzip, chunked`) would reach the client as a plain body, and the gateway's checks
/// would read compressed bytes.
pub(crate) fn transfer_codings(headers: &HeaderMap) -> Option<Option<&str>> {
    let mut last = None;
    for coding in headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if !coding.eq_ignore_ascii_case("chunked") && !coding.eq_ignore_ascii_case("identity") {
            return None;
        }
        last = Some(coding);
    }
    Some(last)
}

/// How the body of a response is delimited. A `Content-Length` next to a `Transfer-Encoding` is
/// ignored and removed, as RFC 9112 §6.3 asks of an intermediary (the client would otherwise
/// get it with a body of another length).
fn framing(status: StatusCode, is_head: bool, headers: &mut HeaderMap) -> io::Result<Framing> {
    if is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        let Some(last) = transfer_codings(headers) else {
            return Err(invalid("a transfer-encoding other than chunked"));
        };
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunked::START),
            _ => Framing::Close,
        });
    }
    let mut length: Option<u64> = None;
    let mut repeated = false;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| invalid("content-length"))?
            .split(',')
        {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid("content-length"));
            }
            let n: u64 = part.parse().map_err(|_| invalid("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("content-length"));
            }
            repeated |= length.is_some();
            length = Some(n);
        }
    }
    if repeated && let Some(n) = length {
        // The same length more than once (RFC 9112 §6.3) goes on as one: clients refuse two.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// The body of a response read on this path.
pub struct Body {
    conn: Option<Box<Conn>>,
    framing: Framing,
    keep_alive: bool,
    pool: Weak<Pool>,
    origin: Origin,
}

impl Body {
    /// Hands the connection back when it can carry another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(&self.origin, conn);
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    /// Data already buffered, decoded; true when the body is complete.
    fn take_buffered(&mut self) -> io::Result<(Option<Bytes>, bool)> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok((None, true));
        };
        match &mut self.framing {
            Framing::Done => Ok((None, true)),
            Framing::Length(left) => {
                if conn.buf.is_empty() {
                    return Ok((None, false));
                }
                let n = conn
                    .buf
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                let data = conn.buf.split_to(n).freeze();
                *left -= n as u64;
                Ok((Some(data), *left == 0))
            }
            Framing::Close => {
                if conn.buf.is_empty() {
                    return Ok((None, false));
                }
                Ok((Some(conn.buf.split().freeze()), false))
            }
            Framing::Chunked(state) => {
                if conn.buf.is_empty() {
                    return Ok((None, false));
                }
                let mut out = BytesMut::with_capacity(conn.buf.len());
                let (used, done) = chunked::decode(state, &conn.buf, &mut out).map_err(invalid)?;
                conn.buf.advance(used);
                Ok(((!out.is_empty()).then(|| out.freeze()), done))
            }
        }
    }

    /// Polls for the next frame: everything that is there, as one.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let (data, done) = match self.take_buffered() {
                Ok(r) => r,
                Err(e) => return self.fail(e),
            };
            if done {
                self.framing = Framing::Done;
                self.release();
                return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
            }
            if let Some(d) = data {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    if matches!(self.framing, Framing::Close) {
                        self.framing = Framing::Done;
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    return self.fail(incomplete());
                }
                Ok(_) => {}
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Whether the body has ended.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    /// Remaining length when known.
    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_requests_take_this_path() {
        let req = |method: Method, body: usize, header: Option<(&'static str, &'static str)>| {
            let mut b = Request::builder()
                .method(method)
                .uri("http://127.0.0.1:9/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", "Bearer k");
            if let Some((k, v)) = header {
                b = b.header(k, v);
            }
            b.body(Full::new(Bytes::from(vec![b'x'; body])))
                .expect("request")
        };
        assert!(eligible(&req(Method::POST, 100, None)));
        assert!(eligible(&req(
            Method::POST,
            MAX_BODY,
            Some(("x-other", "1"))
        )));
        assert!(!eligible(&req(Method::POST, MAX_BODY + 1, None)));
        assert!(!eligible(&req(Method::CONNECT, 0, None)));
        for h in [
            ("content-length", "100"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
        ] {
            assert!(!eligible(&req(Method::POST, 100, Some(h))), "{h:?}");
        }
    }

    fn head(wire: &str, is_head: bool) -> io::Result<Option<Head>> {
        parse_head(
            &mut BytesMut::from(wire.as_bytes()),
            &mut KnownNames::default(),
            is_head,
        )
    }

    #[test]
    fn headers_the_gateway_never_reads_are_kept_as_the_bytes_they_came_in() {
        let wire = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id:  req_1\r\nopenai-organization: org\r\nx-ratelimit-remaining-requests: 9\r\nX-RateLimit-Reset-Tokens: 0s\r\nanthropic-ratelimit-tokens-limit: 5\r\nx-ratelimit-: not a count\r\nContent-Length: 2\r\n\r\n{}";
        let (resp, _, _) = head(wire, false).expect("valid").expect("whole");
        let (mut parts, ()) = resp.into_parts();
        let names = |h: &HeaderMap| h.keys().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(&parts.headers),
            [
                "content-type",
                "openai-organization",
                "x-ratelimit-",
                "content-length"
            ],
            "read or kept by the gateway: in the map"
        );
        let raw = parts.extensions.get::<RawHeaders>().expect("raw headers");
        assert_eq!(
            &raw.0[..],
            b"X-Request-Id:  req_1\r\nx-ratelimit-remaining-requests: 9\r\nX-RateLimit-Reset-Tokens: 0s\r\nanthropic-ratelimit-tokens-limit: 5\r\n"
        );
        // Put in the map for those who need it whole: lowercased, in order, values as they came.
        RawHeaders::into_map(&mut parts);
        assert!(parts.extensions.get::<RawHeaders>().is_none());
        let pairs: Vec<_> = parts
            .headers
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().expect("ASCII")))
            .collect();
        assert_eq!(
            pairs,
            [
                "content-type=application/json",
                "openai-organization=org",
                "x-ratelimit-=not a count",
                "content-length=2",
                "x-request-id=req_1",
                "x-ratelimit-remaining-requests=9",
                "x-ratelimit-reset-tokens=0s",
                "anthropic-ratelimit-tokens-limit=5",
            ]
        );
        // A `Connection` naming headers: all in the map, for the hop-by-hop ones to be removed.
        let (resp, _, _) = head(
            "HTTP/1.1 200 OK\r\nx-request-id: a\r\nConnection: keep-alive, x-request-id\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("whole");
        assert!(resp.extensions().get::<RawHeaders>().is_none());
        assert_eq!(resp.headers()["x-request-id"], "a");
        let (resp, _, _) = head(
            "HTTP/1.1 200 OK\r\nx-request-id: a\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("whole");
        assert!(resp.extensions().get::<RawHeaders>().is_some());
        // None such: no extension at all.
        let (resp, _, _) = head("HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", false)
            .expect("valid")
            .expect("whole");
        assert!(resp.extensions().get::<RawHeaders>().is_none());
    }

    #[test]
    fn header_names_of_earlier_responses_are_reused() {
        let mut names = KnownNames::default();
        let mut parse = |wire: &str| {
            let (r, _, _) = parse_head(&mut BytesMut::from(wire.as_bytes()), &mut names, false)
                .expect("valid")
                .expect("complete");
            r.headers()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                .collect::<Vec<_>>()
        };
        let first = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nopenai-project: a\r\nOpenAI-Version: 9\r\n\r\n",
        );
        assert_eq!(
            first,
            ["content-length=0", "openai-project=a", "openai-version=9"]
        );
        // Another order, another case, one new name: the same names, lowercased.
        let second = parse(
            "HTTP/1.1 200 OK\r\nopenai-version: 8\r\nOpenAI-Project: b\r\nx-new: 1\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(
            second,
            [
                "openai-version=8",
                "openai-project=b",
                "x-new=1",
                "content-length=0"
            ]
        );
        // Each spelling kept once: content-length, openai-project, OpenAI-Version, openai-version,
        // OpenAI-Project, x-new.
        assert_eq!(names.len(), 6, "each spelling kept once");
        // Invalid names are still refused.
        assert!(
            parse_head(
                &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\nbad\x01name: 1\r\n\r\n"[..]),
                &mut names,
                false
            )
            .is_err()
        );
        // The list is bounded.
        for i in 0..2 * crate::headers::MAX_KNOWN_NAMES {
            names.get(i, format!("x-h{i}").as_bytes()).expect("valid");
        }
        assert_eq!(names.len(), crate::headers::MAX_KNOWN_NAMES);
    }

    #[test]
    fn a_repeated_length_goes_on_as_one_and_a_head_over_the_limit_is_refused() {
        for wire in [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n{}",
        ] {
            let (r, f, _) = head(wire, false).expect("valid").expect("whole");
            assert!(matches!(f, Framing::Length(2)));
            let lengths: Vec<_> = r.headers().get_all("content-length").iter().collect();
            assert_eq!(lengths, ["2"], "{wire}");
        }
        // Whole at once, or not: refused when over the limit.
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(MAX_HEAD)
        );
        assert!(head(&big, false).is_err());
        let fits = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(MAX_HEAD - 100)
        );
        assert!(head(&fits, false).expect("valid").is_some());
    }

    #[test]
    fn interim_answers_while_the_request_goes_out_do_not_end_it() {
        let begun = |wire: &str| {
            let mut buf = BytesMut::from(wire.as_bytes());
            (
                final_answer_begun(&mut buf),
                String::from_utf8(buf.to_vec()).expect("text"),
            )
        };
        assert_eq!(
            begun("HTTP/1.1 100 Continue\r\n\r\n"),
            (false, String::new())
        );
        assert_eq!(
            begun(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 2"
            ),
            (false, "HTTP/1.1 2".into()),
            "interim answers taken off, a head not yet whole waited for"
        );
        let last = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            begun(&format!("HTTP/1.1 100 Continue\r\n\r\n{last}")),
            (true, last.into())
        );
        for wire in [
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert_eq!(begun(wire), (true, wire.into()), "read_head tells of it");
        }
        let partial_too_large = format!("HTTP/1.1 200 OK\r\nx-big: {}", "a".repeat(MAX_HEAD));
        assert!(begun(&partial_too_large).0);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = |w: &str, h: bool| head(w, h).expect("valid").expect("complete");
        let (r, f, ka) = ok(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\n",
            false,
        );
        assert!(matches!(f, Framing::Length(5)) && ka == Some(IDLE_TIMEOUT));
        assert_eq!(r.headers()["x-a"], "b");
        let (_, f, _) = ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true);
        assert!(matches!(f, Framing::Done));
        let (r, f, ka) = ok(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            false,
        );
        assert!(matches!(f, Framing::Chunked(_)) && ka.is_some());
        assert!(!r.headers().contains_key("content-length"), "not forwarded");
        // A coding the gateway would not undo is refused, never passed on as a plain body.
        for te in ["gzip, chunked", "gzip", "chunked\r\ntransfer-encoding: br"] {
            let wire = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert!(head(&wire, false).is_err(), "{te}");
        }
        let (_, f, ka) = ok("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(f, Framing::Close) && ka.is_none());
        let (_, f, _) = ok(
            "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
            false,
        );
        assert!(matches!(f, Framing::Done));
        let (_, _, ka) = ok(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(ka.is_none());
        let (r, _, ka) = ok("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(ka.is_none() && r.version() == Version::HTTP_10);
        let (r, f, _) = ok(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(r.status(), 201);
        assert!(matches!(f, Framing::Done));
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-le", false)
                .expect("valid")
                .is_none()
        );
        assert!(
            head(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).is_err());
        assert!(head("garbage\r\n\r\n", false).is_err());
        assert!(
            head(
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .is_err()
        );
        // No request of this path asks to switch protocols.
        assert!(
            head(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                false
            )
            .is_err()
        );
    }

    #[test]
    fn a_keep_alive_timeout_shortens_the_idle_time_by_a_margin() {
        let idle = |extra: &str| {
            let wire = format!("HTTP/1.1 200 OK\r\n{extra}content-length: 0\r\n\r\n");
            head(&wire, false).expect("valid").expect("complete").2
        };
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(idle(""), Some(IDLE_TIMEOUT));
        assert_eq!(idle("Keep-Alive: timeout=5, max=1000\r\n"), secs(4));
        assert_eq!(idle("keep-alive: max=10,timeout = \"20\"\r\n"), secs(19));
        assert_eq!(idle("keep-alive: timeout=1\r\n"), secs(0));
        assert_eq!(idle("keep-alive: timeout=0\r\n"), secs(0));
        // Never longer than the pool's own limit; nonsense is no hint.
        assert_eq!(idle("keep-alive: timeout=3600\r\n"), Some(IDLE_TIMEOUT));
        for junk in [
            "timeout=-1",
            "timeout=",
            "timeout",
            "timeouts=2",
            "max=3",
            "",
            "timeout=5s",
        ] {
            assert_eq!(
                idle(&format!("keep-alive: {junk}\r\n")),
                Some(IDLE_TIMEOUT),
                "{junk}"
            );
        }
        // Of two, the shorter; and none where the connection is not kept anyway.
        assert_eq!(
            idle("keep-alive: timeout=10\r\nkeep-alive: timeout=3\r\n"),
            secs(2)
        );
        assert_eq!(idle("connection: close\r\nkeep-alive: timeout=5\r\n"), None);
    }

    #[test]
    fn empty_bodies_are_announced_where_the_method_has_one() {
        let head = |method: Method, len: usize| {
            let (parts, ()) = Request::builder()
                .method(method)
                .uri("http://h/x")
                .body(())
                .expect("request")
                .into_parts();
            String::from_utf8(encode_head(&parts, HeaderValue::from_static("h"), len))
                .expect("ascii")
        };
        for m in [Method::POST, Method::PUT, Method::PATCH] {
            assert!(head(m.clone(), 0).contains("content-length: 0\r\n"), "{m}");
            assert!(head(m, 12).contains("content-length: 12\r\n"));
        }
        for m in [Method::GET, Method::DELETE, Method::HEAD] {
            assert!(!head(m.clone(), 0).contains("content-length"), "{m}");
        }
    }

    #[test]
    fn host_header_leaves_out_the_default_port_of_the_scheme() {
        let host = |u: &str| host_header(&u.parse().expect("uri"));
        assert_eq!(host("https://api.openai.com/v1"), "api.openai.com");
        assert_eq!(host("https://api.openai.com:443/v1"), "api.openai.com");
        assert_eq!(host("https://127.0.0.1:8443/v1"), "127.0.0.1:8443");
        assert_eq!(host("http://127.0.0.1:443/v1"), "127.0.0.1:443");
        assert_eq!(host("http://model:80/v1"), "model");
        assert_eq!(host("http://[::1]:8080/v1"), "[::1]:8080");
    }

    #[test]
    fn origins_differ_by_scheme_and_match_authority_in_any_case() {
        let origin = |u: &str| Origin::of(&u.parse().expect("uri")).expect("origin");
        let tls = origin("https://API.example.com/v1");
        assert!(tls.is(&origin("https://api.example.com/other")));
        assert!(!tls.is(&origin("http://api.example.com/v1")));
        assert!(!tls.is(&origin("https://api.example.com:8443/v1")));
        assert!(Origin::of(&"ftp://x/".parse().expect("uri")).is_none());
        assert!(Origin::of(&"/relative".parse().expect("uri")).is_none());
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_ends_times_out() {
        // Accepts and keeps the connection, says nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let held = tokio::spawn(async move { listener.accept().await });
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        let mut pool = Pool::new(connector, Arc::new(tls));
        pool.handshake_timeout = std::time::Duration::from_millis(100);
        let pool = Arc::new(pool);
        let req = Request::post(format!("https://127.0.0.1:{port}/v1/chat/completions"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let started = Instant::now();
        let err = pool.request(req).await.err().expect("no answer");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(err.to_string(), "client error (Connect)");
        let source = std::error::Error::source(&err).expect("source").to_string();
        assert_eq!(source, "TLS handshake timed out");
        held.abort();
    }

    /// What a test upstream does with the next request on a connection.
    #[derive(Clone, Copy)]
    enum Step {
        /// Reads the request whole and answers `200` with these extra header lines, keeping the
        /// connection open; the body says which connection answered and how many body bytes
        /// it read: `"{connection} {length}"`.
        Answer(&'static str),
        /// Reads the request whole, then closes the connection (a FIN; over TLS after a
        /// close_notify): an upstream closing an idle connection as the request came.
        Close,
        /// Reads the request whole, then resets the connection (RST).
        Reset,
        /// Reads the request head only, then closes with the body unread (an RST, while a
        /// long body is still being written).
        CloseUnread,
        /// Reads the request whole, sends the start of a response head, then closes.
        Partial,
        /// Reads the request whole, works on it for longer than [`RESEND_WITHIN`], then closes
        /// without an answer (a crash mid-request).
        CloseLate,
    }

    /// Reads one request; its body length, or `None` when the connection ended first.
    async fn read_request(
        s: &mut (impl tokio::io::AsyncRead + Unpin),
        body: bool,
    ) -> Option<usize> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.parse().expect("length"));
        let mut read = buf.len() - end;
        while body && read < length {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => read += n,
            }
        }
        Some(length)
    }

    /// Runs `steps` on connection number `conn`; closes it at their end.
    async fn serve<S>(mut s: S, conn: usize, steps: &[Step], tcp: fn(&S) -> &TcpStream)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt as _;
        for step in steps {
            let Some(length) = read_request(&mut s, !matches!(step, Step::CloseUnread)).await
            else {
                return;
            };
            match step {
                Step::Answer(extra) => {
                    let body = format!("{conn} {length}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\n{extra}content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Step::Close => {
                    let _ = s.shutdown().await;
                    return;
                }
                Step::Reset => {
                    tcp(&s).set_zero_linger().expect("linger");
                    return;
                }
                Step::CloseUnread => return,
                Step::CloseLate => {
                    tokio::time::sleep(RESEND_WITHIN + Duration::from_millis(300)).await;
                    let _ = s.shutdown().await;
                    return;
                }
                Step::Partial => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
                    return;
                }
            }
        }
    }

    /// An upstream on 127.0.0.1 running `plans[i]` on its `i`th connection (over TLS with
    /// `tls`); its URL and a count of the connections it accepted.
    async fn upstream(
        plans: Vec<Vec<Step>>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            for (conn, steps) in plans.into_iter().enumerate() {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(cfg) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                            if let Ok(s) = acceptor.accept(tcp).await {
                                serve(s, conn, &steps, |s| s.get_ref().0).await;
                            }
                        }
                        None => serve(tcp, conn, &steps, |s| s).await,
                    }
                });
            }
            // Connections beyond the plans are counted and closed at once.
            while let Ok((_, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        (format!("{scheme}://127.0.0.1:{port}"), accepted)
    }

    /// A server config for 127.0.0.1 and a client pool trusting it.
    fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<Pool>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        (Arc::new(server), pool_with(client))
    }

    fn pool_with(tls: rustls::ClientConfig) -> Arc<Pool> {
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        Arc::new(Pool::new(connector, Arc::new(tls)))
    }

    fn plain_pool() -> Arc<Pool> {
        pool_with(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
    }

    /// POSTs `len` bytes to `url`; the status and body of the answer, or the error with its
    /// source.
    async fn post(pool: &Arc<Pool>, url: &str, len: usize) -> Result<(u16, String), String> {
        send(pool, url, len, false).await
    }

    /// [`post`], with an `Idempotency-Key` when `replayable`.
    async fn send(
        pool: &Arc<Pool>,
        url: &str,
        len: usize,
        replayable: bool,
    ) -> Result<(u16, String), String> {
        let mut req = Request::post(format!("{url}/v1/chat/completions"));
        if replayable {
            req = req.header(IDEMPOTENCY_KEY, "k-1");
        }
        let req = req
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .expect("request");
        // Bounded: a body sent short would leave the test upstream waiting for the rest.
        let exchange = async {
            let resp = pool.request(req).await.map_err(|e| {
                let source = std::error::Error::source(&e).map(ToString::to_string);
                format!("{e}: {}", source.unwrap_or_default())
            })?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut out = Vec::new();
            while let Some(frame) = poll_fn(|cx| body.poll_frame(cx)).await {
                let frame = frame.map_err(|e| e.to_string())?;
                out.extend_from_slice(&frame.into_data().unwrap_or_default());
            }
            Ok((status, String::from_utf8_lossy(&out).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap_or_else(|_| Err("no answer within 20 s".into()))
    }

    #[tokio::test]
    async fn a_post_lost_after_it_went_out_whole_is_an_error_not_sent_twice() {
        // The upstream may have read it and failed (and billed it): the client decides.
        for (lost, name) in [(Step::Close, "FIN"), (Step::Reset, "RST")] {
            let (url, accepted) = upstream(
                vec![vec![Step::Answer(""), lost], vec![Step::Answer("")]],
                None,
            )
            .await;
            let pool = plain_pool();
            assert_eq!(post(&pool, &url, 7).await, Ok((200, "0 7".into())));
            let err = post(&pool, &url, 9).await.expect_err(name);
            assert!(
                err.contains("closed before message completed") || err.contains("reset"),
                "{name}: {err}"
            );
            assert_eq!(
                accepted.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_reused_connection_lost_as_the_request_went_out_is_retried_on_a_new_one() {
        for (lost, name) in [(Step::Close, "FIN"), (Step::Reset, "RST")] {
            let (url, accepted) = upstream(
                vec![vec![Step::Answer(""), lost], vec![Step::Answer("")]],
                None,
            )
            .await;
            let pool = plain_pool();
            assert_eq!(
                post(&pool, &url, 7).await,
                Ok((200, "0 7".into())),
                "{name}"
            );
            assert_eq!(pool.idle(), 1, "{name}");
            // Replayable: sent on the pooled connection, lost, and sent again whole on a new
            // one.
            assert_eq!(
                send(&pool, &url, 9, true).await,
                Ok((200, "1 9".into())),
                "{name}"
            );
            assert_eq!(
                accepted.load(std::sync::atomic::Ordering::SeqCst),
                2,
                "{name}"
            );
            assert_eq!(pool.idle(), 1, "{name}");
        }
    }

    #[tokio::test]
    async fn a_long_body_cut_off_on_a_reused_connection_is_sent_again_whole() {
        // The upstream closes with the body unread: the write fails part-way, or the close is
        // seen while watching for an early answer.
        let (url, accepted) = upstream(
            vec![
                vec![Step::Answer(""), Step::CloseUnread],
                vec![Step::Answer("")],
            ],
            None,
        )
        .await;
        let pool = plain_pool();
        assert_eq!(post(&pool, &url, 2).await, Ok((200, "0 2".into())));
        let long = 16 << 20;
        assert_eq!(
            post(&pool, &url, long).await,
            Ok((200, format!("1 {long}")))
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn over_tls_a_lost_reused_connection_is_retried_the_same_way() {
        for (lost, name) in [(Step::Close, "close_notify"), (Step::Reset, "RST")] {
            let (server, pool) = tls_pair();
            let (url, accepted) = upstream(
                vec![vec![Step::Answer(""), lost], vec![Step::Answer("")]],
                Some(server),
            )
            .await;
            assert_eq!(
                post(&pool, &url, 7).await,
                Ok((200, "0 7".into())),
                "{name}"
            );
            assert_eq!(
                send(&pool, &url, 9, true).await,
                Ok((200, "1 9".into())),
                "{name}"
            );
            assert_eq!(
                accepted.load(std::sync::atomic::Ordering::SeqCst),
                2,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_fresh_connection_lost_before_any_answer_is_an_error_not_a_retry() {
        for (lost, name) in [(Step::Close, "FIN"), (Step::Reset, "RST")] {
            let (url, accepted) = upstream(vec![vec![lost], vec![Step::Answer("")]], None).await;
            let pool = plain_pool();
            let err = post(&pool, &url, 7).await.expect_err(name);
            assert!(
                err.starts_with("client error (SendRequest)"),
                "{name}: {err}"
            );
            assert_eq!(
                accepted.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_reused_connection_lost_after_an_answer_began_or_late_is_an_error_not_a_resend() {
        // Cut in the answer's head; or lost with no answer, but long after the request went
        // out (the upstream may have done it).
        for lost in [Step::Partial, Step::CloseLate] {
            let (url, accepted) = upstream(
                vec![vec![Step::Answer(""), lost], vec![Step::Answer("")]],
                None,
            )
            .await;
            let pool = plain_pool();
            assert_eq!(post(&pool, &url, 7).await, Ok((200, "0 7".into())));
            let err = send(&pool, &url, 7, true).await.expect_err("lost");
            assert!(err.contains("closed before message completed"), "{err}");
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn a_lost_request_is_sent_again_once_only() {
        // The new connection is lost too: that is the answer, no third connection.
        let (url, accepted) = upstream(
            vec![
                vec![Step::Answer(""), Step::Close],
                vec![Step::Close],
                vec![Step::Answer("")],
            ],
            None,
        )
        .await;
        let pool = plain_pool();
        assert_eq!(post(&pool, &url, 7).await, Ok((200, "0 7".into())));
        let err = send(&pool, &url, 7, true).await.expect_err("lost twice");
        assert!(err.contains("closed before message completed"), "{err}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_keep_alive_timeout_too_short_to_use_is_not_pooled() {
        // `timeout=1`, less the safety margin, leaves no time to reuse the connection in.
        let (url, accepted) = upstream(
            vec![
                vec![Step::Answer("keep-alive: timeout=1\r\n"), Step::Answer("")],
                vec![Step::Answer("")],
            ],
            None,
        )
        .await;
        let pool = plain_pool();
        assert_eq!(post(&pool, &url, 1).await, Ok((200, "0 1".into())));
        assert_eq!(pool.idle(), 0);
        assert_eq!(post(&pool, &url, 1).await, Ok((200, "1 1".into())));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_is_pooled_no_longer_than_its_keep_alive_timeout_allows() {
        let (url, _) = upstream(
            vec![vec![
                Step::Answer("keep-alive: timeout=5, max=100\r\n"),
                Step::Answer(""),
            ]],
            None,
        )
        .await;
        let pool = plain_pool();
        let expires = || {
            let hosts = pool.hosts.lock().expect("lock");
            hosts[0].1.idle[0].expires
        };
        let before = Instant::now();
        assert_eq!(post(&pool, &url, 1).await, Ok((200, "0 1".into())));
        let expires_in = expires() - before;
        assert!(
            expires_in <= Duration::from_secs(4) + before.elapsed(),
            "{expires_in:?}"
        );
        assert!(expires_in >= Duration::from_secs(4), "{expires_in:?}");
        // A response without the header: the pool's own limit again.
        assert_eq!(post(&pool, &url, 1).await, Ok((200, "0 1".into())));
        assert!(expires() - Instant::now() > IDLE_TIMEOUT - Duration::from_secs(1));
    }
}
