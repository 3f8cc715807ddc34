//! OpenTelemetry export (`spec.openTelemetry`): one span per proxied request, following the
//! GenAI semantic conventions (`gen_ai.*`), posted as OTLP/HTTP JSON to `{endpoint}/v1/traces`.
//!
//! Why hand-written: the OpenTelemetry SDK crates (opentelemetry, opentelemetry_sdk,
//! opentelemetry-otlp with its prost/tonic or reqwest stack) would add a second HTTP client,
//! a protobuf stack and a batch processor with its own threads to a sidecar whose RSS budget is
//! 15 MB. What sidegate needs is small: one span per finished request, no in-process context
//! propagation, no metrics or logs signals. The OTLP/HTTP JSON encoding is stable and
//! documented (ids in hex, 64-bit integers as strings, enums as numbers), so a batch is written
//! straight into its body and posted with the gateway's own upstream client.
//!
//! Off the hot path: with no exporter configured a request carries `None` and nothing here runs.
//! With one, a finished request puts a small [`Span`] on a queue bounded in spans and in bytes
//! (`try_send`: dropped and counted when full; long attribute values cut first); one background
//! task batches (up to [`MAX_BATCH`] spans or [`MAX_BATCH_BYTES`], or every [`BATCH_EVERY`]),
//! encodes and posts.
//! Export failures, and spans a collector rejects, are counted and logged at most every 10 s;
//! they never touch requests. Spans carry no keys, headers or bodies.

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::error::GatewayError;
use crate::headers::Gw;
use crate::telemetry::{Metrics, SpanFate};
use crate::upstream::UpstreamClient;

/// Spans waiting for export; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 2048;
/// Bytes the spans waiting for export (the batch being posted included) may hold; a span that
/// would pass it is dropped (and counted), as the access log drops lines past its 4 MiB.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Longest string attribute value a span keeps (a `cf-aig-metadata` value, the model), in bytes:
/// a longer one is cut at a character boundary (OpenTelemetry's attribute value length limit).
pub const MAX_VALUE_LEN: usize = 4096;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// A batch holding this many bytes of spans is posted at once: large spans (long metadata) leave
/// room in [`QUEUE_BYTES`] for the next batch while one is posted.
pub const MAX_BATCH_BYTES: usize = QUEUE_BYTES / 4;
/// Longest a span waits in a partial batch.
pub const BATCH_EVERY: Duration = Duration::from_secs(2);
/// Longest one export request may take (connect, send, response).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Export failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Most bytes of a collector's answer read (to find why it refused or rejected spans).
const MAX_ANSWER: usize = 64 * 1024;
/// Most bytes of a collector's message quoted in a warning.
const MAX_MESSAGE: usize = 512;
/// Longest `tracestate` kept on a span: W3C Trace Context has vendors propagate at least 512
/// characters; past them the last members are left out.
const MAX_TRACESTATE: usize = 512;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const TRACE_ID: HeaderName = HeaderName::from_static(Gw::OtelTraceId.name());
const PARENT_SPAN_ID: HeaderName = HeaderName::from_static(Gw::OtelParentSpanId.name());

/// Where spans of one config go, and what resource they describe.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// `{endpoint}/v1/traces`.
    uri: http::Uri,
    /// `service.name`.
    service_name: String,
    /// `namespace/name` of the gateway, or empty.
    gateway: String,
}

impl Target {
    /// The export target of `spec.openTelemetry`, if set; the error names the field.
    pub fn from_policy(
        policy: &sidegate_crds::policy::GatewayPolicy,
        gateway: String,
    ) -> Result<Option<Arc<Self>>, String> {
        let Some(o) = &policy.open_telemetry else {
            return Ok(None);
        };
        if let Some(why) = policy.open_telemetry_problem() {
            return Err(why);
        }
        let url = format!("{}/v1/traces", o.endpoint.trim_end_matches('/'));
        let uri = url.parse::<http::Uri>().map_err(|e| {
            format!(
                "spec.openTelemetry.endpoint {:?} is not a valid URL: {e}",
                o.endpoint
            )
        })?;
        Ok(Some(Arc::new(Self {
            uri,
            service_name: o.service_name.clone().unwrap_or_else(|| "sidegate".into()),
            gateway,
        })))
    }
}

/// The client's trace a request's span joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The client's span, the parent of ours (none: ours is the trace's root).
    pub span_id: Option<[u8; 8]>,
    /// The client records the trace (W3C `sampled` flag; `cf-aig-otel-*` ids are taken as
    /// sampled): when not, our span is not exported either (parent-based sampling).
    pub sampled: bool,
    /// The client's W3C `tracestate`, which our span carries as its own (with `traceparent` only).
    pub state: Option<Arc<str>>,
}

/// The trace context of a request: W3C `traceparent` (with its `tracestate`) when present and
/// valid (an invalid one is ignored, as W3C Trace Context asks), else `cf-aig-otel-trace-id`
/// (32 hex digits) with an optional `cf-aig-otel-parent-span-id` (16 hex digits), else none (a
/// new trace). Malformed `cf-aig-otel-*` values are refused (400, code 2100) like other bad
/// `cf-aig-*` headers.
pub fn parent_from_headers(h: &HeaderMap) -> Result<Option<Parent>, GatewayError> {
    let (trace_id, span_id) = gateway_ids(h.get(TRACE_ID), h.get(PARENT_SPAN_ID))?;
    // W3C: more than one traceparent is as good as none.
    let mut lines = h.get_all(TRACEPARENT).iter();
    if let (Some(line), None) = (lines.next(), lines.next())
        && let Some(mut p) = traceparent(line.as_bytes())
    {
        p.state = tracestate(h);
        return Ok(Some(p));
    }
    Ok(trace_id.map(|trace_id| Parent {
        trace_id,
        span_id,
        sampled: true,
        state: None,
    }))
}

/// Checks a request's `cf-aig-otel-trace-id` and `cf-aig-otel-parent-span-id`, whether or not
/// spans are exported: a malformed one is refused (400, code 2100) whatever the gateway's
/// settings, as every other `cf-aig-*` header is.
pub fn check_gateway_ids(h: crate::headers::GatewayHeaders<'_>) -> Result<(), GatewayError> {
    gateway_ids(h.get(Gw::OtelTraceId), h.get(Gw::OtelParentSpanId)).map(|_| ())
}

/// A trace id and a parent span id, each if sent.
type GatewayIds = (Option<[u8; 16]>, Option<[u8; 8]>);

/// `cf-aig-otel-trace-id` (32 hex digits) and `cf-aig-otel-parent-span-id` (16), either case,
/// neither all zero.
fn gateway_ids(
    trace: Option<&http::HeaderValue>,
    span: Option<&http::HeaderValue>,
) -> Result<GatewayIds, GatewayError> {
    let bad = |h: Gw, digits: usize| GatewayError::BadHeader {
        name: h.name(),
        reason: format!("expected {digits} hex digits, not all zero"),
    };
    let trace_id = trace
        .map(|v| hex_id::<16>(v.as_bytes()).ok_or_else(|| bad(Gw::OtelTraceId, 32)))
        .transpose()?;
    let span_id = span
        .map(|v| hex_id::<8>(v.as_bytes()).ok_or_else(|| bad(Gw::OtelParentSpanId, 16)))
        .transpose()?;
    Ok((trace_id, span_id))
}

