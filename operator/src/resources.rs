//! The sidecar container's `resources`, checked as the apiserver checks a container's: a gateway
//! whose `spec.sidecar.resources` the apiserver would refuse would make every pod the webhook
//! injects be refused (the webhook itself succeeded, so `failurePolicy: Ignore` does not help).
//! [`problems`] finds those before any pod carries them; [`parse_quantity`] reads a Kubernetes
//! quantity (k8s-openapi keeps quantities as strings and has no parser).

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Resources the sidecar may ask for: a small proxy needs CPU, memory and at most some scratch
/// space, never GPUs, hugepages or other extended resources (which the apiserver checks by
/// other rules: requests equal to limits, limits required).
pub const SIDECAR_RESOURCE_NAMES: &[&str] = &["cpu", "memory", "ephemeral-storage"];

/// Largest exponent (`1e<n>`) accepted; larger values are far beyond any node anyway.
const MAX_EXPONENT: i32 = 100;

/// Why a string is not a Kubernetes quantity the apiserver accepts in a container's resources.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not `<number><suffix>` with a known suffix.
    #[error(
        "is not a Kubernetes quantity (a number with an optional suffix n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or e<exponent>, e.g. 100m, 0.5, 256Mi, 1G)"
    )]
    Format,
    /// Below zero.
    #[error("is negative")]
    Negative,
    /// Beyond what this parser represents (about 10^29): no node has that much of anything.
    #[error("is too large")]
    TooLarge,
}

/// The value of Kubernetes quantity `s` in billionths (`1` is `1_000_000_000`, `1m` is
/// `1_000_000`), rounded up to a whole billionth as the apiserver rounds. Surrounding spaces are
/// ignored, as the apiserver's JSON decoding ignores them.
pub fn parse_quantity(s: &str) -> Result<u128, QuantityError> {
    let s = s.trim();
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_len = rest
        .bytes()
        .position(|b| !(b.is_ascii_digit() || b == b'.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(QuantityError::Format);
    }
    let (decimal_exponent, binary_exponent) = suffix_exponents(suffix)?;

    // digits × 10^(9 + decimal exponent - fraction digits) × 2^binary exponent, exactly.
    let mut digits: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        digits = digits
            .checked_mul(10)
            .and_then(|d| d.checked_add(u128::from(b - b'0')))
            .ok_or(QuantityError::TooLarge)?;
    }
    if digits == 0 {
        return Ok(0);
    }
    if negative {
        return Err(QuantityError::Negative);
    }
    let scaled = digits
        .checked_mul(1u128 << binary_exponent)
        .ok_or(QuantityError::TooLarge)?;
    let fraction_digits = i32::try_from(fraction.len()).map_err(|_| QuantityError::TooLarge)?;
    let exponent = 9 + decimal_exponent - fraction_digits;
    if exponent >= 0 {
        let factor = u32::try_from(exponent)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or(QuantityError::TooLarge)?;
        scaled.checked_mul(factor).ok_or(QuantityError::TooLarge)
    } else {
        // Finer than a billionth: rounded up, so a positive value stays positive.
        Ok(u32::try_from(-exponent)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .map_or(1, |divisor| scaled.div_ceil(divisor)))
    }
}

/// The powers of ten and of two a quantity suffix multiplies by.
fn suffix_exponents(suffix: &str) -> Result<(i32, u32), QuantityError> {
    let exponents = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix
                .strip_prefix(['e', 'E'])
                .ok_or(QuantityError::Format)?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(QuantityError::Format);
            }
            let value: i32 = exponent.parse().map_err(|_| QuantityError::TooLarge)?;
            if value.abs() > MAX_EXPONENT {
                return Err(QuantityError::TooLarge);
            }
            (value, 0)
        }
    };
    Ok(exponents)
}

/// Every reason the apiserver would refuse `resources` on the sidecar container, each naming
/// its field under `path` (e.g. `spec.sidecar.resources`); empty when it would accept them.
/// Besides the apiserver's own rules (quantities, requests at most their limits, claims only of
/// the pod's resource claims, which an injected pod does not declare), only
/// [`SIDECAR_RESOURCE_NAMES`] are allowed.
pub fn problems(resources: &ResourceRequirements, path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if resources.claims.as_ref().is_some_and(|c| !c.is_empty()) {
        problems.push(format!(
            "{path}.claims is not allowed: the sidecar uses no resource claims, and a claim the pod does not declare makes the apiserver refuse the pod"
        ));
    }
    let lists = [
        ("limits", resources.limits.as_ref()),
        ("requests", resources.requests.as_ref()),
    ];
    for (list, quantities) in lists {
        for (name, Quantity(value)) in quantities.into_iter().flatten() {
            if !SIDECAR_RESOURCE_NAMES.contains(&name.as_str()) {
                problems.push(format!(
                    "{path}.{list}.{name} is not a resource the sidecar may ask for (only {})",
                    SIDECAR_RESOURCE_NAMES.join(", ")
                ));
            } else if let Err(why) = parse_quantity(value) {
                problems.push(format!("{path}.{list}.{name} {value:?} {why}"));
            }
        }
    }
    let limits = resources.limits.as_ref();
    for (name, Quantity(request)) in resources.requests.iter().flatten() {
        let Some(Quantity(limit)) = limits.and_then(|l| l.get(name)) else {
            continue;
        };
        if let (Ok(r), Ok(l)) = (parse_quantity(request), parse_quantity(limit))
            && r > l
        {
            problems.push(format!(
                "{path}.requests.{name} {request} is more than limits.{name} {limit} (a request may not exceed its limit)"
            ));
        }
    }
    problems
}

