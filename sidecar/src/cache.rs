//! Response cache: identical requests are answered from the sidecar's memory.
//!
//! The key is a SHA-256 over the route (provider, where it goes upstream, method, path, query),
//! the key identity (the BYOK alias, or a digest of the client's own provider key), the request
//! headers that change the answer ([`ANSWER_HEADERS`]), and the request body normalized as JSON
//! (object keys sorted, whitespace dropped; its bytes when a number in it is not read exactly)
//! — or, in place of the body, `cf-aig-cache-key` when the client names one (so a custom key
//! never reaches across providers, routes or keys). Only `POST`s to inference endpoints that
//! make nothing the provider keeps are looked up and stored ([`cacheable`]), and only their
//! `200` responses that are no failure, without the headers that are one response's own;
//! streamed ones (server-sent events, Bedrock's event streams, Gemini's JSON stream) only with
//! `spec.cache.streaming`, and only when they ended whole (`ended_whole`). A response is copied
//! into the cache as it streams to the client and stored once its last byte went through; a body
//! that fails, is cut off or outgrows one entry's share of the cache is not stored. Entries
//! expire after their TTL and the least valuable ones are evicted when the cache is full
//! (S3-FIFO, by size).
//!
//! Identical requests that miss at the same time make one upstream call: the first is the
//! leader of a [`Flights`] entry, the others wait (at most [`COALESCE_WAIT`], and at most their
//! own request timeout) until its response
//! is stored or turns out not to be storable, then look again — a hit, or a call of their own.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use memchr::memmem::Finder;
use sha2::{Digest, Sha256};
use sidegate_crds::policy::Cache as CachePolicy;

use crate::error::GatewayError;
use crate::headers::{GatewayHeaders, Gw};
use crate::shared::{CachedResponse, Shared};
use crate::telemetry::Metrics;

/// TTL when neither the config nor `cf-aig-cache-ttl` sets one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Memory for cached responses when the config sets no `maxSize`.
pub const DEFAULT_MAX_SIZE: u64 = 16 << 20;
const MIN_TTL: Duration = CachePolicy::MIN_TTL;
const MAX_TTL: Duration = CachePolicy::MAX_TTL;
/// Longest `cf-aig-cache-key`.
const MAX_CUSTOM_KEY: usize = 1024;
/// Longest a request waits for an identical one's response before calling upstream itself.
pub const COALESCE_WAIT: Duration = Duration::from_secs(30);

/// `HIT` or `MISS` on every response of a request the cache was on for.
pub const STATUS: HeaderName = HeaderName::from_static("cf-aig-cache-status");
/// `cf-aig-cache-status` values.
pub const HIT: HeaderValue = HeaderValue::from_static("HIT");
/// See [`HIT`].
pub const MISS: HeaderValue = HeaderValue::from_static("MISS");

/// The cache settings of a loaded config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Cache every request (else only those with `cf-aig-cache-ttl`).
    pub enabled: bool,
    /// Default TTL.
    pub ttl: Duration,
    /// Memory for entries, in bytes.
    pub max_size: u64,
    /// Also store streamed responses.
    pub streaming: bool,
    /// Entries live in the gateway's Redis (else in memory).
    pub redis: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: DEFAULT_TTL,
            max_size: DEFAULT_MAX_SIZE,
            streaming: false,
            redis: false,
        }
    }
}

impl Settings {
    /// Settings from `spec.cache` (backends other than memory are refused before this); the
    /// error names the bad field.
    pub fn from_policy(policy: Option<&CachePolicy>) -> Result<Self, String> {
        let Some(p) = policy else {
            return Ok(Self::default());
        };
        if let Some(why) = p.problem() {
            return Err(format!("spec.{why}"));
        }
        Ok(Self {
            enabled: p.enabled,
            ttl: p.ttl.map_or(DEFAULT_TTL, |d| d.get()),
            max_size: p.max_size.map_or(DEFAULT_MAX_SIZE, |s| s.get()),
            streaming: p.streaming,
            redis: p.backend == sidegate_crds::policy::CacheBackend::Redis,
        })
    }
}

/// What one request asks of the cache (from the settings and its `cf-aig-*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want<'a> {
    /// TTL of a stored response.
    pub ttl: Duration,
    /// `cf-aig-skip-cache: true`: neither read nor store.
    pub skip: bool,
    /// `cf-aig-cache-key`.
    pub custom_key: Option<&'a str>,
}

/// Whether the cache is on for a request, and how; `None` when it is off. As Cloudflare's: a
/// request's `cf-aig-cache-ttl` turns it on for that request, and so does a `cf-aig-cache-key`
/// ("If caching is not enabled for the gateway, responses will be cached for 5 minutes by
/// default"); a TTL of `0` turns it off for the request, like `cf-aig-skip-cache`.
pub fn want<'a>(
    s: &Settings,
    headers: GatewayHeaders<'a>,
) -> Result<Option<Want<'a>>, GatewayError> {
    let skip = headers.flag(Gw::SkipCache)?.unwrap_or(false);
    let ttl = match headers.get(Gw::CacheTtl) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
                .filter(|d| d.is_zero() || (MIN_TTL..=MAX_TTL).contains(d))
                .ok_or_else(|| GatewayError::BadHeader {
                    name: headers.name(Gw::CacheTtl),
                    reason: "expected 0 (no caching) or seconds between 60 and 2592000 (30 days)"
                        .into(),
                })?,
        ),
    };
    let custom_key = match headers.get(Gw::CacheKey) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= MAX_CUSTOM_KEY)
                .ok_or_else(|| GatewayError::BadHeader {
                    name: headers.name(Gw::CacheKey),
                    reason: "expected 1 to 1024 visible ASCII characters".into(),
                })?,
        ),
    };
    let ttl = match ttl {
        // No caching for this request; with the cache off, nothing to say about it either.
        Some(t) if t.is_zero() && !s.enabled => return Ok(None),
        Some(t) => t,
        None if s.enabled => s.ttl,
        None if custom_key.is_some() => DEFAULT_TTL,
        None => return Ok(None),
    };
    Ok(Some(Want {
        ttl,
        skip: skip || ttl.is_zero(),
        custom_key,
    }))
}

/// A cache key.
pub type Key = [u8; 32];

/// The keys whose response some request is fetching now.
#[derive(Debug, Default)]
pub struct Flights {
    fetching: Arc<Mutex<HashMap<Key, tokio::sync::watch::Receiver<()>>>>,
}

/// A request's part in fetching its key's response.
#[derive(Debug)]
pub enum Flight {
    /// First to miss: fetch, and hold the guard until the response is stored (or is not).
    Leader(FlightGuard),
    /// Another request is fetching: wait for it.
    Follower(tokio::sync::watch::Receiver<()>),
}

impl Flights {
    /// Joins the fetch of `key`, leading it when none is under way.
    pub fn join(&self, key: Key) -> Flight {
        let mut fetching = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = fetching.get(&key) {
            return Flight::Follower(rx.clone());
        }
        let (done, rx) = tokio::sync::watch::channel(());
        fetching.insert(key, rx);
        Flight::Leader(FlightGuard {
            key,
            fetching: self.fetching.clone(),
            _done: done,
        })
    }

