//! The response body type of the proxy: either a small gateway-made body, or the upstream's
//! body streamed through frame by frame (never buffered), with a guard that records the request
//! in logs and metrics when the body ends or the client goes away; or, for `/compat` streams,
//! the upstream's body translated event by event; any of these can be copied into the response
//! cache on its way through. An answer the gateway holds back whole or serves from the cache is
//! recorded by the same rule as a streamed one: complete once the client took its last bytes
//! (it goes out in pieces, so that a client that leaves is seen leaving), cancelled otherwise.
//! A stream that ends but not whole (a translated stream cut short or broken off with an error
//! event, an OpenAI-format stream without `data: [DONE]`) is recorded as an upstream error and
//! not cached. A client that leaves an answer counted against a
//! budget after the end of its content (its `finish_reason`), before the usage that follows it,
//! does not take that usage along: the rest is read, briefly, to count it.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use memchr::memmem;
use pin_project_lite::pin_project;

use crate::buffers::Held;
use crate::cache::Fill;
use crate::compat::StreamTranslator;
use crate::compat::sse::DoneWatch;
use crate::telemetry::{Answered, RequestRecord};
use crate::upstream::{BodyError, Stalled, UpstreamBody};

pin_project! {
    /// Body of every response the proxy sends.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        /// A body made by the gateway, sent in one frame; `held` accounts for it when it is
        /// a response held back whole, until the body is dropped. An answer (`delivery`: its
        /// record) goes in pieces of at most [`PIECE`] bytes, and is delivered with its last.
        Full {
            data: Option<Bytes>,
            held: Option<Held>,
            delivery: Option<Box<Delivery>>,
        },
        /// The upstream's body, streamed through; `done` watches an OpenAI-format stream for
        /// its `data: [DONE]`; `tokens`: whether its usage counts (an answer of the model,
        /// not a batch's status or a file's content, which carry `usage` objects too);
        /// `finish` watches an answer counted against a budget for the end of its content.
        Upstream {
            #[pin]
            inner: UpstreamBody,
            record: Option<Box<RequestRecord>>,
            done: Option<DoneWatch>,
            tokens: bool,
            finish: Option<Box<FinishWatch>>,
        },
        /// The upstream's stream translated chunk by chunk (`/compat`).
        Translated {
            #[pin]
            inner: UpstreamBody,
            translator: Box<dyn StreamTranslator>,
            record: Option<Box<RequestRecord>>,
            out: BytesMut,
            ended: bool,
            finish: Option<Box<FinishWatch>>,
        },
        /// Another body, copied into the response cache as it goes through; `held` accounts
        /// for the copy (a copy the budget has no room for is given up, the body goes on).
        Filling {
            inner: Pin<Box<ProxyBody>>,
            fill: Option<Fill>,
            held: Held,
        },
    }

    impl PinnedDrop for ProxyBody {
        fn drop(this: Pin<&mut Self>) {
            // The client went away (a body read to its end has no record left). Past the end
            // of the content of an answer counted against a budget, its usage is still to
            // come: the rest is read for it.
            // A stream that ended whole ([DONE] passed) is complete, whether or not the
            // upstream's end of the body came before the client stopped reading at its end.
            match this.project() {
                ProxyBodyProj::Upstream { record, done: Some(done), .. } if done.saw_done() => {
                    if let Some(rec) = record.take() {
                        rec.finish_complete();
                    }
                }
                ProxyBodyProj::Upstream { inner, record, finish, tokens: true, .. } => {
                    if finish.as_ref().is_some_and(|f| f.seen())
                        && let Some(rec) = record.take()
                    {
                        read_rest(inner.get_mut().take(), rec);
                    }
                }
                ProxyBodyProj::Translated { record, translator, .. } if translator.ended_whole() => {
                    if let Some(rec) = record.take() {
                        rec.finish_complete();
                    }
                }
                ProxyBodyProj::Translated { inner, record, finish, ended: false, .. } => {
                    if finish.as_ref().is_some_and(|f| f.seen())
                        && let Some(rec) = record.take()
                    {
                        read_rest(inner.get_mut().take(), rec);
                    }
                }
                ProxyBodyProj::Filling { inner, fill, .. } => {
                    if inner.ended_whole()
                        && let Some(f) = fill.take()
                    {
                        f.finish();
                    }
                }
                _ => {}
            }
        }
    }
}

