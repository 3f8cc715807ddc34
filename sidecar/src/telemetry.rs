//! Metrics (Prometheus text on the admin port) and the per-request record that becomes one
//! log line and one metric sample when the response body ends.
//!
//! Provider keys never reach this module: records carry the provider id, the path without its
//! query, the status and sizes only.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::usage::Tokens;

/// Labels of a request sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Provider id, or `none` when the route named none.
    pub provider: Arc<str>,
    /// HTTP status sent to the client.
    pub status: u16,
}

/// Labels of a reload sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `error`.
    pub result: &'static str,
}

/// Labels of a listener's sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `gateway` or `admin`.
    pub listener: &'static str,
}

/// Labels of the loaded-config info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// Content hash of the loaded config.
    pub hash: String,
    /// Gateway `namespace/name`, or empty when standalone.
    pub gateway: String,
}

/// Labels of a duration sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider id.
    pub provider: Arc<str>,
}

/// Labels of a cache lookup sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit`, `miss` or `skip` (`cf-aig-skip-cache`).
    pub result: &'static str,
}

/// The Redis operations whose failures `sidegate_redis_errors_total` counts apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// A request's global rate limit, spend and token budget.
    Limits,
    /// Writing the charges kept for Redis (spend, tokens, the counts of global windows).
    Charge,
    /// Reading the shared cache.
    CacheGet,
    /// Writing the shared cache.
    CacheSet,
    /// A dynamic route's rate or budget node with `scope: global`.
    RouteNode,
    /// Connecting (whatever the call was for).
    Connect,
}

impl RedisOp {
    const ALL: [Self; 6] = [
        Self::Limits,
        Self::Charge,
        Self::CacheGet,
        Self::CacheSet,
        Self::RouteNode,
        Self::Connect,
    ];

    /// The `op` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limits => "limits",
            Self::Charge => "charge",
            Self::CacheGet => "cache_get",
            Self::CacheSet => "cache_set",
            Self::RouteNode => "route_node",
            Self::Connect => "connect",
        }
    }
}

/// Labels of a Redis error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    /// [`RedisOp::as_str`].
    pub op: &'static str,
}

/// Why charges kept for Redis were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeDropped {
    /// Their window (or spend period) ended before Redis took them: of no use any more.
    WindowEnded,
    /// The keys waiting were at their bound.
    Full,
    /// Sent again after an answer that never came, and Redis had lost the batch's marker
    /// (evicted): whether the first try was applied cannot be told, so it is not applied twice.
    Unconfirmed,
}

impl ChargeDropped {
    /// The `reason` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WindowEnded => "window_ended",
            Self::Full => "full",
            Self::Unconfirmed => "unconfirmed",
        }
    }
}

/// Labels of dropped charges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `window_ended` or `full`.
    pub reason: &'static str,
}

/// All metrics of the sidecar.
pub struct Metrics {
    registry: Registry,
    /// Handles of the request metrics already resolved, per provider: a finished request
    /// bumps them without hashing its labels into the families.
    handles: RwLock<Vec<ProviderHandles>>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ProviderLabels, Histogram>,
    streams_cancelled: Family<ProviderLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_successful: Gauge,
    last_reload_success_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    config_info: Family<ConfigLabels, Gauge>,
    cache: Family<CacheLabels, Counter>,
    retries: Family<ProviderLabels, Counter>,
    redis_errors: Family<RedisLabels, Counter>,
    charges_dropped: Family<DroppedLabels, Counter>,
    guardrails: Family<ReloadLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ProviderLabels, UsdCounter>,
    otel_exported: Counter,
    otel_dropped: Counter,
    otel_failed: Counter,
    buffered_bytes: Gauge,
    background_pending: Gauge,
    buffer_refusals: Counter,
    accept_failures: Family<ListenerLabels, Counter>,
    connections_refused: Counter,
}

/// What became of OpenTelemetry spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanFate {
    /// The collector accepted them.
    Exported,
    /// The export queue was full.
    Dropped,
    /// Their export request failed, or the collector rejected them (OTLP partial success).
    Failed,
}

/// A counter of US dollars.
type UsdCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Labels of a token count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Provider id.
    pub provider: Arc<str>,
    /// `input` (prompt) or `output` (generated).
    pub direction: &'static str,
}

/// The request metrics of one provider (they share their values with the families).
struct ProviderHandles {
    provider: Arc<str>,
    duration: Histogram,
    cancelled: Option<Counter>,
    /// Input and output token counters, once a response reported tokens.
    tokens: Option<[Counter; 2]>,
    /// The cost counter, once a response had a cost.
    cost: Option<UsdCounter>,
    by_status: Vec<(u16, Counter)>,
}

/// What a finished request adds to the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    status: u16,
    secs: f64,
    cancelled: bool,
    tokens: [Option<u64>; 2],
    cost: Option<f64>,
}

