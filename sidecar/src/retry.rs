//! Retrying failed upstream attempts: connection errors, timeouts (to the first byte), answers
//! the providers' SDKs retry ([`should_retry`]: `408`, `409`, `429`, `5xx`, unless the provider
//! says otherwise in `x-should-retry`), and an answer held back whole whose body broke off,
//! before any byte went to the client. Attempts, delay and backoff come from
//! `spec.retries`, and per request from `cf-aig-max-attempts` (at most 5), `cf-aig-retry-delay`
//! (milliseconds, at most 5000) and `cf-aig-backoff` (`constant`, `linear`, `exponential`).
//!
//! How long each attempt may take is [`Waits`]: the request timeout bounds the first byte only,
//! and a direct request's last attempt of several waits as Cloudflare's does, "until the request
//! completes" (within the gateway's own `spec.requestTimeout`).

use std::time::{Duration, SystemTime};

use http::StatusCode;
use sidegate_crds::policy::{Backoff, Retries};

use crate::error::GatewayError;
use crate::headers::{GatewayHeaders, Gw};

/// Most attempts, including the first.
pub const MAX_ATTEMPTS: u32 = 5;
/// Longest base delay.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// Base delay when retries are on and none is set.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);

/// How one request retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in total (1: no retry).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub delay: Duration,
    /// How the delay grows.
    pub backoff: Backoff,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            delay: DEFAULT_DELAY,
            backoff: Backoff::Constant,
        }
    }
}

impl Policy {
    /// The gateway's policy from `spec.retries`; the error names the bad field.
    pub fn from_config(r: Option<&Retries>) -> Result<Self, String> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
            return Err(format!(
                "spec.retries.maxAttempts must be between 1 and {MAX_ATTEMPTS}, got {}",
                r.max_attempts
            ));
        }
        let delay = r.retry_delay.map_or(DEFAULT_DELAY, |d| d.get());
        if delay > MAX_DELAY {
            return Err(format!(
                "spec.retries.retryDelay must be at most 5s, got {}ms",
                delay.as_millis()
            ));
        }
        Ok(Self {
            max_attempts: r.max_attempts,
            delay,
            backoff: r.backoff,
        })
    }

    /// This policy with a request's `cf-aig-*` retry headers applied.
    pub fn with_headers(mut self, h: GatewayHeaders<'_>) -> Result<Self, GatewayError> {
        if let Some(v) = h.get(Gw::MaxAttempts) {
            self.max_attempts = number(v)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_ATTEMPTS).contains(n))
                .ok_or_else(|| GatewayError::BadHeader {
                    name: "cf-aig-max-attempts",
                    reason: format!("expected 1 to {MAX_ATTEMPTS}"),
                })?;
        }
        if let Some(v) = h.get(Gw::RetryDelay) {
            self.delay = number(v)
                .map(Duration::from_millis)
                .filter(|d| *d <= MAX_DELAY)
                .ok_or_else(|| GatewayError::BadHeader {
                    name: "cf-aig-retry-delay",
                    reason: "expected milliseconds from 0 to 5000".into(),
                })?;
        }
        if let Some(v) = h.get(Gw::Backoff) {
            self.backoff = parse_backoff(v.as_bytes()).ok_or_else(|| GatewayError::BadHeader {
                name: "cf-aig-backoff",
                reason: "expected constant, linear or exponential".into(),
            })?;
        }
        Ok(self)
    }

    /// The wait before retry number `retry` (1 = the second attempt).
    pub fn delay_before(&self, retry: u32) -> Duration {
        let factor = match self.backoff {
            Backoff::Constant => 1,
            Backoff::Linear => retry.max(1),
            Backoff::Exponential => 1 << retry.saturating_sub(1).min(MAX_ATTEMPTS),
        };
        self.delay * factor
    }
}

