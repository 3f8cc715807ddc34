//! The gateway's own HTTP/1.1 server, for the requests nearly every client sends: a method with
//! a body of a declared length, or chunked (read strictly, [`crate::chunked`]), or none; no
//! upgrade, no `Expect`. It reads the head and the whole body, hands them to the gateway, and
//! writes the answer's head straight from its header map, its body with a length or chunked.
//! Anything else — HTTP/1.0, `HEAD`, a body over 64 KiB, a WebSocket upgrade, a head hyper
//! would refuse — hands the connection, bytes already read included, to hyper for the rest of
//! its life: the rare requests keep hyper's well-trodden handling, the common one skips its
//! dispatcher.
//!
//! As hyper's server it closes a connection silent for the client timeout before or within a
//! head, drops a request whose client closes the connection while it waits for its answer, and
//! finishes the request in flight when the gateway stops, answering it with `connection: close`.

use std::future::Future;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{MAX_HEADER_BYTES, WriteStall};
use crate::body::{BodyBroken, ProxyBody, RequestBody};
use crate::chunked::{self, Chunked};
use crate::headers::{KnownNames, RawHeaders, has_token};
use crate::proxy::Gateway;

/// Most request headers read here (hyper's limit too); a request with more goes to hyper.
const MAX_HEADERS: usize = 100;

/// Largest request body read here with its head; a larger one goes to hyper, whose body is read
/// as it arrives against the gateway's limits. A connection holds at most this and a head.
const MAX_BODY: usize = 64 * 1024;

/// Body frames up to this size are copied into the buffer of what goes out next (the answer's
/// head, earlier frames); larger ones are written from where they are, with it, in one write.
const COPY_BELOW: usize = 16 * 1024;

/// How a connection's time with this server ended.
pub(super) enum Ended {
    /// Closed: by the client, for silence, at the gateway's stop, or after an error.
    Closed,
    /// Left to hyper from a request on; `BytesMut` holds the bytes read of it and after it.
    HandOff(BytesMut),
}

/// What the gateway's shutdown tells a connection of this server, directly (see
/// `server::Stops`) rather than through a channel its task would poll at every wake.
#[derive(Default)]
pub(super) struct Stop {
    /// Stopping: no new request; the one in flight is answered with `connection: close`.
    stopping: AtomicBool,
    /// The grace is over: the connection ends now, its request dropped.
    cut: AtomicBool,
    /// Set while the server waits for a request with nothing of one read.
    idle: AtomicBool,
    /// The connection's task, woken to see the above.
    task: AtomicWaker,
}

impl Stop {
    /// The gateway is stopping.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.task.wake();
    }

    /// The grace is over.
    pub(super) fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        self.task.wake();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Runs `served` (the connection's [`serve`]) until it ends, or the stop ends it (`None`):
    /// at once when cut, when it waits idle once stopping. Dropping it drops the request in
    /// flight, writing its log line and span, here.
    ///
    /// `served` is pinned by the caller: taken by value, it would be held twice in the
    /// connection's task (the argument and its pinned copy), ~16 KiB more per connection.
    pub(super) async fn watch(
        &self,
        mut served: std::pin::Pin<&mut impl Future<Output = Ended>>,
    ) -> Option<Ended> {
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            if self.cut.load(Ordering::Relaxed)
                || (self.stopping() && self.idle.load(Ordering::Relaxed))
            {
                return Poll::Ready(None);
            }
            served.as_mut().poll(cx).map(Some)
        })
        .await
    }
}

/// One request head as read, its header values sharing the head's bytes.
struct Head {
    request: Request<RequestBody>,
    /// Declared body length.
    body: usize,
    /// A chunked body: the head's bytes, to hand the request to hyper if it outgrows
    /// [`MAX_BODY`].
    chunked: Option<Bytes>,
    close: bool,
}

// Once per request, moved into place: a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Head(Head),
    Partial,
    /// Not a request this server takes.
    Other,
}

