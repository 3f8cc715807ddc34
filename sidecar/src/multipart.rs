//! `multipart/form-data` request bodies (RFC 7578), as the SDKs send uploads (audio
//! transcriptions, image edits, files): read whole, never rewritten. The cache keys them by
//! their parts, without the boundary each request draws at random, accounting reads the
//! `model` field, and the request checks (DLP, prompt guardrails) read their text part by part.
//!
//! The checks read a form as the servers behind the providers' APIs split it, which are more
//! lenient than RFC 2046 and RFC 7578 ask (checked against Go's `mime/multipart` and Starlette
//! with python-multipart): a boundary of any length, quoted with `;` or `\"` inside, or given
//! in RFC 2231's `boundary*` form; parts whose lines end in LF alone (Go decides by the form's
//! first delimiter line, Werkzeug takes any line break at each delimiter); a form without its
//! closing delimiter (its last part runs to the end of the body); a delimiter-like line that is
//! not one (`--boundaryX`) is data. See [`read`].

use std::borrow::Cow;

use http::HeaderMap;
use memchr::memmem;

/// One part of a form: its header block (as sent, without the blank line ending it) and data.
#[derive(Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The part's header lines (`Content-Disposition: form-data; name="model"`, ...).
    pub headers: &'a [u8],
    /// The part's content.
    pub data: &'a [u8],
}

impl<'a> Part<'a> {
    /// The field name its (first) `Content-Disposition` gives.
    pub fn name(&self) -> Option<Cow<'a, [u8]>> {
        let disposition = self.headers_named(b"content-disposition").next()?;
        parameter(disposition, b"name")
    }

    /// Whether every server reads this part as a file (not a field's value): each of its
    /// `Content-Disposition` headers has a non-empty `filename` (Starlette's test: a
    /// `filename` parameter, so `filename*` alone is a field), and none resolves to an empty
    /// name (Go's: `filename*` decoded over `filename`, and an empty name is a field).
    pub fn is_file(&self) -> bool {
        let mut dispositions = self.headers_named(b"content-disposition").peekable();
        dispositions.peek().is_some()
            && dispositions.all(|d| {
                let params = parameters(d);
                let plain = values(&params, b"filename");
                !plain.is_empty()
                    && plain.iter().all(|v| !v.is_empty())
                    && extended(&params, b"filename").is_none_or(|v| !v.is_empty())
            })
    }

    /// Every name its `Content-Disposition` headers give the file, as any server may read it:
    /// `filename` (quoted strings unescaped) and `filename*` (RFC 2231/5987, percent-decoded;
    /// Go's choice when both are given).
    pub fn file_names(&self) -> Vec<Cow<'a, [u8]>> {
        self.disposition_values(b"filename")
    }

    /// Every field name its `Content-Disposition` headers give, as any server may read it
    /// (`name`, and `name*`: Go's choice when both are given).
    pub fn field_names(&self) -> Vec<Cow<'a, [u8]>> {
        self.disposition_values(b"name")
    }

    fn disposition_values(&self, key: &[u8]) -> Vec<Cow<'a, [u8]>> {
        let mut all = Vec::new();
        for d in self.headers_named(b"content-disposition") {
            let params = parameters(d);
            all.extend(values(&params, key));
            all.extend(extended(&params, key).map(Cow::Owned));
        }
        all
    }

    /// The media type its `Content-Type` declares, as sent (`None` when it declares none).
    pub fn content_type(&self) -> Option<&'a [u8]> {
        self.headers_named(b"content-type")
            .next()
            .map(<[u8]>::trim_ascii)
    }

    /// Every media type its `Content-Type` headers declare.
    pub fn content_types(&self) -> impl Iterator<Item = &'a [u8]> {
        self.headers_named(b"content-type").map(<[u8]>::trim_ascii)
    }

    /// The `Content-Transfer-Encoding` its (first) header gives, when it is one
    /// [`Part::transfer_decoded`] decodes.
    pub fn transfer_coding(&self) -> Option<TransferCoding> {
        let coding = self.headers_named(b"content-transfer-encoding").next()?;
        let coding = coding.trim_ascii();
        if coding.eq_ignore_ascii_case(b"quoted-printable") {
            Some(TransferCoding::QuotedPrintable)
        } else if coding.eq_ignore_ascii_case(b"base64") {
            Some(TransferCoding::Base64)
        } else {
            None
        }
    }

    /// Its data decoded as its `Content-Transfer-Encoding` says, when that is
    /// `quoted-printable` (Go's reader decodes it) or `base64` (python-multipart's form parser
    /// does); `None` for any other (the data is as sent).
    pub fn transfer_decoded(&self) -> Option<Vec<u8>> {
        match self.transfer_coding()? {
            TransferCoding::QuotedPrintable => Some(quoted_printable(self.data)),
            TransferCoding::Base64 => crate::text::decode_base64(self.data),
        }
    }

    /// The values of its header lines `name` (any case), after their colon.
    fn headers_named(&self, name: &'static [u8]) -> impl Iterator<Item = &'a [u8]> {
        let headers: &'a [u8] = self.headers;
        headers.split(|&b| b == b'\n').filter_map(move |line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (key, value) = line.split_at(colon);
            key.trim_ascii()
                .eq_ignore_ascii_case(name)
                .then_some(&value[1..])
        })
    }
}