/// The longest wait a provider's `Retry-After` may ask for that the gateway waits out before its
/// next attempt; asked for longer, the provider's answer goes to the client at once, its
/// `Retry-After` with it (as the OpenAI and Anthropic SDKs give up on a wait past their bound).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a provider's answer asks to be left alone, read as the OpenAI and Anthropic SDKs
/// read it: `retry-after-ms` (OpenAI, Azure OpenAI: milliseconds), else `Retry-After` in
/// seconds (a decimal one too), else `Retry-After` as an HTTP date (RFC 9110 §10.2.3), counted
/// from now. A wait too long to hold is `Duration::MAX`: longer than any the gateway waits out.
/// A date passed already, or a value that is no wait, asks for none.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

fn retry_after_at(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|ms| wait(ms, 1000.0)) {
        return Some(ms);
    }
    let value = text("retry-after")?;
    if let Some(s) = wait(value, 1.0) {
        return Some(s);
    }
    httpdate::parse_http_date(value)
        .ok()?
        .duration_since(now)
        .ok()
}

/// A number of `per_second` units (1000: milliseconds) as a wait: finite and not negative; one
/// too long to hold is `Duration::MAX`.
fn wait(s: &str, per_second: f64) -> Option<Duration> {
    let n = s
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)?;
    Some(Duration::try_from_secs_f64(n / per_second).unwrap_or(Duration::MAX))
}

/// How long an upstream may take in each attempt of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waits {
    /// For the response head of every attempt but the last: the request timeout.
    pub head: Duration,
    /// For the response head of the last attempt.
    pub last_head: Duration,
    /// Longest silence of an upstream mid-body, once its head came.
    pub silence: Duration,
    /// Longest `Retry-After` waited out before the next attempt; asked for longer, the
    /// provider's answer is the response (a fallback step's moves the request on).
    pub retry_after: Duration,
}

impl Waits {
    /// A direct request's (passthrough, `/compat` to one model): `timeout` (its
    /// `cf-aig-request-timeout`, else `spec.requestTimeout`) bounds the first byte of each
    /// attempt; the last of several waits as Cloudflare's does "regardless of how long it
    /// takes", within the gateway's own bound `own` (`spec.requestTimeout`, default 600 s: the
    /// OpenAI and Anthropic SDKs' own timeout), or `timeout` if longer; a single attempt times
    /// out after `timeout` (a 504).
    pub fn direct(timeout: Duration, own: Duration, attempts: u32) -> Self {
        let last_head = if attempts > 1 {
            timeout.max(own)
        } else {
            timeout
        };
        Self {
            last_head,
            retry_after: MAX_RETRY_AFTER,
            ..Self::every_attempt(timeout, own)
        }
    }

    /// A fallback step's (universal endpoint, a routed `/compat` target): `timeout` bounds
    /// the first byte of every attempt, the last too, and the `Retry-After` waited out, so that
    /// a slow provider moves the request on to the next step.
    pub fn every_attempt(timeout: Duration, own: Duration) -> Self {
        Self {
            head: timeout,
            last_head: timeout,
            silence: Self::silence(timeout, own),
            retry_after: timeout.min(MAX_RETRY_AFTER),
        }
    }

    /// The body of a streamed answer may pause (a model thinking between chunks) for as long as
    /// the gateway's own `spec.requestTimeout` (`own`) allows, never less than the head could
    /// take: a client's short `timeout` bounds the first byte only, as Cloudflare's does. A
    /// dead network path is found sooner by TCP keepalive (`upstream`).
    fn silence(timeout: Duration, own: Duration) -> Duration {
        timeout.max(own)
    }
}

/// A backoff named in a header or a universal step (`constant`, `linear`, `exponential`; any
/// case, spaces around ignored).
pub(crate) fn parse_backoff(v: &[u8]) -> Option<Backoff> {
    let v = v.trim_ascii();
    [
        (&b"constant"[..], Backoff::Constant),
        (b"linear", Backoff::Linear),
        (b"exponential", Backoff::Exponential),
    ]
    .into_iter()
    .find_map(|(name, b)| v.eq_ignore_ascii_case(name).then_some(b))
}

fn number(v: &http::HeaderValue) -> Option<u64> {
    v.to_str().ok()?.trim().parse().ok()
}

