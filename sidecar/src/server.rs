//! Listeners: the gateway port (HTTP/1.1 keep-alive — the gateway's own server for the usual
//! requests, hyper's for the rest — and h2c) and the admin port, with a
//! shutdown that first keeps serving for a drain delay, then lets in-flight requests finish
//! within the grace period and cuts what remains.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

use crate::admin;
use crate::body::RequestBody;
use crate::error::GatewayError;
use crate::headers::RawHeaders;
use crate::proxy::Gateway;

mod descriptors;
mod h1;

use descriptors::{AcceptFailures, Tally};
pub use descriptors::{MIN_OPEN_FILES, open_files_limit, raise_open_files_limit};

/// Largest request head (request line and headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The first bytes of an HTTP/2 connection with prior knowledge (h2c, RFC 9113 §3.3).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long the connections still open at the grace deadline get to wind down (their log lines
/// and spans written) before their tasks are aborted.
const CUT_WITHIN: Duration = Duration::from_secs(1);

/// When the gateway stops after SIGTERM (or Ctrl-C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// How long after the signal new connections and requests are still accepted and served,
    /// as before it: a classic sidecar gets SIGTERM with its app, whose last requests arrive
    /// meanwhile.
    pub delay: Duration,
    /// How long after the signal (the delay included) in-flight requests may run; those still
    /// running then are cut.
    pub grace: Duration,
}

impl Drain {
    /// No delay: refuse new connections at once and give in-flight requests `grace`.
    pub fn grace(grace: Duration) -> Self {
        Self {
            delay: Duration::ZERO,
            grace,
        }
    }
}

/// Where the gateway is in its shutdown; every connection task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving as usual (also during the drain delay).
    Serving,
    /// No new connections: idle ones close, in-flight requests finish.
    Stopping,
    /// The grace period is over: connections end now.
    Cut,
}

