//! Local mock LLM provider for sidegate's tests, demo and benchmarks.
//!
//! Speaks the OpenAI (Chat Completions, Embeddings, Models), Anthropic (Messages), Google
//! Gemini (generateContent, streamGenerateContent, embeddings) and AWS Bedrock (Converse,
//! ConverseStream with event-stream framing, InvokeModel embeddings) wire formats over
//! HTTP/1.1 and h2c, with deterministic replies, errors and delays
//! on demand, and a record of received requests. Start it in-process with [`serve`]
//! or [`serve_with_shutdown`], or run the `mock-provider` binary.
//!
//! Routes (matched on the path suffix, so any provider prefix works):
//!
//! | method | path ends with | answer |
//! |---|---|---|
//! | POST | `/chat/completions` | OpenAI `chat.completion`, or SSE chunks with `"stream": true` |
//! | POST | `/audio/transcriptions` | OpenAI transcription of a `multipart/form-data` upload |
//! | POST | `/embeddings` | OpenAI embedding list (8 dims, deterministic) |
//! | POST | `/token` | Google OAuth token for a service-account JWT (`jwt-bearer` grant): `ya29.mock-<iss>` |
//! | POST | `/moderations` | OpenAI moderation result: a category is flagged when the input contains `mock-flag:<category>` |
//! | GET | `/models` | OpenAI model list (Anthropic's shape with an `anthropic-version` header) |
//! | POST | `/messages` | Anthropic Message, or Anthropic SSE with `"stream": true` |
//! | POST | `/messages/count_tokens` | Anthropic `{"input_tokens": n}` |
//! | POST | `/models/{m}:generateContent`, `:streamGenerateContent`, `:embedContent`, `:batchEmbedContents`, `:predict` | Gemini |
//! | POST | `/model/{id}/converse`, `/converse-stream`, `/invoke` | Bedrock (SigV4 header required) |
//! | GET, DELETE | `/__mock/requests` | recorded requests (oldest first) / clear them |
//! | GET, DELETE | `/__mock/stats` | counters / reset them |
//!
//! Model `mock-status-<code>` (400..=599) answers that status with the endpoint's error
//! body. JSON answers are gzip-compressed for requests that accept gzip (as the providers'
//! CDNs do); a gzip request body (`Content-Encoding: gzip`) is decompressed before it is read
//! and recorded. Header `x-mock-delay-ms` delays the response head; `x-mock-chunk-delay-ms`
//! delays each stream event. Header `x-mock-fail-first: <n>;<id>[;<status>]` answers the first
//! `n` requests carrying that exact value with `status` (default 503), then normally: retries
//! can be tested without a flaky server.
//!
//! As the providers do, requests without the key their API wants get 401 in its error shape
//! (see the `auth` module); Anthropic Messages without `model`, `messages` or `max_tokens` get 400.

#![forbid(unsafe_code)]

mod anthropic;
mod auth;
pub mod bedrock;
mod body;
mod gemini;
mod openai;
pub mod record;
mod text;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;

pub use body::MockBody;
pub use record::{Record, Recorder};

/// Request header: `<n>;<id>[;<status>]`, fail the first `n` requests with this value.
pub const FAIL_FIRST_HEADER: &str = "x-mock-fail-first";
/// Request header: milliseconds to wait before sending the response head.
pub const DELAY_HEADER: &str = "x-mock-delay-ms";
/// Request header: milliseconds to wait before each event of a streamed response.
pub const CHUNK_DELAY_HEADER: &str = "x-mock-chunk-delay-ms";
/// Response header carrying [`Options::name`].
pub const NAME_HEADER: &str = "x-mock-name";

/// Largest request body accepted (413 beyond).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Upper bound for any requested delay.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Server settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Default delay of every response head; `x-mock-delay-ms` overrides it.
    pub delay: Duration,
    /// Keep the last 1000 requests for `GET /__mock/requests`.
    pub record: bool,
    /// Sent back in the `x-mock-name` response header and in `/__mock/stats`.
    pub name: String,
    /// Serve HTTPS with this configuration (offer `h2` and `http/1.1` through its ALPN
    /// protocols, as the providers do) instead of plain HTTP/1.1 and h2c.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// More headers taken as a credential on the OpenAI and Anthropic routes, besides each
    /// API's own (custom providers' `authHeader`).
    pub auth_headers: Vec<HeaderName>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            record: true,
            name: "mock".to_owned(),
            tls: None,
            auth_headers: Vec::new(),
        }
    }
}

/// Counters served by `GET /__mock/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Provider requests received (everything but `/__mock/*`).
    pub requests: AtomicU64,
    /// Streaming responses started.
    pub streams_started: AtomicU64,
    /// Streaming responses sent to the end.
    pub streams_completed: AtomicU64,
    /// Streaming responses whose client went away before the end.
    pub streams_cancelled: AtomicU64,
}