impl ProviderHandles {
    fn find<'a>(all: &'a [Self], provider: &Arc<str>) -> Option<&'a Self> {
        all.iter()
            .find(|h| Arc::ptr_eq(&h.provider, provider) || h.provider == *provider)
    }

    /// Records one request if every handle it needs is resolved already.
    fn record(&self, sample: &Sample) -> bool {
        let Some((_, requests)) = self.by_status.iter().find(|(s, _)| *s == sample.status) else {
            return false;
        };
        let cancelled = match (sample.cancelled, &self.cancelled) {
            (false, _) => None,
            (true, Some(c)) => Some(c),
            (true, None) => return false,
        };
        let tokens = match (sample.tokens, &self.tokens) {
            ([None, None], _) => None,
            (_, Some(counters)) => Some(counters),
            (_, None) => return false,
        };
        let cost = match (sample.cost, &self.cost) {
            (None, _) => None,
            (Some(usd), Some(c)) => Some((c, usd)),
            (Some(_), None) => return false,
        };
        requests.inc();
        if let Some((c, usd)) = cost {
            c.inc_by(usd);
        }
        self.duration.observe(sample.secs);
        if let Some(c) = cancelled {
            c.inc();
        }
        if let Some(counters) = tokens {
            for (counter, n) in counters.iter().zip(sample.tokens) {
                if let Some(n) = n {
                    counter.inc_by(n);
                }
            }
        }
        true
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every sidecar metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidegate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by provider and response status",
            requests.clone(),
        );
        let duration = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0])
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        let streams_cancelled = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "responses_cancelled",
            "Responses whose client went away before the body ended",
            streams_cancelled.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        let last_reload_successful = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "Whether the last load of the config file and keys directory was valid (1) or rejected (0, the last good config keeps serving)",
            last_reload_successful.clone(),
        );
        let last_reload_success_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last valid load of the config file and keys directory (0 before one)",
            last_reload_success_time.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        registry.register(
            "config_info",
            "The loaded config (value 1)",
            config_info.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Requests the response cache was on for, by result (hit, miss, skip)",
            cache.clone(),
        );
        let retries = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Upstream attempts retried (after a connection error, timeout, 429 or 5xx)",
            retries.clone(),
        );
        let redis_errors = Family::<RedisLabels, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis operations that failed, timed out or were skipped after a failure, by operation (limits fell back to this pod's counts, charges were kept to write later, the cache missed)",
            redis_errors.clone(),
        );
        let charges_dropped = Family::<DroppedLabels, Counter>::default();
        registry.register(
            "redis_charges_dropped",
            "Charges kept while Redis could not take them (spend, tokens, window counts), dropped: their window ended first, or too many keys were waiting",
            charges_dropped.clone(),
        );
        // Every label shown from the start (0), as the unlabelled counters are.
        for op in RedisOp::ALL {
            drop(redis_errors.get_or_create(&RedisLabels { op: op.as_str() }));
        }
        for reason in [
            ChargeDropped::WindowEnded,
            ChargeDropped::Full,
            ChargeDropped::Unconfirmed,
        ] {
            drop(charges_dropped.get_or_create(&DroppedLabels {
                reason: reason.as_str(),
            }));
        }
        let guardrails = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "guardrails",
            "Guardrail checks by result (flag, block, error)",
            guardrails.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens reported by providers in responses, by provider and direction",
            tokens.clone(),
        );
        let cost = Family::<ProviderLabels, UsdCounter>::default();
        registry.register(
            "cost_usd",
            "Cost in USD of responses with a known price (or cf-aig-custom-cost), by provider",
            cost.clone(),
        );
        let otel_exported = Counter::default();
        registry.register(
            "otel_spans_exported",
            "OpenTelemetry spans the collector accepted",
            otel_exported.clone(),
        );
        let otel_dropped = Counter::default();
        registry.register(
            "otel_spans_dropped",
            "OpenTelemetry spans dropped because the export queue was full (2048 spans or 4 MiB)",
            otel_dropped.clone(),
        );
        let otel_failed = Counter::default();
        registry.register(
            "otel_spans_failed",
            "OpenTelemetry spans lost because their export request failed or the collector rejected them",
            otel_failed.clone(),
        );
        let buffered_bytes = Gauge::default();
        registry.register(
            "buffered_bytes",
            "Bytes held now in buffered bodies (requests read whole, responses held back whole, cache fills), against spec.limits.maxBufferedBytes",
            buffered_bytes.clone(),
        );
        let background_pending = Gauge::default();
        registry.register(
            "background_responses_pending",
            "Background Responses made through this sidecar and not finished yet: remembered (at most 10,000) until an answer shows them finished, to count their usage then",
            background_pending.clone(),
        );
        let buffer_refusals = Counter::default();
        registry.register(
            "buffer_refusals",
            "Requests refused (503, code 2110) because their buffered body did not fit in spec.limits.maxBufferedBytes",
            buffer_refusals.clone(),
        );
        let accept_failures = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_failures",
            "Connections the listeners failed to take (out of file descriptors, say), by listener",
            accept_failures.clone(),
        );
        // Served at 0 from the start: an alert on them needs the series before the first.
        for listener in ["gateway", "admin"] {
            let _ = accept_failures.get_or_create(&ListenerLabels { listener });
        }
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections refused (503, code 2112) because --max-connections were open",
            connections_refused.clone(),
        );
        Self {
            buffered_bytes,
            background_pending,
            buffer_refusals,
            accept_failures,
            connections_refused,
            otel_exported,
            otel_dropped,
            otel_failed,
            registry,
            handles: RwLock::new(Vec::new()),
            requests,
            duration,
            streams_cancelled,
            reloads,
            last_reload_successful,
            last_reload_success_time,
            config_info,
            cache,
            retries,
            redis_errors,
            charges_dropped,
            guardrails,
            tokens,
            cost,
        }
    }

    /// Counts a finished request, its duration, whether the client went away first, and the
    /// tokens its response reported.
    fn record(&self, provider: &Arc<str>, sample: &Sample) {
        if let Ok(all) = self.handles.read()
            && ProviderHandles::find(&all, provider).is_some_and(|h| h.record(sample))
        {
            return;
        }
        let mut all = self.handles.write().unwrap_or_else(|p| p.into_inner());
        let i = match all
            .iter()
            .position(|h| Arc::ptr_eq(&h.provider, provider) || h.provider == *provider)
        {
            Some(i) => i,
            None => {
                let labels = ProviderLabels {
                    provider: provider.clone(),
                };
                all.push(ProviderHandles {
                    provider: provider.clone(),
                    duration: self.duration.get_or_create(&labels).clone(),
                    cancelled: None,
                    tokens: None,
                    cost: None,
                    by_status: Vec::new(),
                });
                all.len() - 1
            }
        };
        let h = &mut all[i];
        let status = sample.status;
        if !h.by_status.iter().any(|(s, _)| *s == status) {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    provider: provider.clone(),
                    status,
                })
                .clone();
            h.by_status.push((status, counter));
        }
        if sample.cancelled && h.cancelled.is_none() {
            let labels = ProviderLabels {
                provider: provider.clone(),
            };
            h.cancelled = Some(self.streams_cancelled.get_or_create(&labels).clone());
        }
        if sample.tokens != [None, None] && h.tokens.is_none() {
            h.tokens = Some(["input", "output"].map(|direction| {
                self.tokens
                    .get_or_create(&TokenLabels {
                        provider: provider.clone(),
                        direction,
                    })
                    .clone()
            }));
        }
        if sample.cost.is_some() && h.cost.is_none() {
            h.cost = Some(
                self.cost
                    .get_or_create(&ProviderLabels {
                        provider: provider.clone(),
                    })
                    .clone(),
            );
        }
        h.record(sample);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one request the gateway answered itself (a refusal, a timeout) and its duration,
    /// so that latency percentiles include those answers.
    pub fn count_request(&self, provider: &Arc<str>, status: u16, elapsed: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                provider: provider.clone(),
                status,
            })
            .inc();
        self.duration
            .get_or_create(&ProviderLabels {
                provider: provider.clone(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one request the cache was on for.
    pub fn count_cache(&self, result: &'static str) {
        self.cache.get_or_create(&CacheLabels { result }).inc();
    }

    /// The budget of buffered bodies, accounted in `sidegate_buffered_bytes` and refusing into
    /// `sidegate_buffer_refusals_total`.
    pub fn buffer_budget(&self) -> crate::buffers::BufferBudget {
        crate::buffers::BufferBudget::new(self.buffered_bytes.clone(), self.buffer_refusals.clone())
    }

    /// The counter of `listener`'s failed accepts.
    pub fn accept_failures(&self, listener: &'static str) -> Counter {
        self.accept_failures
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// The counter of client connections refused over `--max-connections`.
    pub fn connections_refused(&self) -> Counter {
        self.connections_refused.clone()
    }

    /// The gauge of background responses awaiting their usage.
    pub fn background_pending(&self) -> Gauge {
        self.background_pending.clone()
    }

    /// Counts one retried upstream attempt.
    pub fn count_retry(&self, provider: &Arc<str>) {
        self.retries
            .get_or_create(&ProviderLabels {
                provider: provider.clone(),
            })
            .inc();
    }

    /// Counts one guardrail check that flagged, blocked or failed.
    pub fn count_guardrail(&self, result: &'static str) {
        self.guardrails
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Counts `n` OpenTelemetry spans that met `fate`.
    pub fn count_otel_spans(&self, fate: SpanFate, n: u64) {
        match fate {
            SpanFate::Exported => self.otel_exported.inc_by(n),
            SpanFate::Dropped => self.otel_dropped.inc_by(n),
            SpanFate::Failed => self.otel_failed.inc_by(n),
        };
    }

    /// Counts one failed Redis operation.
    pub fn count_redis_error(&self, op: RedisOp) {
        self.redis_errors
            .get_or_create(&RedisLabels { op: op.as_str() })
            .inc();
    }

    /// Counts `n` charges kept for Redis and dropped.
    pub fn count_charges_dropped(&self, why: ChargeDropped, n: u64) {
        self.charges_dropped
            .get_or_create(&DroppedLabels {
                reason: why.as_str(),
            })
            .inc_by(n);
    }

    /// Counts one reload, and publishes its outcome as [`Metrics::set_load_outcome`] does.
    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        self.set_load_outcome(ok);
    }

    /// Publishes whether the last load of the config was valid (`ok`), and when the last valid
    /// one was: a rejected reload keeps the last good config serving, which the counters alone
    /// do not tell (Prometheus's own `config_last_reload_successful` convention).
    pub fn set_load_outcome(&self, ok: bool) {
        self.last_reload_successful.set(i64::from(ok));
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_reload_success_time.set(now);
        }
    }

    /// Publishes the hash of the config now serving.
    /// No config is loaded (it was dropped): `sidegate_config_info` names none.
    pub fn clear_config(&self) {
        self.config_info.clear();
    }

    pub fn set_config(&self, hash: &str, gateway: &str) {
        self.clear_config();
        self.config_info
            .get_or_create(&ConfigLabels {
                hash: hash.to_owned(),
                gateway: gateway.to_owned(),
            })
            .set(1);
    }
}

/// Most bytes of each body (request, response) a log line carries.
pub const MAX_LOGGED_PAYLOAD: usize = 32 * 1024;

/// What a request asks of its log line: `cf-aig-collect-log: false` (no line),
/// `cf-aig-metadata` (a flat JSON object of at most 5 string, number or bool values, logged),
/// `cf-aig-custom-cost` and `cf-aig-event-id` (logged).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions<'a> {
    /// Write a log line for this request.
    pub log: bool,
    /// The metadata as compact JSON.
    pub metadata: Option<Arc<str>>,
    /// The request's own price, replacing the model's.
    pub custom_cost: Option<crate::cost::CustomCost>,
    /// The client's `cf-aig-event-id`.
    pub event_id: Option<http::HeaderValue>,
    /// Log the request and response bodies (`spec.logging.payloads`, unless
    /// `cf-aig-collect-log-payload: false`).
    pub payloads: bool,
    /// The span this request becomes (`spec.openTelemetry`), and the client's trace it joins.
    pub trace: Option<crate::otel::Trace>,
    /// Told when a record of the request is made, and the model it names.
    pub recorded: Recorded<'a>,
    /// Where the request's record waits, once its answer ended, for the response checks (DLP
    /// response policies, response guardrails) to decide what the client gets; `None` when
    /// the gateway checks no responses.
    pub held_back: Option<Arc<HeldBack>>,
}

/// The record of an answer the gateway holds back for its response checks, parked when the
/// answer ended (by whatever made it: a passthrough, `/compat`, the universal endpoint, a cache
/// hit) until the checks decide ([`HeldBack::take`]): logged, counted and traced then, with what
/// the client got (an answer let through once the client took it, see
/// [`crate::body::ProxyBody::answer`]). Dropped with a record still parked, the checks never
/// decided (the client left while they ran): it is logged as cancelled, status 499.
#[derive(Default)]
pub struct HeldBack(std::sync::Mutex<Option<Answered>>);

impl std::fmt::Debug for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldBack")
    }
}