/// Resources pod-level `spec.resources` may name (Kubernetes' pod-level resources).
const POD_LEVEL_NAMES: [&str; 2] = ["cpu", "memory"];

/// The pod-level resources (`spec.resources`) of a pod the sidecar (`sidecar`, its resources)
/// joins, where they would no longer hold it; `None` when the pod sets none or they still fit.
/// The apiserver refuses pod-level requests below what the containers request together, and
/// requests above their limit; a pod with pod-level limits only and no container requests has
/// its requests defaulted to those limits (Guaranteed), which the sidecar's own requests would
/// change (the default becomes the sum of the containers' requests): such requests are
/// written as the limits. What grows grows by what the sidecar needs, no more.
pub fn pod_level_with_sidecar(
    spec: &PodSpec,
    sidecar: &ResourceRequirements,
) -> Option<ResourceRequirements> {
    let pod = spec.resources.as_ref()?;
    let mut grown = pod.clone();
    let mut changed = false;
    for name in POD_LEVEL_NAMES {
        let get = |list: Option<&std::collections::BTreeMap<String, Quantity>>| {
            list.and_then(|l| l.get(name))
                .and_then(|Quantity(q)| parse_quantity(q).ok())
        };
        let (pod_request, pod_limit) = (get(pod.requests.as_ref()), get(pod.limits.as_ref()));
        if pod_request.is_none() && pod_limit.is_none() {
            continue;
        }
        let request_of =
            |r: &ResourceRequirements| get(r.requests.as_ref()).or_else(|| get(r.limits.as_ref()));
        let of = |c: &Container| c.resources.as_ref().and_then(request_of);
        let restartable = |c: &&Container| c.restart_policy.as_deref() == Some("Always");
        let inits = spec.init_containers.iter().flatten();
        // What the containers ask for together: the app containers and native sidecars run
        // side by side (the sidecar with them); each regular init container runs alone, with
        // the sidecar (first of the init containers) and the native sidecars before it.
        let sidecar_request = request_of(sidecar).unwrap_or(0);
        let long_running: u128 = (spec
            .containers
            .iter()
            .chain(inits.clone().filter(restartable)))
        .filter_map(of)
        .sum::<u128>()
            + sidecar_request;
        let init_peak = inits
            .clone()
            .filter(|c| !restartable(c))
            .filter_map(of)
            .max()
            .map_or(0, |r| r + sidecar_request);
        let together = long_running.max(init_peak);
        let any_container_request = (spec.containers.iter().chain(inits)).any(|c| of(c).is_some());
        let request = match (pod_request, pod_limit) {
            (Some(r), _) if r < together => Some(together),
            (Some(_), _) => None,
            // Defaulted to the limit had the sidecar not come with requests of its own.
            (None, Some(l)) if !any_container_request => Some(l.max(together)),
            (None, _) => None,
        };
        // A request may not exceed its limit: the limit grows with it (the sidecar's own
        // limit is kept within the pod's by `cap_to_pod_limits`).
        let limit = pod_limit.and_then(|l| {
            let needed = request.or(pod_request).unwrap_or(together);
            (needed > l).then_some(needed)
        });
        if let Some(r) = request {
            grown
                .requests
                .get_or_insert_with(Default::default)
                .insert(name.to_owned(), Quantity(format_quantity(name, r)));
            changed = true;
        }
        if let Some(l) = limit {
            grown
                .limits
                .get_or_insert_with(Default::default)
                .insert(name.to_owned(), Quantity(format_quantity(name, l)));
            changed = true;
        }
    }
    changed.then_some(grown)
}

