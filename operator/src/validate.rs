//! Checks of an AIGateway spec that the CRD schema cannot express: upstream URL policy (which
//! needs the object's annotations), value ranges of unit strings, dynamic route graphs, selectors.
//! Each problem names the field, so the `ConfigRendered` condition tells a person what to fix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube::{Resource, ResourceExt};
use sidegate_crds::api::{AIGateway, ALLOW_INSECURE_UPSTREAM_ANNOTATION};

use crate::render::parse_selector;

/// Whether an object opts out of the upstream URL policy with the annotation.
pub fn allows_insecure<K: Resource>(obj: &K) -> bool {
    obj.annotations()
        .get(ALLOW_INSECURE_UPSTREAM_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// Checks an upstream URL: https anywhere; plain http only to in-cluster hosts (a single-label
/// service name, `<service>.<namespace of the object>`, `*.svc[.<cluster domain>]`, loopback or a
/// private address); never link-local or cloud metadata addresses, which would hand keys or
/// credentials to the node's metadata service. `allow_insecure` lifts both rules.
/// The error completes the sentence "baseURL ...".
pub fn upstream_url(url: &str, namespace: &str, allow_insecure: bool) -> Result<(), String> {
    // Placeholders such as {resource} or {region} are filled in by the sidecar per request.
    let concrete = fill_placeholders(url);
    let uri: http::Uri = concrete
        .parse()
        .map_err(|_| format!("'{url}' is not an absolute URL"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    let host = uri
        .host()
        .ok_or_else(|| format!("'{url}' has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(format!("'{url}' must use https"));
    }
    if allow_insecure {
        return Ok(());
    }
    let hint = format!("set annotation {ALLOW_INSECURE_UPSTREAM_ANNOTATION}: \"true\" to allow it");
    if is_metadata_host(&host) {
        return Err(format!(
            "'{url}' points at a link-local or cloud metadata address; {hint}"
        ));
    }
    if scheme == "http" && !is_in_cluster_host(&host, namespace) {
        return Err(format!(
            "'{url}' uses plain http outside the cluster; use https, or {hint}"
        ));
    }
    Ok(())
}

fn fill_placeholders(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut in_placeholder = false;
    for c in url.chars() {
        match c {
            '{' => in_placeholder = true,
            '}' if in_placeholder => {
                in_placeholder = false;
                out.push('x');
            }
            _ if in_placeholder => {}
            _ => out.push(c),
        }
    }
    out
}

fn is_metadata_host(host: &str) -> bool {
    if matches!(
        host,
        "metadata" | "metadata.google.internal" | "instance-data" | "instance-data.ec2.internal"
    ) {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_link_local() || ip == Ipv4Addr::new(100, 100, 100, 200),
        Ok(IpAddr::V6(ip)) => {
            (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
        Err(_) => false,
    }
}

fn is_in_cluster_host(host: &str, namespace: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xfe00) == 0xfc00,
        Err(_) => {
            let labels: Vec<&str> = host.split('.').collect();
            host == "localhost"
                || labels.len() == 1
                || (labels.len() == 2 && labels[1] == namespace)
                || labels.get(2) == Some(&"svc")
        }
    }
}

/// Every problem of the gateway's spec, each naming its field; empty when the spec is valid.
pub fn gateway(gw: &AIGateway) -> Vec<String> {
    let mut problems = Vec::new();
    let namespace = gw.namespace().unwrap_or_default();
    let insecure = allows_insecure(gw);
    let spec = &gw.spec;
    let policy = &spec.policy;

    if let Some(sel) = &spec.provider_key_selector
        && let Err(e) = parse_selector(sel)
    {
        problems.push(format!("providerKeySelector is invalid: {e}"));
    }
    for (provider, settings) in &policy.providers {
        if let Some(url) = &settings.base_url
            && let Err(why) = upstream_url(url, &namespace, insecure)
        {
            problems.push(format!("providers.{provider}.baseURL {why}"));
        }
        if provider.starts_with("custom-") && settings.base_url.is_none() {
            problems.push(format!(
                "providers.{provider} needs a baseURL (custom providers have no default)"
            ));
        }
    }
    if let Some(url) = policy
        .guardrails
        .as_ref()
        .and_then(|g| g.moderation_url.as_ref())
        && let Err(why) = upstream_url(url, &namespace, insecure)
    {
        problems.push(format!("guardrails.moderationURL {why}"));
    }
    if let Some(why) = policy.cache.as_ref().and_then(|c| c.problem()) {
        problems.push(why);
    }
    if let Some(why) = policy.open_telemetry_problem() {
        // The sidecar refuses the same config with the same message.
        problems.push(why);
    }
    if let Some(why) = policy.cost_problem() {
        // The sidecar refuses the same config with the same message.
        problems.push(why);
    }
    if policy
        .rate_limit
        .as_ref()
        .is_some_and(|r| r.tokens_per_minute == Some(0))
    {
        problems.push("spec.rateLimit.tokensPerMinute must be larger than 0".into());
    }
    if policy.redis.is_none()
        && policy
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.scope == sidegate_crds::policy::RateLimitScope::Global)
    {
        problems.push(
            "rateLimit.scope global needs the redis block (limits are counted in Redis)".into(),
        );
    }
    if let Err(why) = sidegate_crds::routes::compile(&policy.routes, &policy.fallbacks, |id| {
        sidegate_crds::provider::BUILTIN_PROVIDERS.contains(&id)
            || policy.providers.contains_key(id)
    }) {
        // The sidecar refuses the same config with the same message.
        problems.push(why);
    }
    if let Some(g) = &policy.guardrails {
        for (side, map) in [("prompt", &g.prompt), ("response", &g.response)] {
            for c in map.keys() {
                if !sidegate_crds::policy::GUARDRAIL_CATEGORIES.contains(&c.as_str()) {
                    problems.push(format!(
                        "guardrails.{side}: unknown category {c:?} (known: {})",
                        sidegate_crds::policy::GUARDRAIL_CATEGORIES.join(", ")
                    ));
                }
            }
        }
        if (!g.prompt.is_empty() || !g.response.is_empty()) && g.moderation_url.is_none() {
            problems.push(
                "guardrails.moderationURL is required when prompt or response categories are set"
                    .into(),
            );
        }
    }
    for (i, p) in policy.dlp.iter().flat_map(|d| &d.policies).enumerate() {
        for name in &p.profiles {
            if !sidegate_crds::policy::DLP_PROFILES.contains(&name.as_str()) {
                problems.push(format!(
                    "dlp.policies[{i}].profiles: unknown profile {name:?} (known: {})",
                    sidegate_crds::policy::DLP_PROFILES.join(", ")
                ));
            }
        }
    }
    if let Some(retries) = &policy.retries
        && let Some(delay) = retries.retry_delay
        && delay.get() > std::time::Duration::from_secs(5)
    {
        problems.push(format!("retries.retryDelay {delay} must be at most 5s"));
    }
    if let Some(rl) = &policy.rate_limit
        && rl.interval.get().is_zero()
    {
        problems.push("rateLimit.interval must be longer than 0s".to_owned());
    }
    if let Some(t) = policy.request_timeout
        && t.get().is_zero()
    {
        problems.push("requestTimeout must be longer than 0ms".to_owned());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_upstreams_are_allowed_anywhere() {
        assert_eq!(
            upstream_url("https://api.openai.com/v1", "team-a", false),
            Ok(())
        );
        assert_eq!(
            upstream_url(
                "https://{resource}.openai.azure.com/openai/deployments/{deployment}",
                "team-a",
                false
            ),
            Ok(())
        );
    }

    #[test]
    fn plain_http_is_allowed_only_to_in_cluster_hosts() {
        for ok in [
            "http://ollama:11434/v1",
            "http://ollama.team-a:11434/v1",
            "http://ollama.models.svc:11434",
            "http://ollama.models.svc.cluster.local/v1",
            "http://10.0.0.7:8080",
            "http://127.0.0.1:9000",
        ] {
            assert_eq!(upstream_url(ok, "team-a", false), Ok(()), "{ok}");
        }
        for bad in [
            "http://evil.example.com/v1",
            "http://ollama.other-ns:11434",
            "http://8.8.8.8/",
        ] {
            let err = upstream_url(bad, "team-a", false).expect_err(bad);
            assert!(err.contains("plain http outside the cluster"), "{err}");
            assert!(err.contains(ALLOW_INSECURE_UPSTREAM_ANNOTATION), "{err}");
        }
        assert_eq!(
            upstream_url("http://evil.example.com", "team-a", true),
            Ok(())
        );
    }

    #[test]
    fn metadata_addresses_are_refused_even_over_https() {
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "https://169.254.169.254/",
            "http://metadata.google.internal/computeMetadata/v1",
            "http://[fd00:ec2::254]/",
            "https://[fe80::1]/",
        ] {
            let err = upstream_url(bad, "team-a", false).expect_err(bad);
            assert!(err.contains("metadata"), "{err}");
        }
    }

    #[test]
    fn non_urls_and_other_schemes_are_refused() {
        assert!(upstream_url("api.openai.com", "ns", false).is_err());
        assert!(upstream_url("ftp://x.example/", "ns", true).is_err());
    }

    #[test]
    fn what_the_sidecar_would_refuse_is_a_spec_problem() {
        use sidegate_crds::api::AIGatewaySpec;
        use sidegate_crds::policy::{
            Cache, CacheBackend, GatewayPolicy, Logging, RateLimit, RateLimitScope, Redis,
        };
        let policy = GatewayPolicy {
            logging: Some(Logging {
                payloads: true,
                ..Logging::default()
            }),
            ..GatewayPolicy::default()
        };
        let mut gw = AIGateway::new(
            "main",
            AIGatewaySpec {
                policy,
                ..AIGatewaySpec::default()
            },
        );
        gw.metadata.namespace = Some("team-a".into());
        // Payload logging, the memory and redis caches and global rate limits are served.
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        gw.spec.policy.cache = Some(Cache {
            enabled: true,
            backend: CacheBackend::Redis,
            ..Cache::default()
        });
        gw.spec.policy.redis = Some(Redis::default());
        gw.spec.policy.rate_limit = Some(RateLimit {
            limit: 10,
            interval: sidegate_crds::units::Duration::from_secs(60),
            technique: Default::default(),
            scope: RateLimitScope::Global,
            tokens_per_minute: None,
        });
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        // A route the sidecar would refuse is a spec problem with the sidecar's message.
        gw.spec.policy.routes = vec![sidegate_crds::policy::DynamicRoute {
            name: "r".into(),
            nodes: vec![],
        }];
        assert!(
            gateway(&gw)
                .iter()
                .any(|p| p.starts_with("spec.routes[0]: no start node")),
            "{:?}",
            gateway(&gw)
        );
        gw.spec.policy.routes.clear();
        // Guardrail categories are checked against the moderation API's.
        let mut g = sidegate_crds::policy::Guardrails {
            moderation_url: Some("http://moderation.team-a:8080/v1/moderations".into()),
            ..Default::default()
        };
        g.prompt
            .insert("gore".into(), sidegate_crds::policy::GuardrailAction::Block);
        gw.spec.policy.guardrails = Some(g);
        assert!(
            gateway(&gw)
                .iter()
                .any(|p| p.starts_with("guardrails.prompt: unknown category \"gore\"")),
            "{:?}",
            gateway(&gw)
        );
        gw.spec.policy.guardrails = None;
        // An OpenTelemetry collector anywhere (spans carry no keys), over http or https.
        gw.spec.policy.open_telemetry = Some(sidegate_crds::policy::OpenTelemetry {
            endpoint: "http://otel-collector.observability:4318".into(),
            service_name: Some("checkout".into()),
        });
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        if let Some(o) = gw.spec.policy.open_telemetry.as_mut() {
            o.endpoint = "otel-collector:4317".into();
        }
        assert!(
            gateway(&gw).iter().any(|p| p.starts_with(
                "spec.openTelemetry.endpoint \"otel-collector:4317\" must be an http:// or https:// URL"
            )),
            "{:?}",
            gateway(&gw)
        );
        gw.spec.policy.open_telemetry = None;
        // Spend limits, prices and token budgets are served; amounts and prices are checked.
        gw.spec.policy.spend_limit = Some(sidegate_crds::policy::SpendLimit {
            amount: "250.00".into(),
            period: sidegate_crds::policy::SpendPeriod::Month,
        });
        gw.spec.policy.pricing = vec![sidegate_crds::policy::ModelPrice {
            model: "house-llm".into(),
            input_per_million: "0.5".into(),
            output_per_million: "1.5".into(),
        }];
        if let Some(rl) = gw.spec.policy.rate_limit.as_mut() {
            rl.tokens_per_minute = Some(100_000);
        }
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        gw.spec.policy.spend_limit = Some(sidegate_crds::policy::SpendLimit {
            amount: "a lot".into(),
            period: sidegate_crds::policy::SpendPeriod::Day,
        });
        gw.spec.policy.pricing[0].input_per_million = "cheap".into();
        if let Some(rl) = gw.spec.policy.rate_limit.as_mut() {
            rl.tokens_per_minute = Some(0);
        }
        let problems = gateway(&gw);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.spendLimit.amount \"a lot\" must be a positive")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p == "spec.rateLimit.tokensPerMinute must be larger than 0"),
            "{problems:?}"
        );
        gw.spec.policy.spend_limit = None;
        assert!(
            gateway(&gw)
                .iter()
                .any(|p| p.starts_with("spec.pricing[0].inputPerMillion \"cheap\"")),
            "{:?}",
            gateway(&gw)
        );
        gw.spec.policy.pricing.clear();
        if let Some(rl) = gw.spec.policy.rate_limit.as_mut() {
            rl.tokens_per_minute = None;
        }
        gw.spec.policy.redis = None;
        assert!(
            gateway(&gw)
                .iter()
                .any(|p| p.starts_with("rateLimit.scope global needs the redis block")),
        );
    }
}
