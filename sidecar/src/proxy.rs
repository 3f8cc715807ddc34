//! The request pipeline: one function per phase over a request, in the order of DESIGN.md.
//!
//! `admit` (route, gateway id, gateway auth) → `provider` → `key` (BYOK) → `body` (size limit)
//! → `dispatch` (time to first byte; a retried request's last attempt waits longer) → response
//! headers, body streamed through.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};

use crate::body::{ProxyBody, RequestBody, hold_whole};
use crate::cache;
use crate::config::Snapshot;
use crate::error::{GatewayError, truncate};
use crate::headers::{GatewayHeaders, Gw, strip_response_headers, upstream_request_headers};
use crate::providers::{KeyChoice, Provider};
use crate::route::{self, Route};
use crate::telemetry::{LogOptions, Metrics, RequestRecord};

use crate::upstream::UpstreamBody;
pub use crate::upstream::{UpstreamClient, upstream_client};

const EVENT_ID: HeaderName = HeaderName::from_static("cf-aig-event-id");
const LOG_ID: HeaderName = HeaderName::from_static("cf-aig-log-id");
/// What answered a dynamic route (kept with a cached answer, so a hit logs it too).
const SERVED_PROVIDER: HeaderName = HeaderName::from_static("cf-aig-provider");
const SERVED_MODEL: HeaderName = HeaderName::from_static("cf-aig-model");
const SERVED_STEP: HeaderName = HeaderName::from_static("cf-aig-step");
/// A client's SigV4 signature, replaced when the gateway signs.
const AWS_SIGNATURE_HEADERS: &[&str] = &[
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// The gateway: the config now serving, the upstream client, and the metrics.
pub struct Gateway {
    /// The config now serving (`None` until the first valid one loads).
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Client to the providers.
    pub client: UpstreamClient,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The response cache, made when first used; kept across reloads unless its size changes.
    cache: ArcSwapOption<cache::Store>,
    /// Cache keys being fetched now, so identical misses make one upstream call.
    flights: cache::Flights,
    /// Spend and token counters of this pod, kept across reloads.
    pub(crate) ledger: Arc<crate::budget::Ledger>,
    /// Background responses made through this process whose usage is still to come.
    pub(crate) background: Arc<crate::background::Pending>,
    /// The span exporter (`spec.openTelemetry`); idle until a config sets an endpoint.
    otel: crate::otel::Exporter,
    /// Clients of Redis servers a reload stopped using (another URL, or none), which may still
    /// hold charges for theirs: written at shutdown too.
    pub(crate) former_redis: crate::shared::Former,
    /// Bytes held in buffered bodies over every request (`spec.limits.maxBufferedBytes`).
    pub(crate) buffers: crate::buffers::BufferBudget,
    /// The WebSocket sessions open now (`crate::websocket`).
    pub sessions: crate::websocket::Sessions,
    /// How long a client may stay silent mid-request: its first bytes, a request head, or the
    /// next part of a request body (`--client-timeout`).
    pub client_timeout: Duration,
    /// The gateway port listens on loopback only: requests must name it by address or as
    /// `localhost` (see [`admit_client`]).
    pub loopback_listener: bool,
    /// Most client connections open at once on the gateway port, WebSocket sessions included
    /// (`--max-connections`); more are refused (503, code 2112).
    pub max_connections: usize,
}

/// What the cache did for a request.
pub(crate) enum Cached {
    /// The cache is off for it.
    Off,
    /// Answered from the cache.
    Hit(Box<Response<ProxyBody>>),
    /// Not there: store the response like this.
    Miss(cache::Miss),
}

impl Cached {
    /// The miss to fill (`None` with the cache off), or a hit to answer with at once, the
    /// request's DLP flags added to it (its body was checked like any other's).
    pub(crate) fn into_miss(
        self,
        dlp_flags: &[crate::dlp::Finding],
    ) -> Result<Option<cache::Miss>, Box<Response<ProxyBody>>> {
        match self {
            Cached::Off => Ok(None),
            Cached::Hit(mut resp) => {
                crate::dlp::flag(resp.headers_mut(), dlp_flags);
                Err(resp)
            }
            Cached::Miss(miss) => Ok(Some(miss)),
        }
    }
}

/// Default of `--client-timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of `--max-connections`: far above what a pod's app opens (an idle connection costs
/// the sidecar about 33 KiB, so 4096 of them some 130 MiB), low enough that a client leaking
/// connections meets it before the sidecar's memory or file-descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

impl Gateway {
    /// A gateway with no config loaded yet.
    pub fn new(metrics: Arc<Metrics>, client: UpstreamClient) -> Self {
        Self {
            snapshot: ArcSwapOption::empty(),
            cache: ArcSwapOption::empty(),
            flights: cache::Flights::default(),
            ledger: Arc::default(),
            background: Arc::new(crate::background::Pending::new(
                metrics.background_pending(),
            )),
            otel: crate::otel::Exporter::new(client.clone(), metrics.clone()),
            former_redis: crate::shared::Former::default(),
            buffers: metrics.buffer_budget(),
            sessions: crate::websocket::Sessions::default(),
            client,
            metrics,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            loopback_listener: true,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// Exports the spans still queued, waiting at most `within` (on shutdown).
    pub async fn flush_spans(&self, within: Duration) {
        self.otel.flush(within).await;
    }

    /// At shutdown, once the last request ended: writes the charges (spend, tokens, window
    /// counts) still waiting for the gateway's Redis, and for those a reload stopped using,
    /// each to its own, at once and at most `within`; what could not be written is logged.
    pub async fn write_charges(&self, within: Duration) {
        let current = self.snapshot.load_full().and_then(|s| s.shared.clone());
        let former = self.former_redis.holding();
        let writes = current
            .iter()
            .map(|s| s.write_waiting(&self.metrics, within, false))
            .chain(
                former
                    .iter()
                    .map(|s| s.write_waiting(&self.metrics, within, true)),
            );
        futures_util::future::join_all(writes).await;
    }

    /// The cache store for `settings`, made (or remade, when its size changed) on first use.
    fn cache_store(&self, settings: &cache::Settings) -> Arc<cache::Store> {
        if let Some(s) = self.cache.load_full()
            && s.max_size() == settings.max_size
        {
            return s;
        }
        let fresh = Arc::new(cache::Store::new(settings.max_size));
        self.cache.store(Some(fresh.clone()));
        fresh
    }

    /// The cached response of `key` in `sink`, if any; `Err` when Redis could not be read.
    async fn cache_get(
        &self,
        sink: &cache::Sink,
        key: &cache::Key,
        wait: &crate::shared::Wait,
    ) -> Result<Option<crate::shared::CachedResponse>, crate::shared::Unreadable> {
        match sink {
            cache::Sink::Redis(shared, _) => shared.cache_get(&self.metrics, wait, key).await,
            cache::Sink::Memory(store) => {
                Ok(store.get(key).map(|e| crate::shared::CachedResponse {
                    status: e.status,
                    headers: e.headers.clone(),
                    body: e.body.clone(),
                }))
            }
        }
    }

    /// What a response of `snap` counts against, when it has usage limits.
    pub(crate) fn tally(&self, snap: &Snapshot) -> Option<crate::budget::Tally> {
        let settings = snap.budgets?;
        Some(crate::budget::Tally {
            ledger: self.ledger.clone(),
            settings,
            shared: snap.shared.clone(),
        })
    }

    /// Sends a request upstream, `auth` made for each attempt as it goes, within `waits`
    /// ([`crate::retry::Waits::direct`] for a direct request,
    /// [`crate::retry::Waits::every_attempt`] for a fallback step, each with the request's own
    /// config), and retries failed attempts as `retries` says: connection errors,
    /// timeouts to the first byte, the answers [`crate::retry::should_retry`] retries, and those
    /// whose body broke off before `read` had all it waits for of them (an answer held back
    /// whole). `read` reads each answer not retried for its status as far as the request waits
    /// for it: its head, or all of it ([`read_passed_on`] for one passed on as it came). The
    /// last attempt's answer, whatever its status, whole or not, is the response.
    pub(crate) async fn dispatch<A, R, F>(
        &self,
        req: Request<Full<Bytes>>,
        auth: Option<&AttemptAuth<'_>>,
        waits: crate::retry::Waits,
        retries: &crate::retry::Policy,
        provider: &Arc<str>,
        read: R,
    ) -> Result<A, GatewayError>
    where
        R: Fn(Response<UpstreamBody>) -> F,
        F: Future<Output = Read<A>>,
    {
        let mut attempt = 1;
        while attempt < retries.max_attempts {
            let mut this = clone_request(&req);
            if let Some(auth) = auth {
                auth.apply(self, &mut this).await?;
            }
            let sent = self.attempt(this, waits.head, waits.silence);
            let (failure, asked) = match sent.await {
                Ok(resp) if !crate::retry::should_retry(resp.status(), resp.headers()) => {
                    match read(resp).await {
                        Read::Answered(answer) => return Ok(answer),
                        Read::BrokeOff(_, why) => (why, None),
                    }
                }
                Ok(resp) => match crate::retry::retry_after(resp.headers()) {
                    // Longer than the gateway waits: the provider's answer is the response.
                    Some(asked) if asked > waits.retry_after => {
                        return Ok(read(resp).await.into_answer());
                    }
                    asked => (format!("status {}", resp.status().as_u16()), asked),
                },
                Err(e) => (e.to_string(), None),
            };
            // The provider's Retry-After when it asks for longer than the policy's delay.
            let wait = retries.delay_before(attempt).max(asked.unwrap_or_default());
            tracing::info!(provider = %provider, attempt, max_attempts = retries.max_attempts, failure = %failure, wait_ms = wait.as_millis() as u64, log_id = crate::log_id::current().as_deref(), "retrying upstream");
            self.metrics.count_retry(provider);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
        let mut req = req;
        if let Some(auth) = auth {
            auth.apply(self, &mut req).await?;
        }
        let resp = self.attempt(req, waits.last_head, waits.silence).await?;
        Ok(read(resp).await.into_answer())
    }

    /// One upstream attempt: the response head within `head`, and no silence of more than
    /// `silence` in its body.
    pub(crate) async fn attempt(
        &self,
        req: Request<Full<Bytes>>,
        head: Duration,
        silence: Duration,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        match tokio::time::timeout(head, self.client.request(req)).await {
            Ok(Ok(mut resp)) => {
                resp.body_mut().stall_after(silence);
                Ok(resp)
            }
            Ok(Err(e)) => Err(GatewayError::UpstreamUnavailable(error_chain(&e))),
            Err(_) => Err(GatewayError::UpstreamTimeout {
                ms: head.as_millis() as u64,
            }),
        }
    }

    /// A small exchange of the gateway's own (a token, a moderation verdict): `req` sent asking
    /// for an uncompressed answer, and the whole answer — head and body, at most `limit` bytes
    /// — within `within`. The error says what went wrong, for a log line.
    pub(crate) async fn fetch(
        &self,
        mut req: Request<Full<Bytes>>,
        within: Duration,
        limit: usize,
    ) -> Result<(http::StatusCode, Bytes), String> {
        req.headers_mut()
            .insert(header::ACCEPT_ENCODING, crate::headers::identity_encoding());
        let late = || format!("no answer within {}s", within.as_secs());
        let exchange = async {
            let resp = self
                .attempt(req, within, within)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            // The body's own watchdog has the same bound as the whole exchange: either may see
            // a stalled answer first, and it is the same failure. Not taken from the budget of
            // buffered bodies: `limit` is small (a token, a verdict) and the request it serves
            // holds its own body there already.
            let raw = hold_whole(resp.into_body(), limit, None)
                .await
                .map_err(|e| match e {
                    crate::body::HoldError::Stalled(_) => late(),
                    other => format!("reading the answer: {other}"),
                })?;
            Ok((status, raw))
        };
        tokio::time::timeout(within, exchange)
            .await
            .map_err(|_| late())?
    }

    /// Looks a request up in the response cache and answers a hit: `want` from [`cache::want`],
    /// `None` also for a request that is not [`cache::cacheable`] (a status poll, a run or a
    /// deletion is answered by the provider every time). `following` runs when the request is
    /// to wait for an identical one's answer. `wait` is the request's for Redis.
    #[allow(clippy::too_many_arguments)] // the request's parts, each from where it was read
    pub(crate) async fn cache_lookup(
        &self,
        snap: &Snapshot,
        want: Option<&cache::Want<'_>>,
        req: &cache::Request<'_>,
        parts: &http::request::Parts,
        start: Instant,
        opts: &LogOptions<'_>,
        wait: &crate::shared::Wait,
        following: impl FnOnce(),
    ) -> Cached {
        let Some(want) = want else {
            return Cached::Off;
        };
        if want.skip {
            self.metrics.count_cache("skip");
            return Cached::Off;
        }
        let key = cache::key(req, want.custom_key);
        let (sink, max_entry) = match &snap.shared {
            Some(shared) if snap.cache.redis => (
                cache::Sink::Redis(shared.clone(), self.metrics.clone()),
                usize::try_from(snap.cache.max_size / 8).unwrap_or(usize::MAX),
            ),
            _ => {
                let store = self.cache_store(&snap.cache);
                let max_entry = store.max_entry();
                (cache::Sink::Memory(store), max_entry)
            }
        };
        let (mut found, readable) = match self.cache_get(&sink, &key, wait).await {
            Ok(found) => (found, true),
            Err(_) => (None, false),
        };
        let mut flight = None;
        // Redis unreadable: an identical request's answer could not be stored for this one
        // either (README: then they go upstream at once), so none waits for another.
        if found.is_none() && readable {
            match self.flights.join(key) {
                cache::Flight::Leader(guard) => flight = Some(guard),
                cache::Flight::Follower(leader) => {
                    following();
                    // An identical request is fetching: its response, once stored, is ours. Not
                    // waited for longer than this request's own timeout (its header's, else the
                    // gateway's), after which it calls upstream itself.
                    let own =
                        request_timeout(GatewayHeaders::scan(&parts.headers), snap.request_timeout)
                            .unwrap_or(cache::COALESCE_WAIT);
                    cache::wait_for_leader(leader, own.min(cache::COALESCE_WAIT)).await;
                    found = self.cache_get(&sink, &key, wait).await.ok().flatten();
                }
            }
        }
        let Some(entry) = found else {
            self.metrics.count_cache("miss");
            return Cached::Miss(cache::Miss {
                sink,
                max_entry,
                key,
                ttl: want.ttl,
                streaming: snap.cache.streaming,
                json_stream: cache::streams_json(req),
                flight,
            });
        };
        self.metrics.count_cache("hit");
        let served = ServedBy::of_hit(snap, req, &entry.headers);
        let mut headers = entry.headers;
        headers.insert(cache::STATUS, cache::HIT);
        let log_id = tag_response(&mut headers, parts.headers.get(Gw::EventId.name()));
        let mut record = RequestRecord::new(
            self.metrics.clone(),
            served.provider,
            parts.method.clone(),
            req.path,
            entry.status.as_u16(),
            start,
            opts,
            log_id,
        );
        record.set_cached(served.model);
        if let Some(step) = served.step {
            record.set_step(step);
        }
        record.set_request_payload(req.body);
        record.add_cached_body(&entry.body);
        // Complete once the client took it (see `ProxyBody::answer`).
        let mut resp = Response::new(ProxyBody::answer(entry.body, None, record));
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = headers;
        Cached::Hit(Box::new(resp))
    }

    /// Serves one request; every failure becomes a SPEC.md error response.
    pub fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
        // Chosen first, so that the lines logged on the way (a guardrail's flag, a retry) name
        // the id its answer and access line will carry. No `async` layer here: it would copy
        // the large future of `serve` when first polled.
        let log_id = crate::log_id::next_shared();
        crate::log_id::scope(log_id.clone(), self.serve(req, log_id))
    }

    /// [`Gateway::handle`] within the scope of the request's log id `log_id`.
    async fn serve(
        self: Arc<Self>,
        req: Request<RequestBody>,
        log_id: Arc<str>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let Some(snap) = self.snapshot.load_full() else {
            // No config, no gateway settings: counted and traced, not in the access log.
            let err = GatewayError::NotReady;
            let status = err.status().as_u16();
            self.metrics
                .count_request(&Arc::from("none"), status, start.elapsed());
            let id = log_id;
            tracing::info!(provider = "none", method = %req.method(), status, code = err.code(), error = %err, log_id = %id, "request refused");
            let mut resp = err.into_response();
            let aig = GatewayHeaders::scan(req.headers());
            tag_response_with(resp.headers_mut(), aig.get(Gw::EventId), &id);
            return Ok(resp);
        };
        let (parts, body) = req.into_parts();
        let seen = crate::telemetry::Seen::default();
        let mut unanswered = Unanswered {
            gw: &self,
            snap: &snap,
            parts: &parts,
            start,
            seen: &seen,
            armed: true,
            log_id,
        };
        // With response checks, the answer's record waits for them to say what the client got.
        let held_back = holds_answers(&snap).then(Arc::<crate::telemetry::HeldBack>::default);
        let result = self
            .proxy(&snap, &parts, body, start, &seen, held_back.as_ref())
            .await;
        // From here the answer's record (or the refusal) tells of the request.
        unanswered.armed = false;
        match (result, held_back) {
            // Boxed: only with response checks, and its state would otherwise be in every
            // connection's task.
            (Ok(resp), Some(held_back)) => {
                let moderated = crate::guardrails::reads_answer(&parts.method, parts.uri.path());
                Ok(Box::pin(self.scan_response(&snap, resp, &held_back, moderated)).await)
            }
            (Ok(resp), None) => Ok(resp),
            (Err((provider, err)), held_back) => {
                // An answer recorded before the refusal is let go as it was.
                if let Some(answered) = held_back.as_deref().and_then(|h| h.take()) {
                    answered.deliver();
                }
                let mut resp = self.refuse(
                    &snap,
                    &parts,
                    provider,
                    seen.model(),
                    seen.request_body(),
                    err,
                    start,
                    None,
                );
                if seen.cache_on() {
                    resp.headers_mut().insert(cache::STATUS, cache::MISS);
                }
                Ok(resp)
            }
        }
    }

    /// Holds a response back until it is whole and lets the DLP response policies and the
    /// response guardrails see it: a DLP `BLOCK` match replaces it with a 2030 error, a blocking
    /// guardrail category with a 2017 one; `FLAG` matches are listed in `cf-aig-dlp`. An
    /// upstream answer passed on as it came was read whole within its attempt (retried when it
    /// broke off, see [`read_passed_on`]): the last attempt's that stalled mid-body makes it a
    /// 504, one that broke off a 502; one compressed anyway has it decoded first
    /// ([`crate::body::decode_held`]). The answer's record, parked in
    /// `held_back` when its body ended, is finished with what the client got: here for a
    /// refusal, when the client took the answer (or left it) for one let through (charged for
    /// the provider's tokens either way). The guardrails read only a model's answer
    /// (`moderated`, see [`crate::guardrails::reads_answer`]). The answer goes into the cache
    /// only once the checks let it through.
    async fn scan_response(
        &self,
        snap: &Snapshot,
        resp: Response<ProxyBody>,
        held_back: &crate::telemetry::HeldBack,
        moderated: bool,
    ) -> Response<ProxyBody> {
        let (mut head, body) = resp.into_parts();
        let mut body = std::pin::pin!(body);
        // A body streamed through as it is goes on unrecorded: its record is fed here.
        let mut record = body.as_mut().take_record();
        // Stored in the cache only once the checks let it through: a refused answer is not.
        let fill = body.as_mut().take_fill();
        let mut held = self.buffers.guard(snap.max_buffered);
        let log_id = head.headers.get(LOG_ID).cloned();
        let id = log_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let held_whole =
            crate::body::hold_response(body.as_mut(), crate::dlp::MAX_RESPONSE_BYTES, &mut held);
        // The answer as the upstream sent it, for the cache (a copy shares its bytes).
        let mut sent = None;
        let whole = match held_whole.await {
            Ok(whole) => {
                sent = fill.is_some().then(|| whole.clone());
                crate::body::decode_held(
                    &mut head.headers,
                    whole,
                    crate::dlp::MAX_RESPONSE_BYTES,
                    &mut held,
                )
            }
            Err(e) => Err(e.into_gateway_error("the response for its checks")),
        };
        let whole = match whole {
            Ok(whole) => whole,
            Err(err) => {
                tracing::warn!(error = %err, log_id = %id, "response not delivered");
                if let Some((record, _)) = record {
                    record.finish_upstream_error();
                }
                // Logged and counted as the client got it; not charged (cut short).
                if let Some(answered) = held_back.take() {
                    let body = err.to_json();
                    answered.undelivered(err.status().as_u16(), err.code(), body.as_bytes());
                }
                let mut resp = err.into_response();
                crate::headers::copy_gateway_headers(&head.headers, resp.headers_mut());
                return resp;
            }
        };
        if let Some((mut record, tokens)) = record.take() {
            if tokens {
                record.observe(&whole);
            } else {
                record.observe_bytes(&whole);
            }
            if body.cut_short() {
                record.finish_upstream_error();
            } else {
                record.finish_complete();
            }
        }
        let checked = match snap.dlp.scan(&whole, crate::dlp::Scanned::Response).await {
            Ok(found)
                if moderated && head.status.is_success() && snap.guardrails.checks_responses() =>
            {
                // Its lines (flagged, blocked) name the request's log id (the scope's).
                self.guardrails_check(snap, crate::guardrails::Side::Response, None, &whole)
                    .await
                    .map(|_| found)
            }
            other => other,
        };
        let answered = held_back.take();
        match checked {
            Ok(found) => {
                if let (Some(fill), Some(sent)) = (fill, sent)
                    && !body.cut_short()
                {
                    // The copy's bytes are taken from the budget of buffered bodies while made.
                    let mut copy = self.buffers.guard(snap.max_buffered);
                    if copy.grow(sent.len() as u64).is_ok() {
                        fill.whole(&sent);
                    }
                }
                crate::dlp::flag(&mut head.headers, &found);
                head.headers.remove(header::CONTENT_LENGTH);
                // Delivered once the client took it (see `ProxyBody::answer`).
                let body = match answered {
                    Some(answered) => ProxyBody::answer(whole, Some(held), answered),
                    None => ProxyBody::full_held(whole, held),
                };
                Response::from_parts(head, body)
            }
            Err(err) => {
                let status = err.status().as_u16();
                let code = err.code();
                tracing::info!(status, code, error = %err, log_id = %id, "response refused");
                let body = err.to_json();
                // Logged as the client got it: the error, never the text it blocked.
                if let Some(answered) = answered {
                    answered.refuse(status, code, body.as_bytes());
                }
                let mut resp = err.into_response();
                crate::headers::copy_gateway_headers(&head.headers, resp.headers_mut());
                resp
            }
        }
    }

    /// Counts, traces, logs and renders a request the gateway refused with `err`; `provider` is
    /// the one it had chosen, if any, `model` the one the request names when its body was read,
    /// and `step` the universal-endpoint step it failed at. The response gets a `cf-aig-log-id`
    /// like a served one (and `cf-aig-step`), and the access log a line with that id (unless the
    /// request or the gateway turned logging off); with payloads logged, the line carries the
    /// error as the response body and `request_body` (the body read, if it was) as the request's.
    #[allow(clippy::too_many_arguments)] // what is known of the request, each from where it was read
    pub(crate) fn refuse(
        &self,
        snap: &Snapshot,
        parts: &http::request::Parts,
        provider: Option<Arc<str>>,
        model: Option<&str>,
        request_body: Option<&[u8]>,
        err: GatewayError,
        start: Instant,
        step: Option<u32>,
    ) -> Response<ProxyBody> {
        let aig = GatewayHeaders::scan(&parts.headers);
        let id = crate::log_id::for_request();
        // The provider the route names when none was chosen yet (a known one), as the access
        // line, the metric, the span and the line below all name it.
        let (route_provider, path) = refused_route(snap, parts.uri.path());
        let provider = provider.or(route_provider);
        // A header the request got wrong (its refusal, perhaps) leaves the default.
        let log = snap.log_requests && aig.flag(Gw::CollectLog).ok().flatten() != Some(false);
        // The request's metadata, unless that header is what is wrong with it.
        let metadata = if log || snap.otel.is_some() {
            LogOptions::metadata(aig).ok().flatten()
        } else {
            None
        };
        if let Some(target) = &snap.otel {
            self.otel.refused(
                target,
                &parts.headers,
                crate::otel::operation(parts.uri.path()),
                provider.clone(),
                &parts.method,
                &err,
                start.elapsed(),
                &id,
                metadata.clone(),
                &self.metrics,
            );
        }
        let status = err.status().as_u16();
        let label = provider.clone().unwrap_or_else(|| Arc::from("none"));
        self.metrics.count_request(&label, status, start.elapsed());
        // The upstream's failure (no connection, no answer in time) is no refusal of the
        // gateway's: logged as an answer that broke off is.
        let upstream_failed = err.upstream_failed();
        if log {
            let what = if upstream_failed {
                "upstream failed"
            } else {
                "request refused"
            };
            tracing::info!(provider = %label, method = %parts.method, status, code = err.code(), error = %err, log_id = %id, "{what}");
        }
        // As a refused answer's line has them (see `telemetry::Answered::refuse`).
        let payloads = log
            && snap.log_payloads
            && matches!(aig.flag(Gw::CollectLogPayload), Ok(None | Some(true)));
        let error_body = payloads.then(|| err.to_json());
        let mut resp = err.into_response();
        tag_response_with(resp.headers_mut(), aig.get(Gw::EventId), &id);
        if let Some(step) = step {
            resp.headers_mut().insert(
                HeaderName::from_static("cf-aig-step"),
                HeaderValue::from(step),
            );
        }
        if !log {
            return resp;
        }
        let event_id = aig
            .get(Gw::EventId)
            .map(|v| String::from_utf8_lossy(v.as_bytes()));
        let elapsed = start.elapsed();
        let now = std::time::SystemTime::now();
        crate::access_log::write(&crate::access_log::Entry {
            id: &id,
            created_at: now.checked_sub(elapsed).unwrap_or(now),
            // As the metric and the process line name it.
            provider: Some(provider.as_deref().unwrap_or("none")),
            model,
            method: parts.method.as_str(),
            path,
            status_code: status,
            duration: elapsed.as_secs_f64() * 1000.0,
            bytes: http_body::Body::size_hint(resp.body()).exact().unwrap_or(0),
            outcome: if upstream_failed {
                "upstream_error"
            } else {
                "refused"
            },
            cached: false,
            tokens_in: None,
            tokens_out: None,
            cost: None,
            custom_cost: false,
            metadata: metadata.as_deref(),
            step,
            event_id: event_id.as_deref(),
            payloads: error_body.as_ref().map(|error| {
                let request = request_body.unwrap_or_default();
                let max = crate::telemetry::MAX_LOGGED_PAYLOAD;
                crate::access_log::Bodies {
                    request: &request[..request.len().min(max)],
                    request_cut: request.len() > max,
                    response: error.as_bytes(),
                    response_cut: false,
                }
            }),
        });
        resp
    }

    /// The rate limit (which counts the request), the spend limit and the token budget: the
    /// last checks before a request admitted and authenticated goes on, once its path and
    /// gateway headers are checked (those it refuses, and the refusals before, are not
    /// counted). The rate limit's refusal comes first; a request the spend limit or the token
    /// budget refuses is not counted by the rate limit either. `wait` is the request's for
    /// Redis.
    pub(crate) async fn check_limits(
        &self,
        snap: &Snapshot,
        wait: &crate::shared::Wait,
    ) -> Result<(), GatewayError> {
        if let Some(shared) = &snap.shared {
            return self.check_limits_shared(snap, shared, wait).await;
        }
        let limiter = &snap.rate_limiter;
        if let Some(b) = &snap.budgets
            && let Err(refused) = self.ledger.check(b, None, &self.metrics).await
        {
            // Asked without counting: a request refused is not counted.
            if let Some(rl) = &snap.rate_limit
                && let Err(retry_after) = limiter.would_admit(rl, Instant::now())
            {
                return Err(rate_limited(rl, retry_after));
            }
            return Err(refused);
        }
        if let Some(rl) = &snap.rate_limit
            && let Err(retry_after) = limiter.check(rl, Instant::now())
        {
            return Err(rate_limited(rl, retry_after));
        }
        Ok(())
    }

    /// [`Self::check_limits`] with the gateway's Redis: the rate limit, the spend and the token
    /// budget asked at once, one round trip's wait rather than three. Only the rate limit
    /// counts the request (the others read): a request it refuses is charged nowhere, and one
    /// the others refuse is given back (in Redis in the background, as a route's rate node
    /// gives a request back). A global rate limit is counted by this pod's limiter too, which
    /// decides alone while Redis cannot be used.
    async fn check_limits_shared(
        &self,
        snap: &Snapshot,
        shared: &Arc<crate::shared::Shared>,
        wait: &crate::shared::Wait,
    ) -> Result<(), GatewayError> {
        let limiter = &snap.rate_limiter;
        // What the rate limit counted: the window in Redis (a global limit), and when.
        let rate = async {
            let now = Instant::now();
            match &snap.rate_limit {
                Some(rl) if rl.global => {
                    let windows = shared.rate_windows(rl);
                    shared
                        .count(
                            &self.metrics,
                            wait,
                            &windows,
                            rl,
                            limiter,
                            now,
                            crate::telemetry::RedisOp::Limits,
                        )
                        .await
                        .map(|window| Some((Some((windows, window)), now)))
                }
                Some(rl) => limiter.check(rl, now).map(|()| Some((None, now))),
                None => Ok(None),
            }
        };
        let budgets = async {
            match &snap.budgets {
                Some(b) => {
                    self.ledger
                        .check(b, Some((shared, wait)), &self.metrics)
                        .await
                }
                None => Ok(()),
            }
        };
        let (rate, budgets) = tokio::join!(rate, budgets);
        match (&snap.rate_limit, rate) {
            (Some(rl), Err(retry_after)) => Err(rate_limited(rl, retry_after)),
            (Some(rl), Ok(Some((redis, at)))) if budgets.is_err() => {
                if let Some((windows, window)) = redis {
                    shared.uncount(&self.metrics, &windows, rl, window);
                }
                limiter.release(rl, at);
                budgets
            }
            _ => budgets,
        }
    }

    async fn proxy(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        parts: &http::request::Parts,
        body: RequestBody,
        start: Instant,
        seen: &crate::telemetry::Seen,
        held_back: Option<&Arc<crate::telemetry::HeldBack>>,
    ) -> Result<Response<ProxyBody>, (Option<Arc<str>>, GatewayError)> {
        // admit
        let aig = GatewayHeaders::scan(&parts.headers);
        admit_client(aig, &parts.uri, parts.version, self.loopback_listener)
            .map_err(|e| (None, e))?;
        // TRACE (and IIS's TRACK) asks a server to send the request back, the injected key with
        // it; some servers match methods without regard to case.
        if ["TRACE", "TRACK", "CONNECT"]
            .iter()
            .any(|m| parts.method.as_str().eq_ignore_ascii_case(m))
        {
            return Err((
                None,
                GatewayError::RefusedMethod(format!(
                    "method {} is not forwarded to providers",
                    parts.method
                )),
            ));
        }
        let route = route::parse(parts.uri.path()).map_err(|e| (None, e))?;
        if let (Some(want), Some(got)) = (&snap.gateway_name, route.gateway())
            && want != got
        {
            return Err((
                None,
                GatewayError::NotFound(format!("gateway {:?} not found", truncate(got))),
            ));
        }
        let admission = authenticate(snap, aig, &parts.headers).map_err(|e| (None, e))?;
        // An unknown provider is a bad route: refused before the rate limit counts it.
        enum Served<'r> {
            Provider(route::ProviderRoute<'r>, &'r Provider),
            Compat(&'r str),
            Universal,
        }
        let served = match route {
            Route::Provider(p) => {
                let provider = snap.providers.get(p.provider).ok_or_else(|| {
                    (
                        None,
                        GatewayError::NotFound(format!(
                            "unknown provider {:?}",
                            truncate(p.provider)
                        )),
                    )
                })?;
                Served::Provider(p, provider)
            }
            Route::Compat { rest, .. } => Served::Compat(rest),
            Route::Universal { .. } => Served::Universal,
        };
        let mut opts = LogOptions::from_headers(aig, snap.log_requests, snap.log_payloads)
            .map_err(|e| (None, e))?;
        opts.recorded = crate::telemetry::Recorded::to(seen);
        opts.held_back = held_back.cloned();
        if let Some(target) = &snap.otel {
            opts.trace = Some(
                self.otel
                    .trace(target, &parts.headers)
                    .map_err(|e| (None, e))?,
            );
        }
        // What the request has waited for the gateway's Redis (its limits, cache, route nodes).
        let redis_wait = crate::shared::Wait::default();
        let (route, provider) = match served {
            Served::Provider(route, provider) => (route, provider),
            // Each counts the request against the limits once its path and gateway headers are
            // checked ([`Self::check_limits`]).
            Served::Compat(rest) => {
                // Boxed, as the universal endpoint below: inline, their state (~9-11 KiB) would
                // be part of every connection's task, idle ones too, for every route.
                return Box::pin(crate::compat::serve(
                    self,
                    snap,
                    parts,
                    rest,
                    body,
                    start,
                    &opts,
                    admission,
                    &redis_wait,
                ))
                .await;
            }
            Served::Universal => {
                // Each step names its own provider and headers: there is no one provider key
                // header the token could stand in.
                admission
                    .allow_client_key(false, snap, &parts.headers, None)
                    .map_err(|e| (None, e))?;
                // Cloudflare's non-realtime WebSockets API: each message a request to it.
                if crate::websocket::is_upgrade(parts) {
                    return crate::universal::socket::upgrade(self, snap, parts);
                }
                return Box::pin(crate::universal::serve(
                    self,
                    snap,
                    parts,
                    body,
                    start,
                    &opts,
                    &redis_wait,
                ))
                .await;
            }
        };
        let fail = |e: GatewayError| (Some(provider.id.clone()), e);
        let timeout = request_timeout(aig, snap.request_timeout).map_err(fail)?;
        let alias = aig.byok_alias().map_err(fail)?;
        // A stored key drops every client key header, the gateway token among them: which one
        // goes is known from the config (a token is minted only for a request let in).
        let service_account = provider.service_account(alias);
        let chosen = match (service_account, provider.signs_requests()) {
            (None, false) => Some(provider.choose_key(alias).map_err(fail)?),
            _ => None,
        };
        let stored = service_account.is_some() || matches!(chosen, Some(KeyChoice::Stored(_)));
        admission
            .allow_client_key(stored, snap, &parts.headers, parts.uri.query())
            .map_err(fail)?;
        let minted;
        let mut signer = None;
        let key = match (chosen, service_account) {
            (Some(key), _) => key,
            (None, Some(sa)) => {
                minted = sa.token(self).await.map_err(fail)?;
                KeyChoice::Stored(&minted)
            }
            // AWS: the gateway signs with the stored credentials of the alias; without any
            // (and no alias asked for), the client's signature goes through as it is.
            (None, None) => {
                signer = crate::compat::stored_aws_credentials(snap, alias).map_err(fail)?;
                KeyChoice::ClientOwn
            }
        };
        // Only here does a client's own signature go upstream unchanged (see
        // `headers::keeps_accept_encoding`).
        let client_signature = provider.signs_requests() && signer.is_none();
        check_signed_encoding(snap, &parts.headers, client_signature).map_err(fail)?;
        // A WebSocket session (the providers' realtime APIs) is admitted and keyed as any
        // request is, then served by `crate::websocket`.
        let upgrade = crate::websocket::is_upgrade(parts);
        let mut route = route;
        if upgrade {
            route.rest = crate::websocket::upstream_rest(provider, route.rest);
        }
        let uri = provider
            .upstream_uri(
                &route,
                provider.upstream_query(parts.uri.query(), &key).as_deref(),
            )
            .map_err(fail)?;
        // Checked on an upgrade too, as on any request (a malformed value is a 400/2100), though
        // a session is neither cached nor retried.
        let want = cache::want(&snap.cache, aig).map_err(fail)?;
        let retries = snap.retries.with_headers(aig).map_err(fail)?;
        // The route and every header checked: the limits count the request now.
        self.check_limits(snap, &redis_wait).await.map_err(fail)?;
        if upgrade {
            let up = crate::websocket::Upgrade {
                provider,
                route: &route,
                uri,
                held: crate::websocket::HeldKey::of(provider, alias, &key),
                key,
                timeout,
                start,
            };
            return crate::websocket::serve(self, snap, parts, up, &opts).await;
        }

        // body
        let reader = if snap.dlp.checks_requests() || snap.guardrails.checks_prompts() {
            Some("the gateway's request checks (DLP, guardrails)")
        } else if snap.budgets.is_some() {
            // The model's price and a stream's usage request are read from the body.
            Some("the gateway's spend limit and token budget")
        } else {
            None
        };
        if let Some(reader) = reader {
            refuse_compressed_body(&parts.headers, reader).map_err(fail)?;
        }
        // Held until the answer's head is here: the body goes upstream, and stays for retries.
        let mut held = self.buffers.guard(snap.max_buffered);
        let body = read_body(
            &parts.headers,
            body,
            snap.max_body,
            self.client_timeout,
            &mut held,
        )
        .await
        .map_err(fail)?;
        if opts.payloads {
            opts.recorded.request_body(&body);
        }
        let model = match provider.deployment(route.rest) {
            // The deployment decides the model, whatever the body names: priced by its name
            // (as deployments are usually named, or as `spec.pricing` names it).
            Some(deployment) => crate::cost::ModelName::named(deployment),
            None => crate::cost::request_model(provider.api_path(route.rest), &body)
                .or_else(|| crate::cost::form_model(&parts.headers, &body)),
        };
        // A DALL·E image's price depends on the size and quality asked (read before the body
        // goes upstream; no other request is read for them).
        let image_options = model.as_ref().and_then(|m| {
            crate::cost::ImageOptions::of_request(m.as_str(), route.rest, &parts.headers, &body)
        });
        // A refusal from here on (DLP, guardrails, limits) logs it.
        opts.recorded.model(model.as_ref());
        // Spend limits and token budgets count the tokens answers report; an OpenAI-format
        // stream reports none unless asked, so the gateway asks (below).
        let rewrites_usage = snap.budgets.is_some()
            && asks_stream_usage(provider, &parts.method, route.rest, parts.uri.query())
            && crate::headers::body_coding(&parts.headers).is_none();
        // The cache's view of the request (looked up below).
        let lookup = cache::Request {
            scope: "provider",
            provider: &provider.id,
            upstream: provider.upstream(),
            method: parts.method.as_str(),
            path: route.rest,
            query: parts.uri.query(),
            alias: alias.unwrap_or("default"),
            headers: &parts.headers,
            client_auth: (matches!(key, KeyChoice::ClientOwn) && signer.is_none())
                .then_some(provider.client_identity_headers()),
            accept_encoding: crate::headers::keeps_accept_encoding(
                &parts.headers,
                client_signature,
            ),
            body: &body,
            account: provider.route_account(route.account),
        };
        // Guardrails, the cache key (of the body), that rewrite and DLP (for documents in
        // base64) parse the body into a tree, each for a moment (no await holds one): room for
        // it until the last of them.
        let cacheable = want.is_some() && cache::cacheable(&lookup);
        let keyed_by_body = cacheable
            && want
                .as_ref()
                .is_some_and(|w| !w.skip && w.custom_key.is_none());
        // (The markers of a body in UTF-16 or UTF-32 are seen once it is decoded.)
        let dlp_parses = snap.dlp.checks_requests()
            && (crate::text::may_hold_encoded_documents(&body) || crate::text::is_wide_json(&body));
        // Only JSON makes a tree: an upload (multipart, a JSONL file, audio) is read as bytes.
        let parsing = if is_json_document(&body)
            && (snap.guardrails.checks_prompts() || keyed_by_body || rewrites_usage || dlp_parses)
        {
            let mut room = self.buffers.guard(snap.max_buffered);
            room.reserve_parse(&body).map_err(fail)?;
            Some(room)
        } else {
            None
        };

        let dlp_flags = self
            .prompt_checks(snap, &parts.headers, &body)
            .await
            .map_err(fail)?;

        // cache lookup (a refusal from here on says it missed, as an answer would)
        opts.recorded.cache_on(want.is_some());
        let cached = self
            .cache_lookup(
                snap,
                want.as_ref().filter(|_| cacheable),
                &lookup,
                parts,
                start,
                &opts,
                &redis_wait,
                || {},
            )
            .await;
        let mut miss = match cached.into_miss(&dlp_flags) {
            Ok(miss) => miss,
            Err(hit) => return Ok(*hit),
        };

        let logged_body = opts.payloads.then(|| body.clone());
        // Spend limits and token budgets count the tokens answers report; an OpenAI-format
        // stream reports none unless asked, so the gateway asks, and holds the usage chunk out
        // of the client's stream. Without limits the body goes as it came.
        let asked = rewrites_usage
            .then(|| crate::compat::openai::with_stream_usage(&body))
            .flatten();
        drop(parsing);
        let (body, hide_usage) = match asked {
            Some(asked) => (asked, true),
            None => (body, false),
        };
        let kind = crate::background::RequestKind::of(&parts.method, route.rest, &body);

        // dispatch
        let mut upstream = build_upstream_request(
            provider,
            &parts.method,
            &parts.headers,
            uri,
            key,
            body,
            client_signature,
        );
        let auth = match (signer, service_account) {
            (Some(creds), _) => {
                drop_client_signature(&mut upstream);
                let region = bedrock_region(route.rest).to_owned();
                Some(AttemptAuth::Aws(crate::compat::bedrock::SigV4::new(
                    creds, region,
                )))
            }
            (None, Some(sa)) => Some(AttemptAuth::Google { sa, provider }),
            (None, None) => None,
        };
        let event_id = aig.get(Gw::EventId).cloned();
        let waits =
            crate::retry::Waits::direct(timeout, snap.request_timeout, retries.max_attempts);
        let resp = self
            .dispatch(
                upstream,
                auth.as_ref(),
                waits,
                &retries,
                &provider.id,
                |resp| read_passed_on(self, snap, resp),
            )
            .await
            .map_err(fail)?;
        let (mut head, body) = resp.into_parts();
        strip_response_headers(&mut head.headers);
        let hide_usage = hide_usage && head.status.is_success();
        let fill = self.start_fill(snap, &mut head, hide_usage, miss.as_mut(), want.is_some());
        let log_id = tag_response(&mut head.headers, event_id.as_ref());
        crate::dlp::flag(&mut head.headers, &dlp_flags);
        let mut record = RequestRecord::new(
            self.metrics.clone(),
            provider.id.clone(),
            parts.method.clone(),
            route.rest,
            head.status.as_u16(),
            start,
            &opts,
            log_id,
        );
        if let Some(m) = model {
            record.set_model(m, &snap.pricing);
        }
        if let Some(asked) = &image_options {
            record.price_images(asked);
        }
        if &*provider.id == "aws-bedrock" {
            record.bedrock_token_headers(&head.headers);
        }
        record.set_tally(self.tally(snap));
        let counts_tokens = self.count_tokens(snap, provider, kind, &head, &mut record);
        if let Some(b) = &logged_body {
            record.set_request_payload(b);
        }
        // An OpenAI-format chat stream is whole only with its `data: [DONE]`, an Anthropic
        // Messages stream with its `message_stop`: one cut short (its connection ended cleanly
        // mid-answer) or failed in band (Anthropic's `event: error`) is logged as such and never
        // cached.
        let event_stream =
            head.status.is_success() && crate::compat::is_event_stream(&head.headers);
        let end = if !event_stream {
            None
        } else if is_openai_chat(provider, &parts.method, route.rest)
            && provider.ends_streams_with_done()
            && !hide_usage
        {
            Some(crate::compat::sse::DoneWatch::default())
        } else if is_anthropic_messages(provider, &parts.method, route.rest) {
            Some(crate::compat::sse::DoneWatch::message_stop())
        } else {
            None
        };
        let body = if let Some(end) = end {
            ProxyBody::upstream_sse(body, record, end).cached_through(fill)
        } else {
            let hide_usage = hide_usage.then(|| self.buffers.guard(snap.max_buffered));
            answer_body(body, counts_tokens, hide_usage, record, fill)
        };
        Ok(Response::from_parts(head, body))
    }

    /// Readies `record` to count the tokens of the answer (`answer`: its head) to a request of
    /// `kind` to `provider`, on its own route or a universal step; whether its body counts them.
    /// Models are asked with POSTs: the `usage` in other answers (a batch's status, a file's
    /// content, a stored response, a cancelled batch or response, an updated stored completion)
    /// is no tokens spent now, but for a background response's: its create is watched, to be
    /// remembered unfinished, and a poll or cancellation of one remembered is watched, to count
    /// the response's usage once (see [`crate::background`]), priced by `snap`.
    pub(crate) fn count_tokens(
        &self,
        snap: &Arc<Snapshot>,
        provider: &Provider,
        kind: crate::background::RequestKind<'_>,
        answer: &http::response::Parts,
        record: &mut RequestRecord,
    ) -> bool {
        use crate::background::{RequestKind, Watch};
        let events = || crate::compat::is_event_stream(&answer.headers);
        let watch = match kind {
            _ if !answer.status.is_success() => None,
            RequestKind::ModelCall { background: true } => {
                let charge = record.background_charge();
                let (pending, id) = (self.background.clone(), provider.id.clone());
                Some(Watch::create(pending, id, charge, events()))
            }
            RequestKind::Poll(ref id)
                if self.background.knows(&provider.id, id, Instant::now()) =>
            {
                let (pending, provider) = (self.background.clone(), provider.id.clone());
                Some(Watch::poll(pending, provider, id, snap.clone(), events()))
            }
            RequestKind::Delete(ref id) => {
                self.background.claim(&provider.id, id, Instant::now());
                None
            }
            _ => None,
        };
        let counts = kind.is_model_call() || watch.is_some();
        if let Some(watch) = watch {
            record.watch_background(watch);
        }
        if !counts {
            record.usage_not_due();
        }
        counts
    }

    /// Readies the head of an upstream answer (of a successful status when `hide_usage`) for
    /// the client: without its length when its usage chunk is held out, copied into the cache
    /// on a `miss` (the headers as they are now are stored), and marked a miss when the cache
    /// is on (`cache_on`). The fill, for [`answer_body`].
    pub(crate) fn start_fill(
        &self,
        snap: &Snapshot,
        head: &mut http::response::Parts,
        hide_usage: bool,
        miss: Option<&mut cache::Miss>,
        cache_on: bool,
    ) -> Option<(cache::Fill, crate::buffers::Held)> {
        if hide_usage {
            head.headers.remove(header::CONTENT_LENGTH);
        }
        let fill = miss
            .and_then(|m| m.fill(head))
            .map(|f| (f, self.buffers.guard(snap.max_buffered)));
        if cache_on {
            head.headers.insert(cache::STATUS, cache::MISS);
        }
        fill
    }
}

/// An upstream answer as an attempt read it (see [`Gateway::dispatch`]).
pub(crate) enum Read<A> {
    /// All that the attempt waits for of the answer came.
    Answered(A),
    /// The answer broke off before all that the attempt waits for came (why): a failed attempt,
    /// retried as one; the last attempt's is the answer all the same.
    BrokeOff(A, String),
}

impl<A> Read<A> {
    /// The answer, whole or not.
    pub(crate) fn into_answer(self) -> A {
        match self {
            Self::Answered(a) | Self::BrokeOff(a, _) => a,
        }
    }

    /// The answer made into another, read as it was.
    pub(crate) fn map<B>(self, f: impl FnOnce(A) -> B) -> Read<B> {
        match self {
            Self::Answered(a) => Read::Answered(f(a)),
            Self::BrokeOff(a, why) => Read::BrokeOff(f(a), why),
        }
    }
}

/// Whether answers are held back whole until the response checks (DLP, guardrails) read them
/// (see [`Gateway::scan_response`]).
pub(crate) fn holds_answers(snap: &Snapshot) -> bool {
    snap.dlp.checks_responses() || snap.guardrails.checks_responses()
}

/// Reads an upstream answer passed on as it came (see [`Gateway::dispatch`]): no more than its
/// head when its body streams on to the client, where a break can no longer be retried; with
/// response checks, which hold it back whole anyway, whole within its attempt, so that one
/// broken off or stalled before the client got any of it is retried and then fails a fallback
/// step, as a `/compat` answer held back to be translated does. The body read (or why it could
/// not be) goes on as the answer's ([`UpstreamBody::read_whole`]).
pub(crate) async fn read_passed_on(
    gw: &Gateway,
    snap: &Snapshot,
    resp: Response<UpstreamBody>,
) -> Read<Response<UpstreamBody>> {
    if !holds_answers(snap) {
        return Read::Answered(resp);
    }
    let read = HeldAnswer::read(gw, snap.max_buffered, crate::dlp::MAX_RESPONSE_BYTES, resp);
    read.await.map(|HeldAnswer { head, body, held }| {
        Response::from_parts(head, UpstreamBody::read_whole(body, held))
    })
}

/// An upstream answer held back whole: its head, and its body or why it could not be read
/// whole, its bytes taken from the budget of buffered bodies through `held`.
pub(crate) struct HeldAnswer {
    pub(crate) head: http::response::Parts,
    pub(crate) body: Result<Bytes, crate::body::HoldError>,
    pub(crate) held: crate::buffers::Held,
}

impl HeldAnswer {
    /// Reads `resp` whole (at most `limit` bytes) within an attempt: a body that broke off or
    /// stalled before the client got any of it is a failed attempt, retried; one over the
    /// gateway's limits is the answer.
    pub(crate) async fn read(
        gw: &Gateway,
        max_buffered: u64,
        limit: usize,
        resp: Response<UpstreamBody>,
    ) -> Read<Self> {
        let (head, body) = resp.into_parts();
        let mut held = gw.buffers.guard(max_buffered);
        let body = hold_whole(body, limit, Some(&mut held)).await;
        let broke = match &body {
            Err(e) if e.broke_off() => Some(format!(
                "status {}, reading the answer: {e}",
                head.status.as_u16()
            )),
            _ => None,
        };
        let answer = Self { head, body, held };
        match broke {
            Some(why) => Read::BrokeOff(answer, why),
            None => Read::Answered(answer),
        }
    }
}

/// The body of an upstream answer on its way to the client: its usage chunk held out when the
/// gateway asked for it (`hide_usage`: the guard of the budget the event it holds back counts
/// in), logged by `record` (its tokens counted when `counts_tokens`, see
/// [`Gateway::count_tokens`]), copied into the cache by `fill` (from [`Gateway::start_fill`]).
pub(crate) fn answer_body(
    body: UpstreamBody,
    counts_tokens: bool,
    hide_usage: Option<crate::buffers::Held>,
    record: RequestRecord,
    fill: Option<(cache::Fill, crate::buffers::Held)>,
) -> ProxyBody {
    let body = if let Some(held) = hide_usage {
        let filter = Box::new(crate::compat::openai::HiddenUsage::new());
        ProxyBody::translated(body, filter, held, record)
    } else if counts_tokens {
        ProxyBody::upstream(body, record)
    } else {
        ProxyBody::upstream(body, record).without_tokens()
    };
    body.cached_through(fill)
}

impl Gateway {
    /// The checks of a request body before it goes upstream: DLP (`Err` when a `BLOCK` policy
    /// matched, else its flags), then the prompt guardrails. The request's `Content-Type` says
    /// what of the body they read ([`crate::text::request_pieces`]).
    pub(crate) async fn prompt_checks(
        &self,
        snap: &Snapshot,
        headers: &http::HeaderMap,
        body: &Bytes,
    ) -> Result<Vec<crate::dlp::Finding>, GatewayError> {
        let flags = snap
            .dlp
            .scan(body, crate::dlp::Scanned::request(headers))
            .await?;
        if snap.guardrails.checks_prompts() {
            let content_type = headers.get(http::header::CONTENT_TYPE);
            self.guardrails_check(
                snap,
                crate::guardrails::Side::Prompt,
                content_type.map(http::HeaderValue::as_bytes),
                body,
            )
            .await?;
        }
        Ok(flags)
    }
}

/// Whether a passthrough request is an OpenAI-format chat completion of a provider that can be
/// asked for stream usage (`stream_options.include_usage`).
pub(crate) fn asks_stream_usage(
    provider: &Provider,
    method: &http::Method,
    rest: &str,
    query: Option<&str>,
) -> bool {
    is_openai_chat(provider, method, rest)
        && crate::usage::takes_stream_options(&provider.id, rest, query)
}

/// Whether a passthrough request is an OpenAI-format chat completion (whose stream ends with
/// `data: [DONE]`).
fn is_openai_chat(provider: &Provider, method: &http::Method, rest: &str) -> bool {
    provider.format == sidegate_crds::policy::ApiFormat::Openai
        && method == http::Method::POST
        && rest.trim_end_matches('/').ends_with("chat/completions")
}

fn is_anthropic_messages(provider: &Provider, method: &http::Method, rest: &str) -> bool {
    provider.format == sidegate_crds::policy::ApiFormat::Anthropic
        && method == http::Method::POST
        && rest.trim_end_matches('/').ends_with("v1/messages")
}

/// What produced an answer: its provider, model and, for a dynamic route, the step.
struct ServedBy {
    provider: Arc<str>,
    model: Option<crate::cost::ModelName>,
    step: Option<u32>,
}

impl ServedBy {
    /// What produced a cached answer: the target a dynamic route landed on, as the headers
    /// stored with it say; else the provider and model of the request (`req`).
    fn of_hit(snap: &Snapshot, req: &cache::Request<'_>, stored: &http::HeaderMap) -> Self {
        let named = |h: &HeaderName| stored.get(h).and_then(|v| v.to_str().ok());
        let id = named(&SERVED_PROVIDER).unwrap_or(req.provider);
        let provider = snap
            .providers
            .get(id)
            .map_or_else(|| Arc::from(id), |p| p.id.clone());
        let model = match named(&SERVED_MODEL) {
            Some(m) => Some(crate::cost::ModelName::new(m)),
            None => crate::cost::request_model(req.path, req.body).map(|m| {
                // `/compat` names `{provider}/{model}`; its lines name the model alone.
                match m.as_str().strip_prefix(req.provider) {
                    Some(rest) if req.scope == "compat" && rest.starts_with('/') => {
                        crate::cost::ModelName::new(&rest[1..])
                    }
                    _ => m,
                }
            }),
        };
        let step = named(&SERVED_STEP).and_then(|s| s.parse().ok());
        Self {
            provider,
            model,
            step,
        }
    }
}

/// The refusal of `spec.rateLimit` `rl`, to retry after `retry_after`.
fn rate_limited(rl: &crate::ratelimit::Settings, retry_after: Duration) -> GatewayError {
    GatewayError::RateLimited {
        limit: rl.limit,
        interval: rl.interval,
        retry_after,
    }
}

/// The provider (when the route names a known one) and the path a refused request's log line
/// names, as a served request's would, without a leading `/`: the provider path of a
/// passthrough, `compat/...` for the unified endpoint, `{provider}/...` for an unknown provider,
/// nothing for the universal endpoint (each after a long form's `v1/{account}/{gateway}/`),
/// else the path as requested.
fn refused_route<'p>(snap: &Snapshot, path: &'p str) -> (Option<Arc<str>>, &'p str) {
    match route::parse(path) {
        Ok(Route::Provider(p)) => match snap.providers.get(p.provider) {
            Some(provider) => (Some(provider.id.clone()), p.rest),
            None => {
                // `rest` ends the path; `{provider}/` comes before it.
                let head = path[..path.len() - p.rest.len()].trim_end_matches('/');
                (None, &path[head.len() - p.provider.len()..])
            }
        },
        Ok(Route::Compat { rest, .. }) => {
            // `rest` ends the path; `compat/` comes before it.
            let head = &path[..path.len() - rest.len()];
            (None, head.rfind("compat").map_or(path, |i| &path[i..]))
        }
        Ok(Route::Universal { .. }) => (None, ""),
        Err(_) => (None, path.trim_start_matches('/')),
    }
}

/// Marks the gateway's refusal of a request the response cache was on for, once it was looked
/// up (see [`crate::telemetry::Seen::cache_on`]): `cf-aig-cache-status: MISS`, as an answer.
pub(crate) fn say_cache_missed(resp: &mut Response<ProxyBody>, opts: &LogOptions<'_>) {
    if opts.recorded.cache_was_on() {
        resp.headers_mut().insert(cache::STATUS, cache::MISS);
    }
}

/// Adds the gateway's headers of every response it forwards (`cf-aig-event-id` echoed, a new
/// `cf-aig-log-id`: the request's, see [`crate::log_id::scope`]) and returns the log id.
pub(crate) fn tag_response(
    headers: &mut http::HeaderMap,
    event_id: Option<&HeaderValue>,
) -> String {
    let log_id = crate::log_id::for_request();
    tag_response_with(headers, event_id, &log_id);
    log_id
}

/// [`tag_response`] with the log id `log_id`.
fn tag_response_with(headers: &mut http::HeaderMap, event_id: Option<&HeaderValue>, log_id: &str) {
    if let Some(id) = event_id {
        headers.insert(EVENT_ID, id.clone());
    }
    if let Ok(v) = HeaderValue::from_str(log_id) {
        headers.insert(LOG_ID, v);
    }
}

/// Status logged for a request dropped before it had an answer (nginx's "client closed
/// request").
const CLIENT_CLOSED: u16 = 499;

/// A request waiting for its answer. Dropped while armed and before any record of the request
/// was made (`seen`), the request was given up before the gateway answered it (the client
/// left, or the shutdown grace ended, while it waited on the provider, a retry, the cache): it
/// is counted and logged as cancelled with status 499, as an answer cut short is, instead of
/// vanishing. (A record made already logs itself as cancelled when dropped.)
struct Unanswered<'a> {
    gw: &'a Gateway,
    snap: &'a Snapshot,
    parts: &'a http::request::Parts,
    start: Instant,
    seen: &'a crate::telemetry::Seen,
    armed: bool,
    log_id: Arc<str>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed || self.seen.recorded() {
            return;
        }
        let aig = GatewayHeaders::scan(&self.parts.headers);
        // The headers were good enough to get this far; should one not be, the line goes
        // without what it would have added.
        let opts = LogOptions::from_headers(aig, self.snap.log_requests, self.snap.log_payloads)
            .unwrap_or_else(|_| LogOptions {
                log: self.snap.log_requests,
                ..LogOptions::default()
            });
        let (provider, path) = refused_route(self.snap, self.parts.uri.path());
        let provider = provider.or_else(|| self.seen.provider().cloned());
        let mut record = RequestRecord::new(
            self.gw.metrics.clone(),
            provider.unwrap_or_else(|| Arc::from("none")),
            self.parts.method.clone(),
            path,
            CLIENT_CLOSED,
            self.start,
            &opts,
            self.log_id.to_string(),
        );
        if let Some(model) = self.seen.model_name() {
            record.set_model(model.clone(), &self.snap.pricing);
        }
        // An unfinished record logs itself as cancelled.
        drop(record);
    }
}

