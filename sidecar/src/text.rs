//! The human text inside request and response bodies (chat messages, prompts, tool inputs and
//! results, stream deltas), for the checks that read it: DLP and guardrails.
//!
//! Streams are read in each format a provider streams in: SSE (OpenAI, Anthropic, Gemini with
//! `alt=sse`), AWS's binary event stream (Bedrock's `converse-stream`, and
//! `invoke-with-response-stream`, whose `chunk` events carry the model's own events in base64)
//! and a JSON array of chunks (Gemini's `streamGenerateContent` without `alt=sse`).

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Keys whose string values carry text people or models wrote, in the APIs sidegate serves
/// (OpenAI, Anthropic, Gemini, Bedrock, Cohere, tool-call arguments and results, stream
/// deltas).
const TEXT_KEYS: &[&str] = &[
    "content",
    "text",
    "prompt",
    "input",
    "system",
    "instructions",
    "arguments",
    "partial_json",
    "thinking",
    "refusal",
    "message",
    "preamble",
    // OpenAI Responses' `function_call_output` / `custom_tool_call_output` and `mcp_call`,
    // Gemini's `codeExecutionResult`.
    "output",
    // Bedrock InvokeModel's own model formats: Meta Llama's `generation`, Amazon Titan's
    // `inputText`/`outputText`; reasoning deltas (`reasoning_content`, DeepSeek and others).
    "generation",
    "inputText",
    "outputText",
    "reasoning_content",
    // The Responses API's stream events (`response.output_text.delta` and others) carry their
    // text as a string `delta`; rerank's `query` and `documents`, a fill-in-the-middle `suffix`.
    "delta",
    "query",
    "documents",
    "suffix",
];

/// What an object's field `key` (the object itself under `parent`) holds, beyond [`TEXT_KEYS`].
enum Field {
    /// Free-form data a model or a tool wrote (tool-call inputs, tool results): every string
    /// inside is text, whatever its key.
    Data,
    /// A string that is text although its key names other things elsewhere.
    Text,
    /// Walked by [`TEXT_KEYS`].
    Walk,
}

fn field(parent: Option<&str>, map: &Map<String, Value>, key: &str, v: &Value) -> Field {
    let kind = map.get("type").and_then(Value::as_str);
    match (parent, key) {
        // Anthropic's `tool_use` (and server / MCP tool use) `input`, Bedrock Converse's
        // `toolUse.input`; tool-call `arguments` given as an object (not a JSON string).
        (_, "input" | "arguments") if v.is_object() => Field::Data,
        // Gemini's `functionCall.args` and `functionResponse.response`.
        (Some("functionCall"), "args") | (Some("functionResponse"), "response") => Field::Data,
        // Bedrock Converse's `toolResult.content[].json`.
        (Some("content"), "json") => Field::Data,
        // Cohere's documents: `{"type": "document", "document": {"data": {...}}}`.
        (Some("document" | "documents"), "data") if !v.is_string() => Field::Data,
        // Anthropic's plain-text document source, `{"type": "text", "data": "..."}` (a base64
        // source holds a PDF or an image: not read).
        (Some("source"), "data") if kind == Some("text") => Field::Text,
        // Anthropic's document and search-result blocks' title and context.
        (_, "title" | "context") if matches!(kind, Some("document" | "search_result")) => {
            Field::Text
        }
        // Gemini's `executableCode.code`.
        (Some("executableCode"), "code") => Field::Text,
        _ => Field::Walk,
    }
}

fn walk(v: &Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        Value::String(s) if key.is_some_and(|k| TEXT_KEYS.contains(&k)) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| walk(i, key, out)),
        Value::Object(map) => {
            for (k, child) in map {
                match field(key, map, k, child) {
                    Field::Data => all_strings(child, out),
                    Field::Text => {
                        if let Value::String(s) = child {
                            out.push(s.clone());
                        }
                    }
                    Field::Walk => walk(child, Some(k), out),
                }
            }
        }
        _ => {}
    }
}

/// Every string value of `v` that is text, for a body of a shape [`TEXT_KEYS`] does not know:
/// not data URLs nor base64 (images, audio, embeddings as base64).
fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if is_encoded_data(s) => {}
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| all_strings(i, out)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, out)),
        _ => {}
    }
}

/// The text of a stream's events, kept apart per choice: with `n` > 1 the deltas of OpenAI's
/// `choices[]` and Gemini's `candidates[]` interleave, and each choice's text is joined on its
/// own (by its `index`, else its place in the array). Other text goes with the first choice.
#[derive(Default)]
struct Lanes(std::collections::BTreeMap<u64, Vec<String>>);

impl Lanes {
    fn event(&mut self, mut v: Value) {
        if let Value::Object(map) = &mut v {
            for key in ["choices", "candidates"] {
                let Some(Value::Array(items)) = map.remove(key) else {
                    continue;
                };
                for (place, item) in items.iter().enumerate() {
                    let index = item.get("index").and_then(Value::as_u64);
                    let lane = self.0.entry(index.unwrap_or(place as u64)).or_default();
                    walk(item, Some(key), lane);
                }
            }
        }
        walk(&v, None, self.0.entry(0).or_default());
    }

