//! Human-readable duration (`500ms`, `30s`, `5m`, `1h`, `7d`) and byte size (`64Mi`, `10M`) values.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A parse failure of a unit string; the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error(
        "invalid duration {0:?}: expected a number followed by ms, s, m, h or d (e.g. 500ms, 30s, 5m)"
    )]
    Duration(String),
    #[error(
        "invalid size {0:?}: expected a number optionally followed by Ki, Mi, Gi, K, M or G (e.g. 64Mi)"
    )]
    Size(String),
}

/// A duration written as `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
    /// The std duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UnitError::Duration(s.to_owned());
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| err())?;
        let ms_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(err()),
        };
        let ms = n.checked_mul(ms_per_unit).ok_or_else(err)?;
        Ok(Self::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[0-9]{1,9}(ms|s|m|h|d)$",
            // At most 9 digits: any such value fits the parser's u64 of milliseconds, so an
            // object the apiserver accepts always decodes (one that does not would stop the
            // operator's list of every gateway).
            "description": "A duration: a number (at most 9 digits) followed by ms, s, m, h or d (e.g. 500ms, 30s, 5m)."
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// A byte size written as a number with an optional `Ki`/`Mi`/`Gi` (binary) or `K`/`M`/`G` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(u64);

impl ByteSize {
    /// A size of `n` bytes.
    pub const fn bytes(n: u64) -> Self {
        Self(n)
    }
    /// The size in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UnitError::Size(s.to_owned());
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| err())?;
        let mult: u64 = match unit {
            "" => 1,
            "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Self).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if n != 0 && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A number or a string, said in words when it is neither (an untagged enum would say
        // "did not match any variant of untagged enum").
        struct Size;
        impl serde::de::Visitor<'_> for Size {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_FORMS)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: expected {SIZE_FORMS}")))
            }
            fn visit_u128<E: serde::de::Error>(self, n: u128) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: expected {SIZE_FORMS}")))
            }
            fn visit_i128<E: serde::de::Error>(self, n: i128) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: expected {SIZE_FORMS}")))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ByteSize, E> {
                // Not shown: a float's digits are not those written (1e6, 18446744073709551616).
                Err(E::custom(format!("invalid size: expected {SIZE_FORMS}")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ByteSize, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Size)
    }
}

/// What a size may be, for errors.
const SIZE_FORMS: &str = "a size such as 10Mi or 1048576: a whole number of bytes, optionally followed by Ki, Mi, Gi, K, M or G";

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[0-9]{1,9}(Ki|Mi|Gi|K|M|G)?$",
            "description": "A size in bytes (at most 9 digits), optionally with a Ki, Mi, Gi, K, M or G suffix (e.g. 64Mi)."
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_their_largest_whole_unit() {
        assert_eq!(
            "500ms".parse::<Duration>().map(|d| d.get().as_millis()),
            Ok(500)
        );
        assert_eq!(
            "30s".parse::<Duration>().map(|d| d.to_string()),
            Ok("30s".into())
        );
        assert_eq!(
            "120s".parse::<Duration>().map(|d| d.to_string()),
            Ok("2m".into())
        );
        assert_eq!(
            "7d".parse::<Duration>().map(|d| d.get().as_secs()),
            Ok(604_800)
        );
    }

    #[test]
    fn bad_durations_are_rejected_with_the_accepted_forms() {
        for bad in ["", "30", "s", "1.5s", "-1s", "10y", "99999999999999999999d"] {
            let err = bad.parse::<Duration>().expect_err(bad);
            assert!(err.to_string().contains("ms, s, m, h or d"), "{err}");
        }
    }

    #[test]
    fn sizes_accept_binary_and_decimal_suffixes() {
        assert_eq!("64Mi".parse::<ByteSize>().map(ByteSize::get), Ok(64 << 20));
        assert_eq!("10M".parse::<ByteSize>().map(ByteSize::get), Ok(10_000_000));
        assert_eq!("1024".parse::<ByteSize>().map(ByteSize::get), Ok(1024));
        assert!("10MB".parse::<ByteSize>().is_err());
        assert_eq!(
            serde_json::from_str::<ByteSize>("1024")
                .map(ByteSize::get)
                .ok(),
            Some(1024)
        );
        for bad in ["-1", "10.5", "true"] {
            let err = serde_json::from_str::<ByteSize>(bad)
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("a size such as 10Mi") && !err.contains("untagged"),
                "{err}"
            );
        }
        assert_eq!(ByteSize::bytes(10 << 20).to_string(), "10Mi");
    }

    #[test]
    fn every_value_the_schema_admits_decodes() {
        // The apiserver checks the pattern; a value it admits that the operator could not
        // decode would fail the list of every AIGateway. The largest admitted values decode.
        for unit in ["ms", "s", "m", "h", "d"] {
            let v = format!("999999999{unit}");
            assert!(v.parse::<Duration>().is_ok(), "{v}");
        }
        for unit in ["", "K", "M", "G", "Ki", "Mi", "Gi"] {
            let v = format!("999999999{unit}");
            assert!(v.parse::<ByteSize>().is_ok(), "{v}");
        }
        let pattern = |schema: Schema| {
            schema
                .get("pattern")
                .and_then(|p| p.as_str())
                .map(str::to_owned)
        };
        let mut generator = SchemaGenerator::default();
        assert_eq!(
            pattern(Duration::json_schema(&mut generator)).as_deref(),
            Some("^[0-9]{1,9}(ms|s|m|h|d)$")
        );
        assert_eq!(
            pattern(ByteSize::json_schema(&mut generator)).as_deref(),
            Some("^[0-9]{1,9}(Ki|Mi|Gi|K|M|G)?$")
        );
    }
}