    /// Keys being fetched now.
    pub fn len(&self) -> usize {
        self.fetching
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no key is being fetched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits until the leader of a fetch is done (or `limit` passed).
pub async fn wait_for_leader(mut leader: tokio::sync::watch::Receiver<()>, limit: Duration) {
    // The leader never sends: its guard's drop closes the channel, which ends the wait.
    let _ = tokio::time::timeout(limit, leader.changed()).await;
}

/// Held by the request fetching a key; dropped once its response was stored or will not be,
/// which wakes the requests waiting for it.
#[derive(Debug)]
pub struct FlightGuard {
    key: Key,
    fetching: Arc<Mutex<HashMap<Key, tokio::sync::watch::Receiver<()>>>>,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // Out of the map first, so a request arriving now leads a new fetch or finds the entry;
        // the waiters wake when `_done` drops right after.
        self.fetching
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What a request is, for its cache key.
pub struct Request<'a> {
    /// `provider` or `compat`.
    pub scope: &'a str,
    /// Provider id.
    pub provider: &'a str,
    /// Where the request goes ([`crate::providers::Provider::upstream`]; a route's: those of
    /// every provider it may reach): a reload that points the provider at another upstream
    /// leaves the former one's entries unused.
    pub upstream: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Path after the provider (or after `compat/`).
    pub path: &'a str,
    /// Query string.
    pub query: Option<&'a str>,
    /// The BYOK alias used (`default` when none was named).
    pub alias: &'a str,
    /// The client's request headers: the [`ANSWER_HEADERS`] among them, and those named by
    /// `client_auth`, are part of the key.
    pub headers: &'a HeaderMap,
    /// When the client brings its own provider key: the headers that carry it, part of the key
    /// so that clients with different keys never share entries.
    pub client_auth: Option<&'a [HeaderName]>,
    /// The client's `Accept-Encoding` goes upstream (its own signature covers it): the answer's
    /// coding depends on it.
    pub accept_encoding: bool,
    /// The request body.
    pub body: &'a [u8],
    /// The account of a long-form URL, when it goes into the upstream URL (`workers-ai` without
    /// a configured account id): another account is another upstream.
    pub account: Option<&'a str>,
}

/// Request headers that go upstream and change the provider's answer (the OpenAI project or
/// organization it runs in, the Anthropic API version and betas, the Bedrock guardrail applied
/// and its trace, the format asked for): requests that differ in them never share an entry.
pub static ANSWER_HEADERS: [HeaderName; 9] = [
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("x-amzn-bedrock-guardrailidentifier"),
    HeaderName::from_static("x-amzn-bedrock-guardrailversion"),
    HeaderName::from_static("x-amzn-bedrock-trace"),
    header::ACCEPT,
];

/// Last path segments of the endpoints whose answer is the model's answer to the request body
/// (chat, completions, messages, embeddings, rerank, moderation, images, speech, Bedrock's
/// Converse and InvokeModel; the Responses API's `responses` unless in the background or in a
/// conversation), which
/// [`cacheable`] lets the cache answer.
const INFERENCE: [&str; 18] = [
    "completions",
    "completion",
    "chat",
    "messages",
    "count_tokens",
    "embeddings",
    "embed",
    "rerank",
    "moderations",
    "generate",
    "generations",
    "speech",
    "transcriptions",
    "translations",
    "converse",
    "converse-stream",
    "invoke",
    "invoke-with-response-stream",
];

/// Google's (AI Studio, Vertex) model methods (`models/{m}:{method}`) that answer the body.
const GOOGLE_INFERENCE: [&str; 8] = [
    "generateContent",
    "streamGenerateContent",
    "embedContent",
    "batchEmbedContents",
    "countTokens",
    "predict",
    "rawPredict",
    "streamRawPredict",
];

/// Path segments of stored state (OpenAI's threads and their messages and runs, assistants,
/// batches, vector stores; Perplexity's async jobs, `async/chat/completions`): nothing under
/// them is answered from the cache.
const STATEFUL: [&str; 5] = ["threads", "assistants", "batches", "vector_stores", "async"];

/// Whether a request's answer may come from the cache and be stored in it: a `POST` to an
/// inference endpoint — its answer is the model's answer to the body. Everything else reads or
/// changes state the provider keeps (a batch's, a run's or a stored response's status, a
/// thread's messages, a file, a `background: true` response, a conversation's turn, a
/// deferred completion, an async job, a queued batch or its poll, a deletion), and is answered
/// by the provider every time, as with `cf-aig-skip-cache`. The path is read percent-decoded,
/// as the provider reads it (`%61sync/chat/completions` is Perplexity's async API).
pub fn cacheable(r: &Request<'_>) -> bool {
    if r.method != "POST" {
        return false;
    }
    let decoded;
    let mut path = r.path;
    if memchr::memchr(b'%', path.as_bytes()).is_some() {
        decoded = crate::cost::percent_decode(path);
        path = &decoded;
    }
    let path = path.trim_matches('/');
    if path.split('/').any(|s| STATEFUL.contains(&s)) {
        return false;
    }
    // Workers AI runs the model its path names (`@cf/...`, `@hf/...`), the Hugging Face
    // Inference API too (`models/{model}`, `pipeline/{task}/{model}`).
    if path.starts_with('@') || path.contains("/@") {
        return !queues_batch(r.query) && !body_keeps_state(r.body, true);
    }
    if r.provider == "huggingface" && (path.starts_with("models/") || path.starts_with("pipeline/"))
    {
        return !body_keeps_state(r.body, false);
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    if let Some((_, method)) = last.rsplit_once(':') {
        return GOOGLE_INFERENCE.contains(&method);
    }
    if last == "responses" {
        return !keeps_state(r.body);
    }
    INFERENCE.contains(&last) && !body_keeps_state(r.body, false)
}

/// Whether a Workers AI request goes to its Batch API (`?queueRequest=true`): a submit queues
/// the batch and answers its `request_id`, a poll (`{"request_id": ...}`) answers what the
/// queue holds now (`queued`, `running`, or the results).
fn queues_batch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|p| {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            name == "queueRequest" && !value.eq_ignore_ascii_case("false")
        })
    })
}

/// Whether a Responses API body changes state the provider keeps (or cannot be read to tell):
/// a background response is fetched later by its id, so each request makes one; a turn in a
/// `conversation` is added to it, so a cached answer would leave the conversation without it.
fn keeps_state(body: &[u8]) -> bool {
    crate::background::CreateState::of(body).is_none_or(|s| s.background || s.conversation)
}

/// Built once: a searcher's set-up costs more than searching a short body.
static DEFERRED_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"deferred\""));
static CONVERSATION_ID_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"conversation_id\""));
static REQUEST_ID_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"request_id\""));

/// Whether an inference body makes or reads state the provider keeps, by its top-level keys
/// (read as the providers' JSON parsers read them: escapes decoded, the last value of a key
/// given twice): xAI's `"deferred": true` (the answer is a `request_id` whose result can be
/// fetched once), Cohere's v1 chat in a `conversation_id` (the turn is added to it), and, for
/// a Workers AI model (`workers_ai`), a Batch API poll (`{"request_id": ...}`: what the queue
/// holds now). A body that names none of them, plainly or with escaped letters, is not parsed;
/// one that is not a JSON object makes nothing (an upload, audio).
pub fn body_keeps_state(body: &[u8], workers_ai: bool) -> bool {
    if DEFERRED_KEY.find(body).is_none()
        && CONVERSATION_ID_KEY.find(body).is_none()
        && (!workers_ai || REQUEST_ID_KEY.find(body).is_none())
        && !crate::cost::escapes_ascii_letter(body)
    {
        return false;
    }
    crate::text::top_level_values(body, ["deferred", "conversation_id", "request_id"]).is_some_and(
        |[deferred, conversation_id, request_id]| {
            deferred.and_then(|v| v.as_bool()) == Some(true)
                || conversation_id.is_some_and(|v| !v.is_null())
                || (workers_ai && request_id.is_some_and(|v| !v.is_null()))
        },
    )
}

/// Whether a request asks for a stream that its answer's content type does not mark as one:
/// Gemini's `:streamGenerateContent` without `alt=sse`, a JSON array written as it is made.
pub fn streams_json(r: &Request<'_>) -> bool {
    r.path
        .trim_end_matches('/')
        .ends_with(":streamGenerateContent")
}

/// The key of a request: its route, whose credentials and the headers that change the answer,
/// then its body — or, instead of the body, `custom` from `cf-aig-cache-key`, which names
/// an entry within that scope and never reaches another provider, route or key's entries.
pub fn key(r: &Request<'_>, custom: Option<&str>) -> Key {
    let mut h = Sha256::new();
    for part in [
        r.scope,
        r.provider,
        r.upstream,
        r.method,
        r.path,
        r.query.unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    if let Some(account) = r.account {
        h.update(b"account\0");
        h.update(account.as_bytes());
        h.update(b"\0");
    }
    let hash_headers = |h: &mut Sha256, names: &[HeaderName]| {
        for name in names {
            for v in r.headers.get_all(name) {
                h.update(name.as_str().as_bytes());
                h.update(b":");
                h.update(v.as_bytes());
                h.update(b"\0");
            }
        }
    };
    match r.client_auth {
        None => {
            h.update(b"alias\0");
            h.update(r.alias.as_bytes());
        }
        Some(names) => {
            h.update(b"client\0");
            hash_headers(&mut h, names);
        }
    }
    h.update(b"\0headers\0");
    hash_headers(&mut h, &ANSWER_HEADERS);
    if r.accept_encoding {
        hash_headers(&mut h, &[header::ACCEPT_ENCODING]);
    }
    if let Some(c) = custom {
        h.update(b"\0custom\0");
        h.update(c.as_bytes());
        return h.finalize().into();
    }
    h.update(b"\0body\0");
    // A form (an audio transcription, an image edit) by its parts: the boundary between them
    // is drawn at random for each request.
    if let Some(parts) =
        crate::multipart::boundary(r.headers).and_then(|b| crate::multipart::parts(r.body, &b))
    {
        h.update(b"form\0");
        for part in parts {
            for bytes in [part.headers, part.data] {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
        }
        return h.finalize().into();
    }
    let canonical = serde_json::from_slice::<serde_json::Value>(r.body)
        .ok()
        .and_then(|v| {
            let mut out = Vec::with_capacity(r.body.len());
            canonical_json(&v, &mut out).then_some(out)
        });
    match canonical {
        Some(out) => {
            h.update(b"json\0");
            h.update(&out);
        }
        // Not JSON, or JSON that was not read exactly: the bytes as they are.
        None => {
            h.update(b"bytes\0");
            h.update(r.body);
        }
    }
    h.finalize().into()
}

/// JSON with object keys sorted and no whitespace: equal documents give equal bytes. `false`
/// when the document holds a number read inexactly: serde_json (without its
/// `arbitrary_precision`, which would change every `Value` of the process) reads an integer
/// beyond 64 bits as the nearest `f64`, so `2^64` and `2^64 + 1` would be one — while a
/// provider parsing integers exactly (as Python's `json` does) sees two requests.
fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) -> bool {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serializing a string or a Value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                if !canonical_json(v, out) {
                    return false;
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !canonical_json(v, out) {
                    return false;
                }
            }
            out.push(b']');
        }
        Value::Number(n) if inexact(n) => return false,
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
    true
}