/// Serves `io`'s requests until the connection ends or one is for hyper.
pub(super) async fn serve(
    io: &mut WriteStall<TcpStream>,
    gateway: &Arc<Gateway>,
    silence: Duration,
    stop: &Stop,
) -> Ended {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut names = KnownNames::default();
    let timer = tokio::time::sleep(silence);
    tokio::pin!(timer);
    // The client shut its side (with requests still to answer in `buf`): nothing more comes.
    let mut eof = false;
    loop {
        // At the stop, no new request (as hyper: one sent along is not answered).
        if stop.stopping() {
            return Ended::Closed;
        }
        // Bytes of this request came before the last answer was out: the client pipelines, and
        // a close it sends after them is taken as a half-close (its side shut, all it sent to be
        // answered), not as the client leaving. Else that close drops the request, as hyper's.
        let pipelined = !buf.is_empty();
        // The next head, within `silence` from now.
        timer.as_mut().reset(Instant::now() + silence);
        let head = loop {
            if !buf.is_empty() {
                match parse(&mut buf, &mut names) {
                    Parsed::Head(head) => break head,
                    Parsed::Partial if buf.len() < MAX_HEADER_BYTES && !eof => {}
                    Parsed::Partial if eof => return Ended::Closed,
                    // hyper answers it (400, 431, ...).
                    Parsed::Partial | Parsed::Other => return Ended::HandOff(buf),
                }
            } else if eof {
                return Ended::Closed;
            } else {
                stop.idle.store(true, Ordering::Relaxed);
                if stop.stopping() {
                    return Ended::Closed;
                }
            }
            let read = tokio::select! {
                read = io.read_buf(&mut buf) => read,
                () = timer.as_mut() => return Ended::Closed,
            };
            stop.idle.store(false, Ordering::Relaxed);
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
        };
        let Head {
            mut request,
            mut body,
            chunked,
            mut close,
        } = head;
        // Its body, whole, each part within `silence` of the one before. One that stops
        // coming, is cut off or is not framed right is the gateway's to tell of (408, 400;
        // logged as refused).
        let mut broken = None;
        // A chunked body: the decoder's state, the bytes of `buf` it checked and the data they
        // hold. Its data is taken once it is whole: until then `buf` holds it as it came, for
        // hyper should it outgrow this server (or the gateway's body limit: hyper's body is
        // read as it comes, refused 413 as soon as it is over), and only there.
        let (mut framing, mut checked, mut data) = (Chunked::START, 0, 0usize);
        let limit = chunked.as_ref().map_or(0, |_| {
            gateway.snapshot.load().as_ref().map_or(MAX_BODY, |s| {
                usize::try_from(s.max_body).unwrap_or(MAX_BODY)
            })
        });
        let mut decoded = None;
        loop {
            if let Some(raw) = &chunked {
                match chunked::decode(&mut framing, &buf[checked..], &mut data) {
                    Ok((used, true)) => {
                        decoded = Some(dechunk(buf.split_to(checked + used).freeze()));
                        break;
                    }
                    Ok((used, false)) if buf.len() <= MAX_BODY && data <= limit => {
                        checked += used;
                    }
                    // hyper reads it as it comes, within the gateway's limits.
                    Ok(_) => return Ended::HandOff(rejoin(raw, &buf)),
                    Err(why) => {
                        broken = Some(BodyBroken::Malformed(why));
                        break;
                    }
                }
            } else if buf.len() >= body {
                break;
            }
            if eof {
                broken = Some(BodyBroken::Closed);
                break;
            }
            timer.as_mut().reset(Instant::now() + silence);
            tokio::select! {
                read = io.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => broken = Some(BodyBroken::Closed),
                    Ok(_) => {}
                },
                () = timer.as_mut() => broken = Some(BodyBroken::Stalled),
            }
            if broken.is_some() {
                break;
            }
        }
        if let Some(data) = decoded {
            body = data.len();
            if body > 0 {
                *request.body_mut() = RequestBody::Whole(Some(data));
            }
        } else if let Some(broken) = broken {
            *request.body_mut() = RequestBody::Broken(Some(broken));
            // What came of it is not the start of a next request.
            buf.clear();
            eof = true;
            close = true;
        } else if body > 0 {
            *request.body_mut() = RequestBody::Whole(Some(buf.split_to(body).freeze()));
        }
        // A client that closes the connection meanwhile drops its request (as hyper does),
        // unless it sent further requests before, or pipelined this one (it shut its side only,
        // above); bytes it sends on (a next request) wait in `buf`. The answer's future ends
        // with this block, so the response's writing below takes its place in the connection's
        // task, not more room.
        let response = {
            let mut answer = std::pin::pin!(gateway.clone().handle(request));
            loop {
                tokio::select! {
                    biased;
                    response = answer.as_mut() => break response,
                    read = io.read_buf(&mut buf), if !eof && buf.len() < MAX_HEADER_BYTES + MAX_BODY => match read {
                        Ok(0) if pipelined || !buf.is_empty() => eof = true,
                        Ok(0) | Err(_) => return Ended::Closed,
                        Ok(_) => {}
                    },
                }
            }
        };
        let Ok(response) = response;
        // The gateway's own `connection: close` (a 413 whose body was not all read) ends the
        // connection as it says.
        let close =
            close || stop.stopping() || has_token(response.headers(), header::CONNECTION, "close");
        if write_response(io, &mut buf, &mut eof, pipelined, &mut out, response, close)
            .await
            .is_err()
            || close
        {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// Parses a request head at the start of `buf` and takes it off (not when it is
/// [`Parsed::Other`]), the header values sharing its bytes.
fn parse(buf: &mut BytesMut, names: &mut KnownNames) -> Parsed {
    // Uninitialized: the parser writes the headers it finds, nothing has to clear 100 slots.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        // hyper's 431 for a head over the limit, however it came.
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEADER_BYTES => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(_)) | Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Parsed::Other;
    };
    let method = match method {
        "POST" => Method::POST,
        "GET" => Method::GET,
        // No body is written for HEAD: hyper's.
        "HEAD" | "CONNECT" => return Parsed::Other,
        other => match Method::from_bytes(other.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Parsed::Other,
        },
    };
    if !path.starts_with('/') {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let path_at = path.as_ptr() as usize - base;
    let path_end = path_at + path.len();
    let mut fields = Vec::with_capacity(parsed.headers.len());
    let mut body = None;
    let mut chunked = false;
    let mut close = false;
    for (i, h) in parsed.headers.iter().enumerate() {
        let Ok(name) = names.get(i, h.name.as_bytes()) else {
            return Parsed::Other;
        };
        if name == header::CONTENT_LENGTH {
            // One length, digits only; anything else is hyper's to judge.
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
            else {
                return Parsed::Other;
            };
            if body.is_some() || n > MAX_BODY {
                return Parsed::Other;
            }
            body = Some(n);
        } else if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Other;
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            // One `chunked`, alone; a length beside it or any other coding is hyper's to judge.
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Parsed::Other;
            }
            chunked = true;
        } else if name == header::UPGRADE || name == header::EXPECT {
            return Parsed::Other;
        }
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start, start + h.value.len()));
    }
    if chunked && body.is_some() {
        return Parsed::Other;
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at..path_end)) else {
        *buf = rejoin(&head, buf);
        return Parsed::Other;
    };
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, a, b) in fields {
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(a..b)) else {
            *buf = rejoin(&head, buf);
            return Parsed::Other;
        };
        headers.append(name, value);
    }
    let mut request = Request::new(RequestBody::Whole(None));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Head(Head {
        request,
        body: body.unwrap_or(0),
        chunked: chunked.then(|| head.clone()),
        close,
    })
}