impl ProxyBody {
    /// A body of `data` in a single frame.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self::Full {
            data: (!data.is_empty()).then_some(data),
            held: None,
            delivery: None,
        }
    }

    /// A body of `data` held back whole, whose bytes `held` accounts for until it is dropped.
    pub fn full_held(data: impl Into<Bytes>, held: Held) -> Self {
        let data = data.into();
        Self::Full {
            data: (!data.is_empty()).then_some(data),
            held: Some(held),
            delivery: None,
        }
    }

    /// An answer made whole before it is sent (held back for a translation or the response
    /// checks, or served from the cache), whose bytes `held` accounts for (if they are not the
    /// cache's): `delivery` is finished when the client takes its last piece, as a streamed
    /// answer's record is when it takes its last frame; dropped before, it is cancelled.
    pub fn answer(
        data: impl Into<Bytes>,
        held: Option<Held>,
        delivery: impl Into<Delivery>,
    ) -> Self {
        let data = data.into();
        let delivery = delivery.into();
        // An empty body may never be polled; its answer is delivered already.
        if data.is_empty() {
            delivery.delivered();
            return Self::Full {
                data: None,
                held,
                delivery: None,
            };
        }
        Self::Full {
            data: Some(data),
            held,
            delivery: Some(Box::new(delivery)),
        }
    }

    /// The upstream's body; `record` is finished when the stream ends, fails, or is dropped.
    pub fn upstream(inner: UpstreamBody, record: RequestRecord) -> Self {
        // An empty body may never be polled; its request is complete already.
        let finish = FinishWatch::for_record(&record);
        let record = if inner.is_end_stream() {
            record.finish_complete();
            None
        } else {
            Some(Box::new(record))
        };
        Self::Upstream {
            inner,
            record,
            done: None,
            tokens: true,
            finish,
        }
    }

    /// Counts no tokens in this body (see [`ProxyBody::Upstream`]); other bodies are unchanged.
    pub fn without_tokens(mut self) -> Self {
        if let Self::Upstream { tokens, .. } = &mut self {
            *tokens = false;
        }
        self
    }

    /// The upstream's event stream, streamed through: whole only if it ends with the last event
    /// `done` watches for (otherwise `record` finishes as an upstream error and it is not
    /// cached).
    pub fn upstream_sse(inner: UpstreamBody, record: RequestRecord, done: DoneWatch) -> Self {
        if inner.is_end_stream() {
            record.finish_upstream_error();
            return Self::Upstream {
                inner,
                record: None,
                done: Some(done),
                tokens: true,
                finish: None,
            };
        }
        Self::Upstream {
            inner,
            finish: FinishWatch::for_record(&record),
            record: Some(Box::new(record)),
            done: Some(done),
            tokens: true,
        }
    }

    /// The upstream's stream fed through `translator`, what it holds between chunks counted
    /// through `held`; `record` counts the translated bytes.
    pub fn translated(
        inner: UpstreamBody,
        mut translator: Box<dyn StreamTranslator>,
        held: Held,
        record: RequestRecord,
    ) -> Self {
        translator.hold_in(held);
        Self::Translated {
            inner,
            translator,
            finish: FinishWatch::for_record(&record),
            record: Some(Box::new(record)),
            out: BytesMut::new(),
            ended: false,
        }
    }
}

impl ProxyBody {
    /// Takes out the record of an upstream body streamed through as it is (or copied into the
    /// cache on its way): the body then goes on unrecorded, and its reader records it, with the
    /// status the client got. `None` for other bodies (a translated stream counts its tokens as
    /// it goes, so its record stays in it).
    /// With the record, whether the body's usage counts as tokens (see [`ProxyBody::Upstream`]).
    pub fn take_record(self: Pin<&mut Self>) -> Option<(RequestRecord, bool)> {
        match self.project() {
            ProxyBodyProj::Upstream { record, tokens, .. } => record.take().map(|r| (*r, *tokens)),
            ProxyBodyProj::Filling { inner, .. } => inner.as_mut().take_record(),
            _ => None,
        }
    }

    /// Takes the cache fill of a body on its way into the cache ([`Self::cached_through`]),
    /// none of it copied yet: the response checks store the answer once they let it through.
    pub fn take_fill(self: Pin<&mut Self>) -> Option<Fill> {
        match self.project() {
            ProxyBodyProj::Filling { fill, .. } => fill.take(),
            _ => None,
        }
    }

    /// Takes the whole data of a body made whole before it is sent, none of it sent yet, for
    /// the response checks: its record finishes as if the body ended (to wait for them, see
    /// [`crate::telemetry::HeldBack`]). `None` for other bodies.
    fn take_whole(self: Pin<&mut Self>) -> Option<Bytes> {
        let ProxyBodyProj::Full { data, delivery, .. } = self.project() else {
            return None;
        };
        let data = data.take().unwrap_or_default();
        if let Some(d) = delivery.take() {
            d.delivered();
        }
        Some(data)
    }

    /// Whether this body is a stream that ended whole already: its last event went through
    /// (an OpenAI-format `data: [DONE]`, a translation's end), whatever bytes may follow it.
    fn ended_whole(&self) -> bool {
        match self {
            Self::Full { .. } => false,
            Self::Upstream { done, .. } => done.as_ref().is_some_and(DoneWatch::saw_done),
            Self::Translated { translator, .. } => translator.ended_whole(),
            Self::Filling { inner, .. } => inner.ended_whole(),
        }
    }

    /// Whether this body ended, or will end, not whole: a stream cut short (see the module doc).
    pub fn cut_short(&self) -> bool {
        match self {
            Self::Full { .. } => false,
            Self::Upstream { done, .. } => done.as_ref().is_some_and(|d| !d.saw_done()),
            Self::Translated { translator, .. } => !translator.ended_whole(),
            Self::Filling { inner, .. } => inner.cut_short(),
        }
    }

