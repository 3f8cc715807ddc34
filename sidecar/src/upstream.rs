//! The client to the providers, and the body of their responses.
//!
//! Upstreams are spoken to in HTTP/1.1 with keep-alive, over TLS (the providers) or not
//! (in-cluster model servers, local mocks), as the providers' own SDKs do. The common request
//! goes through [`h1`], inside the request's own task: a request never hops to a connection task
//! and back, and a burst of streamed chunks read in one go leaves as one frame (one write to the
//! client) instead of one task hand-off and one syscall per chunk. The rest — large request
//! bodies, requests with framing headers of their own — goes through hyper-util's pooled client,
//! whose bodies are coalesced the same way where data is already there.
//!
//! HTTP/2 is not offered: over one multiplexed connection hyper's client served 32 concurrent
//! streams at 0.20× the rate of a direct client (nginx 0.70×); HTTP/1.1 connections serve them
//! at 0.58–0.67×, level with nginx (`bench/run --tls`).
//!
//! Both behave alike: origin-form request target and `Host` from the URI, keep-alive reuse, and
//! a connection closed (the upstream sees the cancel) when its response is dropped before the
//! end.

pub mod h1;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::Scheme;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;

/// Error of a response body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Idle upstream connections are closed after this long, or sooner when an upstream's
/// `Keep-Alive: timeout=N` asks (see [`h1`]).
///
/// Under the idle timeouts of the load balancers and front ends most upstreams sit behind
/// (AWS ALB 60 s, nginx 75 s): a connection the upstream has closed is noticed before reuse, but
/// one it closes just as it is reused costs a request (`h1` sends it again, once, when that
/// cannot do it twice; else it is a 502 the providers' SDKs retry). Shorter server timeouts are
/// announced (Node and Apache send `Keep-Alive: timeout=5`) or left to that (uvicorn's 5 s): a
/// pool limit that short would reconnect, and over TLS handshake again, for most requests of a
/// steady trickle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// Idle connections kept per upstream host.
pub const MAX_IDLE_PER_HOST: usize = 256;
/// Largest frame made by joining chunks that are already there.
pub const MAX_COALESCE: usize = 64 * 1024;
/// Longest TCP connect, and longest TLS handshake after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Legacy = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The HTTP client to providers.
#[derive(Clone)]
pub struct UpstreamClient {
    legacy: Legacy,
    pool: Arc<h1::Pool>,
}

/// Builds the upstream client. It trusts the public web PKI roots plus `extra_roots` (a private
/// CA of a model server or an egress proxy).
pub fn upstream_client(
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<UpstreamClient, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Copies of one configuration share its TLS session cache (resumed handshakes). hyper-rustls
    // sets the ALPN protocols of its copy itself.
    let mut h1_tls = tls.clone();
    h1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // A path that dies without a word (a NAT or firewall dropping the flow) is found within a
    // minute instead of the kernel's two hours, for idle pooled connections and silent streams.
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.set_keepalive_interval(Some(Duration::from_secs(10)));
    http.set_keepalive_retries(Some(3));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http.clone());
    let legacy = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .build(https);
    Ok(UpstreamClient {
        legacy,
        pool: Arc::new(h1::Pool::new(http, Arc::new(h1_tls))),
    })
}

impl UpstreamClient {
    /// Sends `req` (absolute URI) and resolves with the response head; the body streams.
    pub async fn request(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let scheme = req.uri().scheme();
        if (scheme == Some(&Scheme::HTTP) || scheme == Some(&Scheme::HTTPS))
            && req.uri().authority().is_some()
            && h1::eligible(&req)
        {
            let resp = self.pool.request(req).await?;
            return Ok(resp.map(|b| UpstreamBody {
                kind: Kind::H1 { body: b },
                watchdog: None,
            }));
        }
        match self.legacy.request(req).await {
            // hyper undoes `chunked` alone, as the in-task client does (see there).
            Ok(resp) if h1::transfer_codings(resp.headers()).is_none() => Err(UpstreamError {
                kind: "Legacy",
                source: Box::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "client error (invalid HTTP response: a transfer-encoding other than chunked)",
                )),
            }),
            Ok(resp) => Ok(resp.map(UpstreamBody::hyper)),
            Err(e) => Err(UpstreamError {
                kind: "Legacy",
                source: Box::new(e),
            }),
        }
    }

    /// Idle connections of the HTTP/1.1 path pooled now (for tests).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}

