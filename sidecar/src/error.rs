//! Errors the gateway itself makes, rendered once in the SPEC.md envelope:
//! `{"success": false, "result": [], "messages": [], "error": [{"code": N, "message": "..."}]}`.
//!
//! Provider errors never go through here: they pass through unchanged.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// An error made by the gateway (not by a provider).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewayError {
    /// No route, unknown provider, or a long-form gateway id that is not this gateway.
    #[error("{0}")]
    NotFound(String),
    /// Missing or wrong `cf-aig-authorization`.
    #[error("Unauthorized")]
    Unauthorized,
    /// A request a web page made, or one addressed to a name a loopback listener does not
    /// answer to (DNS rebinding): a page must not spend the gateway's keys.
    #[error("{0}")]
    Forbidden(String),
    /// `cf-aig-byok-alias` names a key the gateway does not hold.
    #[error("no key with alias '{alias}' for provider '{provider}'")]
    AliasNotFound { provider: String, alias: String },
    /// A request header the gateway reads has an invalid value.
    #[error("invalid header {name}: {reason}")]
    BadHeader { name: &'static str, reason: String },
    /// A method the gateway does not forward (`TRACE`, `TRACK`, `CONNECT`: they echo the request,
    /// the injected key with it).
    #[error("{0}")]
    RefusedMethod(String),
    /// The request body could not be read.
    #[error("could not read the request body: {0}")]
    BadBody(String),
    /// The client sent no part of its request body for `--client-timeout`.
    #[error("the request body stalled: no data from the client for {secs} s")]
    BodyStalled { secs: u64 },
    /// The request body is larger than the configured limit.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// A JSON body the gateway must parse whose values would take more memory than the whole
    /// buffer budget (`spec.limits.maxBufferedBytes`) once parsed.
    #[error(
        "request body has too many JSON values: parsed, they would take more than the gateway's memory budget of {limit} bytes"
    )]
    BodyTooComplex { limit: u64 },
    /// No first byte from the upstream within the request timeout.
    #[error("upstream did not respond within {ms} ms")]
    UpstreamTimeout { ms: u64 },
    /// The upstream stopped sending a response the gateway holds back whole (for DLP or
    /// guardrail checks, or `/compat` translation) for `spec.requestTimeout` (or the request's
    /// timeout, if longer).
    #[error("upstream response stalled: no data for {ms} ms")]
    UpstreamStalled { ms: u64 },
    /// The upstream could not be reached or broke the connection before answering.
    #[error("upstream request failed: {0}")]
    UpstreamUnavailable(String),
    /// `spec.rateLimit` exceeded; `retry_after` until a request would be allowed.
    #[error(
        "rate limit exceeded: at most {} per {}",
        crate::ratelimit::counted(*.limit, "request"),
        crate::ratelimit::interval_text(*.interval)
    )]
    RateLimited {
        limit: u64,
        interval: std::time::Duration,
        retry_after: std::time::Duration,
    },
    /// `spec.spendLimit` reached for the current period; `retry_after` until the period ends.
    #[error("spend limit exceeded: {amount} USD per {period} reached")]
    SpendLimited {
        amount: f64,
        period: &'static str,
        retry_after: std::time::Duration,
    },
    /// A dynamic route's rate node (`spend: false`) or budget node (`spend: true`) over its
    /// limit led the request to `end` before any target; `retry_after` until its window ends.
    #[error("{what}")]
    RouteLimited {
        what: String,
        spend: bool,
        retry_after: std::time::Duration,
    },
    /// `spec.rateLimit.tokensPerMinute` used up; `retry_after` until the budget has room.
    #[error(
        "rate limit exceeded: token budget of {} per minute used up",
        crate::ratelimit::counted(*.per_minute, "token")
    )]
    TokenBudgetSpent {
        per_minute: u64,
        retry_after: std::time::Duration,
    },
    /// A DLP policy with action BLOCK matched the request (2029) or the response (2030). The
    /// message names the policy and profiles, never the matched text.
    #[error("{} blocked by DLP policy {policy:?} (matched: {profiles})", if *response { "response" } else { "request" })]
    DlpBlocked {
        response: bool,
        policy: String,
        profiles: String,
    },
    /// A guardrail with action block flagged the prompt (2016) or the response (2017).
    #[error("{} blocked by guardrails (category: {category})", if *response { "response" } else { "prompt" })]
    GuardrailBlocked { response: bool, category: String },
    /// The text of a prompt (2016) or response (2017) is longer than one guardrails check takes:
    /// refused rather than served partly unchecked.
    #[error("{} too long for the guardrails check (at most {limit} bytes of text)", if *response { "response" } else { "prompt" })]
    GuardrailTooLong { response: bool, limit: usize },
    /// No valid config is loaded yet.
    #[error("gateway has no valid configuration loaded")]
    NotReady,
    /// The bodies the gateway holds in memory at once (requests read whole, responses held
    /// back whole) would exceed `spec.limits.maxBufferedBytes`: refused, for a retry shortly.
    #[error(
        "gateway busy: buffered bodies would exceed its memory budget of {limit} bytes; retry shortly"
    )]
    BuffersFull { limit: u64 },
    /// A `/compat` request that names no usable provider/model, or asks for something the
    /// provider cannot express (the message names the field).
    #[error("{0}")]
    CompatRequest(String),
    /// A universal-endpoint body that is not a valid list of steps (the message names the step
    /// and field).
    #[error("universal endpoint: {0}")]
    UniversalRequest(String),
    /// A WebSocket upgrade the gateway cannot serve (the message says why).
    #[error("{0}")]
    WebSocketRefused(String),
    /// A client connection made while `--max-connections` are open: refused before its request
    /// is read.
    #[error(
        "gateway busy: {max} client connections are open, its most (--max-connections); retry shortly"
    )]
    TooManyConnections { max: usize },
}

