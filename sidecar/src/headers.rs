//! Header rules between client and upstream: `cf-aig-*` headers are the gateway's and never go
//! upstream; hop-by-hop headers (RFC 9110 §7.6.1) apply to one connection only.

use http::HeaderValue;
use http::header::{self, HeaderMap, HeaderName};

use crate::error::GatewayError;

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
    HOP_BY_HOP.contains(name)
        // The h2c upgrade's settings (RFC 7540 §3.2.1) are for the next hop only, even when a
        // client forgets to list them in `Connection`.
        || matches!(name.as_str(), "keep-alive" | "proxy-connection" | "http2-settings")
}

/// Most header names a connection's messages repeat.
pub(crate) const MAX_KNOWN_NAMES: usize = 64;

/// The header names of a connection's earlier messages, in the order they came, each with its
/// spelling as it came. A provider sends the same dozen or more on every response
/// (`x-request-id`, `openai-*`, `x-ratelimit-*`), a client the same on every request, usually in
/// the same order and always in the same case: a name found here is a comparison of bytes and a
/// reference-count increment instead of a validation, lowercasing and allocation.
#[derive(Default)]
pub(crate) struct KnownNames(Vec<KnownName>);

struct KnownName {
    /// As it came.
    sent: Box<[u8]>,
    name: HeaderName,
    /// One of the [`unread_per_response`] headers.
    unread: bool,
}

impl KnownNames {
    /// The name `raw` (any case), the `i`th of its message.
    pub(crate) fn get(
        &mut self,
        i: usize,
        raw: &[u8],
    ) -> Result<HeaderName, http::header::InvalidHeaderName> {
        Ok(self.find(i, raw)?.name.clone())
    }

    /// The name of a response header `raw` (any case), the `i`th of its response; `None` for one
    /// of the [`unread_per_response`] headers, which are kept as bytes.
    pub(crate) fn response_header(
        &mut self,
        i: usize,
        raw: &[u8],
    ) -> Result<Option<HeaderName>, http::header::InvalidHeaderName> {
        let known = self.find(i, raw)?;
        Ok((!known.unread).then(|| known.name.clone()))
    }