/// A failed upstream request; displays like hyper-util's client errors.
#[derive(Debug)]
pub struct UpstreamError {
    kind: &'static str,
    source: BodyError,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == "Legacy" {
            // hyper-util's error already says "client error (...)".
            return self.source.fmt(f);
        }
        write!(f, "client error ({})", self.kind)
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if self.kind == "Legacy" {
            return self.source.source();
        }
        Some(&*self.source)
    }
}

pin_project! {
    /// The body of an upstream response, streamed: every poll hands on all the data that is
    /// there (up to [`MAX_COALESCE`] bytes for hyper bodies), so the client gets a burst in one
    /// write; nothing waits for more data to arrive. With [`UpstreamBody::stall_after`], an
    /// upstream that sends nothing for that long ends the body with a [`Stalled`] error.
    pub struct UpstreamBody {
        #[pin]
        kind: Kind,
        watchdog: Option<Watchdog>,
    }
}

/// The body error of an upstream that sent nothing for this long.
/// A response extension: its body ends where the upstream closes the connection (no length,
/// no chunks) over plain HTTP, so a cut-off body cannot be told from a whole one (over TLS the
/// missing `close_notify` tells). Such a body is passed on, but never stored in the cache.
#[derive(Debug, Clone, Copy)]
pub struct UnframedBody;

#[derive(Debug, Clone, Copy)]
pub struct Stalled(pub Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream sent nothing for {} ms", self.0.as_millis())
    }
}

impl std::error::Error for Stalled {}

/// Times the silences of a body: its timer is made at the first wait, and moved on at a wait
/// after data came (a body that arrives whole never waits, and never makes one).
struct Watchdog {
    after: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    moved: bool,
}

impl Watchdog {
    /// At a wait for the upstream: whether it has been silent for `after`.
    fn poll_silent(&mut self, cx: &mut Context<'_>) -> bool {
        // The clock is read only when the timer is made or moved, not at every wake-up.
        let timer = match &mut self.timer {
            Some(t) if self.moved => {
                t.as_mut().reset(tokio::time::Instant::now() + self.after);
                t
            }
            Some(t) => t,
            None => self.timer.insert(Box::pin(tokio::time::sleep(self.after))),
        };
        self.moved = false;
        timer.as_mut().poll(cx).is_ready()
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        H1 { body: h1::Body },
        /// What is left where a body was taken out ([`UpstreamBody::take`]).
        Ended,
        /// A body read whole within its attempt ([`UpstreamBody::read_whole`]), or why it
        /// could not be: handed on in one frame (or as its error), its bytes in the budget of
        /// buffered bodies through `held` until that frame is taken.
        Whole {
            read: Option<Result<Bytes, crate::body::HoldError>>,
            held: Option<crate::buffers::Held>,
        },
        Hyper {
            #[pin]
            inner: Incoming,
            // A frame or error read after data that was handed on first.
            held: Option<Result<Frame<Bytes>, hyper::Error>>,
            done: bool,
        },
    }
}

impl UpstreamBody {
    /// Takes the body out (to be read on by another task), leaving an ended one in its place.
    pub fn take(&mut self) -> Self {
        std::mem::replace(
            self,
            Self {
                kind: Kind::Ended,
                watchdog: None,
            },
        )
    }

    fn hyper(inner: Incoming) -> Self {
        Self {
            kind: Kind::Hyper {
                inner,
                held: None,
                done: false,
            },
            watchdog: None,
        }
    }

    /// A body read whole within its attempt (`read`: its bytes, or why it could not be read
    /// whole), for a reader that holds the answer back whole anyway (the response checks): a
    /// break is then seen while the request can still be sent again (see
    /// `proxy::Gateway::dispatch`). `held` accounts for its bytes until its frame is taken, by a
    /// reader that counts them in turn; its error is handed on as a [`crate::body::HoldError`].
    pub fn read_whole(
        read: Result<Bytes, crate::body::HoldError>,
        held: crate::buffers::Held,
    ) -> Self {
        Self {
            kind: Kind::Whole {
                read: Some(read),
                held: Some(held),
            },
            watchdog: None,
        }
    }

    /// Why a body read whole within its attempt ([`UpstreamBody::read_whole`]) could not be,
    /// before it is read on; `None` for any other body.
    pub fn unread(&self) -> Option<&crate::body::HoldError> {
        match &self.kind {
            Kind::Whole {
                read: Some(Err(e)), ..
            } => Some(e),
            _ => None,
        }
    }