    /// Each choice's fragments joined, the choices one per line (a match never spans two).
    fn joined(self) -> Vec<u8> {
        let lanes: Vec<String> = (self.0.into_values())
            .map(|parts| parts.concat())
            .filter(|text| !text.is_empty())
            .collect();
        lanes.join("\n").into_bytes()
    }
}

/// Whether a string is encoded data rather than text: a data URL, or a long run of base64.
fn is_encoded_data(s: &str) -> bool {
    s.starts_with("data:")
        || (s.len() >= 256
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
            }))
}

/// For a stream body (SSE, an AWS event stream, a JSON array of chunks): the text of all its
/// events joined in order, without separators (deltas are fragments of one text), each choice
/// on its own (see [`Lanes`]); `None` for other bodies.
pub fn stream_text(body: &[u8]) -> Option<Vec<u8>> {
    if is_event_stream(body) {
        return Some(event_stream_text(body));
    }
    // An SSE body starts with a field (after a byte order mark, and blank lines) or a comment.
    let first = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    let first = &first[first
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(first.len())..];
    if [&b"data:"[..], b"event:", b"id:", b"retry:", b":"]
        .iter()
        .any(|field| first.starts_with(field))
    {
        return Some(sse_text(body));
    }
    if body.trim_ascii_start().starts_with(b"[") {
        return json_array_text(body);
    }
    json_lines_text(body)
}

/// The joined text of a stream of JSON lines (Ollama's native API, Cohere's v1 streams): two or
/// more lines, each a JSON object; `None` for anything else (a document over several lines).
fn json_lines_text(body: &[u8]) -> Option<Vec<u8>> {
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty());
    let first = lines.next()?;
    if !first.starts_with(b"{") {
        return None;
    }
    let mut lanes = Lanes::default();
    let mut count = 0;
    for line in std::iter::once(first).chain(lines) {
        let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(line) else {
            return None;
        };
        lanes.event(v);
        count += 1;
    }
    (count >= 2).then(|| lanes.joined())
}

/// The joined text of an SSE body's events (each one's `data:` lines joined, whatever its line
/// ends: a JSON document split over lines is read whole).
fn sse_text(body: &[u8]) -> Vec<u8> {
    let mut lanes = Lanes::default();
    let mut parser = crate::compat::sse::SseParser::new();
    let mut read = |e: crate::compat::sse::Event<'_>| {
        if let Ok(v) = serde_json::from_str::<Value>(e.data) {
            lanes.event(v);
        }
    };
    parser.feed(body, &mut read);
    parser.finish(&mut read);
    lanes.joined()
}

/// Whether `body` starts with an AWS event-stream message prelude: its checksum (over the two
/// lengths) holds, which text or JSON does by chance once in 2^32.
fn is_event_stream(body: &[u8]) -> bool {
    body.len() >= 16
        && crc32fast::hash(&body[..8]) == u32::from_be_bytes([body[8], body[9], body[10], body[11]])
}

/// The joined text of an AWS event stream's JSON payloads; an InvokeModelWithResponseStream
/// `chunk` is read in the model's own event its `bytes` hold. Up to where the framing breaks.
fn event_stream_text(body: &[u8]) -> Vec<u8> {
    let mut decoder = crate::compat::eventstream::Decoder::new();
    let mut lanes = Lanes::default();
    // Fed in pieces: the decoder keeps one message at a time, not a copy of the whole body.
    for piece in body.chunks(64 << 10) {
        decoder.push(piece);
        while let Some(Ok(message)) = decoder.next_message() {
            let model_event = message.invoke_chunk();
            let payload = model_event.as_deref().unwrap_or(&message.payload);
            if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                lanes.event(v);
            }
        }
    }
    lanes.joined()
}

/// The joined text of a JSON array of objects (Gemini's stream without `alt=sse`), read one
/// element at a time (never the whole tree at once); `None` when `body` is not such an array
/// or its objects hold no text (then read as any JSON document).
fn json_array_text(body: &[u8]) -> Option<Vec<u8>> {
    use serde::Deserializer as _;
    use serde::de::{Error, SeqAccess, Visitor};

    struct Chunks<'a>(&'a mut Lanes);
    impl<'de> Visitor<'de> for Chunks<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of stream chunks")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(chunk) = seq.next_element::<Value>()? {
                if !chunk.is_object() {
                    return Err(A::Error::custom("not a stream chunk"));
                }
                self.0.event(chunk);
            }
            Ok(())
        }
    }

    let mut lanes = Lanes::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_seq(Chunks(&mut lanes)).ok()?;
    de.end().ok()?;
    let text = lanes.joined();
    (!text.is_empty()).then_some(text)
}

/// Markers of a document a request body may send in base64 (see [`encoded_documents`]): a
/// look before a body is parsed for them.
const ENCODED_MARKERS: &[&[u8]] = &[b"base64", b"\"bytes\"", b"inlineData", b"inline_data"];

/// Whether a request body may send a document in base64 (see [`encoded_documents`]).
pub fn may_hold_encoded_documents(body: &[u8]) -> bool {
    ENCODED_MARKERS
        .iter()
        .any(|m| memchr::memmem::find(body, m).is_some())
}

/// Whether a media type (`text/plain`, `application/json; charset=utf-8`) is text: `text/*`,
/// JSON and XML (their `+json`/`+xml` kinds too), JSON lines, YAML and other text formats.
fn is_text_type(media_type: &str) -> bool {
    let t = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    t.starts_with("text/")
        || t.ends_with("+json")
        || t.ends_with("+xml")
        || TEXT_APPLICATION_TYPES.contains(&t.strip_prefix("application/").unwrap_or_default())
}