    fn find(
        &mut self,
        i: usize,
        raw: &[u8],
    ) -> Result<&KnownName, http::header::InvalidHeaderName> {
        let same = |k: &&KnownName| *k.sent == *raw;
        let at = match self.0.get(i).filter(same) {
            Some(_) => Some(i),
            None => self.0.iter().position(|k| same(&k)),
        };
        let at = match at {
            Some(at) => at,
            None => {
                let known = KnownName {
                    sent: raw.into(),
                    name: HeaderName::from_bytes(raw)?,
                    unread: unread_per_response(raw),
                };
                if self.0.len() == MAX_KNOWN_NAMES {
                    // Full: the oldest name makes room (a connection's names rarely change).
                    self.0.remove(0);
                }
                self.0.push(known);
                self.0.len() - 1
            }
        };
        Ok(&self.0[at])
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Whether a `name` header (a comma-separated list, as `Connection` or `Upgrade`) holds
/// `token`, in any case.
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Response headers that belong to one response (the provider's request ids, processing times
/// and rate-limit counts) and that the gateway never reads: its own HTTP/1 upstream client keeps
/// them as the bytes they came in ([`RawHeaders`]), and a cached answer does not store them.
const UNREAD_PER_RESPONSE: [&[u8]; 8] = [
    b"x-request-id",
    b"request-id",
    b"cf-ray",
    b"openai-processing-ms",
    b"x-amzn-requestid",
    b"apim-request-id",
    b"x-envoy-upstream-service-time",
    b"server-timing",
];

/// Prefixes of [`UNREAD_PER_RESPONSE`] headers: rate-limit counts.
const UNREAD_PER_RESPONSE_PREFIXES: [&[u8]; 2] = [b"x-ratelimit-", b"anthropic-ratelimit-"];

/// Whether `name` (any case) is one of the [`UNREAD_PER_RESPONSE`] headers. Asked once per
/// spelling a connection sees ([`KnownNames`]) and of a response the cache stores.
pub fn unread_per_response(name: &[u8]) -> bool {
    UNREAD_PER_RESPONSE_PREFIXES
        .iter()
        .any(|p| name.len() > p.len() && name[..p.len()].eq_ignore_ascii_case(p))
        || UNREAD_PER_RESPONSE
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
}

/// A response's [`unread_per_response`] headers as the upstream sent them, `Name: value\r\n`
/// lines, in its extensions: written through as they are by the gateway's own HTTP/1 server,
/// put into the header map ([`RawHeaders::into_map`], the values without the spaces around
/// them) for anything else that sends or keeps the response. Names and values were checked as
/// HTTP's by the upstream client's parser.
#[derive(Clone, Debug)]
pub struct RawHeaders(pub bytes::Bytes);

impl RawHeaders {
    /// Appends a header line as it came (`name:` and its value, without the line end).
    pub fn push(raw: &mut Vec<u8>, line: &[u8]) {
        raw.extend_from_slice(line);
        raw.extend_from_slice(b"\r\n");
    }

    /// Moves a response's raw headers, if it has any, into its header map.
    pub fn into_map(parts: &mut http::response::Parts) {
        if let Some(raw) = parts.extensions.remove::<RawHeaders>() {
            raw.append_to(&mut parts.headers);
        }
    }

    /// Appends the headers to `headers`.
    pub fn append_to(self, headers: &mut HeaderMap) {
        let RawHeaders(raw) = self;
        let mut at = 0;
        while let Some(eol) = memchr::memmem::find(&raw[at..], b"\r\n") {
            let line = &raw[at..at + eol];
            if let Some(colon) = memchr::memchr(b':', line)
                && let Ok(name) = HeaderName::from_bytes(&line[..colon])
                && let value = &line[colon + 1..]
                && let start = at + colon + 1 + (value.len() - value.trim_ascii_start().len())
                && let Ok(value) = HeaderValue::from_maybe_shared(raw.slice(start..at + eol))
            {
                headers.append(name, value);
            }
            at += eol + 2;
        }
    }
}

/// Whether `name` is a gateway header (`cf-aig-*`).
pub fn is_gateway_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("cf-aig-")
}

/// Copies the gateway's own headers of an answer (`cf-aig-*`: log id, event id, step, provider,
/// model, cache status) onto an error made in its place.
pub fn copy_gateway_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if is_gateway_header(name) {
            to.insert(name.clone(), value.clone());
        }
    }
}

/// The gateway headers' former names, which Cloudflare still honours ("the old headers will
/// still function"), and the headers they stand for when the new name is absent.
const LEGACY_NAMES: [(&str, Gw); 2] = [
    ("cf-skip-cache", Gw::SkipCache),
    ("cf-cache-ttl", Gw::CacheTtl),
];

/// Whether `name` is a former name of a gateway header: read as the new one, never sent upstream.
fn is_legacy_gateway_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("cf-") && LEGACY_NAMES.iter().any(|(old, _)| *old == name)
}

/// The `cf-aig-*` request headers the gateway reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gw {
    Authorization,
    ByokAlias,
    EventId,
    RequestTimeout,
    SkipCache,
    CacheTtl,
    CacheKey,
    MaxAttempts,
    RetryDelay,
    Backoff,
    CollectLog,
    CollectLogPayload,
    Metadata,
    CustomCost,
    OtelTraceId,
    OtelParentSpanId,
}

/// Their names, in the order of [`Gw`].
const GW_NAMES: [&str; 16] = [
    "cf-aig-authorization",
    "cf-aig-byok-alias",
    "cf-aig-event-id",
    "cf-aig-request-timeout",
    "cf-aig-skip-cache",
    "cf-aig-cache-ttl",
    "cf-aig-cache-key",
    "cf-aig-max-attempts",
    "cf-aig-retry-delay",
    "cf-aig-backoff",
    "cf-aig-collect-log",
    "cf-aig-collect-log-payload",
    "cf-aig-metadata",
    "cf-aig-custom-cost",
    "cf-aig-otel-trace-id",
    "cf-aig-otel-parent-span-id",
];