/// Whether a number may stand for another text than the one it was read from, beyond a
/// float's own rounding: an `f64` of 2^63 or more, which an integer outside `i64` and `u64`
/// becomes (as does a float written that large, such as `1e30`, kept apart as well).
fn inexact(n: &serde_json::Number) -> bool {
    n.as_f64()
        .is_some_and(|f| !n.is_i64() && !n.is_u64() && f.abs() >= 9_223_372_036_854_775_808.0)
}

/// A stored response: it owns its bytes, each of its own size (see [`Store::put`]).
#[derive(Debug)]
pub struct Entry {
    /// Status (always 200 today).
    pub status: StatusCode,
    /// Response headers as the client first got them, without per-response ones.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    expires: Instant,
    /// The memory the entry holds, in bytes (see [`Store::put`]).
    weight: u64,
}

/// Memory an entry holds besides its body and header bytes: the entry and its `Arc`'s counts,
/// its key and slot in the store, its allocations' own overheads.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>() + 192;
/// Memory of one slot of a header map: its name and value handles, its hash, links and index.
const HEADER_SLOT_BYTES: usize =
    std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>() + 32;

/// The memory `headers` take, their values' bytes (`value_bytes`) included: the slots of their
/// map (a power of two, of which it fills three quarters), and each name counted as if it were
/// not one of HTTP's standard (static) names.
fn headers_weight(headers: &HeaderMap, value_bytes: usize) -> usize {
    let names: usize = headers.keys().map(|n| n.as_str().len()).sum();
    let slots = headers.capacity().max(headers.len()).next_power_of_two();
    value_bytes + names + slots * HEADER_SLOT_BYTES
}

/// A copy of `headers` that owns its values, all in one buffer of their exact size: a response
/// read from an upstream has values that are slices of that connection's read buffer
/// ([`crate::upstream`]), which a kept clone would hold whole (8 KiB and more) for as long as
/// the entry lives. With the bytes of the values.
fn owned_headers(headers: &HeaderMap) -> (HeaderMap, usize) {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    let mut bytes = Vec::with_capacity(total);
    for value in headers.values() {
        bytes.extend_from_slice(value.as_bytes());
    }
    let bytes = Bytes::from(bytes);
    let mut owned = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, value) in headers {
        let end = at + value.len();
        // The bytes of a valid value are one still.
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(bytes.slice(at..end)) {
            copy.set_sensitive(value.is_sensitive());
            owned.append(name.clone(), copy);
        }
        at = end;
    }
    (owned, total)
}

/// `body` as a buffer of its own size: one that grew as it came (or was made for a longer
/// declared length) is copied, rather than kept with its spare room.
fn owned_body(body: BytesMut) -> Bytes {
    if body.capacity() > body.len() {
        Bytes::copy_from_slice(&body)
    } else {
        body.freeze()
    }
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Key, Arc<Entry>> for Weigh {
    fn weight(&self, _key: &Key, e: &Arc<Entry>) -> u64 {
        e.weight
    }
}

/// Shards of the store, whatever the node's cores: each holds an eighth of `maxSize` (or more,
/// when quick_cache makes fewer for a small cache), so an entry of an eighth fits in one.
const SHARDS: usize = 8;

/// The entries, bounded by size.
pub struct Store {
    entries: quick_cache::sync::Cache<Key, Arc<Entry>, Weigh>,
    max_size: u64,
    max_entry: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.entries.len())
            .field("bytes", &self.entries.weight())
            .field("max_size", &self.max_size)
            .finish()
    }
}

impl Store {
    /// An empty store holding at most `max_size` bytes.
    pub fn new(max_size: u64) -> Self {
        // Estimate: chat completions are a few KiB each.
        let estimated = usize::try_from(max_size / 4096).unwrap_or(1 << 16).max(16);
        // The shards are set, not left to quick_cache (4 per core): each holds its part of the
        // size, so on a node of many cores an entry's room would shrink with them (64 cores:
        // 256 shards, 64 KiB of a 16 MiB cache).
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(estimated)
            .weight_capacity(max_size)
            .shards(SHARDS)
            .build();
        let entries = match options {
            Ok(options) => quick_cache::sync::Cache::with_options(
                options,
                Weigh,
                quick_cache::DefaultHashBuilder::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            // Both capacities are set above: not reached.
            Err(_) => quick_cache::sync::Cache::with_weighter(estimated, max_size, Weigh),
        };
        // One entry may take an eighth of the cache, and never more than its shard holds.
        let max_entry = entries.shard_capacity().min(max_size / 8);
        let max_entry = usize::try_from(max_entry).unwrap_or(usize::MAX);
        Self {
            entries,
            max_size,
            max_entry,
        }
    }

    /// The configured size.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Largest body stored.
    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    /// Entries now held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A fresh entry for `key`.
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let e = self.entries.get(key)?;
        if e.expires <= Instant::now() {
            self.entries.remove(key);
            return None;
        }
        Some(e)
    }

    /// Stores a response as an entry that owns compact copies of its headers and body (made
    /// here, once per entry stored, not as the response streams), weighed by the memory it
    /// holds; one over [`Self::max_entry`] is not stored.
    fn put(
        &self,
        key: Key,
        status: StatusCode,
        headers: &HeaderMap,
        body: BytesMut,
        ttl: Duration,
    ) {
        let value_bytes: usize = headers.values().map(HeaderValue::len).sum();
        let over = body.len() + headers_weight(headers, value_bytes) + ENTRY_BYTES;
        if over > self.max_entry {
            return;
        }
        let (headers, value_bytes) = owned_headers(headers);
        let body = owned_body(body);
        let weight = body.len() + headers_weight(&headers, value_bytes) + ENTRY_BYTES;
        let entry = Entry {
            status,
            headers,
            body,
            expires: Instant::now() + ttl,
            weight: weight as u64,
        };
        self.entries.insert(key, Arc::new(entry));
    }

    /// Starts copying a `200` response into this store; `None` when it must not be stored.
    pub fn fill(
        self: &Arc<Self>,
        key: Key,
        ttl: Duration,
        status: StatusCode,
        headers: &HeaderMap,
        streaming: bool,
    ) -> Option<Fill> {
        start_fill(
            Sink::Memory(self.clone()),
            self.max_entry,
            key,
            ttl,
            status,
            headers,
            streaming,
            framing(headers, false),
        )
    }
}

/// Where a filled entry goes.
#[derive(Clone)]
pub enum Sink {
    /// The pod's memory.
    Memory(Arc<Store>),
    /// The gateway's Redis (`backend: redis`).
    Redis(Arc<Shared>, Arc<Metrics>),
}

/// Starts copying a `200` response into `sink`; `None` when it must not be stored (another
/// status, a stream without `streaming`, a declared length over `max_entry`).
#[allow(clippy::too_many_arguments)]
fn start_fill(
    sink: Sink,
    max_entry: usize,
    key: Key,
    ttl: Duration,
    status: StatusCode,
    headers: &HeaderMap,
    streaming: bool,
    framing: Framing,
) -> Option<Fill> {
    if status != StatusCode::OK {
        return None;
    }
    if framing != Framing::Whole && !streaming {
        return None;
    }
    let mut kept = headers.clone();
    // Per response: hyper sets a fresh Date, the provider's request ids, rate-limit counts and
    // cookies are this response's own; the gateway's own headers are added per hit, but those
    // naming what produced the answer stay with it.
    kept.remove(header::DATE);
    remove_per_response_headers(&mut kept);
    remove_gateway_headers(&mut kept);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_entry) {
        return None;
    }
    Some(Fill {
        sink,
        max_entry,
        key,
        ttl,
        status,
        headers: kept,
        buf: BytesMut::new(),
        expected: declared
            .map_or(4096, |n| crate::buffers::presize(n as u64))
            .min(max_entry),
        flight: None,
        framing,
    })
}

/// How a response's body is framed: one whole document, or a stream whose copy is stored only
/// once it is known to have ended whole ([`ended_whole`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Not a stream: whole when its last byte came.
    Whole,
    /// Server-sent events (`text/event-stream`).
    Sse,
    /// AWS's binary event stream (`application/vnd.amazon.eventstream`: Bedrock's
    /// ConverseStream and InvokeModelWithResponseStream).
    EventStream,
    /// A JSON array written as it is made (Gemini's `:streamGenerateContent` without
    /// `alt=sse`), `json_stream` of [`framing`].
    JsonArray,
    /// One JSON document per line (`application/x-ndjson`: Ollama's native API;
    /// `application/stream+json`: Cohere's v1 streams; `application/jsonl`).
    JsonLines,
}

/// The framing of a response with `headers`, to a request that asked for a JSON stream
/// (`json_stream`, [`streams_json`]) or not.
fn framing(headers: &HeaderMap, json_stream: bool) -> Framing {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_start();
    let is = |mime: &str| {
        ct.get(..mime.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(mime))
    };
    if is("text/event-stream") {
        Framing::Sse
    } else if is("application/vnd.amazon.eventstream") {
        Framing::EventStream
    } else if [
        "application/x-ndjson",
        "application/stream+json",
        "application/jsonl",
    ]
    .iter()
    .any(|mime| is(mime))
    {
        Framing::JsonLines
    } else if json_stream {
        Framing::JsonArray
    } else {
        Framing::Whole
    }
}

