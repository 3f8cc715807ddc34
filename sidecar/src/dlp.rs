//! Data loss prevention: detection profiles (credit card numbers, US SSNs, email addresses, AWS
//! access keys, private keys) matched against request bodies and provider responses.
//!
//! A policy `FLAG`s (the request goes on; `cf-aig-dlp` on the response lists the matches) or
//! `BLOCK`s (`400` with code 2029 for a request, 2030 for a response). Request bodies are
//! scanned as received. When any policy checks `RESPONSE`, responses are held back and scanned
//! whole before the first byte goes to the client — streamed responses too, which then arrive
//! in one piece: a response that is already on its way cannot be taken back. In a stream (SSE,
//! Bedrock's binary event streams with their base64 `chunk`s, Gemini's JSON array of chunks)
//! the text of the events (`content`, `text`, `arguments`, ... fields; see [`crate::text`]) is
//! also joined before matching, so a number split across chunks is still found.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use regex::bytes::Regex;
use sidegate_crds::policy::{Dlp, DlpAction, DlpCheck};

use crate::error::GatewayError;

/// The response header listing flagged matches.
pub const HEADER: HeaderName = HeaderName::from_static("cf-aig-dlp");
/// Largest response held back for scanning.
pub const MAX_RESPONSE_BYTES: usize = 32 << 20;

struct Profile {
    name: &'static str,
    pattern: Regex,
    /// Extra check of a candidate match (e.g. the Luhn checksum).
    verify: fn(&[u8]) -> bool,
    /// Where to search again after a match `verify` refused, as an offset into the match (at
    /// least 1): see [`profile_search`].
    resume: fn(&[u8]) -> usize,
    /// A number: a match right after `<digit>.` is the fraction of a decimal number
    /// ([`after_decimal_point`]), not one.
    number: bool,
}

fn always(_: &[u8]) -> bool {
    true
}