impl PartialEq for HeldBack {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl HeldBack {
    fn park(&self, answered: Answered) {
        let earlier = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(answered);
        // One record per request: another one parked before is let go as it was.
        if let Some(earlier) = earlier {
            earlier.deliver();
        }
    }

    /// The record parked here, if the answer has ended.
    pub fn take(&self) -> Option<Answered> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for HeldBack {
    fn drop(&mut self) {
        if let Some(Answered { mut record, .. }) = self.take() {
            record.sent = Some(CLIENT_CLOSED);
            record.finish("cancelled");
        }
    }
}

/// Status logged for a request given up before it had an answer (nginx's "client closed
/// request").
const CLIENT_CLOSED: u16 = 499;

/// A finished answer held back for the response checks, and how its body ended.
pub struct Answered {
    record: RequestRecord,
    outcome: &'static str,
}

impl Answered {
    /// The checks let the answer through, and the client took it: recorded as it ended.
    pub fn deliver(mut self) {
        self.record.finish(self.outcome);
    }

    /// The checks refused the answer: the client got the gateway's error `status`/`code` with
    /// `body` instead. Logged, counted and traced as that refusal (outcome `refused`, the error
    /// body as the logged response), and still charged: the provider produced the tokens.
    pub fn refuse(mut self, status: u16, code: u16, body: &[u8]) {
        self.sent_error(code, body);
        self.record.sent = Some(status);
        self.record.finish("refused");
    }

    /// The answer could not be delivered whole (it broke off, stalled, or was too large to
    /// hold): the client got the gateway's error `status`/`code` with `body` instead, logged as
    /// what it got (its bytes, the error as the logged response). Not charged (cut short).
    pub fn undelivered(mut self, status: u16, code: u16, body: &[u8]) {
        self.sent_error(code, body);
        self.record.set_status(status);
        self.record.finish("upstream_error");
    }