    /// This body, stored in the cache through `fill` (if any) once its last byte went through;
    /// the copy's bytes are taken from the budget of buffered bodies through its guard.
    pub fn cached_through(self, fill: Option<(Fill, Held)>) -> Self {
        let Some((fill, held)) = fill else {
            return self;
        };
        // A body that is complete already may never be polled.
        let fill = if self.is_end_stream() {
            if !self.cut_short() {
                fill.finish();
            }
            None
        } else {
            Some(fill)
        };
        Self::Filling {
            inner: Box::pin(self),
            fill,
            held,
        }
    }
}

/// Body of a request as the gateway's servers hand it on: hyper's (h2c, and HTTP/1 requests
/// the gateway's own server leaves to hyper), the whole body read with its head by that server
/// (`crate::server`), or what became of one that never came whole.
pub enum RequestBody {
    Incoming(hyper::body::Incoming),
    Whole(Option<Bytes>),
    Broken(Option<BodyBroken>),
}

/// How a request body the gateway's own server was reading ended before its declared length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyBroken {
    /// No part of it came for the client timeout.
    Stalled,
    /// The client closed the connection.
    Closed,
    /// Its chunked framing was not well formed: why.
    Malformed(&'static str),
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("no part of it came for the client timeout")]
    Stalled,
    #[error("the client closed the connection before its end")]
    Closed,
    #[error("malformed chunked body: {0}")]
    Malformed(&'static str),
}

