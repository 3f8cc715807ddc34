//! OpenTelemetry export (`spec.openTelemetry`): one span per proxied request, following the
//! GenAI semantic conventions (`gen_ai.*`), posted as OTLP/HTTP JSON to `{endpoint}/v1/traces`.
//!
//! Why hand-written: the OpenTelemetry SDK crates (opentelemetry, opentelemetry_sdk,
//! opentelemetry-otlp with its prost/tonic or reqwest stack) would add a second HTTP client,
//! a protobuf stack and a batch processor with its own threads to a sidecar whose RSS budget is
//! 15 MB. What sidegate needs is small: one span per finished request, no in-process context
//! propagation, no metrics or logs signals. The OTLP/HTTP JSON encoding is stable and
//! documented (ids in hex, 64-bit integers as strings, enums as numbers), so a batch is a
//! `serde_json` value posted with the gateway's own upstream client.
//!
//! Off the hot path: with no exporter configured a request carries `None` and nothing here runs.
//! With one, a finished request puts a small [`Span`] on a bounded queue (`try_send`: dropped
//! and counted when full); one background task batches (up to [`MAX_BATCH`] spans, or every
//! [`BATCH_EVERY`]), encodes and posts. Export failures are counted and logged at most every
//! 10 s; they never touch requests. Spans carry no keys, headers or bodies.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::error::GatewayError;
use crate::headers::Gw;
use crate::telemetry::{Metrics, SpanFate};
use crate::upstream::UpstreamClient;

/// Spans waiting for export; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 2048;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits in a partial batch.
pub const BATCH_EVERY: Duration = Duration::from_secs(2);
/// Longest one export request may take (connect, send, response).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Export failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The client's span, the parent of ours (none: ours is the trace's root).
    pub span_id: Option<[u8; 8]>,
}

/// The trace context of a request: W3C `traceparent` when present and valid (an invalid one is
/// ignored, as W3C Trace Context asks), else `cf-aig-otel-trace-id` (32 hex digits) with an
/// optional `cf-aig-otel-parent-span-id` (16 hex digits), else none (a new trace). Malformed
/// `cf-aig-otel-*` values are refused (400, code 2100) like other bad `cf-aig-*` headers.
pub fn parent_from_headers(h: &HeaderMap) -> Result<Option<Parent>, GatewayError> {
    let bad = |name: &'static str, digits: usize| GatewayError::BadHeader {
        name,
        reason: format!("expected {digits} hex digits, not all zero"),
    };
    let trace_id = match h.get(TRACE_ID) {
        Some(v) => Some(hex_id::<16>(v.as_bytes()).ok_or_else(|| bad(Gw::OtelTraceId.name(), 32))?),
        None => None,
    };
    let span_id = match h.get(PARENT_SPAN_ID) {
        Some(v) => {
            Some(hex_id::<8>(v.as_bytes()).ok_or_else(|| bad(Gw::OtelParentSpanId.name(), 16))?)
        }
        None => None,
    };
    if let Some(p) = h.get(TRACEPARENT).and_then(|v| traceparent(v.as_bytes())) {
        return Ok(Some(p));
    }
    Ok(trace_id.map(|trace_id| Parent { trace_id, span_id }))
}

