//! The checks of a gateway policy that its types and schema do not make, in one place: the
//! operator reports them in the AIGateway's status (`InvalidSpec`) and the sidecar refuses a
//! config that fails them at load. One implementation, so the operator never marks a spec Ready
//! that every sidecar would refuse. Each message names its field from `spec` (`spec.cache.ttl`).

use std::collections::BTreeMap;

use http::{HeaderName, Uri};

use crate::policy::{
    CacheBackend, DLP_PROFILES, GUARDRAIL_CATEGORIES, GatewayPolicy, ProviderSettings,
    RateLimitScope,
};
use crate::provider::{BUILTIN_PROVIDERS, is_custom_provider_id};

/// Where a policy comes from, which decides how it names the Secrets it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An AIGateway spec: tokens and the Redis URL by Secret reference (`tokenSecretRef`,
    /// `urlSecretRef`), which the operator renders into files of the keys Secret.
    Resource,
    /// A `gateway.yaml` (rendered or hand-written): tokens and the Redis URL are files of the
    /// keys directory, never references.
    File,
}

/// Placeholders a provider base URL may hold; the sidecar fills them per request from the route.
pub const BASE_URL_PLACEHOLDERS: &[&str] = &["resource", "deployment", "region", "account"];

/// The placeholders of [`BASE_URL_PLACEHOLDERS`] that provider `id` fills from each request's
/// route: azure-openai `{resource}` and `{deployment}`, aws-bedrock and google-vertex-ai
/// `{region}`, workers-ai `{account}`; no other provider fills any.
pub fn placeholders_filled_by(id: &str) -> &'static [&'static str] {
    match id {
        "azure-openai" => &["resource", "deployment"],
        "aws-bedrock" | "google-vertex-ai" => &["region"],
        "workers-ai" => &["account"],
        _ => &[],
    }
}

/// Largest retry delay (`spec.retries.retryDelay`).
pub const MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest request body when `spec.limits.maxRequestBody` is not set (10Mi).
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 << 20;

/// Largest `spec.limits.maxRequestBody` (1Gi): a request body is held in memory whole.
pub const MAX_REQUEST_BODY: u64 = 1 << 30;

/// Largest `spec.limits.maxBufferedBytes` (16Gi): memory a sidecar container may hold in
/// buffered bodies; past it, a value is a typo (a suffix too many), not a budget.
pub const MAX_BUFFERED_BYTES: u64 = 16 << 30;

/// Most attempts (`spec.retries.maxAttempts`).
pub const MAX_ATTEMPTS: u32 = 5;