/// The `application/*` media types that are text.
const TEXT_APPLICATION_TYPES: &[&str] = &[
    "json",
    "jsonl",
    "x-jsonl",
    "jsonlines",
    "x-jsonlines",
    "ndjson",
    "x-ndjson",
    "json-seq",
    "xml",
    "yaml",
    "x-yaml",
    "toml",
    "csv",
    "javascript",
    "x-javascript",
    "ecmascript",
    "typescript",
    "sql",
    "graphql",
    "x-sh",
    "x-python",
    "x-tex",
    "rtf",
    "x-www-form-urlencoded",
];

/// Extensions of the file names of text files (documents, data, code), as the providers' file
/// APIs take them whatever media type the upload declares. None that also names a binary
/// format (`.ts`, an MPEG transport stream as often as TypeScript).
const TEXT_FILE_EXTENSIONS: &[&str] = &[
    "txt", "text", "md", "markdown", "rst", "json", "jsonl", "ndjson", "csv", "tsv", "xml", "html",
    "htm", "yaml", "yml", "toml", "ini", "log", "srt", "vtt", "tex", "rtf", "sql", "py", "js",
    "mjs", "tsx", "jsx", "java", "c", "h", "cc", "cpp", "hpp", "cs", "go", "rs", "rb", "php", "sh",
    "css", "kt", "swift", "scala",
];

/// Whether a file name's extension is a text file's.
fn is_text_file_name(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let ext = &name[dot + 1..];
    TEXT_FILE_EXTENSIONS
        .iter()
        .any(|e| ext.eq_ignore_ascii_case(e.as_bytes()))
}

/// Whether a declared media type, as sent, is text.
fn declares_text(media_type: Option<&[u8]>) -> bool {
    media_type
        .and_then(|t| std::str::from_utf8(t).ok())
        .is_some_and(is_text_type)
}

/// The pieces of a request body the checks (DLP, prompt guardrails) read as text: a form's
/// (`multipart/form-data`) parts one by one, else the whole body; what is not text is left out.
///
/// Which bytes are text: anything the request declares as text, and anything that holds no
/// NUL byte. Text is read as it is, bytes that are no UTF-8 included (replaced where it must be
/// parsed): one invalid byte would otherwise hide a whole part or body from the checks, while a
/// provider may well read it, replacing the byte (Go's and JavaScript's JSON readers do). What
/// keeps binaries out is the NUL byte: every image, audio, video, PDF, archive or compressed
/// file of more than a few bytes holds some (their headers' and lengths' zero bytes; random
/// bytes, one in 256), and random bytes would make false matches (an `x@y.io` among 3 MB of
/// them). Text holds none (JSON and JSONL refuse a raw NUL). No share of invalid UTF-8 is
/// asked of text: a Latin-1 CSV is text, and a share would let a client hide a line behind
/// invalid bytes added to it.
///
/// - A whole body is read when its `Content-Type` is text (JSON, `text/*`; see
///   [`is_text_type`]) or it holds no NUL byte.
/// - A form's field (a part without a `filename`) is always read: servers hand its value to the
///   API as a string, whatever its `Content-Type` says.
/// - A form's file is read when its `Content-Type` is text, its file name is a text file's
///   (`.txt`, `.jsonl`, `.csv`, code; providers go by the name: a batch file sent as
///   `application/octet-stream` is still JSONL), or it holds no NUL byte. A file declared
///   binary, named as one and holding a NUL byte (audio, an image, a PDF) is not read.
/// - JSON in UTF-16 or UTF-32 is read as its text, decoded ([`wide_json`]).
pub fn request_pieces<'a>(content_type: Option<&[u8]>, body: &'a [u8]) -> Vec<Cow<'a, [u8]>> {
    let form = content_type
        .and_then(crate::multipart::boundary_of)
        .and_then(|boundary| crate::multipart::parts(body, boundary));
    let Some(parts) = form else {
        return read_as_text(declares_text(content_type), body)
            .into_iter()
            .collect();
    };
    parts
        .iter()
        .filter_map(|p| {
            let declared = match p.file_name() {
                None => true,
                Some(name) => declares_text(p.content_type()) || is_text_file_name(name),
            };
            read_as_text(declared, p.data)
        })
        .collect()
}

/// `data` as the checks read it, if they do: UTF-16 or UTF-32 JSON decoded ([`wide_json`]),
/// and kept when it is `declared` text or holds no NUL byte.
fn read_as_text(declared: bool, data: &[u8]) -> Option<Cow<'_, [u8]>> {
    let text = match wide_json(data) {
        Some(decoded) => Cow::Owned(decoded.into_bytes()),
        None => Cow::Borrowed(data),
    };
    (declared || memchr::memchr(0, &text).is_none()).then_some(text)
}

