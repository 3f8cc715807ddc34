//! `/compat`: one OpenAI-compatible API (`/compat/chat/completions`, `/compat/embeddings`) for
//! every provider, with `model: "{provider}/{model}"`.
//!
//! - [`openai`]: the client-facing request and response shapes; OpenAI-compatible providers
//!   (only the model is rewritten, the response streams through untouched).
//! - [`anthropic`], [`gemini`], [`bedrock`]: one translator per wire format: request, complete
//!   response, stream, errors.
//! - [`sse`], [`eventstream`]: incremental decoders of the upstream streams.
//!
//! [`serve`] reads a `/compat` request's body; [`answer`] serves a body already read — the
//! request's, or a `compat` step's of the universal endpoint (`crate::universal`).
//!
//! Streams are translated event by event as bytes arrive ([`StreamTranslator`]); complete
//! responses and errors are small JSON documents and are translated whole.

pub mod anthropic;
pub mod bedrock;
pub mod eventstream;
pub mod gemini;
pub mod openai;
pub mod sse;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Map, Value};
use sidegate_crds::policy::ApiFormat;

use self::openai::bad;
use crate::body::HoldError;
use crate::body::{ProxyBody, RequestBody};
use crate::buffers::Held;
use crate::cache;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::error::json_error;
use crate::google_auth::ServiceAccount;
use crate::headers::{
    GatewayHeaders, Gw, RawHeaders, copy_gateway_headers, strip_response_headers,
};
use crate::keys::AuthValue;
use crate::providers::{KeyChoice, Provider};
use crate::proxy::{self, Admission, Gateway};
use crate::proxy::{AttemptAuth, HeldAnswer, Read};
use crate::retry::{Policy, Waits};
use crate::route::ProviderRoute;
use crate::routing::{Target, Walk};
use crate::telemetry::{LogOptions, RequestRecord};
use crate::upstream::UpstreamBody;

/// Turns an upstream stream, fed chunk by chunk, into OpenAI `chat.completion.chunk` SSE.
pub trait StreamTranslator: Send {
    /// Translates one received chunk, appending whatever it completes to `out`.
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut);
    /// The upstream body ended: flushes the rest (`[DONE]`, or an error event if the stream
    /// was cut short).
    fn finish(&mut self, out: &mut BytesMut);
    /// Whether the stream ended whole, asked once it ended: with `[DONE]`, not cut short or
    /// broken off with an error event. One that did not is logged as an upstream error and
    /// is not cached.
    fn ended_whole(&self) -> bool;
    /// The upstream's token counts so far (prompt, completion), for the usage chunk the client
    /// asked for (the request's log, cost and limits count the provider's own usage).
    fn usage(&self) -> Option<openai::Usage>;
    /// Counts what the translator holds between chunks (an unfinished event) in the budget
    /// of buffered bodies through `held`.
    fn hold_in(&mut self, held: crate::buffers::Held);
    /// Why the translator stopped: the budget of buffered bodies had no room for the event
    /// being read. The stream then ends (see `ProxyBody::Translated`).
    fn refused(&self) -> Option<crate::buffers::BudgetExhausted> {
        None
    }
}

/// What response translation needs to know about the request.
#[derive(Debug, Clone)]
pub struct ResponseCtx {
    /// Completion id when the provider gives none.
    pub id: String,
    /// Model name to report when the provider gives none.
    pub model: String,
    /// `created` of the completion.
    pub created: u64,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `response_format` JSON is carried by the JSON tool.
    pub json_tool: bool,
    /// Embeddings as base64.
    pub base64: bool,
}

/// The two `/compat` endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Embeddings,
}

/// A provider's wire format for `/compat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    OpenAi,
    Anthropic,
    Gemini,
    Vertex,
    Bedrock,
}

impl Format {
    fn of(provider: &Provider) -> Self {
        match (&*provider.id, provider.format) {
            ("google-ai-studio", _) => Format::Gemini,
            ("google-vertex-ai", _) => Format::Vertex,
            ("aws-bedrock", _) => Format::Bedrock,
            (_, ApiFormat::Anthropic) => Format::Anthropic,
            (_, ApiFormat::Openai) => Format::OpenAi,
        }
    }
}

/// A wire format whose responses are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Anthropic,
    Google,
    Bedrock,
}

/// How the upstream response becomes the client's.
struct Translation {
    wire: Wire,
    endpoint: Endpoint,
    stream: bool,
    ctx: ResponseCtx,
    /// The other upstream requests of a request sent in parts (embeddings of a provider that
    /// takes one text per request), sent once the first succeeded; the answers are joined.
    more: Vec<Request<Full<Bytes>>>,
    /// The signature each attempt of the requests gets as it is sent (Bedrock).
    sigv4: Option<bedrock::SigV4>,
}

impl Translation {
    fn stream_translator(&self) -> Box<dyn StreamTranslator> {
        match self.wire {
            Wire::Anthropic => Box::new(anthropic::Stream::new(&self.ctx)),
            Wire::Google => Box::new(gemini::Stream::new(&self.ctx)),
            Wire::Bedrock => Box::new(bedrock::Stream::new(&self.ctx)),
        }
    }

    fn body(&self, body: &[u8]) -> Result<Translated, String> {
        let answer = |a: Result<Vec<u8>, String>| a.map(Translated::Answer);
        match (self.wire, self.endpoint) {
            (Wire::Anthropic, _) => answer(anthropic::response(body, &self.ctx)),
            (Wire::Google, Endpoint::Chat) => gemini::response(body, &self.ctx),
            (Wire::Google, Endpoint::Embeddings) => answer(gemini::embed_response(body, &self.ctx)),
            (Wire::Bedrock, Endpoint::Chat) => bedrock::response(body, &self.ctx),
            (Wire::Bedrock, Endpoint::Embeddings) => {
                answer(bedrock::embed_response(body, &self.ctx))
            }
        }
    }

    fn error(&self, status: u16, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
        match self.wire {
            Wire::Anthropic => anthropic::error(status, body),
            Wire::Google => gemini::error(status, body),
            Wire::Bedrock => {
                let kind = headers
                    .get("x-amzn-errortype")
                    .and_then(|v| v.to_str().ok());
                bedrock::error(status, kind, body)
            }
        }
    }
}

/// A 2xx answer held back whole, translated.
#[derive(Debug)]
pub enum Translated {
    /// The client's answer.
    Answer(Vec<u8>),
    /// The model's output was not valid: OpenAI's error for it (see
    /// [`openai::InvalidOutput`]), in place of an answer.
    InvalidOutput(openai::InvalidOutput),
}

/// Largest complete (non-stream) upstream response translated.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Azure OpenAI `api-version` when the client's query has none.
const AZURE_API_VERSION: &str = "api-version=2024-10-21";

/// `{provider}/{model}` → `(provider, model)`.
pub fn split_model(model: &str) -> Result<(&str, &str), GatewayError> {
    match model.split_once('/') {
        Some((p, m)) if !p.is_empty() && !m.is_empty() => Ok((p, m)),
        _ => Err(bad(format!(
            "model {:?} is not {{provider}}/{{model}} (e.g. anthropic/claude-sonnet-4-5)",
            openai::truncate(model)
        ))),
    }
}

/// Reads only `model` from a body (the rest is parsed by the provider's translator).
fn peek_model(body: &[u8]) -> Result<String, GatewayError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        model: Option<String>,
    }
    let p: Peek = serde_json::from_slice(body)
        .map_err(|e| bad(format!("invalid request body: {}", json_error(&e))))?;
    p.model
        .ok_or_else(|| bad("model is required, as {provider}/{model}"))
}

/// Inserts `ours` into `body[key]`, keeping the client's other fields of that object.
pub fn merge_object(body: &mut Map<String, Value>, key: &str, ours: Map<String, Value>) {
    match body.get_mut(key) {
        Some(Value::Object(theirs)) => theirs.extend(ours),
        _ => {
            body.insert(key.to_owned(), Value::Object(ours));
        }
    }
}

/// A provider error body that could not be read, in the OpenAI error shape.
pub fn opaque_error(status: u16, body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    openai::error_json(
        &format!("upstream returned status {status}: {text}"),
        openai::error_type_for(status),
        None,
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Characters allowed in a model name that goes into a URL path.
fn check_path_model(model: &str) -> Result<(), GatewayError> {
    let ok = !model.is_empty()
        && model != "."
        && model != ".."
        && model.len() <= 256
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "model name {:?} may only hold letters, digits and -_.@",
            openai::truncate(model)
        )))
    }
}

/// Headers for a translated request: JSON, and the key in the provider's own header — the
/// stored one, or else the client's (sent as `Authorization: Bearer` by OpenAI SDKs).
fn translated_headers(provider: &Provider, key: &KeyChoice<'_>, client: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ACCEPT_ENCODING, crate::headers::identity_encoding());
    if let Some(name) = provider.auth_header() {
        match key {
            KeyChoice::Stored(v) => {
                h.insert(name.clone(), v.header().clone());
            }
            KeyChoice::ClientOwn => {
                if let Some(v) = client.get(name).cloned().or_else(|| client_bearer(client)) {
                    h.insert(name.clone(), v);
                }
            }
        }
    }
    for (name, value) in provider.default_headers() {
        h.insert(*name, HeaderValue::from_static(value));
    }
    for name in ["anthropic-version", "anthropic-beta"] {
        if let (Some(v), Format::Anthropic) = (client.get(name), Format::of(provider)) {
            h.insert(HeaderName::from_static(name), v.clone());
        }
    }
    h
}

