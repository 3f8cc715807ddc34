//! The universal endpoint (`POST /`, long form `POST /v1/{account}/{gateway}`): a JSON array of
//! steps, each one provider request, tried in order until one answers with a success status.
//! The answer of the step that served — or of the last step, whatever it is — goes to the client
//! unchanged, with `cf-aig-step: <index>`, `cf-aig-provider` and (when the step names one)
//! `cf-aig-model`. A step is
//! `{"provider", "endpoint", "headers", "query", "config": {"requestTimeout", "maxAttempts",
//! "retryDelay", "backoff"}}`: `endpoint` is the provider path (as after `/{provider}/`),
//! `query` the JSON body, `headers` the provider headers (a stored key still replaces the auth
//! header), and `config` overrides timeout and retries for that step.
//!
//! A step whose `provider` is `compat` is a request to `/compat` (Cloudflare's unified API):
//! `endpoint` is `chat/completions` (or Cloudflare's `chat/completion`) or `embeddings`, `query`
//! the OpenAI-format body whose `model` is `{provider}/{model}`, `dynamic/{route}` or
//! `fallback/{chain}`; it is served by [`crate::compat::answer`] (translation, the route's own
//! fallbacks, retries, cache, log), and a failed answer that a step follows (non-2xx, or held
//! back to be translated and broken off or untranslatable) is dropped before anything is
//! logged, charged or stored for it, as a provider step's is.
//!
//! With the cache on, each step is looked up when it is reached and its answer stored, keyed as
//! a request to its provider would be (endpoint, body, alias or the step's own credentials, the
//! headers that change the answer) in a scope of the step's index: a hit answers as the step
//! did, with its `cf-aig-step`, and the steps after it are not tried.
//!
//! [`socket`] serves it over a WebSocket too (Cloudflare's non-realtime WebSockets API), each
//! message one request.

pub(crate) mod socket;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::Full;

use crate::body::{ProxyBody, RequestBody};
use crate::cache;
use crate::compat::{self, CompatRequest, Served, UniversalStep};
use crate::config::Snapshot;
use crate::error::{GatewayError, json_error, truncate};
use crate::headers::{GatewayHeaders, Gw, strip_response_headers};
use crate::providers::{KeyChoice, Provider};
use crate::proxy::{self, Admission, Gateway};
use crate::retry::{self, Policy};
use crate::route::ProviderRoute;
use crate::telemetry::{LogOptions, RequestRecord};

/// Most steps in one request.
const MAX_STEPS: usize = 16;
/// The cache scope of each step index: a step's answers are stored apart from its provider's
/// own route, and from the other indexes (a hit repeats the `cf-aig-step` stored with it).
const SCOPES: [&str; MAX_STEPS] = [
    "universal/0",
    "universal/1",
    "universal/2",
    "universal/3",
    "universal/4",
    "universal/5",
    "universal/6",
    "universal/7",
    "universal/8",
    "universal/9",
    "universal/10",
    "universal/11",
    "universal/12",
    "universal/13",
    "universal/14",
    "universal/15",
];
const STEP: HeaderName = HeaderName::from_static("cf-aig-step");
const PROVIDER: HeaderName = HeaderName::from_static("cf-aig-provider");
const MODEL: HeaderName = HeaderName::from_static("cf-aig-model");
/// The `provider` of a step served by `/compat`.
const COMPAT: &str = "compat";

type Failure = (Option<Arc<str>>, GatewayError);

/// One step as the client wrote it, read field by field ([`Step::read`]): a step is an object,
/// and a field of the wrong type is refused naming it, in JSON's words.
#[derive(Debug)]
struct Step {
    provider: String,
    endpoint: String,
    /// The `Authorization` header of the step (Cloudflare's field), unless `headers` has one.
    authorization: Option<String>,
    /// Headers of the step: sent upstream, but its `cf-aig-*` ones, which override the
    /// request's for this step.
    headers: BTreeMap<String, String>,
    query: serde_json::Value,
    config: StepConfig,
}

#[derive(Debug, Default)]
struct StepConfig {
    request_timeout: Option<u64>,
    max_attempts: Option<u32>,
    retry_delay: Option<u64>,
    backoff: Option<String>,
}

/// The fields of a step, in the order messages list them.
const STEP_FIELDS: &str = "provider, endpoint, authorization, headers, query, config";
/// The fields of a step's `config`.
const CONFIG_FIELDS: &str = "requestTimeout, maxAttempts, retryDelay, backoff";