    /// The client got the gateway's error `code` with `body` in place of the answer.
    fn sent_error(&mut self, code: u16, body: &[u8]) {
        let r = &mut self.record;
        r.error_code = Some(code);
        r.bytes = body.len() as u64;
        if let Some(p) = &mut r.payloads {
            p.response.clear();
            p.response_cut = false;
        }
        r.keep_payload(body);
    }
}

/// What the serving of a request learned that its refusal's or cancellation's log line tells
/// when no [`RequestRecord`] does: whether one was made (from then on the record tells of the
/// request, see `proxy::Unanswered`), the model the request names once its body is read,
/// whether the response cache was on for it when it was looked up (a refusal after that says
/// `cf-aig-cache-status: MISS`, as an answer would), the provider a `/compat` request goes
/// to first (its path names none), and the body it sent when its log line carries payloads.
#[derive(Debug, Default)]
pub struct Seen {
    recorded: std::sync::atomic::AtomicBool,
    model: std::sync::OnceLock<crate::cost::ModelName>,
    cache_on: std::sync::atomic::AtomicBool,
    provider: std::sync::OnceLock<std::sync::Arc<str>>,
    request_body: std::sync::OnceLock<bytes::Bytes>,
}

impl Seen {
    /// Whether a record of the request was made.
    pub fn recorded(&self) -> bool {
        self.recorded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the response cache was on for the request where it was last looked up.
    pub fn cache_on(&self) -> bool {
        self.cache_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The model the request names, once read.
    pub fn model(&self) -> Option<&str> {
        self.model_name().map(crate::cost::ModelName::as_str)
    }

    /// [`Seen::model`] as read.
    pub fn model_name(&self) -> Option<&crate::cost::ModelName> {
        self.model.get()
    }

    /// The provider the request goes to first, when its path does not name it.
    pub fn provider(&self) -> Option<&std::sync::Arc<str>> {
        self.provider.get()
    }

    /// The request body, once read, when its log line carries payloads.
    pub fn request_body(&self) -> Option<&[u8]> {
        self.request_body.get().map(|b| &b[..])
    }
}

/// Where the serving of a request tells its [`Seen`]. Options compare equal whatever it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recorded<'a>(Option<&'a Seen>);

impl<'a> Recorded<'a> {
    /// Tells `seen`.
    pub fn to(seen: &'a Seen) -> Self {
        Self(Some(seen))
    }

    fn mark(self) {
        if let Some(seen) = self.0 {
            seen.recorded
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The response cache is on for the request (`on`) where it is looked up now (a universal
    /// request's step: the last one reached tells).
    pub fn cache_on(self, on: bool) {
        if let Some(seen) = self.0 {
            seen.cache_on
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the response cache was on for the request where it was last looked up.
    pub fn cache_was_on(self) -> bool {
        self.0.is_some_and(Seen::cache_on)
    }

    /// The request names `model` (the first one told stays: a route's fallback is logged by
    /// its record).
    pub fn model(self, model: Option<&crate::cost::ModelName>) {
        if let (Some(seen), Some(model)) = (self.0, model) {
            let _ = seen.model.set(model.clone());
        }
    }

    /// The request goes to `provider` first (the first one told stays, as the model does).
    pub fn provider(self, provider: &std::sync::Arc<str>) {
        if let Some(seen) = self.0 {
            let _ = seen.provider.set(provider.clone());
        }
    }

    /// The request sent `body` (what its log line shows as the request payload when it is
    /// refused): told only when payloads are logged.
    pub fn request_body(self, body: &bytes::Bytes) {
        if let Some(seen) = self.0 {
            let _ = seen.request_body.set(body.clone());
        }
    }
}

impl PartialEq for Recorded<'_> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl LogOptions<'_> {
    /// From the request headers; `log_requests` and `log_payloads` are the gateway's settings.
    /// Each of the headers read here, and the `cf-aig-otel-*` trace ids, is checked whatever
    /// those settings and `spec.openTelemetry` are: a malformed one is refused in every
    /// cluster, not only in those whose settings make it matter.
    pub fn from_headers(
        h: crate::headers::GatewayHeaders<'_>,
        log_requests: bool,
        log_payloads: bool,
    ) -> Result<Self, crate::error::GatewayError> {
        use crate::headers::Gw;
        let collect = h.flag(Gw::CollectLog)?;
        let collect_payload = h.flag(Gw::CollectLogPayload)?;
        let log = collect.unwrap_or(true) && log_requests;
        // The payload switch only matters when payloads are logged at all.
        let payloads = log && log_payloads && collect_payload.unwrap_or(true);
        let metadata = Self::metadata(h)?;
        let custom_cost = crate::cost::CustomCost::from_headers(h)?;
        // Read by the span (`otel::parent_from_headers`) when spans are exported.
        crate::otel::check_gateway_ids(h)?;
        Ok(Self {
            log,
            metadata,
            custom_cost,
            event_id: h.get(Gw::EventId).cloned(),
            payloads,
            trace: None,
            recorded: Recorded::default(),
            held_back: None,
        })
    }

    /// `cf-aig-metadata` as compact JSON, when the request sends it: a flat object whose values
    /// are strings, numbers or booleans. As Cloudflare does, only the first
    /// [`MAX_METADATA_ENTRIES`] entries are kept and later ones are ignored (a key repeated among
    /// the kept ones takes its last value, as JSON parsers do).
    pub fn metadata(
        h: crate::headers::GatewayHeaders<'_>,
    ) -> Result<Option<Arc<str>>, crate::error::GatewayError> {
        let Some(v) = h.get(crate::headers::Gw::Metadata) else {
            return Ok(None);
        };
        let bad = |reason: &str| crate::error::GatewayError::BadHeader {
            name: "cf-aig-metadata",
            reason: reason.into(),
        };
        let FirstEntries { entries, ignored } =
            serde_json::from_slice(v.as_bytes()).map_err(|_| bad("expected a flat JSON object"))?;
        if entries
            .iter()
            .any(|(_, v)| !(v.is_string() || v.is_number() || v.is_boolean()))
        {
            return Err(bad("values must be strings, numbers or booleans"));
        }
        if ignored > 0 {
            tracing::debug!(
                ignored,
                log_id = crate::log_id::current().as_deref(),
                "cf-aig-metadata entries past the first {MAX_METADATA_ENTRIES} are ignored"
            );
        }
        // Compact JSON in the client's order.
        let mut out = String::with_capacity(v.len());
        out.push('{');
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::Value::from(k.as_str()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
        Ok(Some(Arc::from(out)))
    }
}

/// Entries of `cf-aig-metadata` kept; Cloudflare saves the first five and ignores the rest.
pub const MAX_METADATA_ENTRIES: usize = 5;

/// The first [`MAX_METADATA_ENTRIES`] entries of a JSON object, in order, and how many more
/// were skipped (their values are skipped unparsed, whatever they are).
struct FirstEntries {
    entries: Vec<(String, serde_json::Value)>,
    ignored: usize,
}

impl<'de> serde::Deserialize<'de> for FirstEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = FirstEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<FirstEntries, A::Error> {
                let mut out = FirstEntries {
                    entries: Vec::new(),
                    ignored: 0,
                };
                while let Some(key) = map.next_key::<String>()? {
                    let kept = out.entries.iter_mut().find(|(k, _)| *k == key);
                    if let Some(slot) = kept
                        && out.ignored == 0
                    {
                        slot.1 = map.next_value()?;
                    } else if out.entries.len() < MAX_METADATA_ENTRIES && out.ignored == 0 {
                        let value = map.next_value()?;
                        out.entries.push((key, value));
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        out.ignored += 1;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The bodies of a request whose log line carries them, each cut at [`MAX_LOGGED_PAYLOAD`].
#[derive(Debug, Default)]
struct Payloads {
    request: Vec<u8>,
    request_cut: bool,
    response: Vec<u8>,
    response_cut: bool,
}

/// One proxied request, finished exactly once: when its body ends, fails, or is dropped.
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    provider: Arc<str>,
    method: http::Method,
    path: Box<str>,
    status: u16,
    start: Instant,
    bytes: u64,
    log: bool,
    log_id: String,
    cached: bool,
    metadata: Option<Arc<str>>,
    /// The client's `cf-aig-event-id`, for the log line.
    event_id: Option<http::HeaderValue>,
    /// The dynamic-route step or universal-endpoint index that answered.
    step: Option<u32>,
    usage: crate::usage::Usage,
    /// The model the request named (or that answered it), for the log line.
    model: Option<crate::cost::ModelName>,
    price: Option<crate::cost::Price>,
    custom_cost: Option<crate::cost::CustomCost>,
    /// Spend and token limits the response counts against.
    tally: Option<crate::budget::Tally>,
    /// Budget nodes of a dynamic route this request went through, charged with its cost.
    route_budgets: Vec<crate::routing::BudgetCharge>,
    /// Tokens (input, output) already charged to the usage limits by [`Self::charge_part`].
    precharged: [u64; 2],
    /// Bodies for the log line (`spec.logging.payloads`).
    payloads: Option<Box<Payloads>>,
    /// The span to export, when the gateway exports them.
    trace: Option<crate::otel::Trace>,
    /// Where the record waits for the response checks when it finishes (see [`HeldBack`]).
    hold: Option<Arc<HeldBack>>,
    /// The status the client got when it is not the provider's `status` (an answer the response
    /// checks refused, or one given up while they ran): logged and counted, not charged by.
    sent: Option<u16>,
    /// The gateway's error code, for an answer the response checks refused.
    error_code: Option<u16>,
    /// For a background Responses request or a poll of one, what its usage is decided by.
    background: Option<Box<crate::background::Watch>>,
    /// Whether the answer's usage is due now: an answer of a model, or the poll that counts a
    /// background response's; not a poll or a status (see [`Self::usage_not_due`]), nor a
    /// background response's create, whose usage a later poll counts. Only such an answer is
    /// warned of when it reports no tokens.
    usage_due: bool,
    done: bool,
}

impl RequestRecord {
    /// A record of a request that got `status` from the upstream.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metrics: Arc<Metrics>,
        provider: Arc<str>,
        method: http::Method,
        path: &str,
        status: u16,
        start: Instant,
        opts: &LogOptions<'_>,
        log_id: String,
    ) -> Self {
        opts.recorded.mark();
        let usage = crate::usage::Usage::for_answer(&provider, path);
        Self {
            metrics,
            provider,
            method,
            path: path.into(),
            status,
            start,
            bytes: 0,
            log: opts.log,
            log_id,
            cached: false,
            metadata: opts.metadata.clone(),
            event_id: opts.event_id.clone(),
            step: None,
            usage,
            model: None,
            price: None,
            custom_cost: opts.custom_cost,
            tally: None,
            route_budgets: Vec::new(),
            precharged: [0, 0],
            payloads: opts.payloads.then(Box::default),
            trace: opts.trace.clone(),
            hold: opts.held_back.clone(),
            sent: None,
            error_code: None,
            background: None,
            usage_due: true,
            done: false,
        }
    }

    /// This record, moved out to wait in a [`HeldBack`] (this one is done: dropping it does
    /// nothing).
    fn moved_out(&mut self) -> Self {
        self.done = true;
        Self {
            metrics: self.metrics.clone(),
            provider: self.provider.clone(),
            method: self.method.clone(),
            path: std::mem::take(&mut self.path),
            status: self.status,
            start: self.start,
            bytes: self.bytes,
            log: self.log,
            log_id: std::mem::take(&mut self.log_id),
            cached: self.cached,
            metadata: self.metadata.take(),
            event_id: self.event_id.take(),
            step: self.step,
            usage: std::mem::take(&mut self.usage),
            model: self.model.take(),
            price: self.price.take(),
            custom_cost: self.custom_cost.take(),
            tally: self.tally.take(),
            route_budgets: std::mem::take(&mut self.route_budgets),
            precharged: self.precharged,
            payloads: self.payloads.take(),
            trace: self.trace.take(),
            hold: None,
            sent: self.sent,
            error_code: self.error_code,
            background: self.background.take(),
            usage_due: self.usage_due,
            done: false,
        }
    }

    /// The request body, for a log line that carries payloads.
    pub fn set_request_payload(&mut self, body: &[u8]) {
        if let Some(p) = &mut self.payloads {
            p.request_cut = body.len() > MAX_LOGGED_PAYLOAD;
            p.request = body[..body.len().min(MAX_LOGGED_PAYLOAD)].to_vec();
        }
    }

    /// Adds the body of a response served from the cache (its tokens are not counted again).
    pub fn add_cached_body(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.keep_payload(data);
    }

    fn keep_payload(&mut self, data: &[u8]) {
        if let Some(p) = &mut self.payloads {
            let room = MAX_LOGGED_PAYLOAD - p.response.len();
            p.response_cut |= data.len() > room;
            p.response.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    /// Adds `n` bytes sent to the client that are not kept for the log (a WebSocket session's).
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// Adds a frame sent to the client whose tokens are counted otherwise (a translation, whose
    /// provider's own frames go to [`Self::observe_unsent`]).
    pub fn observe_bytes(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.keep_payload(data);
    }

    /// Adds a frame of the provider's response body: its bytes, and the token counts it holds.
    pub fn observe(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.usage.observe(data);
        if let Some(watch) = &mut self.background {
            watch.observe(data);
        }
        self.keep_payload(data);
    }

    /// Reads the token counts in a frame of the provider's response that the client does not
    /// get as it is: one translated for it (`/compat`), or the rest of an answer read after the
    /// client left ([`crate::body`]).
    pub fn observe_unsent(&mut self, data: &[u8]) {
        self.usage.observe(data);
    }

    /// The token counts Bedrock gives in the response headers of InvokeModel, for any model:
    /// the counts of a body that carries none of its own (Llama, Titan, Mistral, ...); a body's
    /// usage, read as it comes, takes their place.
    pub fn bedrock_token_headers(&mut self, headers: &http::HeaderMap) {
        let count = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        if let (Some(input), Some(output)) = (
            count("x-amzn-bedrock-input-token-count"),
            count("x-amzn-bedrock-output-token-count"),
        ) {
            self.usage.counts.input = Some(input);
            self.usage.counts.output = Some(output);
        }
    }

    /// Whether the response counts against a spend limit, token budget or route budget.
    pub fn budgeted(&self) -> bool {
        self.tally.is_some() || !self.route_budgets.is_empty()
    }

    /// The model the request named and its price in `pricing`.
    pub fn set_model(&mut self, model: crate::cost::ModelName, pricing: &crate::cost::Pricing) {
        self.price = pricing.lookup(model.as_str());
        self.model = Some(model);
    }

    /// Prices the answer's images as the request asked for them: a DALL·E image by its size and
    /// quality (after [`Self::set_model`]).
    pub fn price_images(&mut self, asked: &crate::cost::ImageOptions) {
        if let (Some(model), Some(price)) = (&self.model, &mut self.price)
            && let Some(usd) = crate::cost::per_image(model.as_str(), asked)
        {
            price.per_image = usd;
        }
    }

    /// Charges the response's cost to these budget nodes of a dynamic route.
    pub fn charge_route_budgets(&mut self, budgets: Vec<crate::routing::BudgetCharge>) {
        self.route_budgets = budgets;
    }

    /// Lets `watch` decide, when the answer ends, what its usage is: a background Responses
    /// request's or a poll's (see [`crate::background`]). Its body must be observed with
    /// [`Self::observe`].
    pub fn watch_background(&mut self, watch: crate::background::Watch) {
        self.background = Some(Box::new(watch));
    }

    /// What charging a background response made by this request needs: its model and custom
    /// cost, as its own answer would be priced.
    pub fn background_charge(&self) -> crate::background::Charge {
        crate::background::Charge {
            model: self.model.clone(),
            custom_cost: self.custom_cost,
        }
    }

    /// The answer asks no model (a poll, a status, a stored object): it is not charged, and
    /// no warning says so.
    pub fn usage_not_due(&mut self) {
        self.usage_due = false;
    }

    /// Settles the usage of a background response's answer (see [`Self::watch_background`]).
    fn settle_background(&mut self, watch: crate::background::Watch) {
        use crate::background::Settled;
        let answered = (200..300).contains(&self.status);
        let tokens = self.usage.tokens().totals() != [None, None];
        match watch.settle(answered, tokens, Instant::now()) {
            Settled::AsAnswered => {}
            // An unfinished response's usage (or a counted one's, again) is not spent now.
            Settled::Deferred | Settled::NotCounted => {
                self.usage = crate::usage::Usage::default();
                self.usage_due = false;
            }
            Settled::Counted {
                model,
                price,
                custom_cost,
            } => {
                if model.is_some() {
                    self.model = model;
                    self.price = price.map(|p| *p);
                }
                if custom_cost.is_some() {
                    self.custom_cost = custom_cost;
                }
            }
        }
    }

    /// Counts the response's cost and tokens against the gateway's usage limits.
    pub fn set_tally(&mut self, tally: Option<crate::budget::Tally>) {
        self.tally = tally;
    }

    /// The response came from the cache; `model` produced it (the request's, or the one a
    /// dynamic route landed on).
    pub fn set_cached(&mut self, model: Option<crate::cost::ModelName>) {
        self.cached = true;
        self.model = model;
    }

    /// The dynamic-route step or universal-endpoint index that answered (`cf-aig-step`).
    pub fn set_step(&mut self, step: u32) {
        self.step = Some(step);
    }

    /// The status the client got instead of the upstream's: a gateway error (502, 504, ...)
    /// made after the record, when the answer held back whole could not be delivered. A 4xx or
    /// 5xx is not charged to the usage limits.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// The status the client got for the upstream's answer, which is still charged as the
    /// upstream's status says: a billed `/compat` answer whose model output was not valid,
    /// translated into OpenAI's `500` (see `compat::openai::InvalidOutput`).
    pub fn set_sent(&mut self, status: u16) {
        self.sent = Some(status);
    }

    /// Adds a part of a long answer as it completes (a WebSocket session's response): its tokens
    /// to the record's, and its cost charged to the usage limits now, not when the record
    /// finishes (which charges only what was not charged yet).
    pub fn charge_part(&mut self, part: Tokens) {
        self.usage.counts.add_part(&part);
        let [input, output] = part.totals().map(|n| n.unwrap_or(0));
        self.precharged[0] = self.precharged[0].saturating_add(input);
        self.precharged[1] = self.precharged[1].saturating_add(output);
        if let Some(t) = &self.tally {
            t.add(&self.metrics, self.charged(&part), part.totals());
        }
    }

    /// What `tokens` of this request cost against the usage limits: cache hits and failed
    /// requests nothing; the app's `cf-aig-custom-cost` may raise the model's price, never lower
    /// it (budgets are the operator's).
    fn charged(&self, tokens: &Tokens) -> Option<f64> {
        if self.cached || self.status >= 400 {
            return None;
        }
        let cost = crate::cost::cost(self.price, self.custom_cost, tokens);
        match (cost, self.custom_cost) {
            (Some(c), Some(_)) => {
                Some(crate::cost::cost(self.price, None, tokens).map_or(c, |priced| c.max(priced)))
            }
            // A custom cost that cannot be worked out (per token, of an answer counting images
            // or minutes, not tokens) charges what the answer costs: it never lowers a charge.
            (None, Some(_)) => crate::cost::cost(self.price, None, tokens),
            (c, None) => c,
        }
    }

    /// The body reached its end.
    pub fn finish_complete(mut self) {
        self.finish("complete");
    }

    /// The upstream broke the body off.
    pub fn finish_upstream_error(mut self) {
        self.finish("upstream_error");
    }

    /// The gateway ended the stream: the event it was reading did not fit in the budget of
    /// buffered bodies (`spec.limits.maxBufferedBytes`, `limit` bytes). Warned of in a line of
    /// its own (provider, path, `log_id`: no key, no content), logged with outcome
    /// `buffers_full` and traced with its error code (2110), as the client's error event says.
    pub fn finish_buffers_full(mut self, limit: u64) {
        let err = crate::error::GatewayError::BuffersFull { limit };
        tracing::warn!(
            provider = %self.provider,
            path = %self.path,
            limit,
            code = err.code(),
            log_id = %self.log_id,
            "stream ended: its unfinished event does not fit in the memory budget of buffered bodies (spec.limits.maxBufferedBytes); the client got an error event"
        );
        self.error_code = Some(err.code());
        self.finish("buffers_full");
    }

    fn finish(&mut self, outcome: &'static str) {
        if self.done {
            return;
        }
        // Held back for the response checks: they decide what is recorded, unless no one is
        // left to wait for them (the last holder of the slot is this record).
        if let Some(slot) = self.hold.take()
            && Arc::strong_count(&slot) > 1
        {
            let record = self.moved_out();
            slot.park(Answered { record, outcome });
            return;
        }
        self.done = true;
        // A background response's answer: its usage may be the response's, counted once.
        if let Some(watch) = self.background.take() {
            self.settle_background(*watch);
        }
        // What the client got: the provider's status, or the gateway's refusal of the answer.
        let status = self.sent.unwrap_or(self.status);
        let elapsed = self.start.elapsed();
        // All input (fresh, cache reads and writes) and all output, as providers bill them.
        let counted = self.usage.tokens();
        let tokens = counted.totals();
        let [tokens_in, tokens_out] = tokens;
        // Cache hits cost nothing; failed requests are not charged (not even a custom cost).
        let cost = if self.cached || self.status >= 400 {
            None
        } else {
            crate::cost::cost(self.price, self.custom_cost, &counted)
        };
        let charged = self.charged(&counted);
        if let Some(t) = &self.tally {
            if self.precharged == [0, 0] {
                t.add(&self.metrics, charged, tokens);
            } else {
                // Parts were charged as they completed: only the rest is due.
                let [pi, po] = self.precharged;
                let due = Tokens::plain(
                    tokens_in.map(|n| n.saturating_sub(pi)),
                    tokens_out.map(|n| n.saturating_sub(po)),
                );
                if due.totals() != [Some(0), Some(0)] {
                    t.add(&self.metrics, self.charged(&due), due.totals());
                }
            }
            if let Some(model) = &self.model
                && charged.is_none()
                && !self.cached
                && self.usage_due
                && self.status < 400
                && matches!(outcome, "complete" | "refused")
            {
                t.uncharged(
                    &self.provider,
                    model.as_str(),
                    tokens != [None, None],
                    Some(&self.log_id),
                );
            }
        }
        if let Some(usd) = charged {
            for b in &self.route_budgets {
                b.charge(usd);
            }
        } else if let (Some(model), Some(b)) = (&self.model, self.route_budgets.first())
            && !self.cached
            && self.usage_due
            && self.status < 400
            && matches!(outcome, "complete" | "refused")
        {
            b.uncharged(model.as_str(), &self.log_id);
        }
        self.metrics.record(
            &self.provider,
            &Sample {
                status,
                secs: elapsed.as_secs_f64(),
                cancelled: outcome == "cancelled",
                tokens,
                cost,
            },
        );
        if !self.log && self.trace.is_none() {
            return;
        }
        let end = std::time::SystemTime::now();
        let created_at = end.checked_sub(elapsed).unwrap_or(end);
        if self.log {
            let event_id = self
                .event_id
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()));
            crate::access_log::write(&crate::access_log::Entry {
                id: &self.log_id,
                created_at,
                provider: Some(&self.provider),
                model: self.model.as_ref().map(|m| m.as_str()),
                method: self.method.as_str(),
                path: &self.path,
                status_code: status,
                duration: elapsed.as_secs_f64() * 1000.0,
                bytes: self.bytes,
                outcome,
                cached: self.cached,
                tokens_in,
                tokens_out,
                cost,
                custom_cost: cost.is_some() && self.custom_cost.is_some(),
                metadata: self.metadata.as_deref(),
                step: self.step,
                event_id: event_id.as_deref(),
                payloads: self.payloads.as_deref().map(|p| crate::access_log::Bodies {
                    request: &p.request,
                    request_cut: p.request_cut,
                    response: &p.response,
                    response_cut: p.response_cut,
                }),
            });
        }
        if let Some(trace) = self.trace.take() {
            trace.send(
                crate::otel::Finished {
                    start: created_at,
                    end,
                    provider: self.provider.clone(),
                    method: self.method.clone(),
                    operation: crate::otel::operation(&self.path),
                    model: self.model.as_ref().map(|m| m.as_str().to_owned()),
                    status,
                    outcome,
                    tokens,
                    cost,
                    cached: self.cached,
                    log_id: std::mem::take(&mut self.log_id),
                    metadata: self.metadata.take(),
                    error_code: self.error_code,
                },
                &self.metrics,
            );
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // Still open when dropped: the client went away before the body ended.
        self.finish("cancelled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn log_options_read_collect_log_and_metadata() {
        let mut h = HeaderMap::new();
        assert_eq!(
            LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), true, false),
            Ok(LogOptions {
                log: true,
                metadata: None,
                custom_cost: None,
                event_id: None,
                payloads: false,
                trace: None,
                recorded: Recorded::default(),
                held_back: None,
            })
        );
        // Payloads: the gateway's setting, unless the request opts out.
        assert!(
            LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), true, true)
                .expect("valid")
                .payloads
        );
        assert!(
            !LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), false, true)
                .expect("valid")
                .payloads
        );
        let mut opt_out = HeaderMap::new();
        opt_out.insert(
            "cf-aig-collect-log-payload",
            HeaderValue::from_static("FALSE"),
        );
        let o =
            LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&opt_out), true, true)
                .expect("valid");
        assert!(o.log && !o.payloads);
        opt_out.insert(
            "cf-aig-collect-log-payload",
            HeaderValue::from_static("nope"),
        );
        // A malformed switch is refused whatever the gateway logs, and whatever the request
        // says of its log line.
        for (log_requests, log_payloads, collect_log) in [
            (true, true, None),
            (true, false, None),
            (false, true, None),
            (false, false, None),
            (true, true, Some("false")),
        ] {
            let mut h = opt_out.clone();
            if let Some(v) = collect_log {
                h.insert("cf-aig-collect-log", HeaderValue::from_static(v));
            }
            let err = LogOptions::from_headers(
                crate::headers::GatewayHeaders::scan(&h),
                log_requests,
                log_payloads,
            )
            .expect_err("malformed");
            assert_eq!(err.code(), 2100);
            assert!(
                err.to_string().contains("cf-aig-collect-log-payload"),
                "{err}"
            );
        }
        // So are the trace ids, read only when spans are exported.
        for (name, bad) in [
            ("cf-aig-otel-trace-id", "zz"),
            ("cf-aig-otel-trace-id", "00000000000000000000000000000000"),
            ("cf-aig-otel-parent-span-id", "xyz"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(bad));
            let err =
                LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), false, false)
                    .expect_err("malformed");
            assert!(err.to_string().contains(name), "{err}");
        }
        let mut ids = HeaderMap::new();
        ids.insert(
            "cf-aig-otel-trace-id",
            HeaderValue::from_static("4BF92F3577B34DA6A3CE929D0E0E4736"),
        );
        ids.insert(
            "cf-aig-otel-parent-span-id",
            HeaderValue::from_static("00f067aa0ba902b7"),
        );
        assert!(
            LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&ids), true, false)
                .is_ok()
        );
        h.insert("cf-aig-collect-log", HeaderValue::from_static("false"));
        h.insert(
            "cf-aig-metadata",
            HeaderValue::from_static(r#"{ "team": "a", "n": 3, "paid": true }"#),
        );
        let o = LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), true, false)
            .expect("valid");
        assert!(!o.log);
        let v: serde_json::Value =
            serde_json::from_str(o.metadata.as_deref().unwrap_or("")).expect("json");
        assert_eq!(v, serde_json::json!({"team": "a", "n": 3, "paid": true}));
        for bad in [
            r#"[1]"#,
            r#"{"a":{"nested":1}}"#,
            r#"{"a":[1]}"#,
            r#"{"a":null}"#,
            "not json",
        ] {
            let mut h = HeaderMap::new();
            h.insert("cf-aig-metadata", HeaderValue::from_static(bad));
            assert_eq!(
                LogOptions::from_headers(crate::headers::GatewayHeaders::scan(&h), true, false)
                    .map_err(|e| e.code()),
                Err(2100),
                "{bad}"
            );
        }
    }

