//! Listeners: the gateway port (HTTP/1.1 keep-alive and h2c) and the admin port, with graceful
//! shutdown that lets in-flight requests finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin;
use crate::proxy::Gateway;

/// Largest request head (request line and headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The first bytes of an HTTP/2 connection with prior knowledge (h2c, RFC 9113 §3.3).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a new connection speaks, from its first bytes (peeked, so they stay in the
/// socket for the protocol's own reader): h2c when they are the HTTP/2 preface, else HTTP/1.
/// Deciding once per connection keeps the per-request path free of a rewind buffer.
async fn speaks_h2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        stream.readable().await?;
        let n = match stream.peek(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            // Closed, or HTTP/1 (`PUT`, `POST`, `PATCH` part ways with `PRI` by the 2nd byte):
            // the HTTP/1 reader answers either.
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A prefix of the preface: wait for more (peek returns what is there right away).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one gateway connection: HTTP/1.1 with keep-alive, or h2c.
/// `stopping` changes when the gateway shuts down: a connection that has not sent its first
/// bytes yet is closed then, like an idle keep-alive one.
async fn serve_connection(
    stream: TcpStream,
    gateway: Arc<Gateway>,
    watcher: Watcher,
    mut stopping: watch::Receiver<()>,
) {
    let silence = gateway.client_timeout;
    let h2 = tokio::select! {
        first = tokio::time::timeout(silence, speaks_h2(&stream)) => match first {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection ended before its first request");
                return;
            }
            Err(_) => return,
        },
        _ = stopping.changed() => return,
    };
    let service = service_fn(move |req| gateway.clone().handle(req));
    let io = TokioIo::new(stream);
    let result = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service);
        watcher.watch(conn).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(silence)
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(MAX_HEADER_BYTES)
            .keep_alive(true)
            .serve_connection(io, service);
        watcher.watch(conn).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then waits up to `grace` for
/// in-flight requests.
pub async fn serve_gateway(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let (stop, stopping) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            gateway.clone(),
            graceful.watcher(),
            stopping.clone(),
        ));
    }
    // New connections are refused from now on, not left waiting unanswered for the grace.
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    let _ = stop.send(());
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests did not finish in time"
        );
    }
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
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
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

/// Binds a listener, naming the address in the error.
///
/// `[::]` is one dual-stack socket on Linux (`net.ipv6.bindv6only=0`, the default), reachable
/// from IPv4 and IPv6: the injected admin listener uses it so kubelet probes reach it in IPv4,
/// IPv6 and dual-stack clusters. On a kernel without IPv6 it falls back to `0.0.0.0`.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let bound = match TcpListener::bind(addr).await {
        Err(e) if no_ipv6(addr, &e) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, fallback = %v4, error = %e, "no IPv6 here; listening on IPv4 only ({what})");
            TcpListener::bind(v4).await
        }
        bound => bound,
    };
    bound.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
    })
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
    async fn the_ipv6_unspecified_address_takes_ipv4_and_ipv6_clients() {
        let listener = bind("[::]:0".parse().expect("addr"), "test")
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
