//! The response body type of the proxy: either a small gateway-made body, or the upstream's
//! body streamed through frame by frame (never buffered), with a guard that records the request
//! in logs and metrics when the body ends or the client goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::telemetry::RequestRecord;

pin_project! {
    /// Body of every response the proxy sends.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        /// A body made by the gateway, sent in one frame.
        Full { data: Option<Bytes> },
        /// The upstream's body, streamed through.
        Upstream {
            #[pin]
            inner: Incoming,
            record: Option<RequestRecord>,
        },
    }
}

impl ProxyBody {
    /// A body of `data` in a single frame.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// The upstream's body; `record` is finished when the stream ends, fails, or is dropped.
    pub fn upstream(inner: Incoming, record: RequestRecord) -> Self {
        // An empty body may never be polled; its request is complete already.
        let record = if inner.is_end_stream() {
            record.finish_complete();
            None
        } else {
            Some(record)
        };
        Self::Upstream { inner, record }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Upstream { mut inner, record } => {
                let polled = inner.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(rec), Some(data)) = (record.as_mut(), frame.data_ref()) {
                            rec.add_bytes(data.len());
                        }
                        // A body with a known length may not be polled again after its last
                        // byte; it is complete now.
                        if inner.is_end_stream() {
                            if let Some(rec) = record.take() {
                                rec.finish_complete();
                            }
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(rec) = record.take() {
                            rec.finish_upstream_error();
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(rec) = record.take() {
                            rec.finish_complete();
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
            Self::Full { data } => data.is_none(),
            Self::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