/// Luhn checksum over digits given from the last.
fn luhn<'a>(digits_from_last: impl Iterator<Item = &'a u8>) -> bool {
    let sum: u32 = digits_from_last
        .map(|b| u32::from(b - b'0'))
        .enumerate()
        .map(|(i, d)| match (i % 2 == 1, d * 2) {
            (true, dd) if dd > 9 => dd - 9,
            (true, dd) => dd,
            (false, _) => d,
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The digit groups of a match (its runs of digits, whatever separates them).
fn digit_groups(m: &[u8]) -> impl Iterator<Item = &[u8]> {
    m.split(|b| !b.is_ascii_digit()).filter(|g| !g.is_empty())
}

/// A card number in a run of digit groups (a number written in groups next to other numbers, a
/// CVV, an expiry date, a quantity, is matched with them): a run of its whole groups of 13–19
/// digits (not every window of a long digit run, which would pass Luhn by chance). Each run of
/// groups is tried, by the group it ends with: a few per group (19 digits are at most six
/// groups of three), and nothing is kept but the groups before (a run of a million groups
/// takes no memory).
fn card(m: &[u8]) -> bool {
    // The last groups of three or more digits in a row, 19 digits at most.
    let mut chain: [&[u8]; 8] = [&[]; 8];
    let mut len = 0;
    for group in digit_groups(m) {
        if group.len() < 3 {
            // No run of several groups goes through it, nor is it one.
            len = 0;
            continue;
        }
        chain[len] = group;
        len += 1;
        while len > 0 && chain[..len].iter().map(|g| g.len()).sum::<usize>() > 19 {
            chain.copy_within(1..len, 0);
            len -= 1;
        }
        if (0..len).any(|start| card_number(&chain[start..len])) {
            return true;
        }
    }
    false
}

/// Digit groups written as card numbers are: 13–19 digits passing Luhn, not starting with 0
/// (no issuer's: zeros, a nil UUID), in one run or in groups of three or more digits (4-4-4-4,
/// 4-6-5), not a list of small numbers.
fn card_number(groups: &[&[u8]]) -> bool {
    let digits: usize = groups.iter().map(|g| g.len()).sum();
    (13..=19).contains(&digits)
        && groups[0].first() != Some(&b'0')
        && (groups.len() == 1 || groups.iter().all(|g| g.len() >= 3))
        && luhn(groups.iter().rev().flat_map(|g| g.iter().rev()))
}

/// An address, not an image's name at a density (`icon@2x.png`): its last label is no image
/// file extension.
fn email(m: &[u8]) -> bool {
    let tld = m.rsplit(|&b| b == b'.').next().unwrap_or_default();
    !IMAGE_EXTENSIONS
        .iter()
        .any(|ext| tld.eq_ignore_ascii_case(ext.as_bytes()))
}

const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "svg", "webp", "avif", "bmp", "ico", "tif", "tiff",
];

/// US SSN: area not 000, 666 or 9xx; group not 00; serial not 0000.
fn ssn(m: &[u8]) -> bool {
    let mut d = [0u8; 9];
    let mut n = 0;
    for &b in m.iter().filter(|b| b.is_ascii_digit()) {
        let Some(slot) = d.get_mut(n) else {
            return false;
        };
        *slot = b;
        n += 1;
    }
    let (area, group, serial) = (&d[0..3], &d[3..5], &d[5..9]);
    n == 9
        && area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && group != b"00"
        && serial != b"0000"
}

/// After a refused SSN: from its next digit group (a number written after others may start
/// inside the match: matches do not overlap). Also where a number's groups after a decimal
/// fraction start.
fn next_group(m: &[u8]) -> usize {
    let sep = m
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(m.len());
    m[sep..]
        .iter()
        .position(u8::is_ascii_digit)
        .map_or(m.len(), |d| sep + d)
}

/// After a refused address: just past its `@` (its domain may be an address's local part, as
/// in `a@b.png@c.com`; no address starts before it, in its local part, that ends elsewhere).
fn after_at(m: &[u8]) -> usize {
    memchr::memchr(b'@', m).map_or(m.len(), |at| at + 1)
}

fn past(m: &[u8]) -> usize {
    m.len()
}

/// Whether the number at `start` of `text` is a decimal number's fraction: right after
/// `<digit>.` (a JSON number such as Gemini's `"avgLogprobs": -0.2380082847904681`, an
/// embedding's value: one such fraction in ten passes Luhn). A comma is no decimal point here:
/// `[1,4111111111111111]` and CSV lines list numbers so.
fn after_decimal_point(text: &[u8], start: usize) -> bool {
    matches!(
        start.checked_sub(2).and_then(|s| text.get(s..start)),
        Some([d, b'.']) if d.is_ascii_digit()
    )
}

/// What separates the digit groups of a number: a space, a dash, and as models and word
/// processors typeset them, the no-break spaces (U+00A0, U+2007 figure, U+202F narrow), the
/// thin space (U+2009), and the hyphens and dashes of U+2010–U+2013 (hyphen, non-breaking
/// hyphen, figure dash, en dash), in UTF-8.
macro_rules! space {
    () => {
        r"(?: |\xC2\xA0|\xE2\x80[\x87\x89\xAF])"
    };
}
macro_rules! dash {
    () => {
        r"(?:-|\xE2\x80[\x90-\x93])"
    };
}

static PROFILES: LazyLock<Vec<Profile>> = LazyLock::new(|| {
    let p = |name, re: &str, verify, resume, number| Profile {
        name,
        // The patterns are constants, tested below.
        pattern: Regex::new(re).expect("DLP patterns compile"),
        verify,
        resume,
        number,
    };
    vec![
        p(
            "credit-card",
            // A whole run of digit groups of 13 digits or more, its runs of groups read by
            // `card` (one search for the run, however many numbers it holds).
            concat!(
                r"(?-u)\b[0-9](?:(?:",
                space!(),
                "|",
                dash!(),
                r")?[0-9]){12,}\b"
            ),
            card as fn(&[u8]) -> bool,
            past as fn(&[u8]) -> usize,
            true,
        ),
        // Written with dashes or spaces (nine digits alone are any number).
        p(
            "us-ssn",
            concat!(
                r"(?-u)\b[0-9]{3}(?:",
                dash!(),
                "[0-9]{2}",
                dash!(),
                "|",
                space!(),
                "[0-9]{2}",
                space!(),
                r")[0-9]{4}\b"
            ),
            ssn,
            next_group,
            true,
        ),
        p(
            "email",
            r"(?-u)\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            email,
            after_at,
            false,
        ),
        // Access key ids (also after `_`, as in `BACKUP_AKIA...`), and secret access keys where
        // they are named (40 characters of base64 alone are any hash).
        p(
            "aws-keys",
            concat!(
                r"(?-u)(?:\b|_)(?:AKIA|ASIA)[0-9A-Z]{16}\b",
                r#"|(?i-u)\baws[_ -]?secret[_ -]?(?:access[_ -]?)?key["']?\s*[:=]\s*["']?[A-Za-z0-9/+]{40}(?:[^A-Za-z0-9/+=]|$)"#,
            ),
            always,
            past,
            false,
        ),
        // PEM (PKCS#1/#8, EC, OpenSSH, encrypted), OpenPGP, SSH2 (RFC 4716 style) and PuTTY.
        p(
            "private-keys",
            concat!(
                r"(?-u)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
                r"|---- BEGIN SSH2 (?:ENCRYPTED )?PRIVATE KEY ----",
                r"|PuTTY-User-Key-File-[0-9]+:",
            ),
            always,
            past,
            false,
        ),
    ]
});

/// Largest body scanned on the runtime's own thread (a few milliseconds at most); larger ones,
/// uploads of megabytes, go to a blocking thread ([`Settings::scan`]).
const SCAN_INLINE: usize = 256 * 1024;

/// Names of the detection profiles, for error messages.
pub fn profile_names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

fn profile_matches(i: usize, text: &[u8]) -> bool {
    profile_search(i, text, &mut 0)
}

/// Whether profile `i` matches in `text`; `searched` adds up the bytes each search of its
/// pattern covered (from where it started to the end of its match, or of the text).
///
/// After a match the profile refuses, the search goes on from inside it only where no match
/// of the profile can be long (an SSN: 15 bytes at most), else from past what it cannot be part
/// of (an address: past its `@`; a run of digit groups: past it, its every run of groups read
/// by `card`), so that no byte is searched more than a few times: the work is linear in the
/// text, whatever it holds (a run `a-a-…-a@icon.png` of 100 KB is one search, not one from
/// each `-`).
fn profile_search(i: usize, text: &[u8], searched: &mut usize) -> bool {
    let p = &PROFILES[i];
    let mut at = 0;
    while let Some(m) = p.pattern.find_at(text, at) {
        *searched += m.end() - at;
        let mut candidate = m.as_bytes();
        if p.number && after_decimal_point(text, m.start()) {
            // A fraction's digits are no number: the groups after them are read.
            candidate = &candidate[next_group(candidate)..];
        }
        if (p.verify)(candidate) {
            return true;
        }
        at = m.start() + (p.resume)(m.as_bytes()).max(1);
        if at > text.len() {
            return false;
        }
    }
    *searched += text.len() - at;
    false
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    id: String,
    block: bool,
    request: bool,
    response: bool,
    profiles: Vec<usize>,
}

/// The DLP policies of a loaded config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    policies: Vec<Policy>,
}

/// A policy that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Policy id.
    pub policy: String,
    /// Profiles that matched.
    pub profiles: Vec<&'static str>,
    /// `REQUEST` or `RESPONSE`.
    pub check: &'static str,
}