/// `{version}-{trace-id}-{parent-id}-{flags}` in lowercase hex; versions above 00 may add fields
/// after these.
fn traceparent(v: &[u8]) -> Option<Parent> {
    let v = v.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let [version] = lower_hex::<1>(&v[..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let [flags] = lower_hex::<1>(&v[53..55])?;
    Some(Parent {
        trace_id: nonzero(lower_hex::<16>(&v[3..35])?)?,
        span_id: Some(nonzero(lower_hex::<8>(&v[36..52])?)?),
        sampled: flags & 1 == 1,
        state: None,
    })
}

/// The client's `tracestate` (its header lines joined) as W3C Trace Context reads it: list
/// members `key=value`, empty ones skipped; none when one is malformed, a key repeats or there
/// are more than 32; past [`MAX_TRACESTATE`] bytes, the members that do not fit are left out.
fn tracestate(h: &HeaderMap) -> Option<Arc<str>> {
    let mut kept = String::new();
    let mut keys: Vec<&str> = Vec::new();
    for line in h.get_all(TRACESTATE) {
        for member in line.to_str().ok()?.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            let key = tracestate_key(member)?;
            if keys.len() == 32 || keys.contains(&key) {
                return None;
            }
            keys.push(key);
            let comma = usize::from(!kept.is_empty());
            if kept.len() + comma + member.len() <= MAX_TRACESTATE {
                if comma == 1 {
                    kept.push(',');
                }
                kept.push_str(member);
            }
        }
    }
    (!kept.is_empty()).then(|| Arc::from(kept))
}

/// The key of a valid `tracestate` list member (W3C Trace Context's ABNF).
fn tracestate_key(member: &str) -> Option<&str> {
    let (key, value) = member.split_once('=')?;
    let rest_ok = |s: &str| {
        s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/'))
    };
    let key_ok = match key.split_once('@') {
        None => {
            key.len() <= 256 && key.starts_with(|c: char| c.is_ascii_lowercase()) && rest_ok(key)
        }
        Some((tenant, system)) => {
            (1..=241).contains(&tenant.len())
                && tenant.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && rest_ok(tenant)
                && (1..=14).contains(&system.len())
                && system.starts_with(|c: char| c.is_ascii_lowercase())
                && rest_ok(system)
        }
    };
    let value_ok = (1..=256).contains(&value.len())
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| matches!(b, 0x20..=0x7e) && b != b',' && b != b'=');
    (key_ok && value_ok).then_some(key)
}

/// `N` bytes from `2N` lowercase or uppercase hex digits, not all zero (an invalid id).
fn hex_id<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    nonzero(hex_bytes::<N>(s)?)
}

/// `N` bytes from `2N` lowercase hex digits (W3C Trace Context's `HEXDIGLC`: a `traceparent`
/// in uppercase is not valid).
fn lower_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        hex_bytes::<N>(s)
    } else {
        None
    }
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    id.iter().any(|&x| x != 0).then_some(id)
}

fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The export queue: spans for the export task, and the bytes they hold.
#[derive(Clone)]
struct Queue {
    spans: mpsc::Sender<Msg>,
    /// Bytes held by the spans queued and those of the batch being exported ([`Span::size`]).
    held: Arc<AtomicUsize>,
}

/// What a request that is traced carries until its record is finished.
#[derive(Clone)]
pub struct Trace {
    queue: Queue,
    target: Arc<Target>,
    parent: Option<Parent>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("target", &self.target.uri)
            .field("parent", &self.parent)
            .finish()
    }
}

impl PartialEq for Trace {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.target, &other.target) && self.parent == other.parent
    }
}

impl Trace {
    /// The trace context this request's span joins.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    /// Queues the span of a finished request; when the queue is full (in spans or bytes) it is
    /// dropped and counted. A request whose client does not record the trace has none.
    pub(crate) fn send(self, span: Finished, metrics: &Metrics) {
        if self.parent.as_ref().is_some_and(|p| !p.sampled) {
            return;
        }
        let span = Span::new(self.target, self.parent, span);
        let size = span.size;
        let held = &self.queue.held;
        if held.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES
            || self
                .queue
                .spans
                .try_send(Msg::Span(Box::new(span)))
                .is_err()
        {
            held.fetch_sub(size, Ordering::Relaxed);
            metrics.count_otel_spans(SpanFate::Dropped, 1);
        }
    }
}

/// What a finished request tells its span.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finished {
    pub start: SystemTime,
    pub end: SystemTime,
    pub provider: Arc<str>,
    pub method: http::Method,
    /// `gen_ai.operation.name`.
    pub operation: &'static str,
    pub model: Option<String>,
    pub status: u16,
    /// `complete`, `upstream_error`, `buffers_full` (a stream the memory budget ended),
    /// `cancelled` or `refused` (a gateway-made error).
    pub outcome: &'static str,
    pub tokens: [Option<u64>; 2],
    pub cost: Option<f64>,
    pub cached: bool,
    pub log_id: String,
    /// `cf-aig-metadata` as compact JSON (a flat object).
    pub metadata: Option<Arc<str>>,
    /// The gateway's error code (SPEC.md envelope) when it refused the request itself.
    pub error_code: Option<u16>,
}

/// A span waiting for export.
struct Span {
    target: Arc<Target>,
    parent: Option<Parent>,
    finished: Finished,
    /// The bytes it holds, counted against [`QUEUE_BYTES`] until its batch is posted.
    size: usize,
}

impl Span {
    /// The span of `finished`, its long values cut to [`MAX_VALUE_LEN`].
    fn new(target: Arc<Target>, parent: Option<Parent>, mut finished: Finished) -> Self {
        if let Some(model) = &mut finished.model {
            cut_value(model);
        }
        // No value can be longer than its whole object.
        if let Some(meta) = &finished.metadata
            && meta.len() > MAX_VALUE_LEN
        {
            finished.metadata = cut_metadata(meta);
        }
        let size = std::mem::size_of::<Self>()
            + finished.log_id.len()
            + finished.model.as_ref().map_or(0, String::len)
            + finished.metadata.as_ref().map_or(0, |m| m.len())
            + parent
                .as_ref()
                .and_then(|p| p.state.as_ref())
                .map_or(0, |s| s.len());
        Self {
            target,
            parent,
            finished,
            size,
        }
    }
}

/// `s` cut to at most [`MAX_VALUE_LEN`] bytes, at a character boundary.
fn cut_value(s: &mut String) {
    if s.len() > MAX_VALUE_LEN {
        s.truncate(floor_char(s, MAX_VALUE_LEN));
        s.shrink_to_fit();
    }
}