/// How a request passed the gateway's authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Authentication is off.
    Open,
    /// A gateway token in `cf-aig-authorization`.
    Token,
    /// No `cf-aig-authorization`, but a gateway token in a provider key header (`Authorization:
    /// Bearer`, `x-api-key`, `x-goog-api-key`, `api-key`), as Cloudflare's stored-key SDK
    /// examples send it (`apiKey: "{cf_aig_token}"`). Good only for a request whose provider
    /// key the gateway replaces with a stored one, so that the token never goes upstream.
    ClientKeyHeader,
}

impl Admission {
    /// Refuses (401/2009) a request whose provider key headers, or the `key` parameter of the
    /// `query` that goes upstream (Google's API key parameter), hold a gateway token unless the
    /// gateway replaces them with stored credentials (`stored`): the token must never go
    /// upstream as the client's own key. Looked for only then, with authentication on.
    pub(crate) fn allow_client_key(
        self,
        stored: bool,
        snap: &Snapshot,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<(), GatewayError> {
        let refused = match self {
            _ if stored => false,
            Self::Open => false,
            Self::Token => {
                token_in_key_header(snap, headers).is_some() || token_in_key_param(snap, query)
            }
            Self::ClientKeyHeader => true,
        };
        if refused {
            Err(GatewayError::Unauthorized)
        } else {
            Ok(())
        }
    }
}

/// The gateway token a provider key header of the request holds (as a bearer token or bare):
/// any header a configured provider takes a key in, custom providers' own among them.
pub(crate) fn token_in_key_header<'h>(
    snap: &Snapshot,
    headers: &'h http::HeaderMap,
) -> Option<&'h [u8]> {
    (snap.providers.key_headers().iter())
        .flat_map(|name| headers.get_all(name))
        .map(|v| crate::headers::bearer_token(v.as_bytes()).unwrap_or(v.as_bytes()))
        .find(|t| snap.keys.is_token(t))
}

