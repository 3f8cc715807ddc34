//! Checks of an AIGateway spec that the CRD schema cannot express. The checks the sidecar makes
//! at load are [`sidegate_crds::validation`]'s, called here as there, so a spec the operator
//! renders is one every sidecar loads; this module adds what only the operator can check: the
//! upstream URL policy (which needs the object's namespace and annotations), selectors, and the
//! sidecar's resources (which the sidecar never sees, but the apiserver checks on every pod).
//! Each problem names the field, so the `ConfigRendered` condition tells a person what to fix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube::{Resource, ResourceExt};
use sidegate_crds::api::{AIGateway, ALLOW_INSECURE_UPSTREAM_ANNOTATION, ProviderKey};
use sidegate_crds::validation::{self, Origin};

use crate::render::parse_selector;
use crate::resources;

/// The cluster DNS domain in-cluster service names end in. Kubernetes' default; the operator
/// has no setting for another (a cluster with another domain names its services
/// `<service>.<namespace>.svc` or uses https).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Whether an object opts out of the upstream URL policy with the annotation.
pub fn allows_insecure<K: Resource>(obj: &K) -> bool {
    obj.annotations()
        .get(ALLOW_INSECURE_UPSTREAM_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// Why a ProviderKey's `baseURL` is refused, if it is (the reason completes "baseURL ...").
/// Only the key's own annotation lifts the URL policy for it, never a gateway's.
pub fn provider_key_base_url(key: &ProviderKey, namespace: &str) -> Option<String> {
    let url = key.spec.base_url.as_deref()?;
    base_url(url, namespace, allows_insecure(key)).err()
}

/// Checks a provider base URL (a gateway's `providers.<id>.baseURL` or a ProviderKey's
/// `baseURL`): what the sidecar accepts ([`validation::base_url_problem`]), then the upstream
/// URL policy ([`upstream_url`]). The error completes the sentence "baseURL ...".
pub fn base_url(url: &str, namespace: &str, allow_insecure: bool) -> Result<(), String> {
    match validation::base_url_problem(url) {
        Some(why) => Err(why),
        None => upstream_url(url, namespace, allow_insecure),
    }
}

/// Checks an upstream URL: https anywhere; plain http only to in-cluster hosts (see
/// [`is_in_cluster_host`]); never link-local or cloud metadata addresses, in any spelling the
/// sidecar's resolver accepts, which would hand keys or credentials to the node's metadata
/// service. `allow_insecure` lifts both rules. The error completes the sentence "baseURL ...".
pub fn upstream_url(url: &str, namespace: &str, allow_insecure: bool) -> Result<(), String> {
    // Placeholders such as {resource} or {region} are filled in by the sidecar per request.
    let concrete = fill_placeholders(url);
    let uri: http::Uri = concrete
        .parse()
        .map_err(|_| format!("'{url}' is not an absolute URL"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    let host = uri.host().ok_or_else(|| format!("'{url}' has no host"))?;
    let host = normalize_host(host);
    if scheme != "https" && scheme != "http" {
        return Err(format!("'{url}' must use https"));
    }
    if allow_insecure {
        return Ok(());
    }
    let hint = format!("set annotation {ALLOW_INSECURE_UPSTREAM_ANNOTATION}: \"true\" to allow it");
    if placeholders_could_spell_an_address(url) {
        return Err(format!(
            "'{url}' has a host that the placeholders a request fills in could turn into any IP address, a metadata address too; name the host; {hint}"
        ));
    }
    if is_metadata_host(&host) {
        return Err(format!(
            "'{url}' points at a link-local or cloud metadata address; {hint}"
        ));
    }
    if scheme == "http" && !is_in_cluster_host(&host, namespace) {
        return Err(format!(
            "'{url}' uses plain http outside the cluster (in-cluster: <service>, <service>.<namespace>.svc[.{CLUSTER_DOMAIN}], <service>.<this namespace> if the namespace has a digit or dash, loopback or private addresses); use https, or {hint}"
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

/// The host as a resolver sees it: lower case, without IPv6 brackets or the trailing dot of an
/// absolute name.
fn normalize_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Whether the host of `url` has placeholders and could be an IPv4 address once a request fills
/// them in: a placeholder takes any letters, digits and dashes, so a host whose every label is
/// placeholders and hex digits (`{resource}`, `{region}.254`) could be `2852039166` or
/// `169.254.169.254`.
fn placeholders_could_spell_an_address(url: &str) -> bool {
    let authority = url.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or("")
    });
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) if !host_port.ends_with(']') => h,
        _ => host_port,
    };
    if !host.contains('{') {
        return false;
    }
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() <= 4
        && labels.iter().all(|label| {
            if label.contains('{') {
                fill_placeholders(label)
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'x' || b == b'X')
            } else {
                c_number(label).is_some()
            }
        })
}

/// The IPv4 address `host` denotes to `inet_aton`, and so to glibc's `getaddrinfo`, which the
/// sidecar's connector resolves names with: 1 to 4 dot-separated numbers, each decimal, `0x`
/// hex or `0` octal, the last one filling the bytes left (`2852039166`, `0xa9fea9fe`,
/// `0251.0376.0251.0376` and `169.254.43518` are all 169.254.169.254).
pub fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts = host
        .split('.')
        .map(c_number)
        .collect::<Option<Vec<u32>>>()?;
    let (&last, leading) = parts.split_last()?;
    if leading.len() > 3 || leading.iter().any(|&p| p > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * leading.len();
    if u64::from(last) >= 1u64 << last_bits {
        return None;
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &p)| acc | (p << (24 - 8 * i)));
    Some(Ipv4Addr::from(high | last))
}

/// A number as C's `strtoul` reads it with base 0, at most 32 bits: `0x1f`, `017`, `15`.
fn c_number(s: &str) -> Option<u32> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None if s.len() > 1 && s.starts_with('0') => (&s[1..], 8),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

/// The address a host names without a DNS lookup: an IP literal, or a number `inet_aton` reads.
fn literal_address(host: &str) -> Option<IpAddr> {
    host.parse::<IpAddr>()
        .ok()
        .or_else(|| inet_aton(host).map(IpAddr::V4))
}

/// The IPv4 address inside an IPv6 one that reaches it: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = ip.octets();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    ip.to_ipv4()
}

fn is_metadata_v4(ip: Ipv4Addr) -> bool {
    ip.is_link_local() || ip == Ipv4Addr::new(100, 100, 100, 200)
}

fn is_metadata_host(host: &str) -> bool {
    if matches!(
        host,
        "metadata" | "metadata.google.internal" | "instance-data" | "instance-data.ec2.internal"
    ) {
        return true;
    }
    match literal_address(host) {
        Some(IpAddr::V4(ip)) => is_metadata_v4(ip),
        Some(IpAddr::V6(ip)) => {
            (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || embedded_ipv4(ip).is_some_and(is_metadata_v4)
        }
        None => false,
    }
}

/// Whether plain http to `host` stays in the cluster (or the node): loopback and private
/// addresses, `localhost`, and the names of Services as the pod's resolver finds them:
///
/// - `<service>`: a single label, searched in the pod's namespace first;
/// - `<service>.<namespace>.svc` and `<service>.<namespace>.svc.cluster.local` (also with a
///   StatefulSet pod's hostname in front): `svc` and `local` are no public top-level domains;
/// - `<service>.<namespace>` only for the object's own namespace, and only when that namespace
///   has a digit or a dash (not `xn--`): a name such as `openai.ai` is searched as
///   `openai.ai.svc.cluster.local` first, but when no such Service exists the resolver goes on to
///   the public `openai.ai`; a namespace of letters only could be a top-level domain.
fn is_in_cluster_host(host: &str, namespace: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    let private_v4 = |ip: Ipv4Addr| ip.is_loopback() || ip.is_private();
    match literal_address(host) {
        Some(IpAddr::V4(ip)) => private_v4(ip),
        Some(IpAddr::V6(ip)) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || ip.to_ipv4_mapped().is_some_and(private_v4)
        }
        None => is_service_name(host, namespace),
    }
}

fn is_service_name(host: &str, namespace: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    if !labels.iter().all(|l| is_dns_label(l)) {
        return false;
    }
    // `<service>.<namespace>`, with a StatefulSet pod's hostname in front or not.
    let service_in_namespace = |name: &str| (2..=3).contains(&name.split('.').count());
    if let Some(name) = host.strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}")) {
        return service_in_namespace(name);
    }
    if let Some(name) = host.strip_suffix(".svc") {
        return service_in_namespace(name);
    }
    match labels[..] {
        [_] => true,
        [_, ns] => ns == namespace && !could_be_top_level_domain(ns),
        _ => false,
    }
}