/// At most the first 64 characters of client or upstream text quoted in an error message.
pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl GatewayError {
    /// HTTP status of the error response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::AliasNotFound { .. }
            | Self::BadHeader { .. }
            | Self::BadBody(_)
            | Self::RefusedMethod(_)
            | Self::CompatRequest(_)
            | Self::UniversalRequest(_)
            | Self::WebSocketRefused(_)
            | Self::DlpBlocked { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } | Self::BodyTooComplex { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::BodyStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamTimeout { .. } | Self::UpstreamStalled { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::NotReady | Self::BuffersFull { .. } | Self::TooManyConnections { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::RateLimited { .. }
            | Self::SpendLimited { .. }
            | Self::RouteLimited { .. }
            | Self::TokenBudgetSpent { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::GuardrailBlocked { .. } | Self::GuardrailTooLong { .. } => {
                StatusCode::FAILED_DEPENDENCY
            }
        }
    }

    /// Error code in the envelope: Cloudflare's documented code where one exists, else
    /// sidegate's own (21xx), listed in the README.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound(_) => 2001,
            Self::RateLimited { .. }
            | Self::TokenBudgetSpent { .. }
            | Self::RouteLimited { spend: false, .. } => 2003,
            Self::SpendLimited { .. } | Self::RouteLimited { spend: true, .. } => 2041,
            Self::Unauthorized => 2009,
            Self::GuardrailBlocked {
                response: false, ..
            }
            | Self::GuardrailTooLong {
                response: false, ..
            } => 2016,
            Self::GuardrailBlocked { response: true, .. }
            | Self::GuardrailTooLong { response: true, .. } => 2017,
            Self::DlpBlocked {
                response: false, ..
            } => 2029,
            Self::DlpBlocked { response: true, .. } => 2030,
            Self::AliasNotFound { .. } => 2040,
            Self::BadHeader { .. } => 2100,
            Self::BadBody(_) | Self::BodyStalled { .. } => 2101,
            Self::BodyTooLarge { .. } | Self::BodyTooComplex { .. } => 2102,
            Self::UpstreamTimeout { .. } | Self::UpstreamStalled { .. } => 2103,
            Self::UpstreamUnavailable(_) => 2104,
            Self::NotReady => 2105,
            Self::RefusedMethod(_) => 2106,
            Self::CompatRequest(_) => 2107,
            Self::UniversalRequest(_) => 2108,
            Self::Forbidden(_) => 2109,
            Self::BuffersFull { .. } => 2110,
            Self::WebSocketRefused(_) => 2111,
            Self::TooManyConnections { .. } => 2112,
        }
    }

    /// Whether the upstream failed the request (no connection, no answer in time, an answer
    /// broken off): the gateway tells the client, but it refused nothing itself.
    pub fn upstream_failed(&self) -> bool {
        matches!(
            self,
            Self::UpstreamTimeout { .. }
                | Self::UpstreamStalled { .. }
                | Self::UpstreamUnavailable(_)
        )
    }

    /// Whether another attempt at the same upstream may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::UpstreamTimeout { .. } | Self::UpstreamUnavailable(_)
        )
    }

    /// The envelope as a JSON body.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "success": false,
            "result": [],
            "messages": [],
            "error": [{"code": self.code(), "message": self.to_string()}],
        })
        .to_string()
    }

    /// The full HTTP response.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(Bytes::from(self.to_json())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Self::RateLimited { retry_after, .. }
        | Self::SpendLimited { retry_after, .. }
        | Self::RouteLimited { retry_after, .. }
        | Self::TokenBudgetSpent { retry_after, .. } = self
        {
            // Whole seconds, rounded up (RFC 9110 §10.2.3).
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Self::BodyTooLarge { .. } | Self::BadBody(_) | Self::BodyStalled { .. } = self {
            // The rest of the body is not read (or not as sent): the connection cannot carry
            // another request, whichever server read it.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Self::BuffersFull { .. } | Self::TooManyConnections { .. } = self {
            // Budget (or a connection) frees as soon as the requests holding it end.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        }
        resp
    }
}