/// Whether a stream's copy (`body`, all of it) ended whole: with its format's last event
/// (OpenAI's `data: [DONE]`, Anthropic's `message_stop`, the Responses API's
/// `response.completed` or `response.incomplete`, Cohere's `message-end`, a Gemini chunk with
/// a `finishReason`, Bedrock's `messageStop` or the last InvokeModel chunk with its
/// `amazon-bedrock-invocationMetrics`, a JSON line with Ollama's `"done": true` or Cohere's
/// `"is_finished": true`) and without an error in it (an `error` or
/// `response.failed` event, an `{"error": ...}` chunk, an event-stream exception). A stream of
/// a format that shows neither is never stored: an answer cut short looks like a whole one.
fn ended_whole(framing: Framing, body: &[u8]) -> bool {
    match framing {
        Framing::Whole => !failed_answer(body),
        Framing::Sse => sse_ended_whole(body),
        Framing::EventStream => event_stream_ended_whole(body),
        Framing::JsonArray => json_array_ended_whole(body),
        Framing::JsonLines => json_lines_ended_whole(body),
    }
}

static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));

/// Whether a whole (not streamed) `200` answer is a failure told in its body: a JSON object
/// with a top-level `error` that is not `null` (OpenRouter's once the model started, a failed
/// Responses API response), as a stream's `{"error": ...}` chunk is. Read at most once per
/// answer stored; one that names no `error`, plainly or with escaped letters, is not parsed.
fn failed_answer(body: &[u8]) -> bool {
    if body.trim_ascii_start().first() != Some(&b'{')
        || (ERROR_KEY.find(body).is_none() && !crate::cost::escapes_ascii_letter(body))
    {
        return false;
    }
    crate::text::top_level_values(body, ["error"])
        .is_some_and(|[error]| error.is_some_and(|v| !(v.is_null() || v == false)))
}

/// What one server-sent event says of the stream's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// The stream's last event: the answer is complete.
    End,
    /// The answer failed.
    Error,
    /// Any other event.
    Other,
}

fn sse_ended_whole(body: &[u8]) -> bool {
    let mut parser = crate::compat::sse::SseParser::new();
    let (mut ended, mut failed) = (false, false);
    let mut mark = |e: crate::compat::sse::Event<'_>| match sse_mark(e.name, e.data) {
        Mark::End => ended = true,
        Mark::Error => failed = true,
        Mark::Other => {}
    };
    parser.feed(body, &mut mark);
    // A last event ended by the connection, not a blank line, counts (as the stream's
    // `data: [DONE]` watch takes it).
    parser.finish(&mut mark);
    ended && !failed
}

fn sse_mark(name: &str, data: &str) -> Mark {
    let kind = if name.is_empty() {
        json_type(data).unwrap_or_default()
    } else {
        name
    };
    match kind {
        "message_stop" | "response.completed" | "response.incomplete" | "message-end" => {
            return Mark::End;
        }
        "error" | "response.failed" => return Mark::Error,
        _ => {}
    }
    let data = data.trim();
    if data == "[DONE]" {
        return Mark::End;
    }
    if json_first_key(data) == Some("error") {
        return Mark::Error;
    }
    if data.contains("\"finishReason\"") {
        return Mark::End;
    }
    Mark::Other
}

/// The first key of a JSON object, when it is a plain string (`{"error": ...}` → `error`).
fn json_first_key(data: &str) -> Option<&str> {
    let rest = data.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find(['"', '\\'])?;
    Some(&rest[..end])
}

/// The value of a JSON object's `type` when it is its first member (`{"type":"message_stop"}`),
/// as Anthropic and the Responses API write their events.
fn json_type(data: &str) -> Option<&str> {
    let rest = data.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix("\"type\"")?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find(['"', '\\'])?;
    Some(&rest[..end])
}

fn event_stream_ended_whole(body: &[u8]) -> bool {
    let mut decoder = crate::compat::eventstream::Decoder::new();
    let mut ended = false;
    // Fed in pieces: the decoder keeps one message at a time, not a copy of the whole body.
    for piece in body.chunks(64 << 10) {
        decoder.push(piece);
        while let Some(message) = decoder.next_message() {
            let Ok(message) = message else {
                return false;
            };
            // `exception` or `error`: the answer failed.
            if message
                .header_str(":message-type")
                .is_some_and(|t| t != "event")
            {
                return false;
            }
            match message.header_str(":event-type") {
                Some("messageStop") => ended = true,
                Some("chunk") => ended = invoke_chunk_is_last(&message),
                _ => {}
            }
        }
    }
    ended && decoder.pending() == 0
}

/// Whether an InvokeModelWithResponseStream chunk (`{"bytes": "<base64 of the model's own
/// event>"}`) is the last: Bedrock adds `amazon-bedrock-invocationMetrics` to that one.
fn invoke_chunk_is_last(message: &crate::compat::eventstream::Message) -> bool {
    message.invoke_chunk().is_some_and(|event| {
        memchr::memmem::find(&event, b"\"amazon-bedrock-invocationMetrics\"").is_some()
    })
}

fn json_array_ended_whole(body: &[u8]) -> bool {
    use serde_json::Value;
    let Ok(Value::Array(chunks)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let finished = |c: &Value| {
        c.get("candidates")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c.get("finishReason").is_some()))
    };
    chunks.iter().all(|c| c.get("error").is_none()) && chunks.iter().any(finished)
}

/// Whether a stream of JSON lines ended with its last line saying so (Ollama's `"done": true`,
/// Cohere's `stream-end` with `"is_finished": true`), none of its lines an error.
fn json_lines_ended_whole(body: &[u8]) -> bool {
    use serde_json::Value;
    let mut last_finished = false;
    for line in body.split(|&b| b == b'\n') {
        if line.trim_ascii().is_empty() {
            continue;
        }
        let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(line) else {
            return false;
        };
        if chunk.contains_key("error") {
            return false;
        }
        last_finished = [chunk.get("done"), chunk.get("is_finished")]
            .iter()
            .any(|v| *v == Some(&Value::Bool(true)));
    }
    last_finished
}

/// provider's request ids, processing times and rate-limit counts
/// ([`crate::headers::unread_per_response`]), its cookies, and a wait it asked for.
fn remove_per_response_headers(headers: &mut HeaderMap) {
    headers.remove(header::SET_COOKIE);
    headers.remove(header::RETRY_AFTER);
    let counts: Vec<HeaderName> = headers
        .keys()
        .filter(|n| crate::headers::unread_per_response(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for n in counts {
        headers.remove(n);
    }
}

/// The gateway headers that say what served an answer (the step, provider and model a dynamic
/// route landed on): a hit repeats them, as it repeats the answer.
pub const SERVED_BY_HEADERS: [&str; 3] = ["cf-aig-step", "cf-aig-provider", "cf-aig-model"];

/// Removes the gateway's own (`cf-aig-*`) headers but [`SERVED_BY_HEADERS`]: the others (log id,
/// cache status, event id, DLP flags) are set per response.
fn remove_gateway_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            crate::headers::is_gateway_header(n) && !SERVED_BY_HEADERS.contains(&n.as_str())
        })
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// A request the cache was on for and had no entry for: how to store its response.
pub struct Miss {
    /// Where to store.
    pub sink: Sink,
    /// Largest body stored.
    pub max_entry: usize,
    /// The request's key.
    pub key: Key,
    /// TTL of the entry.
    pub ttl: Duration,
    /// Whether streamed responses are stored too.
    pub streaming: bool,
    /// The request asks for a JSON stream ([`streams_json`]).
    pub json_stream: bool,
    /// Held while this request fetches for others waiting on the same key.
    pub flight: Option<FlightGuard>,
}

impl Miss {
    /// Starts copying the response into the cache, if it may be stored (the fill then holds
    /// the flight until the entry is stored; else the waiting requests go on now). A stream
    /// lets them go at once too: a replay would reach them only after the whole stream, as
    /// long as the model takes to write it, while their own call starts answering at once.
    pub fn fill(&mut self, head: &http::response::Parts) -> Option<Fill> {
        let (status, headers) = (head.status, &head.headers);
        if head
            .extensions
            .get::<crate::upstream::UnframedBody>()
            .is_some()
        {
            // Whole or cut off, it cannot be told: the waiting requests go on now.
            drop(self.flight.take());
            return None;
        }
        let framing = framing(headers, self.json_stream);
        let mut fill = start_fill(
            self.sink.clone(),
            self.max_entry,
            self.key,
            self.ttl,
            status,
            headers,
            self.streaming,
            framing,
        );
        let flight = self.flight.take();
        if let Some(f) = &mut fill
            && framing == Framing::Whole
        {
            f.flight = flight;
        }
        fill
    }
}

/// A response being copied into the cache while it streams to the client.
pub struct Fill {
    sink: Sink,
    max_entry: usize,
    key: Key,
    ttl: Duration,
    status: StatusCode,
    headers: HeaderMap,
    buf: BytesMut,
    /// Room the copy takes when its first bytes come: the declared length, if any.
    expected: usize,
    flight: Option<FlightGuard>,
    framing: Framing,
}