/// The key of an OpenAI SDK's `Authorization: Bearer <key>`, for a provider that wants the
/// client's own key in a header of its own.
fn client_bearer(client: &HeaderMap) -> Option<HeaderValue> {
    let token = crate::headers::bearer_token(client.get(header::AUTHORIZATION)?.as_bytes())?;
    let mut v = HeaderValue::from_bytes(token).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn new_request(uri: http::Uri, headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// A `/compat` request, ready to be planned.
struct CompatCall<'a> {
    snap: &'a Snapshot,
    provider: &'a Provider,
    endpoint: Endpoint,
    model: &'a str,
    body: &'a Bytes,
    alias: Option<&'a str>,
    parts: &'a http::request::Parts,
    log_id: &'a str,
    /// A token minted for this request (Google service accounts), used instead of a stored key.
    minted: Option<&'a AuthValue>,
}

impl CompatCall<'_> {
    fn key(&self) -> Result<KeyChoice<'_>, GatewayError> {
        match self.minted {
            Some(v) => Ok(KeyChoice::Stored(v)),
            None => self.provider.choose_key(self.alias),
        }
    }
}

/// The upstream request, how to translate its response (`None`: pass it through), and whether
/// it asks an OpenAI-format upstream for a usage chunk the client did not ask for (held out of
/// the client's stream).
type Plan = (Request<Full<Bytes>>, Option<Translation>, bool);

/// Plans the upstream request of `i`.
fn plan(i: &CompatCall<'_>) -> Result<Plan, GatewayError> {
    let format = Format::of(i.provider);
    fn route<'r>(i: &'r CompatCall<'_>, rest: &'r str) -> ProviderRoute<'r> {
        ProviderRoute {
            provider: &i.provider.id,
            rest,
            account: crate::route::long_form_account(i.parts.uri.path()),
            gateway: None,
        }
    }
    let mut ctx = ResponseCtx {
        id: format!("chatcmpl-{}", i.log_id),
        model: i.model.to_owned(),
        created: unix_now(),
        include_usage: false,
        json_tool: false,
        base64: false,
    };
    match format {
        Format::OpenAi => {
            let (rest, query, model) =
                openai_route(&i.provider.id, i.endpoint, i.model, i.parts.uri.query())?;
            let uri = i
                .provider
                .upstream_uri(&route(i, &rest), query.as_deref())?;
            let key = i.key()?;
            let client_own = matches!(key, KeyChoice::ClientOwn);
            let ask_usage = i.endpoint == Endpoint::Chat
                && crate::usage::takes_stream_options(&i.provider.id, &rest, query.as_deref());
            let (body, hide_usage) = openai::rewrite_model_asking_usage(i.body, model, ask_usage)?;
            let mut req = proxy::build_upstream_request(
                i.provider,
                &i.parts.method,
                &i.parts.headers,
                uri,
                key,
                body,
                false,
            );
            // The body is the gateway's own serialization, never compressed.
            req.headers_mut().remove(header::CONTENT_ENCODING);
            // The app's own key, sent the OpenAI SDK's way, goes where the provider wants it
            // (Azure's `api-key`, a custom provider's `authHeader`).
            if let Some(name) = i
                .provider
                .auth_header()
                .filter(|n| *n != header::AUTHORIZATION)
                && client_own
                && !req.headers().contains_key(name)
                && let Some(v) = client_bearer(req.headers())
            {
                let headers = req.headers_mut();
                headers.remove(header::AUTHORIZATION);
                headers.insert(name.clone(), v);
            }
            Ok((req, None, hide_usage))
        }
        Format::Anthropic => {
            if i.endpoint == Endpoint::Embeddings {
                return Err(bad(format!("provider {} has no embeddings", i.provider.id)));
            }
            let req = openai::ChatRequest::parse(i.body)?;
            ctx.include_usage = req.include_usage();
            let stream = req.is_stream();
            let (body, json_tool) = anthropic::request(req, i.model)?;
            ctx.json_tool = json_tool;
            let uri = i.provider.upstream_uri(&route(i, "v1/messages"), None)?;
            let key = i.key()?;
            let headers = translated_headers(i.provider, &key, &i.parts.headers);
            Ok((
                new_request(uri, headers, Bytes::from(body)),
                Some(Translation {
                    wire: Wire::Anthropic,
                    endpoint: i.endpoint,
                    stream,
                    ctx,
                    more: Vec::new(),
                    sigv4: None,
                }),
                false,
            ))
        }
        Format::Gemini | Format::Vertex => {
            let prefix = match format {
                Format::Vertex => vertex_prefix(
                    i.model,
                    i.provider.service_account(i.alias).map(|sa| &**sa),
                    i.alias,
                )?,
                _ => {
                    let m = i.model.strip_prefix("models/").unwrap_or(i.model);
                    check_path_model(m)?;
                    format!("v1beta/models/{m}")
                }
            };
            let mut more_bodies = Vec::new();
            let (rest, query, body, stream) = match i.endpoint {
                Endpoint::Chat => {
                    let req = openai::ChatRequest::parse(i.body)?;
                    ctx.include_usage = req.include_usage();
                    let stream = req.is_stream();
                    let body = gemini::request(req, i.model, &i.provider.id)?;
                    if stream {
                        (
                            format!("{prefix}:streamGenerateContent"),
                            Some("alt=sse"),
                            body,
                            true,
                        )
                    } else {
                        (format!("{prefix}:generateContent"), None, body, false)
                    }
                }
                Endpoint::Embeddings => {
                    let req = openai::EmbeddingsRequest::parse(i.body)?;
                    ctx.base64 = req.wants_base64();
                    let model = prefix.rsplit('/').next().unwrap_or(i.model);
                    if format == Format::Vertex {
                        let body;
                        (body, more_bodies) = embed_bodies(
                            req,
                            gemini::vertex_embeds_one_per_request(model),
                            &i.provider.id,
                            |one| gemini::vertex_embed_request(one, &i.provider.id),
                        )?;
                        (format!("{prefix}:predict"), None, body, false)
                    } else {
                        let body = gemini::embed_request(&req, model, &i.provider.id)?;
                        (format!("{prefix}:batchEmbedContents"), None, body, false)
                    }
                }
            };
            let uri = i.provider.upstream_uri(&route(i, &rest), query)?;
            let key = i.key()?;
            let headers = translated_headers(i.provider, &key, &i.parts.headers);
            let more = more_bodies
                .into_iter()
                .map(|b| new_request(uri.clone(), headers.clone(), Bytes::from(b)))
                .collect();
            Ok((
                new_request(uri, headers, Bytes::from(body)),
                Some(Translation {
                    wire: Wire::Google,
                    endpoint: i.endpoint,
                    stream,
                    ctx,
                    more,
                    sigv4: None,
                }),
                false,
            ))
        }
        Format::Bedrock => {
            let creds = bedrock_credentials(i.snap, i.alias)?;
            let (region, model_id) = bedrock::split_region(i.model);
            // Answers name the model, not the region it was asked in.
            model_id.clone_into(&mut ctx.model);
            let region = region
                .or(creds.region.as_deref())
                .ok_or_else(|| bad("aws-bedrock needs a region: use model aws-bedrock/{region}/{modelId} or set \"region\" in the aws-bedrock key file"))?
                .to_owned();
            let encoded = bedrock::encode_model_id(model_id);
            let mut more_bodies = Vec::new();
            let (action, body, stream) = match i.endpoint {
                Endpoint::Chat => {
                    let req = openai::ChatRequest::parse(i.body)?;
                    ctx.include_usage = req.include_usage();
                    let stream = req.is_stream();
                    let (body, json_tool) = bedrock::request(req)?;
                    ctx.json_tool = json_tool;
                    (
                        if stream {
                            "converse-stream"
                        } else {
                            "converse"
                        },
                        body,
                        stream,
                    )
                }
                Endpoint::Embeddings => {
                    let req = openai::EmbeddingsRequest::parse(i.body)?;
                    ctx.base64 = req.wants_base64();
                    let family = bedrock::embed_model(model_id)?;
                    let body;
                    (body, more_bodies) = embed_bodies(
                        req,
                        family == bedrock::EmbedModel::Titan,
                        &i.provider.id,
                        |one| bedrock::embed_request(one, family),
                    )?;
                    ("invoke", body, false)
                }
            };
            let rest = format!("bedrock-runtime/{region}/model/{encoded}/{action}");
            let uri = i.provider.upstream_uri(&route(i, &rest), None)?;
            let mut headers = HeaderMap::with_capacity(6);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::ACCEPT_ENCODING, crate::headers::identity_encoding());
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(if stream {
                    "application/vnd.amazon.eventstream"
                } else {
                    "application/json"
                }),
            );
            if let Some(host) = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(header::HOST, host);
            }
            // Signed as each attempt is sent (see `proxy::AttemptAuth`).
            let req = new_request(uri.clone(), headers.clone(), Bytes::from(body));
            let more = more_bodies
                .into_iter()
                .map(|b| new_request(uri.clone(), headers.clone(), Bytes::from(b)))
                .collect();
            Ok((
                req,
                Some(Translation {
                    wire: Wire::Bedrock,
                    endpoint: i.endpoint,
                    stream,
                    ctx,
                    more,
                    sigv4: Some(bedrock::SigV4::new(creds, region)),
                }),
                false,
            ))
        }
    }
}

