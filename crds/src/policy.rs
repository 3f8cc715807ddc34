//! The gateway features of SPEC.md, as typed and documented fields.
//!
//! [`GatewayPolicy`] is embedded in the `AIGateway` spec and, with the Kubernetes-only references
//! resolved away, in the rendered `gateway.yaml` the sidecar reads. Every block is optional: an
//! empty policy is a plain key-injecting passthrough gateway.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::provider::PROVIDER_ID_PATTERN;
use crate::units::{ByteSize, Duration};

impl GatewayPolicy {
    /// The policy's field names as written (`requestTimeout`, `rateLimit`, ...), from its schema.
    ///
    /// The type cannot refuse unknown fields itself: `AIGatewaySpec` flattens it, and serde does
    /// not combine `deny_unknown_fields` with `flatten`. In Kubernetes the apiserver refuses or
    /// prunes them; the sidecar checks a hand-written `gateway.yaml` against this list.
    pub fn field_names() -> Vec<String> {
        let schema = schemars::schema_for!(GatewayPolicy);
        schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Everything a gateway does to requests: auth, limits, caching, routing, DLP, logging.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.cache) || self.cache.backend != 'redis' || has(self.redis)",
        "message": "cache.backend redis needs the redis block"
    },
    {
        "rule": "!has(self.rateLimit) || self.rateLimit.scope != 'global' || has(self.redis)",
        "message": "rateLimit.scope global needs the redis block"
    }
]))]
pub struct GatewayPolicy {
    /// Gateway authentication with the `cf-aig-authorization: Bearer <token>` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Time to the first byte of the upstream response; the `cf-aig-request-timeout` header overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    /// Retries of failed upstream attempts; `cf-aig-max-attempts` and friends override them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Response caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// Request rate limiting (429, code 2003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Redis for state shared across pods (cache, global rate limits, spend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Redis>,
    /// Named fallback chains used by `/compat` when a target fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub fallbacks: Vec<Fallback>,
    /// Dynamic routes, used with `model: "dynamic/<route name>"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub routes: Vec<DynamicRoute>,
    /// Data loss prevention policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlp: Option<Dlp>,
    /// Moderation of prompts and responses by hazard category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrails: Option<Guardrails>,
    /// Request logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
    /// Spend limit over a period (429, code 2041).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<SpendLimit>,
    /// Model prices that add to (or replace entries of) the sidecar's built-in price table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"])
    )]
    pub pricing: Vec<ModelPrice>,
    /// Per-provider settings: upstream base URL overrides and `custom-<slug>` providers.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    #[schemars(extend(
        "maxProperties" = 32,
        "x-kubernetes-validations" = [{
            // The same pattern as the ProviderKey's `provider`, so the two cannot drift apart.
            "rule": format!("self.all(p, p.matches('{PROVIDER_ID_PATTERN}'))"),
            "message": "providers keys must be provider ids from SPEC.md or custom-<slug> (lowercase letters, digits, dashes)"
        }]
    ))]
    pub providers: BTreeMap<String, ProviderSettings>,
    /// Request size limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// OpenTelemetry export: one span per request (GenAI semantic conventions), OTLP/HTTP JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OpenTelemetry>,
}