/// `{version}-{trace-id}-{parent-id}-{flags}`; versions above 00 may add fields after these.
fn traceparent(v: &[u8]) -> Option<Parent> {
    let v = v.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_bytes::<1>(&v[..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    hex_bytes::<1>(&v[53..55])?;
    Some(Parent {
        trace_id: hex_id::<16>(&v[3..35])?,
        span_id: Some(hex_id::<8>(&v[36..52])?),
    })
}

/// `N` bytes from `2N` lowercase or uppercase hex digits, not all zero (an invalid id).
fn hex_id<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    hex_bytes::<N>(s).filter(|b| b.iter().any(|&x| x != 0))
}

fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// What a request that is traced carries until its record is finished.
#[derive(Clone)]
pub struct Trace {
    queue: mpsc::Sender<Msg>,
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
    pub fn parent(&self) -> Option<Parent> {
        self.parent
    }

    /// Queues the span of a finished request; when the queue is full it is dropped and counted.
    pub(crate) fn send(self, span: Finished, metrics: &Metrics) {
        let span = Span {
            target: self.target,
            parent: self.parent,
            finished: span,
        };
        if self.queue.try_send(Msg::Span(Box::new(span))).is_err() {
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

/// The trace headers of a request, kept (only when the gateway exports spans) for the span of
/// a request the gateway refuses.
pub fn trace_headers(h: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [TRACEPARENT, TRACE_ID, PARENT_SPAN_ID] {
        if let Some(v) = h.get(&name) {
            kept.insert(name, v.clone());
        }
    }
    kept
}

/// The exporter of a gateway: a queue and the task that empties it, started on first use.
pub struct Exporter {
    client: UpstreamClient,
    metrics: Arc<Metrics>,
    queue: OnceLock<mpsc::Sender<Msg>>,
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
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                tokio::spawn(run(rx, self.client.clone(), self.metrics.clone()));
                tx
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
            if queue.send(Msg::Flush(done)).await.is_ok() {
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
async fn run(mut rx: mpsc::Receiver<Msg>, client: UpstreamClient, metrics: Arc<Metrics>) {
    let mut batch: Vec<Span> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let msg = match deadline {
            Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                Ok(msg) => msg,
                Err(_) => {
                    export(&client, &metrics, &mut batch, &mut last_warn).await;
                    deadline = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(Msg::Span(span)) => {
                batch.push(*span);
                if batch.len() == 1 {
                    deadline = Some(tokio::time::Instant::now() + BATCH_EVERY);
                }
                if batch.len() >= MAX_BATCH {
                    export(&client, &metrics, &mut batch, &mut last_warn).await;
                    deadline = None;
                }
            }
            Some(Msg::Flush(done)) => {
                export(&client, &metrics, &mut batch, &mut last_warn).await;
                deadline = None;
                let _ = done.send(());
            }
            None => {
                export(&client, &metrics, &mut batch, &mut last_warn).await;
                return;
            }
        }
    }
}

/// Posts `batch` (one request per target) and empties it; counts exported and failed spans.
async fn export(
    client: &UpstreamClient,
    metrics: &Metrics,
    batch: &mut Vec<Span>,
    last_warn: &mut Option<tokio::time::Instant>,
) {
    while let Some(first) = batch.first() {
        let target = first.target.clone();
        let (mine, rest): (Vec<Span>, Vec<Span>) = std::mem::take(batch)
            .into_iter()
            .partition(|s| Arc::ptr_eq(&s.target, &target) || *s.target == *target);
        *batch = rest;
        let n = mine.len() as u64;
        let body = encode(&target, &mine, &mut IdSource::default());
        match post(client, &target.uri, body).await {
            Ok(()) => metrics.count_otel_spans(SpanFate::Exported, n),
            Err(why) => {
                metrics.count_otel_spans(SpanFate::Failed, n);
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|t| now >= t + WARN_EVERY) {
                    *last_warn = Some(now);
                    tracing::warn!(endpoint = %target.uri, spans = n, error = %why, "OpenTelemetry export failed; spans dropped (requests are not affected)");
                }
            }
        }
    }
}

async fn post(client: &UpstreamClient, uri: &http::Uri, body: Vec<u8>) -> Result<(), String> {
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
        // Read the answer to its end so the connection can be reused (a collector's answer is
        // small; a larger one is not read further).
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {}", status.as_u16()))
        }
    })
    .await;
    sent.unwrap_or_else(|_| Err(format!("no answer within {}s", EXPORT_TIMEOUT.as_secs())))
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

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn attr(key: &str, value: Value) -> Value {
    json!({"key": key, "value": value})
}

fn string(s: &str) -> Value {
    json!({"stringValue": s})
}

fn int(n: u64) -> Value {
    // OTLP JSON writes 64-bit integers as strings; its integers are signed: one past them goes
    // as a string value (a collector refuses the whole batch for it).
    if i64::try_from(n).is_ok() {
        json!({"intValue": n.to_string()})
    } else {
        string(&n.to_string())
    }
}

fn any_value(v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!({"boolValue": b}),
        Value::Number(n) if n.is_i64() => json!({"intValue": n.to_string()}),
        Value::Number(n) if n.is_u64() => n.as_u64().map_or_else(|| string(&n.to_string()), int),
        Value::Number(n) => json!({"doubleValue": n.as_f64()}),
        Value::String(s) => string(s),
        other => string(&other.to_string()),
    }
}

/// One OTLP/HTTP JSON `ExportTraceServiceRequest` of `spans` (all of `target`).
fn encode(target: &Target, spans: &[Span], ids: &mut IdSource) -> Vec<u8> {
    let mut resource = vec![
        attr("service.name", string(&target.service_name)),
        attr("telemetry.sdk.name", string("sidegate")),
        attr("telemetry.sdk.language", string("rust")),
        attr("telemetry.sdk.version", string(env!("CARGO_PKG_VERSION"))),
    ];
    if !target.gateway.is_empty() {
        resource.push(attr("sidegate.gateway", string(&target.gateway)));
    }
    let spans: Vec<Value> = spans.iter().map(|s| span_json(s, ids)).collect();
    let doc = json!({
        "resourceSpans": [{
            "resource": {"attributes": resource},
            "scopeSpans": [{
                "scope": {"name": "sidegate", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

fn span_json(s: &Span, ids: &mut IdSource) -> Value {
    let f = &s.finished;
    let trace_id = s.parent.map_or_else(|| ids.fill::<16>(), |p| p.trace_id);
    let span_id = ids.fill::<8>();
    let mut attributes = vec![
        attr("gen_ai.operation.name", string(f.operation)),
        attr("gen_ai.system", string(&f.provider)),
        attr("gen_ai.provider.name", string(&f.provider)),
    ];
    if let Some(m) = &f.model {
        attributes.push(attr("gen_ai.request.model", string(m)));
    }
    for (key, n) in [
        ("gen_ai.usage.input_tokens", f.tokens[0]),
        ("gen_ai.usage.output_tokens", f.tokens[1]),
    ] {
        if let Some(n) = n {
            attributes.push(attr(key, int(n)));
        }
    }
    attributes.push(attr("http.request.method", string(f.method.as_str())));
    attributes.push(attr("http.response.status_code", int(f.status.into())));
    // A stream cut short (by the provider, or by the gateway's memory budget) is an error
    // whatever status its head had.
    let cut = matches!(f.outcome, "upstream_error" | "buffers_full");
    let error = f.status >= 500 || cut;
    if error {
        let kind = if cut {
            f.outcome.to_owned()
        } else {
            f.status.to_string()
        };
        attributes.push(attr("error.type", string(&kind)));
    }
    if !f.log_id.is_empty() {
        attributes.push(attr("sidegate.log_id", string(&f.log_id)));
    }
    if let Some(code) = f.error_code {
        attributes.push(attr("sidegate.error_code", int(code.into())));
    }
    attributes.push(attr("sidegate.cached", json!({"boolValue": f.cached})));
    attributes.push(attr("sidegate.outcome", string(f.outcome)));
    if let Some(usd) = f.cost {
        let usd = crate::access_log::round_usd(usd);
        attributes.push(attr("sidegate.cost_usd", json!({"doubleValue": usd})));
    }
    if let Some(Ok(Value::Object(meta))) = f.metadata.as_deref().map(serde_json::from_str::<Value>)
    {
        for (k, v) in &meta {
            attributes.push(attr(&format!("sidegate.metadata.{k}"), any_value(v)));
        }
    }
    let name = match &f.model {
        Some(m) => format!("{} {m}", f.operation),
        None => f.operation.to_owned(),
    };
    let mut span = Map::new();
    span.insert("traceId".into(), hex::encode(trace_id).into());
    span.insert("spanId".into(), hex::encode(span_id).into());
    if let Some(parent) = s.parent.and_then(|p| p.span_id) {
        span.insert("parentSpanId".into(), hex::encode(parent).into());
    }
    span.insert("name".into(), name.into());
    // SPAN_KIND_CLIENT: the gateway calls the provider for the application.
    span.insert("kind".into(), 3.into());
    span.insert("startTimeUnixNano".into(), unix_nanos(f.start).into());
    span.insert("endTimeUnixNano".into(), unix_nanos(f.end).into());
    span.insert("attributes".into(), attributes.into());
    let status = if error {
        json!({"code": 2, "message": format!("{} ({})", f.outcome, f.status)})
    } else {
        json!({"code": 0})
    };
    span.insert("status".into(), status);
    Value::Object(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

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
        let span = Span {
            target: target(),
            parent: None,
            finished: f,
        };
        serde_json::from_slice(&encode(&target(), &[span], &mut IdSource::default())).expect("json")
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
        };
        assert_eq!(
            parent_from_headers(&headers(&[("traceparent", tp)])),
            Ok(Some(want))
        );
        assert_eq!(
            parent_from_headers(&headers(&[
                ("traceparent", tp),
                ("cf-aig-otel-trace-id", "11111111111111111111111111111111"),
            ])),
            Ok(Some(want))
        );
        assert_eq!(
            parent_from_headers(&headers(&[
                ("cf-aig-otel-trace-id", TRACE),
                ("cf-aig-otel-parent-span-id", SPAN),
            ])),
            Ok(Some(want))
        );
        // Uppercase hex is read; a trace id alone makes our span a root of the client's trace.
        assert_eq!(
            parent_from_headers(&headers(&[(
                "cf-aig-otel-trace-id",
                "4BF92F3577B34DA6A3CE929D0E0E4736"
            )])),
            Ok(Some(Parent {
                trace_id: want.trace_id,
                span_id: None
            }))
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
        };
        let span = Span {
            target: target(),
            parent: Some(parent),
            finished: finished(),
        };
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
        let trace = Trace {
            queue: tx,
            target: target(),
            parent: None,
        };
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
        assert_eq!(int(5), json!({"intValue": "5"}));
        assert_eq!(
            int(u64::MAX),
            json!({"stringValue": "18446744073709551615"})
        );
        let v: Value = serde_json::from_str(r#"[-3, 9223372036854775807, 18446744073709551615]"#)
            .expect("json");
        let got: Vec<Value> = v.as_array().expect("array").iter().map(any_value).collect();
        assert_eq!(
            got,
            [
                json!({"intValue": "-3"}),
                json!({"intValue": "9223372036854775807"}),
                json!({"stringValue": "18446744073709551615"}),
            ]
        );
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
