//! `mock-provider`: the local mock LLM provider as a process.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sidegate_mock_provider::{Options, serve_with_shutdown};

const ABOUT: &str =
    "Local mock LLM provider speaking the OpenAI, Anthropic, Gemini and Bedrock wire formats";

const LONG_ABOUT: &str = "\
Local mock LLM provider speaking the OpenAI, Anthropic, Gemini and Bedrock wire formats, for sidegate's
tests, demo and benchmarks. HTTP/1.1 (keep-alive) and h2c on one port, or HTTPS (h2 and http/1.1
by ALPN) with --tls-dir.

After binding it prints exactly one line to stdout, `listening on 127.0.0.1:PORT`, then
serves until SIGTERM or SIGINT.

Routes (matched on the path suffix, so any provider prefix works):
  POST .../chat/completions       OpenAI chat.completion; SSE chunks with \"stream\": true
  POST .../embeddings             OpenAI embeddings (8 deterministic floats per input)
  GET  .../models                 model list (Anthropic shape if anthropic-version is sent)
                                  (these need Authorization: Bearer KEY, or api-key on Azure's
                                  .../openai/deployments/... and .../openai/v1/... paths, else 401
                                  in OpenAI's or Azure's error shape; models with
                                  anthropic-version needs x-api-key)
  POST .../messages               Anthropic Message; Anthropic SSE with \"stream\": true
  POST .../messages/count_tokens  Anthropic token count
                                  (both need x-api-key, else 401 in Anthropic's error shape; then
                                  anthropic-version, else 400; then model and messages, and
                                  max_tokens for messages, else 400, as Anthropic does)
  POST .../moderations            OpenAI moderation (flags <category> for input with
                                  mock-flag:<category>); no key needed
  POST .../models/M:generateContent, :streamGenerateContent, :batchEmbedContents, :predict
                                  Gemini (AI Studio, Vertex); needs x-goog-api-key or Authorization
  POST .../model/ID/converse, /converse-stream, /invoke
                                  Bedrock (event-stream framing); needs a SigV4 Authorization
  GET|DELETE /__mock/requests     recorded requests, oldest first / clear them
  GET|DELETE /__mock/stats        counters (requests, streams_cancelled, ...) / reset them

Keys are never checked, only their presence; --auth-header NAME adds a header taken as a key
on the OpenAI and Anthropic routes (a custom provider's authHeader).

Replies are \"mock reply to: <last user message, up to 200 chars>\"; JSON replies are
gzip-compressed for requests whose Accept-Encoding takes gzip, as the providers' CDNs do;
request bodies sent with Content-Encoding: gzip are decompressed before they are read.
Model \"mock-status-<code>\" (400..=599) returns that status with the endpoint's error
body (429 adds retry-after: 1); invalid JSON returns 400; unknown routes 404.
Request headers: x-mock-delay-ms delays the response head (overrides --delay-ms),
x-mock-chunk-delay-ms delays each event of a stream, x-mock-fail-first: N;ID[;STATUS]
answers the first N requests carrying that exact value with STATUS (default 503).";

#[derive(Parser, Debug)]
#[command(name = "mock-provider", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Delay of every response head, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Do not record requests (for benchmarks); /__mock/requests stays empty.
    #[arg(long)]
    no_record: bool,
    /// Name reported in the x-mock-name response header and /__mock/stats.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Worker threads (1 runs everything on a single thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Serve HTTPS (h2 and http/1.1 by ALPN, as the providers do) with DIR/server.pem and
    /// DIR/server.key. When DIR has neither, a CA (DIR/ca.pem, for clients to trust) and a
    /// certificate for 127.0.0.1, ::1 and localhost signed by it are made there first; a restart
    /// with the same DIR keeps the identity. Without it: plain HTTP/1.1 and h2c.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Also take header NAME as a key on the OpenAI and Anthropic routes, which otherwise want
    /// their own (Authorization: Bearer, Azure's api-key, x-api-key) and answer 401 without it;
    /// for custom providers with their own authHeader. Repeatable.
    #[arg(long = "auth-header", value_name = "NAME")]
    auth_headers: Vec<http::HeaderName>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = if cli.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cli.threads))
            .enable_all()
            .build()
    }
    .context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = cli.tls_dir.as_deref().map(tls_config).transpose()?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // Handlers are installed before announcing the address, so a signal sent right
    // after the line is read still shuts down cleanly.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}")
            .and_then(|()| stdout.flush())
            .context("writing the listening line")?;
    }
    let opts = Options {
        delay: Duration::from_millis(cli.delay_ms),
        record: !cli.no_record,
        name: cli.name,
        tls,
        auth_headers: cli.auth_headers,
    };
    serve_with_shutdown(listener, opts, shutdown)
        .await
        .context("serving")
}

/// The TLS server configuration of `dir` (made there first when missing), offering h2 and
/// http/1.1.
fn tls_config(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    if !cert.exists() && !key.exists() {
        make_pki(dir)?;
    }
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key)
        .with_context(|| format!("reading a private key from {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the certificate and key do not make a TLS server identity")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes a new CA (`ca.pem`) and a server certificate for the loopback names signed by it
/// (`server.pem`, `server.key`) into `dir`.
fn make_pki(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sidegate mock-provider CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let names = ["127.0.0.1", "::1", "localhost"].map(str::to_owned);
    let cert = CertificateParams::new(names)?.signed_by(&key, &ca)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A future completing on SIGINT or SIGTERM.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// A future completing on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