/// The largest character boundary of `s` at or before `i`.
fn floor_char(s: &str, i: usize) -> usize {
    (0..=i.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Compact JSON metadata with each string value cut to [`MAX_VALUE_LEN`] bytes.
fn cut_metadata(meta: &str) -> Option<Arc<str>> {
    let mut map: Map<String, Value> = serde_json::from_str(meta).ok()?;
    for v in map.values_mut() {
        if let Value::String(s) = v {
            cut_value(s);
        }
    }
    serde_json::to_string(&map).ok().map(Arc::from)
}

enum Msg {
    Span(Box<Span>),
    /// Export what is queued now, then answer.
    Flush(oneshot::Sender<()>),
}

/// `gen_ai.operation.name` of a provider path (or `/compat` path).
pub(crate) fn operation(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or_default();
    if path.ends_with("embeddings") || path.contains(":embed") || path.ends_with("/embed") {
        "embeddings"
    } else if path.ends_with("chat/completions")
        || path.ends_with("/messages")
        || path.ends_with("/chat")
        || path.ends_with("/converse")
        || path.ends_with("/converse-stream")
        || path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
        || path.ends_with("/responses")
    {
        "chat"
    } else if path.ends_with("completions") {
        "text_completion"
    } else {
        "request"
    }
}

/// `gen_ai.provider.name` (and `gen_ai.system`) of a provider: the GenAI semantic conventions'
/// well-known value where they have one, else sidegate's provider id.
pub(crate) fn provider_name(id: &str) -> &str {
    match id {
        "azure-openai" => "azure.ai.openai",
        "aws-bedrock" => "aws.bedrock",
        "google-ai-studio" => "gcp.gemini",
        "google-vertex-ai" => "gcp.vertex_ai",
        "mistral" => "mistral_ai",
        "grok" => "x_ai",
        "perplexity-ai" => "perplexity",
        // openai, anthropic, groq, cohere and deepseek are the conventions' names already.
        other => other,
    }
}

/// The trace headers of a request, kept (only when the gateway exports spans) for the span of
/// a request the gateway refuses.
pub fn trace_headers(h: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [TRACEPARENT, TRACESTATE, TRACE_ID, PARENT_SPAN_ID] {
        for v in h.get_all(&name) {
            kept.append(name.clone(), v.clone());
        }
    }
    kept
}

/// The exporter of a gateway: a queue and the task that empties it, started on first use.
pub struct Exporter {
    client: UpstreamClient,
    metrics: Arc<Metrics>,
    queue: OnceLock<Queue>,
}

impl Exporter {
    /// An exporter that posts with `client`; nothing runs until a span is traced.
    pub fn new(client: UpstreamClient, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            metrics,
            queue: OnceLock::new(),
        }
    }

    /// The trace of a request to a gateway exporting to `target` (its headers checked).
    pub fn trace(&self, target: &Arc<Target>, h: &HeaderMap) -> Result<Trace, GatewayError> {
        let parent = parent_from_headers(h)?;
        let queue = self
            .queue
            .get_or_init(|| {
                let (spans, rx) = mpsc::channel(QUEUE_CAPACITY);
                let held = Arc::new(AtomicUsize::new(0));
                tokio::spawn(run(
                    rx,
                    held.clone(),
                    self.client.clone(),
                    self.metrics.clone(),
                ));
                Queue { spans, held }
            })
            .clone();
        Ok(Trace {
            queue,
            target: target.clone(),
            parent,
        })
    }

    /// Queues the span of a request the gateway refused with `err` (its own error response,
    /// whose `cf-aig-log-id` is `log_id`); `metadata` is the request's `cf-aig-metadata` as
    /// compact JSON, when that header is valid.
    #[allow(clippy::too_many_arguments)]
    pub fn refused(
        &self,
        target: &Arc<Target>,
        trace_headers: &HeaderMap,
        operation: &'static str,
        provider: Option<Arc<str>>,
        method: &http::Method,
        err: &GatewayError,
        elapsed: Duration,
        log_id: &str,
        metadata: Option<Arc<str>>,
        metrics: &Metrics,
    ) {
        // A refusal for a malformed trace header starts a new trace.
        let trace = match self.trace(target, trace_headers) {
            Ok(t) => t,
            Err(_) => match self.trace(target, &HeaderMap::new()) {
                Ok(t) => t,
                Err(_) => return,
            },
        };
        let end = SystemTime::now();
        trace.send(
            Finished {
                start: end.checked_sub(elapsed).unwrap_or(end),
                end,
                provider: provider.unwrap_or_else(|| Arc::from("none")),
                method: method.clone(),
                operation,
                model: None,
                status: err.status().as_u16(),
                outcome: "refused",
                tokens: [None, None],
                cost: None,
                cached: false,
                log_id: log_id.to_owned(),
                metadata,
                error_code: Some(err.code()),
            },
            metrics,
        );
    }

    /// Exports what is queued, waiting at most `within` (on shutdown; best effort).
    pub async fn flush(&self, within: Duration) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        let (done, wait) = oneshot::channel();
        let flushed = tokio::time::timeout(within, async {
            if queue.spans.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "OpenTelemetry spans not all exported before shutdown"
            );
        }
    }
}

/// The export task: batches spans and posts them until the queue closes.
async fn run(
    mut rx: mpsc::Receiver<Msg>,
    held: Arc<AtomicUsize>,
    client: UpstreamClient,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<Span> = Vec::new();
    // Bytes of the spans in `batch` (emptied by each export).
    let mut batch_bytes = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut warned = Warned::default();
    loop {
        let msg = match deadline {
            Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                Ok(msg) => msg,
                Err(_) => {
                    export(&client, &metrics, &held, &mut batch, &mut warned).await;
                    (batch_bytes, deadline) = (0, None);
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(Msg::Span(span)) => {
                batch_bytes += span.size;
                batch.push(*span);
                if batch.len() == 1 {
                    deadline = Some(tokio::time::Instant::now() + BATCH_EVERY);
                }
                if batch.len() >= MAX_BATCH || batch_bytes >= MAX_BATCH_BYTES {
                    export(&client, &metrics, &held, &mut batch, &mut warned).await;
                    (batch_bytes, deadline) = (0, None);
                }
            }
            Some(Msg::Flush(done)) => {
                export(&client, &metrics, &held, &mut batch, &mut warned).await;
                (batch_bytes, deadline) = (0, None);
                let _ = done.send(());
            }
            None => {
                export(&client, &metrics, &held, &mut batch, &mut warned).await;
                return;
            }
        }
    }
}

/// When each kind of export warning was last logged: each at most every [`WARN_EVERY`].
#[derive(Default)]
struct Warned {
    failed: Option<tokio::time::Instant>,
    rejected: Option<tokio::time::Instant>,
}

/// Whether a warning last logged at `last` is due again (then it is logged now).
fn due(last: &mut Option<tokio::time::Instant>) -> bool {
    let now = tokio::time::Instant::now();
    let due = last.is_none_or(|t| now >= t + WARN_EVERY);
    if due {
        *last = Some(now);
    }
    due
}

/// Posts `batch` (one request per target) and empties it; counts exported and failed spans
/// (those the collector rejected among them), and gives back the bytes they held.
async fn export(
    client: &UpstreamClient,
    metrics: &Metrics,
    held: &AtomicUsize,
    batch: &mut Vec<Span>,
    warned: &mut Warned,
) {
    while let Some(first) = batch.first() {
        let target = first.target.clone();
        let (mine, rest): (Vec<Span>, Vec<Span>) = std::mem::take(batch)
            .into_iter()
            .partition(|s| Arc::ptr_eq(&s.target, &target) || *s.target == *target);
        *batch = rest;
        let n = mine.len() as u64;
        let size: usize = mine.iter().map(|s| s.size).sum();
        let body = encode(&target, &mine, &mut IdSource::default());
        // The body is all the post needs: the spans go now, their bytes once it is done with.
        drop(mine);
        let posted = post(client, &target.uri, body).await;
        held.fetch_sub(size, Ordering::Relaxed);
        match posted {
            Ok(answer) => {
                let rejected = answer.rejected.min(n);
                metrics.count_otel_spans(SpanFate::Exported, n - rejected);
                if rejected > 0 {
                    metrics.count_otel_spans(SpanFate::Failed, rejected);
                }
                if (rejected > 0 || answer.message.is_some()) && due(&mut warned.rejected) {
                    let why = answer.message.as_deref().unwrap_or("no reason given");
                    if rejected > 0 {
                        tracing::warn!(endpoint = %target.uri, spans = n, rejected, error = %why, "OpenTelemetry collector rejected spans of a batch; counted as failed (requests are not affected)");
                    } else {
                        tracing::warn!(endpoint = %target.uri, spans = n, warning = %why, "OpenTelemetry collector took a batch with a warning");
                    }
                }
            }
            Err(why) => {
                metrics.count_otel_spans(SpanFate::Failed, n);
                if due(&mut warned.failed) {
                    tracing::warn!(endpoint = %target.uri, spans = n, error = %why, "OpenTelemetry export failed; spans dropped (requests are not affected)");
                }
            }
        }
    }
}

/// What a collector that took a batch said of it (OTLP `ExportTraceServiceResponse`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Accepted {
    /// Spans of the batch it rejected (`partialSuccess.rejectedSpans`).
    rejected: u64,
    /// Its `partialSuccess.errorMessage` (why it rejected them, or a warning), on one line.
    message: Option<String>,
}