/// Every problem of `policy` that the sidecar refuses at load, each naming its field; empty when
/// the policy loads (keys and tokens aside: those are files, not policy).
pub fn policy_problems(policy: &GatewayPolicy, origin: Origin) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, settings) in &policy.providers {
        if let Some(why) = provider_problem(id, settings) {
            problems.push(format!("spec.providers.{id}: {why}"));
        }
    }
    if let Some(t) = policy.request_timeout
        && t.get().is_zero()
    {
        problems.push("spec.requestTimeout must be larger than 0".into());
    }
    if let Some(b) = policy.limits.as_ref().and_then(|l| l.max_request_body)
        && !(1..=MAX_REQUEST_BODY).contains(&b.get())
    {
        problems.push(format!(
            "spec.limits.maxRequestBody must be larger than 0 and at most 1Gi, got {b}"
        ));
    }
    if let Some(b) = policy.limits.as_ref().and_then(|l| l.max_buffered_bytes)
        && b.get() > MAX_BUFFERED_BYTES
    {
        problems.push(format!(
            "spec.limits.maxBufferedBytes must be at most 16Gi, got {b}"
        ));
    }
    if let Some(limits) = &policy.limits
        && let Some(buffered) = limits.max_buffered_bytes
    {
        // A request body the gateway accepts must fit in the budget when nothing else holds
        // any, or it could never be served.
        let body = limits
            .max_request_body
            .map_or(DEFAULT_MAX_REQUEST_BODY, |b| b.get());
        if buffered.get() < body {
            problems.push(format!(
                "spec.limits.maxBufferedBytes ({buffered}) must be at least maxRequestBody ({})",
                crate::units::ByteSize::bytes(body)
            ));
        }
    }
    if let Some(r) = &policy.retries {
        if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
            problems.push(format!(
                "spec.retries.maxAttempts must be between 1 and {MAX_ATTEMPTS}, got {}",
                r.max_attempts
            ));
        }
        if let Some(d) = r.retry_delay
            && d.get() > MAX_RETRY_DELAY
        {
            problems.push(format!(
                "spec.retries.retryDelay must be at most 5s, got {}ms",
                d.get().as_millis()
            ));
        }
    }
    if let Some(why) = policy.cache.as_ref().and_then(|c| c.problem()) {
        problems.push(format!("spec.{why}"));
    }
    if let Some(rl) = &policy.rate_limit {
        if rl.limit == 0 || rl.interval.get().is_zero() {
            problems.push("spec.rateLimit: limit and interval must be larger than 0".into());
        }
        if rl.tokens_per_minute == Some(0) {
            problems.push("spec.rateLimit.tokensPerMinute must be larger than 0".into());
        }
    }
    problems.extend(secret_problems(policy, origin));
    if policy.redis.is_none() {
        for (ri, r) in policy.routes.iter().enumerate() {
            if let Some(ni) = r
                .nodes
                .iter()
                .position(|n| n.scope == Some(RateLimitScope::Global))
            {
                problems.push(format!(
                    "spec.routes[{ri}].nodes[{ni}].scope: global needs spec.redis (the node counts in Redis)"
                ));
            }
        }
        if policy
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.scope == RateLimitScope::Global)
        {
            problems.push(
                "spec.rateLimit.scope: global needs spec.redis (the limit is counted in Redis)"
                    .into(),
            );
        }
        if policy
            .cache
            .as_ref()
            .is_some_and(|c| c.enabled && c.backend == CacheBackend::Redis)
        {
            problems.push("spec.cache.backend: redis needs spec.redis".into());
        }
    }
    for (i, p) in policy.dlp.iter().flat_map(|d| &d.policies).enumerate() {
        for name in &p.profiles {
            if !DLP_PROFILES.contains(&name.as_str()) {
                problems.push(format!(
                    "spec.dlp.policies[{i}].profiles: unknown profile {name:?} (known: {})",
                    DLP_PROFILES.join(", ")
                ));
            }
        }
    }
    if let Some(g) = &policy.guardrails {
        for (side, map) in [("prompt", &g.prompt), ("response", &g.response)] {
            for c in map.keys() {
                if !GUARDRAIL_CATEGORIES.contains(&c.as_str()) {
                    problems.push(format!(
                        "spec.guardrails.{side}: unknown category {c:?} (known: {})",
                        GUARDRAIL_CATEGORIES.join(", ")
                    ));
                }
            }
        }
        match g.moderation_url.as_deref() {
            None if !g.prompt.is_empty() || !g.response.is_empty() => problems.push(
                "spec.guardrails.moderationURL is required when prompt or response categories are set"
                    .into(),
            ),
            Some(url) => match without_userinfo(url) {
                (shown, true) => problems.push(format!(
                    "spec.guardrails.moderationURL {shown:?} must not carry credentials (user:password@ before the host)"
                )),
                (shown, false) if !is_http_url(url) => problems.push(format!(
                    "spec.guardrails.moderationURL {shown:?} is not an http(s) URL"
                )),
                _ => {}
            },
            _ => {}
        }
    }
    if let Err(why) = crate::routes::compile(
        &policy.routes,
        &policy.fallbacks,
        known_providers(&policy.providers),
    ) {
        problems.push(why);
    }
    problems.extend(policy.cost_problem());
    problems.extend(policy.open_telemetry_problem());
    problems
}

/// Secrets the policy needs, named as its origin names them.
fn secret_problems(policy: &GatewayPolicy, origin: Origin) -> Vec<String> {
    let mut problems = Vec::new();
    match origin {
        Origin::Resource => {
            if policy
                .authentication
                .as_ref()
                .is_some_and(|a| a.enabled && a.token_secret_ref.is_none())
            {
                problems.push("spec.authentication.enabled needs tokenSecretRef (a Secret key holding the tokens, one per line)".into());
            }
            if policy
                .redis
                .as_ref()
                .is_some_and(|r| r.url_secret_ref.is_none())
            {
                problems.push(
                    "spec.redis needs urlSecretRef (a Secret key holding the Redis URL)".into(),
                );
            }
        }
        Origin::File => {
            if policy
                .redis
                .as_ref()
                .is_some_and(|r| r.url_secret_ref.is_some())
            {
                problems.push(format!(
                    "spec.redis.urlSecretRef is resolved by the operator; outside Kubernetes put the URL in the keys directory file {}",
                    crate::config::REDIS_URL_FILE_NAME
                ));
            }
        }
    }
    problems
}