/// What a JSON value is, as a message names it.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Step {
    /// Step `i` of the list: an object of [`STEP_FIELDS`], each of its type. (Not serde's
    /// derive: it reads a struct from an array too, by position, and its messages name
    /// neither the field nor anything but Rust types.)
    fn read(i: usize, value: serde_json::Value) -> Result<Self, GatewayError> {
        let serde_json::Value::Object(mut fields) = value else {
            return Err(bad(format!(
                "steps[{i}]: expected an object ({STEP_FIELDS}), got {}",
                json_kind(&value)
            )));
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !STEP_FIELDS.split(", ").any(|f| f == *k))
        {
            return Err(bad(format!(
                "steps[{i}]: unknown field `{}`, expected one of {STEP_FIELDS}",
                truncate(unknown)
            )));
        }
        let wrong = |field: &str, expected: &str, got: &serde_json::Value| {
            bad(format!(
                "steps[{i}].{field}: expected {expected}, got {}",
                json_kind(got)
            ))
        };
        let mut string = |field: &'static str| match fields.remove(field) {
            None => Err(bad(format!("steps[{i}]: missing field `{field}`"))),
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(wrong(field, "a string", &other)),
        };
        let provider = string("provider")?;
        let endpoint = string("endpoint")?;
        let authorization = match fields.remove("authorization") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => return Err(wrong("authorization", "a string", &other)),
        };
        let headers = match fields.remove("headers") {
            None => BTreeMap::new(),
            Some(serde_json::Value::Object(map)) => map
                .into_iter()
                .map(|(name, value)| match value {
                    serde_json::Value::String(v) => Ok((name, v)),
                    other => Err(bad(format!(
                        "steps[{i}].headers.{}: expected a string, got {}",
                        truncate(&name),
                        json_kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(wrong(
                    "headers",
                    "an object of header names and string values",
                    &other,
                ));
            }
        };
        let query = fields
            .remove("query")
            .ok_or_else(|| bad(format!("steps[{i}]: missing field `query`")))?;
        let config = match fields.remove("config") {
            None => StepConfig::default(),
            Some(serde_json::Value::Object(c)) => StepConfig::read(i, c)?,
            Some(other) => {
                return Err(wrong(
                    "config",
                    &format!("an object ({CONFIG_FIELDS})"),
                    &other,
                ));
            }
        };
        Ok(Self {
            provider,
            endpoint,
            authorization,
            headers,
            query,
            config,
        })
    }
}

impl StepConfig {
    /// The `config` of step `i`: [`CONFIG_FIELDS`], each unset when absent or `null`.
    fn read(
        i: usize,
        mut fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, GatewayError> {
        if let Some(unknown) = fields
            .keys()
            .find(|k| !CONFIG_FIELDS.split(", ").any(|f| f == *k))
        {
            return Err(bad(format!(
                "steps[{i}].config: unknown field `{}`, expected one of {CONFIG_FIELDS}",
                truncate(unknown)
            )));
        }
        let mut number = |field: &str, what: &str| match fields.remove(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                let got = match &v {
                    serde_json::Value::Number(_) => "a negative or fractional number",
                    other => json_kind(other),
                };
                bad(format!(
                    "steps[{i}].config.{field}: expected {what}, got {got}"
                ))
            }),
        };
        let request_timeout = number("requestTimeout", "a whole number of milliseconds")?;
        // Past u32, it is out of the range `check_config` refuses anyway.
        let max_attempts = number("maxAttempts", "a whole number of attempts")?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let retry_delay = number("retryDelay", "a whole number of milliseconds")?;
        let backoff = match fields.remove("backoff") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => {
                return Err(bad(format!(
                    "steps[{i}].config.backoff: expected a string (constant, linear or exponential), got {}",
                    json_kind(&other)
                )));
            }
        };
        Ok(Self {
            request_timeout,
            max_attempts,
            retry_delay,
            backoff,
        })
    }
}

/// A step checked and ready to be tried.
enum Plan<'a> {
    /// A request to one provider.
    Provider(Box<Planned<'a>>),
    /// A request to `/compat`.
    Compat(Box<CompatStep>),
}

/// A `compat` step checked and ready to be served by `/compat`.
struct CompatStep {
    endpoint: compat::Endpoint,
    /// Its `query`, serialized.
    body: Bytes,
    /// `POST`, the request's path (its long-form account) with the endpoint's query, and the
    /// step's own headers (its `config` among them, as gateway headers).
    parts: http::request::Parts,
}

/// A step checked and ready to send.
struct Planned<'a> {
    provider: &'a Provider,
    endpoint: String,
    request: Request<Full<Bytes>>,
    /// Credentials made for each attempt as it is sent, as on the provider's own route (a
    /// token from a Google service account, a signature with stored AWS credentials); `None`:
    /// the stored key is in the request already, or the step's own headers go.
    auth: Option<proxy::AttemptAuth<'a>>,
    timeout: Duration,
    retries: Policy,
    /// The model the step names (in its endpoint or its `query`), for cost.
    model: Option<crate::cost::ModelName>,
    /// The body the step sends (its `query`): the request payload logged for it — not the
    /// universal request's, whose steps may carry the client's provider keys in `headers`.
    payload: Bytes,
    /// The gateway asked an OpenAI-format stream for its usage, which the client did not.
    hide_usage: bool,
    /// The query string of the step's `endpoint`.
    query: Option<String>,
    /// The step's own `headers`: those that change the answer, and the client's credentials
    /// when they go upstream, are part of its cache key.
    headers: HeaderMap,
    /// The client's credentials go upstream (no stored key, no gateway signature or token).
    client_own: bool,
    /// The stored key's alias the step uses (its own `cf-aig-byok-alias`, else the request's).
    alias: Option<String>,
    /// The step's `Accept-Encoding` goes upstream (its own signature covers it).
    accept_encoding: bool,
    /// The long-form URL's account, when it goes into the step's upstream URL.
    account: Option<&'a str>,
}

fn bad(message: String) -> GatewayError {
    GatewayError::UniversalRequest(message)
}