/// Which protocol a new connection speaks, from its first bytes: h2c when they are the HTTP/2
/// preface, else HTTP/1. Nearly always one peek decides (the client's first write is there
/// whole), leaving the bytes in the socket for the protocol's own reader. First bytes that are
/// only a part of the preface (a lone `P`) are read out instead and waited on with reads, which
/// sleep until more comes, not a timed re-peek; they are handed on to the reader in the
/// returned [`FirstBytes`].
async fn speaks_h2(stream: &TcpStream) -> std::io::Result<(bool, FirstBytes)> {
    let mut seen = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut seen).await?;
    if let Some(h2) = preface_decided(&seen[..n]) {
        return Ok((h2, FirstBytes::default()));
    }
    let mut len = 0;
    loop {
        stream.readable().await?;
        let n = match stream.try_read(&mut seen[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // At most the preface's 24 bytes.
        len += n;
        let first = || FirstBytes(Bytes::copy_from_slice(&seen[..len]));
        if n == 0 {
            // Closed after a part of the preface: the HTTP/1 reader answers it.
            return Ok((false, first()));
        }
        if let Some(h2) = preface_decided(&seen[..len]) {
            return Ok((h2, first()));
        }
    }
}

/// Whether the first bytes `seen` are the whole HTTP/2 preface (`Some(true)`), cannot be it
/// (`Some(false)`: none, or HTTP/1 — `PUT`, `POST`, `PATCH` part ways with `PRI` by the 2nd
/// byte), or are a part of it (`None`: wait for more).
fn preface_decided(seen: &[u8]) -> Option<bool> {
    if seen.is_empty() || seen != &H2_PREFACE[..seen.len()] {
        Some(false)
    } else if seen.len() == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Bytes of a connection already read but still to be read by the protocol's reader: the
/// first bytes read while telling its protocol apart (usually none: they were peeked), or
/// what the gateway's own HTTP/1 server read before it handed the connection to hyper.
#[derive(Default)]
struct FirstBytes(Bytes);

impl FirstBytes {
    /// Moves what is left of them into `buf`. Out of line: the read path that calls it
    /// stays small enough to be inlined into hyper's.
    #[cold]
    #[inline(never)]
    fn replay(&mut self, buf: &mut tokio::io::ReadBuf<'_>) {
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0.split_to(n));
    }
}

/// A gateway client connection as hyper's HTTP/1 or h2c server sees it.
type ClientIo = TokioIo<WriteStall<TcpStream>>;

/// A client connection that gives up on a client taking none of its answer: a write that has
/// waited `limit` for the client to read (its socket buffer full) fails, and the connection,
/// its request and the provider's stream behind it end (as nginx's `send_timeout`). Writes that
/// go through at once, as nearly all do, cost one check. Its reads start with the connection's
/// [`FirstBytes`] (read while telling its protocol apart): one comparison per read once they are
/// gone (here rather than in a layer of its own, which cost a call per read).
struct WriteStall<T> {
    inner: T,
    limit: Duration,
    /// Since when a write has waited, while one does.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    first: FirstBytes,
}

impl<T> WriteStall<T> {
    fn new(inner: T, limit: Duration, first: FirstBytes) -> Self {
        Self {
            inner,
            limit,
            waiting: None,
            first,
        }
    }

    /// Passes a write's outcome on, failing it once it has waited `limit`.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took none of its answer for {} s",
                    limit.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.first.0.is_empty() {
            self.first.replay(buf);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one gateway connection, HTTP/1.1 with keep-alive or h2c, until it ends or the
/// shutdown closes it: a connection that has not sent its first bytes yet is closed when the
/// gateway stops, like an idle keep-alive one.
async fn serve_connection(
    stream: TcpStream,
    gateway: Arc<Gateway>,
    mut phase: watch::Receiver<Phase>,
    stops: Arc<Stops>,
) {
    let silence = gateway.client_timeout;
    let (h2, first) = tokio::select! {
        first = tokio::time::timeout(silence, speaks_h2(&stream)) => match first {
            Ok(Ok(decided)) => decided,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection ended before its first request");
                return;
            }
            Err(_) => return,
        },
        _ = phase.wait_for(|p| *p != Phase::Serving) => return,
    };
    let mut io = WriteStall::new(stream, silence, first);
    let result = if h2 {
        serve_h2(TokioIo::new(io), gateway, silence, phase).await
    } else {
        // The gateway's own server first; hyper for what it leaves.
        let stop = Arc::new(h1::Stop::default());
        stops.add(&stop);
        // Told of a stop from here on; one that came before is in the phase.
        match *phase.borrow() {
            Phase::Serving => {}
            Phase::Stopping => stop.stop(),
            Phase::Cut => return,
        }
        let ended = {
            let served = std::pin::pin!(h1::serve(&mut io, &gateway, silence, &stop));
            stop.watch(served).await
        };
        match ended {
            None | Some(h1::Ended::Closed) => return,
            Some(h1::Ended::HandOff(read)) => {
                io.first = FirstBytes(read.freeze());
                serve_h1(TokioIo::new(io), gateway, silence, phase).await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// HTTP/1.1 by hyper, for a connection the gateway's own server ([`h1`]) left to it: hyper
/// closes a connection silent for `silence` between requests or within a head.
async fn serve_h1(
    io: ClientIo,
    gateway: Arc<Gateway>,
    silence: Duration,
    mut phase: watch::Receiver<Phase>,
) -> hyper::Result<()> {
    let service = service_fn(move |req: Request<Incoming>| {
        let gateway = gateway.clone();
        async move {
            let response = gateway.handle(req.map(RequestBody::from)).await?;
            Ok::<_, std::convert::Infallible>(raw_into_map(response))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(silence)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(io, service)
        // A WebSocket session (`crate::websocket`) takes the connection over once answered.
        .with_upgrades();
    tokio::pin!(conn);
    // Handed over by the gateway's own server after the stop began.
    if *phase.borrow() != Phase::Serving {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            next = next_phase(&mut phase) => match next {
                Phase::Serving => {}
                Phase::Stopping => conn.as_mut().graceful_shutdown(),
                // Dropping the connection drops its request here, in this task: its log line
                // and span are written before the gateway exits.
                Phase::Cut => return Ok(()),
            },
        }
    }
}

/// Longest time an h2c connection with no open stream is kept once the stop began (for its
/// client to ack the GOAWAY, or take the last bytes of an answer).
const STOPPING_IDLE: Duration = Duration::from_secs(1);

/// h2c: a connection with no open stream for `silence` is sent GOAWAY, and closed if it is
/// still there after another `silence` (a client that never answers the GOAWAY's PING), as
/// HTTP/1.1 closes an idle keep-alive connection; once the stop began, after [`STOPPING_IDLE`].
/// A stream whose client takes none of its answer for `silence` (its flow-control window stays
/// shut) is reset (see [`Watched`]).
async fn serve_h2(
    io: ClientIo,
    gateway: Arc<Gateway>,
    silence: Duration,
    mut phase: watch::Receiver<Phase>,
) -> hyper::Result<()> {
    let streams = StreamTasks::new(silence);
    let (open, mut open_rx) = watch::channel(0usize);
    let open = Arc::new(open);
    let service = service_fn(move |req: Request<Incoming>| {
        let stream = OpenStream::new(open.clone());
        let gateway = gateway.clone();
        async move {
            let response = raw_into_map(gateway.handle(req.map(RequestBody::from)).await?);
            // Polled in the stream's task (`StreamTasks`), where its progress is.
            let progress = STREAM_PROGRESS.try_with(Arc::clone).ok();
            Ok::<_, std::convert::Infallible>(response.map(|inner| Tracked {
                inner,
                _stream: stream,
                progress,
                polls: 0,
            }))
        }
    });
    let mut conn = Box::pin(
        http2::Builder::new(streams.clone())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service),
    );
    let mut sent_goaway = false;
    let mut idle_limit = silence;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            next = next_phase(&mut phase) => match next {
                Phase::Serving => {}
                // The GOAWAY ends the connection once its client acks the PING sent with it; one
                // that reads nothing more never does, and would hold the exit for the whole
                // grace: with no stream open, it is closed after a short while instead.
                Phase::Stopping => {
                    sent_goaway = true;
                    idle_limit = idle_limit.min(STOPPING_IDLE);
                    conn.as_mut().graceful_shutdown();
                }
                Phase::Cut => break Ok(()),
            },
            () = idle_for(idle_limit, &mut open_rx) => {
                if sent_goaway {
                    break Ok(());
                }
                sent_goaway = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    // Streams run in tasks of their own: they end with their connection, here, so that a
    // stream cut at the grace deadline writes its log line and span before the gateway exits.
    drop(conn);
    streams.shutdown().await;
    result
}

/// A response for hyper to send: its [`RawHeaders`] in its header map.
fn raw_into_map<B>(response: Response<B>) -> Response<B> {
    if response.extensions().get::<RawHeaders>().is_none() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    RawHeaders::into_map(&mut parts);
    Response::from_parts(parts, body)
}

/// The stops of the gateway's own HTTP/1 connections ([`h1::Stop`]), told of the shutdown
/// through them.
#[derive(Default)]
struct Stops(Mutex<Vec<std::sync::Weak<h1::Stop>>>);

impl Stops {
    fn add(&self, stop: &Arc<h1::Stop>) {
        let mut stops = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Those of ended connections are let go as the list doubles.
        if stops.len() >= 64 && stops.len().is_power_of_two() {
            stops.retain(|s| s.strong_count() > 0);
        }
        stops.push(Arc::downgrade(stop));
    }

    fn each(&self, tell: impl Fn(&h1::Stop)) {
        let stops = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for stop in stops.iter().filter_map(std::sync::Weak::upgrade) {
            tell(&stop);
        }
    }
}

/// The phase the shutdown moves to next (`Cut` when the server is gone).
async fn next_phase(phase: &mut watch::Receiver<Phase>) -> Phase {
    match phase.changed().await {
        Ok(()) => *phase.borrow_and_update(),
        Err(_) => Phase::Cut,
    }
}

/// Resolves once no stream has been open for `silence`.
async fn idle_for(silence: Duration, open: &mut watch::Receiver<usize>) {
    loop {
        if open.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        if tokio::time::timeout(silence, open.wait_for(|n| *n > 0))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The executor of one h2c connection's streams: their tasks, so they end with it, each
/// [`Watched`] for a client that takes none of its answer for `limit`.
#[derive(Clone)]
struct StreamTasks {
    tasks: Arc<Mutex<JoinSet<()>>>,
    limit: Duration,
}

impl StreamTasks {
    fn new(limit: Duration) -> Self {
        Self {
            tasks: Arc::default(),
            limit,
        }
    }

    /// Aborts the streams still running and waits until they are gone.
    async fn shutdown(&self) {
        let mut tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        tasks.shutdown().await;
    }
}

impl<F> hyper::rt::Executor<F> for StreamTasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let watched = Watched::new(fut, self.limit);
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // Reaped as new ones start: a long-lived connection holds only its open streams.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(watched);
    }
}

tokio::task_local! {
    /// The answer progress of the h2c stream whose task runs (see [`Watched`]).
    static STREAM_PROGRESS: Arc<Progress>;
}

/// How an h2c stream's answer moves, written by its [`Tracked`] body and read by its
/// [`Watched`] task, both polled in that one task: a count of the times hyper asked the body for
/// a frame, shifted left once, with the low bit set while the frame it gave last has not been
/// taken (hyper asks for the next one only once the stream has send capacity for it).
#[derive(Default)]
struct Progress(AtomicU64);

pin_project! {
    /// An h2c stream's task (hyper's, serving one request), which ends, resetting the stream and
    /// dropping its answer (logged `cancelled`) and the provider's stream behind it, once a
    /// frame of the answer has waited `limit` for the client to open its flow-control window:
    /// such a stream never makes a socket write wait, so [`WriteStall`] cannot see it.
    /// A stream still waiting for its answer (a slow provider) is no client's fault, and
    /// never ends so.
    struct Watched<F> {
        #[pin]
        stream: TaskLocalFuture<Arc<Progress>, F>,
        progress: Arc<Progress>,
        limit: Duration,
        // The progress the timer was armed at.
        armed_at: u64,
        // Armed while a frame waits; boxed as few streams ever need one.
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Watched<F> {
    fn new(stream: F, limit: Duration) -> Self {
        let progress = Arc::new(Progress::default());
        Self {
            stream: STREAM_PROGRESS.scope(progress.clone(), stream),
            progress,
            limit,
            armed_at: 0,
            stalled: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.project();
        if me.stream.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let now = me.progress.0.load(Ordering::Relaxed);
        if now & 1 == 0 {
            // Waiting for the answer, or no answer yet.
            *me.stalled = None;
            return Poll::Pending;
        }
        let limit = *me.limit;
        match me.stalled {
            Some(timer) if *me.armed_at == now => {
                if timer.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        "an h2c client took none of its answer for {} s: its stream is reset",
                        limit.as_secs()
                    );
                    // Ending the task drops the stream.
                    return Poll::Ready(());
                }
            }
            // A frame given since: waited for from now.
            timer => {
                *me.armed_at = now;
                let deadline = Instant::now() + limit;
                let timer = match timer {
                    Some(timer) => {
                        timer.as_mut().reset(deadline);
                        timer
                    }
                    None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                // Registers the wake-up (a timer just armed is not due).
                let _ = timer.as_mut().poll(cx);
            }
        }
        Poll::Pending
    }
}

/// One open stream of an h2c connection, counted from its request head until its response
/// body is dropped (sent whole, or reset).
struct OpenStream(Arc<watch::Sender<usize>>);

impl OpenStream {
    fn new(open: Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        Self(open)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

pin_project! {
    /// A response body that keeps its stream counted as open, and tells its [`Watched`] task
    /// whether a frame it gave waits for the client.
    struct Tracked<B> {
        #[pin]
        inner: B,
        _stream: OpenStream,
        progress: Option<Arc<Progress>>,
        // The times hyper asked for a frame.
        polls: u64,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let me = self.project();
        let Some(progress) = me.progress else {
            return me.inner.poll_frame(cx);
        };
        *me.polls += 1;
        let asked = *me.polls << 1;
        progress.0.store(asked, Ordering::Relaxed);
        let polled = me.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = polled {
            // hyper holds it until the stream has send capacity, then asks again.
            progress.0.store(asked | 1, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the gateway on `listener` until `signal` resolves, then shuts down as `drain` says:
/// new connections are still served for its delay, then refused; in-flight requests get until
/// its grace (from the signal); what still runs then is cut, its log lines and spans written,
/// before this returns.
pub async fn serve_gateway(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    signal: impl Future<Output = ()>,
    drain: Drain,
) {
    let (phase, watching) = watch::channel(Phase::Serving);
    let stops = Arc::new(Stops::default());
    let mut connections = JoinSet::new();
    let mut intake = Intake::new(&gateway);
    accept_until(
        &listener,
        &gateway,
        &watching,
        &stops,
        &mut connections,
        &mut intake,
        signal,
    )
    .await;
    let signalled = Instant::now();
    let deadline = signalled + drain.grace;
    // The delay is part of the grace.
    let delay = drain.delay.min(drain.grace);
    if !delay.is_zero() {
        tracing::info!(
            delay_secs = delay.as_secs(),
            grace_secs = drain.grace.as_secs(),
            "shutting down: still serving new requests for the drain delay"
        );
        let delay_over = tokio::time::sleep_until(signalled + delay);
        accept_until(
            &listener,
            &gateway,
            &watching,
            &stops,
            &mut connections,
            &mut intake,
            delay_over,
        )
        .await;
    }
    // New connections are refused from now on, not left waiting unanswered for the grace.
    drop(listener);
    tracing::info!(
        grace_secs = drain.grace.as_secs(),
        "shutting down: new connections refused, waiting for in-flight requests"
    );
    let _ = phase.send(Phase::Stopping);
    stops.each(h1::Stop::stop);
    // WebSocket sessions left their connections when they upgraded: waited for apart.
    let all_ended = async |connections: &mut JoinSet<()>| {
        while connections.join_next().await.is_some() {}
        gateway.sessions.all_ended().await;
    };
    if tokio::time::timeout_at(deadline, all_ended(&mut connections))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = drain.grace.as_secs(),
            connections = connections.len(),
            websocket_sessions = gateway.sessions.open(),
            "in-flight requests did not finish in time: cut"
        );
        let _ = phase.send(Phase::Cut);
        stops.each(h1::Stop::cut);
        gateway.sessions.end_all();
        if tokio::time::timeout(CUT_WITHIN, all_ended(&mut connections))
            .await
            .is_err()
        {
            connections.shutdown().await;
        }
    }
}

/// Accepts gateway connections into `connections` until `until` resolves. While `accept`
/// fails (out of file descriptors, say) it pauses as [`AcceptFailures`] says, and tries again
/// [`AFTER_A_CONNECTION_ENDED`] after a connection ends (which frees a descriptor).
async fn accept_until(
    listener: &TcpListener,
    gateway: &Arc<Gateway>,
    phase: &watch::Receiver<Phase>,
    stops: &Arc<Stops>,
    connections: &mut JoinSet<()>,
    intake: &mut Intake,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    let pause = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(pause);
    let mut paused = false;
    loop {
        tokio::select! {
            accepted = listener.accept(), if !paused => match accepted {
                Ok((stream, _peer)) => {
                    intake.failures.accepted();
                    // WebSocket sessions left their connection's task, and hold its socket.
                    let open = connections.len() + gateway.sessions.open();
                    if open >= intake.max {
                        intake.refuse(stream, open);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        stream,
                        gateway.clone(),
                        phase.clone(),
                        stops.clone(),
                    ));
                }
                Err(e) => {
                    pause.as_mut().reset(Instant::now() + intake.failures.failed(&e));
                    paused = true;
                }
            },
            () = &mut pause, if paused => paused = false,
            // Reaped as they end, so the set holds the open connections only.
            // A connection that ended freed a descriptor: try again soon, not at once, so the
            // connections ending with it free theirs too (taken at once, the client would get
            // the only descriptor and its upstream connect none: a 502).
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                let soon = Instant::now() + AFTER_A_CONNECTION_ENDED;
                if paused && pause.deadline() > soon {
                    pause.as_mut().reset(soon);
                }
            }
            () = &mut until => return,
        }
    }
}

/// How soon a paused accept loop tries again once a connection ended.
const AFTER_A_CONNECTION_ENDED: Duration = Duration::from_millis(20);

/// Connections over `--max-connections` being answered at once at most; more are closed
/// unanswered.
const MAX_REFUSING: usize = 64;

/// How long a connection over `--max-connections` is kept for its answer to reach the client.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);

/// What the gateway port's accept loops keep from one to the next: its failed accepts, and the
/// connections it refuses over `--max-connections`.
struct Intake {
    failures: AcceptFailures,
    /// `--max-connections`.
    max: usize,
    /// The refusals, for their log lines.
    refusals: Tally,
    counted: prometheus_client::metrics::counter::Counter,
    /// The refusals being answered now, at most [`MAX_REFUSING`].
    refusing: Arc<Semaphore>,
    /// The answer of a refusal: a whole HTTP/1.1 response.
    answer: Bytes,
}

impl Intake {
    fn new(gateway: &Gateway) -> Self {
        let max = gateway.max_connections.max(1);
        let refused = GatewayError::TooManyConnections { max };
        let json = refused.to_json();
        let answer = format!(
            "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{json}",
            refused.status(),
            json.len()
        );
        Self {
            failures: AcceptFailures::new("gateway", gateway.metrics.accept_failures("gateway")),
            max,
            refusals: Tally::default(),
            counted: gateway.metrics.connections_refused(),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            answer: Bytes::from(answer),
        }
    }

    /// Refuses a connection taken while `open` others are: answered 503/2112 before its request
    /// is read (no log line, no `cf-aig-log-id`), counted, and said in the log at a bounded rate.
    fn refuse(&mut self, stream: TcpStream, open: usize) {
        self.counted.inc();
        if let Some(refused) = self.refusals.count(Instant::now()) {
            tracing::warn!(
                open,
                max = self.max,
                refused,
                "client connection refused (503, code 2112): --max-connections are open (this line at most every {} s, refused since the last)",
                descriptors::SAY_EVERY.as_secs()
            );
        }
        // A flood of them must not hold descriptors in turn: past the few being answered, the
        // rest are closed at once.
        let Ok(slot) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let answer = self.answer.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSE_WITHIN, refuse(stream, &answer)).await;
            drop(slot);
        });
    }
}

/// Writes `answer` to a connection and closes it once its client has closed its side: closed
/// with the client's request unread, the connection would be reset, and the reset could
/// discard the answer before the client reads it.
async fn refuse(mut stream: TcpStream, answer: &[u8]) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(answer).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Most admin connections served at once; more are closed at once. The admin port listens
/// beyond loopback (for the kubelet's probes and metrics scrapers), so whoever reaches it must
/// not be able to hold the sidecar's memory or file descriptors.
const ADMIN_MAX_CONNECTIONS: usize = 128;

/// How long an admin connection may take to send a request head (or sit idle between two).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest admin request head: its requests are `GET`s without a body.
const ADMIN_MAX_BUF: usize = 16 * 1024;

/// Serves the admin endpoints on `listener` forever.
pub async fn serve_admin(listener: TcpListener, gateway: Arc<Gateway>) {
    let slots = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let mut failures = AcceptFailures::new("admin", gateway.metrics.accept_failures("admin"));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failures.accepted();
                accepted
            }
            Err(e) => {
                tokio::time::sleep(failures.failed(&e)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection closed: {ADMIN_MAX_CONNECTIONS} already open");
            continue;
        };
        let gw = gateway.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin::handle(gw.clone(), req));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .max_buf_size(ADMIN_MAX_BUF)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// The gateway port's listen backlog: connections the kernel completes before the gateway
/// takes them. With 128 (std's and tokio's), a burst of 2000 connects on a cold sidecar
/// overflowed it into 1 s SYN retransmits. The kernel caps it at `net.core.somaxconn` (4096
/// since Linux 5.4; nginx asks for 511).
pub const GATEWAY_BACKLOG: u32 = 1024;

/// The admin port's listen backlog: probes and scrapes, a few clients.
pub const ADMIN_BACKLOG: u32 = 128;

/// Binds a listener with a listen `backlog`, naming the address in the error.
///
/// `[::]` is one dual-stack socket on Linux (`net.ipv6.bindv6only=0`, the default), reachable
/// from IPv4 and IPv6: the injected admin listener uses it so kubelet probes reach it in IPv4,
/// IPv6 and dual-stack clusters. On a kernel without IPv6 it falls back to `0.0.0.0`.
pub async fn bind(addr: SocketAddr, what: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let bound = match listen(addr, backlog) {
        Err(e) if no_ipv6(addr, &e) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, fallback = %v4, error = %e, "no IPv6 here; listening on IPv4 only ({what})");
            listen(v4, backlog)
        }
        bound => bound,
    };
    bound.map_err(|e| {
        // In a pod the other process is another of its containers, which the webhook cannot
        // see when it does not declare the port (a declared one has the pod refused).
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another process listens there (in a pod, another of its containers): give the sidecar free ports (in Kubernetes, the AIGateway's spec.sidecar.port and spec.sidecar.adminPort)"
        } else {
            ""
        };
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} ({what}): {e}{hint}"),
        )
    })
}

/// A listener on `addr` as `TcpListener::bind` makes one (`SO_REUSEADDR`, so a restart binds
/// while the last one's connections linger), with a listen `backlog` of its own.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Whether binding `addr` failed because the kernel has no IPv6 (booted with `ipv6.disable=1`:
/// EAFNOSUPPORT at socket creation, or EADDRNOTAVAIL), for the IPv6 unspecified address only.
fn no_ipv6(addr: SocketAddr, e: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97; // Linux
    addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && (e.raw_os_error() == Some(EAFNOSUPPORT)
            || e.kind() == std::io::ErrorKind::AddrNotAvailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_bytes_that_are_a_part_of_the_preface_are_waited_on_and_handed_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cases: [(&[&[u8]], bool); 4] = [
            (
                &[b"P", b"RI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n\0\0\0\x04"],
                true,
            ),
            (&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], true),
            (&[b"P", b"OST / HTTP/1.1\r\n\r\n"], false),
            (&[b"PRI", b""], false),
        ];
        for (parts, h2) in cases {
            let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
            let mut client = client.expect("connect");
            let (server, _) = accepted.expect("accept");
            let sent = parts.concat();
            let writer = tokio::spawn(async move {
                for part in parts {
                    client.write_all(part).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Closed after the last part (the `PRI` case ends so).
                client.shutdown().await.expect("shutdown");
                client
            });
            let (decided, first) = speaks_h2(&server).await.expect("first bytes");
            assert_eq!(decided, h2, "{:?}", String::from_utf8_lossy(&sent));
            let _client = writer.await.expect("writer");
            // The protocol's reader gets every byte, those read to decide first.
            let mut replayed = WriteStall::new(server, Duration::from_secs(5), first);
            let mut got = Vec::new();
            replayed.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, sent);
        }
    }

    #[test]
    fn a_tracked_body_marks_a_frame_given_until_it_is_asked_for_the_next() {
        let progress = Arc::new(Progress::default());
        let mut body = std::pin::pin!(Tracked {
            inner: http_body_util::Full::new(bytes::Bytes::from_static(b"x")),
            _stream: OpenStream::new(Arc::new(watch::channel(0).0)),
            progress: Some(progress.clone()),
            polls: 0,
        });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(progress.0.load(Ordering::Relaxed), 2 | 1, "a frame waits");
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(progress.0.load(Ordering::Relaxed), 4, "taken, none waits");
    }

    /// Marks a frame given (the `n`th time the body was asked) in the running stream task.
    fn frame_given(n: u64) {
        STREAM_PROGRESS.with(|p| p.0.store(n << 1 | 1, Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_once_a_frame_of_its_answer_waited_the_limit() {
        let limit = Duration::from_secs(10);
        let started = Instant::now();
        Watched::new(
            async {
                frame_given(1);
                std::future::pending::<()>().await
            },
            limit,
        )
        .await;
        assert_eq!(started.elapsed(), limit);

        // Frames taken every 9 s: the answer moves.
        let moving = Watched::new(
            async {
                for n in 1.. {
                    frame_given(n);
                    tokio::time::sleep(Duration::from_secs(9)).await;
                }
            },
            limit,
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(100), moving)
                .await
                .is_err()
        );

        // Waiting for its answer (a slow provider), or between frames: not the client's fault.
        let waiting = Watched::new(std::future::pending::<()>(), limit);
        assert!(
            tokio::time::timeout(Duration::from_secs(100), waiting)
                .await
                .is_err()
        );
        let between = Watched::new(
            async {
                frame_given(1);
                STREAM_PROGRESS.with(|p| p.0.store(4, Ordering::Relaxed));
                std::future::pending::<()>().await
            },
            limit,
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(100), between)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn the_ipv6_unspecified_address_takes_ipv4_and_ipv6_clients() {
        let listener = bind("[::]:0".parse().expect("addr"), "test", 128)
            .await
            .expect("bind [::]");
        let port = listener.local_addr().expect("local addr").port();
        for client in ["127.0.0.1", "::1"] {
            let ip: std::net::IpAddr = client.parse().expect("ip");
            let (connected, accepted) = tokio::join!(
                tokio::net::TcpStream::connect((ip, port)),
                listener.accept()
            );
            connected.unwrap_or_else(|e| panic!("connect from {client}: {e}"));
            accepted.unwrap_or_else(|e| panic!("accept from {client}: {e}"));
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_refused_saying_how_to_free_the_sidecars_ports() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let e = bind(addr, "gateway", GATEWAY_BACKLOG)
            .await
            .expect_err("in use");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot listen on {addr} (gateway): "))
                && text.contains("another of its containers")
                && text.contains("spec.sidecar.port and spec.sidecar.adminPort"),
            "{text}"
        );
    }

    #[test]
    fn only_a_missing_ipv6_stack_falls_back_to_ipv4() {
        let any6: SocketAddr = "[::]:8788".parse().expect("addr");
        let no_family = std::io::Error::from_raw_os_error(97); // EAFNOSUPPORT
        let not_available = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert!(no_ipv6(any6, &no_family));
        assert!(no_ipv6(any6, &not_available));
        assert!(
            !no_ipv6(any6, &in_use),
            "a port in use is an error, not a fallback"
        );
        for other in ["0.0.0.0:8788", "[::1]:8788", "127.0.0.1:8788"] {
            let addr: SocketAddr = other.parse().expect("addr");
            assert!(!no_ipv6(addr, &no_family), "{other} is bound as asked");
        }
    }
}