impl Stats {
    fn reset(&self) {
        for counter in [
            &self.requests,
            &self.streams_started,
            &self.streams_completed,
            &self.streams_cancelled,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

struct State {
    opts: Options,
    name_header: Option<HeaderValue>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    recorder: Option<Recorder>,
    /// Requests seen per `x-mock-fail-first` value.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// What a provider handler needs to know about the request besides its body.
pub(crate) struct Ctx<'a> {
    /// Sequence number of the request on this server, from 1.
    pub id: u64,
    pub chunk_delay: Option<Duration>,
    pub stats: &'a Arc<Stats>,
}

impl Ctx<'_> {
    pub fn request_id(&self) -> String {
        format!("req_mock_{}", self.id)
    }
}

/// Serves on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, opts: Options) -> io::Result<()> {
    serve_with_shutdown(listener, opts, std::future::pending()).await
}

/// Serves on `listener` until `shutdown` completes; then stops accepting and returns
/// (connections already open keep running on the runtime until it shuts down).
pub async fn serve_with_shutdown(
    listener: TcpListener,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let state = Arc::new(State {
        name_header: HeaderValue::try_from(opts.name.as_str()).ok(),
        recorder: opts.record.then(Recorder::new),
        opts,
        next_id: AtomicU64::new(0),
        stats: Arc::new(Stats::default()),
        failures: Default::default(),
    });
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let tls = state.opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or a connection reset before accept: back off
                // briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let builder = Arc::clone(&builder);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = match tls {
                // A failed handshake (a client that does not trust the CA) just ends the
                // connection.
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(_) => return,
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
        });
    }
}

#[derive(Clone, Copy)]
enum Route {
    ChatCompletions,
    Transcriptions,
    Embeddings,
    Moderations,
    Token,
    Models,
    Messages,
    CountTokens,
    Gemini(gemini::Method),
    Bedrock(bedrock::Action),
    Unknown,
}

impl Route {
    fn of(method: &Method, path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if *method == Method::POST {
            if let Some(m) = gemini::Method::of(path) {
                Self::Gemini(m)
            } else if let Some(a) = bedrock::Action::of(path) {
                Self::Bedrock(a)
            } else if path.ends_with("/chat/completions") {
                Self::ChatCompletions
            } else if path.ends_with("/audio/transcriptions") {
                Self::Transcriptions
            } else if path.ends_with("/embeddings") {
                Self::Embeddings
            } else if path.ends_with("/moderations") {
                Self::Moderations
            } else if path.ends_with("/token") {
                Self::Token
            } else if path.ends_with("/messages/count_tokens") {
                Self::CountTokens
            } else if path.ends_with("/messages") {
                Self::Messages
            } else {
                Self::Unknown
            }
        } else if *method == Method::GET && path.ends_with("/models") {
            Self::Models
        } else {
            Self::Unknown
        }
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    if let Some(rest) = parts.uri.path().strip_prefix("/__mock/") {
        return Ok(control(&state, &parts.method, rest));
    }

    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            let status = if err.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Ok(body::json_response(
                status,
                Bytes::from_static(br#"{"error":{"message":"could not read the request body","type":"invalid_request_error","param":null,"code":null}}"#),
            ));
        }
    };