/// Most bytes each part of a list sent one text per request repeats besides its text: the
/// request's other fields (Titan's `normalize`, `embeddingTypes`) go to every part, so the
/// parts together stay about the size of the request, not up to [`openai::MAX_FAN_OUT`] times
/// it.
const MAX_REPEATED_PER_PART: usize = 4 << 10;

/// The upstream bodies of an embeddings request: one, or for a provider that embeds one text
/// per request (`one_per_text`) and a list of several, the first text's and the others'.
fn embed_bodies(
    mut req: openai::EmbeddingsRequest,
    one_per_text: bool,
    provider: &str,
    build: impl Fn(&openai::EmbeddingsRequest) -> Result<Vec<u8>, GatewayError>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), GatewayError> {
    let texts = if one_per_text {
        req.take_texts(provider)?
    } else {
        None
    };
    let Some(texts) = texts else {
        return Ok((build(&req)?, Vec::new()));
    };
    // What every part repeats: the part of an empty text.
    req.input = openai::EmbeddingInput::One(String::new());
    let repeated = build(&req)?.len();
    if repeated > MAX_REPEATED_PER_PART {
        return Err(bad(format!(
            "provider {provider} embeds one text per request with {}, and each of the {} requests would repeat the {repeated} bytes of the request's other fields; at most {MAX_REPEATED_PER_PART} are repeated: send fewer fields, or one text per request",
            openai::truncate(&req.model),
            texts.len()
        )));
    }
    let mut part = |text: String| {
        req.input = openai::EmbeddingInput::One(text);
        build(&req)
    };
    let mut texts = texts.into_iter();
    let first = part(texts.next().unwrap_or_default())?;
    let rest = texts.map(part).collect::<Result<_, _>>()?;
    Ok((first, rest))
}

/// Path, query and body model of an OpenAI-compatible provider.
fn openai_route<'m>(
    provider: &str,
    endpoint: Endpoint,
    model: &'m str,
    query: Option<&str>,
) -> Result<(String, Option<String>, &'m str), GatewayError> {
    let leaf = match endpoint {
        Endpoint::Chat => "chat/completions",
        Endpoint::Embeddings => "embeddings",
    };
    let prefix = match provider {
        "azure-openai" => {
            let Some((resource, deployment)) = model.split_once('/') else {
                return Err(bad(
                    "azure-openai models are azure-openai/{resource}/{deployment} or azure-openai/{resource}/openai/v1/{model}",
                ));
            };
            // Azure's v1 API: the model (a deployment's name) goes in the body, and no
            // `api-version` is needed (the client's query goes as it is).
            if let Some(v1_model) = deployment.strip_prefix("openai/v1/") {
                return Ok((
                    format!("{resource}/openai/v1/{leaf}"),
                    query.map(str::to_owned),
                    v1_model,
                ));
            }
            let query = match query {
                Some(q) if q.split('&').any(|kv| kv.starts_with("api-version=")) => q.to_owned(),
                _ => AZURE_API_VERSION.to_owned(),
            };
            return Ok((
                format!("{resource}/{deployment}/{leaf}"),
                Some(query),
                deployment,
            ));
        }
        "mistral" | "grok" | "openrouter" | "huggingface" | "workers-ai" => "v1/",
        "cohere" => "compatibility/v1/",
        // Parallel's OpenAI-compatible chat API (docs.parallel.ai/api-reference).
        "parallel" => "v1beta/",
        _ => "",
    };
    Ok((format!("{prefix}{leaf}"), None, model))
}

/// `projects/{p}/locations/{r}/publishers/google/models/{m}`, `{p}/{r}/{m}`, or Cloudflare's
/// `{publisher}/{m}` with the project and region of the stored service-account key `sa` (of
/// `alias`) → the Vertex path prefix.
fn vertex_prefix(
    model: &str,
    sa: Option<&ServiceAccount>,
    alias: Option<&str>,
) -> Result<String, GatewayError> {
    let parts: Vec<&str> = model.split('/').collect();
    let (project, region, publisher, name) = match parts.as_slice() {
        [
            "projects",
            p,
            "locations",
            r,
            "publishers",
            publ,
            "models",
            m,
        ] => (*p, *r, *publ, *m),
        [p, r, m] => (*p, *r, "google", *m),
        [publ, m] => {
            let (project, region) = stored_project_region(sa, alias.unwrap_or("default"))?;
            (project, region, *publ, *m)
        }
        _ => {
            return Err(bad(
                "google-vertex-ai models are google-vertex-ai/{publisher}/{model} (project and region from the stored service-account key), google-vertex-ai/{project}/{region}/{model} or google-vertex-ai/projects/{project}/locations/{region}/publishers/google/models/{model}",
            ));
        }
    };
    if publisher != "google" {
        return Err(bad(format!(
            "google-vertex-ai publisher {:?} has no Gemini API; only publishers/google models can be reached through /compat",
            openai::truncate(publisher)
        )));
    }
    for part in [project, region, name] {
        check_path_model(part)?;
    }
    Ok(format!(
        "v1/projects/{project}/locations/{region}/publishers/google/models/{name}"
    ))
}

/// The project (`project_id`) and region (`region`) of the stored Vertex service-account key of
/// `alias`, for a model named `{publisher}/{model}` as in Cloudflare's docs.
fn stored_project_region<'s>(
    sa: Option<&'s ServiceAccount>,
    alias: &str,
) -> Result<(&'s str, &'s str), GatewayError> {
    let name_them = "or name them: google-vertex-ai/{project}/{region}/{model}";
    let Some(sa) = sa else {
        return Err(bad(format!(
            "google-vertex-ai/{{publisher}}/{{model}} takes the project and region from the stored service-account key google-vertex-ai.{alias}, and there is none (no key, or an access token): store the service-account JSON key with \"region\", {name_them}"
        )));
    };
    let missing = |field: &str| {
        bad(format!(
            "google-vertex-ai/{{publisher}}/{{model}} takes the {field} from the stored service-account key google-vertex-ai.{alias}, which has no \"{field}\": add it to the key JSON (e.g. \"region\": \"us-central1\"), {name_them}"
        ))
    };
    let project = sa.project_id().ok_or_else(|| missing("project_id"))?;
    let region = sa.region().ok_or_else(|| missing("region"))?;
    Ok((project, region))
}

/// The credentials a `/compat` request of `alias` sends to `provider`: the gateway's own
/// (`Ok(true)`: a stored key, a token minted from a stored service account, or a signature made
/// with stored AWS credentials, so that no client key header goes upstream) or the client's
/// (`Ok(false)`); an error when they are missing (a named alias with no stored key is 2040, as
/// when the request is planned). A universal step's targets are checked with it before any step
/// is tried.
pub(crate) fn stored_credentials(
    snap: &Snapshot,
    provider: &Provider,
    alias: Option<&str>,
) -> Result<bool, GatewayError> {
    if provider.service_account(alias).is_some() {
        return Ok(true);
    }
    if Format::of(provider) == Format::Bedrock {
        return bedrock_credentials(snap, alias).map(|_| true);
    }
    provider
        .choose_key(alias)
        .map(|k| matches!(k, KeyChoice::Stored(_)))
}

/// The public providers among `reach` that would get the app's own key headers (no stored
/// credentials of `alias`), each once. Custom providers are left out: they are the platform's
/// own endpoints (a self-hosted model server takes the OpenAI SDK's placeholder key), where a
/// fallback's key is no leak to a third party.
pub(crate) fn client_key_providers<'p>(
    snap: &Snapshot,
    reach: impl IntoIterator<Item = &'p Provider>,
    alias: Option<&str>,
) -> Vec<&'p str> {
    let mut own: Vec<&str> = reach
        .into_iter()
        .filter(|p| !p.id.starts_with("custom-"))
        .filter(|p| matches!(stored_credentials(snap, p, alias), Ok(false)))
        .map(|p| &*p.id)
        .collect();
    own.sort_unstable();
    own.dedup();
    own
}

/// Refuses a route or chain that could send the app's own key to more than one public provider
/// ([`client_key_providers`]): a key is meant for one provider and must never reach another
/// when the walk falls back. Nothing is sent with no key header, so then nothing is refused.
/// Such routes are warned about when the config loads ([`client_key_warnings`]).
pub(crate) fn one_provider_for_client_key<'p>(
    snap: &Snapshot,
    reach: impl IntoIterator<Item = &'p Provider>,
    alias: Option<&str>,
    headers: &HeaderMap,
    model: &str,
) -> Result<(), GatewayError> {
    if !(snap.providers.key_headers().iter()).any(|n| headers.contains_key(n)) {
        return Ok(());
    }
    let own = client_key_providers(snap, reach, alias);
    if own.len() > 1 {
        return Err(bad(format!(
            "{} could send the app's own key to {}, which have no stored key{}: a key meant for one provider must not reach another; store keys (ProviderKey) for all of them but one",
            openai::truncate(model),
            own.join(", "),
            alias.map(|a| format!(" {a}")).unwrap_or_default(),
        )));
    }
    Ok(())
}

/// A warning for each route or chain whose requests carrying the app's own key would be
/// refused by [`one_provider_for_client_key`] with the stored keys of `snap`.
pub(crate) fn client_key_warnings(snap: &Snapshot) -> Vec<String> {
    let mut warnings = Vec::new();
    for model in snap.routing.models() {
        let Some(Ok(walk)) = snap.routing.walk(&model) else {
            continue;
        };
        let reach = walk.targets().into_iter();
        let reach = reach.filter_map(|t| snap.providers.get(&t.provider));
        let own = client_key_providers(snap, reach, None);
        if own.len() > 1 {
            warnings.push(format!(
                "{model} reaches {} without a stored key: its requests carrying the app's own key are refused (400/2107), as a key meant for one provider must not reach another; store keys for all of them but one",
                own.join(", ")
            ));
        }
    }
    warnings
}