/// Serves `POST /`; `redis_wait` is the request's for the gateway's Redis.
pub(crate) async fn serve(
    gw: &Gateway,
    snap: &Arc<Snapshot>,
    parts: &http::request::Parts,
    body: RequestBody,
    start: Instant,
    opts: &LogOptions<'_>,
    redis_wait: &crate::shared::Wait,
) -> Result<Response<ProxyBody>, Failure> {
    let none = |e: GatewayError| (None, e);
    if parts.method != Method::POST {
        return Err(none(GatewayError::NotFound(format!(
            "{} / not found: the universal endpoint is POST / with a JSON array of steps",
            parts.method
        ))));
    }
    let aig = GatewayHeaders::scan(&parts.headers);
    // The request's gateway headers are checked before its body is read; each step may
    // override them with its own (`plan`). Then the request counts against the limits: one
    // refused for its path or a header does not.
    proxy::request_timeout(aig, snap.request_timeout).map_err(none)?;
    cache::want(&snap.cache, aig).map_err(none)?;
    snap.retries.with_headers(aig).map_err(none)?;
    aig.byok_alias().map_err(none)?;
    gw.check_limits(snap, redis_wait).await.map_err(none)?;
    proxy::refuse_compressed_body(&parts.headers, "the universal endpoint").map_err(none)?;
    let mut held = gw.buffers.guard(snap.max_buffered);
    let raw = proxy::read_body(
        &parts.headers,
        body,
        snap.max_body,
        gw.client_timeout,
        &mut held,
    )
    .await
    .map_err(none)?;
    // Parsed into a tree of steps, kept until the request ends.
    held.reserve_parse(&raw).map_err(none)?;
    let steps = parse(&raw).map_err(none)?;
    if opts.payloads {
        // The steps' queries, as each step's line logs its own: not the request, whose steps'
        // headers may carry the client's provider keys.
        let queries: Vec<&serde_json::Value> = steps.iter().map(|s| &s.query).collect();
        opts.recorded.request_body(&Bytes::from(
            serde_json::to_vec(&queries).unwrap_or_default(),
        ));
    }
    // The checks read what goes to the providers as prompts, the steps' queries: not their
    // headers, whose keys must never reach a moderation service (nor match a DLP profile).
    // DLP reads every string of them; the guardrails read each query as the body it is (a
    // Hugging Face step's `inputs` beside a chat step's `messages`).
    let dlp_flags = if snap.dlp.checks_requests() {
        let queries: Vec<&serde_json::Value> = steps.iter().map(|s| &s.query).collect();
        let queries = serde_json::to_vec(&queries).unwrap_or_default();
        snap.dlp.check_request(&queries).map_err(none)?
    } else {
        Vec::new()
    };
    if snap.guardrails.checks_prompts() {
        let texts: Vec<String> = steps
            .iter()
            .map(|s| crate::text::of_json(&s.query))
            .collect();
        gw.guardrails_check_text(snap, crate::guardrails::Side::Prompt, &texts.join("\n"))
            .await
            .map_err(none)?;
    }
    let planned = steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| plan(snap, &parts.uri, i, s, aig))
        .collect::<Result<Vec<_>, _>>()?;

    let count = planned.len();
    for (i, plan) in planned.into_iter().enumerate() {
        let last = i + 1 == count;
        // Until this step's cache lookup, a refusal of it does not say the cache missed.
        opts.recorded.cache_on(false);
        let mut step = match plan {
            Plan::Provider(step) => *step,
            Plan::Compat(c) => {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let rest = match c.endpoint {
                    compat::Endpoint::Chat => "chat/completions",
                    compat::Endpoint::Embeddings => "embeddings",
                };
                let tagged = step_parts(parts, COMPAT, rest, &c.parts.headers);
                let step = serve_compat(
                    gw, snap, *c, aig, i, last, &dlp_flags, start, opts, redis_wait,
                );
                match step.await {
                    Ok(Served::Answer(resp)) => return Ok(*resp),
                    Ok(Served::HandedOver(failure)) => {
                        tracing::info!(
                            step = i,
                            provider = COMPAT,
                            failure = %failure,
                            log_id = crate::log_id::current().as_deref(),
                            "universal step failed, trying the next"
                        );
                    }
                    Err((id, e)) if last => {
                        let mut resp =
                            gw.refuse(snap, &tagged, id, None, None, e, start, Some(index));
                        proxy::say_cache_missed(&mut resp, opts);
                        return Ok(resp);
                    }
                    Err((id, e)) => {
                        let id = id.as_deref().unwrap_or(COMPAT);
                        tracing::info!(step = i, provider = %id, error = %e, log_id = crate::log_id::current().as_deref(), "universal step failed, trying the next");
                    }
                }
                continue;
            }
        };
        let id = step.provider.id.clone();
        let headers = std::mem::take(&mut step.headers);
        let step_aig = aig.overridden_by(GatewayHeaders::scan(&headers));
        // Checked by `plan` already.
        let want = cache::want(&snap.cache, step_aig).map_err(|e| (Some(id.clone()), e))?;
        let opts = &step_log_options(opts, step_aig, snap);
        let event_id = step_aig.get(Gw::EventId);
        // Its hit and its refusal are tagged and logged as its answer is.
        let tagged = step_parts(parts, &id, &step.endpoint, &headers);
        // Each step is looked up as it is reached, in the scope of its index.
        let lookup = cache::Request {
            scope: SCOPES[i],
            provider: &id,
            upstream: step.provider.upstream(),
            method: "POST",
            path: &step.endpoint,
            query: step.query.as_deref(),
            alias: step.alias.as_deref().unwrap_or("default"),
            headers: &headers,
            client_auth: step
                .client_own
                .then_some(step.provider.client_identity_headers()),
            accept_encoding: step.accept_encoding,
            body: &step.payload,
            account: step.account,
        };
        opts.recorded.cache_on(want.is_some());
        let cached = gw
            .cache_lookup(
                snap,
                want.as_ref().filter(|_| cache::cacheable(&lookup)),
                &lookup,
                &tagged,
                start,
                opts,
                redis_wait,
                || {},
            )
            .await;
        let mut miss = match cached.into_miss(&dlp_flags) {
            Ok(miss) => miss,
            Err(hit) => return Ok(*hit),
        };
        let waits = retry::Waits::every_attempt(step.timeout, snap.request_timeout);
        let read = |resp| proxy::read_passed_on(gw, snap, resp);
        let outcome = gw
            .dispatch(
                step.request,
                step.auth.as_ref(),
                waits,
                &step.retries,
                &id,
                read,
            )
            .await;
        let id = &id;
        let resp = match outcome {
            Ok(resp) if last || (resp.status().is_success() && !hands_on(&resp)) => resp,
            Ok(resp) => {
                let status = resp.status().as_u16();
                let failure = (resp.body().unread()).map(|e| format!("reading the answer: {e}"));
                tracing::info!(step = i, provider = %id, status, failure = failure.as_deref(), log_id = crate::log_id::current().as_deref(), "universal step failed, trying the next");
                continue;
            }
            // The gateway's own error (no answer, timeout) at the last step: refused here, so
            // the response can say which step it was.
            Err(e) if last => {
                let model = step.model.as_ref().map(crate::cost::ModelName::as_str);
                let payload = opts.payloads.then_some(&step.payload[..]);
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut resp = gw.refuse(
                    snap,
                    &tagged,
                    Some(id.clone()),
                    model,
                    payload,
                    e,
                    start,
                    Some(index),
                );
                proxy::say_cache_missed(&mut resp, opts);
                return Ok(resp);
            }
            Err(e) => {
                tracing::info!(step = i, provider = %id, error = %e, log_id = crate::log_id::current().as_deref(), "universal step failed, trying the next");
                continue;
            }
        };
        let (mut head, body) = resp.into_parts();
        strip_response_headers(&mut head.headers);
        head.headers.insert(STEP, HeaderValue::from(i));
        // What served the request, as for a dynamic route.
        if let Ok(v) = HeaderValue::from_str(id) {
            head.headers.insert(PROVIDER, v);
        }
        if let Some(v) = step
            .model
            .as_ref()
            .and_then(|m| HeaderValue::from_str(m.as_str()).ok())
        {
            head.headers.insert(MODEL, v);
        }
        let hide_usage = step.hide_usage && head.status.is_success();
        // Stored with what served it (step, provider, model), as a hit repeats them.
        let fill = gw.start_fill(snap, &mut head, hide_usage, miss.as_mut(), want.is_some());
        let log_id = proxy::tag_response(&mut head.headers, event_id);
        crate::dlp::flag(&mut head.headers, &dlp_flags);
        let mut record = RequestRecord::new(
            gw.metrics.clone(),
            id.clone(),
            Method::POST,
            &step.endpoint,
            head.status.as_u16(),
            start,
            opts,
            log_id,
        );
        if let Some(m) = step.model {
            let asked = crate::cost::ImageOptions::of_request(
                m.as_str(),
                &step.endpoint,
                &http::HeaderMap::new(),
                &step.payload,
            );
            record.set_model(m, &snap.pricing);
            if let Some(asked) = &asked {
                record.price_images(asked);
            }
        }
        // As on the provider's own route: InvokeModel answers of models whose bodies carry no
        // usage are counted from Bedrock's token-count headers.
        if &**id == "aws-bedrock" {
            record.bedrock_token_headers(&head.headers);
        }
        record.set_step(u32::try_from(i).unwrap_or(u32::MAX));
        record.set_tally(gw.tally(snap));
        // A step is a POST to its provider, counted as one on the provider's route: a model
        // call, a background response's create, a cancellation (of one remembered, or not).
        let kind = crate::background::RequestKind::of(&Method::POST, &step.endpoint, &step.payload);
        let counts_tokens = gw.count_tokens(snap, step.provider, kind, &head, &mut record);
        record.set_request_payload(&step.payload);
        let hide_usage = hide_usage.then(|| gw.buffers.guard(snap.max_buffered));
        let body = proxy::answer_body(body, counts_tokens, hide_usage, record, fill);
        return Ok(Response::from_parts(head, body));
    }
    // `parse` refuses an empty list, so the last step returned above.
    Err(none(bad("no steps".into())))
}