impl GatewayPolicy {
    /// What is wrong with the spend limit and prices (field names from `spec`), if anything.
    /// The sidecar refuses such a config with the same message; the operator reports it.
    pub fn cost_problem(&self) -> Option<String> {
        if let Some(s) = &self.spend_limit
            && !s.usd().is_some_and(|a| a > 0.0)
        {
            return Some(format!(
                "spec.spendLimit.amount {:?} must be a positive decimal number of USD (e.g. \"250.00\")",
                s.amount
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.pricing.iter().enumerate() {
            if p.model.trim().is_empty() || p.model.len() > 256 {
                return Some(format!(
                    "spec.pricing[{i}].model must be a model name of 1 to 256 characters"
                ));
            }
            if !seen.insert(p.model.as_str()) {
                return Some(format!(
                    "spec.pricing[{i}].model {:?} is listed twice",
                    p.model
                ));
            }
            for (field, v) in [
                ("inputPerMillion", Some(&p.input_per_million)),
                ("outputPerMillion", Some(&p.output_per_million)),
                ("cacheReadPerMillion", p.cache_read_per_million.as_ref()),
                ("cacheWritePerMillion", p.cache_write_per_million.as_ref()),
                (
                    "cacheWrite1hPerMillion",
                    p.cache_write_1h_per_million.as_ref(),
                ),
            ] {
                if let Some(v) = v
                    && parse_usd(v).is_none()
                {
                    return Some(format!(
                        "spec.pricing[{i}].{field} {v:?} must be a decimal number of USD (e.g. \"2.50\")"
                    ));
                }
            }
        }
        None
    }

    /// What is wrong with `spec.openTelemetry`, if anything. The sidecar refuses such a config
    /// with the same message; the operator reports it.
    pub fn open_telemetry_problem(&self) -> Option<String> {
        let o = self.open_telemetry.as_ref()?;
        // Shown with any userinfo as `***`: these messages reach logs, reload errors and
        // `--check` output.
        let (shown, _) = crate::validation::without_userinfo(&o.endpoint);
        if let Err(why) = otlp_endpoint(&o.endpoint) {
            return Some(format!("spec.openTelemetry.endpoint {shown:?} {why}"));
        }
        // The sidecar posts to this URL; the shape check above lets some characters through.
        let traces = format!("{}/v1/traces", o.endpoint.trim_end_matches('/'));
        if let Err(e) = traces.parse::<http::Uri>() {
            return Some(format!(
                "spec.openTelemetry.endpoint {shown:?} is not a valid URL: {e}"
            ));
        }
        if o.service_name.as_deref().is_some_and(|n| {
            n.trim().is_empty() || n.len() > 256 || n.chars().any(char::is_control)
        }) {
            return Some(
                "spec.openTelemetry.serviceName must be 1 to 256 printable characters".into(),
            );
        }
        None
    }
}

/// Checks an OTLP/HTTP collector base URL: `http(s)://host[:port][/path]`, no query, fragment
/// or credentials. The error completes the sentence "endpoint ...".
fn otlp_endpoint(url: &str) -> Result<(), &'static str> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("must be an http:// or https:// URL")?;
    if scheme != "http" && scheme != "https" {
        return Err("must be an http:// or https:// URL");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.starts_with(':') {
        return Err("has no host");
    }
    if authority.contains('@') {
        return Err("must not carry credentials");
    }
    if rest.contains(['?', '#']) {
        return Err("must not have a query or fragment ({endpoint}/v1/traces is posted to)");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace");
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err("has an invalid port");
    }
    Ok(())
}

/// A non-negative decimal amount of USD as written in the spec (`"250"`, `"0.15"`).
pub fn parse_usd(s: &str) -> Option<f64> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || (s.contains('.') && frac.is_empty()) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Adds a CEL rule (`x-kubernetes-validations`) to a schema.
fn add_rule(schema: &mut schemars::Schema, rule: String, message: String) {
    let rules = schema
        .ensure_object()
        .entry("x-kubernetes-validations")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if let serde_json::Value::Array(rules) = rules {
        rules.push(serde_json::json!({"rule": rule, "message": message}));
    }
}

/// A CEL list of one element, a [`Duration`] string's length in milliseconds. CEL's `duration()`
/// knows no days and overflows on large hours (an error, not the rule's message), so the rule
/// reads the number and unit itself; the pattern keeps the number within 9 digits.
const DURATION_MS_CEL: &str = "[int(self.find('^[0-9]+')) * (self.endsWith('ms') ? 1 : self.endsWith('s') ? 1000 : self.endsWith('m') ? 60000 : self.endsWith('h') ? 3600000 : 86400000)]";

/// `cache.ttl` within [`Cache::MIN_TTL`] and [`Cache::MAX_TTL`].
fn ttl_range_rule(schema: &mut schemars::Schema) {
    let (min, max) = (Cache::MIN_TTL.as_millis(), Cache::MAX_TTL.as_millis());
    add_rule(
        schema,
        format!("{DURATION_MS_CEL}.all(ms, ms >= {min} && ms <= {max})"),
        "cache.ttl must be between 60s and 30d".into(),
    );
}

/// `retries.retryDelay` at most [`crate::validation::MAX_RETRY_DELAY`].
fn retry_delay_rule(schema: &mut schemars::Schema) {
    let max = crate::validation::MAX_RETRY_DELAY.as_millis();
    add_rule(
        schema,
        format!("{DURATION_MS_CEL}.all(ms, ms <= {max})"),
        "retryDelay must be at most 5s".into(),
    );
}

/// The items of `dlp.policies[].profiles`: one of [`DLP_PROFILES`].
fn dlp_profiles_enum(schema: &mut schemars::Schema) {
    if let Some(items) = schema.get_mut("items").and_then(|i| i.as_object_mut()) {
        items.insert("enum".into(), serde_json::json!(DLP_PROFILES));
    }
}

/// The keys of `guardrails.prompt` and `.response`: [`GUARDRAIL_CATEGORIES`].
fn guardrail_categories_rule(schema: &mut schemars::Schema) {
    let known = GUARDRAIL_CATEGORIES
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    schema.insert(
        "maxProperties".into(),
        serde_json::json!(GUARDRAIL_CATEGORIES.len()),
    );
    add_rule(
        schema,
        format!("self.all(c, c in [{known}])"),
        format!(
            "categories are those of OpenAI's moderation API: {}",
            GUARDRAIL_CATEGORIES.join(", ")
        ),
    );
}

/// `providers.<id>.baseURL`: an absolute http(s) URL once its placeholders are filled in, as the
/// ProviderKey's `baseURL` (the operator checks the rest, as the sidecar does).
fn base_url_rule(schema: &mut schemars::Schema) {
    let filled = crate::validation::BASE_URL_PLACEHOLDERS
        .iter()
        .fold("self".to_owned(), |acc, p| {
            format!("{acc}.replace('{{{p}}}', 'x')")
        });
    add_rule(
        schema,
        format!(
            "[{filled}].all(u, isURL(u) && url(u).getScheme() in ['https', 'http'] && url(u).getHostname() != '')"
        ),
        "baseURL must be an absolute http(s) URL, e.g. https://api.openai.com/v1 (placeholders: {resource}, {deployment}, {region}, {account})".into(),
    );
}

/// A reference to one key of a Kubernetes Secret in the gateway's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

/// Gateway authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!self.enabled || has(self.tokenSecretRef)",
    "message": "authentication.enabled needs tokenSecretRef (a Secret key holding the tokens, one per line)"
}]))]
pub struct Authentication {
    /// Require a valid `cf-aig-authorization: Bearer <token>` on every request (401, code 2009).
    #[serde(default)]
    pub enabled: bool,
    /// Secret key holding the accepted tokens, one per line (AIGateway only; rendered into the
    /// keys Secret as `authentication.tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// How the delay between retry attempts grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// The same delay every time.
    #[default]
    Constant,
    /// delay × attempt.
    Linear,
    /// delay × 2^(attempt-1).
    Exponential,
}