impl From<hyper::body::Incoming> for RequestBody {
    fn from(body: hyper::body::Incoming) -> Self {
        Self::Incoming(body)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            Self::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(RequestBodyError::from))),
            Self::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Broken(broken) => Poll::Ready(broken.take().map(|b| {
                Err(match b {
                    BodyBroken::Stalled => RequestBodyError::Stalled,
                    BodyBroken::Closed => RequestBodyError::Closed,
                    BodyBroken::Malformed(why) => RequestBodyError::Malformed(why),
                })
            })),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming(body) => body.is_end_stream(),
            Self::Whole(data) => data.is_none(),
            Self::Broken(broken) => broken.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming(body) => body.size_hint(),
            Self::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Broken(_) => SizeHint::default(),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ProxyBodyProj::Full { data, delivery, .. } => {
                let piece = match data.take() {
                    None => return Poll::Ready(None),
                    Some(mut rest) if delivery.is_some() && rest.len() > PIECE => {
                        let piece = rest.split_to(PIECE);
                        *data = Some(rest);
                        piece
                    }
                    Some(all) => all,
                };
                if data.is_none()
                    && let Some(d) = delivery.take()
                {
                    d.delivered();
                }
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            ProxyBodyProj::Upstream {
                mut inner,
                record,
                done,
                tokens,
                finish,
            } => {
                let polled = inner.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            if let Some(rec) = record.as_mut() {
                                if *tokens {
                                    rec.observe(data);
                                } else {
                                    rec.observe_bytes(data);
                                }
                            }
                            if let Some(d) = done.as_mut() {
                                d.observe(data);
                            }
                            if let Some(f) = finish.as_mut() {
                                f.observe(data);
                            }
                        }
                        // A body with a known length may not be polled again after its last
                        // byte; it is complete now.
                        if inner.is_end_stream()
                            && let Some(rec) = record.take()
                        {
                            finish_at_end(rec, done.as_ref().is_none_or(DoneWatch::saw_done));
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(rec) = record.take() {
                            rec.finish_upstream_error();
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(rec) = record.take() {
                            finish_at_end(rec, done.as_ref().is_none_or(DoneWatch::saw_done));
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
            ProxyBodyProj::Translated {
                mut inner,
                translator,
                record,
                out,
                ended,
                finish,
            } => loop {
                if *ended {
                    return Poll::Ready(None);
                }
                match ready!(inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            if let Some(f) = finish.as_mut() {
                                f.observe(data);
                            }
                            // Counted from the provider's own usage, as its passthrough route
                            // counts it (cache writes too, which the OpenAI format lacks).
                            if let Some(rec) = record.as_mut() {
                                rec.observe_unsent(data);
                            }
                            translator.push(data, out);
                            if let Some(e) = translator.refused() {
                                // No room in the budget for the event being read: the stream
                                // ends with an error event, and the upstream is let go.
                                *ended = true;
                                drop(inner.as_mut().get_mut().take());
                                out.extend_from_slice(b"data: ");
                                out.extend_from_slice(&crate::compat::openai::error_json(
                                    &e.into_gateway_error().to_string(),
                                    "api_error",
                                    Some("2110"),
                                ));
                                out.extend_from_slice(b"\n\n");
                            }
                        }
                    }
                    Some(Err(e)) => {
                        *ended = true;
                        if let Some(rec) = record.take() {
                            rec.finish_upstream_error();
                        }
                        return Poll::Ready(Some(Err(e)));
                    }
                    None => {
                        *ended = true;
                        translator.finish(out);
                    }
                }
                if !out.is_empty() {
                    let data = out.split().freeze();
                    if let Some(rec) = record.as_mut() {
                        rec.observe_bytes(&data);
                    }
                    if *ended && let Some(rec) = record.take() {
                        match translator.refused() {
                            Some(e) => rec.finish_buffers_full(e.limit),
                            None => finish_at_end(rec, translator.ended_whole()),
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if *ended && let Some(rec) = record.take() {
                    finish_at_end(rec, translator.ended_whole());
                }
            },
            ProxyBodyProj::Filling { inner, fill, held } => {
                let polled = inner.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref()
                            && let Some(f) = fill.as_mut()
                            && (held.grow(data.len() as u64).is_err() || !f.push(data))
                        {
                            *fill = None;
                        }
                        if inner.is_end_stream()
                            && let Some(f) = fill.take()
                            && !inner.cut_short()
                        {
                            f.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => *fill = None,
                    Poll::Ready(None) => {
                        if let Some(f) = fill.take()
                            && !inner.cut_short()
                        {
                            f.finish();
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { data, .. } => data.is_none(),
            Self::Upstream { inner, .. } => inner.is_end_stream(),
            Self::Translated { ended, out, .. } => *ended && out.is_empty(),
            Self::Filling { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Upstream { inner, .. } => inner.size_hint(),
            Self::Translated { .. } => SizeHint::default(),
            Self::Filling { inner, .. } => inner.size_hint(),
        }
    }
}

/// Largest piece of an answer made whole before it is sent ([`ProxyBody::answer`]): about an
/// upstream read, so that its last piece is as little of it as a streamed answer's last frame
/// is. A slice of the answer, not a copy.
const PIECE: usize = 64 * 1024;

/// The record of an answer made whole before it is sent (see [`ProxyBody::answer`]).
pub enum Delivery {
    /// Finished complete.
    Record(RequestRecord),
    /// Let through by the response checks: recorded as its body ended.
    Checked(Answered),
}

impl Delivery {
    /// The client took the answer's last piece.
    fn delivered(self) {
        match self {
            Self::Record(record) => record.finish_complete(),
            Self::Checked(answered) => answered.deliver(),
        }
    }
}

impl From<RequestRecord> for Delivery {
    fn from(record: RequestRecord) -> Self {
        Self::Record(record)
    }
}

impl From<Answered> for Delivery {
    fn from(answered: Answered) -> Self {
        Self::Checked(answered)
    }
}

/// Finishes the record of a body that reached its end: complete if the stream was `whole`,
/// otherwise an upstream error (a stream cut short).
fn finish_at_end(record: Box<RequestRecord>, whole: bool) {
    if whole {
        record.finish_complete();
    } else {
        record.finish_upstream_error();
    }
}

/// How long the rest of an answer is read for after its client left past the end of its
/// content, and how much of it: its usage follows at once.
const READ_REST_FOR: Duration = Duration::from_secs(5);
const READ_REST_BYTES: usize = 64 * 1024;

/// Reads the rest of an answer its client left after the end of its content, for the usage
/// that follows, then lets `record` finish as cancelled, with the tokens read; within
/// [`READ_REST_FOR`] and [`READ_REST_BYTES`].
fn read_rest(mut inner: UpstreamBody, mut record: Box<RequestRecord>) {
    // Outside a runtime (a body dropped at shutdown) the record finishes without them.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let reading = async {
            let mut read = 0;
            while read < READ_REST_BYTES
                && let Some(Ok(frame)) = inner.frame().await
            {
                if let Some(data) = frame.data_ref() {
                    read += data.len();
                    record.observe_unsent(data);
                }
            }
            record
        };
        // On time out the record goes with the reading, as it is.
        let _ = tokio::time::timeout(READ_REST_FOR, reading).await;
    });
}

/// Watches an answer counted against a budget for the end of its content — an OpenAI-format
/// `finish_reason` with a value, or a Bedrock ConverseStream `messageStop` event — after which
/// only its usage (and the stream's end) is left to come. Markers split between two reads are
/// found too.
#[derive(Debug, Default)]
pub struct FinishWatch {
    seen: bool,
    tail: [u8; FinishWatch::KEPT],
    len: usize,
}

impl FinishWatch {
    /// Bytes of a read kept to find a marker that continues in the next: `"finish_reason"`,
    /// the colon, the value's first bytes, with room for spaces.
    const KEPT: usize = 32;

    /// A watch for an answer counted against a budget; none for others.
    fn for_record(record: &RequestRecord) -> Option<Box<Self>> {
        record.budgeted().then(Box::default)
    }

    fn seen(&self) -> bool {
        self.seen
    }

    /// Whether `bytes` hold a `finish_reason` with a value or a Bedrock `messageStop` event (a
    /// text that names them has its quotes escaped, and does not match).
    fn has_marker(bytes: &[u8]) -> bool {
        MESSAGE_STOP.find(bytes).is_some()
            || FINISH_REASON
                .find_iter(bytes)
                .any(|at| has_finish_value(&bytes[at + FINISH_REASON.needle().len()..]))
    }

    /// Takes the next bytes of the answer.
    fn observe(&mut self, data: &[u8]) {
        if self.seen {
            return;
        }
        let head = &data[..data.len().min(Self::KEPT)];
        let mut seam = [0; 2 * Self::KEPT];
        seam[..self.len].copy_from_slice(&self.tail[..self.len]);
        seam[self.len..self.len + head.len()].copy_from_slice(head);
        if Self::has_marker(&seam[..self.len + head.len()]) || Self::has_marker(data) {
            self.seen = true;
            return;
        }
        if data.len() >= Self::KEPT {
            self.tail.copy_from_slice(&data[data.len() - Self::KEPT..]);
            self.len = Self::KEPT;
        } else {
            let keep = (Self::KEPT - data.len()).min(self.len);
            self.tail.copy_within(self.len - keep..self.len, 0);
            self.tail[keep..keep + data.len()].copy_from_slice(data);
            self.len = keep + data.len();
        }
    }
}

/// The key of an OpenAI-format choice's end.
static FINISH_REASON: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"finish_reason\""));
/// A Bedrock ConverseStream `messageStop` event's event-stream header: name length,
/// `:event-type`, string type, value length, value.
static MESSAGE_STOP: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\x0b:event-type\x07\x00\x0bmessageStop"));

/// Whether what follows a `"finish_reason"` key is a reason: a string of its own, not `null`,
/// nor `""` or `"null"` (which some OpenAI-compatible servers send while a choice goes on); one
/// cut short by the end of the read is not yet (the next read looks at it again).
fn has_finish_value(after: &[u8]) -> bool {
    let Some(value) = after
        .trim_ascii_start()
        .strip_prefix(b":")
        .and_then(|v| v.trim_ascii_start().strip_prefix(b"\""))
    else {
        return false;
    };
    match value.first() {
        None | Some(b'"') => false,
        Some(_) => !b"null\"".starts_with(&value[..value.len().min(5)]),
    }
}

/// Why a body held back whole could not be read.
#[derive(Debug)]
pub enum HoldError {
    /// More than the limit of bytes.
    TooLarge(usize),
    /// More than the budget of buffered bodies has room for now.
    Exhausted(crate::buffers::BudgetExhausted),
    /// The upstream stalled mid-body (see [`UpstreamBody::stall_after`]).
    Stalled(std::time::Duration),
    /// The body failed (connection broken, framing error, ...).
    Failed(String),
}

impl std::fmt::Display for HoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge(limit) => write!(f, "larger than {limit} bytes"),
            Self::Exhausted(e) => write!(
                f,
                "buffered bodies would exceed the budget of {} bytes",
                e.limit
            ),
            Self::Stalled(idle) => write!(f, "no data for {} ms", idle.as_millis()),
            Self::Failed(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for HoldError {}

impl HoldError {
    /// Whether the upstream's body broke off or stalled (rather than meeting a limit of the
    /// gateway's): an attempt that a retry may mend.
    pub fn broke_off(&self) -> bool {
        matches!(self, Self::Stalled(_) | Self::Failed(_))
    }

    /// The gateway error a client gets for it: a stall is a timeout (504), a full budget of
    /// buffered bodies 503, the rest 502.
    pub fn into_gateway_error(self, reading: &str) -> crate::error::GatewayError {
        use crate::error::GatewayError;
        match self {
            Self::Exhausted(e) => e.into_gateway_error(),
            Self::Stalled(idle) => GatewayError::UpstreamStalled {
                ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
            },
            other => GatewayError::UpstreamUnavailable(format!("reading {reading}: {other}")),
        }
    }
}

/// Reads a body whole, for the features that hold a response back until it is complete (DLP
/// and guardrail response checks, `/compat` translation of JSON): at most `limit` bytes, each
/// taken from the budget of buffered bodies through `held` as it arrives (a declared length
/// the budget has no room for is refused before any byte is read). On an error the body is
/// dropped, and with it the upstream connection. Its upstream's silences are bounded by the
/// body itself ([`UpstreamBody::stall_after`]).
pub async fn hold_whole<B>(
    body: B,
    limit: usize,
    mut held: Option<&mut Held>,
) -> Result<Bytes, HoldError>
where
    B: Body<Data = Bytes, Error = BodyError>,
{
    use http_body_util::BodyExt as _;
    let declared = body.size_hint().lower();
    if let Some(h) = held.as_deref()
        && declared <= limit as u64
    {
        h.check_room(declared).map_err(HoldError::Exhausted)?;
    }
    let mut body = std::pin::pin!(body);
    let mut whole = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => return Ok(whole.freeze()),
            Some(Err(e)) => {
                // A body read whole within its attempt hands on why it could not be.
                let e = match e.downcast::<HoldError>() {
                    Ok(held) => return Err(*held),
                    Err(e) => e,
                };
                return Err(match e.downcast_ref::<Stalled>() {
                    Some(Stalled(after)) => HoldError::Stalled(*after),
                    None => HoldError::Failed(e.to_string()),
                });
            }
            Some(Ok(frame)) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if whole.len() + data.len() > limit {
                return Err(HoldError::TooLarge(limit));
            }
            if let Some(h) = held.as_deref_mut() {
                h.grow(data.len() as u64).map_err(HoldError::Exhausted)?;
            }
            if whole.is_empty() && body.is_end_stream() {
                return Ok(data);
            }
            if whole.capacity() == 0 {
                // A body in several frames with a declared length is allocated once, not
                // doubled up to it (up to a bound: the declaration is the sender's word).
                let declared = crate::buffers::presize(declared).min(limit);
                whole.reserve(declared.max(data.len()));
            }
            whole.extend_from_slice(&data);
        }
    }
}

/// [`hold_whole`] for a response's body: one made whole already (a `/compat` translation, a
/// cache hit) is taken as it is, in one piece, its bytes taken from `held` (see
/// [`ProxyBody::take_whole`]).
pub async fn hold_response(
    mut body: Pin<&mut ProxyBody>,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, HoldError> {
    if let Some(whole) = body.as_mut().take_whole() {
        if whole.len() > limit {
            return Err(HoldError::TooLarge(limit));
        }
        held.grow(whole.len() as u64)
            .map_err(HoldError::Exhausted)?;
        return Ok(whole);
    }
    hold_whole(body, limit, Some(held)).await
}

/// A held-back answer its upstream compressed although the gateway asked for `identity` (see
/// [`crate::headers::identity_encoding`]): the response checks must read its text, so a gzip
/// or deflate body is decoded (at most `limit` bytes, each taken from `held`) and its
/// `Content-Encoding` removed; another coding, or a body that does not decode, is a 502 rather
/// than an answer let through unread. An answer without a coding is returned as it is.
pub fn decode_held(
    headers: &mut http::HeaderMap,
    whole: Bytes,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, crate::error::GatewayError> {
    use crate::error::GatewayError;
    use std::io::Read as _;
    let Some(coding) = crate::headers::answer_coding(headers) else {
        return Ok(whole);
    };
    let mut reader: Box<dyn std::io::Read + '_> = match coding.to_ascii_lowercase().as_str() {
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(&whole[..])),
        // RFC 9110's deflate is the zlib format; some servers send raw deflate.
        "deflate" if whole.first().is_some_and(|b| b & 0x0f == 8) => {
            Box::new(flate2::read::ZlibDecoder::new(&whole[..]))
        }
        "deflate" => Box::new(flate2::read::DeflateDecoder::new(&whole[..])),
        _ => {
            return Err(GatewayError::UpstreamUnavailable(format!(
                "the provider answered compressed (Content-Encoding: {}) although asked for identity, and this gateway's response checks cannot read that coding",
                crate::error::truncate(&coding)
            )));
        }
    };
    let mut out = Vec::with_capacity(whole.len().saturating_mul(4).min(limit));
    let mut piece = [0u8; 16 << 10];
    loop {
        let n = reader.read(&mut piece).map_err(|e| {
            GatewayError::UpstreamUnavailable(format!(
                "the provider's {coding} answer could not be decoded: {e}"
            ))
        })?;
        if n == 0 {
            break;
        }
        if out.len() + n > limit {
            return Err(HoldError::TooLarge(limit).into_gateway_error("the decoded response"));
        }
        held.grow(n as u64)
            .map_err(|e| HoldError::Exhausted(e).into_gateway_error("the decoded response"))?;
        out.extend_from_slice(&piece[..n]);
    }
    headers.remove(http::header::CONTENT_ENCODING);
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::{FinishWatch, HoldError, ProxyBody, hold_whole};
    use crate::buffers::BufferBudget;
    use crate::upstream::{BodyError, Stalled};

    #[test]
    fn a_response_body_stays_small_to_move() {
        // Moved several times per request (out of the gateway's future, into the server's):
        // large parts (the request's record) are boxed.
        let size = std::mem::size_of::<ProxyBody>();
        assert!(size <= 320, "ProxyBody is {size} bytes");
    }

    fn finish_seen(reads: &[&[u8]]) -> bool {
        let mut w = FinishWatch::default();
        reads.iter().for_each(|r| w.observe(r));
        w.seen()
    }

    #[test]
    fn the_end_of_an_answers_content_is_seen_in_any_split_of_its_bytes() {
        let chunk: &[u8] = br#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let bedrock: &[u8] =
            b"\x00\x00\x00\x58\x0b:event-type\x07\x00\x0bmessageStop\x0d:content-type";
        for text in [chunk, br#"{"finish_reason": "length"}"#, bedrock] {
            assert!(finish_seen(&[text]));
            for at in 0..text.len() {
                assert!(finish_seen(&[&text[..at], &text[at..]]), "split at {at}");
            }
            // One byte at a time.
            let bytes: Vec<&[u8]> = text.chunks(1).collect();
            assert!(finish_seen(&bytes));
        }
        // Not yet: a null finish_reason, the words in the model's text (quotes escaped), a
        // Bedrock event that is not messageStop.
        assert!(!finish_seen(&[
            br#"data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}"#,
            br#"data: {"choices":[{"delta":{"content":"x"},"finish_reason":""}]}"#,
            br#"data: {"choices":[{"delta":{"content":"x"},"finish_reason": "null"}]}"#,
            br#"data: {"choices":[{"delta":{"content":"\"finish_reason\":\"stop\""}}]}"#,
            b"\x0b:event-type\x07\x00\x11contentBlockDelta",
        ]));
    }

    fn frames(
        parts: Vec<Result<&'static str, BodyError>>,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, BodyError>>> {
        StreamBody::new(futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| p.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))),
        ))
    }

    #[tokio::test]
    async fn a_held_body_is_read_whole_within_its_limit() {
        let whole = hold_whole(frames(vec![Ok("ab"), Ok("cd"), Ok("e")]), 5, None).await;
        assert_eq!(whole.expect("whole"), Bytes::from_static(b"abcde"));
        let over = hold_whole(frames(vec![Ok("ab"), Ok("cd"), Ok("ef")]), 5, None).await;
        assert!(matches!(over, Err(HoldError::TooLarge(5))), "{over:?}");
        let broken = hold_whole(frames(vec![Ok("ab"), Err("reset".into())]), 5, None).await;
        assert!(
            matches!(&broken, Err(HoldError::Failed(e)) if e == "reset"),
            "{broken:?}"
        );
    }

    #[tokio::test]
    async fn an_upstream_stall_is_a_504() {
        let after = Duration::from_secs(30);
        let held = hold_whole(
            frames(vec![Ok("{"), Err(Box::new(Stalled(after)))]),
            1 << 20,
            None,
        )
        .await;
        assert!(
            matches!(held, Err(HoldError::Stalled(d)) if d == after),
            "{held:?}"
        );
        let err = held
            .expect_err("stalled")
            .into_gateway_error("the response");
        assert_eq!((err.status().as_u16(), err.code()), (504, 2103));
        assert!(err.to_string().contains("no data for 30000 ms"), "{err}");
    }

    #[tokio::test]
    async fn a_held_body_takes_its_bytes_from_the_budget_and_the_response_gives_them_back() {
        let budget = BufferBudget::default();
        let mut held = budget.guard(10);
        let whole = hold_whole(frames(vec![Ok("ab"), Ok("cd")]), 100, Some(&mut held)).await;
        assert_eq!(whole.expect("fits"), Bytes::from_static(b"abcd"));
        assert_eq!(budget.held(), 4);
        let body = ProxyBody::full_held(Bytes::from_static(b"abcd"), held);
        assert_eq!(budget.held(), 4);
        drop(body);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_held_body_the_budget_has_no_room_for_is_a_503_and_holds_nothing() {
        let budget = BufferBudget::default();
        let mut other = budget.guard(10);
        other.grow(7).expect("fits");
        let mut held = budget.guard(10);
        let over = hold_whole(frames(vec![Ok("ab"), Ok("cd")]), 100, Some(&mut held)).await;
        let Err(HoldError::Exhausted(e)) = over else {
            panic!("{over:?}")
        };
        drop(held);
        assert_eq!(budget.held(), 7);
        let err = HoldError::Exhausted(e).into_gateway_error("the response");
        assert_eq!((err.status().as_u16(), err.code()), (503, 2110));
        // A declared length with no room is refused before any byte is read.
        let mut held = budget.guard(10);
        use http_body_util::BodyExt as _;
        let declared = http_body_util::Full::new(Bytes::from_static(b"abcd"))
            .map_err(|never: std::convert::Infallible| -> BodyError { match never {} });
        let over = hold_whole(declared, 100, Some(&mut held)).await;
        assert!(matches!(over, Err(HoldError::Exhausted(_))), "{over:?}");
        assert_eq!(held.bytes(), 0);
    }

    #[tokio::test]
    async fn a_body_read_whole_in_its_attempt_is_read_again_as_it_was_its_bytes_counted_once() {
        use crate::upstream::UpstreamBody;
        let budget = BufferBudget::default();
        let mut first = budget.guard(100);
        first.grow(4).expect("fits");
        let body = UpstreamBody::read_whole(Ok(Bytes::from_static(b"abcd")), first);
        assert!(body.unread().is_none());
        // The reader that holds it back counts its bytes in turn: they are counted once.
        let mut again = budget.guard(100);
        let whole = hold_whole(body, 100, Some(&mut again)).await;
        assert_eq!(whole.expect("whole"), Bytes::from_static(b"abcd"));
        assert_eq!((budget.held(), again.bytes()), (4, 4));
        // One that could not be read whole says why, before it is read and when it is.
        for why in [
            HoldError::Stalled(Duration::from_secs(3)),
            HoldError::Failed("reset".into()),
            HoldError::TooLarge(5),
        ] {
            let said = why.to_string();
            let body = UpstreamBody::read_whole(Err(why), budget.guard(100));
            assert_eq!(body.unread().map(ToString::to_string), Some(said.clone()));
            let read = hold_whole(body, 100, Some(&mut budget.guard(100))).await;
            assert_eq!(read.expect_err("unread").to_string(), said);
        }
        let stalled = UpstreamBody::read_whole(
            Err(HoldError::Stalled(Duration::from_secs(3))),
            budget.guard(100),
        );
        let err = hold_whole(stalled, 100, None).await.expect_err("stalled");
        assert!(matches!(err, HoldError::Stalled(d) if d == Duration::from_secs(3)));
        drop(again);
        assert_eq!(budget.held(), 0);
    }

    fn record(
        metrics: &std::sync::Arc<crate::telemetry::Metrics>,
    ) -> crate::telemetry::RequestRecord {
        crate::telemetry::RequestRecord::new(
            metrics.clone(),
            "openai".into(),
            http::Method::POST,
            "chat/completions",
            200,
            std::time::Instant::now(),
            &crate::telemetry::LogOptions::default(),
            "01J0000000000000000000000".into(),
        )
    }

    fn counted(metrics: &crate::telemetry::Metrics, sample: &str) -> bool {
        metrics.encode().lines().any(|l| l == sample)
    }

    #[tokio::test]
    async fn an_answer_made_whole_is_complete_with_its_last_piece_and_cancelled_before() {
        use http_body_util::BodyExt as _;
        const SENT: &str = r#"sidegate_requests_total{provider="openai",status="200"} 1"#;
        const CANCELLED: &str = r#"sidegate_responses_cancelled_total{provider="openai"} 1"#;
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
        let data = Bytes::from(vec![b'y'; 3 * super::PIECE + 1]);
        let mut body = std::pin::pin!(ProxyBody::answer(data.clone(), None, record(&metrics)));
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            let piece = frame.expect("frame").into_data().expect("data");
            // Slices of the answer, not copies.
            assert!(data.as_ptr_range().contains(&piece.as_ptr()));
            pieces.push(piece.len());
            let last = pieces.iter().sum::<usize>() == data.len();
            assert_eq!(counted(&metrics, SENT), last, "after {pieces:?}");
        }
        assert_eq!(pieces, [super::PIECE, super::PIECE, super::PIECE, 1]);
        assert!(!counted(&metrics, CANCELLED));
        // A client that leaves before the last piece did not get the answer.
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
        let mut body = Box::pin(ProxyBody::answer(data.clone(), None, record(&metrics)));
        body.frame().await.expect("a piece").expect("data");
        drop(body);
        assert!(counted(&metrics, CANCELLED));
        // One the response checks read is taken whole, in one piece, its record ended.
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
        let budget = BufferBudget::default();
        let mut held = budget.guard(1 << 20);
        let mut body = std::pin::pin!(ProxyBody::answer(data.clone(), None, record(&metrics)));
        let whole = super::hold_response(body.as_mut(), 1 << 20, &mut held).await;
        assert_eq!(whole.expect("whole").as_ptr(), data.as_ptr());
        assert_eq!(held.bytes(), data.len() as u64);
        assert!(counted(&metrics, SENT));
    }

    #[test]
    fn an_answer_compressed_against_the_request_is_decoded_or_refused() {
        use std::io::Write as _;
        let text = b"{\"content\":\"key AKIAIOSFODNN7EXAMPLE\"}".repeat(50);
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&text).expect("gzip");
            e.finish().expect("gzip")
        };
        let zlib = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&text).expect("zlib");
            e.finish().expect("zlib")
        };
        let raw = {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&text).expect("deflate");
            e.finish().expect("deflate")
        };
        let budget = BufferBudget::default();
        let decode = |coding: Option<&str>, body: &[u8], limit: usize| {
            let mut headers = http::HeaderMap::new();
            if let Some(c) = coding {
                headers.insert("content-encoding", c.parse().expect("value"));
            }
            let mut held = budget.guard(1 << 20);
            let out =
                super::decode_held(&mut headers, Bytes::copy_from_slice(body), limit, &mut held);
            (out, headers.contains_key("content-encoding"), held.bytes())
        };
        for (coding, body) in [
            ("gzip", &gzip),
            ("X-Gzip", &gzip),
            ("identity, gzip", &gzip),
            ("deflate", &zlib),
            ("deflate", &raw),
        ] {
            let (out, still_coded, held) = decode(Some(coding), body, 1 << 20);
            assert_eq!(out.expect(coding), text, "{coding}");
            assert!(!still_coded, "{coding}: the header goes with the coding");
            assert_eq!(held, text.len() as u64, "{coding}: taken from the budget");
        }
        // Plain answers are left as they are.
        for coding in [None, Some("identity")] {
            let (out, _, held) = decode(coding, &text, 1 << 20);
            assert_eq!(out.expect("plain"), text);
            assert_eq!(held, 0);
        }
        // Codings the gateway cannot read, a body that does not decode, one decoding past
        // the limit (a small bomb): 502s, never the bytes unread.
        for (coding, body, limit) in [
            ("br", &gzip, 1 << 20),
            ("gzip, br", &gzip, 1 << 20),
            ("gzip", &zlib, 1 << 20),
            ("gzip", &gzip[..gzip.len() / 2].to_vec(), 1 << 20),
            ("gzip", &gzip, text.len() - 1),
        ] {
            let (out, still_coded, _) = decode(Some(coding), body, limit);
            let err = out.expect_err(coding);
            assert_eq!(
                (err.status().as_u16(), err.code()),
                (502, 2104),
                "{coding}: {err}"
            );
            assert!(still_coded, "{coding}");
        }
        assert_eq!(budget.held(), 0);
    }
}
