//! Credentials, checked as the providers check them: a request without the header its API
//! wants is answered 401 in that API's error shape, so that a gateway that forgets (or
//! misplaces) a key fails against the mock as it would against the provider. Only presence is
//! checked, never the key itself.
//!
//! OpenAI-format routes want `Authorization: Bearer <key>`; Azure OpenAI's deployment paths
//! (`/openai/deployments/...`) take `api-key` (or an Entra ID bearer token); paths under
//! `/openai/v1/` are both Groq's API (a bearer token) and Azure OpenAI's v1 API (`api-key` or a
//! bearer token), which only their hosts tell apart, so either is taken there; Anthropic's
//! `x-api-key`. Header names given with `--auth-header` (custom providers' `authHeader`) are
//! accepted on every route. Gemini and Bedrock check their own headers ([`crate::gemini`],
//! [`crate::bedrock`]); moderation and token endpoints take requests without a key.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

/// The API whose credential a route wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// OpenAI and the OpenAI-compatible providers: a bearer token.
    OpenAi,
    /// Azure OpenAI: `api-key`, or a bearer token.
    Azure,
    /// `/openai/v1/...`: Groq's API or Azure OpenAI's v1 API, whose keys are both taken.
    OpenAiV1,
    /// Anthropic: `x-api-key`.
    Anthropic,
}

impl Api {
    /// The API of an OpenAI-format route at `path`.
    pub(crate) fn openai_format(path: &str) -> Self {
        if path.contains("/openai/deployments/") {
            Self::Azure
        } else if path.contains("/openai/v1/") {
            Self::OpenAiV1
        } else {
            Self::OpenAi
        }
    }

    /// Whether `headers` carry the credential this API wants, or one of the `extra` headers.
    pub(crate) fn has_credential(self, headers: &HeaderMap, extra: &[HeaderName]) -> bool {
        let present = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| !v.trim().is_empty())
        };
        if extra.iter().any(present) {
            return true;
        }
        match self {
            Self::OpenAi => has_bearer_token(headers),
            Self::Azure | Self::OpenAiV1 => {
                present(&HeaderName::from_static("api-key")) || has_bearer_token(headers)
            }
            Self::Anthropic => present(&HeaderName::from_static("x-api-key")),
        }
    }
}

/// `Authorization: Bearer <token>` with a token.
fn has_bearer_token(headers: &HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .is_some_and(|token| !token.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn each_api_wants_its_own_header() {
        let bearer = headers(&[("authorization", "Bearer sk-x")]);
        let api_key = headers(&[("api-key", "az")]);
        let x_api_key = headers(&[("x-api-key", "sk-ant")]);
        assert!(Api::OpenAi.has_credential(&bearer, &[]));
        assert!(!Api::OpenAi.has_credential(&api_key, &[]));
        assert!(!Api::OpenAi.has_credential(&x_api_key, &[]));
        assert!(Api::Azure.has_credential(&api_key, &[]));
        assert!(Api::Azure.has_credential(&bearer, &[]));
        assert!(Api::Anthropic.has_credential(&x_api_key, &[]));
        assert!(!Api::Anthropic.has_credential(&bearer, &[]));
    }

    #[test]
    fn an_empty_or_non_bearer_authorization_is_no_credential() {
        for value in ["Bearer ", "Bearer", "Basic dXNlcg==", ""] {
            let h: HeaderMap = [(AUTHORIZATION, http::HeaderValue::from_static(value))]
                .into_iter()
                .collect();
            assert!(!Api::OpenAi.has_credential(&h, &[]), "{value:?}");
        }
        assert!(Api::OpenAi.has_credential(&headers(&[("authorization", "bearer k")]), &[]));
    }

    #[test]
    fn extra_headers_count_on_every_route() {
        let custom = headers(&[("x-custom-key", "k")]);
        let extra = [HeaderName::from_static("x-custom-key")];
        for api in [Api::OpenAi, Api::Azure, Api::Anthropic] {
            assert!(!api.has_credential(&custom, &[]));
            assert!(api.has_credential(&custom, &extra));
        }
    }

    #[test]
    fn azure_is_told_by_its_deployment_path() {
        assert_eq!(
            Api::openai_format("/openai/deployments/d/chat/completions"),
            Api::Azure
        );
        assert_eq!(
            Api::openai_format("/openai/v1/chat/completions"),
            Api::OpenAiV1
        );
        // Azure's v1 API takes its `api-key` there; a request with neither key has none.
        let api_key = headers(&[("api-key", "az")]);
        assert!(Api::OpenAiV1.has_credential(&api_key, &[]));
        assert!(!Api::OpenAiV1.has_credential(&headers(&[("x-api-key", "k")]), &[]));
        assert_eq!(Api::openai_format("/v1/embeddings"), Api::OpenAi);
    }
}
