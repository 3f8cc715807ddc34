//! The sidecar container's `resources`, checked as the apiserver checks a container's: a gateway
//! whose `spec.sidecar.resources` the apiserver would refuse would make every pod the webhook
//! injects be refused (the webhook itself succeeded, so `failurePolicy: Ignore` does not help).
//! [`problems`] finds those before any pod carries them; [`parse_quantity`] reads a Kubernetes
//! quantity (k8s-openapi keeps quantities as strings and has no parser).

use k8s_openapi::api::core::v1::ResourceRequirements;
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceClaim;

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