/// The request as the answers of a step (`provider`, `endpoint`, its own `headers`) are tagged
/// and logged with, its cache hits and the gateway's refusals at it as its provider's answer
/// is: the request's `cf-aig-*` headers overridden by the step's (its `cf-aig-event-id` echoed,
/// its log settings), and as its path the step's route (`/{provider}/{endpoint}`, after a long
/// form's `/v1/{account}/{gateway}`), which a refusal's log line names.
fn step_parts(
    parts: &http::request::Parts,
    provider: &str,
    endpoint: &str,
    headers: &HeaderMap,
) -> http::request::Parts {
    let mut tagged = parts.clone();
    // Each of the step's gateway headers in place of the request's, under either of its names
    // (`cf-cache-ttl` is `cf-aig-cache-ttl`).
    for name in headers.keys() {
        let n = name.as_str();
        if let Some(suffix) = n.strip_prefix("cf-aig-").or_else(|| n.strip_prefix("cf-")) {
            tagged.headers.remove(format!("cf-aig-{suffix}"));
            tagged.headers.remove(format!("cf-{suffix}"));
        }
    }
    for (name, value) in headers {
        if name.as_str().starts_with("cf-") {
            tagged.headers.append(name.clone(), value.clone());
        }
    }
    let base = parts.uri.path().trim_end_matches('/');
    if let Ok(uri) = http::Uri::try_from(format!("{base}/{provider}/{endpoint}")) {
        tagged.uri = uri;
    }
    tagged
}

/// Whether a step's answer held back whole for the response checks failed the step: it broke
/// off or stalled after its retries, or was over the size they read (one over the budget of
/// buffered bodies, the gateway's own limit, is the request's `503` at once, as on `/compat`).
fn hands_on(resp: &Response<crate::upstream::UpstreamBody>) -> bool {
    resp.body()
        .unread()
        .is_some_and(|e| !matches!(e, crate::body::HoldError::Exhausted(_)))
}