/// A DNS subdomain as Kubernetes names most objects (RFC 1123: lowercase letters, digits, `-`
/// and `.`, starting and ending with a letter or digit), of at most `max` characters.
pub fn is_dns_subdomain(name: &str, max: usize) -> bool {
    let b = name.as_bytes();
    (1..=max).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS label as Kubernetes names Services and namespaces (RFC 1123).
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Whether `label` could be a public top-level domain, today or once delegated: those are
/// letters only, or IDNs (`xn--...`).
fn could_be_top_level_domain(label: &str) -> bool {
    label.bytes().all(|b| b.is_ascii_alphabetic()) || label.starts_with("xn--")
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
        problems.push(format!("spec.providerKeySelector is invalid: {e}"));
    }
    // What the sidecar would refuse, with the sidecar's messages.
    problems.extend(validation::policy_problems(policy, Origin::Resource));
    // The URL policy, for URLs the sidecar accepts (the others are reported above).
    for (provider, settings) in &policy.providers {
        if let Some(url) = &settings.base_url
            && validation::base_url_problem(url).is_none()
            && let Err(why) = upstream_url(url, &namespace, insecure)
        {
            problems.push(format!("spec.providers.{provider}.baseURL {why}"));
        }
    }
    if let Some(url) = policy
        .guardrails
        .as_ref()
        .and_then(|g| g.moderation_url.as_ref())
        && validation::is_http_url(url)
        && let Err(why) = upstream_url(url, &namespace, insecure)
    {
        problems.push(format!("spec.guardrails.moderationURL {why}"));
    }
    if let Some(found) = sidecar_resources_problem(gw) {
        problems.push(found);
    }
    problems
}