impl Settings {
    /// Settings from `spec.dlp`; unknown profile names are refused by name.
    pub fn from_policy(dlp: Option<&Dlp>) -> Result<Self, String> {
        let Some(dlp) = dlp else {
            return Ok(Self::default());
        };
        let mut policies = Vec::with_capacity(dlp.policies.len());
        for (i, p) in dlp.policies.iter().enumerate() {
            let mut profiles = Vec::with_capacity(p.profiles.len());
            for name in &p.profiles {
                let idx = PROFILES
                    .iter()
                    .position(|x| x.name == name)
                    .ok_or_else(|| {
                        format!(
                            "spec.dlp.policies[{i}].profiles: unknown profile {name:?} (known: {})",
                            profile_names().join(", ")
                        )
                    })?;
                profiles.push(idx);
            }
            policies.push(Policy {
                id: p.id.clone(),
                block: p.action == DlpAction::Block,
                request: p.check.contains(&DlpCheck::Request),
                response: p.check.contains(&DlpCheck::Response),
                profiles,
            });
        }
        Ok(Self { policies })
    }

    /// Whether any policy checks requests.
    pub fn checks_requests(&self) -> bool {
        self.policies.iter().any(|p| p.request)
    }

    /// Whether any policy checks responses (they are then held back and scanned).
    pub fn checks_responses(&self) -> bool {
        self.policies.iter().any(|p| p.response)
    }

    /// Scans a request body: `Err` when a `BLOCK` policy matched, else the flagged findings.
    pub fn check_request(&self, body: &[u8]) -> Result<Vec<Finding>, GatewayError> {
        logged(self.check(body, Scanned::Request { content_type: None }))
    }

    /// Scans a whole response body, as [`Settings::check_request`].
    pub fn check_response(&self, body: &[u8]) -> Result<Vec<Finding>, GatewayError> {
        logged(self.check(body, Scanned::Response))
    }

    /// [`Settings::check_request`] or [`Settings::check_response`] of a body that may be large:
    /// one over [`SCAN_INLINE`] is scanned on a blocking thread, so that the runtime's thread
    /// (one by default) goes on serving the other requests meanwhile. A request sent as a form
    /// (`multipart/form-data`) is scanned part by part, its binary files left out (see
    /// [`Scanned::Request`]).
    pub async fn scan(&self, body: &Bytes, scanned: Scanned) -> Result<Vec<Finding>, GatewayError> {
        let applies = |p: &Policy| scanned.applies(p);
        if body.len() <= SCAN_INLINE || !self.policies.iter().any(applies) {
            return logged(self.check(body, scanned));
        }
        let (settings, owned, moved) = (self.clone(), body.clone(), scanned.clone());
        logged(
            match tokio::task::spawn_blocking(move || settings.check(&owned, moved)).await {
                Ok(result) => result,
                // No blocking thread (the runtime is shutting down): scanned here.
                Err(_) => self.check(body, scanned),
            },
        )
    }

    fn check(&self, body: &[u8], scanned: Scanned) -> Result<Vec<Finding>, GatewayError> {
        if !self.policies.iter().any(|p| scanned.applies(p)) {
            return Ok(Vec::new());
        }
        let request = matches!(scanned, Scanned::Request { .. });
        let check = if request { "REQUEST" } else { "RESPONSE" };
        // The bytes read: a request's text (a form's text parts, else the whole body; see
        // [`crate::text::request_pieces`]), a whole response.
        let pieces: Vec<std::borrow::Cow<'_, [u8]>> = match &scanned {
            Scanned::Request { content_type } => {
                crate::text::request_pieces(content_type.as_ref().map(HeaderValue::as_bytes), body)?
            }
            Scanned::Response => vec![std::borrow::Cow::Borrowed(body)],
        };
        // Text inside JSON strings unescaped (bytes that are no UTF-8 are matched around: the
        // patterns are of ASCII and UTF-8), unless a response is binary (a download's, an audio
        // answer's, an event stream's framing: their text, if any, is decoded below;
        // [`crate::text::read_answer`]); a response may be a stream whose text is split across
        // events; a request is not, but it may send documents in base64.
        let mut texts = Vec::with_capacity(pieces.len() * 2);
        for piece in &pieces {
            let read = if request {
                Some(std::borrow::Cow::Borrowed(&piece[..]))
            } else {
                crate::text::read_answer(piece)
            };
            match read {
                Some(std::borrow::Cow::Borrowed(text)) => texts.push(unescape_json(text)),
                Some(std::borrow::Cow::Owned(text)) => {
                    texts.push(std::borrow::Cow::Owned(unescape_json(&text).into_owned()))
                }
                None => {}
            }
            let joined = if request {
                encoded_documents(piece)
            } else {
                crate::text::stream_text(piece)
            };
            texts.extend(joined.map(std::borrow::Cow::Owned));
        }
        let found = |i: usize| texts.iter().any(|t| profile_matches(i, t));
        let mut findings = Vec::new();
        for p in &self.policies {
            if !scanned.applies(p) {
                continue;
            }
            let profiles: Vec<&'static str> = p
                .profiles
                .iter()
                .filter(|&&i| found(i))
                .map(|&i| PROFILES[i].name)
                .collect();
            if profiles.is_empty() {
                continue;
            }
            if p.block {
                return Err(GatewayError::DlpBlocked {
                    response: !request,
                    policy: p.id.clone(),
                    profiles: profiles.join(", "),
                });
            }
            findings.push(Finding {
                policy: p.id.clone(),
                profiles,
                check,
            });
        }
        Ok(findings)
    }
}

