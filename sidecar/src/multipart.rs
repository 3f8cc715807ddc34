//! `multipart/form-data` request bodies (RFC 7578), as the SDKs send uploads (audio
//! transcriptions, image edits, files): read whole, never rewritten. The cache keys them by
//! their parts, without the boundary each request draws at random, and accounting reads the
//! `model` field.

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

impl Part<'_> {
    /// The field name its `Content-Disposition` gives.
    pub fn name(&self) -> Option<&[u8]> {
        parameter(self.header(b"content-disposition")?, b"name")
    }

    /// The file name its `Content-Disposition` gives (`filename`, or RFC 5987's `filename*`):
    /// `Some` for a file, `None` for a field's value.
    pub fn file_name(&self) -> Option<&[u8]> {
        let disposition = self.header(b"content-disposition")?;
        parameter(disposition, b"filename").or_else(|| parameter(disposition, b"filename*"))
    }

    /// The media type its `Content-Type` declares, as sent (`None` when it declares none).
    pub fn content_type(&self) -> Option<&[u8]> {
        self.header(b"content-type").map(<[u8]>::trim_ascii)
    }

    /// The value of the first header line `name` (any case), after its colon.
    fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers.split(|&b| b == b'\n').find_map(|line| {
            let (key, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            key.trim_ascii()
                .eq_ignore_ascii_case(name)
                .then_some(&value[1..])
        })
    }
}

/// The boundary of a `multipart/form-data` request (`None` for any other body).
pub fn boundary(headers: &HeaderMap) -> Option<&[u8]> {
    boundary_of(headers.get(http::header::CONTENT_TYPE)?.as_bytes())
}

/// The boundary a `Content-Type` value gives, when it is `multipart/form-data`.
pub fn boundary_of(value: &[u8]) -> Option<&[u8]> {
    let media = value.split(|&b| b == b';').next()?;
    if !media
        .trim_ascii()
        .eq_ignore_ascii_case(b"multipart/form-data")
    {
        return None;
    }
    // RFC 2046: 1 to 70 characters.
    parameter(value, b"boundary").filter(|v| (1..=70).contains(&v.len()))
}

/// The value of parameter `key` (any case) of a header value `type; key=value; ...`, without
/// the quotes around it.
fn parameter<'v>(value: &'v [u8], key: &[u8]) -> Option<&'v [u8]> {
    value.split(|&b| b == b';').skip(1).find_map(|param| {
        let (k, v) = param.split_at(param.iter().position(|&b| b == b'=')?);
        if !k.trim_ascii().eq_ignore_ascii_case(key) {
            return None;
        }
        let v = v[1..].trim_ascii();
        Some(
            v.strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v),
        )
    })
}

/// The parts of `body`, a form with this `boundary`; `None` when it is not one (no opening
/// delimiter, a part without its header block's end, no closing delimiter).
pub fn parts<'a>(body: &'a [u8], boundary: &[u8]) -> Option<Vec<Part<'a>>> {
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    let finder = memmem::Finder::new(&delimiter);
    // The first delimiter may open the body (no CRLF before it) or follow a preamble.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        finder.find(body)? + delimiter.len()
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        // Transport padding, then the line break ending the delimiter line.
        let line_end = memchr::memchr(b'\n', rest)?;
        if !rest[..line_end].trim_ascii().is_empty() {
            return None;
        }
        let part_start = at + line_end + 1;
        let end = part_start + finder.find(&body[part_start..])?;
        let part = &body[part_start..end];
        let (headers, data) = match part {
            [b'\r', b'\n', data @ ..] => (&part[..0], data),
            _ => {
                let blank = memmem::find(part, b"\r\n\r\n")?;
                (&part[..blank], &part[blank + 4..])
            }
        };
        parts.push(Part { headers, data });
        at = end + delimiter.len();
    }
}

/// The value of the form field `name` (the first such part), for a form request.
pub fn field<'a>(headers: &HeaderMap, body: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let parts = parts(body, boundary(headers)?)?;
    parts
        .into_iter()
        .find(|p| p.name() == Some(name))
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
        let p1 = parts(&b1, boundary(&h1).expect("boundary")).expect("form");
        let p2 = parts(&b2, boundary(&h2).expect("boundary")).expect("form");
        assert_eq!(p1, p2);
        assert_eq!(p1.len(), 2);
        assert_eq!(p1[0].name(), Some(&b"model"[..]));
        assert_eq!(p1[1].name(), Some(&b"file"[..]));
        // A field has no file name; a file its name and declared type.
        assert_eq!((p1[0].file_name(), p1[0].content_type()), (None, None));
        assert_eq!(p1[1].file_name(), Some(&b"a.wav"[..]));
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
        assert_eq!(boundary(&quoted), Some(&b"zz"[..]));
        assert_eq!(field(&quoted, &b, b"model"), Some(&b"whisper-1"[..]));
    }
}