/// Retries of failed upstream attempts (connection errors, timeouts, 429 and 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Attempts in total, including the first (1..=5).
    #[schemars(range(min = 1, max = 5))]
    pub max_attempts: u32,
    /// Delay before the second attempt (at most 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = retry_delay_rule)]
    pub retry_delay: Option<Duration>,
    /// How the delay grows with each attempt.
    #[serde(default)]
    pub backoff: Backoff,
}

/// Where cached responses are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In the sidecar's memory (per pod).
    #[default]
    Memory,
    /// In Redis (shared by every pod of the gateway).
    Redis,
}

/// Response caching.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cache {
    /// Cache responses of identical requests.
    #[serde(default)]
    pub enabled: bool,
    /// Default time to live (60s .. 30d); `cf-aig-cache-ttl` overrides it per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = ttl_range_rule)]
    pub ttl: Option<Duration>,
    /// Where entries are kept.
    #[serde(default)]
    pub backend: CacheBackend,
    /// Upper bound of the memory cache; least recently used entries are evicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Also cache streamed (SSE) responses and replay them.
    #[serde(default)]
    pub streaming: bool,
}

/// A block's value where `null` (a key with nothing under it: every setting commented out) is
/// the empty block, as a missing key is.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

impl Cache {
    /// Shortest TTL (config and `cf-aig-cache-ttl`).
    pub const MIN_TTL: std::time::Duration = std::time::Duration::from_secs(60);
    /// Longest TTL, 30 days (config and `cf-aig-cache-ttl`).
    pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
    /// Smallest `maxSize`.
    pub const MIN_MAX_SIZE: u64 = 64 << 10;
    /// Largest `maxSize` (16Gi): the cache is in the sidecar's memory.
    pub const MAX_MAX_SIZE: u64 = 16 << 30;