/// What a body is, for [`Settings::scan`].
#[derive(Debug, Clone)]
pub enum Scanned {
    /// A request; `content_type`: its `Content-Type`, which says whether it is a form
    /// (`multipart/form-data`, read part by part) and whether it is text. Only its text is
    /// read ([`crate::text::request_pieces`]): an upload's audio, image or other binary file
    /// holds no text to find, and its random bytes would make false matches (an `x@y.io`
    /// among 3 MB of them); text with a byte that is no UTF-8 is still text.
    Request { content_type: Option<HeaderValue> },
    /// A whole response.
    Response,
}

impl Scanned {
    /// A request with these headers.
    pub fn request(headers: &HeaderMap) -> Self {
        Self::Request {
            // A clone shares the header's bytes: nothing is copied.
            content_type: headers.get(http::header::CONTENT_TYPE).cloned(),
        }
    }

    fn applies(&self, p: &Policy) -> bool {
        match self {
            Self::Request { .. } => p.request,
            Self::Response => p.response,
        }
    }
}

/// The decoded text of the documents a request body (or a form's part: a batch file) sends in
/// base64 with a text media type ([`crate::text::encoded_documents_in`]), if any.
fn encoded_documents(body: &[u8]) -> Option<Vec<u8>> {
    let docs = crate::text::encoded_documents_in(body);
    (!docs.is_empty()).then(|| docs.join("\n").into_bytes())
}

