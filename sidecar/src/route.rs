//! Request routes of SPEC.md: the short sidecar form `/{provider}/...` and Cloudflare's long form
//! `/v1/{account}/{gateway}/{provider}/...`.

use crate::error::GatewayError;

/// What a request path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Passthrough to one provider.
    Provider(ProviderRoute<'a>),
    /// The unified OpenAI-compatible endpoint (`/compat/...`).
    Compat {
        rest: &'a str,
        gateway: Option<&'a str>,
    },
    /// The universal endpoint (`POST /`).
    Universal { gateway: Option<&'a str> },
}

/// A provider passthrough route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRoute<'a> {
    /// Provider id as written in the path.
    pub provider: &'a str,
    /// The provider path after the provider id, without a leading `/` (may be empty).
    pub rest: &'a str,
    /// Account id of the long form.
    pub account: Option<&'a str>,
    /// Gateway id of the long form.
    pub gateway: Option<&'a str>,
}

impl Route<'_> {
    /// Gateway id named by a long-form URL.
    pub fn gateway(&self) -> Option<&str> {
        match self {
            Route::Provider(p) => p.gateway,
            Route::Compat { gateway, .. } | Route::Universal { gateway } => *gateway,
        }
    }
}

/// Parses a request path (without query).
pub fn parse(path: &str) -> Result<Route<'_>, GatewayError> {
    let Some(path) = path.strip_prefix('/') else {
        return Err(not_found());
    };
    let (account, gateway, path) = match path.strip_prefix("v1/") {
        Some(long) => {
            let (account, after) = long.split_once('/').unwrap_or((long, ""));
            let (gateway, after) = after.split_once('/').unwrap_or((after, ""));
            if account.is_empty() || gateway.is_empty() {
                return Err(not_found());
            }
            (Some(account), Some(gateway), after)
        }
        None => (None, None, path),
    };
    if path.is_empty() {
        return Ok(Route::Universal { gateway });
    }
    let (provider, rest) = path.split_once('/').unwrap_or((path, ""));
    if provider.is_empty() {
        return Err(not_found());
    }
    if provider == "compat" {
        return Ok(Route::Compat { rest, gateway });
    }
    Ok(Route::Provider(ProviderRoute {
        provider,
        rest,
        account,
        gateway,
    }))
}

/// The account id of a long-form path (`/v1/{account}/{gateway}/...`), for the routes that
/// build provider paths themselves (`/compat`, the universal endpoint).
pub fn long_form_account(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/")?
        .split('/')
        .next()
        .filter(|a| !a.is_empty())
}

fn not_found() -> GatewayError {
    GatewayError::NotFound("route not found".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(path: &str) -> ProviderRoute<'_> {
        match parse(path) {
            Ok(Route::Provider(p)) => p,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn short_form_names_provider_and_rest() {
        let p = provider("/openai/chat/completions");
        assert_eq!(
            (p.provider, p.rest, p.gateway),
            ("openai", "chat/completions", None)
        );
    }

    #[test]
    fn long_form_carries_account_and_gateway() {
        let p = provider("/v1/acct-1/main/anthropic/v1/messages");
        assert_eq!(p.provider, "anthropic");
        assert_eq!(p.rest, "v1/messages");
        assert_eq!((p.account, p.gateway), (Some("acct-1"), Some("main")));
    }

    #[test]
    fn root_and_long_root_are_the_universal_endpoint() {
        assert_eq!(parse("/"), Ok(Route::Universal { gateway: None }));
        assert_eq!(
            parse("/v1/a/gw"),
            Ok(Route::Universal {
                gateway: Some("gw")
            })
        );
        assert_eq!(
            parse("/v1/a/gw/"),
            Ok(Route::Universal {
                gateway: Some("gw")
            })
        );
    }

    #[test]
    fn compat_is_its_own_route() {
        assert_eq!(
            parse("/compat/chat/completions"),
            Ok(Route::Compat {
                rest: "chat/completions",
                gateway: None
            })
        );
    }

    #[test]
    fn malformed_paths_are_404_2001() {
        for bad in [
            "",
            "openai",
            "//chat",
            "/v1/",
            "/v1/acct",
            "/v1//gw/openai/x",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.code(), 2001, "{bad}");
        }
    }
}