/// What a JSON parser said of a body, without the values it quotes: serde names a string it
/// could not take (`invalid type: string "Bearer sk-..."`) or a variant it does not know, and
/// such a string may be a key or a prompt, which must reach neither the logs nor the answer.
/// What was expected and where (line, column) stay.
pub fn json_error(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    loop {
        let string = rest.find("string \"").map(|at| (at, "string \"", '"'));
        let variant = rest.find("variant `").map(|at| (at, "variant `", '`'));
        let Some((at, mark, close)) = [string, variant].into_iter().flatten().min() else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..at]);
        out.push_str(mark.trim_end_matches(['"', '`']).trim_end());
        let quoted = &rest[at + mark.len()..];
        // The end of the quoted value: its closing mark, past escaped ones (`\"`, `\\`).
        let mut end = None;
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if close == '"' && !escaped => escaped = true,
                c if c == close && !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(i) => rest = &quoted[i + 1..],
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_matches_the_spec_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&GatewayError::Unauthorized.to_json()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"success": false, "result": [], "messages": [],
                "error": [{"code": 2009, "message": "Unauthorized"}]})
        );
    }

    #[test]
    fn alias_error_is_400_2040_and_names_the_alias() {
        let e = GatewayError::AliasNotFound {
            provider: "openai".into(),
            alias: "team-b".into(),
        };
        assert_eq!((e.status().as_u16(), e.code()), (400, 2040));
        assert!(e.to_string().contains("team-b"));
    }

    fn e_json() -> String {
        GatewayError::RateLimited {
            limit: 10,
            interval: std::time::Duration::from_secs(60),
            retry_after: std::time::Duration::from_secs(1),
        }
        .to_json()
    }

    #[test]
    fn rate_limited_is_429_2003_with_retry_after_rounded_up() {
        let e = GatewayError::RateLimited {
            limit: 10,
            interval: std::time::Duration::from_secs(60),
            retry_after: std::time::Duration::from_millis(2100),
        };
        assert_eq!((e.status().as_u16(), e.code()), (429, 2003));
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let v: serde_json::Value = serde_json::from_str(&e_json()).expect("json");
        assert_eq!(
            v["error"][0]["message"],
            "rate limit exceeded: at most 10 requests per 60s"
        );
    }

    #[test]
    fn spend_limited_is_429_2041_with_retry_after_to_the_period_end() {
        let e = GatewayError::SpendLimited {
            amount: 250.0,
            period: "month",
            retry_after: std::time::Duration::from_secs(86_400 * 3),
        };
        assert_eq!((e.status().as_u16(), e.code()), (429, 2041));
        assert_eq!(
            e.to_string(),
            "spend limit exceeded: 250 USD per month reached"
        );
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "259200");
        let t = GatewayError::TokenBudgetSpent {
            per_minute: 1000,
            retry_after: std::time::Duration::from_millis(10),
        };
        assert_eq!((t.status().as_u16(), t.code()), (429, 2003));
        assert_eq!(t.into_response().headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn full_buffers_are_503_2110_with_retry_after_one_second() {
        let e = GatewayError::BuffersFull { limit: 64 << 20 };
        assert_eq!((e.status().as_u16(), e.code()), (503, 2110));
        assert!(e.to_string().contains("67108864 bytes"), "{e}");
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn only_upstream_failures_are_retryable() {
        assert!(GatewayError::UpstreamTimeout { ms: 5 }.is_retryable());
        assert!(!GatewayError::BodyTooLarge { limit: 1 }.is_retryable());
    }

    #[test]
    fn json_errors_name_the_problem_but_not_the_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Step {
            headers: std::collections::BTreeMap<String, String>,
            kind: Option<Kind>,
        }
        #[derive(Debug, serde::Deserialize)]
        enum Kind {
            A,
        }
        let said = |body: &str| json_error(&serde_json::from_str::<Step>(body).expect_err("bad"));
        let m = said(r#"{"headers": "Authorization: Bearer sk-LEAK \"quoted\" \\ x"}"#);
        assert_eq!(
            m,
            "invalid type: string, expected a map at line 1 column 59"
        );
        let m = said(r#"{"headers": {}, "kind": "sk-LEAK-variant"}"#);
        assert!(m.starts_with("unknown variant, expected `A`"), "{m}");
        assert!(!m.contains("LEAK"), "{m}");
        // Nothing quoted: as serde said it.
        let m = said(r#"{"headers": 5}"#);
        assert_eq!(
            m,
            "invalid type: integer `5`, expected a map at line 1 column 13"
        );
        let m = said("{");
        assert!(m.starts_with("EOF while parsing"), "{m}");
    }
}