/// Why the webhook will not inject the gateway's sidecar with its `spec.sidecar.resources`, if
/// it will not: the apiserver would refuse every pod carrying them (see [`resources::problems`]).
pub fn sidecar_resources_problem(gw: &AIGateway) -> Option<String> {
    let requested = gw.spec.sidecar.as_ref()?.resources.as_ref()?;
    let found = resources::problems(requested, "spec.sidecar.resources");
    (!found.is_empty()).then(|| {
        format!(
            "{}; the apiserver would refuse pods with such a sidecar, so pods naming this gateway are created without it until this is fixed",
            found.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidegate_crds::api::AIGatewaySpec;

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
            "http://ollama.models.svc.cluster.local./v1",
            "http://ollama-0.ollama.models.svc:11434",
            "http://ollama-0.ollama.models.svc.cluster.local:11434",
            "http://localhost:8080",
            "http://10.0.0.7:8080",
            "http://127.0.0.1:9000",
            "http://[::1]:9000",
            "http://[fd12::7]:9000",
            // Spellings of private addresses are private addresses.
            "http://167772167:8080",
            "http://10.7:8080",
        ] {
            assert_eq!(upstream_url(ok, "team-a", false), Ok(()), "{ok}");
        }
        for (bad, namespace) in [
            ("http://evil.example.com/v1", "team-a"),
            ("http://ollama.other-ns:11434", "team-a"),
            ("http://8.8.8.8/", "team-a"),
            ("http://134744072/", "team-a"),
            // A third label `svc` is not the cluster's: only `.svc` and `.svc.cluster.local` end
            // an in-cluster name.
            ("http://a.b.svc.example.com/v1", "team-a"),
            ("http://a.b.svc.cluster.example/v1", "team-a"),
            ("http://a.b.c.d.svc/v1", "team-a"),
            ("http://svc.cluster.local/v1", "team-a"),
            // The object's own namespace, but one that could be a top-level domain: the resolver
            // goes on to the public name when no such Service exists.
            ("http://openai.ai/v1", "ai"),
            ("http://ollama.models:11434", "models"),
            ("http://example.xn--p1ai/v1", "xn--p1ai"),
        ] {
            let err = upstream_url(bad, namespace, false).expect_err(bad);
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
            "http://metadata.google.internal./computeMetadata/v1",
            "http://[fd00:ec2::254]/",
            "https://[fe80::1]/",
            "http://100.100.100.200/latest/meta-data",
        ] {
            let err = upstream_url(bad, "team-a", false).expect_err(bad);
            assert!(err.contains("metadata"), "{err}");
        }
    }

    #[test]
    fn every_spelling_of_a_metadata_address_is_refused() {
        // What inet_aton, and so glibc's getaddrinfo, reads as 169.254.169.254.
        for bad in [
            "http://2852039166/",
            "http://0xa9fea9fe/",
            "http://0XA9FEA9FE/",
            "http://0251.0376.0251.0376/",
            "http://169.254.43518/",
            "http://169.16689662/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://0x00000000a9fea9fe/",
            "https://2852039166/",
            "http://169.254.169.254./",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[::169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            // Alibaba Cloud's 100.100.100.200.
            "http://1684301000/",
        ] {
            let err = upstream_url(bad, "team-a", false).expect_err(bad);
            assert!(err.contains("metadata"), "{bad}: {err}");
        }
        assert_eq!(
            inet_aton("2852039166"),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
        assert_eq!(inet_aton("1.2"), Some(Ipv4Addr::new(1, 0, 0, 2)));
        assert_eq!(inet_aton("1.2.3"), Some(Ipv4Addr::new(1, 2, 0, 3)));
        for not_a_number in [
            "",
            "1.",
            ".1",
            "1..2",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.16777216",
            "4294967296",
            "0x",
            "08",
            "1e3",
            "-1",
            "+1",
            "0x1g",
            "ollama",
            "a.b",
        ] {
            assert_eq!(inet_aton(not_a_number), None, "{not_a_number:?}");
        }
    }

    #[test]
    fn a_host_the_request_fills_in_cannot_become_an_address() {
        for bad in [
            "http://{resource}/v1",
            "https://{resource}/v1",
            "https://{region}.254/v1",
            "http://169.254.{region}.254/v1",
        ] {
            let err = upstream_url(bad, "team-a", false).expect_err(bad);
            assert!(
                err.contains("could turn into any IP address"),
                "{bad}: {err}"
            );
        }
        for ok in [
            "https://{region}-aiplatform.googleapis.com",
            "http://{resource}.team-a:8080/v1",
            "http://{resource}.models.svc:8080/v1",
        ] {
            assert_eq!(upstream_url(ok, "team-a", false), Ok(()), "{ok}");
        }
    }

    #[test]
    fn non_urls_and_other_schemes_are_refused() {
        assert!(upstream_url("api.openai.com", "ns", false).is_err());
        assert!(upstream_url("ftp://x.example/", "ns", true).is_err());
        assert!(base_url("https://x.example/v1?k=1", "ns", true).is_err());
    }

    fn gateway_with(spec: AIGatewaySpec) -> AIGateway {
        let mut gw = AIGateway::new("main", spec);
        gw.metadata.namespace = Some("team-a".into());
        gw
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        refused: Vec<Refused>,
        accepted: Vec<serde_json::Value>,
    }

    #[derive(serde::Deserialize)]
    struct Refused {
        spec: serde_json::Value,
        why: String,
    }

    fn fixture() -> Fixture {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/fixtures/refused-specs.yaml"
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        serde_saphyr::from_str(&text).expect("fixture parses")
    }

    #[test]
    fn every_spec_the_sidecar_refuses_is_a_spec_problem() {
        // The same list is loaded by the sidecar's tests (sidecar/src/config.rs), which refuse
        // each: the operator never marks a gateway Ready that its sidecars would not load.
        let f = fixture();
        assert!(f.refused.len() > 30);
        for case in f.refused {
            let spec: AIGatewaySpec =
                serde_json::from_value(case.spec.clone()).expect("spec decodes");
            let problems = gateway(&gateway_with(spec));
            assert!(
                problems.iter().any(|p| p.contains(&case.why)),
                "{}: expected {:?} in {problems:?}",
                case.spec,
                case.why
            );
        }
        for spec in f.accepted {
            let decoded: AIGatewaySpec = serde_json::from_value(spec.clone()).expect("decodes");
            assert_eq!(
                gateway(&gateway_with(decoded)),
                Vec::<String>::new(),
                "{spec}"
            );
        }
    }

    #[test]
    fn what_the_sidecar_serves_is_no_spec_problem() {
        use sidegate_crds::policy::{
            Cache, CacheBackend, GatewayPolicy, Logging, RateLimit, RateLimitScope, Redis,
            SecretKeyRef,
        };
        let policy = GatewayPolicy {
            logging: Some(Logging {
                payloads: true,
                ..Logging::default()
            }),
            ..GatewayPolicy::default()
        };
        let mut gw = gateway_with(AIGatewaySpec {
            policy,
            ..AIGatewaySpec::default()
        });
        // Payload logging, the memory and redis caches and global rate limits are served.
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        gw.spec.policy.cache = Some(Cache {
            enabled: true,
            backend: CacheBackend::Redis,
            ..Cache::default()
        });
        gw.spec.policy.redis = Some(Redis {
            url_secret_ref: Some(SecretKeyRef {
                name: "redis".into(),
                key: "url".into(),
            }),
        });
        gw.spec.policy.rate_limit = Some(RateLimit {
            limit: 10,
            interval: sidegate_crds::units::Duration::from_secs(60),
            technique: Default::default(),
            scope: RateLimitScope::Global,
            tokens_per_minute: Some(100_000),
        });
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
        // A Redis block without its Secret: the sidecar would find no Redis URL.
        gw.spec.policy.redis = Some(Redis::default());
        assert_eq!(
            gateway(&gw),
            ["spec.redis needs urlSecretRef (a Secret key holding the Redis URL)"]
        );
        gw.spec.policy.redis = None;
        assert!(
            gateway(&gw)
                .iter()
                .any(|p| p.starts_with("spec.rateLimit.scope: global needs spec.redis")),
            "{:?}",
            gateway(&gw)
        );
        // An OpenTelemetry collector anywhere (spans carry no keys), over http or https.
        gw.spec.policy = GatewayPolicy {
            open_telemetry: Some(sidegate_crds::policy::OpenTelemetry {
                endpoint: "http://otel-collector.observability:4318".into(),
                service_name: Some("checkout".into()),
            }),
            ..GatewayPolicy::default()
        };
        assert!(gateway(&gw).is_empty(), "{:?}", gateway(&gw));
    }

    fn annotated(mut obj: AIGateway, value: Option<&str>) -> AIGateway {
        obj.metadata.annotations =
            value.map(|v| [(ALLOW_INSECURE_UPSTREAM_ANNOTATION.to_owned(), v.to_owned())].into());
        obj
    }

    #[test]
    fn a_gateway_annotated_allow_insecure_upstream_may_use_http_and_link_local_upstreams_and_one_without_is_invalid_spec()
     {
        use crate::status::{GatewayObservation, gateway_conditions};
        let spec: AIGatewaySpec = serde_json::from_value(serde_json::json!({
            "providers": {
                "openai": {"baseURL": "http://api.example.com/v1"},
                "custom-node": {"baseURL": "http://169.254.169.254:8080/v1"}
            },
            "guardrails": {
                "moderationURL": "http://[fe80::1]/v1/moderations",
                "prompt": {"hate": "block"}
            }
        }))
        .expect("spec");
        let config_rendered = |gw: &AIGateway| {
            let obs = GatewayObservation {
                spec_problems: gateway(gw),
                ..GatewayObservation::default()
            };
            gateway_conditions(&obs)
                .into_iter()
                .find(|c| c.type_ == sidegate_crds::api::conditions::CONFIG_RENDERED)
                .map(|c| (c.ok, c.reason))
        };

        let allowed = annotated(gateway_with(spec.clone()), Some("true"));
        assert_eq!(gateway(&allowed), Vec::<String>::new());
        assert_ne!(
            config_rendered(&allowed),
            Some((false, "InvalidSpec".to_owned()))
        );

        // Only the exact value "true" opts out.
        for value in [None, Some("false"), Some("True"), Some("yes"), Some("")] {
            let gw = annotated(gateway_with(spec.clone()), value);
            let problems = gateway(&gw);
            assert_eq!(problems.len(), 3, "{value:?}: {problems:?}");
            assert!(
                problems[0].starts_with("spec.providers.custom-node.baseURL 'http://169.254.169.254:8080/v1' points at a link-local or cloud metadata address")
                    && problems[1].starts_with("spec.providers.openai.baseURL 'http://api.example.com/v1' uses plain http outside the cluster")
                    && problems[2].starts_with("spec.guardrails.moderationURL 'http://[fe80::1]/v1/moderations' points at a link-local"),
                "{value:?}: {problems:?}"
            );
            assert!(
                problems
                    .iter()
                    .all(|p| p.contains(ALLOW_INSECURE_UPSTREAM_ANNOTATION)),
                "the way out is named: {problems:?}"
            );
            assert_eq!(
                config_rendered(&gw),
                Some((false, "InvalidSpec".to_owned())),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_provider_key_annotated_allow_insecure_upstream_may_use_an_http_or_link_local_base_url_and_one_without_is_invalid_base_url()
     {
        use crate::status::{KeyObservation, provider_key_status};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use sidegate_crds::api::{ProviderKeySecretRef, ProviderKeySpec};
        let key = |url: &str, annotation: Option<&str>| {
            let mut pk = ProviderKey::new(
                "k",
                ProviderKeySpec {
                    provider: "custom-local".into(),
                    alias: "default".into(),
                    secret_ref: ProviderKeySecretRef {
                        name: "s".into(),
                        key: Some("k".into()),
                    },
                    base_url: Some(url.into()),
                    region: None,
                },
            );
            pk.metadata.namespace = Some("team-a".into());
            pk.metadata.annotations = annotation
                .map(|v| [(ALLOW_INSECURE_UPSTREAM_ANNOTATION.to_owned(), v.to_owned())].into());
            pk
        };
        let ready = |pk: &ProviderKey| {
            let problem = provider_key_base_url(pk, "team-a");
            let status = provider_key_status(
                None,
                KeyObservation {
                    generation: Some(1),
                    resolved: Ok(()),
                    base_url_problem: problem.as_deref(),
                    shadowed_by: None,
                },
                ("custom-local", "default"),
                &Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            );
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == sidegate_crds::api::conditions::READY)
                .map(|c| (c.status, c.reason, c.message))
                .expect("Ready")
        };
        for url in [
            "http://llm.example.com:8080/v1",
            "http://169.254.169.254/v1",
            "https://[fe80::1]/v1",
        ] {
            assert_eq!(
                provider_key_base_url(&key(url, Some("true")), "team-a"),
                None
            );
            let (status, reason, _) = ready(&key(url, Some("true")));
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("True", "Ready"),
                "{url}"
            );
            for value in [None, Some("false"), Some("TRUE")] {
                let (status, reason, message) = ready(&key(url, value));
                assert_eq!(
                    (status.as_str(), reason.as_str()),
                    ("False", "InvalidBaseURL"),
                    "{url} {value:?}"
                );
                assert!(
                    message.starts_with(&format!("baseURL '{url}'"))
                        && message.contains(ALLOW_INSECURE_UPSTREAM_ANNOTATION),
                    "{message}"
                );
            }
        }
        // A URL the sidecar cannot use stays refused with the annotation.
        assert!(
            provider_key_base_url(
                &key("http://llm.example.com/v1?x=1", Some("true")),
                "team-a"
            )
            .is_some()
        );
        // So does one with credentials, which the status does not repeat.
        for annotation in [None, Some("true")] {
            let (status, reason, message) = ready(&key(
                "https://user:sk-SECRET@api.example.com/v1",
                annotation,
            ));
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "InvalidBaseURL")
            );
            assert!(
                message.contains("must not carry credentials") && !message.contains("SECRET"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_gateway_provider_base_url_with_credentials_is_an_invalid_spec_that_does_not_repeat_them() {
        let gw = gateway_with(
            serde_json::from_value(serde_json::json!({
                "providers": {"openai": {"baseURL": "https://user:sk-SECRET@api.example.com/v1"}},
            }))
            .expect("spec"),
        );
        let problems = gateway(&gw);
        assert_eq!(
            problems,
            [
                "spec.providers.openai: baseURL \"https://***@api.example.com/v1\" must not carry credentials (user:password@ before the host): put keys in a ProviderKey"
            ]
        );
    }

    #[test]
    fn upstream_url_policy_problems_name_the_field() {
        let gw = gateway_with(
            serde_json::from_value(serde_json::json!({
                "providers": {"openai": {"baseURL": "http://api.example.com/v1"}},
                "guardrails": {
                    "moderationURL": "http://169.254.169.254/latest",
                    "prompt": {"hate": "block"}
                }
            }))
            .expect("spec"),
        );
        let problems = gateway(&gw);
        assert!(
            problems[0].starts_with(
                "spec.providers.openai.baseURL 'http://api.example.com/v1' uses plain http outside the cluster"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("spec.guardrails.moderationURL 'http://169.254.169.254/latest' points at a link-local or cloud metadata address"),
            "{problems:?}"
        );
    }

    #[test]
    fn sidecar_resources_the_apiserver_would_refuse_are_a_spec_problem() {
        let with_resources = |resources: serde_json::Value| {
            gateway_with(
                serde_json::from_value(serde_json::json!({"sidecar": {"resources": resources}}))
                    .expect("spec"),
            )
        };
        let fine = with_resources(serde_json::json!({
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "0.1", "memory": "128Mi"},
        }));
        assert_eq!(gateway(&fine), Vec::<String>::new());
        for (resources, names) in [
            (
                serde_json::json!({"requests": {"memory": "1Gi"}, "limits": {"memory": "256Mi"}}),
                "spec.sidecar.resources.requests.memory 1Gi is more than limits.memory 256Mi",
            ),
            (
                serde_json::json!({"requests": {"cpu": "abc"}}),
                "spec.sidecar.resources.requests.cpu \"abc\" is not a Kubernetes quantity",
            ),
            (
                serde_json::json!({"claims": [{"name": "gpu"}]}),
                "spec.sidecar.resources.claims is not allowed",
            ),
        ] {
            let problems = gateway(&with_resources(resources.clone()));
            assert_eq!(problems.len(), 1, "{resources}: {problems:?}");
            assert!(problems[0].starts_with(names), "{resources}: {problems:?}");
            assert!(
                problems[0].ends_with(
                    "pods naming this gateway are created without it until this is fixed"
                ),
                "{problems:?}"
            );
        }
    }
}