    let body = match body::decoded_request(&parts.headers, body, MAX_BODY_BYTES) {
        Ok(body) => body,
        Err(why) => {
            return Ok(body::json_response(
                StatusCode::BAD_REQUEST,
                format!(
                    r#"{{"error":{{"message":"{why}","type":"invalid_request_error","param":null,"code":null}}}}"#
                ),
            ));
        }
    };

    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let route = Route::of(&parts.method, parts.uri.path());
    let delay = header_ms(&parts.headers, DELAY_HEADER).unwrap_or(state.opts.delay);
    let chunk_delay = header_ms(&parts.headers, CHUNK_DELAY_HEADER).filter(|d| !d.is_zero());
    let anthropic_version = parts.headers.contains_key("anthropic-version");
    // The API whose key the route wants, and whether the request brings one.
    let api = match route {
        Route::ChatCompletions | Route::Transcriptions | Route::Embeddings => {
            Some(auth::Api::openai_format(parts.uri.path()))
        }
        Route::Models if anthropic_version => Some(auth::Api::Anthropic),
        Route::Models => Some(auth::Api::openai_format(parts.uri.path())),
        Route::Messages | Route::CountTokens => Some(auth::Api::Anthropic),
        _ => None,
    };
    let keyless = api.filter(|api| !api.has_credential(&parts.headers, &state.opts.auth_headers));
    let gzip = body::accepts_gzip(&parts.headers);
    let fail_spec = parts
        .headers
        .get(FAIL_FIRST_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let unknown = matches!(route, Route::Unknown)
        .then(|| (parts.method.to_string(), parts.uri.path().to_owned()));
    // Gemini and Bedrock answers depend on the auth headers and the model in the path.
    let native = matches!(route, Route::Gemini(_) | Route::Bedrock(_))
        .then(|| (parts.headers.clone(), parts.uri.path().to_owned()));
    // A form upload is read by its boundary.
    let content_type = matches!(route, Route::Transcriptions).then(|| {
        parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    });

    if let Some(recorder) = &state.recorder {
        recorder.push(Record {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body: body.clone(),
        });
    }

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = fail_first(&state, &fail_spec) {
        return Ok(body::json_response(
            status,
            format!(
                r#"{{"error":{{"message":"mock failure (x-mock-fail-first)","type":"server_error","param":null,"code":"{}"}}}}"#,
                status.as_u16()
            ),
        ));
    }

    let ctx = Ctx {
        id,
        chunk_delay,
        stats: &state.stats,
    };
    let mut resp = match (keyless, route) {
        (Some(auth::Api::Anthropic), _) => anthropic::unauthorized(&ctx),
        (Some(api), _) => openai::unauthorized(&ctx, api),
        (None, Route::ChatCompletions) => openai::chat_completions(&ctx, &body),
        (None, Route::Transcriptions) => {
            openai::transcriptions(&ctx, content_type.as_deref().unwrap_or_default(), &body)
        }
        (None, Route::Embeddings) => openai::embeddings(&ctx, &body),
        (None, Route::Moderations) => openai::moderations(&ctx, &body),
        (None, Route::Token) => gemini::token(&ctx, &body),
        (None, Route::Models) if anthropic_version => anthropic::models(&ctx),
        (None, Route::Models) => openai::models(&ctx),
        // Anthropic refuses Messages calls without the API version header.
        (None, Route::Messages | Route::CountTokens) if !anthropic_version => {
            anthropic::version_required(&ctx)
        }
        (None, Route::Messages) => anthropic::messages(&ctx, &body),
        (None, Route::CountTokens) => anthropic::count_tokens(&ctx, &body),
        (None, Route::Gemini(m)) => {
            let (headers, path) = native.unwrap_or_default();
            gemini::handle(&ctx, m, &path, &headers, &body)
        }
        (None, Route::Bedrock(a)) => {
            let (headers, path) = native.unwrap_or_default();
            bedrock::handle(&ctx, a, &path, &headers, &body)
        }
        (None, Route::Unknown) => {
            let (method, path) = unknown.unwrap_or_default();
            openai::unknown_route(&ctx, &method, &path)
        }
    };
    if gzip {
        resp = body::gzip_json(resp);
    }
    if let Some(name) = &state.name_header {
        resp.headers_mut().insert(NAME_HEADER, name.clone());
    }
    Ok(resp)
}

/// The status to fail with when an `x-mock-fail-first: <n>;<id>[;<status>]` request is among
/// the first `n` with that value.
fn fail_first(state: &State, spec: &Option<String>) -> Option<StatusCode> {
    let spec = spec.as_deref()?;
    let mut parts = spec.split(';');
    let n: u32 = parts.next()?.trim().parse().ok()?;
    let _id = parts.next()?;
    let status = match parts.next() {
        Some(s) => StatusCode::from_u16(s.trim().parse().ok()?).ok()?,
        None => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut seen = state.failures.lock().unwrap_or_else(|e| e.into_inner());
    let count = seen.entry(spec.to_owned()).or_insert(0);
    *count += 1;
    (*count <= n).then_some(status)
}

/// A delay in milliseconds from a request header (capped at one hour).
fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let ms: u64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_DELAY))
}

/// `/__mock/*` endpoints: never recorded, counted or delayed.
fn control(state: &State, method: &Method, rest: &str) -> Response<MockBody> {
    #[derive(Serialize)]
    struct StatsView<'a> {
        name: &'a str,
        requests: u64,
        streams_started: u64,
        streams_completed: u64,
        streams_cancelled: u64,
        recording: bool,
    }
    #[derive(Serialize)]
    struct Cleared {
        cleared: usize,
    }

    match (method, rest.trim_end_matches('/')) {
        (&Method::GET, "requests") => match &state.recorder {
            Some(recorder) => body::json_response(StatusCode::OK, recorder.to_json()),
            None => body::json_response(StatusCode::OK, Bytes::from_static(b"[]")),
        },
        (&Method::DELETE, "requests") => body::json_ok(&Cleared {
            cleared: state.recorder.as_ref().map_or(0, Recorder::clear),
        }),
        (&Method::GET, "stats") => {
            let stats = &state.stats;
            body::json_ok(&StatsView {
                name: &state.opts.name,
                requests: stats.requests.load(Ordering::Relaxed),
                streams_started: stats.streams_started.load(Ordering::Relaxed),
                streams_completed: stats.streams_completed.load(Ordering::Relaxed),
                streams_cancelled: stats.streams_cancelled.load(Ordering::Relaxed),
                recording: state.recorder.is_some(),
            })
        }
        (&Method::DELETE, "stats") => {
            state.stats.reset();
            body::json_response(StatusCode::OK, Bytes::from_static(br#"{"reset":true}"#))
        }
        _ => body::json_response(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":{"message":"unknown mock control endpoint; use /__mock/requests or /__mock/stats","type":"invalid_request_error","param":null,"code":"unknown_url"}}"#),
        ),
    }
}