/// Posts one batch: what the collector said of it, or why it was not taken (the collector's
/// own words when it gave some).
async fn post(client: &UpstreamClient, uri: &http::Uri, body: Vec<u8>) -> Result<Accepted, String> {
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let sent = tokio::time::timeout(EXPORT_TIMEOUT, async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| crate::proxy::error_chain(&e))?;
        let status = resp.status();
        let plain = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                t.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/plain")
            });
        // Read to its end, so the connection can be reused, unless larger than a collector's
        // answer is: then it is not read further (and says nothing).
        let answer = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(accepted(&answer))
        } else {
            Err(refusal(status, plain, &answer))
        }
    })
    .await;
    sent.unwrap_or_else(|_| Err(format!("no answer within {}s", EXPORT_TIMEOUT.as_secs())))
}

/// What a success answer tells (OTLP/HTTP: an `ExportTraceServiceResponse`, JSON as the request
/// was; its `partialSuccess` when the collector did not take every span).
fn accepted(answer: &[u8]) -> Accepted {
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(answer) else {
        return Accepted::default();
    };
    // Protobuf's JSON mapping: lowerCamelCase written, the proto field names read as well.
    let field = |o: &Map<String, Value>, camel: &str, proto: &str| {
        o.get(camel).or_else(|| o.get(proto)).cloned()
    };
    let Some(Value::Object(partial)) = field(&doc, "partialSuccess", "partial_success") else {
        return Accepted::default();
    };
    // An int64: a string in JSON, or a number.
    let rejected = match field(&partial, "rejectedSpans", "rejected_spans") {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    };
    let message = match field(&partial, "errorMessage", "error_message") {
        Some(Value::String(s)) => Some(one_line(&s)).filter(|m| !m.is_empty()),
        _ => None,
    };
    Accepted { rejected, message }
}

/// Why a collector answered `status`: with the message of its answer's OTLP `Status` (or of a
/// plain-text answer, a proxy's say) when it has one.
fn refusal(status: http::StatusCode, plain: bool, answer: &[u8]) -> String {
    let message = match serde_json::from_slice::<Value>(answer) {
        Ok(Value::Object(doc)) => doc.get("message").and_then(Value::as_str).map(one_line),
        _ if plain => std::str::from_utf8(answer).ok().map(one_line),
        _ => None,
    };
    match message.filter(|m| !m.is_empty()) {
        Some(m) => format!("collector answered {}: {m}", status.as_u16()),
        None => format!("collector answered {}", status.as_u16()),
    }
}

/// A collector's words for a log line: trimmed, control characters (line breaks, escapes) as
/// spaces, at most [`MAX_MESSAGE`] bytes (`…` when cut).
fn one_line(s: &str) -> String {
    let s = s.trim();
    let kept = &s[..floor_char(s, MAX_MESSAGE)];
    let mut out: String = kept
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if kept.len() < s.len() {
        out.push('…');
    }
    out
}

/// Random trace and span ids (from the OS).
#[derive(Default)]
struct IdSource {
    rng: Option<ring::rand::SystemRandom>,
}

