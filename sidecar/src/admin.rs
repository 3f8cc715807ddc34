//! Admin endpoints on their own port: `/healthz` (process alive), `/readyz` (a valid config is
//! loaded), `/metrics` (OpenMetrics text); each answers `GET` and `HEAD` only.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::proxy::Gateway;

/// Serves one admin request.
pub async fn handle<B>(
    gw: Arc<Gateway>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read && matches!(path, "/healthz" | "/readyz" | "/metrics") {
        // RFC 9110 15.5.6: a 405 names the methods the resource has.
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("method not allowed: {path} answers GET and HEAD\n"),
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let (status, ctype, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => match gw.snapshot.load().as_ref() {
            Some(snap) => (
                StatusCode::OK,
                "text/plain",
                format!("ready {}\n", snap.hash()),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no valid config loaded\n".to_owned(),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gw.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics\n".to_owned(),
        ),
    };
    Ok(plain(status, ctype, body))
}

/// An answer of `status` with `body` of type `ctype`.
fn plain(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp
}