/// Whether an upstream answer is worth another attempt, as the OpenAI and Anthropic SDKs judge
/// it: an error answer whose provider says so in `x-should-retry` (`true` or `false`, which
/// OpenAI and Anthropic send) is, or is not; else [`retryable_status`].
pub fn should_retry(status: StatusCode, headers: &http::HeaderMap) -> bool {
    let said = headers
        .get("x-should-retry")
        .map(|v| v.as_bytes().trim_ascii());
    match said {
        Some(v) if status.as_u16() >= 400 && v.eq_ignore_ascii_case(b"true") => true,
        Some(v) if v.eq_ignore_ascii_case(b"false") => false,
        _ => retryable_status(status),
    }
}

/// Whether an upstream answer with this status is worth another attempt: `408` (the request
/// timed out), `409` (a lock timed out), `429` and `5xx`, the statuses the providers' SDKs retry.
pub fn retryable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 409 | 429) || s.is_server_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, http::HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn retry_after_is_read_in_milliseconds_or_seconds() {
        let h = |pairs: &[(&'static str, &'static str)]| retry_after(&headers(pairs));
        assert_eq!(h(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(
            h(&[("retry-after-ms", "250.5"), ("retry-after", "3")]),
            Some(Duration::from_micros(250_500))
        );
        assert_eq!(
            h(&[("retry-after-ms", "-1"), ("retry-after", "2")]),
            Some(Duration::from_secs(2))
        );
        // Decimal seconds, as the SDKs read them.
        assert_eq!(
            h(&[("retry-after", " 1.5 ")]),
            Some(Duration::from_millis(1500))
        );
        // Too long to hold is longer than any wait: the answer goes to the client.
        assert_eq!(h(&[("retry-after-ms", "1e300")]), Some(Duration::MAX));
        assert_eq!(h(&[("retry-after", "1e300")]), Some(Duration::MAX));
        for no_wait in ["-3", "NaN", "inf", "soon", ""] {
            assert_eq!(h(&[("retry-after", no_wait)]), None, "{no_wait}");
        }
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn retry_after_is_read_as_an_http_date_from_now() {
        let m = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        let at = |s| httpdate::parse_http_date(s).expect("date");
        assert_eq!(
            retry_after_at(&m, at("Wed, 21 Oct 2015 07:26:00 GMT")),
            Some(Duration::from_secs(120))
        );
        // The two obsolete forms RFC 9110 still has recipients read.
        for obsolete in [
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
        ] {
            let m = headers(&[("retry-after", obsolete)]);
            assert_eq!(
                retry_after_at(&m, at("Wed, 21 Oct 2015 07:27:30 GMT")),
                Some(Duration::from_secs(30)),
                "{obsolete}"
            );
        }
        // A date passed asks for no wait.
        assert_eq!(
            retry_after_at(&m, at("Wed, 21 Oct 2015 07:28:01 GMT")),
            None
        );
        // Seconds are read before a date.
        let both = headers(&[
            ("retry-after-ms", "10"),
            ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ]);
        assert_eq!(
            retry_after_at(&both, at("Wed, 21 Oct 2015 07:26:00 GMT")),
            Some(Duration::from_millis(10))
        );
    }

    use http::HeaderValue;

    #[test]
    fn backoff_grows_as_named() {
        let p = |backoff| Policy {
            max_attempts: 5,
            delay: Duration::from_millis(100),
            backoff,
        };
        let waits = |b| {
            (1..=4)
                .map(|r| p(b).delay_before(r).as_millis())
                .collect::<Vec<_>>()
        };
        assert_eq!(waits(Backoff::Constant), [100, 100, 100, 100]);
        assert_eq!(waits(Backoff::Linear), [100, 200, 300, 400]);
        assert_eq!(waits(Backoff::Exponential), [100, 200, 400, 800]);
    }

    #[test]
    fn headers_override_the_config_within_bounds() {
        let mut h = http::HeaderMap::new();
        h.insert(Gw::MaxAttempts.name(), HeaderValue::from_static("3"));
        h.insert(Gw::RetryDelay.name(), HeaderValue::from_static("250"));
        h.insert(Gw::Backoff.name(), HeaderValue::from_static("Linear"));
        assert_eq!(
            Policy::default().with_headers(GatewayHeaders::scan(&h)),
            Ok(Policy {
                max_attempts: 3,
                delay: Duration::from_millis(250),
                backoff: Backoff::Linear
            })
        );
        for (name, bad) in [
            (Gw::MaxAttempts.name(), "0"),
            (Gw::MaxAttempts.name(), "6"),
            (Gw::RetryDelay.name(), "5001"),
            (Gw::RetryDelay.name(), "-1"),
            (Gw::Backoff.name(), "random"),
            (Gw::Backoff.name(), "linearly"),
        ] {
            let mut h = http::HeaderMap::new();
            h.insert(name, HeaderValue::from_static(bad));
            assert_eq!(
                Policy::default()
                    .with_headers(GatewayHeaders::scan(&h))
                    .map_err(|e| e.code()),
                Err(2100),
                "{name}: {bad}"
            );
        }
    }

    #[test]
    fn a_direct_requests_last_attempt_of_several_waits_past_its_timeout() {
        let (timeout, own) = (Duration::from_millis(500), Duration::from_secs(30));
        let w = Waits::direct(timeout, own, 2);
        assert_eq!(w.head, timeout);
        // As long as the gateway's own bound, which an operator's spec.requestTimeout sets.
        assert_eq!(w.last_head, own);
        // A gateway or a client that waits longer still does on the last attempt.
        let long = Duration::from_secs(1200);
        assert_eq!(Waits::direct(timeout, long, 3).last_head, long);
        assert_eq!(Waits::direct(long, own, 3).last_head, long);
    }

    #[test]
    fn a_single_attempt_and_a_fallback_step_time_out_on_the_first_byte() {
        let (timeout, own) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(Waits::direct(timeout, own, 1).last_head, timeout);
        let step = Waits::every_attempt(timeout, own);
        assert_eq!((step.head, step.last_head), (timeout, timeout));
    }

    #[test]
    fn a_short_request_timeout_does_not_bound_silences_mid_body() {
        let own = Duration::from_secs(30);
        for w in [
            Waits::direct(Duration::from_millis(500), own, 1),
            Waits::direct(Duration::from_millis(500), own, 5),
            Waits::every_attempt(Duration::from_millis(500), own),
        ] {
            assert_eq!(w.silence, own);
        }
        let long = Duration::from_secs(90);
        assert_eq!(Waits::direct(long, own, 1).silence, long);
    }

    #[test]
    fn the_statuses_the_sdks_retry_are_retried() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert!(retryable_status(StatusCode::from_u16(s).expect("status")));
        }
        for s in [200, 400, 401, 404, 413, 422] {
            assert!(!retryable_status(StatusCode::from_u16(s).expect("status")));
        }
    }

    #[test]
    fn the_providers_x_should_retry_is_obeyed_on_error_answers() {
        let status = |s| StatusCode::from_u16(s).expect("status");
        let said = |v| headers(&[("x-should-retry", v)]);
        assert!(!should_retry(status(503), &said("false")));
        assert!(!should_retry(status(429), &said(" False ")));
        assert!(should_retry(status(400), &said("true")));
        assert!(should_retry(status(404), &said("TRUE")));
        // Not an error: nothing to retry, whatever the header says.
        assert!(!should_retry(status(200), &said("true")));
        // Anything else is no word: the status decides.
        assert!(should_retry(status(503), &said("maybe")));
        assert!(!should_retry(status(400), &said("1")));
        assert!(should_retry(status(503), &headers(&[])));
        assert!(!should_retry(status(400), &headers(&[])));
    }

    #[test]
    fn config_is_checked() {
        use sidegate_crds::units::Duration as D;
        let r = Retries {
            max_attempts: 9,
            retry_delay: None,
            backoff: Backoff::Constant,
        };
        assert!(
            Policy::from_config(Some(&r))
                .expect_err("too many")
                .contains("maxAttempts")
        );
        let r = Retries {
            max_attempts: 3,
            retry_delay: Some(D::from_secs(6)),
            backoff: Backoff::Exponential,
        };
        assert!(
            Policy::from_config(Some(&r))
                .expect_err("too long")
                .contains("retryDelay")
        );
    }
}
