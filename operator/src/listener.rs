//! What the operator's HTTP listeners (admin, webhook) share so that no client can wear them
//! out: a bound on open connections, a deadline on each request's headers (which also closes
//! idle keep-alive connections), and a growing pause after a failed `accept` (EMFILE would
//! otherwise spin the loop), said in the log at a bounded rate and counted in
//! `sidegate_operator_accept_failures_total{listener}`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// First pause after a failed `accept`; doubled on each failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after failed `accept`s.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Shortest time between two log lines of one recurring event of a listener.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// A recurring event said in the log at a bounded rate: its first occurrence at once, then at
/// most one line per [`SAY_EVERY`], with how many there were since the last.
#[derive(Debug, Default)]
struct Tally {
    said_at: Option<Instant>,
    unsaid: u64,
}

impl Tally {
    /// Counts one occurrence at `now`: `Some(n)` when a line is due, `n` the occurrences since
    /// the last line (this one included).
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.unsaid += 1;
        if self
            .said_at
            .is_some_and(|at| now.duration_since(at) < SAY_EVERY)
        {
            return None;
        }
        self.said_at = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// The failed `accept`s of one listener: the pause before the next, their log lines and their
/// count.
#[derive(Debug)]
struct AcceptFailures {
    listener: &'static str,
    pause: Duration,
    tally: Tally,
    counted: Counter,
}

impl AcceptFailures {
    /// No failure yet on `listener` (its name in logs), counted into `counted`.
    fn new(listener: &'static str, counted: Counter) -> Self {
        Self {
            listener,
            pause: ACCEPT_BACKOFF_MIN,
            tally: Tally::default(),
            counted,
        }
    }

    /// A connection was taken: the next failure pauses the least again.
    fn accepted(&mut self) {
        self.pause = ACCEPT_BACKOFF_MIN;
    }

    /// Counts a failed `accept`, says it when a line is due, and returns the pause to take
    /// before the next.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.counted.inc();
        let pause = self.pause;
        self.pause = (pause * 2).min(ACCEPT_BACKOFF_MAX);
        if let Some(failures) = self.tally.count(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                error = %error,
                failures,
                retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "accept failed: new connections wait in the backlog (this line at most every {} s, failures since the last)",
                SAY_EVERY.as_secs()
            );
        }
        pause
    }
}

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (TLS handshake included on the webhook),
    /// and that a keep-alive connection may stay idle.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in.
    pub body_read_timeout: Duration,
}

impl Limits {
    /// The webhook's: the apiserver's calls last at most `timeoutSeconds` (5 by default, 30 at
    /// most), so its bodies arrive within seconds.
    pub const WEBHOOK: Self = Self {
        max_connections: 1024,
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(10),
    };
    /// The admin listener's: probes and metrics scrapes, a few clients.
    pub const ADMIN: Self = Self {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(10),
    };
}

/// An HTTP/1 connection builder that enforces `limits.header_read_timeout`.
pub fn http1(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
}

/// Accepts connections on `listener` for ever, at most `limits.max_connections` served at once,
/// and spawns `serve` for each; `name` names the listener in logs, and `failures` counts its
/// failed `accept`s.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    failures: Counter,
    serve: S,
) where
    S: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut failures = AcceptFailures::new(name, failures);
    let mut full = Tally::default();
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(times) = full.count(Instant::now()) {
                    tracing::warn!(
                        listener = name,
                        max = limits.max_connections,
                        times,
                        "connection limit reached; new connections wait until one closes (this line at most every {} s, times since the last)",
                        SAY_EVERY.as_secs()
                    );
                }
                // The semaphore is never closed.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                permit
            }
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                failures.accepted();
                let connection = serve(stream, peer);
                tokio::spawn(async move {
                    connection.await;
                    drop(permit);
                });
            }
            Err(e) => {
                drop(permit);
                tokio::time::sleep(failures.failed(&e)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Limits = Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
    };

    /// A listener answering every request with "ok", under `limits`.
    async fn ok_server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let failures = Counter::default();
        tokio::spawn(accept_loop(
            listener,
            limits,
            "test",
            failures,
            move |stream, _| {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                async move {
                    let _ = http1(&limits)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                }
            },
        ));
        addr
    }

    /// Reads until the server closes the connection (or 5 s pass: a failure).
    async fn closed_after(stream: &mut TcpStream) -> Option<Duration> {
        let start = std::time::Instant::now();
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await {
            Ok(_) => Some(start.elapsed()),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_closed_after_the_header_timeout() {
        let addr = ok_server(SHORT).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let closed = closed_after(&mut silent)
            .await
            .expect("closed by the server");
        assert!(closed >= Duration::from_millis(250), "{closed:?}");

        // Half a request line, then nothing: the same.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert!(closed_after(&mut slow).await.is_some(), "slow headers");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_are_served_once_one_closes() {
        let addr = ok_server(SHORT).await;
        // Two silent connections take both permits until their header timeout closes them.
        let _a = TcpStream::connect(addr).await.expect("connect");
        let _b = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.expect("connect (backlog)");
        let start = std::time::Instant::now();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), third.read_to_string(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "served only after a permit was freed: {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_recurring_event_is_said_at_once_then_at_most_every_ten_seconds_with_its_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut tally = Tally::default();
        assert_eq!(tally.count(at(0)), Some(1), "the first at once");
        // 20 s of an event every 50 ms: a line at 10 s and one at 20 s, each with its count.
        let said: Vec<u64> = (1..=400u64)
            .filter_map(|i| tally.count(at(i * 50)))
            .collect();
        assert_eq!(said, [200, 200]);
        // Quiet for a while, then once more: said at once, with the one left unsaid since.
        assert_eq!(tally.count(at(20_049)), None);
        assert_eq!(tally.count(at(60_000)), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_5_ms_doubling_to_1_s_until_one_succeeds_and_are_counted() {
        let counted = Counter::default();
        let mut failures = AcceptFailures::new("test", counted.clone());
        let emfile = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<u128> = (0..10)
            .map(|_| failures.failed(&emfile).as_millis())
            .collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        failures.accepted();
        assert_eq!(failures.failed(&emfile), ACCEPT_BACKOFF_MIN);
        assert_eq!(counted.get(), 11);
    }
}