/// A part's `Content-Transfer-Encoding` that servers decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferCoding {
    QuotedPrintable,
    Base64,
}

/// Quoted-printable data decoded (RFC 2045 §6.7, as Go's `mime/quotedprintable` reads it):
/// `=XX` is the byte `XX` (either case), `=` at a line's end (after blanks) joins the lines;
/// an `=` followed by neither is kept as it is.
fn quoted_printable(data: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'=' {
            if let (Some(&h), Some(&l)) = (data.get(i + 1), data.get(i + 2))
                && let (Some(h), Some(l)) = (hex(h), hex(l))
            {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
            let blanks = data[i + 1..]
                .iter()
                .take_while(|b| matches!(b, b' ' | b'\t'))
                .count();
            let after = &data[i + 1 + blanks..];
            let soft = if after.starts_with(b"\r\n") {
                Some(2)
            } else if after.starts_with(b"\n") {
                Some(1)
            } else if after.is_empty() {
                Some(0)
            } else {
                None
            };
            if let Some(nl) = soft {
                i += 1 + blanks + nl;
                continue;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// The boundary of a `multipart/form-data` request (`None` for any other body).
pub fn boundary(headers: &HeaderMap) -> Option<Cow<'_, [u8]>> {
    boundary_of(headers.get(http::header::CONTENT_TYPE)?.as_bytes())
}

/// Whether a `Content-Type` value is `multipart/form-data` (any case).
pub fn is_form(value: &[u8]) -> bool {
    let media = value.split(|&b| b == b';').next().unwrap_or_default();
    media
        .trim_ascii()
        .eq_ignore_ascii_case(b"multipart/form-data")
}

/// The boundary a `Content-Type` value gives, when it is `multipart/form-data`: its last
/// `boundary` parameter (Starlette's; Go refuses a form with two), of any length (neither
/// enforces RFC 2046's 70 characters).
pub fn boundary_of(value: &[u8]) -> Option<Cow<'_, [u8]>> {
    boundaries_of(value).pop()
}

/// The distinct boundaries a `multipart/form-data` `Content-Type` value gives, in order: its
/// first `boundary` parameter (a reader that keeps the first: Go refuses a form with two), its
/// last (Starlette's, python-multipart's and Werkzeug's: they keep parameters in a map), and
/// RFC 2231's `boundary*` (Go's reading when given); empty for another type or none given.
/// At most these three, however many a header repeats: each boundary splits the whole body.
pub fn boundaries_of(value: &[u8]) -> Vec<Cow<'_, [u8]>> {
    if !is_form(value) {
        return Vec::new();
    }
    let params = parameters(value);
    let mut plain = values(&params, b"boundary").into_iter();
    let first = plain.next();
    let last = plain.next_back();
    let mut distinct: Vec<Cow<'_, [u8]>> = Vec::new();
    let given = [first, last, extended(&params, b"boundary").map(Cow::Owned)];
    for b in given.into_iter().flatten() {
        if !b.is_empty() && !distinct.contains(&b) {
            distinct.push(b);
        }
    }
    distinct
}

/// The distinct charsets a `Content-Type` value's `charset` parameters name: its first and its last
/// (Starlette decodes a form's fields by the one it keeps, the last), as sent, and RFC 2231's
/// `charset*` (`utf-8''utf-16-le`, or continued over `charset*0`, `charset*1`, ...; decoded):
/// python-multipart reads parameters through `email.message`, which decodes these forms and
/// lets them win over a plain `charset`.
pub fn charsets_of(value: &[u8]) -> Vec<Cow<'_, [u8]>> {
    let params = parameters(value);
    let mut all = values(&params, b"charset").into_iter();
    let first = all.next();
    let last = all.next_back();
    let extended = extended(&params, b"charset").map(Cow::Owned);
    let mut distinct: Vec<Cow<'_, [u8]>> = Vec::new();
    for c in [first, last, extended].into_iter().flatten() {
        if !distinct.contains(&c) {
            distinct.push(c);
        }
    }
    distinct
}