impl IdSource {
    fn fill<const N: usize>(&mut self) -> [u8; N] {
        use ring::rand::SecureRandom;
        let rng = self.rng.get_or_insert_with(ring::rand::SystemRandom::new);
        let mut out = [0u8; N];
        loop {
            if rng.fill(&mut out).is_err() {
                // No OS randomness: ids from the clock and a counter still tell spans apart.
                let seed = crate::log_id::next();
                for (o, b) in out.iter_mut().zip(seed.bytes().rev().cycle()) {
                    *o ^= b;
                }
            }
            if out.iter().any(|&b| b != 0) {
                return out;
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// OTLP JSON written into a request body as it goes.
struct Writer(Vec<u8>);

impl Writer {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// `s` as a JSON string.
    fn string(&mut self, s: &str) {
        // Into a Vec, serde_json cannot fail.
        let _ = serde_json::to_writer(&mut self.0, s);
    }

    /// `id` as a JSON string of lowercase hex.
    fn hex(&mut self, id: &[u8]) {
        self.0.push(b'"');
        for b in id {
            self.0
                .extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        self.0.push(b'"');
    }

    /// `n` as a JSON string (how OTLP JSON writes 64-bit integers and times).
    fn quoted(&mut self, n: impl std::fmt::Display) {
        let _ = write!(self.0, "\"{n}\"");
    }

    /// An OTLP attribute list: `[` ... `]` around what `fill` adds.
    fn attributes(&mut self, fill: impl FnOnce(&mut Attributes<'_>)) {
        self.0.push(b'[');
        fill(&mut Attributes {
            w: self,
            first: true,
        });
        self.0.push(b']');
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// OTLP `KeyValue`s being written into a list.
struct Attributes<'a> {
    w: &'a mut Writer,
    first: bool,
}

impl Attributes<'_> {
    /// `{"key":key,"value":{` of the next attribute.
    fn key(&mut self, key: &str) -> &mut Writer {
        if !self.first {
            self.w.0.push(b',');
        }
        self.first = false;
        self.w.raw("{\"key\":");
        self.w.string(key);
        self.w.raw(",\"value\":{");
        &mut *self.w
    }

    fn string(&mut self, key: &str, value: &str) {
        let w = self.key(key);
        w.raw("\"stringValue\":");
        w.string(value);
        w.raw("}}");
    }

    fn int(&mut self, key: &str, n: i64) {
        let w = self.key(key);
        w.raw("\"intValue\":");
        w.quoted(n);
        w.raw("}}");
    }

    /// OTLP integers are signed 64-bit: one past them goes as a string value (a collector
    /// refuses the whole batch for it).
    fn uint(&mut self, key: &str, n: u64) {
        match i64::try_from(n) {
            Ok(n) => self.int(key, n),
            Err(_) => self.string(key, &n.to_string()),
        }
    }

    fn bool(&mut self, key: &str, b: bool) {
        let w = self.key(key);
        w.raw(if b {
            "\"boolValue\":true}}"
        } else {
            "\"boolValue\":false}}"
        });
    }

    fn double(&mut self, key: &str, x: f64) {
        if !x.is_finite() {
            return self.string(key, &x.to_string());
        }
        let w = self.key(key);
        w.raw("\"doubleValue\":");
        let _ = serde_json::to_writer(&mut w.0, &x);
        w.raw("}}");
    }

    /// A `cf-aig-metadata` value, typed.
    fn json(&mut self, key: &str, v: &Value) {
        match v {
            Value::Bool(b) => self.bool(key, *b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => self.int(key, i),
                (None, Some(u), _) => self.uint(key, u),
                (None, None, Some(x)) => self.double(key, x),
                _ => self.string(key, &n.to_string()),
            },
            Value::String(s) => self.string(key, s),
            other => self.string(key, &other.to_string()),
        }
    }
}

/// One OTLP/HTTP JSON `ExportTraceServiceRequest` of `spans` (all of `target`), written straight
/// into the body: no JSON tree of the batch is built first.
fn encode(target: &Target, spans: &[Span], ids: &mut IdSource) -> Vec<u8> {
    let guess: usize = spans.iter().map(|s| s.size * 2).sum();
    let mut w = Writer(Vec::with_capacity(512 + guess));
    w.raw("{\"resourceSpans\":[{\"resource\":{\"attributes\":");
    w.attributes(|a| {
        a.string("service.name", &target.service_name);
        a.string("telemetry.sdk.name", "sidegate");
        a.string("telemetry.sdk.language", "rust");
        a.string("telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
        if !target.gateway.is_empty() {
            a.string("sidegate.gateway", &target.gateway);
        }
    });
    w.raw("},\"scopeSpans\":[{\"scope\":{\"name\":\"sidegate\",\"version\":");
    w.string(env!("CARGO_PKG_VERSION"));
    w.raw("},\"spans\":[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            w.raw(",");
        }
        write_span(&mut w, s, ids);
    }
    w.raw("]}]}]}");
    w.0
}

/// Whether a span is an error, and its `error.type` (HTTP semantic conventions, CLIENT spans).
fn error_type(f: &Finished) -> Option<String> {
    // A stream cut short (by the provider, or by the gateway's memory budget) is an error
    // whatever status its head had.
    if matches!(f.outcome, "upstream_error" | "buffers_full") {
        return Some(f.outcome.to_owned());
    }
    // The provider's 4xx is an error of this CLIENT span; the gateway's own refusals (the
    // client's request was wrong) and the 499 of a client that went away are not.
    let provider_4xx = (400..500).contains(&f.status)
        && f.outcome != "refused"
        && !(f.outcome == "cancelled" && f.status == 499);
    (f.status >= 500 || provider_4xx).then(|| f.status.to_string())
}

fn write_span(w: &mut Writer, s: &Span, ids: &mut IdSource) {
    let f = &s.finished;
    let trace_id = s
        .parent
        .as_ref()
        .map_or_else(|| ids.fill::<16>(), |p| p.trace_id);
    w.raw("{\"traceId\":");
    w.hex(&trace_id);
    w.raw(",\"spanId\":");
    w.hex(&ids.fill::<8>());
    if let Some(parent) = s.parent.as_ref().and_then(|p| p.span_id) {
        w.raw(",\"parentSpanId\":");
        w.hex(&parent);
    }
    if let Some(state) = s.parent.as_ref().and_then(|p| p.state.as_deref()) {
        w.raw(",\"traceState\":");
        w.string(state);
    }
    w.raw(",\"name\":");
    match &f.model {
        Some(m) => w.string(&format!("{} {m}", f.operation)),
        None => w.string(f.operation),
    }
    // SPAN_KIND_CLIENT: the gateway calls the provider for the application.
    w.raw(",\"kind\":3,\"startTimeUnixNano\":");
    w.quoted(unix_nanos(f.start));
    w.raw(",\"endTimeUnixNano\":");
    w.quoted(unix_nanos(f.end));
    w.raw(",\"attributes\":");
    let error = error_type(f);
    w.attributes(|a| {
        let provider = provider_name(&f.provider);
        a.string("gen_ai.operation.name", f.operation);
        a.string("gen_ai.system", provider);
        a.string("gen_ai.provider.name", provider);
        if let Some(m) = &f.model {
            a.string("gen_ai.request.model", m);
        }
        for (key, n) in [
            ("gen_ai.usage.input_tokens", f.tokens[0]),
            ("gen_ai.usage.output_tokens", f.tokens[1]),
        ] {
            if let Some(n) = n {
                a.uint(key, n);
            }
        }
        a.string("http.request.method", f.method.as_str());
        a.int("http.response.status_code", f.status.into());
        if let Some(kind) = &error {
            a.string("error.type", kind);
        }
        a.string("sidegate.provider", &f.provider);
        if !f.log_id.is_empty() {
            a.string("sidegate.log_id", &f.log_id);
        }
        if let Some(code) = f.error_code {
            a.int("sidegate.error_code", code.into());
        }
        a.bool("sidegate.cached", f.cached);
        a.string("sidegate.outcome", f.outcome);
        if let Some(usd) = f.cost {
            a.double("sidegate.cost_usd", crate::access_log::round_usd(usd));
        }
        if let Some(Ok(meta)) = f
            .metadata
            .as_deref()
            .map(serde_json::from_str::<Map<String, Value>>)
        {
            for (k, v) in &meta {
                a.json(&format!("sidegate.metadata.{k}"), v);
            }
        }
    });
    if error.is_some() {
        w.raw(",\"status\":{\"code\":2,\"message\":");
        w.string(&format!("{} ({})", f.outcome, f.status));
        w.raw("}}");
    } else {
        w.raw(",\"status\":{\"code\":0}}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    /// A trace whose spans go into `tx`, under `parent`.
    fn trace_into(tx: mpsc::Sender<Msg>, parent: Option<Parent>) -> Trace {
        Trace {
            queue: Queue {
                spans: tx,
                held: Arc::default(),
            },
            target: target(),
            parent,
        }
    }

    fn target() -> Arc<Target> {
        Arc::new(Target {
            uri: "http://collector:4318/v1/traces".parse().expect("uri"),
            service_name: "checkout".into(),
            gateway: "team-a/main".into(),
        })
    }

    fn finished() -> Finished {
        Finished {
            start: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            end: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_623_456_789),
            provider: Arc::from("openai"),
            method: http::Method::POST,
            operation: "chat",
            model: Some("gpt-4o-mini".into()),
            status: 200,
            outcome: "complete",
            tokens: [Some(12), Some(34)],
            cost: Some(0.0025),
            cached: false,
            log_id: "01JABCDEF".into(),
            metadata: Some(Arc::from(r#"{"team":"a","n":3,"paid":true,"ratio":0.5}"#)),
            error_code: None,
        }
    }

    /// The OTLP document of one root span of `f`.
    fn encode_one(f: Finished) -> Value {
        let span = Span::new(target(), None, f);
        serde_json::from_slice(&encode(&target(), &[span], &mut IdSource::default())).expect("json")
    }

    /// The span of the OTLP document of one span.
    fn only_span(doc: &Value) -> &Value {
        &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    }

    fn attrs(span: &Value) -> std::collections::BTreeMap<String, Value> {
        span["attributes"]
            .as_array()
            .expect("attributes")
            .iter()
            .map(|a| {
                (
                    a["key"].as_str().expect("key").to_owned(),
                    a["value"].clone(),
                )
            })
            .collect()
    }

    #[test]
    fn traceparent_wins_and_cf_aig_otel_headers_are_the_fallback() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let want = Parent {
            trace_id: hex_bytes::<16>(TRACE.as_bytes()).expect("hex"),
            span_id: Some(hex_bytes::<8>(SPAN.as_bytes()).expect("hex")),
            sampled: true,
            state: None,
        };
        assert_eq!(
            parent_from_headers(&headers(&[("traceparent", tp)])),
            Ok(Some(want.clone()))
        );
        assert_eq!(
            parent_from_headers(&headers(&[
                ("traceparent", tp),
                ("cf-aig-otel-trace-id", "11111111111111111111111111111111"),
            ])),
            Ok(Some(want.clone()))
        );
        assert_eq!(
            parent_from_headers(&headers(&[
                ("cf-aig-otel-trace-id", TRACE),
                ("cf-aig-otel-parent-span-id", SPAN),
            ])),
            Ok(Some(want.clone()))
        );
        // cf-aig-otel-* ids are read in either case; a trace id alone makes our span a root of
        // the client's trace.
        assert_eq!(
            parent_from_headers(&headers(&[(
                "cf-aig-otel-trace-id",
                "4BF92F3577B34DA6A3CE929D0E0E4736"
            )])),
            Ok(Some(Parent {
                span_id: None,
                ..want.clone()
            }))
        );
        // The sampled flag unset: the client records none of the trace.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            parent_from_headers(&headers(&[("traceparent", unsampled)])),
            Ok(Some(Parent {
                sampled: false,
                ..want.clone()
            }))
        );
        // Only its bit 0 says so.
        let other_flags = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03";
        assert_eq!(
            traceparent(other_flags.as_bytes()).map(|p| p.sampled),
            Some(true)
        );
        assert_eq!(parent_from_headers(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            // W3C: lowercase hex only.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(traceparent(bad.as_bytes()), None, "{bad}");
            assert_eq!(
                parent_from_headers(&headers(&[("traceparent", bad)])),
                Ok(None),
                "{bad}"
            );
        }
        // A later version may append fields.
        assert!(
            traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some()
        );
    }

    #[test]
    fn malformed_cf_aig_otel_ids_are_refused_with_2100() {
        for (name, bad) in [
            ("cf-aig-otel-trace-id", "4bf92f3577b34da6"),
            ("cf-aig-otel-trace-id", "zzf92f3577b34da6a3ce929d0e0e4736"),
            ("cf-aig-otel-trace-id", "00000000000000000000000000000000"),
            ("cf-aig-otel-parent-span-id", "00f067aa0ba902"),
            ("cf-aig-otel-parent-span-id", "0000000000000000"),
        ] {
            let err = parent_from_headers(&headers(&[(name, bad)])).expect_err(bad);
            assert_eq!((err.status().as_u16(), err.code()), (400, 2100), "{bad}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn a_span_is_otlp_json_with_gen_ai_attributes() {
        let parent = Parent {
            trace_id: hex_bytes::<16>(TRACE.as_bytes()).expect("hex"),
            span_id: Some(hex_bytes::<8>(SPAN.as_bytes()).expect("hex")),
            sampled: true,
            state: Some(Arc::from("ot=th:8,congo=t61rcWkgMzE")),
        };
        let span = Span::new(target(), Some(parent), finished());
        let body = encode(&target(), &[span], &mut IdSource::default());
        let doc: Value = serde_json::from_slice(&body).expect("json");
        let rs = &doc["resourceSpans"][0];
        let resource = attrs(&rs["resource"]);
        assert_eq!(resource["service.name"], json!({"stringValue": "checkout"}));
        assert_eq!(
            resource["sidegate.gateway"],
            json!({"stringValue": "team-a/main"})
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], TRACE);
        assert_eq!(s["parentSpanId"], SPAN);
        assert_eq!(s["traceState"], "ot=th:8,congo=t61rcWkgMzE");
        let span_id = s["spanId"].as_str().expect("span id");
        assert!(
            span_id.len() == 16 && span_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{span_id}"
        );
        assert_ne!(span_id, "0000000000000000");
        assert_eq!(s["name"], "chat gpt-4o-mini");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(s["endTimeUnixNano"], "1700000000623456789");
        assert_eq!(s["status"], json!({"code": 0}));
        let a = attrs(s);
        assert_eq!(a["gen_ai.operation.name"], json!({"stringValue": "chat"}));
        assert_eq!(a["gen_ai.system"], json!({"stringValue": "openai"}));
        assert_eq!(a["gen_ai.provider.name"], json!({"stringValue": "openai"}));
        assert_eq!(a["sidegate.provider"], json!({"stringValue": "openai"}));
        assert_eq!(
            a["gen_ai.request.model"],
            json!({"stringValue": "gpt-4o-mini"})
        );
        assert_eq!(a["gen_ai.usage.input_tokens"], json!({"intValue": "12"}));
        assert_eq!(a["gen_ai.usage.output_tokens"], json!({"intValue": "34"}));
        assert_eq!(a["http.response.status_code"], json!({"intValue": "200"}));
        assert_eq!(a["sidegate.log_id"], json!({"stringValue": "01JABCDEF"}));
        assert_eq!(a["sidegate.cached"], json!({"boolValue": false}));
        assert_eq!(a["sidegate.cost_usd"], json!({"doubleValue": 0.0025}));
        assert_eq!(a["sidegate.metadata.team"], json!({"stringValue": "a"}));
        assert_eq!(a["sidegate.metadata.n"], json!({"intValue": "3"}));
        assert_eq!(a["sidegate.metadata.paid"], json!({"boolValue": true}));
        assert_eq!(a["sidegate.metadata.ratio"], json!({"doubleValue": 0.5}));
        assert!(!a.contains_key("error.type"));
    }

    #[test]
    fn the_cost_is_written_without_float_noise() {
        let span = encode_one(Finished {
            cost: Some(0.000016800000000000002),
            ..finished()
        });
        let a = attrs(&span["resourceSpans"][0]["scopeSpans"][0]["spans"][0]);
        let usd = a["sidegate.cost_usd"]["doubleValue"].as_f64();
        assert_eq!(usd, Some(0.0000168), "{a:?}");
    }

    #[test]
    fn upstream_errors_and_5xx_are_error_spans_in_a_new_trace() {
        let mut f = finished();
        f.status = 502;
        f.model = None;
        f.cost = None;
        f.tokens = [None, None];
        let doc = encode_one(f);
        let s = &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["name"], "chat");
        assert!(s.get("parentSpanId").is_none());
        let trace = s["traceId"].as_str().expect("trace id");
        assert!(trace.len() == 32 && trace != "0".repeat(32), "{trace}");
        let a = attrs(s);
        assert_eq!(a["error.type"], json!({"stringValue": "502"}));
        assert!(!a.contains_key("gen_ai.usage.input_tokens"));
        assert!(!a.contains_key("sidegate.cost_usd"));

        let mut f = finished();
        f.outcome = "upstream_error";
        let doc = encode_one(f);
        let s = &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(
            attrs(s)["error.type"],
            json!({"stringValue": "upstream_error"})
        );

        // A stream the memory budget ended: an error, its code named.
        let mut f = finished();
        f.outcome = "buffers_full";
        f.error_code = Some(2110);
        let doc = encode_one(f);
        let s = &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["status"]["code"], 2);
        let a = attrs(s);
        assert_eq!(a["error.type"], json!({"stringValue": "buffers_full"}));
        assert_eq!(a["sidegate.error_code"], json!({"intValue": "2110"}));
    }

    #[test]
    fn a_full_queue_drops_spans_and_counts_them() {
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(2);
        let trace = trace_into(tx, None);
        for _ in 0..5 {
            trace.clone().send(finished(), &metrics);
        }
        let text = metrics.encode();
        assert!(
            text.contains("sidegate_otel_spans_dropped_total 3"),
            "{text}"
        );
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 2);
    }

    #[test]
    fn operations_follow_the_provider_path() {
        assert_eq!(operation("v1/chat/completions"), "chat");
        assert_eq!(operation("chat/completions"), "chat");
        assert_eq!(operation("v1/messages"), "chat");
        assert_eq!(
            operation("v1beta/models/gemini-2.5-flash:generateContent"),
            "chat"
        );
        assert_eq!(operation("v1/embeddings"), "embeddings");
        assert_eq!(operation("v1/completions"), "text_completion");
        assert_eq!(operation("v1/models"), "request");
    }

    #[test]
    fn integers_past_int64_go_as_strings() {
        let doc = encode_one(Finished {
            tokens: [Some(5), Some(u64::MAX)],
            metadata: Some(Arc::from(
                r#"{"a":-3,"b":9223372036854775807,"c":18446744073709551615}"#,
            )),
            ..finished()
        });
        let a = attrs(only_span(&doc));
        assert_eq!(a["gen_ai.usage.input_tokens"], json!({"intValue": "5"}));
        assert_eq!(
            a["gen_ai.usage.output_tokens"],
            json!({"stringValue": "18446744073709551615"})
        );
        assert_eq!(a["sidegate.metadata.a"], json!({"intValue": "-3"}));
        assert_eq!(
            a["sidegate.metadata.b"],
            json!({"intValue": "9223372036854775807"})
        );
        assert_eq!(
            a["sidegate.metadata.c"],
            json!({"stringValue": "18446744073709551615"})
        );
    }

    #[test]
    fn metadata_keeps_the_clients_order_and_escapes_its_text() {
        let doc = encode_one(Finished {
            metadata: Some(Arc::from(r#"{"z":"line\nbreak \"q\"","a":"\u00e9"}"#)),
            ..finished()
        });
        let keys: Vec<String> = attrs_in_order(only_span(&doc))
            .into_iter()
            .filter(|k| k.starts_with("sidegate.metadata."))
            .collect();
        assert_eq!(keys, ["sidegate.metadata.z", "sidegate.metadata.a"]);
        let a = attrs(only_span(&doc));
        assert_eq!(
            a["sidegate.metadata.z"],
            json!({"stringValue": "line\nbreak \"q\""})
        );
        assert_eq!(a["sidegate.metadata.a"], json!({"stringValue": "\u{e9}"}));
    }

    fn attrs_in_order(span: &Value) -> Vec<String> {
        span["attributes"]
            .as_array()
            .expect("attributes")
            .iter()
            .map(|a| a["key"].as_str().expect("key").to_owned())
            .collect()
    }

    #[test]
    fn provider_names_are_the_gen_ai_conventions_values() {
        for (id, name) in [
            ("openai", "openai"),
            ("anthropic", "anthropic"),
            ("azure-openai", "azure.ai.openai"),
            ("aws-bedrock", "aws.bedrock"),
            ("google-ai-studio", "gcp.gemini"),
            ("google-vertex-ai", "gcp.vertex_ai"),
            ("groq", "groq"),
            ("mistral", "mistral_ai"),
            ("cohere", "cohere"),
            ("deepseek", "deepseek"),
            ("grok", "x_ai"),
            ("perplexity-ai", "perplexity"),
            // None in the conventions: sidegate's id.
            ("openrouter", "openrouter"),
            ("workers-ai", "workers-ai"),
            ("custom-acme", "custom-acme"),
        ] {
            let doc = encode_one(Finished {
                provider: Arc::from(id),
                ..finished()
            });
            let a = attrs(only_span(&doc));
            assert_eq!(
                a["gen_ai.provider.name"],
                json!({"stringValue": name}),
                "{id}"
            );
            assert_eq!(a["gen_ai.system"], json!({"stringValue": name}), "{id}");
            assert_eq!(a["sidegate.provider"], json!({"stringValue": id}), "{id}");
        }
    }

    #[test]
    fn a_providers_4xx_is_an_error_but_not_the_gateways_refusals() {
        let status_of = |f: Finished| {
            let doc = encode_one(f);
            let s = only_span(&doc);
            (
                s["status"]["code"].as_u64(),
                attrs(s).get("error.type").cloned(),
            )
        };
        let error = |t: &str| (Some(2), Some(json!({"stringValue": t})));
        let unset = (Some(0), None);
        for status in [400, 401, 404, 429] {
            let f = Finished {
                status,
                ..finished()
            };
            assert_eq!(status_of(f), error(&status.to_string()), "{status}");
        }
        // The gateway refused the request itself (a bad header, its own rate limit).
        for status in [400, 404, 429] {
            let f = Finished {
                status,
                outcome: "refused",
                error_code: Some(2100),
                ..finished()
            };
            assert_eq!(status_of(f), unset, "{status}");
        }
        // The client left before the answer it waited for was let through.
        let f = Finished {
            status: 499,
            outcome: "cancelled",
            ..finished()
        };
        assert_eq!(status_of(f), unset);
        // A refusal that is the upstream's failure (unreachable) is an error as any 5xx.
        let f = Finished {
            status: 502,
            outcome: "refused",
            error_code: Some(2104),
            ..finished()
        };
        assert_eq!(status_of(f), error("502"));
    }

    #[test]
    fn the_clients_tracestate_is_read_as_w3c_lists_it() {
        let state = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            h.insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            for l in lines {
                h.append("tracestate", HeaderValue::from_str(l).expect("header"));
            }
            parent_from_headers(&h)
                .expect("valid")
                .expect("parent")
                .state
                .map(|s| s.to_string())
        };
        assert_eq!(state(&[]), None);
        assert_eq!(
            state(&[
                "ot=th:8 , congo=t61rcWkgMzE,,",
                "rojo@vendor=00f067aa0ba902b7"
            ]),
            Some("ot=th:8,congo=t61rcWkgMzE,rojo@vendor=00f067aa0ba902b7".into())
        );
        // A malformed member, a repeated key: the whole list is ignored.
        for bad in [
            "Ot=1",
            "ot",
            "ot=a=b",
            "ot=1,ot=2",
            "1ot=x",
            "ot=",
            "ot=a,b=c=d",
        ] {
            assert_eq!(state(&[bad]), None, "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(state(&[&many.join(",")]), None, "more than 32 members");
        // Past 512 bytes, the members that do not fit are left out.
        let wide: Vec<String> = (0..30)
            .map(|i| format!("k{i:02}={}", "v".repeat(20)))
            .collect();
        let wide = wide.join(",");
        let kept = state(&[&wide]).expect("kept");
        assert!(kept.len() <= 512 && wide.starts_with(&kept), "{kept}");
        assert_eq!(kept.split(',').count(), 512 / 25);
        // Without a valid traceparent there is no tracestate either.
        let mut h = HeaderMap::new();
        h.insert("tracestate", HeaderValue::from_static("ot=th:8"));
        h.insert("cf-aig-otel-trace-id", HeaderValue::from_static(TRACE));
        assert_eq!(
            parent_from_headers(&h)
                .expect("valid")
                .expect("parent")
                .state,
            None
        );
    }

    #[test]
    fn a_span_the_client_does_not_sample_is_not_queued_or_counted() {
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(4);
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]);
        let trace = trace_into(tx, parent_from_headers(&h).expect("valid"));
        trace.clone().send(finished(), &metrics);
        assert!(rx.try_recv().is_err());
        assert!(
            metrics
                .encode()
                .contains("sidegate_otel_spans_dropped_total 0")
        );
        assert_eq!(trace.queue.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn long_values_are_cut_and_the_queue_is_bounded_in_bytes() {
        let long = "é".repeat(30_000);
        let span = Span::new(
            target(),
            None,
            Finished {
                model: Some(format!("m{long}")),
                metadata: Some(Arc::from(
                    serde_json::to_string(&json!({"note": long, "n": 1, "team": "a"}))
                        .expect("json"),
                )),
                ..finished()
            },
        );
        let f = &span.finished;
        let model = f.model.as_deref().expect("model");
        assert!(model.len() <= MAX_VALUE_LEN && model.len() > MAX_VALUE_LEN - 2);
        let meta: Value =
            serde_json::from_str(f.metadata.as_deref().expect("metadata")).expect("json");
        let note = meta["note"].as_str().expect("note");
        assert!(
            long.starts_with(note) && note.len() > MAX_VALUE_LEN - 2,
            "{}",
            note.len()
        );
        assert_eq!((&meta["n"], &meta["team"]), (&json!(1), &json!("a")));
        assert!(span.size < 3 * MAX_VALUE_LEN, "{}", span.size);

        // Spans of cut metadata fill the bytes before the 2048 spans.
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(QUEUE_CAPACITY);
        let trace = trace_into(tx, None);
        let big = Finished {
            metadata: Some(Arc::from(
                serde_json::to_string(&json!({"a": long, "b": long, "c": long})).expect("json"),
            )),
            ..finished()
        };
        for _ in 0..QUEUE_CAPACITY {
            trace.clone().send(big.clone(), &metrics);
        }
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        let held = trace.queue.held.load(Ordering::Relaxed);
        assert!(held <= QUEUE_BYTES, "{held}");
        assert!(queued > 250 && queued < 400, "{queued}");
        let text = metrics.encode();
        let dropped = format!(
            "sidegate_otel_spans_dropped_total {}",
            QUEUE_CAPACITY - queued
        );
        assert!(text.contains(&dropped), "{text}");
    }

    #[test]
    fn a_collectors_partial_success_and_refusal_reasons_are_read() {
        assert_eq!(accepted(b"{}"), Accepted::default());
        assert_eq!(accepted(b""), Accepted::default());
        assert_eq!(accepted(br#"{"partialSuccess":{}}"#), Accepted::default());
        assert_eq!(
            accepted(br#"{"partialSuccess":{"rejectedSpans":"3","errorMessage":"too\nlong"}}"#),
            Accepted {
                rejected: 3,
                message: Some("too long".into())
            }
        );
        assert_eq!(
            accepted(br#"{"partial_success":{"rejected_spans":2}}"#),
            Accepted {
                rejected: 2,
                message: None
            }
        );
        // A warning with nothing rejected.
        assert_eq!(
            accepted(br#"{"partialSuccess":{"errorMessage":"deprecated field"}}"#),
            Accepted {
                rejected: 0,
                message: Some("deprecated field".into())
            }
        );
        let bad = http::StatusCode::BAD_REQUEST;
        assert_eq!(
            refusal(bad, false, br#"{"code":3,"message":"invalid intValue"}"#),
            "collector answered 400: invalid intValue"
        );
        assert_eq!(
            refusal(bad, false, b"<html>no</html>"),
            "collector answered 400"
        );
        assert_eq!(
            refusal(
                http::StatusCode::BAD_GATEWAY,
                true,
                b"upstream connect error\r\n"
            ),
            "collector answered 502: upstream connect error"
        );
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
        let why = refusal(bad, false, long.as_bytes());
        assert!(why.ends_with('…') && why.len() < MAX_MESSAGE + 40, "{why}");
    }

    #[test]
    fn the_target_is_endpoint_slash_v1_traces() {
        let policy = |endpoint: &str| sidegate_crds::policy::GatewayPolicy {
            open_telemetry: Some(sidegate_crds::policy::OpenTelemetry {
                endpoint: endpoint.into(),
                service_name: None,
            }),
            ..Default::default()
        };
        let t = Target::from_policy(&policy("http://collector:4318/"), String::new())
            .expect("valid")
            .expect("set");
        assert_eq!(t.uri, "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "sidegate");
        let err = Target::from_policy(&policy("collector:4318"), String::new()).expect_err("bad");
        assert!(err.starts_with("spec.openTelemetry.endpoint"), "{err}");
        assert_eq!(
            Target::from_policy(&Default::default(), String::new()),
            Ok(None)
        );
    }
}
