//! The admin listener: `/healthz` (process alive), `/readyz` and `/metrics` (Prometheus text).
//!
//! `/readyz` turns ready once the start-up checks passed and the webhook serves, and stays so in
//! every role (leader, standby, a leader that lost its Lease and stands by again) and through
//! later apiserver outages, since the webhook still answers then: every replica unready at once
//! would leave the webhook Service without endpoints. It is unready while starting (the
//! apiserver may be away; the process waits for it rather than exiting) and from SIGTERM on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::listener::Limits;
use crate::metrics::Metrics;

/// What the admin endpoints report.
#[derive(Default)]
pub struct AdminState {
    /// Whether `/readyz` reports ready (see the module doc).
    pub ready: AtomicBool,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
}

/// Serves the admin endpoints (HTTP/1.1, as kubelet probes and Prometheus scrape) on `listener`
/// until the task is dropped, within [`Limits::ADMIN`].
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    serve_within(listener, state, Limits::ADMIN).await;
}

async fn serve_within(listener: TcpListener, state: Arc<AdminState>, limits: Limits) {
    let failures = state.metrics.accept_failures("admin");
    crate::listener::accept_loop(listener, limits, "admin", failures, move |stream, _| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&req, &state)) }
            });
            if let Err(e) = crate::listener::http1(&limits)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
}

/// Binds a listener of the operator (admin, webhook).
///
/// `[::]` (the default) is one dual-stack socket on Linux (`net.ipv6.bindv6only=0`, the
/// default), reachable from IPv4 and IPv6, so probes and the apiserver reach the pod in IPv4,
/// IPv6 and dual-stack clusters. On a kernel without IPv6 it falls back to `0.0.0.0`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if no_ipv6(addr, &e) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, fallback = %v4, error = %e, "no IPv6 here; listening on IPv4 only");
            TcpListener::bind(v4).await
        }
        bound => bound,
    }
}

/// Whether binding `addr` failed because the kernel has no IPv6 (booted with `ipv6.disable=1`:
/// EAFNOSUPPORT at socket creation, or EADDRNOTAVAIL), for the IPv6 unspecified address only.
fn no_ipv6(addr: SocketAddr, e: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97; // Linux
    addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && (e.raw_os_error() == Some(EAFNOSUPPORT)
            || e.kind() == std::io::ErrorKind::AddrNotAvailable)
}

fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        resp
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        // RFC 9110 15.5.6: a 405 names the methods the resource has.
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET and HEAD only\n".into(),
            "text/plain",
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            text(StatusCode::OK, "ok\n".into(), "text/plain")
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting (waiting for the apiserver) or shutting down\n".into(),
            "text/plain",
        ),
        "/metrics" => match state.metrics.encode() {
            Ok(body) => text(
                StatusCode::OK,
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n".into(),
                "text/plain",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_admin_client_that_sends_nothing_is_closed_after_the_header_timeout() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            header_read_timeout: std::time::Duration::from_millis(300),
            ..Limits::ADMIN
        };
        tokio::spawn(serve_within(listener, Arc::default(), limits));

        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            silent.read_to_end(&mut buf),
        )
        .await
        .expect("closed by the server within the header timeout")
        .expect("read");
        assert!(buf.is_empty(), "{buf:?}");

        // A client that asks is still answered.
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn head_is_answered_as_get_and_other_methods_are_told_which_are_allowed() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_within(listener, Arc::default(), Limits::ADMIN));
        let ask = |request: String| async move {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            client.write_all(request.as_bytes()).await.expect("write");
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.expect("read");
            answer
        };
        let head =
            ask("HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {head}"
        );
        for method in ["POST", "PUT", "DELETE"] {
            let request = format!(
                "{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let answer = ask(request).await;
            assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("\r\nallow: get, head\r\n"),
                "{method}: {answer}"
            );
        }
    }

    #[tokio::test]
    async fn the_default_address_takes_ipv4_and_ipv6_clients() {
        let listener = bind("[::]:0".parse().expect("addr"))
            .await
            .expect("bind [::]");
        let port = listener.local_addr().expect("local addr").port();
        for client in [
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ] {
            let client: std::net::IpAddr = client;
            let (connected, accepted) = tokio::join!(
                tokio::net::TcpStream::connect((client, port)),
                listener.accept()
            );
            connected.unwrap_or_else(|e| panic!("connect from {client}: {e}"));
            accepted.unwrap_or_else(|e| panic!("accept from {client}: {e}"));
        }
        let no_family = std::io::Error::from_raw_os_error(97); // EAFNOSUPPORT
        assert!(no_ipv6("[::]:8080".parse().expect("addr"), &no_family));
        assert!(!no_ipv6("[::1]:8080".parse().expect("addr"), &no_family));
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert!(!no_ipv6("[::]:8080".parse().expect("addr"), &in_use));
    }
}