/// The parameters of a header value `type; key=value; key="quoted \" ; value"` (RFC 9110's
/// quoted strings, backslash escapes undone), keys as sent, in order; a parameter without `=`
/// is left out.
fn parameters(value: &[u8]) -> Vec<(&[u8], Cow<'_, [u8]>)> {
    let mut params = Vec::new();
    let Some(mut i) = value.iter().position(|&b| b == b';') else {
        return params;
    };
    while i < value.len() {
        // Between parameters: blanks and separators.
        while i < value.len() && (value[i] == b';' || value[i].is_ascii_whitespace()) {
            i += 1;
        }
        let start = i;
        while i < value.len() && !matches!(value[i], b'=' | b';') {
            i += 1;
        }
        let key = value[start..i].trim_ascii();
        if value.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while i < value.len() && matches!(value[i], b' ' | b'\t') {
            i += 1;
        }
        let v = if value.get(i) == Some(&b'"') {
            i += 1;
            let start = i;
            let mut unescaped: Option<Vec<u8>> = None;
            while i < value.len() && value[i] != b'"' {
                if value[i] == b'\\' && i + 1 < value.len() {
                    let u = unescaped.get_or_insert_with(|| value[start..i].to_vec());
                    u.push(value[i + 1]);
                    i += 2;
                    continue;
                }
                if let Some(u) = unescaped.as_mut() {
                    u.push(value[i]);
                }
                i += 1;
            }
            let v = match unescaped {
                Some(u) => Cow::Owned(u),
                None => Cow::Borrowed(&value[start..i]),
            };
            // Past the closing quote, up to the next parameter.
            while i < value.len() && value[i] != b';' {
                i += 1;
            }
            v
        } else {
            let start = i;
            while i < value.len() && value[i] != b';' {
                i += 1;
            }
            Cow::Borrowed(value[start..i].trim_ascii())
        };
        params.push((key, v));
    }
    params
}

/// The values of every parameter `key` (any case).
fn values<'v>(params: &[(&[u8], Cow<'v, [u8]>)], key: &[u8]) -> Vec<Cow<'v, [u8]>> {
    params
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The value of parameter `key` in RFC 2231's extended forms: `key*=charset'lang'%XX...`,
/// percent-decoded, or continued over `key*0`, `key*1*`, ... (joined in order).
fn extended(params: &[(&[u8], Cow<'_, [u8]>)], key: &[u8]) -> Option<Vec<u8>> {
    let starred = |k: &[u8]| {
        k.len() > key.len() && k[..key.len()].eq_ignore_ascii_case(key) && k[key.len()] == b'*'
    };
    let decode = |v: &[u8], first: bool| -> Vec<u8> {
        // The first encoded section opens with `charset'language'`.
        let v = if first {
            v.splitn(3, |&b| b == b'\'').nth(2).unwrap_or(v)
        } else {
            v
        };
        crate::cost::percent_decode_bytes(v)
    };
    if let Some((_, v)) = params
        .iter()
        .find(|(k, _)| starred(k) && k.len() == key.len() + 1)
    {
        return Some(decode(v, true));
    }
    let mut sections: Vec<(u32, bool, &[u8])> = params
        .iter()
        .filter(|(k, _)| starred(k))
        .filter_map(|(k, v)| {
            let rest = &k[key.len() + 1..];
            let (digits, encoded) = match rest.strip_suffix(b"*") {
                Some(d) => (d, true),
                None => (rest, false),
            };
            let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
            Some((n, encoded, v.as_ref()))
        })
        .collect();
    if sections.is_empty() {
        return None;
    }
    sections.sort_by_key(|s| s.0);
    let mut joined = Vec::new();
    for (n, encoded, v) in sections {
        if encoded {
            joined.extend(decode(v, n == 0));
        } else {
            joined.extend_from_slice(v);
        }
    }
    Some(joined)
}

/// The value of parameter `key` (any case) of a header value: the first given.
fn parameter<'v>(value: &'v [u8], key: &[u8]) -> Option<Cow<'v, [u8]>> {
    values(&parameters(value), key).into_iter().next()
}