/// The data of `wire`, a whole chunked body its framing checked: one chunk's is sliced out
/// with no copy.
fn dechunk(wire: Bytes) -> Bytes {
    if let Some((size, at)) = chunked::single(&wire) {
        return wire.slice(at..at + size);
    }
    let mut data = BytesMut::with_capacity(wire.len());
    let mut state = Chunked::START;
    let _ = chunked::decode(&mut state, &wire, &mut data);
    data.freeze()
}

/// `head` (split off the front of `buf`) and `buf` again as one buffer, for hyper.
#[cold]
fn rejoin(head: &Bytes, buf: &BytesMut) -> BytesMut {
    let mut all = BytesMut::with_capacity(head.len() + buf.len());
    all.extend_from_slice(head);
    all.extend_from_slice(buf);
    all
}

/// How the answer's body is delimited on the wire.
enum Framing {
    /// No body (204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes `response`, its head with `connection: close` when `close`; an error ends the
/// connection (the client gone, or a body that broke off or does not match its length).
/// `buf`, `eof` and `pipelined` as in [`next_frame`].
async fn write_response(
    io: &mut WriteStall<TcpStream>,
    buf: &mut BytesMut,
    eof: &mut bool,
    pipelined: bool,
    out: &mut Vec<u8>,
    response: Response<ProxyBody>,
    close: bool,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let raw = parts.extensions.get::<RawHeaders>();
    let framing = head(out, parts.status, &parts.headers, raw, &body, close);
    let mut body = std::pin::pin!(body);
    let mut left = match framing {
        Framing::None => {
            io.write_all(out).await?;
            return Ok(());
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let chunked = matches!(framing, Framing::Chunked);
    loop {
        // Frames at hand go out together; a wait for the next sends what is there first.
        let frame = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    out.clear();
                }
                next_frame(io, buf, eof, pipelined, body.as_mut()).await?
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(std::io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers are not sent (nor asked for).
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            push_hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        } else {
            left = left
                .checked_sub(data.len() as u64)
                .ok_or_else(|| std::io::Error::other("body longer than its content-length"))?;
        }
        if data.len() < COPY_BELOW {
            out.extend_from_slice(&data);
        } else {
            // What is gathered and the frame in one write.
            write_both(io, out, &data).await?;
            out.clear();
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if left != 0 {
        if !out.is_empty() {
            io.write_all(out).await?;
            out.clear();
        }
        return Err(std::io::Error::other(
            "body shorter than its content-length",
        ));
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Appends `n` in hexadecimal (a chunk size).
fn push_hex(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes `first` and then `second` whole, with vectored writes.
async fn write_both(
    io: &mut WriteStall<TcpStream>,
    first: &[u8],
    second: &[u8],
) -> std::io::Result<()> {
    let (mut a, mut b) = (first, second);
    while !a.is_empty() || !b.is_empty() {
        let n = io
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The body's next frame; an error when the client closes the connection meanwhile, unless it
/// sent further requests before, or this one with the one before (`pipelined`): it shut its
/// side only, `eof` is set, and they are answered. Bytes the client sends on (a next request)
/// wait in `buf`.
async fn next_frame(
    io: &mut WriteStall<TcpStream>,
    buf: &mut BytesMut,
    eof: &mut bool,
    pipelined: bool,
    mut body: std::pin::Pin<&mut ProxyBody>,
) -> std::io::Result<Option<Result<Frame<Bytes>, crate::upstream::BodyError>>> {
    loop {
        tokio::select! {
            biased;
            frame = body.frame() => return Ok(frame),
            read = io.read_buf(buf), if !*eof && buf.len() < MAX_HEADER_BYTES + MAX_BODY => match read {
                Ok(0) if pipelined || !buf.is_empty() => *eof = true,
                Ok(0) => return Err(std::io::ErrorKind::ConnectionAborted.into()),
                Err(e) => return Err(e),
                Ok(_) => {}
            },
        }
    }
}

/// Encodes the answer's head into `out` (emptied first), its `raw` headers as they came, and
/// says how its body goes.
fn head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&RawHeaders>,
    body: &ProxyBody,
    close: bool,
) -> Framing {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length = None;
    let mut date = false;
    let mut connection = false;
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING {
            // The body's framing is this server's.
            continue;
        }
        if name == header::CONTENT_LENGTH {
            // One line, the first that reads as a length (an upstream may repeat it, which its
            // client took as one length; Node's HTTP parser refuses an answer with two).
            if status == StatusCode::NO_CONTENT || status.is_informational() || length.is_some() {
                continue;
            }
            length = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            if length.is_none() {
                continue;
            }
        } else if name == header::DATE {
            date = true;
        } else if name == header::CONNECTION {
            connection = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(RawHeaders(raw)) = raw {
        out.extend_from_slice(raw);
    }
    if !date {
        out.extend_from_slice(b"date: ");
        now_as_http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close && !connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Appends the time now as an HTTP date, formatted once a second (per thread).
fn now_as_http_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, date)| {
        if *at != secs || date.is_empty() {
            *at = secs;
            *date = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(date.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(wire: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(wire.as_bytes());
        let parsed = parse(&mut buf, &mut KnownNames::default());
        (parsed, buf)
    }

    #[test]
    fn a_plain_request_is_taken_off_the_buffer_with_its_headers() {
        let wire = "POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nX-Many: 1\r\nx-many: 2\r\nConnection: keep-alive, Close\r\n\r\nbodyGET / HTTP/1.1\r\n";
        let (Parsed::Head(head), rest) = parsed(wire) else {
            panic!("not parsed")
        };
        assert_eq!(
            &rest[..],
            b"bodyGET / HTTP/1.1\r\n",
            "only the head is taken"
        );
        assert_eq!(head.body, 4);
        assert!(head.close);
        let req = head.request;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/v1/chat");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers()["host"], "a");
        let many: Vec<_> = req.headers().get_all("x-many").iter().collect();
        assert_eq!(many, ["1", "2"]);
    }

    #[test]
    fn a_head_not_yet_whole_waits_for_more() {
        let (p, rest) = parsed("POST /v1/chat HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(rest.len(), 33, "nothing taken");
    }

    #[test]
    fn requests_this_server_does_not_take_are_left_whole_for_hyper() {
        for wire in [
            "HEAD / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            // A head over the limit, come whole.
            &format!(
                "GET / HTTP/1.1\r\nx-big: {}\r\n\r\n",
                "a".repeat(MAX_HEADER_BYTES)
            ),
        ] {
            let (p, rest) = parsed(wire);
            assert!(matches!(p, Parsed::Other), "{wire:?} taken");
            assert_eq!(&rest[..], wire.as_bytes(), "{wire:?} not left whole");
        }
        // More headers than read here.
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parsed(&many).0, Parsed::Other));
    }

    #[test]
    fn a_value_http_refuses_leaves_the_request_whole_for_hyper() {
        // httparse takes obs-text in values; so does `HeaderValue`. A bare CR is neither's.
        let wire = "GET / HTTP/1.1\r\nx-a: \x01\r\n\r\nnext";
        let (p, rest) = parsed(wire);
        assert!(matches!(p, Parsed::Other));
        assert_eq!(&rest[..], wire.as_bytes());
    }

    fn answer(
        status: u16,
        headers: &[(&str, &str)],
        body: ProxyBody,
        close: bool,
    ) -> (String, Framing) {
        answer_with(status, headers, None, body, close)
    }

    fn answer_with(
        status: u16,
        headers: &[(&str, &str)],
        raw: Option<&RawHeaders>,
        body: ProxyBody,
        close: bool,
    ) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).expect("status");
        let framing = head(&mut out, status, &map, raw, &body, close);
        (String::from_utf8(out).expect("ASCII"), framing)
    }

    #[test]
    fn headers_kept_as_bytes_are_written_as_they_came() {
        let mut raw = Vec::new();
        RawHeaders::push(&mut raw, b"X-Request-Id: req_1");
        RawHeaders::push(&mut raw, b"x-ratelimit-remaining-requests:9");
        let raw = RawHeaders(raw.into());
        let (h, _) = answer_with(
            200,
            &[("content-type", "application/json"), ("date", "x")],
            Some(&raw),
            ProxyBody::full(Bytes::from_static(b"{}")),
            false,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: x\r\nX-Request-Id: req_1\r\nx-ratelimit-remaining-requests:9\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn two_buffers_are_written_whole_and_in_order_whatever_the_socket_takes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let first: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read");
            got
        });
        let mut io = WriteStall::new(
            client,
            Duration::from_secs(5),
            super::super::FirstBytes::default(),
        );
        write_both(&mut io, &first, &second).await.expect("written");
        write_both(&mut io, b"", b"end").await.expect("written");
        io.shutdown().await.expect("shutdown");
        drop(io);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), first.len() + second.len() + 3);
        assert!(got[..first.len()] == first[..]);
        assert!(got[first.len()..first.len() + second.len()] == second[..]);
        assert!(got.ends_with(b"end"));
    }

    #[test]
    fn chunk_sizes_are_written_in_hexadecimal() {
        for (n, hex) in [
            (0, "0"),
            (9, "9"),
            (10, "a"),
            (255, "ff"),
            (4096, "1000"),
            (usize::MAX, "ffffffffffffffff"),
        ] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, hex.as_bytes());
        }
    }

    #[test]
    fn the_head_says_how_the_body_is_delimited() {
        let full = || ProxyBody::full(Bytes::from_static(b"hello"));
        // A length of its own is kept; a known body size is announced.
        let (h, f) = answer(
            200,
            &[("content-length", "5"), ("date", "x")],
            full(),
            false,
        );
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: x\r\n\r\n");
        assert!(matches!(f, Framing::Length(5)));
        let (h, f) = answer(404, &[("date", "x")], full(), false);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\ndate: x\r\ncontent-length: 5\r\n\r\n"
        );
        assert!(matches!(f, Framing::Length(5)));
        // No date: one is added, as hyper does.
        let (h, _) = answer(200, &[], full(), true);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\ndate: "), "{h}");
        assert!(
            h.ends_with(" GMT\r\nconnection: close\r\ncontent-length: 5\r\n\r\n"),
            "{h}"
        );
        // 204: no body, no length; a transfer coding of the upstream's is not repeated.
        let (h, f) = answer(
            204,
            &[
                ("date", "x"),
                ("content-length", "0"),
                ("transfer-encoding", "chunked"),
            ],
            full(),
            false,
        );
        assert_eq!(h, "HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n");
        assert!(matches!(f, Framing::None));
        // An unknown status has no reason phrase.
        let (h, _) = answer(599, &[("date", "x")], full(), false);
        assert!(h.starts_with("HTTP/1.1 599 \r\n"), "{h}");
        // One length however often the map has it (clients refuse an answer with two), the
        // first that reads as one.
        for lengths in [&["5", "5"][..], &["5", "5, 5"], &["5, 5", "5"]] {
            let mut headers: Vec<_> = lengths.iter().map(|v| ("content-length", *v)).collect();
            headers.push(("date", "x"));
            let (h, f) = answer(200, &headers, full(), false);
            assert_eq!(h.matches("content-length").count(), 1, "{lengths:?}: {h}");
            assert!(h.contains("content-length: 5\r\n"), "{h}");
            assert!(matches!(f, Framing::Length(5)));
        }
    }
}