/// A JSON document in UTF-16 or UTF-32 (with a byte order mark, or without one: its first
/// character, `{`, `[` or a space, tells the encoding by its zero bytes, as RFC 4627 has it),
/// decoded into UTF-8, units that are no character replaced. JSON readers that follow RFC 4627
/// (Python's `json`, and so the servers built on it) read such a body: the checks must read
/// its text too, not bytes interleaved with NULs that no pattern matches.
fn wide_json(data: &[u8]) -> Option<String> {
    let (wide, skip) = wide_encoding(data)?;
    let data = &data[skip..];
    Some(match wide {
        Wide::Utf16 { big } => {
            let units = data.chunks_exact(2).map(|u| {
                let u = [u[0], u[1]];
                if big {
                    u16::from_be_bytes(u)
                } else {
                    u16::from_le_bytes(u)
                }
            });
            char::decode_utf16(units)
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
        Wide::Utf32 { big } => data
            .chunks_exact(4)
            .map(|u| {
                let u = [u[0], u[1], u[2], u[3]];
                let c = if big {
                    u32::from_be_bytes(u)
                } else {
                    u32::from_le_bytes(u)
                };
                char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
    })
}

/// Whether a request body is JSON in UTF-16 or UTF-32 ([`wide_json`]), which the checks parse
/// once decoded (room for its tree is taken as for any JSON document).
pub fn is_wide_json(body: &[u8]) -> bool {
    wide_encoding(body).is_some()
}

enum Wide {
    Utf16 { big: bool },
    Utf32 { big: bool },
}

/// The encoding of a JSON document in UTF-16 or UTF-32 and the length of its byte order mark.
fn wide_encoding(data: &[u8]) -> Option<(Wide, usize)> {
    let starts_json = |c: u8| matches!(c, b'{' | b'[' | b' ' | b'\t' | b'\r' | b'\n');
    Some(match *data.get(..4)? {
        [0, 0, 0xfe, 0xff] => (Wide::Utf32 { big: true }, 4),
        [0xff, 0xfe, 0, 0] => (Wide::Utf32 { big: false }, 4),
        [0xfe, 0xff, ..] => (Wide::Utf16 { big: true }, 2),
        [0xff, 0xfe, ..] => (Wide::Utf16 { big: false }, 2),
        [0, 0, 0, c] if starts_json(c) => (Wide::Utf32 { big: true }, 0),
        [c, 0, 0, 0] if starts_json(c) => (Wide::Utf32 { big: false }, 0),
        [0, c, 0, _] if starts_json(c) => (Wide::Utf16 { big: true }, 0),
        [c, 0, _, 0] if starts_json(c) => (Wide::Utf16 { big: false }, 0),
        _ => return None,
    })
}

/// The text of the documents a request sends in base64 with a text media type, which the
/// checks would otherwise see only encoded: Anthropic's `source: {type: "base64", media_type:
/// "text/plain", data}`, Gemini's `inlineData: {mimeType: "text/csv", data}` (or
/// `inline_data`/`mime_type`), OpenAI's `file: {file_data: "data:text/plain;base64,..."}`,
/// Bedrock Converse's `document: {format: "txt" | "md" | "csv" | "html", source: {bytes}}`.
/// Images, PDFs and office files are not text and are not read.
pub fn encoded_documents(v: &Value, out: &mut Vec<String>) {
    fn str_of<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
        map.get(key).and_then(Value::as_str)
    }
    use base64::Engine as _;
    let decode = |data: &str, out: &mut Vec<String>| {
        let data: String = data.split_ascii_whitespace().collect();
        let engine = &base64::engine::general_purpose::STANDARD_NO_PAD;
        if let Ok(bytes) = engine.decode(data.trim_end_matches('=')) {
            out.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    };
    match v {
        Value::Array(items) => items.iter().for_each(|i| encoded_documents(i, out)),
        Value::Object(map) => {
            let media = str_of(map, "media_type")
                .or_else(|| str_of(map, "mimeType"))
                .or_else(|| str_of(map, "mime_type"));
            if let (Some(media), Some(data)) = (media, str_of(map, "data"))
                && is_text_type(media)
                && str_of(map, "type").is_none_or(|t| t == "base64")
            {
                decode(data, out);
            }
            if let Some(url) = str_of(map, "file_data")
                && let Some((head, data)) = url.split_once(',')
                && let Some(media) = head.strip_prefix("data:")
                && let Some(media) = media.strip_suffix(";base64")
                && is_text_type(media)
            {
                decode(data, out);
            }
            if let Some(format) = str_of(map, "format")
                && ["txt", "md", "csv", "html"].contains(&format)
                && let Some(Value::Object(source)) = map.get("source")
                && let Some(bytes) = str_of(source, "bytes")
            {
                decode(bytes, out);
            }
            map.values().for_each(|v| encoded_documents(v, out));
        }
        _ => {}
    }
}

/// The text of a request the prompt guardrails read: that of each piece [`request_pieces`]
/// gives, bytes that are no UTF-8 replaced. A whole body is read as [`of_request`]; a form's
/// parts (a JSONL file, a prompt field) as text, their JSON string escapes undone (no JSON tree
/// is made of an uploaded file).
pub fn of_prompt(content_type: Option<&[u8]>, body: &[u8]) -> String {
    let pieces = request_pieces(content_type, body);
    if content_type
        .and_then(crate::multipart::boundary_of)
        .is_none()
    {
        return pieces.first().map_or_else(String::new, |p| {
            of_request(String::from_utf8_lossy(p).as_bytes())
        });
    }
    let texts: Vec<String> = pieces
        .iter()
        .map(|p| String::from_utf8_lossy(&crate::dlp::unescape_json(p)).into_owned())
        .filter(|t| !t.trim().is_empty())
        .collect();
    texts.join("\n")
}

/// The text of a response body: the joined deltas of a stream, else as [`of_request`].
pub fn of_body(body: &[u8]) -> String {
    if let Some(t) = stream_text(body) {
        return String::from_utf8_lossy(&t).into_owned();
    }
    of_request(body)
}

/// The text of a request body (never a stream: a top-level array is a document too, whose
/// parts are separate texts): the text fields of a JSON document (one per line, in no
/// particular order across fields; every string value when it has none of them, so an API
/// shape not listed is still read) and its text documents in base64
/// ([`encoded_documents`]), or the body itself when it is none.
pub fn of_request(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let mut parts = Vec::new();
            walk(&v, None, &mut parts);
            if parts.is_empty() {
                all_strings(&v, &mut parts);
            }
            if may_hold_encoded_documents(body) {
                encoded_documents(&v, &mut parts);
            }
            parts.join("\n")
        }
        // Not JSON this reader takes (too deep, a lone surrogate escape): its text with the
        // string escapes undone (an escaped prompt must not pass as escape codes); bytes that
        // are not text (an audio upload, a binary answer) are no text to check.
        Err(_) => match std::str::from_utf8(body) {
            Ok(_) => String::from_utf8_lossy(&crate::dlp::unescape_json(body)).into_owned(),
            Err(_) => String::new(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_unless_it_is_binary_and_not_declared_text() {
        let json: &[u8] = b"{\"content\":\"hi \xff\"}";
        assert_eq!(request_pieces(Some(b"application/json"), json), [json]);
        assert_eq!(request_pieces(None, json), [json]);
        let nul: &[u8] = b"RIFF\x00\x00WAVE";
        assert!(request_pieces(None, nul).is_empty());
        assert!(request_pieces(Some(b"audio/wav"), nul).is_empty());
        assert_eq!(
            request_pieces(Some(b"Text/Plain; charset=utf-16"), nul),
            [nul]
        );
        for t in [
            "application/json",
            "application/vnd.api+json",
            "application/jsonl",
            "application/x-ndjson",
            "image/svg+xml",
            "text/csv",
        ] {
            assert!(is_text_type(t), "{t}");
        }
        for t in [
            "application/octet-stream",
            "image/png",
            "application/pdf",
            "",
        ] {
            assert!(!is_text_type(t), "{t}");
        }
        // A form: its fields, its text files, its files holding no NUL byte; not its binaries.
        let form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
            --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
            Content-Type: audio/wav\r\n\r\nRIFF\x00\xff\r\n\
            --b\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"d.csv\"\r\n\
            Content-Type: application/octet-stream\r\n\r\na;b\x00\xe9\r\n--b--\r\n";
        let ct = Some(&b"multipart/form-data; boundary=b"[..]);
        assert_eq!(
            request_pieces(ct, form),
            [&b"whisper-1"[..], &b"a;b\x00\xe9"[..]]
        );
        assert_eq!(of_prompt(ct, form), "whisper-1\na;b\u{0}\u{fffd}");
        // A whole body's bytes that are no UTF-8 are replaced, its JSON still read.
        assert_eq!(
            of_prompt(Some(b"application/json"), b"{\"input\":\"say \xffhi\"}"),
            "say \u{fffd}hi"
        );
        assert_eq!(of_prompt(Some(b"audio/wav"), nul), "");
    }

    #[test]
    fn json_in_utf16_or_utf32_is_read_as_its_text() {
        let json = "{\"input\": \"joe@example.com\"}";
        let utf16 = |big: bool| -> Vec<u8> {
            json.encode_utf16()
                .flat_map(|u| {
                    if big {
                        u.to_be_bytes()
                    } else {
                        u.to_le_bytes()
                    }
                })
                .collect()
        };
        let utf32 = |big: bool| -> Vec<u8> {
            json.chars()
                .flat_map(|c| {
                    let c = u32::from(c);
                    if big {
                        c.to_be_bytes()
                    } else {
                        c.to_le_bytes()
                    }
                })
                .collect()
        };
        let mut bom16 = vec![0xff, 0xfe];
        bom16.extend(utf16(false));
        let mut bom32 = vec![0, 0, 0xfe, 0xff];
        bom32.extend(utf32(true));
        for wide in [
            utf16(false),
            utf16(true),
            utf32(false),
            utf32(true),
            bom16,
            bom32,
        ] {
            assert_eq!(wide_json(&wide).as_deref(), Some(json), "{wide:?}");
            // Read whatever its declared type, as JSON readers do.
            assert_eq!(
                request_pieces(Some(b"application/octet-stream"), &wide),
                [json.as_bytes()]
            );
            assert_eq!(of_prompt(None, &wide), "joe@example.com");
        }
        // Binaries starting with zero bytes are no JSON: an MP4's box, a WAV's header.
        assert_eq!(wide_json(b"\x00\x00\x00\x18ftypmp42"), None);
        assert_eq!(wide_json(b"RIFF\x24\x00\x00\x00WAVE"), None);
        assert_eq!(wide_json(b"{\"a\": 1}"), None);
    }

    #[test]
    fn chat_bodies_of_every_api_give_their_text() {
        let openai = br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}"#;
        assert_eq!(of_body(openai), "be nice\nhello");
        let anthropic =
            br#"{"system":"sys","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        // Object keys may come in any order: compare the lines as a set.
        let mut lines: Vec<String> = of_body(anthropic).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["hi", "sys"]);
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"ciao"}]}]}"#;
        assert_eq!(of_body(gemini), "ciao");
        assert_eq!(of_body(b"plain words"), "plain words");
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(of_body(sse), "Hello");
        assert_eq!(stream_text(b"{\"content\":\"x\"}"), None);
        let cohere = br#"{"message":"hola","preamble":"be brief"}"#;
        let mut lines: Vec<String> = of_body(cohere).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["be brief", "hola"]);
        // Rerank: the query and the documents.
        let rerank = br#"{"model":"m","query":"what is x","documents":["doc one"]}"#;
        let mut lines: Vec<String> = of_body(rerank).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["doc one", "what is x"]);
        // A shape with none of the known fields: every string is read, but not encoded data.
        let other = format!(
            r#"{{"model":"m","ask":"what is y","b64_json":"{}","url":"data:image/png;base64,iVBO"}}"#,
            "A".repeat(300)
        );
        let mut lines: Vec<String> = of_body(other.as_bytes())
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, ["m", "what is y"]);
        // A stream of JSON lines (Ollama): its text joined; a document over lines is none.
        let ndjson = b"{\"message\":{\"content\":\"mock-fl\"},\"done\":false}\n{\"message\":{\"content\":\"ag\"},\"done\":true}\n";
        assert_eq!(stream_text(ndjson).as_deref(), Some(&b"mock-flag"[..]));
        assert_eq!(stream_text(b"{\n  \"content\": \"x\"\n}\n"), None);
        assert_eq!(stream_text(b"{\"content\":\"one line\"}\n"), None);
        // JSON this reader does not take (a lone surrogate): its escapes undone; binary: none.
        let escaped = br#"{"x":"\ud800","prompt":"\u006d\u006f\u0063\u006b"}"#;
        assert!(of_body(escaped).contains("mock"), "{}", of_body(escaped));
        assert_eq!(of_body(&[0xff, 0xfe, 0x00, 0x80]), "");
    }

    #[test]
    fn sse_streams_give_their_joined_text_in_every_framing() {
        let events = [
            r#"{"choices":[{"delta":{"content":"card 4111 11"}}]}"#,
            r#"{"choices":[{"delta":{"content":"11 1111"}}]}"#,
        ];
        let framed = |prefix: &str, nl: &str, split: bool| {
            let mut body = prefix.to_owned();
            for e in events {
                body.push_str("id: 1");
                body.push_str(nl);
                if split {
                    // The JSON document over two data lines (between two of its tokens).
                    let (a, b) = e.split_at(e.find("\"content\"").expect("content"));
                    body.push_str(&format!("data:{a}{nl}data:{b}{nl}{nl}"));
                } else {
                    body.push_str(&format!("data: {e}{nl}{nl}"));
                }
            }
            body.push_str(&format!("data: [DONE]{nl}{nl}"));
            body
        };
        for prefix in ["", "\u{feff}", ": ping\n"] {
            for nl in ["\n", "\r\n", "\r"] {
                for split in [false, true] {
                    let body = framed(prefix, nl, split);
                    assert_eq!(
                        stream_text(body.as_bytes()).as_deref(),
                        Some(&b"card 4111 1111 1111"[..]),
                        "{body:?}"
                    );
                }
            }
        }
    }

    /// A Bedrock event stream of `(event type, JSON payload)` messages.
    pub(crate) fn event_stream(events: &[(&str, String)]) -> Vec<u8> {
        events
            .iter()
            .flat_map(|(kind, payload)| {
                crate::compat::eventstream::encode(
                    &[
                        (":event-type", kind),
                        (":content-type", "application/json"),
                        (":message-type", "event"),
                    ],
                    payload.as_bytes(),
                )
            })
            .collect()
    }

    /// Bedrock ConverseStream: one `contentBlockDelta` per piece.
    pub(crate) fn converse_stream(pieces: &[&str]) -> Vec<u8> {
        let mut events = vec![("messageStart", r#"{"role":"assistant","p":"abcd"}"#.into())];
        for piece in pieces {
            let delta = serde_json::json!({"contentBlockIndex": 0, "delta": {"text": piece}, "p": "abcdefgh"});
            events.push(("contentBlockDelta", delta.to_string()));
        }
        events.push(("messageStop", r#"{"stopReason":"end_turn"}"#.into()));
        events.push((
            "metadata",
            r#"{"usage":{"inputTokens":3,"outputTokens":4},"metrics":{"latencyMs":1}}"#.into(),
        ));
        event_stream(&events)
    }

    /// Bedrock InvokeModelWithResponseStream of an Anthropic model: its events in base64.
    pub(crate) fn invoke_stream(pieces: &[&str]) -> Vec<u8> {
        use base64::Engine as _;
        let mut model_events = vec![
            serde_json::json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ];
        for piece in pieces {
            model_events.push(serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}));
        }
        model_events.push(serde_json::json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3, "outputTokenCount": 4}}));
        let events: Vec<(&str, String)> = model_events
            .iter()
            .map(|e| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(e.to_string());
                ("chunk", format!(r#"{{"bytes":"{b64}","p":"abcdefgh"}}"#))
            })
            .collect();
        event_stream(&events)
    }

    /// Gemini `streamGenerateContent` without `alt=sse`: a JSON array, as Google formats it.
    pub(crate) fn gemini_array(pieces: &[&str]) -> Vec<u8> {
        let chunks: Vec<String> = pieces
            .iter()
            .map(|p| {
                serde_json::to_string_pretty(&serde_json::json!({"candidates": [{"content": {"parts": [{"text": p}], "role": "model"}, "index": 0}], "usageMetadata": {"promptTokenCount": 2}, "modelVersion": "gemini-2.5-flash", "responseId": "resp-1"}))
                    .expect("json")
            })
            .collect();
        format!("[{}]", chunks.join("\r\n,")).into_bytes()
    }

    #[test]
    fn bedrock_and_gemini_json_streams_give_their_joined_text() {
        let pieces = ["card 4111 11", "11 1111 ", "1111 thanks"];
        let whole = "card 4111 1111 1111 1111 thanks";
        for (name, body) in [
            ("converse-stream", converse_stream(&pieces)),
            ("invoke-with-response-stream", invoke_stream(&pieces)),
            ("gemini array", gemini_array(&pieces)),
        ] {
            assert_eq!(
                stream_text(&body).as_deref(),
                Some(whole.as_bytes()),
                "{name}"
            );
            assert_eq!(of_body(&body), whole, "{name}");
        }
        // InvokeModel streams of Meta Llama (`generation`) and Amazon Titan (`outputText`).
        for key in ["generation", "outputText"] {
            use base64::Engine as _;
            let events: Vec<(&str, String)> = pieces
                .iter()
                .map(|piece| {
                    let event = serde_json::json!({ key: piece }).to_string();
                    let chunk = base64::engine::general_purpose::STANDARD.encode(event);
                    ("chunk", serde_json::json!({ "bytes": chunk }).to_string())
                })
                .collect();
            assert_eq!(of_body(&event_stream(&events)), whole, "{key}");
        }
        // Converse-stream tool input deltas (partial JSON) are read too.
        let tool = event_stream(&[(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"toolUse":{"input":"{\"q\":\"hi"}}}"#.into(),
        )]);
        assert_eq!(of_body(&tool), r#"{"q":"hi"#);
        // A stream cut mid-message: the messages before the cut.
        let body = converse_stream(&["one ", "two"]);
        let cut = &body[..body.len() - 5];
        assert_eq!(of_body(cut), "one two");
        // Arrays that are not streams of objects are read as JSON documents.
        assert_eq!(stream_text(br#"["a","b"]"#), None);
        assert_eq!(of_body(br#"["a","b"]"#), "a\nb");
        assert_eq!(stream_text(br#"[{"id":"x"}]"#), None);
        assert_eq!(of_body(br#"[{"id":"x"}]"#), "x");
        assert_eq!(stream_text(b"[{\"text\":\"a\"}"), None, "not whole");
        // Text or JSON is not taken for an event stream.
        assert_eq!(stream_text(b"0123456789abcdefghij"), None);
    }

    #[test]
    fn interleaved_choices_and_candidates_are_joined_each_on_its_own() {
        // OpenAI with `n: 2`: the two choices' deltas alternate.
        let openai = [
            (0, "card 4111 11"),
            (1, "hello "),
            (0, "11 1111 "),
            (1, "world"),
            (0, "1111"),
        ]
        .iter()
        .map(|(i, t)| {
            let e = serde_json::json!({"choices": [{"index": i, "delta": {"content": t}}]});
            format!("data: {e}\n\n")
        })
        .collect::<String>()
            + "data: [DONE]\n\n";
        assert_eq!(
            stream_text(openai.as_bytes()).as_deref(),
            Some(&b"card 4111 1111 1111 1111\nhello world"[..])
        );
        // Gemini with two candidates in each chunk (the second without `index`: its place),
        // over SSE and as a JSON array; the chunk's other text goes with the first.
        let chunks = [
            r#"{"candidates":[{"index":0,"content":{"parts":[{"text":"ssn 123-4"}]}},{"content":{"parts":[{"text":"other "}]}}]}"#,
            r#"{"candidates":[{"index":0,"content":{"parts":[{"text":"5-6789"}]}},{"content":{"parts":[{"text":"text"}]}}],"text":"!"}"#,
        ];
        let sse: String = chunks
            .iter()
            .map(|c| format!("data: {c}\r\n\r\n"))
            .collect();
        let array = format!("[{}]", chunks.join(","));
        for body in [sse, array] {
            assert_eq!(
                stream_text(body.as_bytes()).as_deref(),
                Some(&b"ssn 123-45-6789!\nother text"[..]),
                "{body}"
            );
        }
    }

    #[test]
    fn text_documents_in_base64_are_read_and_other_files_are_not() {
        use base64::Engine as _;
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let doc = b64("ssn 123-45-6789");
        let bodies = [
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "document",
                "source": {"type": "base64", "media_type": "text/plain", "data": doc}}]}]}),
            serde_json::json!({"contents": [{"parts": [{"inlineData": {"mimeType": "text/csv", "data": doc}}]}]}),
            serde_json::json!({"contents": [{"parts": [{"inline_data": {"mime_type": "application/json; charset=utf-8", "data": doc}}]}]}),
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "file",
                "file": {"filename": "a.txt", "file_data": format!("data:text/plain;base64,{doc}")}}]}]}),
            serde_json::json!({"messages": [{"role": "user", "content": [{"document":
                {"format": "md", "name": "notes", "source": {"bytes": doc}}}]}]}),
        ];
        for body in &bodies {
            let raw = body.to_string();
            assert!(may_hold_encoded_documents(raw.as_bytes()), "{raw}");
            let mut docs = Vec::new();
            encoded_documents(body, &mut docs);
            assert_eq!(docs, ["ssn 123-45-6789"], "{raw}");
            assert!(
                of_request(raw.as_bytes()).contains("ssn 123-45-6789"),
                "{raw}"
            );
        }
        // Images, PDFs, office files: not text, not read.
        let others = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": doc}},
            {"type": "file", "file": {"file_data": format!("data:application/pdf;base64,{doc}")}},
            {"document": {"format": "pdf", "name": "x", "source": {"bytes": doc}}},
            {"inlineData": {"mimeType": "audio/wav", "data": doc}}]}]});
        let mut docs = Vec::new();
        encoded_documents(&others, &mut docs);
        assert!(docs.is_empty(), "{docs:?}");
        assert!(!may_hold_encoded_documents(b"{\"messages\":[]}"));
    }

    fn sorted_lines(body: &[u8]) -> Vec<String> {
        let mut lines: Vec<String> = of_body(body).lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }

    #[test]
    fn tool_inputs_tool_results_and_documents_are_read_but_not_ids_urls_or_base64() {
        let anthropic = br#"{"model":"claude","max_tokens":9,"messages":[
            {"role":"user","content":[
                {"type":"document","source":{"type":"text","media_type":"text/plain","data":"doc body"},"title":"doc title","context":"doc context"},
                {"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBERi0xLjQK"}},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo"}},
                {"type":"image","source":{"type":"url","url":"https://example.com/a.png"}}]},
            {"role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"lookup","input":{"query":"tool arg","nested":{"list":["deep arg"]},"n":3}}]},
            {"role":"user","content":[
                {"type":"tool_result","tool_use_id":"toolu_01","content":"result string"},
                {"type":"tool_result","tool_use_id":"toolu_02","content":[{"type":"text","text":"result block"}]}]}]}"#;
        assert_eq!(
            sorted_lines(anthropic),
            [
                "deep arg",
                "doc body",
                "doc context",
                "doc title",
                "result block",
                "result string",
                "tool arg"
            ]
        );
        let gemini = br#"{"contents":[
            {"role":"user","parts":[{"text":"question"},{"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo"}},{"fileData":{"fileUri":"gs://b/f"}}]},
            {"role":"model","parts":[{"functionCall":{"id":"call-1","name":"lookup","args":{"city":"call arg"}},"thoughtSignature":"c2ln"},
                {"executableCode":{"language":"PYTHON","code":"print(1)"}},{"codeExecutionResult":{"outcome":"OUTCOME_OK","output":"1"}}]},
            {"role":"user","parts":[{"functionResponse":{"id":"call-1","name":"lookup","response":{"result":{"forecast":"tool said"}}}}]}],
            "systemInstruction":{"parts":[{"text":"system words"}]}}"#;
        assert_eq!(
            sorted_lines(gemini),
            [
                "1",
                "call arg",
                "print(1)",
                "question",
                "system words",
                "tool said"
            ]
        );
        let bedrock = br#"{"system":[{"text":"sys"}],"messages":[
            {"role":"assistant","content":[{"toolUse":{"toolUseId":"tooluse_1","name":"lookup","input":{"q":"converse arg"}}}]},
            {"role":"user","content":[{"toolResult":{"toolUseId":"tooluse_1","status":"success","content":[{"text":"result text"},{"json":{"temp":"json result"}}]}},
                {"image":{"format":"png","source":{"bytes":"iVBORw0KGgo"}}}]}]}"#;
        assert_eq!(
            sorted_lines(bedrock),
            ["converse arg", "json result", "result text", "sys"]
        );
        let openai = br#"{"model":"gpt","messages":[
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":\"chat arg\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"tool message"}]}"#;
        assert_eq!(
            sorted_lines(openai),
            ["tool message", r#"{"a":"chat arg"}"#]
        );
        let responses = br#"{"model":"gpt","instructions":"be brief","input":[
            {"role":"user","content":[{"type":"input_text","text":"responses text"},{"type":"input_image","image_url":"https://x/y.png"},{"type":"input_file","file_data":"JVBERi0="}]},
            {"type":"function_call","call_id":"call_1","name":"f","arguments":"{\"b\":1}"},
            {"type":"function_call_output","call_id":"call_1","output":"function output"}]}"#;
        assert_eq!(
            sorted_lines(responses),
            [
                "be brief",
                "function output",
                "responses text",
                r#"{"b":1}"#
            ]
        );
        // Cohere v2: a tool message's documents.
        let cohere = br#"{"model":"command-r","messages":[{"role":"user","content":"q"},
            {"role":"tool","tool_call_id":"c1","content":[{"type":"document","document":{"id":"d1","data":{"title":"doc data"}}}]}]}"#;
        assert_eq!(sorted_lines(cohere), ["doc data", "q"]);
    }
}