/// Whether a query's `key` parameter (Google's API key parameter) holds a gateway token.
fn token_in_key_param(snap: &Snapshot, query: Option<&str>) -> bool {
    (query.into_iter().flat_map(|q| q.split('&')))
        .filter_map(|p| p.strip_prefix("key="))
        .any(|v| {
            snap.keys
                .is_token(crate::cost::percent_decode(v).as_bytes())
        })
}

/// Checks the gateway token when authentication is on: `cf-aig-authorization` when the request
/// has one (a wrong token there is refused whatever else it carries, and so is a repeated
/// header), else a provider key header. Tokens are compared in constant time and never quoted.
fn authenticate(
    snap: &Snapshot,
    aig: GatewayHeaders<'_>,
    headers: &http::HeaderMap,
) -> Result<Admission, GatewayError> {
    if !snap.auth_required {
        return Ok(Admission::Open);
    }
    if let Some(v) = aig.get(Gw::Authorization) {
        return if snap.keys.token_matches(v.as_bytes()) && !aig.token_repeated() {
            Ok(Admission::Token)
        } else {
            Err(GatewayError::Unauthorized)
        };
    }
    if token_in_key_header(snap, headers).is_some() {
        Ok(Admission::ClientKeyHeader)
    } else {
        Err(GatewayError::Unauthorized)
    }
}

