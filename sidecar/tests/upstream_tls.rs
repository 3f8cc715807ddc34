//! The upstream client speaks TLS with certificate verification, HTTP/1.1 with keep-alive even
//! when the upstream also offers HTTP/2 (as the providers do), with the stored key injected.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sidegate::config::{self, Sources};
use sidegate::proxy::{Gateway, upstream_client};
use sidegate::telemetry::Metrics;
use sidegate::{reload, server};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

mod common;
use common::{Counting, read_head};

const KEY: &str = "sk-sgtestkey-tls-upstream";

/// A CA and a server config for 127.0.0.1 signed by it, offering h2 and http/1.1.
fn tls_upstream() -> (CertificateDer<'static>, Arc<rustls::ServerConfig>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("sign leaf");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca.der().clone(), Arc::new(cfg))
}

/// Answers with the HTTP version, authorization header and body length it saw.
async fn upstream(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (version, path) = (format!("{:?}", req.version()), req.uri().path().to_owned());
    let len = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let body = serde_json::json!({"version": version, "authorization": auth, "path": path, "body_len": len});
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

/// Starts the TLS upstream; returns its port, its CA and a count of the connections it accepted.
async fn start_upstream() -> (u16, CertificateDer<'static>, Arc<AtomicUsize>) {
    let (ca, cfg) = tls_upstream();
    let listener = Counting::bind().await;
    let (port, accepted) = (listener.port(), listener.accepted());
    let acceptor = TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Some(tcp) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(upstream))
                    .await;
            });
        }
    });
    (port, ca, accepted)
}

/// Starts a gateway whose openai provider is the TLS upstream; returns its address.
async fn start_gateway(
    dir: &std::path::Path,
    upstream_port: u16,
    extra_roots: Vec<CertificateDer<'static>>,
) -> String {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    std::fs::write(keys.join("openai.default"), KEY).expect("key");
    let cfg = dir.join("gateway.yaml");
    std::fs::write(
        &cfg,
        format!("schemaVersion: 1\nspec:\n  providers:\n    openai: {{baseURL: 'https://127.0.0.1:{upstream_port}/v1'}}\n"),
    )
    .expect("config");
    let sources = Sources {
        config: cfg,
        keys_dir: Some(keys),
    };
    let gw = Arc::new(Gateway::new(
        Arc::new(Metrics::new()),
        upstream_client(extra_roots).expect("client"),
    ));
    reload::install(&gw, config::load(&sources).expect("config loads"));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(server::serve_gateway(
        listener,
        gw,
        std::future::pending(),
        server::Drain::grace(Duration::from_secs(1)),
    ));
    addr
}

async fn post(addr: &str) -> (StatusCode, serde_json::Value) {
    post_body(addr, Bytes::from_static(b"{}")).await
}

async fn post_body(addr: &str, body: Bytes) -> (StatusCode, serde_json::Value) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{addr}/openai/chat/completions"))
        .header("authorization", "Bearer placeholder")
        .body(Full::new(body))
        .expect("request");
    let resp = client.request(req).await.expect("gateway answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).expect("json body"))
}

#[tokio::test]
async fn https_upstreams_get_http1_keep_alive_and_the_stored_key() {
    let (port, ca, accepted) = start_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start_gateway(dir.path(), port, vec![ca]).await;
    for _ in 0..3 {
        let (status, body) = post(&gw).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], "HTTP/1.1");
        assert_eq!(body["authorization"], format!("Bearer {KEY}"));
        assert_eq!(body["path"], "/v1/chat/completions");
    }
    // Sequential requests share one kept-alive TLS connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // A long prompt, more than one TLS record and than a socket write may take: whole, on the
    // same connection.
    let large =
        serde_json::json!({"messages": [{"role": "user", "content": "x".repeat(3_000_000)}]});
    let large = Bytes::from(large.to_string());
    let (status, body) = post_body(&gw, large.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["body_len"], large.len());
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(body["authorization"], format!("Bearer {KEY}"));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_certificate_from_an_unknown_ca_is_refused() {
    let (port, _ca, _) = start_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start_gateway(dir.path(), port, Vec::new()).await;
    let (status, body) = post(&gw).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"][0]["code"], 2104);
    let msg = body["error"][0]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("certificate") || msg.contains("Unknown"),
        "{msg}"
    );
    assert!(!msg.contains(KEY));
}

#[tokio::test]
async fn over_tls_an_answer_before_the_body_is_read_is_the_response() {
    use tokio::io::AsyncWriteExt;
    // Reads the request head only, answers 413 at once and stops reading (connection held).
    let (ca, cfg) = tls_upstream();
    let listener = Counting::bind().await;
    let port = listener.port();
    let acceptor = TlsAcceptor::from(cfg);
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(tcp) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if !read_head(&mut tls, &mut [0u8; 16384]).await {
                continue;
            }
            let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
            if tls.write_all(answer).await.is_ok() && tls.flush().await.is_ok() {
                let _ = held_tx.send(tls);
            }
        }
    });
    let client = upstream_client(vec![ca]).expect("client");
    let req = Request::post(format!("https://127.0.0.1:{port}/v1/chat/completions"))
        .body(Full::new(Bytes::from(vec![b'x'; 32 << 20])))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("no hang on a blocked write")
        .expect("the early answer");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"too large");
    assert_eq!(client.idle_connections(), 0);
    assert!(held_rx.recv().await.is_some());
}