    /// What is wrong with these settings (field names relative to `cache`), if anything.
    pub fn problem(&self) -> Option<String> {
        if let Some(ttl) = self.ttl
            && !(Self::MIN_TTL..=Self::MAX_TTL).contains(&ttl.get())
        {
            return Some(format!("cache.ttl {ttl} must be between 60s and 30d"));
        }
        if let Some(size) = self.max_size
            && !(Self::MIN_MAX_SIZE..=Self::MAX_MAX_SIZE).contains(&size.get())
        {
            return Some(format!(
                "cache.maxSize {size} must be between 64Ki and 16Gi"
            ));
        }
        None
    }
}

/// Fixed (the default) or sliding window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitTechnique {
    /// Counter reset at each interval boundary.
    #[default]
    Fixed,
    /// Weighted window over the last interval.
    Sliding,
}

/// Where a limit is counted: each pod on its own (the default), or every pod together in
/// the gateway's Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// Each pod counts on its own.
    #[default]
    Pod,
    /// Counted across all pods of the gateway (needs redis).
    Global,
}

/// Request rate limiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per interval.
    #[schemars(range(min = 1))]
    pub limit: u64,
    /// Length of the interval.
    pub interval: Duration,
    /// Fixed or sliding window.
    #[serde(default)]
    pub technique: RateLimitTechnique,
    /// Per pod or global.
    #[serde(default)]
    pub scope: RateLimitScope,
    /// Optional budget of tokens (input + output, as responses report them) per minute, fixed or
    /// sliding like the request limit, per pod or global like it (429, code 2003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// Redis connection for shared state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redis {
    /// Secret key holding the Redis URL (AIGateway only; rendered into the keys Secret as `redis.url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
}

/// A provider and model to send a request to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelTarget {
    /// Provider id (SPEC.md) or `custom-<slug>`.
    #[schemars(regex(pattern = PROVIDER_ID_PATTERN))]
    pub provider: String,
    /// Model name at that provider.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
}

/// A named chain of targets tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fallback {
    /// Name of the chain.
    pub name: String,
    /// Targets, first to last.
    #[schemars(length(min = 1, max = 8))]
    pub targets: Vec<ModelTarget>,
}

/// Kind of a dynamic route node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteNodeType {
    /// Entry of the route.
    Start,
    /// Branches on a condition over request metadata.
    Conditional,
    /// Splits traffic by weight.
    Percentage,
    /// Request-rate limit with a fallback branch.
    Rate,
    /// Spend budget with a fallback branch.
    Budget,
    /// Sends the request to a provider and model.
    Model,
    /// Exit of the route.
    End,
}

/// A weighted branch of a percentage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedBranch {
    /// Relative weight.
    #[schemars(range(max = 1_000_000))]
    pub weight: u32,
    /// Node id to continue with.
    pub next: String,
}