impl Fill {
    /// Stores a whole body at once.
    pub fn whole(mut self, body: &[u8]) {
        if self.buf.is_empty() && body.len() <= self.max_entry {
            // Copied at its size, as the entry keeps it.
            self.buf = BytesMut::from(body);
            self.finish();
        } else if self.push(body) {
            self.finish();
        }
    }

    /// Appends body bytes; `false` when the body outgrew one entry (drop the fill then).
    pub fn push(&mut self, data: &[u8]) -> bool {
        if self.buf.len() + data.len() > self.max_entry {
            return false;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(self.expected.max(data.len()));
        }
        self.buf.extend_from_slice(data);
        true
    }

    /// The body ended: store it (the flight ends once it is stored), unless it is a stream
    /// that did not end whole (`ended_whole`).
    pub fn finish(self) {
        if !ended_whole(self.framing, &self.buf) {
            return;
        }
        match self.sink {
            Sink::Memory(store) => {
                store.put(self.key, self.status, &self.headers, self.buf, self.ttl);
                drop(self.flight);
            }
            Sink::Redis(shared, metrics) => shared.cache_put(
                metrics,
                self.key,
                &CachedResponse {
                    status: self.status,
                    headers: self.headers,
                    body: self.buf.freeze(),
                },
                self.ttl,
                self.flight,
            ),
        }
    }
}

#[cfg(test)]
mod tests {

    /// A response head of `status` and `headers`, as a fill is started with.
    fn head_of(status: StatusCode, headers: &HeaderMap) -> http::response::Parts {
        let mut resp = http::Response::new(());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers.clone();
        resp.into_parts().0
    }

    use super::*;