/// What is wrong with the settings of provider `id`, if anything (the message follows
/// `spec.providers.<id>: `).
pub fn provider_problem(id: &str, settings: &ProviderSettings) -> Option<String> {
    let builtin = BUILTIN_PROVIDERS.contains(&id);
    if !builtin && !is_custom_provider_id(id) {
        return Some(
            "unknown provider: use a provider id of SPEC.md or custom-<slug> (lowercase letters, digits, dashes)"
                .into(),
        );
    }
    if builtin
        && (settings.format.is_some()
            || settings.auth_header.is_some()
            || settings.auth_scheme.is_some())
    {
        return Some(
            "format, authHeader and authScheme apply to custom-<slug> providers only".into(),
        );
    }
    if let Some(why) = settings.base_url.as_deref().and_then(base_url_problem) {
        return Some(format!("baseURL {why}"));
    }
    if let Some(url) = settings.base_url.as_deref() {
        let filled = placeholders_filled_by(id);
        let unfilled: Vec<String> = BASE_URL_PLACEHOLDERS
            .iter()
            .filter(|p| !filled.contains(p))
            .map(|p| format!("{{{p}}}"))
            .filter(|p| url.contains(p.as_str()))
            .collect();
        if !unfilled.is_empty() {
            let fills = match filled {
                [] => format!("{id} fills no placeholder"),
                names => format!(
                    "{id} fills only {}",
                    names
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            };
            let (shown, _) = without_userinfo(url);
            return Some(format!(
                "baseURL {shown:?} holds {}, which would go upstream as written: {fills}",
                unfilled.join(", ")
            ));
        }
    }
    if builtin {
        return None;
    }
    if settings.base_url.is_none() {
        return Some("custom providers need a baseURL".into());
    }
    if let Some(h) = &settings.auth_header
        && HeaderName::try_from(h.as_str()).is_err()
    {
        return Some(format!("authHeader {h:?} is not a header name"));
    }
    // An empty scheme sends the bare key (also in `Authorization`).
    if let Some(scheme) = settings.auth_scheme.as_deref().filter(|s| !s.is_empty())
        && !is_auth_scheme(scheme)
    {
        return Some(format!("authScheme {scheme:?} must be a single word"));
    }
    None
}

/// A scheme written before the key, as in `Bearer <key>`: one word of visible ASCII.
fn is_auth_scheme(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// What is wrong with a provider base URL, if anything; the message completes "baseURL ...".
///
/// `http(s)://host[:port][/path]`, no query or fragment (the route's path is appended), and
/// `{resource}`, `{deployment}`, `{region}`, `{account}` as the only placeholders.
///
/// No userinfo (`https://user:key@host`): the URL lands in a ConfigMap (and the sidecar would not
/// send it anyway). No message repeats what may be a credential: it is shown as `***`.
pub fn base_url_problem(url: &str) -> Option<String> {
    let raw = url.trim_end_matches('/');
    let (shown, userinfo) = without_userinfo(raw);
    let text = shown.as_str();
    if !(raw.starts_with("https://") || raw.starts_with("http://")) {
        return Some(format!("{text:?} must start with https:// or http://"));
    }
    if userinfo {
        return Some(format!(
            "{text:?} must not carry credentials (user:password@ before the host): put keys in a ProviderKey"
        ));
    }
    let sample = fill_base_url_placeholders(raw, "x");
    if sample.contains(['{', '}']) {
        return Some(format!(
            "{text:?} is not a URL (placeholders: {{resource}}, {{deployment}}, {{region}}, {{account}})"
        ));
    }
    if sample.contains(['?', '#']) {
        return Some(format!(
            "{text:?} must not have a query or fragment (the request's path is appended to it)"
        ));
    }
    let uri = match Uri::try_from(sample.as_str()) {
        Ok(uri) => uri,
        Err(e) => return Some(format!("{text:?} is not a URL: {e}")),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Some(format!("{text:?} needs a scheme and a host"));
    }
    // `Uri::port` is `None` for a port that is not a number: look at the text.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    if let Some((_, port)) = host_port.rsplit_once(':')
        && !host_port.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Some(format!("{text:?} has an invalid port"));
    }
    None
}

/// `url` as messages may show it, and whether it carries userinfo (`user:password@` in its
/// authority). The userinfo, or what may be a password that a `/` cut short
/// (`https://user:pa/ss@host`), is shown as `***`.
pub(crate) fn without_userinfo(url: &str) -> (String, bool) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), false);
    };
    let before_query = rest.find(['?', '#']).map_or(rest, |i| &rest[..i]);
    let authority = before_query.split('/').next().unwrap_or_default();
    let userinfo = authority.contains('@');
    // The userinfo ends at the authority's last '@'; one holding an unencoded '/' ends at the
    // last '@' of the text a ':' before it could have started.
    let cut = if userinfo {
        authority.rfind('@')
    } else {
        let colon = before_query.find(':');
        let slash = before_query.find('/');
        before_query
            .rfind('@')
            .filter(|_| colon.is_some_and(|c| slash.is_none_or(|s| c < s)))
    };
    match cut {
        Some(at) => (format!("{scheme}://***{}", &rest[at..]), userinfo),
        None => (url.to_owned(), false),
    }
}