/// Refuses what a web page asks of the gateway. A page may send requests to any address, the
/// developer's loopback included (CSRF: a `text/plain` POST needs no permission), and by DNS
/// rebinding even read the answers (its own name made to resolve to 127.0.0.1); either would
/// spend the stored keys. Server-side clients send no browser marks, and on a loopback listener
/// (`loopback`) they name it by address or as `localhost`.
fn admit_client(
    aig: GatewayHeaders<'_>,
    uri: &http::Uri,
    version: http::Version,
    loopback: bool,
) -> Result<(), GatewayError> {
    // Which of two a checker reads and which one a server obeys may differ; an HTTP/1.1
    // request has exactly one (RFC 9112 §3.2; HTTP/2 names its authority in `:authority`).
    if aig.host_repeated() || (version == http::Version::HTTP_11 && aig.host().is_none()) {
        return Err(GatewayError::BadHeader {
            name: "host",
            reason: "an HTTP/1.1 request carries exactly one".into(),
        });
    }
    if aig.from_web_page() {
        return Err(GatewayError::Forbidden(
            "requests from web pages (Origin, Sec-Fetch-Site) are refused: the gateway holds provider keys; call it from server-side code".into(),
        ));
    }
    if !loopback {
        return Ok(());
    }
    let named = [
        aig.host().map(HeaderValue::as_bytes),
        uri.authority().map(|a| a.as_str().as_bytes()),
    ];
    match named
        .into_iter()
        .flatten()
        .find(|h| !crate::headers::is_local_authority(h))
    {
        None => Ok(()),
        Some(host) => Err(GatewayError::Forbidden(format!(
            "host {:?} is refused: this gateway listens on loopback and answers to its address or localhost only",
            truncate(&String::from_utf8_lossy(host))
        ))),
    }
}