    /// Ends the body with a [`Stalled`] error when the upstream sends nothing for `after`
    /// (a provider stuck mid-answer, or a network path that died without a word).
    pub fn stall_after(&mut self, after: Duration) {
        self.watchdog = Some(Watchdog {
            after,
            timer: None,
            moved: false,
        });
    }
}

fn data_frame(first: Option<Bytes>, joined: Option<BytesMut>) -> Option<Frame<Bytes>> {
    match (first, joined) {
        (_, Some(j)) => Some(Frame::data(j.freeze())),
        (Some(f), None) => Some(Frame::data(f)),
        (None, None) => None,
    }
}

fn boxed(e: hyper::Error) -> BodyError {
    Box::new(e)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = poll_kind(this.kind, cx);
        if let Some(w) = this.watchdog {
            if polled.is_pending() {
                if w.poll_silent(cx) {
                    let stalled = Stalled(w.after);
                    *this.watchdog = None;
                    return Poll::Ready(Some(Err(Box::new(stalled))));
                }
            } else {
                w.moved = true;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::H1 { body } => body.is_end_stream(),
            Kind::Ended => true,
            Kind::Whole { read, .. } => read
                .as_ref()
                .is_none_or(|r| r.as_ref().is_ok_and(Bytes::is_empty)),
            Kind::Hyper { inner, held, done } => held.is_none() && (*done || inner.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::H1 { body } => body.size_hint(),
            Kind::Ended => SizeHint::with_exact(0),
            Kind::Whole {
                read: Some(Ok(data)),
                ..
            } => SizeHint::with_exact(data.len() as u64),
            Kind::Whole {
                read: Some(Err(_)), ..
            } => SizeHint::default(),
            Kind::Whole { read: None, .. } => SizeHint::with_exact(0),
            Kind::Hyper { held: Some(_), .. } => SizeHint::default(),
            Kind::Hyper { done: true, .. } => SizeHint::with_exact(0),
            Kind::Hyper { inner, .. } => inner.size_hint(),
        }
    }
}

fn poll_kind(
    kind: Pin<&mut Kind>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    {
        let (mut inner, held, done) = match kind.project() {
            KindProj::H1 { body } => return body.poll_frame(cx),
            KindProj::Ended => return Poll::Ready(None),
            KindProj::Whole { read, held } => {
                // Its bytes are the taker's to count from here.
                held.take();
                return Poll::Ready(match read.take() {
                    Some(Ok(data)) if !data.is_empty() => Some(Ok(Frame::data(data))),
                    Some(Ok(_)) | None => None,
                    Some(Err(e)) => Some(Err(Box::new(e))),
                });
            }
            KindProj::Hyper { inner, held, done } => (inner, held, done),
        };
        if let Some(h) = held.take() {
            return Poll::Ready(Some(h.map_err(boxed)));
        }
        if *done {
            return Poll::Ready(None);
        }
        // The first chunk is kept as is; later ones are copied after it.
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        loop {
            match inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(other) => {
                            return match data_frame(first, joined) {
                                Some(d) => {
                                    *held = Some(Ok(other));
                                    Poll::Ready(Some(Ok(d)))
                                }
                                None => Poll::Ready(Some(Ok(other))),
                            };
                        }
                    };
                    if let Some(j) = joined.as_mut() {
                        j.extend_from_slice(&data);
                    } else if let Some(f) = first.take() {
                        let mut j = BytesMut::with_capacity((f.len() + data.len()).max(4096));
                        j.extend_from_slice(&f);
                        j.extend_from_slice(&data);
                        joined = Some(j);
                    } else {
                        first = Some(data);
                    }
                    if inner.is_end_stream() {
                        *done = true;
                        break;
                    }
                    let len = joined
                        .as_ref()
                        .map_or_else(|| first.as_ref().map_or(0, Bytes::len), BytesMut::len);
                    if len >= MAX_COALESCE {
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    *done = true;
                    return match data_frame(first, joined) {
                        Some(d) => {
                            *held = Some(Err(e));
                            Poll::Ready(Some(Ok(d)))
                        }
                        None => Poll::Ready(Some(Err(boxed(e)))),
                    };
                }
                Poll::Ready(None) => {
                    *done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        match data_frame(first, joined) {
            Some(d) => Poll::Ready(Some(Ok(d))),
            None if *done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}