/// Keeps the sidecar's limits (and requests) within the pod-level limits of the pod it joins:
/// the apiserver refuses a container limit above the pod's, and the pod's limit is its whole
/// budget, which the sidecar shares rather than grows.
pub fn cap_to_pod_limits(spec: &PodSpec, sidecar: &mut ResourceRequirements) {
    let Some(pod_limits) = spec.resources.as_ref().and_then(|r| r.limits.as_ref()) else {
        return;
    };
    for name in POD_LEVEL_NAMES {
        let Some(cap) = pod_limits
            .get(name)
            .and_then(|Quantity(q)| parse_quantity(q).ok())
        else {
            continue;
        };
        for list in [sidecar.limits.as_mut(), sidecar.requests.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(q) = list.get_mut(name)
                && parse_quantity(&q.0).is_ok_and(|v| v > cap)
            {
                *q = Quantity(format_quantity(name, cap));
            }
        }
    }
}

/// A quantity of resource `name` in billionths as people write it: memory in `Gi`, `Mi` or
/// `Ki` where it divides, whole units, else thousandths (`550m`), else billionths.
fn format_quantity(name: &str, billionths: u128) -> String {
    let whole = billionths / 1_000_000_000;
    if billionths.is_multiple_of(1_000_000_000) {
        if name == "memory" && whole > 0 {
            for (suffix, unit) in [("Gi", 1u128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
                if whole.is_multiple_of(unit) {
                    return format!("{}{suffix}", whole / unit);
                }
            }
        }
        whole.to_string()
    } else if billionths.is_multiple_of(1_000_000) {
        format!("{}m", billionths / 1_000_000)
    } else {
        format!("{billionths}n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceClaim;

    #[test]
    fn pod_level_resources_grow_to_hold_the_sidecar_and_keep_their_qos() {
        fn requirements(
            requests: &[(&str, &str)],
            limits: &[(&str, &str)],
        ) -> ResourceRequirements {
            let list = |l: &[(&str, &str)]| {
                (!l.is_empty()).then(|| {
                    l.iter()
                        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                        .collect()
                })
            };
            ResourceRequirements {
                requests: list(requests),
                limits: list(limits),
                ..Default::default()
            }
        }
        let sidecar = requirements(&[("cpu", "50m"), ("memory", "32Mi")], &[("memory", "64Mi")]);
        let spec = |pod: ResourceRequirements, app: Option<ResourceRequirements>| PodSpec {
            resources: Some(pod),
            containers: vec![Container {
                name: "app".into(),
                resources: app,
                ..Default::default()
            }],
            ..Default::default()
        };
        // Sized for the app alone: requests grow by the sidecar's, memory's limit with them.
        let sized = spec(
            requirements(
                &[("cpu", "500m"), ("memory", "256Mi")],
                &[("cpu", "1"), ("memory", "256Mi")],
            ),
            Some(requirements(&[("cpu", "500m"), ("memory", "256Mi")], &[])),
        );
        assert_eq!(
            pod_level_with_sidecar(&sized, &sidecar),
            Some(requirements(
                &[("cpu", "550m"), ("memory", "288Mi")],
                &[("cpu", "1"), ("memory", "288Mi")]
            ))
        );
        // Limits only, no container requests: requests written as the limits (Guaranteed).
        let limited = spec(
            requirements(&[], &[("cpu", "1"), ("memory", "128Mi")]),
            None,
        );
        assert_eq!(
            pod_level_with_sidecar(&limited, &sidecar),
            Some(requirements(
                &[("cpu", "1"), ("memory", "128Mi")],
                &[("cpu", "1"), ("memory", "128Mi")]
            ))
        );
        // The sidecar's limit above the pod's: the sidecar's is lowered to it, the pod's kept.
        let mut capped = requirements(
            &[("cpu", "50m"), ("memory", "32Mi")],
            &[("memory", "256Mi")],
        );
        cap_to_pod_limits(&limited, &mut capped);
        assert_eq!(
            capped,
            requirements(
                &[("cpu", "50m"), ("memory", "32Mi")],
                &[("memory", "128Mi")]
            )
        );
        // Room enough, or no pod-level resources: nothing to change.
        let roomy = spec(requirements(&[("cpu", "2"), ("memory", "1Gi")], &[]), None);
        assert_eq!(pod_level_with_sidecar(&roomy, &sidecar), None);
        let none = PodSpec::default();
        assert_eq!(pod_level_with_sidecar(&none, &sidecar), None);
        assert_eq!(
            format_quantity("memory", 1536 * (1 << 20) * 1_000_000_000),
            "1536Mi"
        );
        assert_eq!(format_quantity("cpu", 1_500_000_000), "1500m");
    }

    const UNIT: u128 = 1_000_000_000;

    #[test]
    fn quantities_are_read_in_billionths_with_every_suffix() {
        for (text, nanos) in [
            ("0", 0),
            ("1", UNIT),
            ("+2", 2 * UNIT),
            ("100m", UNIT / 10),
            ("0.1", UNIT / 10),
            (".5", UNIT / 2),
            ("5.", 5 * UNIT),
            ("250u", 250_000),
            ("7n", 7),
            ("1k", 1_000 * UNIT),
            ("32M", 32_000_000 * UNIT),
            ("1G", 1_000_000_000 * UNIT),
            ("2T", 2_000_000_000_000 * UNIT),
            ("1P", 10u128.pow(15) * UNIT),
            ("1E", 10u128.pow(18) * UNIT),
            ("1Ki", 1024 * UNIT),
            ("256Mi", 256 * (1 << 20) * UNIT),
            ("1.5Gi", 3 * (1 << 29) * UNIT),
            ("1Ti", (1 << 40) * UNIT),
            ("1Pi", (1 << 50) * UNIT),
            ("1Ei", (1 << 60) * UNIT),
            ("1e3", 1_000 * UNIT),
            ("5E-3", 5 * UNIT / 1000),
            ("2e+2", 200 * UNIT),
            (" 64Mi ", 64 * (1 << 20) * UNIT),
            ("-0", 0),
            // Finer than a billionth rounds up, as the apiserver rounds.
            ("0.0000000001", 1),
            ("1e-20", 1),
        ] {
            assert_eq!(parse_quantity(text), Ok(nanos), "{text}");
        }
    }

    #[test]
    fn equal_amounts_in_different_spellings_compare_equal() {
        assert_eq!(parse_quantity("100m"), parse_quantity("0.1"));
        assert_eq!(parse_quantity("1Gi"), parse_quantity("1073741824"));
        assert_eq!(parse_quantity("1G"), parse_quantity("1e9"));
        assert!(parse_quantity("1Gi").expect("1Gi") > parse_quantity("1G").expect("1G"));
    }

    #[test]
    fn strings_that_are_not_quantities_are_refused() {
        for text in [
            "", "abc", "1 Gi", "1gi", "1MB", "Gi", ".", "1.2.3", "1e", "1e+", "e3", "0x10", "1Kii",
            "--1", "1,5",
        ] {
            assert_eq!(parse_quantity(text), Err(QuantityError::Format), "{text:?}");
        }
        assert_eq!(parse_quantity("-1"), Err(QuantityError::Negative));
        assert_eq!(parse_quantity("-100m"), Err(QuantityError::Negative));
        assert_eq!(parse_quantity("1e200"), Err(QuantityError::TooLarge));
        assert_eq!(
            parse_quantity(&"9".repeat(50)),
            Err(QuantityError::TooLarge)
        );
    }

    fn requirements(json: serde_json::Value) -> ResourceRequirements {
        serde_json::from_value(json).expect("ResourceRequirements")
    }

    #[test]
    fn requests_at_or_below_their_limits_in_any_spelling_are_accepted() {
        for json in [
            serde_json::json!({}),
            serde_json::json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
            serde_json::json!({"requests": {"cpu": "0.5", "memory": "1Gi"}, "limits": {"cpu": "500m", "memory": "1073741824"}}),
            // Without limits (a gateway's resources replace the defaults whole, limits too).
            serde_json::json!({"requests": {"memory": "1Gi"}}),
            serde_json::json!({"limits": {"cpu": "1", "ephemeral-storage": "64Mi"}}),
        ] {
            assert_eq!(
                problems(&requirements(json.clone()), "spec.sidecar.resources"),
                Vec::<String>::new(),
                "{json}"
            );
        }
    }

    #[test]
    fn what_the_apiserver_would_refuse_is_named_field_by_field() {
        let r = requirements(serde_json::json!({
            "requests": {"cpu": "abc", "memory": "1Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "-1", "memory": "256Mi"},
        }));
        assert_eq!(
            problems(&r, "spec.sidecar.resources"),
            vec![
                "spec.sidecar.resources.limits.cpu \"-1\" is negative".to_owned(),
                "spec.sidecar.resources.requests.cpu \"abc\" is not a Kubernetes quantity (a number with an optional suffix n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or e<exponent>, e.g. 100m, 0.5, 256Mi, 1G)".to_owned(),
                "spec.sidecar.resources.requests.nvidia.com/gpu is not a resource the sidecar may ask for (only cpu, memory, ephemeral-storage)".to_owned(),
                "spec.sidecar.resources.requests.memory 1Gi is more than limits.memory 256Mi (a request may not exceed its limit)".to_owned(),
            ]
        );
    }

    #[test]
    fn resource_claims_are_refused() {
        let r = ResourceRequirements {
            claims: Some(vec![ResourceClaim {
                name: "gpu".into(),
                ..ResourceClaim::default()
            }]),
            ..ResourceRequirements::default()
        };
        let found = problems(&r, "spec.sidecar.resources");
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("spec.sidecar.resources.claims is not allowed"),
            "{found:?}"
        );
    }
}
