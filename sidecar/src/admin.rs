//! Admin endpoints on their own port: `/healthz` (process alive), `/readyz` (a valid config is
//! loaded), `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::proxy::Gateway;

/// Serves one admin request.
pub async fn handle<B>(
    gw: Arc<Gateway>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match req.uri().path() {
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
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    Ok(resp)
}