/// The request's log options with what a step's own gateway headers say of its log line
/// (`cf-aig-collect-log`, `-metadata`, `-custom-cost`, `-event-id`), which `plan` checked.
fn step_log_options<'a>(
    opts: &LogOptions<'a>,
    step: GatewayHeaders<'_>,
    snap: &Snapshot,
) -> LogOptions<'a> {
    match LogOptions::from_headers(step, snap.log_requests, snap.log_payloads) {
        Ok(own) => LogOptions {
            log: own.log,
            metadata: own.metadata,
            custom_cost: own.custom_cost,
            event_id: own.event_id,
            payloads: own.payloads,
            ..opts.clone()
        },
        Err(_) => opts.clone(),
    }
}

/// Serves a `compat` step (index `i`) through `/compat`, with the request's gateway headers
/// `request` under the step's own.
#[allow(clippy::too_many_arguments)]
async fn serve_compat(
    gw: &Gateway,
    snap: &Arc<Snapshot>,
    step: CompatStep,
    request: GatewayHeaders<'_>,
    i: usize,
    last: bool,
    dlp_flags: &[crate::dlp::Finding],
    start: Instant,
    opts: &LogOptions<'_>,
    redis_wait: &crate::shared::Wait,
) -> Result<Served, Failure> {
    let mut held = gw.buffers.guard(snap.max_buffered);
    held.grow(step.body.len() as u64)
        .map_err(|e| (None, e.into_gateway_error()))?;
    let aig = request.overridden_by(GatewayHeaders::scan(&step.parts.headers));
    let opts = &step_log_options(opts, aig, snap);
    let request = CompatRequest {
        parts: &step.parts,
        aig,
        endpoint: step.endpoint,
        body: step.body,
        held,
        // The request was admitted by its cf-aig-authorization (or authentication is off);
        // the step's own key headers are checked for a token where they would go upstream.
        admission: if snap.auth_required {
            Admission::Token
        } else {
            Admission::Open
        },
        step: Some(UniversalStep {
            index: i,
            scope: SCOPES[i],
            hands_over: !last,
            dlp_flags,
        }),
        redis_wait,
    };
    compat::answer(gw, snap, request, start, opts).await
}

/// The steps of a request body: a JSON array of steps (or one step object).
fn parse(raw: &[u8]) -> Result<Vec<Step>, GatewayError> {
    let value: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| bad(format!("the body is not JSON: {}", json_error(&e))))?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        obj @ serde_json::Value::Object(_) => vec![obj],
        _ => return Err(bad("expected a JSON array of steps".into())),
    };
    if items.is_empty() || items.len() > MAX_STEPS {
        return Err(bad(format!(
            "expected 1 to {MAX_STEPS} steps, got {}",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| Step::read(i, v))
        .collect()
}

/// Checks one step and builds its upstream request.
fn plan<'a>(
    snap: &'a Snapshot,
    request_uri: &'a http::Uri,
    i: usize,
    step: Step,
    request: GatewayHeaders<'_>,
) -> Result<Plan<'a>, Failure> {
    if step.provider == COMPAT {
        return plan_compat(snap, request_uri, i, step, request)
            .map(|c| Plan::Compat(Box::new(c)))
            .map_err(|e| (None, e));
    }
    plan_provider(snap, request_uri, i, step, request).map(|p| Plan::Provider(Box::new(p)))
}

/// A step's `endpoint` as a path and a query (empty when none): what a request target can carry
/// and nothing else. A `#` would cut what goes upstream short of what the gateway prices, logs
/// and caches by, so it is refused with anything a URL cannot hold.
fn split_endpoint(i: usize, endpoint: &str) -> Result<(&str, &str), GatewayError> {
    let raw = endpoint.trim_start_matches('/');
    let valid = raw.len() < 8192
        && raw
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'#' | b'\\'));
    if !valid {
        // Its path only: a query may hold a key (Google's `key=`), which errors never quote.
        let path = raw.split('?').next().unwrap_or_default();
        return Err(bad(format!(
            "steps[{i}].endpoint: {:?} is not a URL path (no spaces, control characters, '#' or '\\')",
            truncate(path)
        )));
    }
    Ok(raw.split_once('?').unwrap_or((raw, "")))
}