/// How the delimiters between a form's parts are told from its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEnds {
    /// As Go's reader: by the end of the form's first delimiter line, CRLF (then only
    /// `\r\n--boundary` delimits) or LF (`\n--boundary`; a CR before it is left out of the
    /// data).
    First,
    /// As Werkzeug's: any line break before each delimiter, `\r\n`, `\n` or `\r`.
    Any,
}

/// A form as split by [`read`].
#[derive(Debug, PartialEq, Eq)]
pub struct Form<'a> {
    pub parts: Vec<Part<'a>>,
    /// Whether its closing delimiter (`--boundary--`) ends it; if not, its last part runs to
    /// the end of the body (python-multipart hands such a form's fields over).
    pub closed: bool,
    /// Whether it has more than [`MAX_PARTS`] parts (only the first of them are in `parts`).
    pub overfull: bool,
}

/// The most parts [`read`] splits a form into: servers take far fewer (Go's `ReadForm`
/// refuses a form of more than 1,000 since Go 1.20), and each part read costs memory.
pub const MAX_PARTS: usize = 10_000;

/// Splits `body`, a form with this `boundary`, its delimiters told as `ends` says; `None` when
/// no delimiter line of it opens a part (it is no such form).
///
/// A delimiter line is `--boundary` at a line's start, then blanks and a line break, or `--`
/// (the closing one); anything else after it (`--boundaryX`) makes it data, as servers read it.
/// A part's header block ends at its first empty line (CRLF or LF); a part with none is read
/// as data without headers (a field to the checks: read whole).
pub fn read<'a>(body: &'a [u8], boundary: &[u8], ends: LineEnds) -> Option<Form<'a>> {
    let mut dash = Vec::with_capacity(boundary.len() + 2);
    dash.extend_from_slice(b"--");
    dash.extend_from_slice(boundary);
    let finder = memmem::Finder::new(&dash);
    // After a delimiter at `at`: whether it closes the form, where the next line starts, and
    // whether its line ends in LF alone; `None` when it is no delimiter line.
    let tail = |at: usize| -> Option<(bool, usize, bool)> {
        let after = at + dash.len();
        let rest = &body[after..];
        if rest.starts_with(b"--") || rest.is_empty() {
            return Some((true, body.len(), false));
        }
        let blanks = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        match rest[blanks..] {
            [b'\n', ..] => Some((false, after + blanks + 1, true)),
            [b'\r', b'\n', ..] => Some((false, after + blanks + 2, false)),
            _ => None,
        }
    };
    // The opening delimiter: at a line's start (after a preamble, if any).
    let mut from = 0;
    let (mut closed, mut start, lf) = loop {
        let at = from + finder.find(&body[from..])?;
        let line_start =
            at == 0 || body[at - 1] == b'\n' || (ends == LineEnds::Any && body[at - 1] == b'\r');
        if line_start && let Some(t) = tail(at) {
            break t;
        }
        from = at + 1;
    };
    // The line break before each further delimiter, and what of it the data leaves out.
    let before = |at: usize, start: usize| -> Option<usize> {
        let prev = |n: usize| at.checked_sub(n).filter(|&p| p >= start).map(|p| body[p]);
        if at == start {
            // A part's very start may be a delimiter (an empty part), as Go reads it.
            return Some(0);
        }
        match ends {
            LineEnds::First if lf => {
                (prev(1) == Some(b'\n')).then(|| if prev(2) == Some(b'\r') { 2 } else { 1 })
            }
            LineEnds::First => (prev(1) == Some(b'\n') && prev(2) == Some(b'\r')).then_some(2),
            LineEnds::Any => match (prev(2), prev(1)) {
                (Some(b'\r'), Some(b'\n')) => Some(2),
                (_, Some(b'\n' | b'\r')) => Some(1),
                _ => None,
            },
        }
    };
    let mut parts = Vec::new();
    while !closed {
        let mut from = start;
        let next = loop {
            let Some(found) = finder.find(&body[from..]) else {
                break None;
            };
            let at = from + found;
            if let Some(nl) = before(at, start)
                && let Some(t) = tail(at)
            {
                break Some((at - nl, t));
            }
            from = at + 1;
        };
        match next {
            Some((end, (closes, next_line, _))) => {
                if parts.len() == MAX_PARTS {
                    return Some(Form {
                        parts,
                        closed: false,
                        overfull: true,
                    });
                }
                parts.push(split_part(&body[start..end]));
                closed = closes;
                start = next_line;
            }
            None => {
                // No closing delimiter: the last part runs to the end, less its line break.
                let mut end = body.len();
                for nl in [b'\n', b'\r'] {
                    if end > start && body[end - 1] == nl {
                        end -= 1;
                    }
                }
                if end > start {
                    parts.push(split_part(&body[start..end]));
                }
                let overfull = parts.len() > MAX_PARTS;
                parts.truncate(MAX_PARTS);
                return Some(Form {
                    parts,
                    closed: false,
                    overfull,
                });
            }
        }
    }
    Some(Form {
        parts,
        closed,
        overfull: false,
    })
}