/// One node of a dynamic route graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type != 'model' || (has(self.provider) && has(self.model))",
        "message": "a model node needs provider and model"
    },
    {
        "rule": "self.type != 'conditional' || (has(self.condition) && has(self.then) && has(self.else))",
        "message": "a conditional node needs condition, then and else"
    },
    {
        "rule": "self.type != 'percentage' || (has(self.branches) && size(self.branches) > 0)",
        "message": "a percentage node needs branches"
    },
    {
        "rule": "!(self.type in ['rate', 'budget']) || (has(self.limit) && has(self.interval) && has(self.fallback))",
        "message": "rate and budget nodes need limit, interval and fallback"
    }
]))]
pub struct RouteNode {
    /// Node id, unique within the route.
    pub id: String,
    /// Node kind.
    #[serde(rename = "type")]
    pub kind: RouteNodeType,
    /// Next node (start, model, rate and budget nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Condition of a conditional node, e.g. `metadata.plan == "paid"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Node taken when the condition holds.
    #[serde(default, rename = "then", skip_serializing_if = "Option::is_none")]
    pub then_: Option<String>,
    /// Node taken when the condition does not hold.
    #[serde(default, rename = "else", skip_serializing_if = "Option::is_none")]
    pub else_: Option<String>,
    /// Branches of a percentage node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub branches: Vec<WeightedBranch>,
    /// Provider of a model node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PROVIDER_ID_PATTERN))]
    pub provider: Option<String>,
    /// Model of a model node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Time to first byte for a model node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries of a model node after its first attempt (0..=4), as Cloudflare's model element
    /// counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4))]
    pub retries: Option<u32>,
    /// Limit of a rate node (requests) or budget node (cost), per `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// Interval of a rate or budget node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Node taken when a rate or budget limit is exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// What a rate or budget node counts by, `metadata.<name>`: a window for each value of
    /// that `cf-aig-metadata` field (requests without it share one); unset, one for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^metadata\.[A-Za-z0-9_-]+$"))]
    pub key: Option<String>,
    /// Fixed (the default) or sliding window of a rate or budget node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technique: Option<RateLimitTechnique>,
    /// Where a rate or budget node counts: each pod on its own (the default), or every pod
    /// of the gateway together in its Redis (`global`, needs `spec.redis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
}

impl RouteNode {
    /// A node of `kind` named `id`, with nothing else set (its fields follow).
    pub fn new(id: &str, kind: RouteNodeType) -> Self {
        Self {
            id: id.into(),
            kind,
            next: None,
            condition: None,
            then_: None,
            else_: None,
            branches: vec![],
            provider: None,
            model: None,
            timeout: None,
            retries: None,
            limit: None,
            interval: None,
            fallback: None,
            key: None,
            technique: None,
            scope: None,
        }
    }
}

/// A dynamic route: a graph of nodes from `start` to `end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DynamicRoute {
    /// Route name, used as `model: "dynamic/<name>"`.
    pub name: String,
    /// Nodes of the graph.
    #[schemars(length(min = 2, max = 64))]
    pub nodes: Vec<RouteNode>,
}

/// What a DLP policy does on a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DlpAction {
    /// Let the request through and report matches in `cf-aig-dlp`.
    Flag,
    /// Refuse the request (code 2029) or response (code 2030).
    Block,
}

/// Which side of the exchange a DLP policy inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DlpCheck {
    /// The prompt sent by the client.
    Request,
    /// The provider's response.
    Response,
}

/// The DLP detection profiles the sidecar knows.
pub const DLP_PROFILES: &[&str] = &["credit-card", "us-ssn", "email", "aws-keys", "private-keys"];

/// One DLP policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DlpPolicy {
    /// Policy id, reported in `cf-aig-dlp`.
    pub id: String,
    /// Flag or block.
    pub action: DlpAction,
    /// Request, response or both.
    #[schemars(length(min = 1, max = 2))]
    pub check: Vec<DlpCheck>,
    /// Detection profiles: `credit-card`, `us-ssn`, `email`, `aws-keys`, `private-keys`.
    #[schemars(length(min = 1, max = 16), transform = dlp_profiles_enum)]
    pub profiles: Vec<String>,
}

/// Data loss prevention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dlp {
    /// Policies, all applied.
    #[serde(default)]
    #[schemars(
        length(max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"])
    )]
    pub policies: Vec<DlpPolicy>,
}

/// What a guardrail does when a hazard category is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GuardrailAction {
    /// Log and let through.
    Flag,
    /// Refuse (424, code 2016 for prompts, 2017 for responses).
    Block,
}

/// Hazard categories of OpenAI's moderation API, the keys of `prompt` and `response`.
pub const GUARDRAIL_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// Moderation of prompts and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Guardrails {
    /// OpenAI-compatible moderation endpoint used to classify text.
    #[serde(
        default,
        rename = "moderationURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub moderation_url: Option<String>,
    /// Action per hazard category for prompts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = guardrail_categories_rule)]
    pub prompt: BTreeMap<String, GuardrailAction>,
    /// Action per hazard category for responses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = guardrail_categories_rule)]
    pub response: BTreeMap<String, GuardrailAction>,
}

/// Request logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Logging {
    /// Write one log line per request.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Include request and response bodies.
    #[serde(default)]
    pub payloads: bool,
}