// Every variant has a name, and a bit in `GatewayHeaders::former`.
const _: () = assert!(Gw::OtelParentSpanId as usize + 1 == GW_NAMES.len());
const _: () = assert!(GW_NAMES.len() <= u32::BITS as usize);

impl Gw {
    /// The header's name (`cf-aig-...`).
    pub const fn name(self) -> &'static str {
        GW_NAMES[self as usize]
    }
}

/// The gateway headers a request carries, found in one pass over its headers: the gateway
/// reads a dozen, most requests carry one or two, and each read is an array index instead of a
/// hash-map lookup. The same pass notes `Host` and the marks a browser puts on a web page's
/// requests.
#[derive(Clone, Copy)]
pub struct GatewayHeaders<'a> {
    values: [Option<&'a HeaderValue>; GW_NAMES.len()],
    host: Option<&'a HeaderValue>,
    from_web_page: bool,
    /// `cf-aig-authorization` came more than once.
    token_repeated: bool,
    /// `Host` came more than once (RFC 9112 §3.2: a request to refuse).
    host_repeated: bool,
    /// Bit `h as usize` set: the value of `h` came under its former name ([`LEGACY_NAMES`]),
    /// which an error about it names.
    former: u32,
}

impl<'a> GatewayHeaders<'a> {
    pub fn scan(map: &'a HeaderMap) -> Self {
        let mut values = [None; GW_NAMES.len()];
        let mut host = None;
        let mut from_web_page = false;
        let mut token_repeated = false;
        let mut host_repeated = false;
        let mut legacy = [None; LEGACY_NAMES.len()];
        for (name, value) in map {
            let name = name.as_str();
            // One byte tells the few names read here from the rest.
            match name.as_bytes().first() {
                Some(b'c') => {
                    if name.starts_with("cf-aig-") {
                        if let Some(i) = GW_NAMES.iter().position(|n| *n == name) {
                            token_repeated |=
                                i == Gw::Authorization as usize && values[i].is_some();
                            values[i].get_or_insert(value);
                        }
                    } else if name.starts_with("cf-")
                        && let Some(i) = LEGACY_NAMES.iter().position(|(n, _)| *n == name)
                    {
                        legacy[i].get_or_insert(value);
                    }
                }
                Some(b'h') if name == "host" => {
                    host_repeated |= host.is_some();
                    host.get_or_insert(value);
                }
                Some(b'o') if name == "origin" => from_web_page = true,
                Some(b's') if name == "sec-fetch-site" => {
                    from_web_page |= value.as_bytes() != b"none";
                }
                _ => {}
            }
        }
        // A former name counts only when the current one is absent.
        let mut former = 0;
        for ((_, gw), value) in LEGACY_NAMES.iter().zip(legacy) {
            if let Some(v) = value
                && values[*gw as usize].is_none()
            {
                values[*gw as usize] = Some(v);
                former |= 1 << *gw as usize;
            }
        }
        Self {
            values,
            host,
            from_web_page,
            token_repeated,
            host_repeated,
            former,
        }
    }

