//! Header rules between client and upstream: `cf-aig-*` headers are the gateway's and never go
//! upstream; hop-by-hop headers (RFC 9110 §7.6.1) apply to one connection only.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that only describe one connection, in both directions.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

/// Whether `name` is a gateway header (`cf-aig-*`).
pub fn is_gateway_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("cf-aig-")
}

/// A `true`/`false` gateway header (any case), `None` when absent; anything else is a 400
/// naming `shown` (the header's name).
pub fn bool_header(
    headers: &HeaderMap,
    name: HeaderName,
    shown: &'static str,
) -> Result<Option<bool>, crate::error::GatewayError> {
    match headers.get(name).map(|v| v.as_bytes()) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case(b"false") => Ok(Some(false)),
        Some(v) if v.eq_ignore_ascii_case(b"true") => Ok(Some(true)),
        Some(_) => Err(crate::error::GatewayError::BadHeader {
            name: shown,
            reason: "expected true or false".into(),
        }),
    }
}

/// Lowercase header names listed in `Connection` (they are hop-by-hop too).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// The headers to send upstream: the client's, less gateway and hop-by-hop headers, `Host`
/// (set from the upstream URI), `Content-Length` (set from the body), and `drop` (the provider's
/// auth headers when the gateway injects its own key).
pub fn upstream_request_headers(client: &HeaderMap, drop: &[HeaderName]) -> HeaderMap {
    let listed = if client.contains_key(header::CONNECTION) {
        connection_listed(client)
    } else {
        Vec::new()
    };
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        if is_hop_by_hop(name)
            || is_gateway_header(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || drop.contains(name)
            || listed.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Removes hop-by-hop headers from an upstream response before it goes to the client.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    // Most responses carry none, streams one (`transfer-encoding`): remove the names present
    // instead of looking up every hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if headers.contains_key(header::CONNECTION) {
        names.extend(connection_listed(headers));
    }
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn gateway_and_hop_by_hop_headers_never_go_upstream() {
        let client = map(&[
            ("cf-aig-authorization", "Bearer gw"),
            ("cf-aig-byok-alias", "x"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("host", "127.0.0.1:8787"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("openai-organization", "org-1"),
        ]);
        let out = upstream_request_headers(&client, &[]);
        let names: Vec<_> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["content-type", "openai-organization"]);
    }

    #[test]
    fn provider_auth_headers_are_dropped_when_the_gateway_injects_a_key() {
        let client = map(&[
            ("authorization", "Bearer placeholder"),
            ("x-api-key", "placeholder"),
        ]);
        let out = upstream_request_headers(
            &client,
            &[header::AUTHORIZATION, HeaderName::from_static("x-api-key")],
        );
        assert!(out.is_empty());
        let kept = upstream_request_headers(&client, &[]);
        assert_eq!(
            kept.len(),
            2,
            "without injection the client's own key is forwarded"
        );
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed() {
        let mut resp = map(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/event-stream"),
            ("keep-alive", "timeout=5"),
        ]);
        strip_response_headers(&mut resp);
        assert_eq!(
            resp.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            vec!["content-type"]
        );
    }
}