/// `url` with each known base URL placeholder replaced by `with`.
pub fn fill_base_url_placeholders(url: &str, with: &str) -> String {
    BASE_URL_PLACEHOLDERS.iter().fold(url.to_owned(), |acc, p| {
        acc.replace(&format!("{{{p}}}"), with)
    })
}

/// Whether `url` is an absolute `http(s)` URL with a host, as the sidecar reads the moderation
/// endpoint.
pub fn is_http_url(url: &str) -> bool {
    url.parse::<Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
}

/// The provider ids a policy can route to: the built-ins and its `custom-<slug>` providers.
pub fn known_providers(
    providers: &BTreeMap<String, ProviderSettings>,
) -> impl Fn(&str) -> bool + '_ {
    move |id| BUILTIN_PROVIDERS.contains(&id) || providers.contains_key(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_provider(id: &str, settings: ProviderSettings) -> GatewayPolicy {
        GatewayPolicy {
            providers: [(id.to_owned(), settings)].into(),
            ..GatewayPolicy::default()
        }
    }

    #[test]
    fn base_urls_are_absolute_http_urls_with_known_placeholders_only() {
        for ok in [
            "https://api.openai.com/v1",
            "http://127.0.0.1:9/mock/v1/",
            "https://{resource}.openai.azure.com/openai/deployments/{deployment}",
            "https://{region}-aiplatform.googleapis.com",
        ] {
            assert_eq!(base_url_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("api.openai.com/v1", "must start with https:// or http://"),
            ("ftp://x.example", "must start with https:// or http://"),
            ("https://{tenant}.example.com", "placeholders:"),
            (
                "https://x.example/v1?api-version=1",
                "must not have a query",
            ),
            (
                "https://x.example/v1#top",
                "must not have a query or fragment",
            ),
            ("https://x.example:port/v1", "invalid port"),
            ("https://x.example:99999/v1", "invalid port"),
            ("https://exa mple.com", "is not a URL"),
            ("https://", "must start with"),
            ("https:///v1", "is not a URL"),
        ] {
            let msg = base_url_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(msg.contains(why), "{bad}: {msg}");
        }
    }

    #[test]
    fn a_base_url_with_credentials_is_refused_without_repeating_them() {
        for (bad, shown) in [
            (
                "https://user:sk-SECRET@api.example.com/v1",
                "https://***@api.example.com/v1",
            ),
            (
                "https://sk-SECRET@api.example.com",
                "https://***@api.example.com",
            ),
            (
                "http://:sk-SECRET@10.0.0.1:8080/v1/",
                "http://***@10.0.0.1:8080/v1",
            ),
            (
                "https://user:sk-SECRET@{resource}.openai.azure.com/openai",
                "https://***@{resource}.openai.azure.com/openai",
            ),
            (
                "https://u:sk-SECRET@x.example/v1?k=1",
                "https://***@x.example/v1?k=1",
            ),
        ] {
            let msg = base_url_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(
                msg,
                format!(
                    "{shown:?} must not carry credentials (user:password@ before the host): put keys in a ProviderKey"
                ),
            );
            let settings = ProviderSettings {
                base_url: Some(bad.into()),
                ..Default::default()
            };
            let problems = policy_problems(&with_provider("openai", settings), Origin::Resource);
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains("must not carry credentials"))
                    && problems.iter().all(|p| !p.contains("SECRET")),
                "{problems:?}"
            );
        }
        // Other problems do not repeat them either, nor what may be a password a '/' cut short.
        for bad in [
            "ftp://user:sk-SECRET@x.example",
            "https://user:sk-SE/CRET@x.example/v1",
            "https://user:sk-SECRET@x.example:port",
        ] {
            let msg = base_url_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(!msg.contains("SECRET") && !msg.contains("sk-SE"), "{msg}");
        }
        // An '@' in the path is no userinfo.
        for ok in [
            "https://api.cloudflare.com/client/v4/accounts/acc1/ai/run/@cf/meta/llama",
            "https://gw.example.com:8443/v1/@team/models",
        ] {
            assert_eq!(base_url_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn built_in_providers_take_no_format_or_auth_settings() {
        for settings in [
            ProviderSettings {
                format: Some(crate::policy::ApiFormat::Anthropic),
                ..Default::default()
            },
            ProviderSettings {
                auth_header: Some("x-key".into()),
                ..Default::default()
            },
            ProviderSettings {
                auth_scheme: Some("Token".into()),
                ..Default::default()
            },
        ] {
            let problems = policy_problems(&with_provider("openai", settings), Origin::File);
            assert_eq!(
                problems,
                [
                    "spec.providers.openai: format, authHeader and authScheme apply to custom-<slug> providers only"
                ]
            );
        }
    }

    #[test]
    fn custom_providers_need_a_header_name_and_a_one_word_scheme() {
        let custom = |header: Option<&str>, scheme: Option<&str>| ProviderSettings {
            base_url: Some("https://llm.example.com/v1".into()),
            auth_header: header.map(Into::into),
            auth_scheme: scheme.map(Into::into),
            ..Default::default()
        };
        for (header, scheme) in [
            (None, None),
            (Some("x-api-key"), None),
            (Some("X-Api-Key"), Some("Token")),
            (None, Some("")),
        ] {
            assert_eq!(provider_problem("custom-x", &custom(header, scheme)), None);
        }
        for (header, scheme, why) in [
            (
                Some("x api key"),
                None,
                "authHeader \"x api key\" is not a header name",
            ),
            (Some(""), None, "is not a header name"),
            (Some("x:y"), None, "is not a header name"),
            (
                None,
                Some("Bearer token"),
                "authScheme \"Bearer token\" must be a single word",
            ),
            (None, Some("Bea\trer"), "must be a single word"),
            (None, Some("Bearér"), "must be a single word"),
        ] {
            let msg = provider_problem("custom-x", &custom(header, scheme)).expect("refused");
            assert!(msg.contains(why), "{msg}");
        }
        assert_eq!(
            provider_problem("custom-x", &ProviderSettings::default()).as_deref(),
            Some("custom providers need a baseURL")
        );
        assert!(provider_problem("ollama", &custom(None, None)).is_some());
    }

    #[test]
    fn redis_is_referenced_in_a_resource_and_a_file_in_a_config_file() {
        let policy = GatewayPolicy {
            redis: Some(crate::policy::Redis::default()),
            ..GatewayPolicy::default()
        };
        assert_eq!(
            policy_problems(&policy, Origin::Resource),
            ["spec.redis needs urlSecretRef (a Secret key holding the Redis URL)"]
        );
        assert!(policy_problems(&policy, Origin::File).is_empty());
        let referenced = GatewayPolicy {
            redis: Some(crate::policy::Redis {
                url_secret_ref: Some(crate::policy::SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                }),
            }),
            ..GatewayPolicy::default()
        };
        assert!(policy_problems(&referenced, Origin::Resource).is_empty());
        assert!(policy_problems(&referenced, Origin::File)[0].contains("resolved by the operator"));
    }

    #[test]
    fn a_moderation_url_with_credentials_is_refused_without_them() {
        let policy = |url: &str| GatewayPolicy {
            guardrails: Some(crate::policy::Guardrails {
                moderation_url: Some(url.into()),
                ..Default::default()
            }),
            ..GatewayPolicy::default()
        };
        let problems = policy_problems(
            &policy("https://user:sk-mod-SECRET@moderation.example.com/v1/moderations"),
            Origin::File,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("must not carry credentials"),
            "{problems:?}"
        );
        assert!(!problems[0].contains("SECRET"), "{problems:?}");
        assert!(
            policy_problems(
                &policy("https://moderation.example.com/v1/moderations"),
                Origin::File
            )
            .is_empty()
        );
    }
}