    /// The name gateway header `h` came under: its former name when the request sent that one
    /// ([`LEGACY_NAMES`]), so that an error names the header the client sent.
    pub fn name(self, h: Gw) -> &'static str {
        if self.former & (1 << h as usize) == 0 {
            return h.name();
        }
        LEGACY_NAMES
            .iter()
            .find(|(_, gw)| *gw == h)
            .map_or(h.name(), |(old, _)| old)
    }

    /// Whether `cf-aig-authorization` came more than once: refused whatever the values, so
    /// that a wrong token is never let through beside a right one.
    pub fn token_repeated(self) -> bool {
        self.token_repeated
    }

    /// Whether `Host` came more than once.
    pub fn host_repeated(self) -> bool {
        self.host_repeated
    }

    /// Whether a web page made the request. Browsers put `Origin` on every request a page sends
    /// but a plain `GET` of its own origin, and `Sec-Fetch-Site` on every request, `none` only
    /// for one the user made (a typed URL, a bookmark); server-side SDKs and tools send neither.
    pub fn from_web_page(self) -> bool {
        self.from_web_page
    }

    /// The `Host` header (the first, if repeated).
    pub fn host(self) -> Option<&'a HeaderValue> {
        self.host
    }

    /// These headers with `specific`'s values in place of theirs where it has one: a universal
    /// step's own `cf-aig-*` headers over the request's ("provider-level headers override all
    /// other configurations").
    pub fn overridden_by(mut self, specific: GatewayHeaders<'a>) -> Self {
        for (i, (value, own)) in self.values.iter_mut().zip(specific.values).enumerate() {
            if own.is_some() {
                *value = own;
                self.former = (self.former & !(1 << i)) | (specific.former & (1 << i));
            }
        }
        self
    }

    /// The value of gateway header `h` (the first, if repeated).
    pub fn get(self, h: Gw) -> Option<&'a HeaderValue> {
        self.values[h as usize]
    }

    /// A `true`/`false` header (any case), `None` when absent; anything else is a 400.
    pub fn flag(self, h: Gw) -> Result<Option<bool>, GatewayError> {
        match self.get(h).map(HeaderValue::as_bytes) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case(b"false") => Ok(Some(false)),
            Some(v) if v.eq_ignore_ascii_case(b"true") => Ok(Some(true)),
            Some(_) => Err(GatewayError::BadHeader {
                name: self.name(h),
                reason: "expected true or false".into(),
            }),
        }
    }

    /// `cf-aig-byok-alias`: which stored key of the provider to use.
    pub fn byok_alias(self) -> Result<Option<&'a str>, GatewayError> {
        self.get(Gw::ByokAlias)
            .map(|v| {
                v.to_str().map_err(|_| GatewayError::BadHeader {
                    name: Gw::ByokAlias.name(),
                    reason: "not visible ASCII".into(),
                })
            })
            .transpose()
    }
}