/// Checks a `compat` step: all that can be known before it is tried (endpoint, headers,
/// config, a model that names a known provider, route or chain), so that a wrong step is
/// refused before any step is sent, as a provider step is.
fn plan_compat(
    snap: &Snapshot,
    request_uri: &http::Uri,
    i: usize,
    step: Step,
    request: GatewayHeaders<'_>,
) -> Result<CompatStep, GatewayError> {
    let (path, query) = split_endpoint(i, &step.endpoint)?;
    let endpoint = match path.trim_end_matches('/') {
        // Cloudflare's dynamic-routing example names it in the singular.
        "chat/completions" | "chat/completion" => compat::Endpoint::Chat,
        "embeddings" => compat::Endpoint::Embeddings,
        _ => {
            return Err(bad(format!(
                "steps[{i}].endpoint: a compat step's endpoint is chat/completions or embeddings, not {:?}",
                truncate(path)
            )));
        }
    };
    let uri = if query.is_empty() {
        http::Uri::try_from(request_uri.path())
    } else {
        http::Uri::try_from(format!("{}?{query}", request_uri.path()))
    }
    .map_err(|_| bad(format!("steps[{i}].endpoint: invalid query")))?;
    let mut headers = step_headers(i, &step)?;
    // The step's `config`, as the most specific gateway headers (checked as a provider
    // step's is).
    let c = &step.config;
    check_config(i, c, Duration::ZERO, snap.retries)?;
    let settings = [
        (
            "cf-aig-request-timeout",
            c.request_timeout.map(|v| v.to_string()),
        ),
        ("cf-aig-max-attempts", c.max_attempts.map(|v| v.to_string())),
        ("cf-aig-retry-delay", c.retry_delay.map(|v| v.to_string())),
        ("cf-aig-backoff", c.backoff.clone()),
    ];
    for (name, value) in settings {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    let alias;
    {
        let aig = request.overridden_by(GatewayHeaders::scan(&headers));
        let at = |e: GatewayError| bad(format!("steps[{i}].headers: {e}"));
        proxy::request_timeout(aig, snap.request_timeout).map_err(at)?;
        snap.retries.with_headers(aig).map_err(at)?;
        cache::want(&snap.cache, aig).map_err(at)?;
        LogOptions::from_headers(aig, snap.log_requests, snap.log_payloads).map_err(at)?;
        alias = aig.byok_alias().map_err(at)?.map(str::to_owned);
    }
    let alias = alias.as_deref();
    // The request's event id, unless the step has its own: a cache hit is tagged with it.
    if !headers.contains_key(Gw::EventId.name())
        && let Some(v) = request.get(Gw::EventId)
    {
        headers.insert(Gw::EventId.name(), v.clone());
    }
    // The body is the step's `query` serialized by the gateway, never compressed.
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let model = step
        .query
        .get("model")
        .and_then(|m| m.as_str())
        .ok_or_else(|| {
            bad(format!(
                "steps[{i}].query.model: a compat step's model is required, as {{provider}}/{{model}}, dynamic/{{route}} or fallback/{{chain}}"
            ))
        })?;
    // The providers it could reach, each with the credentials it would be sent with.
    let providers = match snap.routing.walk(model) {
        Some(found) => {
            let walk = found.map_err(|e| bad(format!("steps[{i}].query.model: {e}")))?;
            walk.targets()
                .into_iter()
                .filter_map(|t| snap.providers.get(&t.provider))
                .collect()
        }
        None => {
            let (provider, _) = compat::split_model(model)
                .map_err(|e| bad(format!("steps[{i}].query.model: {e}")))?;
            let p = snap.providers.get(provider).ok_or_else(|| {
                bad(format!(
                    "steps[{i}].query.model: unknown provider {:?} in model {:?}",
                    truncate(provider),
                    truncate(model)
                ))
            })?;
            vec![p]
        }
    };
    for p in &providers {
        let stored = compat::stored_credentials(snap, p, alias)?;
        // A gateway token in the step's own key headers, where they would go upstream, is
        // refused before any step is sent, as in a provider step.
        if snap.auth_required {
            Admission::Token.allow_client_key(stored, snap, &headers, None)?;
        }
    }
    compat::one_provider_for_client_key(snap, providers, alias, &headers, model)
        .map_err(|e| bad(format!("steps[{i}]: {e}")))?;
    let body = Bytes::from(serde_json::to_vec(&step.query).unwrap_or_default());
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = Method::POST;
    parts.uri = uri;
    parts.headers = headers;
    Ok(CompatStep {
        endpoint,
        body,
        parts,
    })
}

/// The step's headers: its `headers`, and its `authorization` field unless they have one.
fn step_headers(i: usize, step: &Step) -> Result<HeaderMap, GatewayError> {
    let mut client_headers = HeaderMap::new();
    for (name, value) in &step.headers {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            bad(format!(
                "steps[{i}].headers: invalid name {:?}",
                truncate(name)
            ))
        })?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| bad(format!("steps[{i}].headers.{n}: invalid value")))?;
        client_headers.append(n, v);
    }
    if let Some(auth) = &step.authorization
        && !client_headers.contains_key(header::AUTHORIZATION)
    {
        let v = HeaderValue::from_str(auth)
            .map_err(|_| bad(format!("steps[{i}].authorization: invalid value")))?;
        client_headers.insert(header::AUTHORIZATION, v);
    }
    Ok(client_headers)
}

/// The step's timeout and retries: its `config` over `timeout` and `retries`.
fn check_config(
    i: usize,
    c: &StepConfig,
    timeout: Duration,
    retries: Policy,
) -> Result<(Duration, Policy), GatewayError> {
    let timeout = match c.request_timeout {
        None => timeout,
        Some(ms) if (1..=3_600_000).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            return Err(bad(format!(
                "steps[{i}].config.requestTimeout: expected milliseconds between 1 and 3600000"
            )));
        }
    };
    let mut retries = retries;
    if let Some(n) = c.max_attempts {
        if !(1..=retry::MAX_ATTEMPTS).contains(&n) {
            return Err(bad(format!(
                "steps[{i}].config.maxAttempts: expected 1 to {}",
                retry::MAX_ATTEMPTS
            )));
        }
        retries.max_attempts = n;
    }
    if let Some(ms) = c.retry_delay {
        let d = Duration::from_millis(ms);
        if d > retry::MAX_DELAY {
            return Err(bad(format!(
                "steps[{i}].config.retryDelay: expected milliseconds from 0 to 5000"
            )));
        }
        retries.delay = d;
    }
    if let Some(b) = &c.backoff {
        retries.backoff = retry::parse_backoff(b.as_bytes()).ok_or_else(|| {
            bad(format!(
                "steps[{i}].config.backoff: expected constant, linear or exponential"
            ))
        })?;
    }
    Ok((timeout, retries))
}