/// A part: its header block, up to its first empty line, and its data.
fn split_part(part: &[u8]) -> Part<'_> {
    for start in [&b"\r\n"[..], b"\n"] {
        if let Some(data) = part.strip_prefix(start) {
            return Part {
                headers: &part[..0],
                data,
            };
        }
    }
    for nl in memchr::memchr_iter(b'\n', part) {
        let blank = match part.get(nl + 1..nl + 3) {
            Some([b'\n', _]) => Some(2),
            Some([b'\r', b'\n']) => Some(3),
            _ if part.get(nl + 1) == Some(&b'\n') => Some(2),
            _ => None,
        };
        if let Some(len) = blank {
            return Part {
                headers: &part[..nl],
                data: &part[nl + len..],
            };
        }
    }
    Part {
        headers: &part[..0],
        data: part,
    }
}

/// The parts of `body`, a whole form (up to its closing delimiter) with this `boundary`, as
/// Go splits it; `None` when it is not one (or has more than [`MAX_PARTS`] parts).
pub fn parts<'a>(body: &'a [u8], boundary: &[u8]) -> Option<Vec<Part<'a>>> {
    read(body, boundary, LineEnds::First)
        .filter(|f| f.closed)
        .map(|f| f.parts)
}

/// The value of the form field `name` (the first such part), for a form request.
pub fn field<'a>(headers: &HeaderMap, body: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let form = read(body, &boundary(headers)?, LineEnds::First)?;
    form.parts
        .into_iter()
        .find(|p| p.name().as_deref() == Some(name))
        .map(|p| p.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str) -> (HeaderMap, Vec<u8>) {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}")
                .parse()
                .expect("header"),
        );
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\nRIFF\r\n--x\0\x01\r\n--{boundary}--\r\n"
        );
        (h, body.into_bytes())
    }

    #[test]
    fn a_form_reads_as_its_parts_whatever_its_boundary() {
        let (h1, b1) = form("a1b2c3");
        let (h2, b2) = form("other-boundary");
        let p1 = parts(&b1, &boundary(&h1).expect("boundary")).expect("form");
        let p2 = parts(&b2, &boundary(&h2).expect("boundary")).expect("form");
        assert_eq!(p1, p2);
        assert_eq!(p1.len(), 2);
        assert_eq!(p1[0].name().as_deref(), Some(&b"model"[..]));
        assert_eq!(p1[1].name().as_deref(), Some(&b"file"[..]));
        // A field has no file name; a file its name and declared type.
        assert!(!p1[0].is_file() && p1[0].file_names().is_empty());
        assert_eq!(p1[0].content_type(), None);
        assert!(p1[1].is_file());
        assert_eq!(p1[1].file_names(), [&b"a.wav"[..]]);
        assert_eq!(p1[1].content_type(), Some(&b"audio/wav"[..]));
        // The data keeps a line that merely starts like a delimiter.
        assert_eq!(p1[1].data, b"RIFF\r\n--x\0\x01");
        assert_eq!(field(&h1, &b1, b"model"), Some(&b"whisper-1"[..]));
        assert_eq!(field(&h1, &b1, b"prompt"), None);
    }

    #[test]
    fn what_is_not_a_whole_form_is_none() {
        let (_, b) = form("zz");
        // Cut before the closing delimiter.
        assert_eq!(parts(&b[..b.len() - 10], b"zz"), None);
        assert_eq!(parts(b"{\"model\":\"m\"}", b"zz"), None);
        let mut json = HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("header"),
        );
        assert_eq!(boundary(&json), None);
        assert_eq!(field(&json, &b, b"model"), None);
        let mut quoted = HeaderMap::new();
        quoted.insert(
            http::header::CONTENT_TYPE,
            "Multipart/Form-Data; charset=utf-8; Boundary=\"zz\""
                .parse()
                .expect("header"),
        );
        assert_eq!(boundary(&quoted).as_deref(), Some(&b"zz"[..]));
        assert_eq!(field(&quoted, &b, b"model"), Some(&b"whisper-1"[..]));
    }

    #[test]
    fn content_type_parameters_are_read_as_servers_read_them() {
        let bound = |v: &str| {
            boundaries_of(v.as_bytes())
                .into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect::<Vec<_>>()
        };
        let long = "x".repeat(71);
        assert_eq!(
            bound(&format!("multipart/form-data; boundary={long}")),
            [long.as_str()]
        );
        assert_eq!(bound("multipart/form-data; boundary=\"ab;cd\""), ["ab;cd"]);
        assert_eq!(bound("multipart/form-data; boundary=\"a\\\"b\""), ["a\"b"]);
        assert_eq!(
            bound("multipart/form-data; boundary=zzz; boundary=b0"),
            ["zzz", "b0"]
        );
        assert_eq!(
            boundary_of(b"multipart/form-data; boundary=zzz; boundary=b0").as_deref(),
            Some(&b"b0"[..])
        );
        assert_eq!(
            bound("multipart/form-data; boundary*=utf-8''a%3Bb"),
            ["a;b"]
        );
        assert_eq!(
            bound("multipart/form-data; boundary*0=ab; boundary*1*=%3Bcd"),
            ["ab;cd"]
        );
        // However many are given: the first, the last and `boundary*`.
        assert_eq!(
            bound(
                "multipart/form-data; boundary=a; boundary=b; boundary=c; boundary*=utf-8''d; boundary=a"
            ),
            ["a", "d"]
        );
        assert_eq!(
            bound("multipart/form-data; boundary=a; boundary=b; boundary=c"),
            ["a", "c"]
        );
        assert_eq!(
            charsets_of(b"multipart/form-data; charset=a; charset=b; charset=c"),
            [&b"a"[..], b"c"]
        );
        assert_eq!(
            charsets_of(b"multipart/form-data; charset*=utf-8''utf%2D16-le; charset=a"),
            [&b"a"[..], b"utf-16-le"]
        );
        assert_eq!(
            charsets_of(b"multipart/form-data; charset=a; charset*0=utf-16; charset*1=\"-le\""),
            [&b"a"[..], b"utf-16-le"]
        );
        assert_eq!(
            charsets_of(b"multipart/form-data; charset=u16; charset=u16; charset*=''u16"),
            [&b"u16"[..]]
        );
        assert!(bound("multipart/form-data").is_empty());
        assert!(bound("multipart/mixed; boundary=b0").is_empty());
        assert!(bound("multipart/form-data; boundary=").is_empty());
    }

    fn part_of(disposition: &str) -> Part<'_> {
        Part {
            headers: disposition.as_bytes(),
            data: b"",
        }
    }

    #[test]
    fn a_part_is_a_file_only_when_every_server_reads_it_as_one() {
        let file = |d: &str| part_of(d).is_file();
        assert!(file(
            "Content-Disposition: form-data; name=\"f\"; filename=\"a.wav\""
        ));
        // Go: an empty name is a field; Starlette: `filename*` alone is no file name.
        assert!(!file(
            "Content-Disposition: form-data; name=\"f\"; filename=\"\""
        ));
        assert!(!file(
            "Content-Disposition: form-data; name=\"f\"; filename*=UTF-8''a.bin"
        ));
        assert!(!file(
            "Content-Disposition: form-data; name=\"f\"; filename=\"a.bin\"; filename*=UTF-8''"
        ));
        assert!(!file("Content-Disposition: form-data; name=\"prompt\""));
        assert!(!file("X-Other: 1"));
        let names = |d: &str| {
            part_of(d)
                .file_names()
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("Content-Disposition: form-data; name=\"f\"; filename=\"notes;v2.txt\""),
            ["notes;v2.txt"]
        );
        assert_eq!(
            names(
                "Content-Disposition: form-data; name=\"f\"; filename=\"n.bin\"; filename*=UTF-8''notes%2Etxt"
            ),
            ["n.bin", "notes.txt"]
        );
        assert_eq!(
            part_of("content-disposition: form-data; name=\"a;b\"")
                .name()
                .as_deref(),
            Some(&b"a;b"[..])
        );
    }

    #[test]
    fn lenient_forms_are_split_as_servers_split_them() {
        let names = |f: &Form<'_>| {
            f.parts
                .iter()
                .map(|p| {
                    (
                        String::from_utf8_lossy(&p.name().unwrap_or_default()).into_owned(),
                        p.data.to_vec(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let two = |nl: &str, close: bool| {
            let mut b = format!(
                "preamble{nl}--b0{nl}Content-Disposition: form-data; name=\"a\"{nl}{nl}one{nl}--b0x not a delimiter{nl}--b0 {nl}Content-Disposition: form-data; name=\"b\"{nl}{nl}two{nl}"
            );
            if close {
                b.push_str("--b0--");
                b.push_str(nl);
                b.push_str("epilogue");
            }
            b.into_bytes()
        };
        let want = |nl: &str| {
            vec![
                (
                    "a".to_owned(),
                    format!("one{nl}--b0x not a delimiter").into_bytes(),
                ),
                ("b".to_owned(), b"two".to_vec()),
            ]
        };
        for (nl, close) in [("\r\n", true), ("\n", true), ("\r\n", false), ("\n", false)] {
            let body = two(nl, close);
            for ends in [LineEnds::First, LineEnds::Any] {
                let form = read(&body, b"b0", ends).expect("a form");
                assert_eq!(names(&form), want(nl), "{nl:?} {close} {ends:?}");
                assert_eq!(form.closed, close);
            }
            assert_eq!(parts(&body, b"b0").is_some(), close);
        }
        // A CRLF form with a bare LF before a delimiter: data to Go, a delimiter to Werkzeug.
        let mixed = b"--b0\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\n--b0\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.bin\"\r\n\r\nhidden\r\n--b0--\r\n";
        let go = read(mixed, b"b0", LineEnds::First).expect("a form");
        assert_eq!(go.parts.len(), 1);
        assert!(go.parts[0].data.ends_with(b"hidden"));
        let any = read(mixed, b"b0", LineEnds::Any).expect("a form");
        assert_eq!(any.parts.len(), 2);
        assert_eq!(any.parts[1].data, b"hidden");
        // A part whose header block does not end is data without headers.
        let open = b"--b0\r\nContent-Disposition: form-data; name=\"a\"\r\n--b0--";
        let form = read(open, b"b0", LineEnds::First).expect("a form");
        assert_eq!(
            (form.parts[0].headers, form.parts[0].data),
            (&b""[..], &b"Content-Disposition: form-data; name=\"a\""[..])
        );
        // No delimiter line of this boundary: no such form.
        assert_eq!(read(b"{\"model\":\"m\"}", b"b0", LineEnds::Any), None);
        assert_eq!(read(b"--b0x\r\n", b"b0", LineEnds::Any), None);
    }

    #[test]
    fn transfer_encoded_parts_are_decoded() {
        let qp = Part {
            headers: b"Content-Disposition: form-data; name=\"p\"\r\nContent-Transfer-Encoding: Quoted-Printable ",
            data: b"joe=40example.com =3d=3D soft=\r\nbreak =  \nend =zz",
        };
        assert_eq!(
            qp.transfer_decoded().as_deref(),
            Some(&b"joe@example.com == softbreak end =zz"[..])
        );
        let b64 = Part {
            headers: b"Content-Transfer-Encoding: base64",
            data: b"am9lQGV4\r\nYW1wbGUuY29t",
        };
        assert_eq!(
            b64.transfer_decoded().as_deref(),
            Some(&b"joe@example.com"[..])
        );
        let plain = Part {
            headers: b"Content-Transfer-Encoding: 8bit",
            data: b"x",
        };
        assert_eq!(plain.transfer_decoded(), None);
    }
}
