//! Response body: either one buffer, or a server-sent-event stream whose events are
//! yielded one frame at a time (optionally spaced by a delay), with a drop guard that
//! counts streams the client abandoned before the end.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::Stats;

/// Body of every response the mock sends.
pub struct MockBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Sse(SseStream),
}

impl MockBody {
    /// A body made of one buffer.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let data = if bytes.is_empty() { None } else { Some(bytes) };
        Self {
            kind: Kind::Full(data),
        }
    }

    /// A stream body yielding `events` one frame each, sleeping `delay` before each.
    pub(crate) fn sse(events: Vec<Bytes>, delay: Option<Duration>, stats: Arc<Stats>) -> Self {
        stats.streams_started.fetch_add(1, Ordering::Relaxed);
        Self {
            kind: Kind::Sse(SseStream {
                events: events.into_iter(),
                delay,
                sleep: None,
                armed: false,
                stats,
            }),
        }
    }
}

struct SseStream {
    events: std::vec::IntoIter<Bytes>,
    delay: Option<Duration>,
    /// Reused timer for the per-chunk delay.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` is counting down for the next event.
    armed: bool,
    stats: Arc<Stats>,
}

impl SseStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.events.len() == 0 {
            return Poll::Ready(None);
        }
        if let Some(delay) = self.delay {
            if !self.armed {
                let deadline = Instant::now() + delay;
                match &mut self.sleep {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.armed = true;
            }
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
            }
            self.armed = false;
        }
        Poll::Ready(self.events.next())
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        let counter = if self.events.len() == 0 {
            &self.stats.streams_completed
        } else {
            &self.stats.streams_cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|b| Ok(Frame::data(b)))),
            Kind::Sse(stream) => stream.poll_next(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Sse(stream) => stream.events.len() == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Sse(_) => SizeHint::default(),
        }
    }
}

/// Appends the JSON of `value` to `buf`. Serializing our own response types into a
/// `Vec` cannot fail; should it ever, `null` keeps the output well-formed.
pub(crate) fn write_json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    let start = buf.len();
    if serde_json::to_writer(&mut *buf, value).is_err() {
        buf.truncate(start);
        buf.extend_from_slice(b"null");
    }
}

/// Builds all events of an SSE stream into one buffer, then hands out one
/// zero-copy slice per event.
pub(crate) struct SseBuilder {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl SseBuilder {
    pub fn with_capacity(events: usize) -> Self {
        Self {
            buf: Vec::with_capacity(events * 192),
            ends: Vec::with_capacity(events),
        }
    }

    /// `event: <name>\n` (when named), then `data: <json>\n\n`.
    pub fn event<T: Serialize>(&mut self, name: Option<&str>, data: &T) {
        if let Some(name) = name {
            self.buf.extend_from_slice(b"event: ");
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.push(b'\n');
        }
        self.buf.extend_from_slice(b"data: ");
        write_json(&mut self.buf, data);
        self.buf.extend_from_slice(b"\n\n");
        self.ends.push(self.buf.len());
    }

    /// An event given verbatim (e.g. `data: [DONE]\n\n`).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.ends.push(self.buf.len());
    }

    pub fn finish(self) -> Vec<Bytes> {
        let all = Bytes::from(self.buf);
        let mut start = 0;
        self.ends
            .into_iter()
            .map(|end| {
                let event = all.slice(start..end);
                start = end;
                event
            })
            .collect()
    }
}

/// A complete response with a JSON body.
pub(crate) fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Whether a request's `Accept-Encoding` takes gzip (`gzip` or `*`, not with `q=0`).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// A request body as the handlers read it: a gzip one (`Content-Encoding: gzip`, as servers
/// that take compressed uploads do) decompressed, at most `limit` bytes; `Err` names why not.
pub(crate) fn decoded_request(
    headers: &HeaderMap,
    body: Bytes,
    limit: usize,
) -> Result<Bytes, &'static str> {
    use std::io::Read;
    let Some(coding) = headers.get(CONTENT_ENCODING) else {
        return Ok(body);
    };
    if coding.as_bytes().eq_ignore_ascii_case(b"identity") {
        return Ok(body);
    }
    if !coding.as_bytes().eq_ignore_ascii_case(b"gzip") {
        return Err("unsupported Content-Encoding (only gzip)");
    }
    let mut out = Vec::new();
    let read = flate2::read::GzDecoder::new(&body[..])
        .take(limit as u64 + 1)
        .read_to_end(&mut out);
    match read {
        Err(_) => Err("the gzip request body could not be decompressed"),
        Ok(n) if n > limit => Err("the decompressed request body is too large"),
        Ok(_) => Ok(Bytes::from(out)),
    }
}

/// `resp` gzip-compressed when it is a complete JSON body, as the providers' CDNs answer
/// clients that accept gzip (streams stay as they are).
pub(crate) fn gzip_json(resp: Response<MockBody>) -> Response<MockBody> {
    use std::io::Write;
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let (mut parts, body) = resp.into_parts();
    let Kind::Full(Some(bytes)) = &body.kind else {
        return Response::from_parts(parts, body);
    };
    if !json {
        return Response::from_parts(parts, body);
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let Ok(zipped) = enc.write_all(bytes).and_then(|()| enc.finish()) else {
        return Response::from_parts(parts, body);
    };
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts
        .headers
        .insert(VARY, HeaderValue::from_static("accept-encoding"));
    Response::from_parts(parts, MockBody::full(zipped))
}

/// A 200 response with the JSON of `value`.
pub(crate) fn json_ok<T: Serialize + ?Sized>(value: &T) -> Response<MockBody> {
    let mut buf = Vec::with_capacity(512);
    write_json(&mut buf, value);
    json_response(StatusCode::OK, buf)
}

/// A 200 `text/event-stream` response.
pub(crate) fn sse_response(
    events: Vec<Bytes>,
    delay: Option<Duration>,
    stats: &Arc<Stats>,
) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::sse(events, delay, Arc::clone(stats)));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Bytes {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("write");
        Bytes::from(enc.finish().expect("finish"))
    }

    fn coded(coding: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, HeaderValue::from_static(coding));
        h
    }

    #[test]
    fn gzip_request_bodies_are_decompressed_within_the_limit() {
        let plain = Bytes::from_static(br#"{"model":"m"}"#);
        assert_eq!(
            decoded_request(&HeaderMap::new(), plain.clone(), 64),
            Ok(plain.clone())
        );
        assert_eq!(
            decoded_request(&coded("identity"), plain.clone(), 64),
            Ok(plain.clone())
        );
        assert_eq!(
            decoded_request(&coded("GZIP"), gzip(&plain), 64),
            Ok(plain.clone())
        );
        assert!(decoded_request(&coded("gzip"), gzip(&[b'x'; 65]), 64).is_err());
        assert!(decoded_request(&coded("gzip"), plain.clone(), 64).is_err());
        assert!(decoded_request(&coded("br"), plain, 64).is_err());
    }
}