/// Whether `authority` (a `Host` value or a URI authority, port optional) names the listener by
/// an IP address or as `localhost` (`*.localhost` included, which resolve to loopback without
/// DNS). Any other name reaches a loopback listener only through a DNS answer someone else
/// controls: a page of `rebind.attacker.example` whose name now resolves to 127.0.0.1.
pub fn is_local_authority(authority: &[u8]) -> bool {
    fn port_ok(port: &[u8]) -> bool {
        match port.split_first() {
            None => true,
            Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
    }
    if let Some(rest) = authority.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let (ip, port) = (&rest[..end], &rest[end + 1..]);
        return port_ok(port)
            && std::str::from_utf8(ip).is_ok_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let (name, port) = match authority.iter().position(|b| *b == b':') {
        Some(i) => authority.split_at(i),
        None => (authority, &b""[..]),
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    let localhost = |n: &[u8]| n.eq_ignore_ascii_case(b"localhost");
    port_ok(port)
        && (localhost(name)
            || name
                .len()
                .checked_sub(10)
                .is_some_and(|i| i > 0 && name[i] == b'.' && localhost(&name[i + 1..]))
            || std::str::from_utf8(name).is_ok_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok()))
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

/// `Accept-Encoding: identity`, on every request the gateway sends upstream. Token counting,
/// cost, DLP, guardrails, `/compat` translation, logged payloads and the cache all read the
/// answer's bytes, so it must come uncompressed; between the app and the sidecar (loopback)
/// compression would save nothing anyway. SDKs ask for gzip (httpx, the `openai` and
/// `anthropic` SDKs' client, sends `gzip, deflate`), and providers behind CDNs compress JSON
/// when asked.
pub fn identity_encoding() -> HeaderValue {
    HeaderValue::from_static("identity")
}

/// Whether the client's own SigV4 signature (`Authorization: AWS4-HMAC-SHA256 ...
/// SignedHeaders=a;b;c, ...`) covers the header `name`: such a header cannot be changed.
fn client_signed(client: &HeaderMap, name: &HeaderName) -> bool {
    client
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("AWS4-HMAC-SHA256"))
        .and_then(|v| v.split("SignedHeaders=").nth(1))
        .and_then(|rest| rest.split([',', ' ']).next())
        .is_some_and(|list| {
            list.split(';')
                .any(|h| h.eq_ignore_ascii_case(name.as_str()))
        })
}

/// Whether the client's `Accept-Encoding` goes upstream as it is: only when the client's own
/// SigV4 signature goes upstream unchanged (`client_signature`: aws-bedrock without stored
/// credentials, so the gateway neither signs nor injects a key) and covers it. Anywhere else
/// the client's `Authorization` is replaced, or is no signature the upstream checks: a look-alike
/// must not get a compressed answer past DLP, guardrails, usage counting and the cache.
pub fn keeps_accept_encoding(client: &HeaderMap, client_signature: bool) -> bool {
    client_signature
        && client.contains_key(header::ACCEPT_ENCODING)
        && client_signed(client, &header::ACCEPT_ENCODING)
}

/// A coding other than `identity` that the client's `Accept-Encoding` asks for, if any: with
/// [`keeps_accept_encoding`], the upstream may answer compressed.
pub fn accepts_compression(client: &HeaderMap) -> Option<&str> {
    non_identity(client, header::ACCEPT_ENCODING)
}

/// The coding of a request body that is not plain bytes (`Content-Encoding` other than
/// `identity`), if any: the gateway's request checks cannot read it.
pub fn body_coding(client: &HeaderMap) -> Option<&str> {
    non_identity(client, header::CONTENT_ENCODING)
}

/// The codings an answer's `Content-Encoding` lists other than `identity`, as one value (`gzip`;
/// `gzip, br` for a body coded twice), if any.
pub fn answer_coding(headers: &HeaderMap) -> Option<String> {
    let mut codings = Vec::new();
    for v in headers.get_all(header::CONTENT_ENCODING) {
        let Ok(text) = v.to_str() else {
            return Some("(not text)".to_owned());
        };
        codings.extend(codings_in(text));
    }
    (!codings.is_empty()).then(|| codings.join(", "))
}

/// The first coding in the `name` header values other than `identity` (a value that is not
/// text counts as one).
fn non_identity(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get_all(name).iter().find_map(|v| {
        let Ok(text) = v.to_str() else {
            return Some("(not text)");
        };
        codings_in(text).next()
    })
}

/// The codings a coding list names other than `identity` (parameters left off).
fn codings_in(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
}

/// The headers to send upstream: the client's, less gateway and hop-by-hop headers, `Host`
/// (set from the upstream URI), `Content-Length` (set from the body), `Expect` (the gateway
/// answered it), and `drop` (the provider's auth headers when the gateway injects its own key);
/// `Accept-Encoding` is `identity` (see [`identity_encoding`]) unless [`keeps_accept_encoding`]
/// (`client_signature`: the client's own SigV4 signature goes upstream unchanged).
pub fn upstream_request_headers(
    client: &HeaderMap,
    drop: &[HeaderName],
    client_signature: bool,
) -> HeaderMap {
    let listed = if client.contains_key(header::CONNECTION) {
        connection_listed(client)
    } else {
        Vec::new()
    };
    let keep_encoding = keeps_accept_encoding(client, client_signature);
    let mut out = HeaderMap::with_capacity(client.len() + 1);
    for (name, value) in client {
        if is_hop_by_hop(name)
            || is_gateway_header(name)
            || is_legacy_gateway_header(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            // `Expect: 100-continue` was the client's question to this gateway, answered (hyper
            // sends `100 Continue` when the body is read) before the body was read whole: every
            // upstream request carries a buffered body, so there is nothing left to ask.
            || name == header::EXPECT
            || (name == header::ACCEPT_ENCODING && !keep_encoding)
            || drop.contains(name)
            || listed.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if !keep_encoding {
        out.insert(header::ACCEPT_ENCODING, identity_encoding());
    }
    out
}

/// Removes hop-by-hop headers, and any `cf-aig-*` header, from an upstream response before it
/// goes to the client.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    // The `cf-aig-*` names are this gateway's: an upstream's own (another AI gateway's log id or
    // cache status, or a provider naming itself) would pass for ours, and a cached answer would
    // repeat them as what served it.
    let strip = |n: &HeaderName| is_hop_by_hop(n) || is_gateway_header(n);
    // Most responses carry none, streams one (`transfer-encoding`): remove the names present
    // instead of looking up every hop-by-hop name.
    if !headers.keys().any(strip) {
        return;
    }
    let mut names: Vec<HeaderName> = headers.keys().filter(|n| strip(n)).cloned().collect();
    if headers.contains_key(header::CONNECTION) {
        names.extend(connection_listed(headers));
    }
    for name in names {
        headers.remove(name);
    }
}

/// The token of an `Authorization`-style value `Bearer <token>` (the scheme in any case, as
/// RFC 9110 has it).
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    Some(rest.trim_ascii_start()).filter(|t| !t.is_empty())
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
            ("cf-skip-cache", "true"),
            ("cf-cache-ttl", "60"),
            ("cf-ray", "kept"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("host", "127.0.0.1:8787"),
            ("content-length", "12"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
            ("openai-organization", "org-1"),
        ]);
        let out = upstream_request_headers(&client, &[], false);
        let names: Vec<_> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            vec![
                "cf-ray",
                "content-type",
                "openai-organization",
                "accept-encoding"
            ]
        );
    }

    #[test]
    fn former_names_of_gateway_headers_count_when_the_current_name_is_absent() {
        let old = map(&[("cf-skip-cache", "true"), ("cf-cache-ttl", "120")]);
        let aig = GatewayHeaders::scan(&old);
        assert_eq!(aig.flag(Gw::SkipCache), Ok(Some(true)));
        assert_eq!(
            aig.get(Gw::CacheTtl).map(|v| v.as_bytes()),
            Some(&b"120"[..])
        );
        // Either order: the current name wins.
        for pair in [
            [("cf-cache-ttl", "120"), ("cf-aig-cache-ttl", "3600")],
            [("cf-aig-cache-ttl", "3600"), ("cf-cache-ttl", "120")],
        ] {
            let both = map(&pair);
            assert_eq!(
                GatewayHeaders::scan(&both)
                    .get(Gw::CacheTtl)
                    .map(|v| v.as_bytes()),
                Some(&b"3600"[..])
            );
            assert_eq!(
                GatewayHeaders::scan(&both).name(Gw::CacheTtl),
                "cf-aig-cache-ttl"
            );
        }
    }

    #[test]
    fn a_bad_value_is_named_by_the_header_that_carried_it() {
        let old = map(&[("cf-skip-cache", "yes"), ("cf-cache-ttl", "soon")]);
        let aig = GatewayHeaders::scan(&old);
        assert_eq!(aig.name(Gw::CacheTtl), "cf-cache-ttl");
        assert_eq!(aig.name(Gw::CacheKey), "cf-aig-cache-key");
        let err = aig.flag(Gw::SkipCache).expect_err("not a boolean");
        assert!(err.to_string().contains("header cf-skip-cache:"), "{err}");
        let new = map(&[("cf-aig-skip-cache", "yes")]);
        let err = GatewayHeaders::scan(&new)
            .flag(Gw::SkipCache)
            .expect_err("not a boolean");
        assert!(
            err.to_string().contains("header cf-aig-skip-cache:"),
            "{err}"
        );
        // A universal step's own header names itself, whichever name the request used.
        let step = map(&[("cf-aig-cache-ttl", "later")]);
        let both = aig.overridden_by(GatewayHeaders::scan(&step));
        assert_eq!(both.name(Gw::CacheTtl), "cf-aig-cache-ttl");
        assert_eq!(both.name(Gw::SkipCache), "cf-skip-cache");
        let step_old = map(&[("cf-skip-cache", "no")]);
        let request = GatewayHeaders::scan(&new).overridden_by(GatewayHeaders::scan(&step_old));
        assert_eq!(request.name(Gw::SkipCache), "cf-skip-cache");
    }

    #[test]
    fn upstream_answers_are_asked_for_uncompressed_unless_the_client_signed_its_choice() {
        let sdk = map(&[
            ("accept-encoding", "gzip, deflate"),
            ("authorization", "Bearer sk-placeholder"),
        ]);
        let out = upstream_request_headers(&sdk, &[], false);
        let encodings: Vec<_> = out.get_all(header::ACCEPT_ENCODING).iter().collect();
        assert_eq!(encodings, vec!["identity"]);
        // Without any Accept-Encoding a server may pick any coding (RFC 9110 §12.5.3).
        let none = upstream_request_headers(&map(&[]), &[], false);
        assert_eq!(
            none.get(header::ACCEPT_ENCODING).expect("accept-encoding"),
            "identity"
        );
        // A SigV4 signature over accept-encoding that goes upstream unchanged: changing the
        // header would break it. Signed, but not over accept-encoding: replaced as for anyone.
        // A look-alike where no client signature goes upstream (any other provider, or the
        // gateway signs or injects a key): replaced, or the answer would come compressed past
        // every check of its bytes.
        for (signed_headers, client_signature, expected) in [
            ("accept-encoding;host;x-amz-date", true, "gzip"),
            ("host;x-amz-date", true, "identity"),
            ("accept-encoding;host;x-amz-date", false, "identity"),
            ("accept-encoding", false, "identity"),
        ] {
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential=AKID/20261126/us-east-1/bedrock/aws4_request, \
                 SignedHeaders={signed_headers}, Signature=abc"
            );
            let mut client = map(&[("accept-encoding", "gzip")]);
            client.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&auth).expect("value"),
            );
            let out = upstream_request_headers(&client, &[], client_signature);
            let encodings: Vec<_> = out.get_all(header::ACCEPT_ENCODING).iter().collect();
            assert_eq!(
                encodings,
                vec![expected],
                "{signed_headers} {client_signature}"
            );
            assert_eq!(
                keeps_accept_encoding(&client, client_signature),
                expected == "gzip"
            );
        }
    }

    #[test]
    fn codings_other_than_identity_are_found() {
        for (value, coding) in [
            ("identity", None),
            ("IDENTITY, identity", None),
            ("", None),
            ("gzip", Some("gzip")),
            ("identity, br", Some("br")),
            ("gzip;q=1.0", Some("gzip")),
        ] {
            let mut h = map(&[]);
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(value));
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
            assert_eq!(body_coding(&h), coding, "{value:?}");
            assert_eq!(accepts_compression(&h), coding, "{value:?}");
        }
        assert_eq!(body_coding(&map(&[])), None);
        let mut two = map(&[("content-encoding", "identity")]);
        two.append(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(body_coding(&two), Some("gzip"), "every value counts");
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
            false,
        );
        assert!(!out.contains_key(header::AUTHORIZATION) && !out.contains_key("x-api-key"));
        let kept = upstream_request_headers(&client, &[], false);
        assert!(
            kept.contains_key(header::AUTHORIZATION) && kept.contains_key("x-api-key"),
            "without injection the client's own key is forwarded"
        );
    }

    #[test]
    fn a_repeated_gateway_token_is_noted() {
        let once = map(&[("cf-aig-authorization", "Bearer a")]);
        assert!(!GatewayHeaders::scan(&once).token_repeated());
        let twice = map(&[
            ("cf-aig-authorization", "Bearer a"),
            ("x-api-key", "k"),
            ("cf-aig-authorization", "Bearer b"),
        ]);
        assert!(GatewayHeaders::scan(&twice).token_repeated());
        let other = map(&[("cf-aig-byok-alias", "a"), ("cf-aig-byok-alias", "b")]);
        assert!(!GatewayHeaders::scan(&other).token_repeated());
    }

    #[test]
    fn a_repeated_host_is_noted() {
        let once = map(&[("host", "localhost"), ("x-a", "b")]);
        assert!(!GatewayHeaders::scan(&once).host_repeated());
        let twice = map(&[("host", "localhost"), ("host", "evil.example")]);
        let aig = GatewayHeaders::scan(&twice);
        assert!(aig.host_repeated());
        assert_eq!(aig.host().map(|h| h.as_bytes()), Some(&b"localhost"[..]));
    }

    #[test]
    fn gateway_headers_are_found_in_one_pass() {
        let h = map(&[
            ("content-type", "application/json"),
            ("cf-aig-cache-ttl", "60"),
            ("cf-aig-skip-cache", "TRUE"),
            ("cf-aig-collect-log", "maybe"),
            ("cf-aig-byok-alias", "team-a"),
            ("cf-aig-byok-alias", "team-b"),
            ("cf-aig-something-new", "1"),
        ]);
        let aig = GatewayHeaders::scan(&h);
        assert_eq!(
            aig.get(Gw::CacheTtl).map(|v| v.as_bytes()),
            Some(&b"60"[..])
        );
        assert_eq!(aig.get(Gw::CacheKey), None);
        assert_eq!(aig.get(Gw::Authorization), None);
        assert_eq!(aig.flag(Gw::SkipCache), Ok(Some(true)));
        assert_eq!(aig.flag(Gw::CollectLogPayload), Ok(None));
        let err = aig.flag(Gw::CollectLog).expect_err("not a boolean");
        assert_eq!(err.code(), 2100);
        assert!(err.to_string().contains("cf-aig-collect-log"), "{err}");
        assert_eq!(
            aig.byok_alias(),
            Ok(Some("team-a")),
            "the first of repeated values"
        );
        // A gateway header carried in any case is found: HTTP/1 names arrive lowercased.
        let mut h = HeaderMap::new();
        h.insert("CF-AIG-Request-Timeout", HeaderValue::from_static("5"));
        assert!(GatewayHeaders::scan(&h).get(Gw::RequestTimeout).is_some());
        for (i, name) in GW_NAMES.iter().enumerate() {
            assert!(name.starts_with("cf-aig-"), "{i}: {name}");
        }
    }

    #[test]
    fn browser_marks_and_host_are_noted_in_the_same_pass() {
        let sdk = map(&[
            ("host", "127.0.0.1:8787"),
            ("content-type", "application/json"),
            ("cf-aig-cache-ttl", "60"),
        ]);
        let aig = GatewayHeaders::scan(&sdk);
        assert!(!aig.from_web_page());
        assert_eq!(
            aig.host().map(HeaderValue::as_bytes),
            Some(&b"127.0.0.1:8787"[..])
        );
        assert!(aig.get(Gw::CacheTtl).is_some());
        for page in [
            &[("origin", "http://evil.example")][..],
            &[("origin", "null")],
            &[("sec-fetch-site", "cross-site")],
            &[("sec-fetch-site", "same-site")],
            &[("sec-fetch-site", "same-origin")],
        ] {
            assert!(GatewayHeaders::scan(&map(page)).from_web_page(), "{page:?}");
        }
        let typed = map(&[("sec-fetch-site", "none")]);
        assert!(
            !GatewayHeaders::scan(&typed).from_web_page(),
            "a URL the user typed"
        );
    }

    #[test]
    fn only_addresses_and_localhost_name_a_loopback_listener() {
        for ok in [
            "127.0.0.1:8787",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:8787",
            "[::1]",
            "localhost:8787",
            "LocalHost",
            "localhost.:8787",
            "app.localhost:8787",
            "127.0.0.1:",
        ] {
            assert!(is_local_authority(ok.as_bytes()), "{ok}");
        }
        for refused in [
            "rebind.attacker.example:8787",
            "rebind.attacker.example",
            "localhost.attacker.example",
            "evillocalhost:8787",
            ".localhost",
            "127.0.0.1.nip.io:8787",
            "[::1:8787",
            "[::1]x",
            "127.0.0.1:80x",
            "[not-ip]:80",
            "",
        ] {
            assert!(!is_local_authority(refused.as_bytes()), "{refused}");
        }
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