    /// A record of an OpenAI chat answer of gpt-4o-mini (12 tokens in, 25 out) with `opts`.
    fn answered(metrics: &Arc<Metrics>, opts: &LogOptions<'_>) -> RequestRecord {
        let mut r = RequestRecord::new(
            metrics.clone(),
            Arc::from("openai"),
            http::Method::POST,
            "chat/completions",
            200,
            Instant::now(),
            opts,
            "01LOGID".into(),
        );
        r.set_model(
            crate::cost::ModelName::new("gpt-4o-mini"),
            &crate::cost::Pricing::default(),
        );
        r.observe(br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":25}}"#);
        r
    }

    /// The value of the sample of `metric` (its name and labels as written) in `text`.
    fn sample(text: &str, metric: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_rejected_reload_reads_0_and_keeps_the_time_of_the_last_valid_load() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "sidegate_config_last_reload_successful"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "sidegate_config_last_reload_success_timestamp_seconds"
            ),
            Some(0.0),
            "{text}"
        );
        metrics.set_load_outcome(true);
        let text = metrics.encode();
        let loaded = sample(
            &text,
            "sidegate_config_last_reload_success_timestamp_seconds",
        )
        .expect("timestamp");
        assert!(loaded > 1.7e9, "{text}");
        assert_eq!(
            sample(&text, "sidegate_config_last_reload_successful"),
            Some(1.0)
        );
        metrics.count_reload(false);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "sidegate_config_last_reload_successful"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "sidegate_config_last_reload_success_timestamp_seconds"
            ),
            Some(loaded)
        );
        metrics.count_reload(true);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "sidegate_config_last_reload_successful"),
            Some(1.0)
        );
    }

    #[test]
    fn a_held_back_answer_the_checks_refuse_is_counted_as_the_refusal_and_still_charged() {
        let metrics = Arc::new(Metrics::new());
        let slot = Arc::new(HeldBack::default());
        let opts = LogOptions {
            held_back: Some(slot.clone()),
            ..LogOptions::default()
        };
        // The body ends: the record waits for the checks, nothing counted yet.
        answered(&metrics, &opts).finish_complete();
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="200"}"#
            ),
            None,
            "{text}"
        );
        let parked = slot.take().expect("parked");
        assert!(slot.take().is_none());
        parked.refuse(400, 2030, br#"{"success":false}"#);
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="400"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="200"}"#
            ),
            None,
            "{text}"
        );
        // The provider produced the tokens: counted, and their cost.
        assert_eq!(
            sample(
                &text,
                r#"sidegate_tokens_total{provider="openai",direction="output"}"#
            ),
            Some(25.0),
            "{text}"
        );
        let usd = sample(&text, r#"sidegate_cost_usd_total{provider="openai"}"#).expect("cost");
        assert!((usd - 0.0000168).abs() < 1e-12, "{text}");
    }

    #[test]
    fn a_held_back_answer_let_through_is_counted_with_its_own_status() {
        let metrics = Arc::new(Metrics::new());
        let slot = Arc::new(HeldBack::default());
        let opts = LogOptions {
            held_back: Some(slot.clone()),
            ..LogOptions::default()
        };
        answered(&metrics, &opts).finish_complete();
        slot.take().expect("parked").deliver();
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="200"}"#
            ),
            Some(1.0),
            "{text}"
        );
        // Checks that never decide (the client left while they ran): 499, cancelled.
        answered(&metrics, &opts).finish_complete();
        drop(opts);
        drop(slot);
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="499"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"sidegate_responses_cancelled_total{provider="openai"}"#
            ),
            Some(1.0),
            "{text}"
        );
        // With no one left to wait for the checks, a record is counted at once.
        let slot = Arc::new(HeldBack::default());
        let opts = LogOptions {
            held_back: Some(slot),
            ..LogOptions::default()
        };
        let record = answered(&metrics, &opts);
        drop(opts);
        record.finish_complete();
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"sidegate_requests_total{provider="openai",status="200"}"#
            ),
            Some(2.0),
            "{text}"
        );
    }

    #[test]
    fn metadata_keeps_the_first_five_entries_in_order_and_ignores_the_rest() {
        let meta = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("cf-aig-metadata", HeaderValue::from_static(v));
            LogOptions::metadata(crate::headers::GatewayHeaders::scan(&h)).map_err(|e| e.code())
        };
        // Cloudflare: "If more than five entries are provided, only the first five will be
        // saved; additional entries will be ignored", whatever they hold.
        assert_eq!(
            meta(r#"{"z":1,"b":"x","a":true,"d":4,"c":5,"f":6,"g":{"any":[1]}}"#)
                .expect("valid")
                .as_deref(),
            Some(r#"{"z":1,"b":"x","a":true,"d":4,"c":5}"#)
        );
        // A repeated key is one entry, with its last value, until entries are ignored.
        assert_eq!(
            meta(r#"{"a":1,"a":2,"b":3}"#).expect("valid").as_deref(),
            Some(r#"{"a":2,"b":3}"#)
        );
        assert_eq!(
            meta(r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"a":{"x":1}}"#)
                .expect("valid")
                .as_deref(),
            Some(r#"{"a":1,"b":2,"c":3,"d":4,"e":5}"#)
        );
        // Kept entries are still checked; keys are written back as JSON strings.
        assert_eq!(meta(r#"{"a":1,"b":[2]}"#), Err(2100));
        assert_eq!(
            meta(r#"{"q\"k":"v\n"}"#).expect("valid").as_deref(),
            Some(r#"{"q\"k":"v\n"}"#)
        );
    }
}