/// `cf-aig-request-timeout` (milliseconds) or the gateway default.
pub(crate) fn request_timeout(
    headers: GatewayHeaders<'_>,
    default: Duration,
) -> Result<Duration, GatewayError> {
    let Some(v) = headers.get(Gw::RequestTimeout) else {
        return Ok(default);
    };
    let ms = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|ms| (1..=3_600_000).contains(ms))
        .ok_or_else(|| GatewayError::BadHeader {
            name: "cf-aig-request-timeout",
            reason: "expected milliseconds between 1 and 3600000".into(),
        })?;
    Ok(Duration::from_millis(ms))
}

/// Reads the whole request body, refusing more than `limit` bytes, a client that sends no
/// part of it for `idle`, or a body the budget of buffered bodies has no room for: its bytes
/// are taken through `held` as they arrive (a declared length with no room is refused before
/// any of it is read), and stay taken until `held` drops.
pub(crate) async fn read_body(
    headers: &http::HeaderMap,
    body: RequestBody,
    limit: u64,
    idle: Duration,
    held: &mut crate::buffers::Held,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    if let Some(n) = declared {
        held.check_room(n)
            .map_err(crate::buffers::BudgetExhausted::into_gateway_error)?;
    }
    // Most bodies arrive as one frame: that frame is the body, with no copy and no list.
    let mut body = body;
    let mut whole: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0u64;
    loop {
        // A body that came with its head is there at once: only a wait arms a timer.
        let next = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(next) => next,
            None => tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| GatewayError::BodyStalled {
                    secs: idle.as_secs(),
                })?,
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| match e {
            crate::body::RequestBodyError::Stalled => GatewayError::BodyStalled {
                secs: idle.as_secs(),
            },
            e => GatewayError::BadBody(e.to_string()),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len() as u64;
        if len > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        held.grow(data.len() as u64)
            .map_err(crate::buffers::BudgetExhausted::into_gateway_error)?;
        match (&mut joined, whole.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => whole = Some(data),
            (None, Some(first)) => {
                // Allocated once for a declared length, not doubled up to it (up to a bound:
                // the declaration is the client's word, its bytes are what count).
                let size = declared.map_or(0, crate::buffers::presize);
                let mut buf = bytes::BytesMut::with_capacity(size.max(first.len() + data.len()));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(match joined {
        Some(buf) => buf.freeze(),
        None => whole.unwrap_or_default(),
    })
}

/// Whether `body` may be one JSON document (an object or an array), the only bodies the
/// gateway parses into a tree.
fn is_json_document(body: &[u8]) -> bool {
    matches!(body.trim_ascii_start().first(), Some(b'{' | b'['))
        || crate::text::is_wide_json(body)
        || crate::text::starts_like_json(body)
}

/// Refuses a request body sent compressed (`Content-Encoding` other than `identity`) where
/// `reader` must read it: checks that scanned the compressed bytes would find nothing.
pub(crate) fn refuse_compressed_body(
    client_headers: &http::HeaderMap,
    reader: &str,
) -> Result<(), GatewayError> {
    match crate::headers::body_coding(client_headers) {
        None => Ok(()),
        Some(coding) => Err(GatewayError::BadBody(format!(
            "it is compressed (Content-Encoding: {}), and {reader} must read it uncompressed; send it without Content-Encoding",
            truncate(coding)
        ))),
    }
}

/// Refuses a request whose own SigV4 signature goes upstream (`client_signature`) and covers an
/// `Accept-Encoding` that lets the provider compress its answer, when the gateway must read
/// answers (DLP or guardrail response checks, spend and token limits): it cannot change a
/// signed header, and a compressed answer would pass those unread.
pub(crate) fn check_signed_encoding(
    snap: &Snapshot,
    client_headers: &http::HeaderMap,
    client_signature: bool,
) -> Result<(), GatewayError> {
    let reads_answers =
        snap.dlp.checks_responses() || snap.guardrails.checks_responses() || snap.budgets.is_some();
    if !reads_answers || !crate::headers::keeps_accept_encoding(client_headers, client_signature) {
        return Ok(());
    }
    match crate::headers::accepts_compression(client_headers) {
        None => Ok(()),
        Some(coding) => Err(GatewayError::BadHeader {
            name: "accept-encoding",
            reason: format!(
                "the request's own signature covers Accept-Encoding: {}, and this gateway reads answers (DLP or guardrail response checks, spend or token limits), which must come uncompressed; sign Accept-Encoding: identity or leave it unsigned",
                truncate(coding)
            ),
        }),
    }
}

/// The request to the provider: the client's method and headers (less gateway and hop-by-hop
/// ones, and its provider auth when a stored key replaces it), `uri` and `body`.
/// `client_signature`: the client's own SigV4 signature goes upstream unchanged (aws-bedrock
/// without stored credentials), so the headers it covers do too.
pub(crate) fn build_upstream_request(
    provider: &Provider,
    method: &http::Method,
    client_headers: &http::HeaderMap,
    uri: http::Uri,
    key: KeyChoice<'_>,
    body: Bytes,
    client_signature: bool,
) -> Request<Full<Bytes>> {
    let drop = provider.dropped_headers(matches!(key, KeyChoice::Stored(_)));
    let mut headers = upstream_request_headers(client_headers, drop, client_signature);
    if let (KeyChoice::Stored(value), Some(name)) = (key, provider.auth_header()) {
        headers.insert(name.clone(), value.header().clone());
    }
    for (name, value) in provider.default_headers() {
        if !headers.contains_key(*name) {
            headers.insert(*name, HeaderValue::from_static(value));
        }
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// Query parameters of a SigV4 signature made in the query (a presigned URL), as AWS reads
/// their names: in any case.
const AWS_SIGNATURE_PARAMS: &[&str] = &[
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
    "x-amz-signature",
    "x-amz-security-token",
];

/// Readies `req` for the gateway's signature with stored AWS credentials: drops any signature
/// the client made, in its headers or its query (AWS refuses a request signed twice, and the
/// client's credential scope is not the gateway's to send), and every other provider key header
/// it sent (AWS reads none; a gateway token or another provider's key must not go there, signed
/// in).
pub(crate) fn drop_client_signature(req: &mut Request<Full<Bytes>>) {
    let headers = req.headers_mut();
    for h in AWS_SIGNATURE_HEADERS {
        headers.remove(*h);
    }
    for h in &crate::providers::CLIENT_KEY_HEADERS {
        headers.remove(h);
    }
    let Some(query) = req.uri().query() else {
        return;
    };
    let signature_param = |p: &&str| {
        let name = p.split('=').next().unwrap_or_default();
        let name = crate::cost::percent_decode(name);
        AWS_SIGNATURE_PARAMS
            .iter()
            .any(|s| name.eq_ignore_ascii_case(s))
    };
    if !query.split('&').any(|p| signature_param(&p)) {
        return;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !signature_param(p)).collect();
    let mut path_and_query = req.uri().path().to_owned();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = req.uri().clone().into_parts();
    // Made of the parts of a valid URI, less some of its query: valid too.
    if let Ok(pq) = http::uri::PathAndQuery::try_from(path_and_query) {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// The region of an `aws-bedrock` route after the provider, `bedrock-runtime/{region}/...`
/// (checked by `upstream_uri`).
pub(crate) fn bedrock_region(rest: &str) -> &str {
    rest.split('/').nth(1).unwrap_or_default()
}

/// Credentials the gateway makes for each attempt of an upstream request as it is sent, not
/// once for all its attempts, as the AWS SDKs and google-auth-library do: a SigV4 signature is
/// dated, and a minted token may be renewed meanwhile (a retry may follow an attempt that
/// waited out its whole timeout).
pub(crate) enum AttemptAuth<'a> {
    /// A SigV4 signature with stored AWS credentials.
    Aws(crate::compat::bedrock::SigV4),
    /// A token minted from a Google service account, in `provider`'s auth header.
    Google {
        sa: &'a crate::google_auth::ServiceAccount,
        provider: &'a Provider,
    },
}

impl AttemptAuth<'_> {
    /// Puts the credentials into `req`, replacing the ones it had.
    async fn apply(
        &self,
        gw: &Gateway,
        req: &mut Request<Full<Bytes>>,
    ) -> Result<(), GatewayError> {
        match self {
            AttemptAuth::Aws(sigv4) => sigv4.sign(req),
            AttemptAuth::Google { sa, provider } => {
                // Boxed: the exchange is a request of its own, and `dispatch`'s future, which
                // holds this one, is that of every request.
                let token = Box::pin(sa.token(gw)).await?;
                let headers = req.headers_mut();
                for name in provider.auth_headers() {
                    headers.remove(name);
                }
                if let Some(name) = provider.auth_header() {
                    headers.insert(name.clone(), token.header().clone());
                }
                Ok(())
            }
        }
    }
}

/// A copy of an upstream request for another attempt (the body is shared, not copied).
fn clone_request(r: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut c = Request::new(r.body().clone());
    *c.method_mut() = r.method().clone();
    *c.uri_mut() = r.uri().clone();
    *c.version_mut() = r.version();
    *c.headers_mut() = r.headers().clone();
    c
}

/// An error and its sources on one line (hyper's top-level message alone says little).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_request_logs_its_path_as_a_served_one_without_a_leading_slash() {
        let src = crate::config::Sources {
            config: "gateway.yaml".into(),
            keys_dir: None,
        };
        let snap = crate::config::load_with(&src, b"schemaVersion: 1\nspec: {}\n".to_vec())
            .expect("config");
        let cases = [
            (
                "/openai/chat/completions",
                Some("openai"),
                "chat/completions",
            ),
            (
                "/v1/acct/gw/openai/chat/completions",
                Some("openai"),
                "chat/completions",
            ),
            ("/compat/chat/completions", None, "compat/chat/completions"),
            ("/nowhere/x", None, "nowhere/x"),
            ("/v1/acct/gw/nowhere/x", None, "nowhere/x"),
            ("/nowhere", None, "nowhere"),
            ("/", None, ""),
            ("/v1/acct/gw", None, ""),
            ("//x", None, "x"),
        ];
        for (path, provider, logged) in cases {
            let (p, l) = refused_route(&snap, path);
            assert_eq!((p.as_deref(), l), (provider, logged), "{path}");
        }
    }

    #[test]
    fn the_clients_signature_goes_from_the_query_as_from_the_headers() {
        let req = |uri: &str| {
            let mut r = Request::new(Full::new(Bytes::new()));
            *r.uri_mut() = uri.parse().expect("uri");
            r.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("AWS4-HMAC-SHA256 x"),
            );
            r.headers_mut()
                .insert("x-amz-date", HeaderValue::from_static("20260101T000000Z"));
            r
        };
        let host = "https://bedrock-runtime.us-east-1.amazonaws.com/async-invoke";
        let mut r = req(&format!(
            "{host}?maxResults=10&X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-credential=K%2F20260101%2Fus-east-1%2Fbedrock%2Faws4_request\
             &X-AMZ-DATE=20260101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X%2DAmz-Signature=00\
             &X-Amz-Security-Token=t&sortOrder=Descending&X-Amz-Meta=kept"
        ));
        drop_client_signature(&mut r);
        assert_eq!(
            r.uri().to_string(),
            format!("{host}?maxResults=10&sortOrder=Descending&X-Amz-Meta=kept")
        );
        assert!(r.headers().is_empty());
        let mut r = req(&format!("{host}?X-Amz-Signature=00"));
        drop_client_signature(&mut r);
        assert_eq!(r.uri().to_string(), host);
        let mut r = req(&format!("{host}?statusEquals=Completed"));
        drop_client_signature(&mut r);
        assert_eq!(
            r.uri().to_string(),
            format!("{host}?statusEquals=Completed")
        );
    }

    #[test]
    fn request_timeout_header_is_milliseconds_within_bounds() {
        let mut h = http::HeaderMap::new();
        let d = Duration::from_secs(7);
        assert_eq!(request_timeout(GatewayHeaders::scan(&h), d), Ok(d));
        h.insert(Gw::RequestTimeout.name(), HeaderValue::from_static("250"));
        assert_eq!(
            request_timeout(GatewayHeaders::scan(&h), d),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0", "-5", "soon", "3600001"] {
            h.insert(Gw::RequestTimeout.name(), HeaderValue::from_static(bad));
            assert_eq!(
                request_timeout(GatewayHeaders::scan(&h), d).map_err(|e| e.code()),
                Err(2100),
                "{bad}"
            );
        }
    }
}