/// The stored AWS credentials of `alias` (`None` when no alias is named and there is no
/// `aws-bedrock.default`: the client signs); a named alias that is missing is 2040, stored
/// credentials that cannot sign a 502/2104 naming the problem.
pub(crate) fn stored_aws_credentials(
    snap: &Snapshot,
    alias: Option<&str>,
) -> Result<Option<bedrock::AwsCredentials>, GatewayError> {
    if alias.is_none() && snap.keys.get("aws-bedrock", "default").is_none() {
        return Ok(None);
    }
    bedrock_credentials(snap, alias).map(Some)
}

fn bedrock_credentials(
    snap: &Snapshot,
    alias: Option<&str>,
) -> Result<bedrock::AwsCredentials, GatewayError> {
    let name = alias.unwrap_or("default");
    let Some(key) = snap.keys.get("aws-bedrock", name) else {
        return Err(match alias {
            Some(a) => GatewayError::AliasNotFound {
                provider: "aws-bedrock".into(),
                alias: openai::truncate(a),
            },
            None => bad(
                "aws-bedrock needs stored credentials for /compat: key file aws-bedrock.default with {\"accessKeyId\", \"secretAccessKey\"}",
            ),
        });
    };
    // The gateway's own key, warned about at load: not the client's to mend (as a Vertex
    // service account that gets no token is not).
    bedrock::AwsCredentials::parse(key.expose()).map_err(|why| {
        GatewayError::UpstreamUnavailable(format!(
            "aws-bedrock: the stored credentials aws-bedrock.{name} cannot sign requests: {why}"
        ))
    })
}

type Failure = (Option<Arc<str>>, GatewayError);

/// Serves a `/compat/...` request (`rest` is the path after `compat/`), let in by `admission`;
/// `redis_wait` is the request's for the gateway's Redis.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    gw: &Gateway,
    snap: &Arc<Snapshot>,
    parts: &http::request::Parts,
    rest: &str,
    body: RequestBody,
    start: Instant,
    opts: &LogOptions<'_>,
    admission: Admission,
    redis_wait: &crate::shared::Wait,
) -> Result<Response<ProxyBody>, Failure> {
    let none = |e: GatewayError| (None, e);
    let aig = GatewayHeaders::scan(&parts.headers);
    let endpoint = match (parts.method == Method::POST, rest.trim_end_matches('/')) {
        (true, "chat/completions") => Endpoint::Chat,
        (true, "embeddings") => Endpoint::Embeddings,
        _ => {
            return Err(none(GatewayError::NotFound(format!(
                "{} /compat/{} not found: use POST /compat/chat/completions or /compat/embeddings",
                parts.method,
                openai::truncate(rest)
            ))));
        }
    };
    // The headers are checked before the body is read, and the request counted against the
    // limits once they are: one refused for its path or a header is not.
    proxy::request_timeout(aig, snap.request_timeout).map_err(none)?;
    aig.byok_alias().map_err(none)?;
    cache::want(&snap.cache, aig).map_err(none)?;
    snap.retries.with_headers(aig).map_err(none)?;
    gw.check_limits(snap, redis_wait).await.map_err(none)?;
    proxy::refuse_compressed_body(&parts.headers, "/compat translation").map_err(none)?;
    // Held until the answer goes out: the body is read again for a fallback's request.
    let mut held = gw.buffers.guard(snap.max_buffered);
    let body = proxy::read_body(
        &parts.headers,
        body,
        snap.max_body,
        gw.client_timeout,
        &mut held,
    )
    .await
    .map_err(none)?;
    if opts.payloads {
        opts.recorded.request_body(&body);
    }
    // Each target's plan parses it into a tree.
    held.reserve_parse(&body).map_err(none)?;
    let request = CompatRequest {
        parts,
        aig,
        endpoint,
        body,
        held,
        admission,
        step: None,
        redis_wait,
    };
    match answer(gw, snap, request, start, opts).await? {
        Served::Answer(resp) => Ok(*resp),
        // Only a universal step hands its failure over.
        Served::HandedOver(why) => Err(none(GatewayError::UpstreamUnavailable(why))),
    }
}

/// A `/compat` request whose body is read.
pub(crate) struct CompatRequest<'a> {
    /// Method, URI (its long-form account, Azure's `api-version`) and the headers that carry
    /// the client's provider keys and change the answer: the request's, or a universal step's.
    pub parts: &'a http::request::Parts,
    /// The gateway headers that apply (a universal step's own over the request's).
    pub aig: GatewayHeaders<'a>,
    pub endpoint: Endpoint,
    pub body: Bytes,
    /// The body's bytes taken from the budget of buffered bodies.
    pub held: Held,
    pub admission: Admission,
    /// Served as a step of the universal endpoint.
    pub step: Option<UniversalStep<'a>>,
    /// What the request has waited for the gateway's Redis (its limits, cache, route nodes).
    pub redis_wait: &'a crate::shared::Wait,
}

/// What changes when a `/compat` request is a step of the universal endpoint.
pub(crate) struct UniversalStep<'a> {
    /// Its index: its `cf-aig-step`, its log's `step`.
    pub index: usize,
    /// Its cache scope (apart from `/compat`'s own and the other indexes).
    pub scope: &'static str,
    /// A step follows: a non-2xx answer is handed over before anything is logged, charged or
    /// stored for it.
    pub hands_over: bool,
    /// The universal body's DLP findings: the request checks (DLP, guardrails) were made on
    /// the whole body, every step's `query` in it, before any step was tried.
    pub dlp_flags: &'a [crate::dlp::Finding],
}

/// How a `/compat` request ended.
pub(crate) enum Served {
    /// The answer for the client.
    Answer(Box<Response<ProxyBody>>),
    /// A universal step, not the last, failed for this reason (after its route's targets, if it
    /// names one: a non-2xx status, an answer held back whole that could not be read whole or
    /// translated): dropped unanswered, unlogged, uncharged.
    HandedOver(String),
}

/// The next target of a route's or chain's walk (none without one).
async fn next_target<'a>(
    walk: &mut Option<Walk<'a>>,
    metadata: &Map<String, Value>,
    redis_wait: &crate::shared::Wait,
) -> Option<&'a Target> {
    match walk {
        Some(w) => w.next_target(metadata, redis_wait).await,
        None => None,
    }
}