impl Default for Logging {
    fn default() -> Self {
        Self {
            enabled: true,
            payloads: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// Period of a spend limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SpendPeriod {
    /// Calendar day (UTC).
    Day,
    /// Calendar week (UTC, from Monday).
    Week,
    /// Calendar month (UTC).
    Month,
}

/// Spend limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpendLimit {
    /// Amount in USD, as a decimal string (e.g. "250.00").
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub amount: String,
    /// Period over which spend is summed.
    pub period: SpendPeriod,
}

impl SpendLimit {
    /// The amount in USD, if it is a valid decimal number.
    pub fn usd(&self) -> Option<f64> {
        parse_usd(&self.amount)
    }
}

/// The price of a model, in USD per million tokens, as decimal strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPrice {
    /// Model name, matched like the built-in table: this name or a longer one that continues it
    /// after `-`, `@` or `:` (so `gpt-4o` prices `gpt-4o-2024-08-06` but not `gpt-4o-mini`).
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// USD per million input (prompt) tokens, e.g. "2.50".
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub input_per_million: String,
    /// USD per million output (generated) tokens, e.g. "10.00".
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub output_per_million: String,
    /// USD per million input tokens read from the provider's prompt cache. Default: the
    /// provider's rule for the model as a share of `inputPerMillion` (Claude 0.1×, GPT-4o 0.5×,
    /// ...; the input price for models without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub cache_read_per_million: Option<String>,
    /// USD per million input tokens written to the prompt cache (Anthropic's 5-minute writes).
    /// Default: the provider's rule (Claude 1.25× `inputPerMillion`; the input price otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub cache_write_per_million: Option<String>,
    /// USD per million input tokens written to the prompt cache for an hour (Anthropic).
    /// Default: the provider's rule (Claude 2× `inputPerMillion`; the input price otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub cache_write_1h_per_million: Option<String>,
}

/// Wire format a provider speaks (for `custom-<slug>` providers and `/compat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ApiFormat {
    /// OpenAI chat completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// Settings of one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderSettings {
    /// Upstream base URL; replaces SPEC.md's default. May contain `{resource}`, `{deployment}`
    /// (azure-openai), `{region}` (aws-bedrock, google-vertex-ai) or `{account}` (workers-ai).
    #[serde(default, rename = "baseURL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), transform = base_url_rule)]
    pub base_url: Option<String>,
    /// Wire format of a custom provider (default openai).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ApiFormat>,
    /// Header that carries the key (custom providers; default `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<String>,
    /// Scheme written before the key in the auth header (default `Bearer` for `Authorization`,
    /// none for other headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_scheme: Option<String>,
    /// Cloudflare account id (workers-ai short-form routes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

/// OpenTelemetry export of one span per request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenTelemetry {
    /// OTLP/HTTP collector base URL (e.g. `http://otel-collector.observability:4318`); spans
    /// are posted as JSON to `{endpoint}/v1/traces`.
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^https?://[^/?#@\s]+(/[^?#\s]*)?$")
    )]
    pub endpoint: String,
    /// `service.name` resource attribute of the spans (default `sidegate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub service_name: Option<String>,
}