/// The text to scan: JSON string escapes (`\n`, `\u0040`, `\/`, a surrogate pair) undone, so
/// that a private key or an address inside a JSON string matches as it would in plain text.
pub(crate) fn unescape_json(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !body.contains(&b'\\') {
        return std::borrow::Cow::Borrowed(body);
    }
    // The code unit of a `\uXXXX` escape at `at`.
    let unit = |at: usize| {
        let hex = body.get(at..at + 6).filter(|e| e.starts_with(b"\\u"))?;
        u32::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    };
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\\' && i + 1 < body.len() {
            match body[i + 1] {
                b'n' | b'r' | b't' => out.push(b'\n'),
                b'u' if i + 6 <= body.len() => {
                    let (c, len) = match unit(i) {
                        // A character past the BMP, as a pair of escaped surrogates.
                        Some(high @ 0xd800..=0xdbff) => match unit(i + 6) {
                            Some(low @ 0xdc00..=0xdfff) => (
                                char::from_u32(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)),
                                12,
                            ),
                            _ => (None, 6),
                        },
                        u => (u.and_then(char::from_u32), 6),
                    };
                    match c {
                        Some(c) => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            i += len;
                            continue;
                        }
                        None => out.push(b'\\'),
                    }
                }
                other => out.push(other),
            }
            i += 2;
            continue;
        }
        out.push(body[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// `found`, once it has a flagged match said in a process line naming the request's log id (a
/// `BLOCK` match is said by the refusal's line), as a guardrail's flag is: the `cf-aig-dlp`
/// header tells the client, this line the operator.
fn logged(found: Result<Vec<Finding>, GatewayError>) -> Result<Vec<Finding>, GatewayError> {
    if let Ok(findings) = &found
        && let Some(first) = findings.first()
    {
        let policies: Vec<&str> = findings.iter().map(|f| f.policy.as_str()).collect();
        tracing::info!(
            check = first.check,
            policies = ?policies,
            log_id = crate::log_id::current().as_deref(),
            "dlp: flagged"
        );
    }
    found
}

/// Adds `cf-aig-dlp` listing `findings` (merged with what is there already).
pub fn flag(headers: &mut HeaderMap, findings: &[Finding]) {
    if findings.is_empty() {
        return;
    }
    let mut all: Vec<serde_json::Value> = headers
        .get(HEADER)
        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
        .unwrap_or_default();
    all.extend(findings.iter().map(
        |f| serde_json::json!({"policy": f.policy, "profiles": f.profiles, "check": f.check}),
    ));
    if let Ok(v) = HeaderValue::from_str(&serde_json::Value::Array(all).to_string()) {
        headers.insert(HEADER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidegate_crds::policy::DlpPolicy;

    fn settings(action: DlpAction, check: Vec<DlpCheck>, profiles: &[&str]) -> Settings {
        Settings::from_policy(Some(&Dlp {
            policies: vec![DlpPolicy {
                id: "p1".into(),
                action,
                check,
                profiles: profiles.iter().map(|s| s.to_string()).collect(),
            }],
        }))
        .expect("valid")
    }

    fn hits(text: &str) -> Vec<&'static str> {
        (0..PROFILES.len())
            .filter(|&i| profile_matches(i, &unescape_json(text.as_bytes())))
            .map(|i| PROFILES[i].name)
            .collect()
    }

    #[test]
    fn profiles_match_what_they_name_and_not_look_alikes() {
        assert_eq!(hits("card 4111 1111 1111 1111 please"), ["credit-card"]);
        assert_eq!(hits("card 4111-1111-1111-1111"), ["credit-card"]);
        assert!(hits("order 4111 1111 1111 1112").is_empty(), "Luhn fails");
        // Next to other numbers: one match takes them all; the card is found within.
        for text in [
            "card 4111 1111 1111 1111 123 (cvv)",
            "card 4111 1111 1111 1111 12/26",
            "qty 12 4111-1111-1111-1111",
            // After more digits than one match holds (found from a later group).
            "paid 2026-11-27 4111-1111-1111-1111",
            "ref 12 34 4111 1111 1111 1111",
        ] {
            assert_eq!(hits(text), ["credit-card"], "{text}");
        }
        assert_eq!(
            hits("ssn 123-45-6789 4111 1111 1111 1111"),
            ["credit-card", "us-ssn"]
        );
        assert!(hits("order 4111 1111 1111 1112 12/26").is_empty());
        assert!(hits("id 1234567890").is_empty());
        assert_eq!(hits("ssn 123-45-6789"), ["us-ssn"]);
        assert!(hits("ssn 000-45-6789 666-12-3456 900-12-3456").is_empty());
        assert_eq!(hits("write to jane.doe@example.co.uk"), ["email"]);
        assert!(hits("not an address: a@b").is_empty());
        assert_eq!(hits("key AKIAIOSFODNN7EXAMPLE"), ["aws-keys"]);
        assert_eq!(
            hits(r#"{"content":"-----BEGIN RSA PRIVATE KEY-----\nMIIE..."}"#),
            ["private-keys"]
        );
        assert_eq!(
            hits(r#"{"content":"mail jane\u0040example.com"}"#),
            ["email"]
        );
        assert!(hits("Summarize distributed systems in 3 points.").is_empty());
    }

    #[test]
    fn a_decimal_numbers_fraction_is_no_card_number_or_ssn() {
        // Luhn-valid digits, as a card number alone.
        assert_eq!(hits("2380082847904681"), ["credit-card"]);
        assert_eq!(hits("10211181640625"), ["credit-card"]);
        for text in [
            r#"{"finishReason": "STOP", "avgLogprobs": -0.2380082847904681}"#,
            r#"{"embedding": [0.0263671875, -0.10211181640625, 0.0107421875]}"#,
            "pi is about 3.2380082847904681",
            "x 3.123 45 6789 and 1.123-45-6789",
        ] {
            assert!(hits(text).is_empty(), "{text}: {:?}", hits(text));
        }
        for (text, profile) in [
            // After a sentence's full stop, a letter's dot, or a comma (JSON arrays, CSV).
            ("Card: 4111 1111 1111 1111. ", "credit-card"),
            ("total 3. 4111111111111111", "credit-card"),
            ("ref.4111111111111111", "credit-card"),
            ("[1,4111111111111111]", "credit-card"),
            ("id,card\n1,4111111111111111\n", "credit-card"),
            // A fraction next to a card: the card is found from its next group.
            ("paid 12.34 4111 1111 1111 1111", "credit-card"),
            ("on 27.11.2026 4111 1111 1111 1111", "credit-card"),
            ("ssn 123-45-6789.", "us-ssn"),
            ("1,123-45-6789", "us-ssn"),
        ] {
            assert_eq!(hits(text), [profile], "{text}");
        }
    }

    #[test]
    fn numbers_typeset_with_unicode_hyphens_and_spaces_are_found() {
        // Hyphen, non-breaking hyphen, figure dash, en dash; no-break, figure, thin and narrow
        // no-break spaces.
        for sep in [
            '\u{2010}', '\u{2011}', '\u{2012}', '\u{2013}', '\u{a0}', '\u{2007}', '\u{2009}',
            '\u{202f}',
        ] {
            let card = format!("card 4111{sep}1111{sep}1111{sep}1111 ok");
            assert_eq!(hits(&card), ["credit-card"], "{sep:?}");
            let ssn = format!("ssn 123{sep}45{sep}6789 ok");
            assert_eq!(hits(&ssn), ["us-ssn"], "{sep:?}");
            // Escaped in JSON.
            let escaped = format!(
                r#"{{"content":"ssn 123\u{:04x}45\u{:04x}6789"}}"#,
                sep as u32, sep as u32
            );
            assert_eq!(hits(&escaped), ["us-ssn"], "{escaped}");
            // Luhn and the SSN's rules still hold.
            assert!(hits(&format!("4111{sep}1111{sep}1111{sep}1112")).is_empty());
            assert!(hits(&format!("000{sep}45{sep}6789")).is_empty());
        }
        assert_eq!(hits("amex 3782\u{a0}822463\u{a0}10005"), ["credit-card"]);
        // Dashes and spaces are not mixed in an SSN; an em dash is no separator.
        assert!(hits("ssn 123\u{2011}45 6789").is_empty());
        assert!(hits("ssn 123\u{2014}45\u{2014}6789").is_empty());
        assert!(hits("card 4111\u{2014}1111\u{2014}1111\u{2014}1111").is_empty());
    }

    /// The bytes the searches of profile `i` cover in `text`.
    fn searched(i: usize, text: &[u8]) -> usize {
        let mut n = 0;
        profile_search(i, text, &mut n);
        n
    }

    #[test]
    fn every_profile_searches_a_text_in_work_linear_in_its_size() {
        // Texts of 20–40 KB of matches each profile refuses, one after another or inside each
        // other. Linear, their searches cover each a few times its size (milliseconds); a
        // search begun again from inside each match (the `a-` runs: from each `-`) would cover
        // the text once per match, 10^8 bytes and more (seconds in a debug build; 10 times the
        // size, 100 times the work).
        let texts: Vec<String> = vec![
            "a-".repeat(10_000) + "a@icon.png",
            "a.".repeat(10_000) + "a@icon.png",
            "a+".repeat(10_000) + "a@b-" + &"b-".repeat(10_000) + "b.png",
            "x@y.png@".repeat(4_000),
            "x@".repeat(10_000) + "y.png",
            "a-a@b.png ".repeat(3_000),
            "1 ".repeat(10_000),
            "1-".repeat(10_000),
            "111 ".repeat(5_000),
            "4111 1111 1111 1112 ".repeat(1_000),
            "1\u{2011}".repeat(5_000),
            "0.2380082847904681,".repeat(1_000),
            "000-00-0000 ".repeat(2_000),
            "123-45-".repeat(3_000),
            "9".repeat(20_000),
            "AKIA".repeat(5_000),
            "-----BEGIN A ".repeat(2_000),
            "aws_secret_key= ".repeat(2_000),
        ];
        for text in &texts {
            for i in 0..PROFILES.len() {
                let work = searched(i, text.as_bytes());
                assert!(
                    work <= 4 * text.len(),
                    "{}: {work} bytes searched in a text of {} ({}…)",
                    PROFILES[i].name,
                    text.len(),
                    &text[..24]
                );
            }
        }
        // And a text of a megabyte takes no longer than its size says (a linear search: well
        // under a second; a quadratic one: hours).
        let big = "a-".repeat(500_000) + "a@icon.png " + &"1 ".repeat(500_000);
        assert!(hits(&big).is_empty());
    }

    #[test]
    fn formats_in_the_wild_are_found_and_look_alikes_are_not() {
        for (text, profile) in [
            ("amex 3782 822463 10005", "credit-card"),
            ("card 4111111111111111", "credit-card"),
            ("ssn 123 45 6789", "us-ssn"),
            ("BACKUP_AKIAIOSFODNN7EXAMPLE", "aws-keys"),
            (
                "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws-keys",
            ),
            (
                r#"{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#,
                "aws-keys",
            ),
            (
                "aws secret key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws-keys",
            ),
            ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQ", "private-keys"),
            (
                "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nP2",
                "private-keys",
            ),
            (
                "PuTTY-User-Key-File-3: ssh-rsa\nEncryption: none",
                "private-keys",
            ),
            ("see jane@example.png.example.com", "email"),
        ] {
            assert_eq!(hits(text), [profile], "{text}");
        }
        for text in [
            // Luhn-valid, but no card: zeros, a nil UUID, a list of small numbers.
            "zeros 0000 0000 0000 0000",
            "trace 00000000-0000-0000-0000-000000000000",
            "counting 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
            "pairs 41 11 11 11 11 11 11 11",
            "ssn 123456789",
            "ssn 123-45 6789",
            "use icon@2x.png or logo@3X.JPEG for retina",
            "user id AIDAIOSFODNN7EXAMPLE",
            "xAKIAIOSFODNN7EXAMPLE",
            "sha1 wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY alone",
            "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYX",
            "-----BEGIN PUBLIC KEY-----",
            "---- BEGIN SSH2 PUBLIC KEY ----",
        ] {
            assert!(hits(text).is_empty(), "{text}: {:?}", hits(text));
        }
    }

    #[test]
    fn a_form_is_read_part_by_part_and_its_binary_files_are_not() {
        let block = settings(
            DlpAction::Block,
            vec![DlpCheck::Request],
            &["email", "us-ssn"],
        );
        let form = |fields: &[(&str, &[u8])]| {
            let mut body = Vec::new();
            for (name, data) in fields {
                body.extend_from_slice(
                    format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(data);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"--XyZ--\r\n");
            body
        };
        let scanned = || Scanned::Request {
            content_type: Some(HeaderValue::from_static(
                "multipart/form-data; boundary=XyZ",
            )),
        };
        // Random bytes of a binary file (audio, an image) that happen to read as an address.
        let binary = form(&[("file", b"\xff\xd8\x00\x91 joe@example.com \xc3\x28")]);
        assert!(block.check(&binary, scanned()).is_ok());
        // Nor as a whole body: binary.
        assert!(block.check_request(&binary).is_ok());
        assert!(block.check_request(b"\x00joe@example.com").is_ok());
        // Text parts are read: a JSONL file, a text field next to a binary file.
        let jsonl = form(&[("file", br#"{"body": {"input": "ssn 123-45-6789"}}"#)]);
        assert!(block.check(&jsonl, scanned()).is_err());
        let mixed = form(&[
            ("image", b"\x89PNG\x00\x00"),
            ("prompt", b"mail joe@example.com"),
        ]);
        assert!(block.check(&mixed, scanned()).is_err());
        // A body that is no form after all is read whole.
        assert!(block.check(b"joe@example.com", scanned()).is_err());
        // A binary answer (audio, a download) neither.
        let answers = settings(DlpAction::Block, vec![DlpCheck::Response], &["email"]);
        assert!(
            answers
                .check_response(b"ID3\x04\x00 joe@example.com \xff\xfb")
                .is_ok()
        );
        assert!(answers.check_response(b"joe@example.com").is_err());
    }

    #[test]
    fn text_with_a_byte_that_is_no_utf8_is_still_read() {
        let block = settings(
            DlpAction::Block,
            vec![DlpCheck::Request],
            &["email", "credit-card"],
        );
        let typed = |t: &'static str| Scanned::Request {
            content_type: Some(HeaderValue::from_static(t)),
        };
        // A JSON body with one invalid byte in a string, declared or not, and its documents in
        // base64.
        let json =
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"mail joe@example.com \xff\"}]}";
        assert!(block.check(json, typed("application/json")).is_err());
        assert!(block.check_request(json).is_err());
        let card = b"{\"content\":\"\xc3\x28 4111 1111 1111 1111\"}";
        assert!(block.check(card, typed("application/json")).is_err());
        let mut doc = br#"{"content":[{"type":"document","source":{"type":"base64","media_type":"text/plain","data":"am9lQGV4YW1wbGUuY29t"}}],"x":""#.to_vec();
        doc.extend_from_slice(b"\xff\"}");
        assert!(block.check(&doc, typed("application/json")).is_err());
        // A declared JSON body is read even with a NUL byte; an undeclared one with a NUL in
        // its document is binary (no JSON reader takes it), one with a NUL after its document
        // is read (Go's `json.Decoder` reads the document).
        let nul = b"{\"content\":\"joe@example.com\x00\"}";
        assert!(block.check(nul, typed("application/json")).is_err());
        assert!(block.check(nul, typed("application/octet-stream")).is_ok());
        let after = b"\xef\xbb\xbf{\"content\":\"joe@example.com\"}\x00";
        assert!(
            block
                .check(after, typed("application/octet-stream"))
                .is_err()
        );
        // A Latin-1 text (no UTF-8, no NUL) is text.
        assert!(block.check_request(b"caf\xe9;joe@example.com").is_err());
    }

    #[test]
    fn a_form_part_is_read_when_it_is_a_field_declared_or_named_text_or_holds_no_nul() {
        let block = settings(DlpAction::Block, vec![DlpCheck::Request], &["email"]);
        let scanned = || Scanned::Request {
            content_type: Some(HeaderValue::from_static("multipart/form-data; boundary=b0")),
        };
        let part = |disposition: &str, content_type: Option<&str>, data: &[u8]| {
            let mut body = format!("--b0\r\nContent-Disposition: form-data; {disposition}\r\n");
            if let Some(t) = content_type {
                body.push_str(&format!("Content-Type: {t}\r\n"));
            }
            let mut body = body.into_bytes();
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n--b0--\r\n");
            body
        };
        let text = b"{\"body\":{\"input\":\"joe@example.com\"}}\xff\n";
        let with_nul = b"joe@example.com \x00\xff";
        for (disposition, content_type, data) in [
            // One invalid byte in a text file, whatever it declares.
            ("name=\"file\"; filename=\"in.jsonl\"", None, &text[..]),
            (
                "name=\"file\"; filename=\"x\"",
                Some("application/octet-stream"),
                text,
            ),
            ("name=\"file\"; filename=\"x.bin\"", Some("image/png"), text),
            // A field's value is text, whatever it declares.
            ("name=\"prompt\"", None, with_nul),
            (
                "name=\"prompt\"",
                Some("application/octet-stream"),
                with_nul,
            ),
            // A file declared or named text, with a NUL byte too.
            (
                "name=\"file\"; filename=\"x\"",
                Some("text/plain; charset=latin1"),
                with_nul,
            ),
            (
                "name=\"file\"; filename=\"x\"",
                Some("application/x-ndjson"),
                with_nul,
            ),
            (
                "name=\"file\"; filename=\"notes.TXT\"",
                Some("application/octet-stream"),
                with_nul,
            ),
            ("name=\"file\"; filename*=UTF-8''in.jsonl", None, with_nul),
        ] {
            let body = part(disposition, content_type, data);
            assert!(
                block.check(&body, scanned()).is_err(),
                "{disposition} {content_type:?}"
            );
        }
        // A file declared binary, named as one, holding a NUL byte: not read.
        for (disposition, content_type) in [
            ("name=\"file\"; filename=\"a.wav\"", Some("audio/wav")),
            (
                "name=\"file\"; filename=\"blob.bin\"",
                Some("application/octet-stream"),
            ),
            ("name=\"file\"; filename=\"upload\"", None),
        ] {
            let body = part(disposition, content_type, with_nul);
            assert!(
                block.check(&body, scanned()).is_ok(),
                "{disposition} {content_type:?}"
            );
        }
    }

    #[test]
    fn block_refuses_and_flag_reports() {
        let block = settings(
            DlpAction::Block,
            vec![DlpCheck::Request],
            &["us-ssn", "email"],
        );
        let err = block
            .check_request(b"my ssn is 123-45-6789")
            .expect_err("blocked");
        assert_eq!((err.status().as_u16(), err.code()), (400, 2029));
        assert!(err.to_string().contains("p1") && err.to_string().contains("us-ssn"));
        // Responses are not checked by a request policy.
        assert_eq!(block.check_response(b"123-45-6789"), Ok(vec![]));
        let flag_resp = settings(DlpAction::Flag, vec![DlpCheck::Response], &["email"]);
        assert!(flag_resp.checks_responses() && !flag_resp.checks_requests());
        let found = flag_resp
            .check_response(b"ask bob@example.com")
            .expect("flag");
        assert_eq!(
            found,
            [Finding {
                policy: "p1".into(),
                profiles: vec!["email"],
                check: "RESPONSE"
            }]
        );
        let mut h = HeaderMap::new();
        flag(&mut h, &found);
        flag(&mut h, &found);
        let v: serde_json::Value = serde_json::from_slice(h[HEADER].as_bytes()).expect("json");
        assert_eq!(v.as_array().map(Vec::len), Some(2));
        assert_eq!(v[0]["profiles"][0], "email");
        let block_resp = settings(DlpAction::Block, vec![DlpCheck::Response], &["aws-keys"]);
        let err = block_resp
            .check_response(b"AKIAIOSFODNN7EXAMPLE")
            .expect_err("blocked");
        assert_eq!(err.code(), 2030);
    }

    #[test]
    fn requests_are_checked_in_their_text_documents_in_base64() {
        use base64::Engine as _;
        let doc = base64::engine::general_purpose::STANDARD.encode("key AKIAIOSFODNN7EXAMPLE");
        let body =
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "document",
            "source": {"type": "base64", "media_type": "text/plain", "data": doc}}]}]})
            .to_string();
        let block = settings(DlpAction::Block, vec![DlpCheck::Request], &["aws-keys"]);
        let err = block.check_request(body.as_bytes()).expect_err("blocked");
        assert_eq!(err.code(), 2029);
        // As an image it is not text: not read.
        let image = body.replace("text/plain", "image/png");
        assert_eq!(block.check_request(image.as_bytes()), Ok(vec![]));
    }

    #[test]
    fn text_split_across_stream_events_is_joined() {
        let sse = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"card 4111 11\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"11 1111 1111\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let block = settings(DlpAction::Block, vec![DlpCheck::Response], &["credit-card"]);
        assert_eq!(
            block.check_response(sse.as_bytes()).map_err(|e| e.code()),
            Err(2030)
        );
        let anthropic = concat!(
            "event: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"123-45\"}}\n\n",
            "event: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"-6789\"}}\n\n",
        );
        let ssn = settings(DlpAction::Block, vec![DlpCheck::Response], &["us-ssn"]);
        assert!(ssn.check_response(anthropic.as_bytes()).is_err());
        // A stream that starts with a blank line is a stream too.
        assert!(block.check_response(format!("\n{sse}").as_bytes()).is_err());
    }

    #[test]
    fn bedrock_and_gemini_json_streams_are_read_through_their_framing() {
        use crate::text::tests::{converse_stream, gemini_array, invoke_stream};
        let block = settings(DlpAction::Block, vec![DlpCheck::Response], &["credit-card"]);
        let flag = settings(DlpAction::Flag, vec![DlpCheck::Response], &["us-ssn"]);
        for (name, stream) in [
            ("converse-stream", converse_stream as fn(&[&str]) -> Vec<u8>),
            ("invoke-with-response-stream", invoke_stream),
            ("gemini array", gemini_array),
        ] {
            // A card number one group per event, as the mock streams words.
            let card = stream(&["card ", "4111 ", "1111 ", "1111 ", "1111"]);
            assert_eq!(
                block.check_response(&card).map_err(|e| e.code()),
                Err(2030),
                "{name}"
            );
            let ssn = stream(&["ssn 123-4", "5-6789"]);
            assert_eq!(flag.check_response(&ssn).map(|f| f.len()), Ok(1), "{name}");
            let clean = stream(&["card ", "4111 ", "1111 ", "1111 ", "1112"]);
            assert_eq!(block.check_response(&clean), Ok(vec![]), "{name}");
        }
        // In base64, even a number in one piece is seen only once decoded.
        let whole = invoke_stream(&["ssn 123-45-6789"]);
        assert_eq!(flag.check_response(&whole).map(|f| f.len()), Ok(1));
    }

    #[test]
    fn the_profiles_are_those_the_api_documents() {
        assert_eq!(profile_names(), sidegate_crds::policy::DLP_PROFILES);
    }

    #[test]
    fn unknown_profiles_are_refused_by_name() {
        let err = Settings::from_policy(Some(&Dlp {
            policies: vec![DlpPolicy {
                id: "p".into(),
                action: DlpAction::Flag,
                check: vec![DlpCheck::Request],
                profiles: vec!["passport".into()],
            }],
        }))
        .expect_err("unknown");
        assert!(err.contains("spec.dlp.policies[0].profiles") && err.contains("passport"));
    }
}