/// Checks one provider step and builds its upstream request.
fn plan_provider<'a>(
    snap: &'a Snapshot,
    request_uri: &'a http::Uri,
    i: usize,
    mut step: Step,
    request: GatewayHeaders<'_>,
) -> Result<Planned<'a>, Failure> {
    let none = |e: GatewayError| (None, e);
    let provider = snap.providers.get(&step.provider).ok_or_else(|| {
        none(bad(format!(
            "steps[{i}].provider: unknown provider {:?}",
            truncate(&step.provider)
        )))
    })?;
    let fail = |e: GatewayError| (Some(provider.id.clone()), e);
    let endpoint = step.endpoint.clone();
    let (path, query) = split_endpoint(i, &endpoint).map_err(fail)?;
    let route = ProviderRoute {
        provider: &step.provider,
        rest: path,
        account: crate::route::long_form_account(request_uri.path()),
        gateway: None,
    };
    let client_headers = step_headers(i, &step).map_err(fail)?;
    // The step's own gateway headers over the request's.
    let aig = request.overridden_by(GatewayHeaders::scan(&client_headers));
    let at = |e: GatewayError| fail(bad(format!("steps[{i}].headers: {e}")));
    let timeout = proxy::request_timeout(aig, snap.request_timeout).map_err(at)?;
    let retries = snap.retries.with_headers(aig).map_err(at)?;
    cache::want(&snap.cache, aig).map_err(at)?;
    LogOptions::from_headers(aig, snap.log_requests, snap.log_payloads).map_err(at)?;
    let alias = aig.byok_alias().map_err(at)?.map(str::to_owned);
    let alias = alias.as_deref();
    let body = Bytes::from(serde_json::to_vec(&step.query).unwrap_or_default());
    // The body as the client wrote it, for the log.
    let payload = body.clone();
    // As on the provider's own route: with spend limits or token budgets, an OpenAI-format
    // stream is asked for its usage, and the usage chunk held out of the client's stream.
    let hide_usage = snap.budgets.is_some()
        && proxy::asks_stream_usage(provider, &Method::POST, path, Some(query))
        && step
            .query
            .as_object_mut()
            .is_some_and(crate::compat::openai::ask_stream_usage);
    let body = if hide_usage {
        Bytes::from(serde_json::to_vec(&step.query).unwrap_or_default())
    } else {
        body
    };
    // The step's credentials, as the provider's own route would have them.
    let (key, auth) = if let Some(sa) = provider.service_account(alias) {
        let auth = proxy::AttemptAuth::Google { sa, provider };
        (KeyChoice::ClientOwn, Some(auth))
    } else if provider.signs_requests() {
        let auth = crate::compat::stored_aws_credentials(snap, alias)
            .map_err(fail)?
            .map(|creds| {
                let region = proxy::bedrock_region(path).to_owned();
                proxy::AttemptAuth::Aws(crate::compat::bedrock::SigV4::new(creds, region))
            });
        (KeyChoice::ClientOwn, auth)
    } else {
        (provider.choose_key(alias).map_err(fail)?, None)
    };
    let query = (!query.is_empty()).then_some(query);
    // Whose credentials the answer was made with: the client's own, or the alias's.
    let client_own = matches!(key, KeyChoice::ClientOwn) && auth.is_none();
    // A gateway token in the step's own key headers would go upstream as its key: refused, as
    // on the providers' own routes.
    if client_own && snap.auth_required {
        Admission::Token
            .allow_client_key(false, snap, &client_headers, query)
            .map_err(fail)?;
    }
    let uri = provider
        .upstream_uri(&route, provider.upstream_query(query, &key).as_deref())
        .map_err(|e| fail(bad(format!("steps[{i}].endpoint: {e}"))))?;
    // As on the provider's own route: a deployment (Azure) decides the model, whatever the
    // body names.
    let model = match provider.deployment(route.rest) {
        Some(deployment) => crate::cost::ModelName::named(deployment),
        None => crate::cost::model_in_path(provider.api_path(path))
            .or_else(|| step.query.get("model").and_then(|m| m.as_str()))
            .and_then(crate::cost::ModelName::named),
    };
    // A step's own SigV4 signature goes upstream unchanged only when the gateway does not sign.
    let client_signature = provider.signs_requests() && auth.is_none();
    proxy::check_signed_encoding(snap, &client_headers, client_signature).map_err(fail)?;
    let accept_encoding = crate::headers::keeps_accept_encoding(&client_headers, client_signature);
    let mut request = proxy::build_upstream_request(
        provider,
        &Method::POST,
        &client_headers,
        uri,
        key,
        body,
        client_signature,
    );
    if let Some(proxy::AttemptAuth::Aws(_)) = auth {
        proxy::drop_client_signature(&mut request);
    }
    let headers = request.headers_mut();
    // The body is the step's `query` serialized by the gateway, never compressed.
    headers.remove(header::CONTENT_ENCODING);
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }

    let (timeout, retries) = check_config(i, &step.config, timeout, retries).map_err(fail)?;
    Ok(Planned {
        provider,
        endpoint: path.to_owned(),
        request,
        auth,
        timeout,
        retries,
        model,
        payload,
        hide_usage,
        query: query.map(str::to_owned),
        account: provider.route_account(crate::route::long_form_account(request_uri.path())),
        client_own,
        accept_encoding,
        alias: alias.map(str::to_owned),
        headers: client_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_a_path_and_a_query_and_nothing_a_url_cannot_carry() {
        assert_eq!(
            split_endpoint(0, "/v1/chat/completions?api-version=1").expect("valid"),
            ("v1/chat/completions", "api-version=1")
        );
        assert_eq!(
            split_endpoint(0, "embeddings").expect("valid"),
            ("embeddings", "")
        );
        for bad in [
            "chat#/models/x",
            "chat completions",
            "chat\n",
            "ch\\at",
            "chat/é",
        ] {
            let e = split_endpoint(2, bad).expect_err(bad).to_string();
            assert!(e.contains("steps[2].endpoint"), "{e}");
        }
    }

    #[test]
    fn steps_are_an_array_or_one_object_and_named_when_wrong() {
        let one = br#"{"provider":"openai","endpoint":"chat/completions","query":{}}"#;
        assert_eq!(parse(one).expect("one").len(), 1);
        let two = br#"[{"provider":"a","endpoint":"e","query":{}},{"provider":"b","endpoint":"e","query":{},"headers":{"x":"y"},"config":{"maxAttempts":2}}]"#;
        assert_eq!(parse(two).expect("two").len(), 2);
        let msg = |raw: &[u8]| parse(raw).expect_err("bad").to_string();
        assert!(msg(b"[]").contains("1 to 16 steps"));
        assert!(msg(b"nope").contains("not JSON"));
        assert!(msg(b"42").contains("array of steps"));
        assert!(
            msg(br#"[{"provider":"a","query":{}}]"#).contains("steps[0]: missing field `endpoint`")
        );
        assert!(
            msg(br#"[{"provider":"a","endpoint":"e","query":{},"extra":1}]"#)
                .contains("steps[0]: unknown field `extra`")
        );
        let many = format!(
            "[{}]",
            vec![r#"{"provider":"a","endpoint":"e","query":{}}"#; 17].join(",")
        );
        assert!(msg(many.as_bytes()).contains("got 17"));
    }

    #[test]
    fn a_step_is_an_object_and_a_field_of_the_wrong_type_is_named_in_jsons_words() {
        let msg = |step: &str| {
            parse(format!(r#"[{{"provider":"a","endpoint":"e","query":{{}}}},{step}]"#).as_bytes())
                .expect_err(step)
                .to_string()
        };
        let cases = [
            // Read by position, it would be a request to `openai`.
            (
                r#"["openai","chat/completions",null,{},{}]"#,
                "steps[1]: expected an object (provider, endpoint, authorization, headers, query, config), got an array",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"config":{"requestTimeout":"5000"}}"#,
                "steps[1].config.requestTimeout: expected a whole number of milliseconds, got a string",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"config":{"maxAttempts":1.5}}"#,
                "steps[1].config.maxAttempts: expected a whole number of attempts, got a negative or fractional number",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"config":{"backoff":2}}"#,
                "steps[1].config.backoff: expected a string",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"config":{"timeout":1}}"#,
                "steps[1].config: unknown field `timeout`",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"config":null}"#,
                "steps[1].config: expected an object (requestTimeout, maxAttempts, retryDelay, backoff), got null",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"headers":{"x-title":5}}"#,
                "steps[1].headers.x-title: expected a string, got a number",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"headers":["x"]}"#,
                "steps[1].headers: expected an object of header names and string values, got an array",
            ),
            (
                r#"{"provider":7,"endpoint":"e","query":{}}"#,
                "steps[1].provider: expected a string, got a number",
            ),
            (
                r#"{"provider":"a","endpoint":"e","query":{},"authorization":true}"#,
                "steps[1].authorization: expected a string, got a boolean",
            ),
        ];
        for (step, want) in cases {
            let got = msg(step);
            assert!(got.contains(want), "{step}: {got}");
            assert!(!got.contains("u64") && !got.contains("struct"), "{got}");
        }
        // Unset fields may be left out, or be null where they are optional.
        let ok = br#"[{"provider":"a","endpoint":"e","query":null,"authorization":null,"config":{"requestTimeout":null,"maxAttempts":2,"retryDelay":0,"backoff":"linear"}}]"#;
        let step = &parse(ok).expect("valid")[0];
        assert_eq!(
            (
                step.config.request_timeout,
                step.config.max_attempts,
                step.config.retry_delay
            ),
            (None, Some(2), Some(0))
        );
        assert_eq!(step.config.backoff.as_deref(), Some("linear"));
    }

    #[test]
    fn a_steps_answers_are_tagged_with_its_own_gateway_headers_and_logged_at_its_route() {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.uri = http::Uri::from_static("/v1/acct/main");
        for (name, value) in [
            ("cf-aig-event-id", "request-ev"),
            ("cf-aig-metadata", r#"{"a":1}"#),
            ("cf-aig-cache-ttl", "60"),
            ("x-other", "kept"),
        ] {
            parts.headers.insert(name, HeaderValue::from_static(value));
        }
        let mut own = HeaderMap::new();
        own.insert("cf-aig-event-id", HeaderValue::from_static("step-ev"));
        // A former name stands for the current one.
        own.insert("cf-cache-ttl", HeaderValue::from_static("5"));
        own.insert("authorization", HeaderValue::from_static("Bearer own"));
        let tagged = step_parts(&parts, "openai", "chat/completions", &own);
        assert_eq!(tagged.uri.path(), "/v1/acct/main/openai/chat/completions");
        let aig = GatewayHeaders::scan(&tagged.headers);
        assert_eq!(aig.get(Gw::EventId).expect("event id"), "step-ev");
        assert_eq!(aig.get(Gw::CacheTtl).expect("ttl"), "5");
        assert_eq!(aig.get(Gw::Metadata).expect("metadata"), r#"{"a":1}"#);
        assert_eq!(tagged.headers["x-other"], "kept");
        // The step's credentials are no gateway header: not copied.
        assert!(!tagged.headers.contains_key("authorization"));
        parts.uri = http::Uri::from_static("/");
        let short = step_parts(&parts, COMPAT, "embeddings", &HeaderMap::new());
        assert_eq!(short.uri.path(), "/compat/embeddings");
        assert_eq!(
            GatewayHeaders::scan(&short.headers)
                .get(Gw::EventId)
                .expect("event id"),
            "request-ev"
        );
    }
}