/// Request limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted request body (default 10Mi); larger requests get 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<ByteSize>,
    /// Most bytes the sidecar holds in buffered bodies at once, over all requests (default
    /// 64Mi): request bodies read whole, responses held back for DLP or guardrail checks or
    /// /compat translation, cache fills. A request that does not fit gets 503 with
    /// Retry-After: 1. At least maxRequestBody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_buffered_bytes: Option<ByteSize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_amounts_are_plain_decimals() {
        assert_eq!(parse_usd("250.00"), Some(250.0));
        assert_eq!(parse_usd("0.15"), Some(0.15));
        assert_eq!(parse_usd("7"), Some(7.0));
        for bad in ["", "-1", "1e3", "1.", ".5", "ten", "1,5", "NaN", "inf"] {
            assert_eq!(parse_usd(bad), None, "{bad}");
        }
    }

    #[test]
    fn spend_limits_and_prices_are_checked_by_field() {
        let mut p = GatewayPolicy {
            spend_limit: Some(SpendLimit {
                amount: "250.00".into(),
                period: SpendPeriod::Month,
            }),
            pricing: vec![ModelPrice {
                model: "my-model".into(),
                input_per_million: "1.5".into(),
                output_per_million: "3".into(),
                ..ModelPrice::default()
            }],
            ..GatewayPolicy::default()
        };
        assert_eq!(p.cost_problem(), None);
        p.spend_limit = Some(SpendLimit {
            amount: "lots".into(),
            period: SpendPeriod::Day,
        });
        let why = p.cost_problem().expect("bad amount");
        assert!(why.starts_with("spec.spendLimit.amount \"lots\""), "{why}");
        p.spend_limit = Some(SpendLimit {
            amount: "0".into(),
            period: SpendPeriod::Day,
        });
        assert!(
            p.cost_problem().is_some(),
            "a zero limit refuses everything"
        );
        p.spend_limit = None;
        p.pricing.push(p.pricing[0].clone());
        let why = p.cost_problem().expect("duplicate");
        assert!(
            why.contains("pricing[1].model \"my-model\" is listed twice"),
            "{why}"
        );
        p.pricing.pop();
        p.pricing[0].output_per_million = "3.x".into();
        let why = p.cost_problem().expect("bad price");
        assert!(why.starts_with("spec.pricing[0].outputPerMillion"), "{why}");
        p.pricing[0].output_per_million = "3".into();
        p.pricing[0].cache_read_per_million = Some("0.15".into());
        assert_eq!(p.cost_problem(), None);
        p.pricing[0].cache_write_1h_per_million = Some("-3".into());
        let why = p.cost_problem().expect("bad cache price");
        assert!(
            why.starts_with("spec.pricing[0].cacheWrite1hPerMillion \"-3\""),
            "{why}"
        );
    }

    #[test]
    fn open_telemetry_endpoint_must_be_an_http_url() {
        let with = |endpoint: &str| GatewayPolicy {
            open_telemetry: Some(OpenTelemetry {
                endpoint: endpoint.into(),
                service_name: None,
            }),
            ..GatewayPolicy::default()
        };
        for ok in [
            "http://otel-collector.observability:4318",
            "https://otlp.example.com/otlp",
            "http://127.0.0.1:4318/",
            "http://[::1]:4318",
        ] {
            assert_eq!(with(ok).open_telemetry_problem(), None, "{ok}");
        }
        for (bad, why) in [
            ("otel-collector:4318", "must be an http:// or https:// URL"),
            (
                "grpc://collector:4317",
                "must be an http:// or https:// URL",
            ),
            ("http://", "has no host"),
            ("http://:4318", "has no host"),
            (
                "http://user:pw@collector:4318",
                "must not carry credentials",
            ),
            ("http://collector:4318/?a=b", "must not have a query"),
            ("http://collector:port", "has an invalid port"),
            ("http://collector :4318", "must not contain whitespace"),
        ] {
            let msg = with(bad).open_telemetry_problem().expect(bad);
            assert!(
                msg.starts_with("spec.openTelemetry.endpoint") && msg.contains(why),
                "{bad}: {msg}"
            );
        }
        let mut p = with("http://collector:4318");
        if let Some(o) = p.open_telemetry.as_mut() {
            o.service_name = Some(" ".into());
        }
        let msg = p.open_telemetry_problem().expect("blank service name");
        assert!(msg.starts_with("spec.openTelemetry.serviceName"), "{msg}");
    }

    #[test]
    fn an_open_telemetry_endpoint_with_credentials_is_refused_without_repeating_them() {
        for endpoint in [
            "http://collector:s3cr3t@127.0.0.1:4318",
            // A password holding an unencoded '/' ends the authority early: "invalid port".
            "http://collector:s3/cr3t@127.0.0.1:4318",
        ] {
            let p = GatewayPolicy {
                open_telemetry: Some(OpenTelemetry {
                    endpoint: endpoint.into(),
                    service_name: None,
                }),
                ..GatewayPolicy::default()
            };
            let msg = p.open_telemetry_problem().expect(endpoint);
            assert!(!msg.contains("s3"), "{endpoint}: {msg}");
            assert!(msg.contains("\"http://***@127.0.0.1:4318\""), "{msg}");
        }
    }
}