/// Serves a `/compat` request whose body is read: routing, translation, retries, cache, log.
pub(crate) async fn answer(
    gw: &Gateway,
    snap: &Arc<Snapshot>,
    request: CompatRequest<'_>,
    start: Instant,
    opts: &LogOptions<'_>,
) -> Result<Served, Failure> {
    let none = |e: GatewayError| (None, e);
    let CompatRequest {
        parts,
        aig,
        endpoint,
        body,
        held,
        admission,
        step: universal,
        redis_wait,
    } = request;
    let timeout = proxy::request_timeout(aig, snap.request_timeout).map_err(none)?;
    let alias = aig.byok_alias().map_err(none)?;
    let model = peek_model(&body).map_err(none)?;
    let metadata: Map<String, Value> = opts
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default();
    // A dynamic route or fallback chain names its targets; a plain model is its one target.
    let (mut walk, single) = match snap.routing.walk(&model) {
        Some(found) => {
            let redis = snap.shared.clone().map(|r| (r, gw.metrics.clone()));
            (
                Some(found.map_err(|e| none(bad(e)))?.with_redis(redis)),
                None,
            )
        }
        None => {
            let (p, m) = split_model(&model).map_err(none)?;
            let target = Target {
                provider: p.to_owned(),
                model: m.to_owned(),
                timeout: None,
                attempts: None,
            };
            (None, Some(target))
        }
    };
    let routed = walk.is_some();
    let first = match (walk.as_mut(), &single) {
        (Some(w), _) => w.next_target(&metadata, redis_wait).await,
        (None, target) => target.as_ref(),
    }
    .ok_or_else(|| {
        // A rate or budget node over its limit that leads to `end` is that limit's 429.
        none(
            walk.as_ref()
                .and_then(Walk::limit_error)
                .unwrap_or_else(|| {
                    bad(format!(
                        "{} leads to no model for this request",
                        openai::truncate(&model)
                    ))
                }),
        )
    })?;
    let provider_of = |t: &Target| {
        snap.providers.get(&t.provider).ok_or_else(|| {
            none(bad(format!(
                "unknown provider {:?} in model {:?}",
                openai::truncate(&t.provider),
                openai::truncate(&model)
            )))
        })
    };
    let provider = provider_of(first)?;
    // A refusal from here on (DLP, guardrails, limits) logs the first target's model, and a
    // request given up before its answer (the client left) its provider too.
    opts.recorded
        .model(crate::cost::ModelName::named(&first.model).as_ref());
    opts.recorded.provider(&provider.id);
    let fail = |e: GatewayError| (Some(provider.id.clone()), e);
    // A gateway token in the app's `Authorization` (the OpenAI SDK's `apiKey`) is good only
    // for targets the gateway sends its own credentials to; checked before the cache answers.
    let admitted = |p: &Provider| {
        admission.allow_client_key(
            stored_credentials(snap, p, alias).is_ok_and(|stored| stored),
            snap,
            &parts.headers,
            // A translated request's URL is the gateway's own: no client query goes.
            None,
        )
    };
    admitted(provider).map_err(fail)?;
    // Every target a route or chain could reach, before any is tried: a fallback must not
    // turn a provider's failure into the client's 401.
    // And, when the client names a key alias, each has that key, whether or not the walk
    // reaches it: a request refused for it after a provider's failure would hide that failure.
    let reach: Vec<&Provider> = (walk.as_ref().map(|w| w.targets()).unwrap_or_default())
        .into_iter()
        .filter_map(|t| snap.providers.get(&t.provider))
        .collect();
    for p in &reach {
        let refused = |e| (Some(p.id.clone()), e);
        admitted(p).map_err(refused)?;
        if alias.is_some() {
            stored_credentials(snap, p, alias).map_err(refused)?;
        }
    }
    // And none but one public provider gets the app's own key.
    one_provider_for_client_key(snap, reach, alias, &parts.headers, &model).map_err(none)?;
    let path = match endpoint {
        Endpoint::Chat => "compat/chat/completions",
        Endpoint::Embeddings => "compat/embeddings",
    };

    let dlp_flags = match &universal {
        Some(u) => u.dlp_flags.to_vec(),
        None => gw
            .prompt_checks(snap, &parts.headers, &body)
            .await
            .map_err(fail)?,
    };

    // cache lookup (a routed request is keyed by its route and the target it lands on first:
    // a conditional branch or a percentage split never answers with another branch's entry)
    let want = cache::want(&snap.cache, aig).map_err(fail)?;
    let retries = snap.retries.with_headers(aig).map_err(fail)?;
    // Whose key goes upstream is part of the key when it is the client's: for a plain model
    // when its provider has no stored key; for a route, whatever key headers the client sent
    // (any of its targets may forward them).
    let client_auth: Option<&[HeaderName]> = if routed {
        Some(snap.providers.key_headers())
    } else {
        (provider.auth_header().is_some()
            && matches!(provider.choose_key(alias), Ok(KeyChoice::ClientOwn)))
        .then(|| provider.auth_headers())
    };
    let routed_to =
        (routed && want.is_some()).then(|| format!("{model}\0{}/{}", first.provider, first.model));
    // Where a route may send the request: every provider it may reach (in one order whatever
    // the config's, so that pods sharing a cache agree).
    let route_upstreams = walk.as_ref().filter(|_| want.is_some()).map(|w| {
        let mut upstreams: Vec<&str> = (w.targets().into_iter())
            .filter_map(|t| snap.providers.get(&t.provider))
            .map(Provider::upstream)
            .collect();
        upstreams.sort_unstable();
        upstreams.dedup();
        upstreams.join("\n")
    });
    let lookup = cache::Request {
        scope: universal.as_ref().map_or("compat", |u| u.scope),
        provider: routed_to.as_deref().unwrap_or(&provider.id),
        upstream: route_upstreams
            .as_deref()
            .unwrap_or_else(|| provider.upstream()),
        method: parts.method.as_str(),
        path,
        // The client's query goes upstream (an Azure target's `api-version`).
        query: parts.uri.query(),
        alias: alias.unwrap_or("default"),
        headers: &parts.headers,
        client_auth,
        accept_encoding: false,
        body: &body,
        // A route's targets may take the account from the URL: keyed by it whenever it is there.
        account: if routed {
            crate::route::long_form_account(parts.uri.path())
        } else {
            provider.route_account(crate::route::long_form_account(parts.uri.path()))
        },
    };
    // A chat body that makes state the provider keeps (xAI's `deferred`, which OpenAI-format
    // targets get as it is) is answered by the provider every time.
    opts.recorded.cache_on(want.is_some());
    let cached = gw
        .cache_lookup(
            snap,
            want.as_ref()
                .filter(|_| !cache::body_keeps_state(&body, false)),
            &lookup,
            parts,
            start,
            opts,
            redis_wait,
            || {
                // Waiting for an identical request's answer, it holds no slot of a rate node.
                if let Some(w) = walk.as_mut() {
                    w.set_aside();
                }
            },
        )
        .await;
    let mut miss = match cached.into_miss(&dlp_flags) {
        Ok(miss) => miss,
        Err(hit) => return Ok(Served::Answer(hit)),
    };

    // dispatch, falling back along the route while targets fail
    let log_id = crate::log_id::for_request();
    let event_id = aig.get(Gw::EventId).cloned();
    let (mut target, mut provider, mut step) = (first, provider, 0usize);
    let (taken, hide_usage, parts_held) = loop {
        let fail = |e: GatewayError| (Some(provider.id.clone()), e);
        // A target that cannot be sent — no token from Google's token endpoint, or a request it
        // cannot take (a parameter its provider refuses, an endpoint it lacks) — fails as one
        // that answered with an error: the route moves on.
        let minted = match provider.service_account(alias) {
            Some(sa) => sa.token(gw).await.map(Some),
            None => Ok(None),
        };
        let planned = minted.and_then(|minted| {
            plan(&CompatCall {
                snap,
                provider,
                endpoint,
                model: &target.model,
                body: &body,
                alias,
                parts,
                log_id: &log_id,
                minted: minted.as_ref(),
            })
        });
        let (upstream, mut translation, hide_usage) = match planned {
            Ok(p) => p,
            Err(e) => match next_target(&mut walk, &metadata, redis_wait).await {
                Some(next) => {
                    tracing::info!(step, provider = %provider.id, model = %target.model, failure = %e, log_id = crate::log_id::current().as_deref(), "route target failed, trying the next");
                    target = next;
                    provider = provider_of(next)?;
                    step += 1;
                    continue;
                }
                None => return Err(fail(e)),
            },
        };
        // The other parts of a request sent in parts wait in memory until they are sent.
        let mut parts_held = gw.buffers.guard(snap.max_buffered);
        let waiting = translation.as_ref().map_or(0, |t| {
            t.more
                .iter()
                .map(|r| http_body::Body::size_hint(r.body()).lower())
                .sum::<u64>()
        });
        parts_held
            .grow(waiting)
            .map_err(|e| fail(e.into_gateway_error()))?;
        let (within, policy) = target_limits(target, timeout, retries);
        if let Some(w) = walk.as_mut() {
            w.sent();
        }
        // A route's target, or a universal step, is a fallback step: its timeout moves the
        // request on. A plain model of `/compat` itself is a direct request.
        let waits = if routed || universal.is_some() {
            Waits::every_attempt(within, snap.request_timeout)
        } else {
            Waits::direct(within, snap.request_timeout, policy.max_attempts)
        };
        // Each attempt of each part gets its credentials as it is sent.
        let auth = match provider.service_account(alias) {
            Some(sa) => Some(AttemptAuth::Google { sa, provider }),
            None => translation
                .as_mut()
                .and_then(|t| t.sigv4.take())
                .map(AttemptAuth::Aws),
        };
        let auth = auth.as_ref();
        let outcome = match translation {
            None => {
                let read = |resp| proxy::read_passed_on(gw, snap, resp);
                let sent = gw.dispatch(upstream, auth, waits, &policy, &provider.id, read);
                sent.await.map(Taken::passed)
            }
            Some(mut t) => {
                // An answer held back whole is read within the attempt: one that breaks off
                // before the client got any of it is retried, then fails the target.
                let read = |resp| read_translated(gw, snap, t.stream, resp);
                match gw
                    .dispatch(upstream, auth, waits, &policy, &provider.id, read)
                    .await
                {
                    Ok(Answer::Streamed(resp)) => Ok(Taken::translated(resp, t)),
                    Ok(Answer::Held(answer)) => {
                        // A 2xx answer's other parts go, and the answers are translated, before
                        // the target is judged: a part that fails, or an answer that cannot be
                        // translated, fails it as an error would.
                        let made = match &answer.body {
                            Ok(raw) if answer.head.status.is_success() => {
                                let more = std::mem::take(&mut t.more);
                                Some(
                                    make(
                                        gw,
                                        &t,
                                        raw,
                                        more,
                                        auth,
                                        waits,
                                        &policy,
                                        &provider.id,
                                        snap,
                                    )
                                    .await,
                                )
                            }
                            _ => None,
                        };
                        Ok(Taken::whole(answer, t, made))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        // Why the target failed, when the next target or step is to be tried.
        let failed = match &outcome {
            Ok(taken) => taken.failure(),
            Err(e) => Some(Failed {
                why: e.to_string(),
                hands_on: true,
            }),
        }
        .filter(|f| f.hands_on);
        if let Some(failed) = &failed
            && let Some(next) = next_target(&mut walk, &metadata, redis_wait).await
        {
            tracing::info!(step, provider = %provider.id, model = %target.model, failure = %failed.why, log_id = crate::log_id::current().as_deref(), "route target failed, trying the next");
            target = next;
            provider = provider_of(next)?;
            step += 1;
            continue;
        }
        if let (
            Ok(_),
            Some(failed),
            Some(UniversalStep {
                hands_over: true, ..
            }),
        ) = (&outcome, &failed, &universal)
        {
            // Dropped before its log record, budget charges and cache fill exist.
            return Ok(Served::HandedOver(failed.why.clone()));
        }
        let taken = match outcome {
            Ok(taken) => taken,
            // The last target of a route failed in the gateway (a timeout, no connection): the
            // error names what was tried last, as an answer would.
            Err(err) if routed && universal.is_none() => {
                let step = u32::try_from(step).unwrap_or(u32::MAX);
                let mut resp = gw.refuse(
                    snap,
                    parts,
                    Some(provider.id.clone()),
                    Some(&target.model),
                    opts.payloads.then_some(&body[..]),
                    err,
                    start,
                    Some(step),
                );
                crate::proxy::say_cache_missed(&mut resp, opts);
                if let Ok(v) = HeaderValue::from_str(&target.provider) {
                    resp.headers_mut().insert("cf-aig-provider", v);
                }
                if let Ok(v) = HeaderValue::from_str(&target.model) {
                    resp.headers_mut().insert("cf-aig-model", v);
                }
                return Ok(Served::Answer(Box::new(resp)));
            }
            Err(err) => return Err(fail(err)),
        };
        break (taken, hide_usage, parts_held);
    };
    let Taken {
        mut head,
        body: taken,
    } = taken;
    strip_response_headers(&mut head.headers);
    if want.is_some() {
        head.headers.insert(cache::STATUS, cache::MISS);
    }
    if let Some(id) = event_id {
        head.headers.insert("cf-aig-event-id", id);
    }
    if let Ok(v) = HeaderValue::from_str(&log_id) {
        head.headers.insert("cf-aig-log-id", v);
    }
    // A universal step names what served it whatever its model, as the universal endpoint's
    // other steps do.
    let step = universal.as_ref().map_or(step, |u| u.index);
    if routed || universal.is_some() {
        head.headers.insert("cf-aig-step", HeaderValue::from(step));
        if let Ok(v) = HeaderValue::from_str(&target.provider) {
            head.headers.insert("cf-aig-provider", v);
        }
        if let Ok(v) = HeaderValue::from_str(&target.model) {
            head.headers.insert("cf-aig-model", v);
        }
    }
    crate::dlp::flag(&mut head.headers, &dlp_flags);
    let mut record = RequestRecord::new(
        gw.metrics.clone(),
        provider.id.clone(),
        parts.method.clone(),
        path,
        head.status.as_u16(),
        start,
        opts,
        log_id.clone(),
    );
    if let Some(m) = crate::cost::ModelName::named(&target.model) {
        record.set_model(m, &snap.pricing);
    }
    if routed || universal.is_some() {
        record.set_step(u32::try_from(step).unwrap_or(u32::MAX));
    }
    record.set_tally(gw.tally(snap));
    if let Some(w) = walk.as_mut() {
        record.charge_route_budgets(w.take_budget_charges());
    }
    record.set_request_payload(&body);
    let whole = match taken {
        TakenBody::Passed(upstream_body) => {
            // A stream passed through is whole only with its `data: [DONE]`.
            let stream = head.status.is_success() && is_event_stream(&head.headers);
            let body = if hide_usage && stream {
                head.headers.remove(header::CONTENT_LENGTH);
                let held = gw.buffers.guard(snap.max_buffered);
                ProxyBody::translated(
                    upstream_body,
                    Box::new(openai::HiddenUsage::new()),
                    held,
                    record,
                )
            } else if stream && provider.ends_streams_with_done() {
                ProxyBody::upstream_sse(upstream_body, record, sse::DoneWatch::default())
            } else {
                ProxyBody::upstream(upstream_body, record)
            };
            let fill = miss
                .as_mut()
                .and_then(|m| m.fill(&head))
                .map(|f| (f, gw.buffers.guard(snap.max_buffered)));
            return Ok(Served::Answer(Box::new(Response::from_parts(
                head,
                body.cached_through(fill),
            ))));
        }
        TakenBody::Translated(upstream_body, t) => {
            head.headers.remove(header::CONTENT_LENGTH);
            head.headers.remove(header::CONTENT_ENCODING);
            head.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            head.headers
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            let fill = miss
                .as_mut()
                .and_then(|m| m.fill(&head))
                .map(|f| (f, gw.buffers.guard(snap.max_buffered)));
            let held = gw.buffers.guard(snap.max_buffered);
            let body = ProxyBody::translated(upstream_body, t.stream_translator(), held, record);
            return Ok(Served::Answer(Box::new(Response::from_parts(
                head,
                body.cached_through(fill),
            ))));
        }
        TakenBody::Whole(whole) => whole,
    };
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.remove(header::CONTENT_ENCODING);
    // The request body, and the other parts of one sent in parts, are not needed any more.
    drop(held);
    drop(parts_held);
    let Whole {
        body: raw,
        mut held,
        t,
        made,
    } = *whole;
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            let err = e.into_gateway_error(&format!("the {} response", provider.id));
            tracing::warn!(provider = %provider.id, error = %err, log_id = %log_id, "response not delivered");
            // Logged and counted as the client got it.
            record.set_status(err.status().as_u16());
            record.finish_upstream_error();
            let mut resp = err.into_response();
            copy_gateway_headers(&head.headers, resp.headers_mut());
            return Ok(Served::Answer(Box::new(resp)));
        }
    };
    // Whether the answer is the upstream's (translated), or a gateway error made in its place.
    let mut delivered = true;
    // The model's output was not valid: OpenAI's error in place of the billed answer.
    let mut invalid = false;
    // A chat answer is counted from the provider's own usage, as its passthrough route counts
    // it (cache writes too, which the OpenAI format lacks); embeddings, which may be sent in
    // parts, from the translation, which sums them.
    let one_answer = endpoint == Endpoint::Chat;
    let out = match made {
        // An error answer, translated.
        None => t.error(head.status.as_u16(), &head.headers, &raw),
        Some(Err(NotMade::Part(FanOutFailure::Upstream(mut part, body)))) => {
            // The part that failed answers, with its own headers (its `Retry-After`, request
            // id), under the gateway's.
            strip_response_headers(&mut part.headers);
            part.headers.remove(header::CONTENT_LENGTH);
            part.headers.remove(header::CONTENT_ENCODING);
            copy_gateway_headers(&head.headers, &mut part.headers);
            let out = t.error(part.status.as_u16(), &part.headers, &body);
            head.status = part.status;
            head.headers = part.headers;
            head.extensions.remove::<RawHeaders>();
            if let Some(raw) = part.extensions.remove::<RawHeaders>() {
                head.extensions.insert(raw);
            }
            out
        }
        Some(Err(NotMade::Part(FanOutFailure::Gateway(err)))) => {
            tracing::warn!(provider = %provider.id, error = %err, log_id = %log_id, "response not delivered");
            head.status = err.status();
            delivered = false;
            err.to_json().into_bytes()
        }
        Some(Err(NotMade::Untranslatable(message))) => {
            // Made by the gateway, so in the SPEC.md envelope like its other 502s.
            let err = GatewayError::UpstreamUnavailable(format!(
                "the {} response could not be translated: {message}",
                provider.id
            ));
            tracing::warn!(provider = %provider.id, error = %err, log_id = %log_id, "untranslatable upstream response");
            head.status = err.status();
            delivered = false;
            err.to_json().into_bytes()
        }
        Some(Ok(Made { out, more_held })) => {
            held.absorb(more_held);
            match out {
                Translated::Answer(out) => out,
                Translated::InvalidOutput(e) => {
                    tracing::info!(provider = %provider.id, reason = %e.reason, log_id = %log_id, "the model's output was not valid: answered as OpenAI's 500 model_error");
                    head.status = openai::InvalidOutput::STATUS;
                    invalid = true;
                    e.to_json()
                }
            }
        }
    };
    if !delivered {
        // The gateway's error in place of the answer carries none of the provider's headers.
        let mut own = HeaderMap::new();
        copy_gateway_headers(&head.headers, &mut own);
        head.headers = own;
        head.extensions.remove::<RawHeaders>();
    }
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Logged and counted with the status the client got (a part's error, the gateway's); an
    // answer whose output was not valid still charged as the provider's 2xx: it billed it.
    if invalid {
        record.set_sent(head.status.as_u16());
    } else {
        record.set_status(head.status.as_u16());
    }
    if delivered && one_answer {
        record.observe_unsent(&raw);
        record.observe_bytes(&out);
    } else if delivered {
        record.observe(&out);
    } else {
        record.observe_bytes(&out);
    }
    if let Some(fill) = miss.as_mut().and_then(|m| m.fill(&head)) {
        fill.whole(&out);
    }
    // The translation takes the place of the answer it came from: complete once the client
    // took it (see `ProxyBody::answer`). An error made in its place is an upstream error.
    let body = if delivered && !invalid {
        ProxyBody::answer(out, Some(held), record)
    } else {
        record.finish_upstream_error();
        ProxyBody::full_held(out, held)
    };
    Ok(Served::Answer(Box::new(Response::from_parts(head, body))))
}

/// Whether an upstream's answer is a stream of server-sent events.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"))
}

/// The request timeout and retries of a route target: its own where it has them.
fn target_limits(
    target: &Target,
    timeout: std::time::Duration,
    retries: Policy,
) -> (std::time::Duration, Policy) {
    let mut policy = retries;
    if let Some(n) = target.attempts {
        policy.max_attempts = n;
    }
    (target.timeout.unwrap_or(timeout), policy)
}

/// An upstream answer to a `/compat` target, as the client is to get it.
struct Taken {
    head: http::response::Parts,
    body: TakenBody,
}

enum TakenBody {
    /// Passed through as it comes (an OpenAI-format provider's).
    Passed(UpstreamBody),
    /// A 2xx stream, translated event by event as it comes.
    Translated(UpstreamBody, Translation),
    /// Held back whole, to be translated.
    Whole(Box<Whole>),
}

/// An answer held back whole to be translated.
struct Whole {
    /// Its body, or why it could not be read whole.
    body: Result<Bytes, HoldError>,
    /// The body's bytes in the budget of buffered bodies.
    held: Held,
    t: Translation,
    /// For a 2xx answer read whole, the client's answer made from it (or why none could be).
    made: Option<Result<Made, NotMade>>,
}

/// The client's answer made from a 2xx answer held back whole.
struct Made {
    out: Translated,
    /// The other parts' answers of a request sent in parts, in the budget of buffered bodies.
    more_held: Held,
}

/// Why no answer could be made from a 2xx answer held back whole.
enum NotMade {
    /// Another part of a request sent in parts failed.
    Part(FanOutFailure),
    /// The answer is not what its provider's format says (why).
    Untranslatable(String),
}

/// Why a target failed.
struct Failed {
    why: String,
    /// Whether the next target (a route's, the universal endpoint's next step) is tried: not
    /// when the gateway's own budget of buffered bodies is full.
    hands_on: bool,
}

impl Taken {
    fn passed(resp: Response<UpstreamBody>) -> Self {
        let (head, body) = resp.into_parts();
        Self {
            head,
            body: TakenBody::Passed(body),
        }
    }

    fn translated(resp: Response<UpstreamBody>, t: Translation) -> Self {
        let (head, body) = resp.into_parts();
        Self {
            head,
            body: TakenBody::Translated(body, t),
        }
    }

    fn whole(answer: HeldAnswer, t: Translation, made: Option<Result<Made, NotMade>>) -> Self {
        let HeldAnswer { head, body, held } = answer;
        Self {
            head,
            body: TakenBody::Whole(Box::new(Whole {
                body,
                held,
                t,
                made,
            })),
        }
    }

    /// Why the target failed, if it did: a non-2xx answer, or one held back whole (to be
    /// translated, or for the response checks) that could not be read whole, whose other parts
    /// failed, or that could not be translated.
    fn failure(&self) -> Option<Failed> {
        let status = self.head.status.as_u16();
        let failed = |why: String, hands_on| Some(Failed { why, hands_on });
        let unread = |e: &HoldError| {
            failed(
                format!("status {status}, reading the answer: {e}"),
                !matches!(e, HoldError::Exhausted(_)),
            )
        };
        let whole = match &self.body {
            TakenBody::Whole(whole) => whole,
            TakenBody::Passed(body) | TakenBody::Translated(body, _) => {
                return match body.unread() {
                    Some(e) => unread(e),
                    None if self.head.status.is_success() => None,
                    None => failed(format!("status {status}"), true),
                };
            }
        };
        match (&whole.body, &whole.made) {
            (Err(e), _) => unread(e),
            (Ok(_), None) => failed(format!("status {status}"), true),
            (Ok(_), Some(Ok(_))) => None,
            (Ok(_), Some(Err(NotMade::Part(FanOutFailure::Upstream(part, _))))) => failed(
                format!("a part of the request: status {}", part.status.as_u16()),
                true,
            ),
            (Ok(_), Some(Err(NotMade::Part(FanOutFailure::Gateway(e))))) => failed(
                format!("a part of the request: {e}"),
                !matches!(e, GatewayError::BuffersFull { .. }),
            ),
            (Ok(_), Some(Err(NotMade::Untranslatable(m)))) => {
                failed(format!("the answer could not be translated: {m}"), true)
            }
        }
    }
}

/// An upstream answer to a translated `/compat` request, as an attempt read it.
enum Answer {
    /// A 2xx stream's head: its events are translated as they come.
    Streamed(Response<UpstreamBody>),
    /// Anything else, held back whole.
    Held(HeldAnswer),
}

/// Reads an answer to a translated `/compat` request within an attempt: a 2xx stream when the
/// client asked for a stream (its head, or whole for the response checks, see
/// [`proxy::read_passed_on`]), anything else whole (see [`HeldAnswer::read`]).
async fn read_translated(
    gw: &Gateway,
    snap: &Snapshot,
    stream: bool,
    resp: Response<UpstreamBody>,
) -> Read<Answer> {
    if stream && resp.status().is_success() {
        return proxy::read_passed_on(gw, snap, resp)
            .await
            .map(Answer::Streamed);
    }
    let read = HeldAnswer::read(gw, snap.max_buffered, MAX_RESPONSE_BYTES, resp);
    read.await.map(Answer::Held)
}

/// Makes the client's answer from a 2xx answer held back whole (`raw`): the other parts of a
/// request sent in parts (`more`) sent as the first went (`auth`, `waits`, `policy`), and every
/// answer translated.
#[allow(clippy::too_many_arguments)] // the target's, each from where the first part went
async fn make(
    gw: &Gateway,
    t: &Translation,
    raw: &[u8],
    more: Vec<Request<Full<Bytes>>>,
    auth: Option<&AttemptAuth<'_>>,
    waits: Waits,
    policy: &Policy,
    provider: &Arc<str>,
    snap: &Snapshot,
) -> Result<Made, NotMade> {
    let (rest, more_held) = fan_out(gw, more, auth, waits, policy, provider, snap.max_buffered)
        .await
        .map_err(NotMade::Part)?;
    let out = translate_all(t, raw, &rest).map_err(NotMade::Untranslatable)?;
    Ok(Made { out, more_held })
}

/// Why the rest of a request sent in parts failed.
enum FanOutFailure {
    /// A part's upstream answered with an error: its head and body, translated for the client.
    Upstream(http::response::Parts, Bytes),
    /// A part could not be sent or read.
    Gateway(GatewayError),
}

/// Most parts of a request sent in parts in flight at once.
const FAN_OUT_CONCURRENCY: usize = 8;

/// Sends the other parts of a request sent in parts as the first went (`auth`, `waits`,
/// `policy`: a part whose answer breaks off is retried too), a few at once, and reads their
/// answers whole, in order. Nothing to send: nothing is done.
async fn fan_out(
    gw: &Gateway,
    parts: Vec<Request<Full<Bytes>>>,
    auth: Option<&AttemptAuth<'_>>,
    waits: Waits,
    policy: &Policy,
    provider: &Arc<str>,
    max_buffered: u64,
) -> Result<(Vec<Bytes>, Held), FanOutFailure> {
    use futures_util::StreamExt as _;
    let mut held = gw.buffers.guard(max_buffered);
    if parts.is_empty() {
        return Ok((Vec::new(), held));
    }
    let answers = futures_util::stream::iter(parts)
        .map(|req| async move {
            let read = |resp| HeldAnswer::read(gw, max_buffered, MAX_RESPONSE_BYTES, resp);
            let answer = gw
                .dispatch(req, auth, waits, policy, provider, read)
                .await
                .map_err(FanOutFailure::Gateway)?;
            let body = answer.body.map_err(|e| {
                FanOutFailure::Gateway(e.into_gateway_error(&format!("the {provider} response")))
            })?;
            if answer.head.status.is_success() {
                Ok((body, answer.held))
            } else {
                Err(FanOutFailure::Upstream(answer.head, body))
            }
        })
        .buffered(FAN_OUT_CONCURRENCY);
    let mut answers = std::pin::pin!(answers);
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        let (body, part) = answer?;
        held.absorb(part);
        out.push(body);
    }
    Ok((out, held))
}