    #[tokio::test]
    async fn identical_misses_wait_for_the_first_and_wake_when_it_is_done() {
        let flights = Flights::default();
        let key = [7u8; 32];
        let Flight::Leader(guard) = flights.join(key) else {
            panic!("the first request leads");
        };
        let Flight::Follower(leader) = flights.join(key) else {
            panic!("an identical request follows");
        };
        assert!(matches!(flights.join([8u8; 32]), Flight::Leader(_)));
        let waiter = tokio::spawn(wait_for_leader(leader, COALESCE_WAIT));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the follower woke")
            .expect("joined");
        assert!(flights.is_empty());
        assert!(matches!(flights.join(key), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_stops_waiting_after_the_limit() {
        let flights = Flights::default();
        let _guard = flights.join([1u8; 32]);
        let Flight::Follower(leader) = flights.join([1u8; 32]) else {
            panic!("follows");
        };
        let started = tokio::time::Instant::now();
        wait_for_leader(leader, Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

    fn req<'a>(body: &'a [u8], alias: &'a str) -> Request<'a> {
        Request {
            scope: "provider",
            provider: "openai",
            upstream: "https://api.openai.com/v1\0\0Openai",
            method: "POST",
            path: "chat/completions",
            query: None,
            alias,
            headers: &NO_HEADERS,
            client_auth: None,
            accept_encoding: false,
            body,
            account: None,
        }
    }

    #[test]
    fn equal_json_bodies_share_a_key_whatever_their_layout() {
        let a = key(
            &req(
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
                "default",
            ),
            None,
        );
        let b = key(
            &req(
                b"{ \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n \"model\":\"m\" }",
                "default",
            ),
            None,
        );
        assert_eq!(a, b);
        let other = key(
            &req(
                br#"{"model":"m","messages":[{"role":"user","content":"ho"}]}"#,
                "default",
            ),
            None,
        );
        assert_ne!(a, other);
        // Array order matters.
        let x = key(&req(br#"{"a":[1,2]}"#, "default"), None);
        let y = key(&req(br#"{"a":[2,1]}"#, "default"), None);
        assert_ne!(x, y);
        // Not JSON: the bytes as they are.
        assert_ne!(
            key(&req(b"abc", "default"), None),
            key(&req(b"abd", "default"), None)
        );
    }

    #[test]
    fn numbers_share_a_key_only_when_they_are_read_exactly() {
        let k = |body: &'static [u8]| key(&req(body, "default"), None);
        // Integers of up to 64 bits are exact; 1 and 1.0 stay apart.
        assert_ne!(
            k(br#"{"n":9007199254740992}"#),
            k(br#"{"n":9007199254740993}"#)
        );
        assert_ne!(k(br#"{"n":1}"#), k(br#"{"n":1.0}"#));
        assert_eq!(
            k(br#"{"n":18446744073709551615, "m":1}"#),
            k(br#"{"m":1,"n":18446744073709551615}"#)
        );
        // Beyond 64 bits serde_json reads the nearest f64: keyed by the body's own text then.
        for (a, b) in [
            (
                &br#"{"n":18446744073709551616}"#[..],
                &br#"{"n":18446744073709551617}"#[..],
            ),
            (
                br#"{"n":-9223372036854775809}"#,
                br#"{"n":-9223372036854775810}"#,
            ),
            (
                br#"{"a":[{"n":100000000000000000000000}]}"#,
                br#"{"a":[{"n":100000000000000000000001}]}"#,
            ),
        ] {
            assert_ne!(k(a), k(b), "{}", String::from_utf8_lossy(a));
            assert_eq!(k(a), k(a));
        }
        // The same document in another layout is another key then (never a shared one).
        assert_ne!(
            k(br#"{"n":18446744073709551616,"m":1}"#),
            k(br#"{"m":1,"n":18446744073709551616}"#)
        );
    }

    #[test]
    fn another_upstream_is_another_key() {
        let body = br#"{"model":"m"}"#;
        let base = key(&req(body, "default"), None);
        let mut r = req(body, "default");
        r.upstream = "http://llm.internal/v1\0\0Openai";
        assert_ne!(key(&r, None), base);
        assert_ne!(key(&r, Some("k")), key(&req(body, "default"), Some("k")));
    }

    #[test]
    fn equal_forms_share_a_key_whatever_their_boundary() {
        let form = |boundary: &str, model: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                    .expect("header"),
            );
            let body = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                 Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{boundary}--\r\n"
            );
            (h, body.into_bytes())
        };
        let keyed = |(h, body): &(HeaderMap, Vec<u8>)| {
            let mut r = req(body, "default");
            r.path = "audio/transcriptions";
            r.headers = h;
            key(&r, None)
        };
        let a = keyed(&form("8f1e2d3c4b5a", "whisper-1"));
        assert_eq!(a, keyed(&form("0a9b8c7d6e5f", "whisper-1")));
        assert_ne!(a, keyed(&form("8f1e2d3c4b5a", "gpt-4o-transcribe")));
    }

    #[test]
    fn the_key_depends_on_route_alias_and_client_key() {
        let body = br#"{"model":"m"}"#;
        let base = key(&req(body, "default"), None);
        assert_ne!(base, key(&req(body, "team-b"), None));
        let mut r = req(body, "default");
        r.path = "embeddings";
        assert_ne!(base, key(&r, None));
        let mut r = req(body, "default");
        r.provider = "groq";
        assert_ne!(base, key(&r, None));
        let mut r = req(body, "default");
        r.account = Some("acct-1");
        let acct_1 = key(&r, None);
        r.account = Some("acct-2");
        assert!(
            base != acct_1 && acct_1 != key(&r, None),
            "another account, another entry"
        );
        let names = [header::AUTHORIZATION];
        let mut h1 = HeaderMap::new();
        h1.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer one"),
        );
        let mut h2 = HeaderMap::new();
        h2.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer two"),
        );
        let mut r1 = req(body, "default");
        r1.headers = &h1;
        r1.client_auth = Some(&names);
        let mut r2 = req(body, "default");
        r2.headers = &h2;
        r2.client_auth = Some(&names);
        assert_ne!(key(&r1, None), key(&r2, None));
    }

    #[test]
    fn a_custom_key_replaces_the_body_but_stays_within_route_and_credentials() {
        let k = Some("shared");
        let a = req(br#"{"model":"m","n":1}"#, "default");
        let b = req(br#"{"model":"m","n":2}"#, "default");
        assert_eq!(key(&a, k), key(&b, k), "the body does not count");
        assert_ne!(key(&a, k), key(&a, Some("other")));
        assert_ne!(key(&a, k), key(&a, None));
        let mut other = req(b"{}", "default");
        other.provider = "anthropic";
        other.path = "v1/messages";
        assert_ne!(key(&a, k), key(&other, k), "another provider and path");
        assert_ne!(key(&a, k), key(&req(b"{}", "team-b"), k), "another alias");
        let names = [header::AUTHORIZATION];
        let mut own = HeaderMap::new();
        own.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        let mut mine = req(b"{}", "default");
        mine.headers = &own;
        mine.client_auth = Some(&names);
        let mut keyless = req(b"{}", "default");
        keyless.client_auth = Some(&names);
        assert_ne!(key(&mine, k), key(&keyless, k), "another client key");
        assert_ne!(key(&mine, k), key(&a, k), "a client key or the stored one");
    }

    #[test]
    fn headers_that_change_the_answer_are_part_of_the_key() {
        let body = br#"{"model":"m"}"#;
        let base = key(&req(body, "default"), None);
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            h
        };
        let a = with("openai-project", "proj_A");
        let b = with("openai-project", "proj_B");
        let (mut ra, mut rb) = (req(body, "default"), req(body, "default"));
        ra.headers = &a;
        rb.headers = &b;
        assert_ne!(key(&ra, None), key(&rb, None));
        assert_ne!(key(&ra, None), base);
        assert_ne!(key(&ra, Some("k")), key(&rb, Some("k")));
        for name in [
            "openai-organization",
            "anthropic-version",
            "anthropic-beta",
            "x-amzn-bedrock-guardrailidentifier",
            "x-amzn-bedrock-guardrailversion",
            "x-amzn-bedrock-trace",
            "accept",
        ] {
            let h = with(name, "x");
            let mut r = req(body, "default");
            r.headers = &h;
            assert_ne!(key(&r, None), base, "{name}");
        }
        // Names in any case (HTTP/1 lowercases them), values exactly.
        let mut upper = HeaderMap::new();
        upper.insert("OpenAI-Project", HeaderValue::from_static("proj_A"));
        let mut r = req(body, "default");
        r.headers = &upper;
        assert_eq!(key(&r, None), key(&ra, None));
        let lower_value = with("openai-project", "proj_a");
        r.headers = &lower_value;
        assert_ne!(key(&r, None), key(&ra, None));
        // Other headers do not count; Accept-Encoding only when it goes upstream as it is.
        let gzip = with("accept-encoding", "gzip");
        r.headers = &gzip;
        assert_eq!(key(&r, None), base);
        r.accept_encoding = true;
        assert_ne!(key(&r, None), base);
    }

    #[test]
    fn only_posts_to_inference_endpoints_are_cacheable() {
        let at = |provider: &'static str, method: &'static str, path: &'static str| {
            let mut r = req(br#"{"model":"m"}"#, "default");
            (r.provider, r.method, r.path) = (provider, method, path);
            cacheable(&r)
        };
        for (provider, path) in [
            ("openai", "chat/completions"),
            ("openai", "v1/completions"),
            ("openai", "embeddings"),
            ("openai", "responses"),
            ("openai", "images/generations"),
            ("openai", "audio/speech"),
            ("openai", "moderations"),
            ("anthropic", "v1/messages"),
            ("azure-openai", "res/dep/chat/completions"),
            (
                "google-ai-studio",
                "v1beta/models/gemini-2.5-flash:generateContent",
            ),
            (
                "google-ai-studio",
                "v1beta/models/gemini-2.5-flash:streamGenerateContent",
            ),
            (
                "google-vertex-ai",
                "v1/projects/p/locations/l/publishers/anthropic/models/c@1:streamRawPredict",
            ),
            (
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/a.b-v1:0/converse",
            ),
            (
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/a.b-v1:0/converse-stream",
            ),
            (
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/a.b-v1:0/invoke",
            ),
            (
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/a.b-v1:0/invoke-with-response-stream",
            ),
            ("workers-ai", "@cf/meta/llama-3.1-8b-instruct"),
            ("cohere", "v2/chat"),
            ("cohere", "v2/rerank"),
            ("huggingface", "models/org/model"),
            ("compat", "compat/chat/completions"),
            ("openai", "chat/complet%69ons"),
            (
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.a.b-v1%3A0/converse",
            ),
        ] {
            assert!(at(provider, "POST", path), "{provider} POST {path}");
        }
        for (method, path) in [
            ("GET", "responses/resp_1"),
            ("GET", "chat/completions"),
            ("GET", "batches/batch_1"),
            ("GET", "threads/t/runs/run_1"),
            ("DELETE", "responses/resp_1"),
            ("POST", "threads/t/runs"),
            ("POST", "threads/t/messages"),
            ("POST", "batches"),
            ("POST", "v1/messages/batches"),
            ("POST", "files"),
            ("POST", "responses/resp_1/cancel"),
            ("POST", "chat/completions/chatcmpl-1"),
            (
                "POST",
                "v1beta/models/gemini-2.5-flash:batchGenerateContent",
            ),
            ("POST", "v1/models/veo:predictLongRunning"),
            ("POST", "bedrock-runtime/us-east-1/async-invoke"),
            ("POST", "%61sync/chat/completions"),
            ("POST", "threads/t/run%73"),
            ("POST", "respons%65s/resp_1/cancel"),
            (
                "POST",
                "v1beta/models/gemini-2.5-flash%3AbatchGenerateContent",
            ),
        ] {
            assert!(!at("openai", method, path), "{method} {path}");
        }
        let mut r = req(br#"{"model":"m","background":true}"#, "default");
        r.path = "responses";
        assert!(!cacheable(&r), "a background response");
        r.body = br#"{"model":"m","background":false}"#;
        assert!(cacheable(&r));
        // A turn of a conversation is added to it (an id or `{"id": ...}`); `null` is none.
        for body in [
            &br#"{"model":"m","conversation":"conv_1","input":"hi"}"#[..],
            br#"{"model":"m","conversation":{"id":"conv_1"},"input":"hi"}"#,
            br#"{"model":"m","\u0063onversation":"conv_1","input":"hi"}"#,
        ] {
            r.body = body;
            assert!(!cacheable(&r), "{}", String::from_utf8_lossy(body));
        }
        r.body = br#"{"model":"m","conversation":null,"input":"hi"}"#;
        assert!(cacheable(&r));
    }

    #[test]
    fn creates_of_state_the_provider_keeps_are_not_cacheable() {
        let at = |provider: &'static str, path: &'static str, query, body: &'static [u8]| {
            let mut r = req(body, "default");
            (r.provider, r.path, r.query) = (provider, path, query);
            cacheable(&r)
        };
        // xAI's deferred completions; Cohere's v1 chat in a conversation; `null` and `false`
        // are none, and the last of a key given twice counts.
        for (provider, path, body) in [
            (
                "grok",
                "v1/chat/completions",
                &br#"{"model":"grok-4","deferred":true}"#[..],
            ),
            ("grok", "v1/chat/completions", br#"{"\u0064eferred":true}"#),
            (
                "grok",
                "v1/chat/completions",
                br#"{"deferred":false,"deferred":true}"#,
            ),
            (
                "cohere",
                "v1/chat",
                br#"{"message":"hi","conversation_id":"c1"}"#,
            ),
            ("compat", "compat/chat/completions", br#"{"deferred":true}"#),
        ] {
            assert!(
                !at(provider, path, None, body),
                "{provider} {}",
                String::from_utf8_lossy(body)
            );
        }
        for (provider, path, body) in [
            ("grok", "v1/chat/completions", &br#"{"deferred":false}"#[..]),
            (
                "grok",
                "v1/chat/completions",
                br#"{"deferred":true,"deferred":null}"#,
            ),
            (
                "cohere",
                "v1/chat",
                br#"{"message":"hi","conversation_id":null}"#,
            ),
            // Nested, or in the text: not the body's own key.
            (
                "openai",
                "chat/completions",
                br#"{"metadata":{"conversation_id":"c1","deferred":true}}"#,
            ),
            (
                "openai",
                "chat/completions",
                br#"{"messages":[{"content":"say \"deferred\": true"}]}"#,
            ),
            // A request_id means a batch poll only to Workers AI.
            ("openai", "chat/completions", br#"{"request_id":"r1"}"#),
            // Not JSON: an upload.
            ("openai", "audio/transcriptions", b"\"deferred\""),
        ] {
            assert!(
                at(provider, path, None, body),
                "{provider} {}",
                String::from_utf8_lossy(body)
            );
        }
        // Perplexity's async jobs.
        assert!(!at("perplexity-ai", "async/chat/completions", None, b"{}"));
        assert!(at("perplexity-ai", "chat/completions", None, b"{}"));
        // Workers AI's Batch API: a submit and a poll (with or without the query); a model run
        // is cached.
        let model = "@cf/baai/bge-m3";
        assert!(at("workers-ai", model, None, br#"{"query":"q"}"#));
        assert!(at(
            "workers-ai",
            model,
            Some("queueRequest=false"),
            br#"{"query":"q"}"#
        ));
        for (query, body) in [
            (
                Some("queueRequest=true"),
                &br#"{"requests":[{"query":"q"}]}"#[..],
            ),
            (Some("a=1&queueRequest=true"), br#"{"requests":[]}"#),
            (Some("queueRequest=true"), br#"{"request_id":"768f15b7"}"#),
            (None, br#"{"request_id":"768f15b7"}"#),
        ] {
            assert!(
                !at("workers-ai", model, query, body),
                "{query:?} {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_stored_headers_are_not_one_responses_own() {
        let store = Arc::new(Store::new(1 << 20));
        let mut h = json_headers();
        for (name, value) in [
            ("set-cookie", "__cf_bm=abc; path=/"),
            ("x-request-id", "req_1"),
            ("request-id", "req_2"),
            ("cf-ray", "8f00-SJC"),
            ("openai-processing-ms", "120"),
            ("retry-after", "3"),
            ("x-ratelimit-remaining-requests", "99"),
            ("anthropic-ratelimit-tokens-remaining", "1000"),
            ("openai-version", "2020-10-01"),
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        store
            .fill([9; 32], DEFAULT_TTL, StatusCode::OK, &h, false)
            .expect("fill")
            .whole(b"{}");
        let e = store.get(&[9; 32]).expect("stored");
        let mut names: Vec<&str> = e.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "cf-aig-provider",
                "cf-aig-step",
                "content-type",
                "openai-version"
            ]
        );
    }

    fn stored(content_type: &'static str, json_stream: bool, body: &[u8]) -> bool {
        let store = Arc::new(Store::new(1 << 20));
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        let mut miss = Miss {
            sink: Sink::Memory(store.clone()),
            max_entry: store.max_entry(),
            key: [1; 32],
            ttl: DEFAULT_TTL,
            streaming: true,
            json_stream,
            flight: None,
        };
        miss.fill(&head_of(StatusCode::OK, &h))
            .expect("fill")
            .whole(body);
        store.get(&[1; 32]).is_some()
    }

    fn event_stream(messages: &[(&str, &str, &[u8])]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|(kind, name, payload)| {
                let name_header = if *kind == "event" {
                    ":event-type"
                } else {
                    ":exception-type"
                };
                crate::compat::eventstream::encode(
                    &[(":message-type", kind), (name_header, name)],
                    payload,
                )
            })
            .collect()
    }

    #[test]
    fn a_stream_is_stored_only_when_it_ended_with_its_last_event_and_no_error() {
        let sse = "text/event-stream; charset=utf-8";
        let whole: [&[u8]; 6] = [
            b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
            b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"   }\n\n",
            b"data: {\"type\":\"message_delta\"}\n\ndata: {\"type\": \"message_stop\"}\n\n",
            b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{}}\n\n",
            b"event: response.incomplete\ndata: {\"type\":\"response.incomplete\"}\n\n",
            b"data: {\"candidates\": [{\"content\": {}}]}\r\n\r\ndata: {\"candidates\": [{\"finishReason\": \"STOP\"}]}\r\n\r\n",
        ];
        for body in whole {
            assert!(
                stored(sse, false, body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let broken: [&[u8]; 8] = [
            // Cut short: no last event.
            b"data: {\"choices\":[]}\n\n",
            b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: message_delta\ndata: {}\n\n",
            b"event: response.created\ndata: {}\n\nevent: response.output_text.delta\ndata: {}\n\n",
            b"data: {\"candidates\": [{\"content\": {}}]}\r\n\r\n",
            // Failed in the stream.
            b"event: message_start\ndata: {}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\nevent: message_stop\ndata: {}\n\n",
            b"event: response.created\ndata: {}\n\nevent: response.failed\ndata: {\"type\":\"response.failed\"}\n\n",
            b"data: {\"candidates\": [{\"finishReason\": \"STOP\"}]}\n\ndata: {\"error\": {\"code\": 500}}\n\n",
            // A stream that shows no end is never stored.
            b"data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n",
        ];
        for body in broken {
            assert!(
                !stored(sse, false, body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Bedrock's binary event streams.
        let amz = "application/vnd.amazon.eventstream";
        let converse = event_stream(&[
            ("event", "messageStart", b"{}"),
            ("event", "contentBlockDelta", b"{}"),
            ("event", "messageStop", b"{}"),
            ("event", "metadata", b"{}"),
        ]);
        assert!(stored(amz, false, &converse));
        assert!(
            !stored(amz, false, &converse[..converse.len() - 3]),
            "cut mid-message"
        );
        let cut = event_stream(&[
            ("event", "messageStart", b"{}"),
            ("event", "contentBlockDelta", b"{}"),
        ]);
        assert!(!stored(amz, false, &cut));
        let failed = event_stream(&[
            ("event", "messageStart", b"{}"),
            ("exception", "throttlingException", b"{}"),
            ("event", "messageStop", b"{}"),
        ]);
        assert!(!stored(amz, false, &failed));
        use base64::Engine as _;
        let chunk = |event: &str| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(event);
            format!("{{\"bytes\":\"{b64}\"}}").into_bytes()
        };
        let first = chunk(r#"{"type":"content_block_delta"}"#);
        let last = chunk(
            r#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":1}}"#,
        );
        let invoke = event_stream(&[("event", "chunk", &first), ("event", "chunk", &last)]);
        assert!(stored(amz, false, &invoke));
        assert!(!stored(
            amz,
            false,
            &event_stream(&[("event", "chunk", &first)])
        ));
        // Gemini's JSON stream (no alt=sse): a JSON array.
        let json = "application/json; charset=UTF-8";
        let gemini = br#"[{"candidates": [{"content": {}}]}
,{"candidates": [{"content": {}, "finishReason": "STOP"}]}
]"#;
        assert!(stored(json, true, gemini));
        assert!(
            !stored(json, true, &gemini[..gemini.len() - 2]),
            "cut short"
        );
        assert!(!stored(
            json,
            true,
            br#"[{"candidates": [{"content": {}}]}, {"error": {"code": 500}}]"#
        ));
        assert!(stored(json, false, b"{}"), "not a stream");
    }

    #[test]
    fn a_whole_answer_failed_in_its_body_is_not_stored() {
        let json = "application/json";
        for failed in [
            &br#"{"id":"gen-1","choices":[],"error":{"code":502,"message":"Provider returned error"}}"#[..],
            br#" {"error": "boom"}"#,
            br#"{"\u0065rror":{"code":500}}"#,
            br#"{"error":null,"error":{"code":500}}"#,
            br#"{"id":"resp_1","status":"failed","error":{"code":"server_error"}}"#,
        ] {
            assert!(!stored(json, false, failed), "{}", String::from_utf8_lossy(failed));
        }
        for fine in [
            &br#"{"id":"resp_1","status":"completed","error":null,"output":[]}"#[..],
            br#"{"choices":[{"message":{"content":"an \"error\": none"}}]}"#,
            br#"{"result":{"error":{"code":1}},"errors":[]}"#,
            br#"{"error":false}"#,
            br#"[{"error":1}]"#,
            b"RIFF....WAVE \"error\"",
            b"{\"error\"",
        ] {
            assert!(
                stored(json, false, fine),
                "{}",
                String::from_utf8_lossy(fine)
            );
        }
    }

    #[test]
    fn an_entry_may_take_an_eighth_of_the_cache_whatever_the_cores() {
        for max_size in [
            CachePolicy::MIN_MAX_SIZE,
            1 << 20,
            16 << 20,
            1 << 30,
            100_000,
        ] {
            let store = Store::new(max_size);
            assert!(store.entries.num_shards() <= SHARDS, "{max_size}");
            assert_eq!(store.max_entry() as u64, max_size / 8, "{max_size}");
        }
    }

    #[test]
    fn json_line_streams_are_stored_only_when_their_last_line_ends_them() {
        for ct in [
            "application/x-ndjson",
            "application/stream+json",
            "application/jsonl",
        ] {
            let ollama = b"{\"message\":{\"content\":\"Hi\"},\"done\":false}\n{\"message\":{\"content\":\"\"},\"done\":true,\"eval_count\":2}\n";
            assert!(stored(ct, false, ollama), "{ct}");
            let cohere = b"{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\"Hi\"}\n{\"is_finished\":true,\"event_type\":\"stream-end\",\"finish_reason\":\"COMPLETE\"}\n";
            assert!(stored(ct, false, cohere), "{ct}");
            // Cut short, ended by an error, or not lines of JSON: never stored.
            let cut = b"{\"message\":{\"content\":\"Hi\"},\"done\":false}\n";
            assert!(!stored(ct, false, cut), "{ct}");
            let failed = b"{\"done\":false}\n{\"error\":\"boom\"}\n{\"done\":true}\n";
            assert!(!stored(ct, false, failed), "{ct}");
            assert!(!stored(ct, false, b"{\"done\":true"), "{ct}");
        }
        // Without `streaming`, never, and identical requests do not wait for one.
        let store = Arc::new(Store::new(1 << 20));
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        assert!(
            store
                .fill([3; 32], DEFAULT_TTL, StatusCode::OK, &h, false)
                .is_none()
        );
    }

    #[test]
    fn bedrock_and_gemini_json_streams_are_streams() {
        // Stored only with `streaming`, and identical requests do not wait for them.
        let store = Arc::new(Store::new(1 << 20));
        let mut amz = HeaderMap::new();
        amz.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.amazon.eventstream"),
        );
        assert!(
            store
                .fill([3; 32], DEFAULT_TTL, StatusCode::OK, &amz, false)
                .is_none()
        );
        let flights = Flights::default();
        for (headers, json_stream) in [(amz, false), (json_headers(), true)] {
            let Flight::Leader(guard) = flights.join([5; 32]) else {
                panic!("leads");
            };
            let mut miss = Miss {
                sink: Sink::Memory(store.clone()),
                max_entry: store.max_entry(),
                key: [5; 32],
                ttl: DEFAULT_TTL,
                streaming: false,
                json_stream,
                flight: Some(guard),
            };
            assert!(miss.fill(&head_of(StatusCode::OK, &headers)).is_none());
            assert!(flights.is_empty(), "the waiting requests go on");
            let Flight::Leader(guard) = flights.join([5; 32]) else {
                panic!("leads");
            };
            miss.flight = Some(guard);
            miss.streaming = true;
            let fill = miss.fill(&head_of(StatusCode::OK, &headers)).expect("fill");
            assert!(flights.is_empty(), "a stream lets them go at once");
            drop(fill);
        }
    }

    #[test]
    fn headers_turn_the_cache_on_off_and_are_checked() {
        let off = Settings::default();
        let on = Settings {
            enabled: true,
            ..Settings::default()
        };
        let mut h = HeaderMap::new();
        assert_eq!(want(&off, GatewayHeaders::scan(&h)), Ok(None));
        assert_eq!(
            want(&on, GatewayHeaders::scan(&h)),
            Ok(Some(Want {
                ttl: DEFAULT_TTL,
                skip: false,
                custom_key: None
            }))
        );
        h.insert(Gw::CacheTtl.name(), HeaderValue::from_static("3600"));
        h.insert(Gw::SkipCache.name(), HeaderValue::from_static("TRUE"));
        h.insert(Gw::CacheKey.name(), HeaderValue::from_static("greeting"));
        assert_eq!(
            want(&off, GatewayHeaders::scan(&h)),
            Ok(Some(Want {
                ttl: Duration::from_secs(3600),
                skip: true,
                custom_key: Some("greeting")
            }))
        );
        // A custom key alone caches, for the gateway's TTL or, with the cache off, 5 minutes.
        let mut keyed = HeaderMap::new();
        keyed.insert(Gw::CacheKey.name(), HeaderValue::from_static("responseA"));
        let off_with_ttl = Settings {
            ttl: Duration::from_secs(3600),
            ..Settings::default()
        };
        let on_with_ttl = Settings {
            enabled: true,
            ..off_with_ttl
        };
        for (s, ttl) in [
            (&off_with_ttl, DEFAULT_TTL),
            (&on_with_ttl, Duration::from_secs(3600)),
        ] {
            assert_eq!(
                want(s, GatewayHeaders::scan(&keyed)),
                Ok(Some(Want {
                    ttl,
                    skip: false,
                    custom_key: Some("responseA")
                }))
            );
        }
        // A TTL of 0 is no caching for this request, even with the cache on.
        let mut zero = HeaderMap::new();
        zero.insert(Gw::CacheTtl.name(), HeaderValue::from_static("0"));
        assert!(want(&on, GatewayHeaders::scan(&zero)).is_ok_and(|w| w.is_some_and(|w| w.skip)));
        assert_eq!(want(&off, GatewayHeaders::scan(&zero)), Ok(None));
        for (name, bad) in [
            (Gw::CacheTtl.name(), "59"),
            (Gw::CacheTtl.name(), "1"),
            (Gw::CacheTtl.name(), "2592001"),
            (Gw::CacheTtl.name(), "soon"),
            (Gw::SkipCache.name(), "yes"),
            (Gw::CacheKey.name(), ""),
            // The former names, which the error names as sent.
            ("cf-cache-ttl", "soon"),
            ("cf-skip-cache", "yes"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(bad));
            let err = want(&on, GatewayHeaders::scan(&h)).expect_err(name);
            assert_eq!(err.code(), 2100, "{name}: {bad}");
            assert!(
                err.to_string().contains(&format!("header {name}:")),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn config_settings_are_checked() {
        use sidegate_crds::units::{ByteSize, Duration as D};
        let refused = [
            (
                "spec.cache.ttl",
                CachePolicy {
                    ttl: Some(D::from_secs(30)),
                    ..CachePolicy::default()
                },
            ),
            (
                "spec.cache.maxSize",
                CachePolicy {
                    max_size: Some(ByteSize::bytes(1000)),
                    ..CachePolicy::default()
                },
            ),
        ];
        for (field, p) in refused {
            let p = CachePolicy { enabled: true, ..p };
            let err = Settings::from_policy(Some(&p)).expect_err("refused");
            assert!(err.contains(field), "{err}");
        }
        let p = CachePolicy {
            enabled: true,
            ttl: Some(D::from_secs(600)),
            streaming: true,
            ..CachePolicy::default()
        };
        let s = Settings::from_policy(Some(&p)).expect("valid");
        assert_eq!(
            (s.enabled, s.ttl, s.streaming),
            (true, Duration::from_secs(600), true)
        );
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::DATE,
            HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"),
        );
        h.insert(
            "cf-aig-log-id",
            HeaderValue::from_static("01J0000000000000000000000"),
        );
        h.insert("cf-aig-cache-status", HeaderValue::from_static("MISS"));
        h.insert("cf-aig-provider", HeaderValue::from_static("anthropic"));
        h.insert("cf-aig-step", HeaderValue::from_static("1"));
        h
    }

    #[test]
    fn only_whole_ok_responses_are_stored_and_they_expire() {
        let store = Arc::new(Store::new(1 << 20));
        let k = [1u8; 32];
        let h = json_headers();
        assert!(
            store
                .fill(k, DEFAULT_TTL, StatusCode::TOO_MANY_REQUESTS, &h, false)
                .is_none()
        );
        // A fill dropped before the end stores nothing.
        let mut f = store
            .fill(k, DEFAULT_TTL, StatusCode::OK, &h, false)
            .expect("fill");
        assert!(f.push(b"{\"id\""));
        drop(f);
        assert!(store.get(&k).is_none());
        let mut f = store
            .fill(k, DEFAULT_TTL, StatusCode::OK, &h, false)
            .expect("fill");
        assert!(f.push(b"{\"id\":"));
        assert!(f.push(b"1}"));
        f.finish();
        let e = store.get(&k).expect("stored");
        assert_eq!(&e.body[..], b"{\"id\":1}");
        assert!(e.headers.get(header::DATE).is_none());
        assert!(e.headers.get("cf-aig-log-id").is_none());
        assert!(e.headers.get("cf-aig-cache-status").is_none());
        // What served the answer stays with it.
        assert_eq!(e.headers["cf-aig-provider"], "anthropic");
        assert_eq!(e.headers["cf-aig-step"], "1");
        assert_eq!(e.headers[header::CONTENT_TYPE], "application/json");
        // Expired entries are gone.
        let k2 = [2u8; 32];
        let f = store
            .fill(k2, Duration::ZERO, StatusCode::OK, &h, false)
            .expect("fill");
        f.finish();
        assert!(store.get(&k2).is_none());
    }

    #[test]
    fn streams_only_when_asked_and_no_entry_beyond_its_share() {
        let store = Arc::new(Store::new(CachePolicy::MIN_MAX_SIZE));
        let mut sse = HeaderMap::new();
        sse.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        assert!(
            store
                .fill([3; 32], DEFAULT_TTL, StatusCode::OK, &sse, false)
                .is_none()
        );
        assert!(
            store
                .fill([3; 32], DEFAULT_TTL, StatusCode::OK, &sse, true)
                .is_some()
        );
        let mut f = store
            .fill([4; 32], DEFAULT_TTL, StatusCode::OK, &json_headers(), false)
            .expect("fill");
        let big = vec![b'x'; CachePolicy::MIN_MAX_SIZE as usize];
        assert!(!f.push(&big));
        let mut declared = json_headers();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10000000"));
        assert!(
            store
                .fill([5; 32], DEFAULT_TTL, StatusCode::OK, &declared, false)
                .is_none()
        );
    }

    #[test]
    fn an_entry_owns_compact_copies_of_what_it_keeps() {
        // An upstream's header values are slices of its connection's read buffer: the entry
        // must not hold that buffer, nor a body's spare room.
        let read_buffer =
            Bytes::from(b"content-type: application/json\r\nx-request-kind: chat\r\n".repeat(200));
        let slice = |from: &str| {
            let at = memchr::memmem::find(&read_buffer, from.as_bytes()).expect("there");
            HeaderValue::from_maybe_shared(read_buffer.slice(at..at + from.len())).expect("value")
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, slice("application/json"));
        headers.insert("x-request-kind", slice("chat"));
        let store = Arc::new(Store::new(1 << 20));
        let mut f = store
            .fill([9; 32], DEFAULT_TTL, StatusCode::OK, &headers, false)
            .expect("fill");
        assert!(f.push(b"{\"id\":"));
        assert!(f.push(b"1}"));
        f.finish();
        let e = store.get(&[9; 32]).expect("stored");
        let within = |v: &[u8]| {
            let range = read_buffer.as_ptr_range();
            range.contains(&v.as_ptr())
        };
        for (name, value) in &e.headers {
            assert!(!within(value.as_bytes()), "{name} still in the read buffer");
        }
        assert_eq!(e.headers["x-request-kind"], "chat");
        assert_eq!(&e.body[..], b"{\"id\":1}");
        // Weighed by what it holds: more than its bytes, far less than the read buffer.
        let held = e.body.len() + "application/json".len() + "chat".len();
        assert!(e.weight > held as u64 + 300, "{}", e.weight);
        assert!(e.weight < 2048, "{}", e.weight);
        assert_eq!(store.entries.weight(), e.weight);
    }

    #[test]
    fn the_store_stays_within_its_size() {
        let store = Arc::new(Store::new(CachePolicy::MIN_MAX_SIZE));
        let body = Bytes::from(vec![b'a'; 1000]);
        for i in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            if let Some(f) = store.fill(k, DEFAULT_TTL, StatusCode::OK, &json_headers(), false) {
                f.whole(&body);
            }
        }
        assert!(
            store.entries.weight() <= CachePolicy::MIN_MAX_SIZE,
            "{store:?}"
        );
        assert!(!store.is_empty() && store.len() < 1000, "{store:?}");
    }
}