/// The client's answer from the upstream's: one translated body, or for embeddings sent in
/// parts, one list of every part's vectors in order (their input tokens added up).
fn translate_all(t: &Translation, first: &[u8], rest: &[Bytes]) -> Result<Translated, String> {
    if rest.is_empty() {
        return t.body(first);
    }
    let vectors_of = match t.wire {
        Wire::Google => gemini::embed_vectors,
        Wire::Bedrock => bedrock::embed_vectors,
        Wire::Anthropic => return Err("Anthropic has no embeddings".into()),
    };
    let (mut all, mut tokens) = vectors_of(first)?;
    for answer in rest {
        let (vectors, n) = vectors_of(answer)?;
        all.extend(vectors);
        tokens += n;
    }
    Ok(Translated::Answer(openai::embeddings_json(
        &t.ctx.model,
        &all,
        t.ctx.base64,
        tokens,
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A response context with fixed id and time.
    pub fn ctx(include_usage: bool, json_tool: bool) -> ResponseCtx {
        ResponseCtx {
            id: "chatcmpl-test0001".into(),
            model: "test-model".into(),
            created: 1_700_000_000,
            include_usage,
            json_tool,
            base64: false,
        }
    }

    /// The client's answer a complete response was translated to (panics on anything else).
    pub fn answer(translated: Result<Translated, String>) -> Vec<u8> {
        match translated {
            Ok(Translated::Answer(out)) => out,
            other => panic!("not an answer: {other:?}"),
        }
    }

    /// Runs a stream translator over `chunks`; the output as text.
    pub fn run_stream<C: AsRef<[u8]>>(t: &mut dyn StreamTranslator, chunks: &[C]) -> String {
        let mut out = BytesMut::new();
        for c in chunks {
            t.push(c.as_ref(), &mut out);
        }
        t.finish(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Same as [`run_stream`], for binary input.
    pub fn run_stream_bytes<C: AsRef<[u8]>>(t: &mut dyn StreamTranslator, chunks: &[C]) -> String {
        run_stream(t, chunks)
    }

    /// The `delta` of every chunk in translated SSE output.
    pub fn deltas(out: &str) -> Vec<Value> {
        out.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v.pointer("/choices/0/delta").cloned())
            .collect()
    }

    /// The thinking in stream deltas: the `reasoning_content` text joined, and every
    /// `thinking_blocks` entry in order.
    pub fn thinking_of(deltas: &[Value]) -> (String, Vec<&Value>) {
        let reasoning = deltas
            .iter()
            .filter_map(|d| d["reasoning_content"].as_str())
            .collect();
        let blocks = deltas
            .iter()
            .filter_map(|d| d["thinking_blocks"].as_array())
            .flatten()
            .collect();
        (reasoning, blocks)
    }

    /// `data` cut at `cuts` (sorted, clamped).
    pub fn cut(data: &[u8], cuts: Vec<usize>) -> Vec<&[u8]> {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for c in cuts {
            pieces.push(&data[start..c]);
            start = c;
        }
        pieces.push(&data[start..]);
        pieces
    }

    fn golden_path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/compat")
            .join(name)
    }

    /// Compares `text` with the golden file `name` (written when missing or with
    /// `UPDATE_GOLDEN=1`).
    pub fn golden(name: &str, text: &str) {
        let path = golden_path(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() || !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).expect("golden dir");
            }
            std::fs::write(&path, text).expect("write golden");
            return;
        }
        let want = std::fs::read_to_string(&path).expect("read golden");
        assert_eq!(
            text, want,
            "golden file {name} differs (UPDATE_GOLDEN=1 rewrites it)"
        );
    }

    /// [`golden`] of a JSON body, pretty-printed with sorted keys.
    pub fn golden_json(name: &str, body: &[u8]) {
        let v: Value = serde_json::from_slice(body).expect("json body");
        let text = serde_json::to_string_pretty(&v).expect("pretty") + "\n";
        golden(name, &text);
    }

    fn embeddings(extra: &str, texts: usize) -> (Vec<u8>, openai::EmbeddingsRequest) {
        let input: Vec<String> = (0..texts).map(|i| format!("text {i}")).collect();
        let body = format!(
            r#"{{"model":"m","input":{},"user":"someone"{extra}}}"#,
            serde_json::to_string(&input).expect("texts")
        );
        let req = openai::EmbeddingsRequest::parse(body.as_bytes()).expect("valid");
        (body.into_bytes(), req)
    }

    fn titan(one: &openai::EmbeddingsRequest) -> Result<Vec<u8>, GatewayError> {
        bedrock::embed_request(one, bedrock::EmbedModel::Titan)
    }

    fn vertex(one: &openai::EmbeddingsRequest) -> Result<Vec<u8>, GatewayError> {
        gemini::vertex_embed_request(one, "google-vertex-ai")
    }

    fn total(parts: &(Vec<u8>, Vec<Vec<u8>>)) -> usize {
        parts.0.len() + parts.1.iter().map(Vec::len).sum::<usize>()
    }

    #[test]
    fn a_list_sent_one_text_per_request_costs_about_the_request_not_a_copy_per_text() {
        // Vertex has no place for other fields: a large one is not repeated 256 times.
        let junk = format!(r#","junk":"{}""#, "j".repeat(64 << 10));
        let (body, req) = embeddings(&junk, openai::MAX_FAN_OUT);
        let parts = embed_bodies(req, true, "google-vertex-ai", vertex).expect("parts");
        assert_eq!(parts.1.len(), openai::MAX_FAN_OUT - 1);
        assert!(
            total(&parts) < body.len(),
            "{} of {}",
            total(&parts),
            body.len()
        );
        let last: Value = serde_json::from_slice(parts.1.last().expect("parts")).expect("json");
        assert_eq!(
            last,
            serde_json::json!({"instances": [{"content": "text 255"}]})
        );
        // Titan takes them: small ones go to every part, large ones are refused.
        let (_, req) = embeddings(r#","normalize":true"#, 3);
        let (first, rest) = embed_bodies(req, true, "aws-bedrock", titan).expect("parts");
        for (part, text) in [&first, &rest[0], &rest[1]]
            .into_iter()
            .zip(["text 0", "text 1", "text 2"])
        {
            let v: Value = serde_json::from_slice(part).expect("json");
            assert_eq!(v, serde_json::json!({"inputText": text, "normalize": true}));
        }
        let (_, req) = embeddings(&junk, openai::MAX_FAN_OUT);
        let err = embed_bodies(req, true, "aws-bedrock", titan).expect_err("too much to repeat");
        assert_eq!(err.status().as_u16(), 400);
        assert!(err.to_string().contains("would repeat"), "{err}");
        // One text is one request, sent as it is.
        let (_, req) = embeddings(&junk, 1);
        let (one, more) = embed_bodies(req, true, "aws-bedrock", titan).expect("one");
        assert!(more.is_empty() && one.len() > 64 << 10);
    }

    #[test]
    fn model_strings_name_provider_and_model() {
        assert_eq!(
            split_model("anthropic/claude-sonnet-4-5"),
            Ok(("anthropic", "claude-sonnet-4-5"))
        );
        assert_eq!(
            split_model("aws-bedrock/us-east-1/a.b:0"),
            Ok(("aws-bedrock", "us-east-1/a.b:0"))
        );
        for bad in ["gpt-4o", "/x", "openai/", ""] {
            assert_eq!(split_model(bad).map_err(|e| e.code()), Err(2107), "{bad}");
        }
        // Routes and chains are resolved before this (routing.rs); here they are plain names.
        assert_eq!(split_model("dynamic/support"), Ok(("dynamic", "support")));
    }

    #[test]
    fn openai_compatible_providers_get_their_chat_path() {
        let r =
            |p, m| openai_route(p, Endpoint::Chat, m, None).map(|(r, q, m)| (r, q, m.to_owned()));
        assert_eq!(
            r("openai", "gpt-4o").ok(),
            Some(("chat/completions".into(), None, "gpt-4o".into()))
        );
        assert_eq!(
            r("mistral", "m").ok().map(|x| x.0),
            Some("v1/chat/completions".into())
        );
        assert_eq!(
            r("azure-openai", "res/dep").ok(),
            Some((
                "res/dep/chat/completions".into(),
                Some(AZURE_API_VERSION.into()),
                "dep".into()
            ))
        );
        assert!(r("azure-openai", "only").is_err());
        // Azure's v1 API: the model in the body, no api-version added.
        assert_eq!(
            r("azure-openai", "res/openai/v1/gpt-4.1").ok(),
            Some((
                "res/openai/v1/chat/completions".into(),
                None,
                "gpt-4.1".into()
            ))
        );
    }

    /// The upstream URI /compat sends a model of `provider` to: its chat path (`openai_route`)
    /// under the provider's built-in base, as `send` puts them together; `account` as a long-form
    /// URL gives it.
    fn compat_upstream_uri(provider: &str, endpoint: Endpoint, account: Option<&str>) -> String {
        let (table, _) = crate::providers::ProviderTable::build(
            &std::collections::BTreeMap::new(),
            &crate::keys::KeyStore::default(),
        )
        .expect("built-in providers");
        let p = table.get(provider).expect("a built-in provider");
        let (rest, query, _) =
            openai_route(provider, endpoint, "some-model", None).expect(provider);
        let route = ProviderRoute {
            provider,
            rest: &rest,
            account,
            gateway: None,
        };
        p.upstream_uri(&route, query.as_deref())
            .expect(provider)
            .to_string()
    }

    #[test]
    fn openai_compatible_providers_reach_their_openai_compatible_api() {
        // SPEC.md's bases; each provider's OpenAI-compatible API is under v1/ (cohere:
        // compatibility/v1/; huggingface: v1/, not the Inference API's /models/{model}).
        for (provider, account, uri) in [
            ("openai", None, "https://api.openai.com/v1/chat/completions"),
            (
                "mistral",
                None,
                "https://api.mistral.ai/v1/chat/completions",
            ),
            ("grok", None, "https://api.x.ai/v1/chat/completions"),
            (
                "openrouter",
                None,
                "https://openrouter.ai/api/v1/chat/completions",
            ),
            (
                "huggingface",
                None,
                "https://api-inference.huggingface.co/v1/chat/completions",
            ),
            (
                "workers-ai",
                Some("acct123"),
                "https://api.cloudflare.com/client/v4/accounts/acct123/ai/v1/chat/completions",
            ),
            (
                "cohere",
                None,
                "https://api.cohere.ai/compatibility/v1/chat/completions",
            ),
        ] {
            assert_eq!(
                compat_upstream_uri(provider, Endpoint::Chat, account),
                uri,
                "{provider}"
            );
        }
        assert_eq!(
            compat_upstream_uri("cohere", Endpoint::Embeddings, None),
            "https://api.cohere.ai/compatibility/v1/embeddings"
        );
        assert_eq!(
            compat_upstream_uri("workers-ai", Endpoint::Embeddings, Some("acct123")),
            "https://api.cloudflare.com/client/v4/accounts/acct123/ai/v1/embeddings"
        );
        // Not Workers AI's native run/ path, which takes another body.
        assert!(!compat_upstream_uri("workers-ai", Endpoint::Chat, Some("a")).contains("/run/"));
    }

    #[test]
    fn vertex_models_take_project_region_and_name() {
        assert_eq!(
            vertex_prefix("p1/us-central1/gemini-2.5-flash", None, None)
                .ok()
                .as_deref(),
            Some("v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-flash")
        );
        assert!(
            vertex_prefix(
                "projects/p/locations/r/publishers/anthropic/models/c",
                None,
                None
            )
            .is_err()
        );
        assert!(vertex_prefix("p/../m", None, None).is_err());
    }

    #[test]
    fn vertex_publisher_models_need_a_stored_service_account_key() {
        let err = vertex_prefix("google/gemini-2.5-pro", None, Some("team-b"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("google-vertex-ai.team-b"), "{err}");
        assert!(err.contains("{project}/{region}/{model}"), "{err}");
    }
}
