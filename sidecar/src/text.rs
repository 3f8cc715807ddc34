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
    // Workers AI's and Ollama's `/api/generate` answers (and their stream events); an audio
    // answer's words (`message.audio.transcript`, `delta.audio.transcript`); the reasoning
    // Groq and OpenRouter return as `message.reasoning` / `delta.reasoning`; Cohere v2's
    // `tool_plan`.
    "response",
    "transcript",
    "reasoning",
    "tool_plan",
];

/// Top-level fields of an answer that echo the request rather than answer it: the Responses
/// API's `instructions` and reusable `prompt`, Cohere v1's `chat_history`, Replicate's `input`.
/// The response checks leave them out: a prompt let through must not block its answer.
const ECHOED_KEYS: &[&str] = &["instructions", "prompt", "chat_history", "input"];

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
        // Cohere's documents: `{"type": "document", "document": {"data": {...}}}`, or its
        // `data` as a JSON string (Cohere's own tool-use example sends `json.dumps(result)`).
        (Some("document" | "documents"), "data") if v.is_string() => Field::Text,
        (Some("document" | "documents"), "data") => Field::Data,
        // Cohere v1's tool results (`tool_results[].outputs`) and tool calls' `parameters`.
        (Some("tool_results"), "outputs") | (Some("call" | "tool_calls"), "parameters") => {
            Field::Data
        }
        // The Responses API's reusable prompt: the text its `variables` put into it.
        (Some("prompt"), "variables") => Field::Data,
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
        Value::String(s) if key.is_some_and(|k| TEXT_KEYS.contains(&k)) => push_text(s, out),
        Value::Array(items) => items.iter().for_each(|i| walk(i, key, out)),
        Value::Object(map) => {
            for (k, child) in map {
                walk_field(key, map, k, child, out);
            }
        }
        _ => {}
    }
}

/// The text of the field `k` (`child`) of the object `map`, itself under `parent`.
fn walk_field(
    parent: Option<&str>,
    map: &Map<String, Value>,
    k: &str,
    child: &Value,
    out: &mut Vec<String>,
) {
    match field(parent, map, k, child) {
        Field::Data => all_strings(child, out),
        Field::Text => {
            if let Value::String(s) = child {
                push_text(s, out);
            }
        }
        Field::Walk => walk(child, Some(k), out),
    }
}

/// Every string value of `v` that is text, for a body of a shape [`TEXT_KEYS`] does not know:
/// not data URLs nor base64 (images, audio, embeddings as base64).
fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if is_encoded_data(s) => {}
        Value::String(s) => push_text(s, out),
        Value::Array(items) => items.iter().for_each(|i| all_strings(i, out)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, out)),
        _ => {}
    }
}

/// The text of an answer's JSON document: as [`walk`] (every string of it when it has no text
/// field), less the fields that echo the request ([`ECHOED_KEYS`]).
fn answer_text(v: &Value, out: &mut Vec<String>) {
    let before = out.len();
    let Value::Object(map) = v else {
        walk(v, None, out);
        if out.len() == before {
            all_strings(v, out);
        }
        return;
    };
    let answered = || {
        map.iter()
            .filter(|(k, _)| !ECHOED_KEYS.contains(&k.as_str()))
    };
    for (k, child) in answered() {
        walk_field(None, map, k, child, out);
    }
    if out.len() == before {
        answered().for_each(|(_, child)| all_strings(child, out));
    }
}

/// Pushes the text string `s`; one that holds a JSON document (a tool's result or arguments
/// sent as `json.dumps(...)`, which escapes every character past ASCII as `\uXXXX`) as the
/// text the model reads ([`json_in_string`]).
fn push_text(s: &str, out: &mut Vec<String>) {
    out.push(json_in_string(s).unwrap_or_else(|| s.to_owned()));
}

/// The text of a JSON document (an object, an array, a string) inside a string, its `\uXXXX`
/// escapes decoded ([`crate::dlp::unescape_json`]: no tree is made of it, however large);
/// `None` when `s` is no such document or has no such escape (read as it is).
fn json_in_string(s: &str) -> Option<String> {
    if !matches!(s.trim_start().as_bytes().first(), Some(b'{' | b'[' | b'"')) || !s.contains("\\u")
    {
        return None;
    }
    Some(String::from_utf8_lossy(&crate::dlp::unescape_json(s.as_bytes())).into_owned())
}

/// The text of a stream's events, kept apart per choice: with `n` > 1 the deltas of OpenAI's
/// `choices[]` and Gemini's `candidates[]` interleave, and each choice's text is joined on its
/// own (by its `index`, else its place in the array). Other text goes with the first choice.
///
/// Each text is read once, as in the answer unstreamed: a Responses API stream repeats its
/// text (deltas, `.done` events, `response.output_item.done`, `response.completed`), and the
/// wholest copy it gave is read ([`ResponsesText`]). Cohere v1's `stream-end` holds the whole
/// answer, read in place of its deltas.
#[derive(Default)]
struct Lanes {
    lanes: std::collections::BTreeMap<u64, Vec<String>>,
    /// The text of a Responses API stream.
    responses: ResponsesText,
    /// Every string of each event is read (a stream none of whose events has a text field).
    every_string: bool,
    /// An event of a known shape was read (choices, candidates, a Responses API or Cohere v1
    /// event, Anthropic's or Cohere v2's start), whether or not it had text: the stream is not
    /// read for every string.
    known: bool,
}

impl Lanes {
    fn every_string() -> Self {
        Self {
            every_string: true,
            ..Self::default()
        }
    }

    fn event(&mut self, mut v: Value) {
        if self.every_string {
            all_strings(&v, self.lanes.entry(0).or_default());
            return;
        }
        let kind = v.get("type").and_then(Value::as_str);
        if let Some(kind) = kind.and_then(|k| k.strip_prefix("response.")) {
            self.known = true;
            self.responses_event(kind, &v);
            return;
        }
        // Anthropic's and Cohere v2's streams start so.
        self.known |= matches!(kind, Some("message_start" | "message-start"));
        if v.get("event_type").and_then(Value::as_str) == Some("stream-end") {
            self.known = true;
            if let Some(answer) = v.get("response") {
                self.lanes.clear();
                answer_text(answer, self.lanes.entry(0).or_default());
            }
            return;
        }
        if let Value::Object(map) = &mut v {
            for key in ["choices", "candidates"] {
                let Some(Value::Array(items)) = map.remove(key) else {
                    continue;
                };
                self.known = true;
                for (place, item) in items.iter().enumerate() {
                    let index = item.get("index").and_then(Value::as_u64);
                    let lane = self.lanes.entry(index.unwrap_or(place as u64)).or_default();
                    walk(item, Some(key), lane);
                }
            }
        }
        walk(&v, None, self.lanes.entry(0).or_default());
    }

    /// An event of a Responses API stream, of type `response.{kind}`.
    fn responses_event(&mut self, kind: &str, v: &Value) {
        let r = &mut self.responses;
        let index = v.get("output_index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            // The response as it ended, the request it echoes left out.
            "completed" | "incomplete" | "failed" => {
                let mut output = Vec::new();
                if let Some(items) = v.get("response").and_then(|r| r.get("output")) {
                    walk(items, Some("output"), &mut output);
                }
                if output.iter().any(|t| !t.is_empty()) {
                    r.items.clear();
                    r.completed = Some(output);
                }
            }
            "output_item.done" => {
                let mut text = Vec::new();
                if let Some(item) = v.get("item") {
                    walk(item, None, &mut text);
                }
                r.items.insert(index, ItemText::Whole(text));
            }
            // The text of a content part or summary part again, as its `.done` event gave it.
            k if k.ends_with("part.done") => {}
            // Base64 audio.
            "audio.delta" => {}
            k if k.ends_with(".done") || k.ends_with(".delta") => {
                let done = k.ends_with(".done");
                match r
                    .items
                    .entry(index)
                    .or_insert_with(|| ItemText::Deltas(Vec::new(), Vec::new()))
                {
                    ItemText::Deltas(deltas, dones) => {
                        walk(v, None, if done { dones } else { deltas })
                    }
                    ItemText::Whole(_) => {}
                }
            }
            // `created`, `in_progress`: the request echoed; `.added`: nothing yet.
            _ => {}
        }
    }

    /// Ends the texts read so far: what comes next is not joined to them (a match never spans
    /// the two).
    fn end_text(&mut self) {
        for parts in self.lanes.values_mut() {
            if parts
                .last()
                .is_some_and(|p| !p.is_empty() && !p.ends_with('\n'))
            {
                parts.push("\n".to_owned());
            }
        }
    }

    /// Whether the stream is of a known shape: an event of one was read, or a text field.
    fn read_any(&self) -> bool {
        self.known || self.lanes.values().any(|parts| !parts.is_empty())
    }

    /// Each choice's fragments joined, the choices one per line (a match never spans two).
    fn joined(self) -> Vec<u8> {
        let lanes: Vec<String> = (self.lanes.into_values())
            .map(|parts| parts.concat())
            .chain(self.responses.texts())
            .filter(|text| !text.is_empty())
            .collect();
        lanes.join("\n").into_bytes()
    }
}

/// The text of a Responses API stream, each in its wholest copy: the output of the response
/// it ended with (`response.completed`, `.incomplete`, `.failed`), else each output item's
/// (by `output_index`) as `response.output_item.done` gave it, else as its `.done` events gave
/// it, else its deltas joined.
#[derive(Default)]
struct ResponsesText {
    completed: Option<Vec<String>>,
    items: std::collections::BTreeMap<u64, ItemText>,
}

/// The text of one output item of a Responses API stream.
enum ItemText {
    /// Its deltas, and the texts of its `.done` events.
    Deltas(Vec<String>, Vec<String>),
    /// The item, done.
    Whole(Vec<String>),
}

impl ResponsesText {
    fn texts(self) -> Vec<String> {
        if let Some(output) = self.completed {
            return vec![output.join("\n")];
        }
        (self.items.into_values())
            .map(|item| match item {
                ItemText::Whole(parts) => parts.join("\n"),
                ItemText::Deltas(_, dones) if !dones.is_empty() => dones.join("\n"),
                ItemText::Deltas(deltas, _) => deltas.concat(),
            })
            .collect()
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

/// For a stream body (SSE, an AWS event stream, a JSON array of chunks, JSON lines): the text
/// of all its events joined in order, without separators (deltas are fragments of one text),
/// each choice on its own (see [`Lanes`]); every string of its events when none has a text
/// field. `None` for other bodies. Bytes that are no UTF-8 are read replaced (as the SSE
/// parser reads them): one such byte does not hide the stream's text.
pub fn stream_text(body: &[u8]) -> Option<Vec<u8>> {
    let kind = stream_kind(body);
    // (An event stream's framing is binary: its payloads are parsed one by one.)
    let replaced;
    let body = if matches!(kind, StreamKind::JsonArray | StreamKind::JsonLines) {
        replaced = String::from_utf8_lossy(body);
        replaced.as_bytes()
    } else {
        body
    };
    if kind == StreamKind::JsonArray {
        return json_array_text(body);
    }
    let lanes = read_stream(kind, body, Lanes::default())?;
    if lanes.read_any() {
        return Some(lanes.joined());
    }
    read_stream(kind, body, Lanes::every_string()).map(Lanes::joined)
}

/// How a body may be a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// An AWS event stream.
    EventStream,
    /// Server-sent events.
    Sse,
    /// A JSON array (Gemini's stream without `alt=sse`), or a document.
    JsonArray,
    /// JSON lines, or a document.
    JsonLines,
}

fn stream_kind(body: &[u8]) -> StreamKind {
    if is_event_stream(body) {
        return StreamKind::EventStream;
    }
    // An SSE body starts with a field (after a byte order mark, and blank lines) or a comment.
    let first = without_bom(body);
    let first = &first[first
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(first.len())..];
    if [&b"data:"[..], b"event:", b"id:", b"retry:", b":"]
        .iter()
        .any(|field| first.starts_with(field))
    {
        return StreamKind::Sse;
    }
    if body.trim_ascii_start().starts_with(b"[") {
        return StreamKind::JsonArray;
    }
    StreamKind::JsonLines
}

/// The events of a stream of `kind` read into `lanes`; `None` when it is no stream.
fn read_stream(kind: StreamKind, body: &[u8], lanes: Lanes) -> Option<Lanes> {
    match kind {
        StreamKind::EventStream => Some(event_stream_text(body, lanes)),
        StreamKind::Sse => Some(sse_text(body, lanes)),
        StreamKind::JsonLines => json_lines_text(body, lanes),
        StreamKind::JsonArray => None,
    }
}

/// The text of a stream of JSON lines (Ollama's native API, Cohere's v1 streams): two or more
/// lines, each a JSON object; `None` for anything else (a document over several lines). A
/// line that is no stream's chunk (a record of a batch's results: OpenAI's, Anthropic's) is a
/// text of its own: its text is not joined to the next line's ([`is_stream_chunk`]).
fn json_lines_text(body: &[u8], mut lanes: Lanes) -> Option<Lanes> {
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty());
    let first = lines.next()?;
    if !first.starts_with(b"{") {
        return None;
    }
    let mut count = 0;
    let mut after_record = false;
    for line in std::iter::once(first).chain(lines) {
        let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(line) else {
            return None;
        };
        let record = !is_stream_chunk(&v);
        if record || after_record {
            lanes.end_text();
        }
        after_record = record;
        lanes.event(v);
        count += 1;
    }
    (count >= 2).then_some(lanes)
}

/// Whether a JSON line is a chunk of a stream, whose text goes on in the next line: Ollama's
/// (`done`) and Cohere v1's (`is_finished`).
fn is_stream_chunk(v: &Value) -> bool {
    v.get("done").is_some() || v.get("is_finished").is_some()
}

/// The text of an SSE body's events (each one's `data:` lines joined, whatever its line ends:
/// a JSON document split over lines is read whole).
fn sse_text(body: &[u8], mut lanes: Lanes) -> Lanes {
    let mut parser = crate::compat::sse::SseParser::new();
    let mut read = |e: crate::compat::sse::Event<'_>| {
        if let Ok(v) = serde_json::from_str::<Value>(e.data) {
            lanes.event(v);
        }
    };
    parser.feed(body, &mut read);
    parser.finish(&mut read);
    lanes
}

/// Whether `body` starts with an AWS event-stream message prelude: its checksum (over the two
/// lengths) holds, which text or JSON does by chance once in 2^32.
fn is_event_stream(body: &[u8]) -> bool {
    body.len() >= 16
        && crc32fast::hash(&body[..8]) == u32::from_be_bytes([body[8], body[9], body[10], body[11]])
}

/// The text of an AWS event stream's JSON payloads; an InvokeModelWithResponseStream `chunk`
/// is read in the model's own event its `bytes` hold. Up to where the framing breaks.
fn event_stream_text(body: &[u8], mut lanes: Lanes) -> Lanes {
    let mut decoder = crate::compat::eventstream::Decoder::new();
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
    lanes
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

/// A `multipart/form-data` request body the checks cannot read: refused where they must read
/// it, as a compressed body is, rather than read as one blob whose binary file (a NUL byte)
/// would hide its text fields, or read in part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsplitForm {
    /// No `boundary` parameter, or no delimiter line of any it gives.
    NoDelimiter,
    /// More parts than [`crate::multipart::MAX_PARTS`].
    TooManyParts,
    /// Its splits give more to read than [`READ_FACTOR`] times its size (parts that overlap).
    Tangled,
}

impl From<UnsplitForm> for crate::error::GatewayError {
    fn from(e: UnsplitForm) -> Self {
        Self::BadBody(match e {
            UnsplitForm::NoDelimiter => "it is declared multipart/form-data but the gateway cannot split it into its parts (no boundary parameter, or no delimiter line of it in the body), and the gateway's request checks (DLP, guardrails) must read its fields; send a well-formed form".into(),
            UnsplitForm::TooManyParts => format!(
                "the multipart/form-data body has more than {} parts, more than the gateway's request checks (DLP, guardrails) read; send fewer parts",
                crate::multipart::MAX_PARTS
            ),
            UnsplitForm::Tangled => format!(
                "the multipart/form-data body splits into overlapping parts (its boundaries nest) that hold more than {READ_FACTOR} times its size to read, more than the gateway's request checks (DLP, guardrails) read; send a form with one boundary"
            ),
        })
    }
}

/// The most the checks read of a form, as a multiple of its size: the bytes of every part
/// they look at (each split may give other parts) plus the copies they decode
/// (`quoted-printable`, `base64`, UTF-16). A form sent as servers send it reads about once, its
/// encoded parts twice; past this it is refused ([`UnsplitForm::Tangled`]).
pub const READ_FACTOR: usize = 3;

/// Form fields that carry an API's parameters, never prompt text (OpenAI's audio, image, file,
/// upload and video forms): the prompt guardrails leave them out ([`of_prompt`]), DLP reads
/// them (a model name holds no address, and an unknown field is read whatever it is called).
const PARAMETER_FIELDS: &[&str] = &[
    "model",
    "response_format",
    "temperature",
    "language",
    "timestamp_granularities",
    "timestamp_granularities[]",
    "include",
    "include[]",
    "stream",
    "chunking_strategy",
    "n",
    "size",
    "quality",
    "background",
    "input_fidelity",
    "output_compression",
    "output_format",
    "partial_images",
    "moderation",
    "style",
    "user",
    "purpose",
    "expires_after[anchor]",
    "expires_after[seconds]",
    "seconds",
];

/// A piece of a request the checks read: its text, and whether it is a form field that
/// carries an API parameter ([`PARAMETER_FIELDS`]).
struct Piece<'a> {
    text: Cow<'a, [u8]>,
    parameter: bool,
}

/// The pieces of a request body the checks (DLP, prompt guardrails) read as text: a form's
/// (`multipart/form-data`) parts one by one, else the whole body; what is not text is left out.
/// `Err` for a form the gateway cannot split ([`UnsplitForm`]).
///
/// Which bytes are text ([`read_as_text`]): anything the request declares as text; anything
/// that starts as JSON (the documents it starts with); anything that looks like text. Text is
/// read as it is, bytes that are no UTF-8 included (replaced where it must be parsed): one
/// invalid byte would otherwise hide a whole part or body from the checks, while a provider
/// may well read it, replacing the byte (Go's and JavaScript's JSON readers do).
///
/// - A whole body is read when its `Content-Type` is text (JSON, `text/*`; see
///   [`is_text_type`]) or it looks like text; else, when it starts as JSON (after blanks and a
///   byte order mark), the JSON documents it starts with (a JSON reader such as Go's
///   `json.Decoder`, gin's `ShouldBindJSON`, reads the document and ignores what follows).
/// - A form is split as the servers behind the APIs split it ([`crate::multipart::read`]):
///   with each boundary its `Content-Type` gives (the first and the last `boundary`, and
///   `boundary*`: [`crate::multipart::boundaries_of`]), by Go's rule for line ends and by
///   Werkzeug's; every part any of these splits gives is read, once for each way the header
///   blocks the splits give its data say it is read (a transfer coding any gives is decoded).
///   One none of them splits is refused ([`UnsplitForm::NoDelimiter`]), and so is one of more than
///   [`crate::multipart::MAX_PARTS`] parts, or whose parts (overlapping, from nested
///   boundaries) hold more than [`READ_FACTOR`] times its size to read and decode. A part
///   sent `quoted-printable` or `base64` (`Content-Transfer-Encoding`) is read both as sent and
///   decoded; a field, also decoded by the form's `charset` when it is UTF-16 or UTF-32 (as
///   Starlette decodes it).
/// - A form's field is always read: servers hand its value to the API as a string, whatever
///   its `Content-Type` says. A part is a field unless every server reads it as a file
///   ([`crate::multipart::Part::is_file`]): Go takes `filename=""` for a field, Starlette a
///   part with `filename*` alone.
/// - A form's file is read when its `Content-Type` is text, one of its names is a text file's
///   (`.txt`, `.jsonl`, `.csv`, code; `filename*` decoded: providers go by the name, and a
///   batch file sent as `application/octet-stream` is still JSONL), it looks like text or it
///   starts as JSON. So a file declared binary and named as one is read only when its bytes
///   are text.
/// - JSON in UTF-16 or UTF-32 is read as its text, decoded ([`wide_json`]).
pub fn request_pieces<'a>(
    content_type: Option<&[u8]>,
    body: &'a [u8],
) -> Result<Vec<Cow<'a, [u8]>>, UnsplitForm> {
    Ok(read_request(content_type, body)?
        .into_iter()
        .map(|p| p.text)
        .collect())
}

fn read_request<'a>(
    content_type: Option<&[u8]>,
    body: &'a [u8],
) -> Result<Vec<Piece<'a>>, UnsplitForm> {
    let Some(content_type) = content_type.filter(|ct| crate::multipart::is_form(ct)) else {
        return Ok(read_as_text(declares_text(content_type), body)
            .map(|text| Piece {
                text,
                parameter: false,
            })
            .into_iter()
            .collect());
    };
    if body.trim_ascii().is_empty() {
        return Ok(Vec::new());
    }
    use crate::multipart::LineEnds;
    let mut forms = Vec::new();
    for boundary in crate::multipart::boundaries_of(content_type) {
        for ends in [LineEnds::First, LineEnds::Any] {
            forms.extend(crate::multipart::read(body, &boundary, ends));
        }
    }
    if forms.is_empty() {
        return Err(UnsplitForm::NoDelimiter);
    }
    if forms.iter().any(|f| f.overfull) {
        return Err(UnsplitForm::TooManyParts);
    }
    // The fields' charset, when it is UTF-16 or UTF-32: Starlette decodes them by it.
    let wide: Vec<(Wide, bool)> = crate::multipart::charsets_of(content_type)
        .iter()
        .filter_map(|c| wide_charset(c))
        .collect();
    // What is looked at and decoded, bounded by the body's size (see [`READ_FACTOR`]).
    let limit = READ_FACTOR
        .saturating_mul(body.len())
        .saturating_add(64 * 1024);
    let mut read = 0usize;
    let mut take = |n: usize| {
        read = read.saturating_add(n);
        if read > limit {
            Err(UnsplitForm::Tangled)
        } else {
            Ok(())
        }
    };
    // Each part once, however many splits give it, by where its data lies in the body and
    // what its header block says of how it is read (file or field, declared text, a
    // parameter, its transfer coding): two splits may give the same data different header
    // blocks (nested boundaries), and a server reads it by either. The splits are at most six
    // (three boundaries, two rules for line ends), each of whose parts lie in order: a part
    // another split gave too is most often the one that split's part at the same place.
    let mut seen = std::collections::HashSet::new();
    let mut pieces = Vec::new();
    for part in forms.iter().flat_map(|f| &f.parts) {
        let file = part.is_file();
        let declared = !file
            || part.content_types().any(|t| declares_text(Some(t)))
            || part.file_names().iter().any(|n| is_text_file_name(n));
        // A parameter by every name a server may read it by.
        let names = part.field_names();
        let parameter = !file
            && !names.is_empty()
            && names
                .iter()
                .all(|n| PARAMETER_FIELDS.iter().any(|p| p.as_bytes() == &**n));
        let coding = part.transfer_coding();
        let read_as = (file, declared, parameter, coding);
        if !seen.insert((part.data.as_ptr() as usize, part.data.len(), read_as)) {
            continue;
        }
        take(part.data.len())?;
        let raw = read_as_text(declared, part.data);
        if let Some(Cow::Owned(text)) = &raw {
            take(text.len())?;
        }
        pieces.extend(raw.map(|text| Piece { text, parameter }));
        if coding.is_some() {
            // No decoded copy is longer than the data.
            take(part.data.len())?;
            if let Some(decoded) = part.transfer_decoded()
                && let Some(text) = read_as_text(declared, &decoded)
            {
                if let Cow::Owned(text) = &text {
                    // Decoded again (UTF-16 JSON) or cut (the JSON it starts with).
                    take(text.len())?;
                }
                pieces.push(Piece {
                    text: Cow::Owned(text.into_owned()),
                    parameter,
                });
            }
        }
        if !file {
            for &(w, generic) in &wide {
                let (w, skip) = match wide_encoding(part.data) {
                    // `utf-16` and `utf-32` go by a byte order mark.
                    Some(bom @ (_, 2 | 4)) if generic && bom.0.same_width(w) => bom,
                    _ => (w, 0),
                };
                let text = decode_wide(&part.data[skip..], w);
                take(text.len())?;
                pieces.push(Piece {
                    text: Cow::Owned(text.into_bytes()),
                    parameter,
                });
            }
        }
    }
    Ok(pieces)
}

/// `data` as the checks read it, if they do: UTF-16 or UTF-32 JSON decoded ([`wide_json`]);
/// all of it when it is `declared` text or looks like text ([`looks_like_text`]), else the
/// JSON documents it starts with, if it starts as JSON ([`leading_json`]).
fn read_as_text(declared: bool, data: &[u8]) -> Option<Cow<'_, [u8]>> {
    let text = match wide_json(data) {
        Some(decoded) => Cow::Owned(decoded.into_bytes()),
        None => Cow::Borrowed(data),
    };
    if declared || looks_like_text(&text) {
        return Some(text);
    }
    leading_json(&text).map(Cow::Owned)
}

/// Largest share of bytes (in 1/100) that are no text (invalid UTF-8, control characters)
/// in data that still looks like text.
const MAX_NON_TEXT_PERCENT: usize = 30;

/// Whether data neither declared nor named text looks like text: no NUL byte and at most
/// [`MAX_NON_TEXT_PERCENT`] of its bytes in sequences that are no UTF-8 or control characters
/// other than tab, line feed, form feed and carriage return.
///
/// Every image, audio, video, PDF, archive or compressed file of more than a few bytes holds a
/// NUL (their headers' and lengths' zero bytes; random bytes, one in 256). Random bytes without
/// one are about half non-text (41 % invalid UTF-8, 11 % control characters) and, read, make
/// false matches (an `x@y.io` in one upload of 3 MB in ten). Text is far below the limit: UTF-8
/// has none, a Latin-1 or Windows-1252 file with accents on every word under 20 %. What is over
/// it is text in a legacy single-byte script (Cyrillic, Greek in Windows-125x: 75 %) sent as
/// a binary file under a binary name, or text padded with junk bytes; neither is what a
/// provider reads as text from a file its client calls binary (a client that sends text says
/// so, by its type or its name, and it is then read however it is written), and a client
/// that means to hide text from the checks can as well encrypt it: DLP reads what providers
/// read, it does not stop a deliberate encoding.
fn looks_like_text(data: &[u8]) -> bool {
    if memchr::memchr(0, data).is_some() {
        return false;
    }
    let mut non_text = 0;
    for chunk in data.utf8_chunks() {
        non_text += chunk.invalid().len();
        non_text += chunk
            .valid()
            .bytes()
            .filter(|b| b.is_ascii_control() && !matches!(b, b'\t' | b'\n' | b'\x0c' | b'\r'))
            .count();
    }
    non_text * 100 <= data.len() * MAX_NON_TEXT_PERCENT
}

/// Data with a UTF-8 byte order mark left out (Python's `json` and Node's body-parser read a
/// JSON body after one).
pub fn without_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix("\u{feff}".as_bytes()).unwrap_or(data)
}

/// Whether data starts like a JSON document (an object or an array), after blanks and a byte
/// order mark.
pub fn starts_like_json(data: &[u8]) -> bool {
    matches!(
        without_bom(data).trim_ascii_start().first(),
        Some(b'{' | b'[')
    )
}

/// The values of the top-level keys `names` of the JSON object `body` (each `None` when absent),
/// read as the providers' JSON parsers read them: escapes decoded, the last value of a key
/// given twice; the other keys' values are skipped, not built. `None` when `body` is not a JSON
/// object.
pub fn top_level_values<const N: usize>(
    body: &[u8],
    names: [&str; N],
) -> Option<[Option<Value>; N]> {
    use serde::de::DeserializeSeed;
    let mut d = serde_json::Deserializer::from_slice(body);
    let values = TopLevel(&names).deserialize(&mut d).ok()?;
    d.end().ok()?;
    Some(values)
}

/// Reads the top-level keys it names ([`top_level_values`]).
struct TopLevel<'n, const N: usize>(&'n [&'n str; N]);

impl<'de, const N: usize> serde::de::DeserializeSeed<'de> for TopLevel<'_, N> {
    type Value = [Option<Value>; N];

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, const N: usize> serde::de::Visitor<'de> for TopLevel<'_, N> {
    type Value = [Option<Value>; N];

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    // Key by key, so a key given again replaces what the first said.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = std::array::from_fn(|_| None);
        while let Some(named) = map.next_key_seed(KeyIndex(self.0))? {
            match named {
                Some(i) => found[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// A key's place among the names looked for, compared as read (without a copy of its own).
struct KeyIndex<'n>(&'n [&'n str]);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// The JSON documents `data` starts with (one, or several in a row: JSON lines), as a JSON
/// reader takes them whatever follows (a NUL byte after the document), bytes that are no UTF-8
/// replaced; `None` when it does not start with one.
fn leading_json(data: &[u8]) -> Option<Vec<u8>> {
    if !starts_like_json(data) {
        return None;
    }
    let text = String::from_utf8_lossy(without_bom(data));
    let mut stream = serde_json::Deserializer::from_str(&text).into_iter::<serde::de::IgnoredAny>();
    // (Skipped values are parsed without a depth limit: a deep document is read too.)
    let mut end = 0;
    while let Some(Ok(_)) = stream.next() {
        end = stream.byte_offset();
    }
    (end > 0).then(|| text.as_bytes()[..end].to_vec())
}

/// A JSON document in UTF-16 or UTF-32 (with a byte order mark, or without one: its first
/// character, `{`, `[` or a space, tells the encoding by its zero bytes, as RFC 4627 has it),
/// decoded into UTF-8, units that are no character replaced. JSON readers that follow RFC 4627
/// (Python's `json`, and so the servers built on it) read such a body: the checks must read
/// its text too, not bytes interleaved with NULs that no pattern matches.
fn wide_json(data: &[u8]) -> Option<String> {
    let (wide, skip) = wide_encoding(data)?;
    Some(decode_wide(&data[skip..], wide))
}

/// `data` in UTF-16 or UTF-32 decoded into UTF-8, units that are no character replaced.
fn decode_wide(data: &[u8], wide: Wide) -> String {
    match wide {
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
    }
}

/// The encoding a form's `charset` parameter names, when it is UTF-16 or UTF-32, as Python
/// (Starlette's `bytes.decode`) looks a codec up: its name normalised (ASCII letters
/// lowercased, each run of other bytes but `.` one `_`, none at either end: `utf/16/le`,
/// `UTF+16+LE` are `utf_16_le`), then by Python's aliases (`encodings.aliases`:
/// `UnicodeLittleUnmarked`, `u16`, `utf_16le`, ...; with `.` taken for `_` when none matches
/// as given), else by the codec module's own name. `utf-16` and `utf-32` are read by their
/// byte order mark, else little-endian, as Python on the servers' processors reads them: the
/// second value says whether it is one of these.
fn wide_charset(name: &[u8]) -> Option<(Wide, bool)> {
    let mut norm = String::with_capacity(name.len());
    let mut punct = false;
    for &b in name {
        if b.is_ascii_alphanumeric() || b == b'.' {
            if punct && !norm.is_empty() {
                norm.push('_');
            }
            norm.push(char::from(b.to_ascii_lowercase()));
            punct = false;
        } else {
            punct = true;
        }
    }
    let alias = |n: &str| {
        Some(match n {
            "u16" | "utf16" => "utf_16",
            "unicodebigunmarked" | "utf_16be" => "utf_16_be",
            "unicodelittleunmarked" | "utf_16le" => "utf_16_le",
            "u32" | "utf32" => "utf_32",
            "utf_32be" => "utf_32_be",
            "utf_32le" => "utf_32_le",
            _ => return None,
        })
    };
    let module = match alias(&norm).or_else(|| alias(&norm.replace('.', "_"))) {
        Some(m) => m,
        // A module name with a `.` is never looked up.
        None if norm.contains('.') => return None,
        None => &norm,
    };
    Some(match module {
        "utf_16" => (Wide::Utf16 { big: false }, true),
        "utf_16_le" => (Wide::Utf16 { big: false }, false),
        "utf_16_be" => (Wide::Utf16 { big: true }, false),
        "utf_32" => (Wide::Utf32 { big: false }, true),
        "utf_32_le" => (Wide::Utf32 { big: false }, false),
        "utf_32_be" => (Wide::Utf32 { big: true }, false),
        _ => return None,
    })
}

/// Whether a request body is JSON in UTF-16 or UTF-32 ([`wide_json`]), which the checks parse
/// once decoded (room for its tree is taken as for any JSON document).
pub fn is_wide_json(body: &[u8]) -> bool {
    wide_encoding(body).is_some()
}

#[derive(Debug, Clone, Copy)]
enum Wide {
    Utf16 { big: bool },
    Utf32 { big: bool },
}

impl Wide {
    fn same_width(self, other: Self) -> bool {
        matches!(
            (self, other),
            (Self::Utf16 { .. }, Self::Utf16 { .. }) | (Self::Utf32 { .. }, Self::Utf32 { .. })
        )
    }
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
    let decode = |data: &str, out: &mut Vec<String>| {
        if let Some(bytes) = decode_base64(data.as_bytes()) {
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

/// Base64 as servers decode it: the standard or the URL-safe alphabet (proto3 JSON, so
/// Gemini, takes either for bytes; the two mixed too), with or without padding, whitespace
/// and line breaks ignored, non-zero spare bits in the last character allowed (Python's and
/// Go's default decoders take them); `None` when it is no base64.
pub fn decode_base64(data: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let standard: Vec<u8> = data
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|&b| match b {
            b'-' => b'+',
            b'_' => b'/',
            b => b,
        })
        .collect();
    let end = standard.len() - standard.iter().rev().take_while(|&&b| b == b'=').count();
    LENIENT.decode(&standard[..end]).ok()
}

/// The text of the documents a request body or form part sends in base64 with a text media
/// type ([`encoded_documents`]): of the JSON document it is (after a byte order mark), else of
/// each of its lines that is one (a batch file's JSONL), bytes that are no UTF-8 replaced as
/// a lenient reader upstream would. Empty when it holds none.
pub fn encoded_documents_in(data: &[u8]) -> Vec<String> {
    let mut docs = Vec::new();
    if !may_hold_encoded_documents(data) {
        return docs;
    }
    let text = String::from_utf8_lossy(without_bom(data));
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => encoded_documents(&v, &mut docs),
        Err(_) => {
            for line in text.lines() {
                if may_hold_encoded_documents(line.as_bytes())
                    && let Ok(v) = serde_json::from_str::<Value>(line)
                {
                    encoded_documents(&v, &mut docs);
                }
            }
        }
    }
    docs
}

/// The text of a request the prompt guardrails read: that of each piece [`request_pieces`]
/// gives, bytes that are no UTF-8 replaced. A whole body is read as [`of_request`]; a form's
/// parts (a JSONL file, a prompt field) as text, their JSON string escapes undone (no JSON tree
/// is made of an uploaded file) and their text documents in base64 decoded, less the fields
/// that carry an API's parameters ([`PARAMETER_FIELDS`]: a model name, a response format),
/// which are no prompt: a form without prompt text asks the moderation service nothing. A
/// field of any other name is read. `Err` for a form the gateway cannot split.
pub fn of_prompt(content_type: Option<&[u8]>, body: &[u8]) -> Result<String, UnsplitForm> {
    let pieces = read_request(content_type, body)?;
    if !content_type.is_some_and(crate::multipart::is_form) {
        return Ok(pieces.first().map_or_else(String::new, |p| {
            of_request(String::from_utf8_lossy(&p.text).as_bytes())
        }));
    }
    let mut texts = Vec::new();
    for piece in pieces.iter().filter(|p| !p.parameter) {
        texts.push(String::from_utf8_lossy(&crate::dlp::unescape_json(&piece.text)).into_owned());
        texts.extend(encoded_documents_in(&piece.text));
    }
    texts.retain(|t| !t.trim().is_empty());
    Ok(texts.join("\n"))
}

/// The text of a response body: the joined deltas of a stream, else as [`of_request`] less
/// the fields that echo the request ([`ECHOED_KEYS`]), bytes that are no UTF-8 replaced
/// ([`read_answer`]); none for a binary answer.
pub fn of_body(body: &[u8]) -> String {
    if let Some(t) = stream_text(body) {
        return String::from_utf8_lossy(&t).into_owned();
    }
    if std::str::from_utf8(body).is_ok() {
        return of_document(body, true);
    }
    read_answer(body).map_or_else(String::new, |text| {
        of_document(String::from_utf8_lossy(&text).as_bytes(), true)
    })
}

/// The bytes of an answer the checks read as text: all of it when it looks like text (UTF-8
/// without NUL bytes, or [`looks_like_text`]: one byte that is no UTF-8 does not hide an
/// answer, which a client may well read around it), else the JSON documents it starts with
/// ([`leading_json`]); `None` for a binary answer (speech audio, a file's bytes, an event
/// stream's framing, whose text [`stream_text`] reads).
pub fn read_answer(body: &[u8]) -> Option<Cow<'_, [u8]>> {
    if (memchr::memchr(0, body).is_none() && std::str::from_utf8(body).is_ok())
        || looks_like_text(body)
    {
        return Some(Cow::Borrowed(body));
    }
    leading_json(body).map(Cow::Owned)
}

/// The text of a request body (never a stream: a top-level array is a document too, whose
/// parts are separate texts): the text fields of a JSON document (one per line, in no
/// particular order across fields; every string value when it has none of them, so an API
/// shape not listed is still read) and its text documents in base64
/// ([`encoded_documents`]), or the body itself when it is none.
pub fn of_request(body: &[u8]) -> String {
    of_document(body, false)
}

/// The text of a request body parsed already, `v`, as [`of_request`] reads it (a universal
/// endpoint's step's `query`).
pub fn of_json(v: &Value) -> String {
    let mut parts = Vec::new();
    request_text(v, &mut parts);
    encoded_documents(v, &mut parts);
    parts.join("\n")
}

/// The text fields of a request's JSON document, else every string of it.
fn request_text(v: &Value, out: &mut Vec<String>) {
    walk(v, None, out);
    if out.is_empty() {
        all_strings(v, out);
    }
}

/// [`of_request`], or [`of_body`] for an `answer` that is no stream.
fn of_document(body: &[u8], answer: bool) -> String {
    let body = without_bom(body);
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let mut parts = Vec::new();
            if answer {
                answer_text(&v, &mut parts);
            } else {
                request_text(&v, &mut parts);
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
    fn top_level_values_are_read_as_a_json_parser_reads_them() {
        let read = |body: &[u8]| top_level_values(body, ["a", "b"]);
        assert_eq!(
            read(br#"{"a":1,"x":{"b":2},"\u0062":[3],"a":null}"#),
            Some([Some(Value::Null), Some(serde_json::json!([3]))])
        );
        assert_eq!(read(br#"{"x":"a"}"#), Some([None, None]));
        for not_an_object in [&b"[1]"[..], b"{\"a\":1", b"{\"a\":1} x", b"audio"] {
            assert_eq!(read(not_an_object), None);
        }
    }

    fn pieces<'a>(content_type: Option<&[u8]>, body: &'a [u8]) -> Vec<Cow<'a, [u8]>> {
        request_pieces(content_type, body).expect("a readable request")
    }

    fn prompt(content_type: Option<&[u8]>, body: &[u8]) -> String {
        of_prompt(content_type, body).expect("a readable request")
    }

    #[test]
    fn a_request_is_read_unless_it_is_binary_and_not_declared_text() {
        let json: &[u8] = b"{\"content\":\"hi \xff\"}";
        assert_eq!(pieces(Some(b"application/json"), json), [json]);
        assert_eq!(pieces(None, json), [json]);
        let nul: &[u8] = b"RIFF\x00\x00WAVE";
        assert!(pieces(None, nul).is_empty());
        assert!(pieces(Some(b"audio/wav"), nul).is_empty());
        assert_eq!(pieces(Some(b"Text/Plain; charset=utf-16"), nul), [nul]);
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
        assert_eq!(pieces(ct, form), [&b"whisper-1"[..], &b"a;b\x00\xe9"[..]]);
        // The prompt guardrails leave out a parameter field (the model).
        assert_eq!(prompt(ct, form), "a;b\u{0}\u{fffd}");
        // A whole body's bytes that are no UTF-8 are replaced, its JSON still read.
        assert_eq!(
            prompt(Some(b"application/json"), b"{\"input\":\"say \xffhi\"}"),
            "say \u{fffd}hi"
        );
        assert_eq!(prompt(Some(b"audio/wav"), nul), "");
    }

    #[test]
    fn undeclared_data_is_read_when_it_looks_like_text_or_starts_as_json() {
        assert!(looks_like_text(b"plain text\twith\r\nlines"));
        assert!(looks_like_text("caf\u{e9} na\u{ef}ve".as_bytes()));
        assert!(looks_like_text(b"caf\xe9 r\xe9sum\xe9 na\xefve \xfcber"));
        assert!(!looks_like_text(b"text\x00"));
        // Random bytes without a NUL: about half are no text.
        let mut x: u32 = 12;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8 | 1
            })
            .collect();
        assert!(!looks_like_text(&random));
        assert_eq!(read_as_text(false, &random), None);
        assert!(read_as_text(true, &random).is_some());
        // A JSON document followed by a NUL: the document (and JSON lines: each of them).
        let doc = b"\xef\xbb\xbf {\"content\": \"joe@example.com\"}\n\x00\xff\xfe";
        assert_eq!(
            read_as_text(false, doc).as_deref(),
            Some(&b" {\"content\": \"joe@example.com\"}"[..])
        );
        let lines = b"{\"a\":1}\n{\"b\":\"x\xff\"}\n\x00";
        assert_eq!(
            read_as_text(false, lines).as_deref(),
            Some("{\"a\":1}\n{\"b\":\"x\u{fffd}\"}".as_bytes())
        );
        // Not a document (a NUL inside its string): binary, as JSON readers refuse it.
        assert_eq!(
            read_as_text(false, b"{\"content\":\"joe@example.com\x00\"}"),
            None
        );
        // However deep.
        let deep = format!(
            "{}\"joe@example.com\"{}\0",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(
            read_as_text(false, deep.as_bytes()).as_deref(),
            Some(deep.trim_end_matches('\0').as_bytes())
        );
    }

    #[test]
    fn base64_is_decoded_as_lenient_servers_decode_it() {
        let want = Some(b"mail joe@example.com ~~~ ???".to_vec());
        assert_eq!(
            decode_base64(b"bWFpbCBqb2VAZXhhbXBsZS5jb20gfn5+ID8/Pw=="),
            want
        );
        assert_eq!(
            decode_base64(b"bWFpbCBqb2VAZXhhbXBsZS5jb20gfn5-ID8_Pw"),
            want
        );
        assert_eq!(
            decode_base64(b"bWFpbCBqb2VA\r\nZXhhbXBsZS5jb20gfn5+ID8/Pw="),
            want
        );
        // Non-zero spare bits in the last character.
        assert_eq!(
            decode_base64(b"am9lQGV4YW1wbGUuY29u").as_deref(),
            Some(&b"joe@example.con"[..])
        );
        assert_eq!(
            decode_base64(b"am9lQGV4YW1wbGUuY29t").as_deref(),
            Some(&b"joe@example.com"[..])
        );
        assert_eq!(decode_base64(b"aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_base64(b"aGl=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_base64(b"not base64!"), None);
        // A batch file's JSONL: each line's documents.
        let line = |data: &str| {
            serde_json::json!({"body": {"messages": [{"role": "user", "content": [{"type": "file",
                "file": {"file_data": format!("data:text/plain;base64,{data}")}}]}]}})
            .to_string()
        };
        let jsonl = format!("{}\n{}\n", line("am9lQGV4YW1wbGUuY29t"), line("aGk"));
        assert_eq!(
            encoded_documents_in(jsonl.as_bytes()),
            ["joe@example.com", "hi"]
        );
        let bom = format!("\u{feff}{}", line("aGk"));
        assert_eq!(encoded_documents_in(bom.as_bytes()), ["hi"]);
    }

    #[test]
    fn a_form_is_read_as_any_server_splits_it_or_refused() {
        let ct = |v: &'static str| Some(v.as_bytes());
        let body = b"--b0\nContent-Disposition: form-data; name=\"prompt\"; filename=\"\"\n\
            Content-Type: application/octet-stream\n\njoe@example.com \x00\n\
            --b0\nContent-Disposition: form-data; name=\"model\"\n\nwhisper-1\n\
            --b0\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\n\nRIFF\x00\x01";
        for content_type in [
            "multipart/form-data; boundary=b0",
            "multipart/form-data; boundary=\"b0\"; charset=utf-8",
            "multipart/form-data; boundary=zz; boundary=b0",
        ] {
            assert_eq!(
                pieces(ct(content_type), body),
                [&b"joe@example.com \x00"[..], b"whisper-1"],
                "{content_type}"
            );
            // The guardrails leave the model out.
            assert_eq!(prompt(ct(content_type), body), "joe@example.com \u{0}");
        }
        // Quoted-printable: as sent and decoded.
        let qp = b"--q\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\njoe=40example.com\r\n--q--\r\n";
        assert_eq!(
            pieces(ct("multipart/form-data; boundary=q"), qp),
            [&b"joe=40example.com"[..], b"joe@example.com"]
        );
        // Not split by any boundary given, or none given: refused; an empty form is none.
        for content_type in ["multipart/form-data; boundary=zz", "multipart/form-data"] {
            assert_eq!(
                request_pieces(ct(content_type), body),
                Err(UnsplitForm::NoDelimiter)
            );
            assert_eq!(
                of_prompt(ct(content_type), body),
                Err(UnsplitForm::NoDelimiter)
            );
        }
        assert!(pieces(ct("multipart/form-data; boundary=zz"), b" \r\n").is_empty());
        // A form with only parameter fields and a binary file: no prompt text.
        let upload = b"--b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
            --b0\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n\
            --b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\x00\r\n--b0--\r\n";
        assert_eq!(prompt(ct("multipart/form-data; boundary=b0"), upload), "");
        // A prompt by the name Go reads (`name*` over `name`) is no parameter.
        let renamed = b"--b0\r\nContent-Disposition: form-data; name=\"model\"; name*=UTF-8''prompt\r\n\r\nhi\r\n--b0--\r\n";
        assert_eq!(
            prompt(ct("multipart/form-data; boundary=b0"), renamed),
            "hi"
        );
    }

    #[test]
    fn data_two_splits_give_different_headers_is_read_by_each() {
        // Split by `B1`, the prompt's data has a header block whose first
        // Content-Transfer-Encoding is 8bit; split by `boundary*` (`B1--`, Go's choice), it is
        // quoted-printable.
        let body = b"--B1\r\n\
            Content-Disposition: form-data; name=\"note\"\r\n\
            Content-Transfer-Encoding: 8bit\n\
            --B1--\r\n\
            Content-Disposition: form-data; name=\"prompt\"\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\n\
            spell joe=40example=2Ecom right\r\n\
            --B1----\r\n";
        let ct = b"multipart/form-data; boundary=B1; boundary*=utf-8''B1--";
        let got = pieces(Some(ct), body);
        assert!(
            got.iter().any(|p| &**p == b"spell joe@example.com right"),
            "{got:?}"
        );
    }

    #[test]
    fn a_form_costs_a_bounded_read_or_is_refused() {
        let ct = |v: &str| v.as_bytes().to_vec();
        // Many boundary parameters: the first and the last are read.
        let mut many = "multipart/form-data".to_owned();
        for i in 0..1000 {
            many.push_str(&format!("; boundary=b{i}"));
        }
        let form = |b: &str| {
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi {b}\r\n--{b}--\r\n"
            )
        };
        for b in ["b0", "b999"] {
            let body = form(b);
            assert_eq!(
                pieces(Some(&ct(&many)), body.as_bytes()),
                [format!("hi {b}").as_bytes()]
            );
        }
        assert_eq!(
            request_pieces(Some(&ct(&many)), form("b500").as_bytes()),
            Err(UnsplitForm::NoDelimiter)
        );
        // Nested boundaries whose quoted-printable parts overlap: past 3x the body, refused.
        let mut nested_ct = "multipart/form-data".to_owned();
        let mut nested = Vec::new();
        for i in 0..2 {
            nested_ct.push_str(&format!("; boundary=n{i}"));
            nested.extend_from_slice(
                format!("--n{i}\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n").as_bytes(),
            );
        }
        nested.extend_from_slice(&b"hello world ".repeat(100_000));
        assert_eq!(
            request_pieces(Some(&ct(&nested_ct)), &nested),
            Err(UnsplitForm::Tangled)
        );
        // One such part is read as sent and decoded.
        let one = "multipart/form-data; boundary=n0";
        assert_eq!(pieces(Some(&ct(one)), &nested).len(), 2);
        // More parts than MAX_PARTS: refused; as many: read.
        let parts = |n: usize| {
            let mut b = b"--b\r\n\r\nx\r\n".repeat(n);
            b.extend_from_slice(b"--b--\r\n");
            b
        };
        let max = crate::multipart::MAX_PARTS;
        let ct_b = ct("multipart/form-data; boundary=b");
        assert_eq!(pieces(Some(&ct_b), &parts(max)).len(), max);
        assert_eq!(
            request_pieces(Some(&ct_b), &parts(max + 1)),
            Err(UnsplitForm::TooManyParts)
        );
    }

    #[test]
    fn form_fields_in_a_wide_charset_are_read_decoded() {
        let field = |value: &[u8]| {
            let mut b = b"--b0\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n".to_vec();
            b.extend_from_slice(value);
            b.extend_from_slice(b"\r\n--b0--\r\n");
            b
        };
        let utf16le: Vec<u8> = "joe@example.com"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let utf16be: Vec<u8> = "joe@example.com"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        let utf32le: Vec<u8> = "joe@example.com"
            .chars()
            .flat_map(|c| u32::from(c).to_le_bytes())
            .collect();
        let bom_be = [&[0xfe, 0xff][..], &utf16be].concat();
        for (charset, value) in [
            ("utf-16-le", &utf16le),
            ("UTF_16LE", &utf16le),
            ("utf-16", &utf16le),
            ("utf-16", &bom_be),
            ("utf-16be", &utf16be),
            ("\"utf-32\"", &utf32le),
        ] {
            let content_type = format!("multipart/form-data; charset={charset}; boundary=b0");
            let got = prompt(Some(content_type.as_bytes()), &field(value));
            assert!(got.contains("joe@example.com"), "{charset}: {got:?}");
        }
        // Another charset: read as sent only.
        let body = field(&utf16le);
        let got = pieces(
            Some(b"multipart/form-data; charset=utf-8; boundary=b0"),
            &body,
        );
        assert_eq!(got, [&utf16le[..]]);
    }

    #[test]
    fn a_charset_is_named_as_python_looks_its_codec_up() {
        // As `codecs.lookup(name).name` gives them (Python 3.11).
        let le = Some((false, false));
        for (name, want) in [
            (&b"utf-16-le"[..], le),
            (b"UTF_16LE", le),
            (b"utf/16/le", le),
            (b"utf+16+le", le),
            (b"utf:16:le", le),
            (b"UnicodeLittleUnmarked", le),
            (b"utf.16le", le),
            (b"utf-16\xe9le", le),
            (b"utf-16", Some((false, true))),
            (b"-utf-16-", Some((false, true))),
            (b"u16", Some((false, true))),
            (b"utf\xe916", Some((false, true))),
            (b"utf-16be", Some((true, false))),
            (b"unicodebigunmarked", Some((true, false))),
            (b"utf_16_be", Some((true, false))),
            (b"utf16le", None),
            (b"utf16be", None),
            (b"utf.16", None),
            (b"utf.16.le", None),
            (b"utf..16le", None),
            (b"utf-16-lee", None),
            (b"utf8", None),
        ] {
            let got = wide_charset(name).map(|(w, generic)| match w {
                Wide::Utf16 { big } => (big, generic),
                Wide::Utf32 { .. } => panic!("{name:?}: UTF-32"),
            });
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(name));
        }
        for (name, big, generic) in [
            (&b"UTF 32 BE"[..], true, false),
            (b"U32", false, true),
            (b"utf-32", false, true),
            (b"utf_32le", false, false),
            (b"utf32be", false, false),
        ] {
            let got = wide_charset(name).map(|(w, g)| match w {
                Wide::Utf32 { big } => (big, g),
                Wide::Utf16 { .. } => panic!("{name:?}: UTF-16"),
            });
            let want = (name != b"utf32be").then_some((big, generic));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(name));
        }
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
                pieces(Some(b"application/octet-stream"), &wide),
                [json.as_bytes()]
            );
            assert_eq!(prompt(None, &wide), "joe@example.com");
        }
        // Binaries starting with zero bytes are no JSON: an MP4's box, a WAV's header.
        assert_eq!(wide_json(b"\x00\x00\x00\x18ftypmp42"), None);
        assert_eq!(wide_json(b"RIFF\x24\x00\x00\x00WAVE"), None);
        assert_eq!(wide_json(b"{\"a\": 1}"), None);
    }

    #[test]
    fn chat_bodies_of_every_api_give_their_text() {
        let openai = br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}"#;
        assert_eq!(of_request(openai), "be nice\nhello");
        let anthropic =
            br#"{"system":"sys","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        // Object keys may come in any order: compare the lines as a set.
        let mut lines: Vec<String> = of_request(anthropic).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["hi", "sys"]);
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"ciao"}]}]}"#;
        assert_eq!(of_request(gemini), "ciao");
        assert_eq!(of_request(b"plain words"), "plain words");
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(of_body(sse), "Hello");
        assert_eq!(stream_text(b"{\"content\":\"x\"}"), None);
        let cohere = br#"{"message":"hola","preamble":"be brief"}"#;
        let mut lines: Vec<String> = of_request(cohere).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["be brief", "hola"]);
        // Rerank: the query and the documents.
        let rerank = br#"{"model":"m","query":"what is x","documents":["doc one"]}"#;
        let mut lines: Vec<String> = of_request(rerank).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["doc one", "what is x"]);
        // A shape with none of the known fields: every string is read, but not encoded data.
        let other = format!(
            r#"{{"model":"m","ask":"what is y","b64_json":"{}","url":"data:image/png;base64,iVBO"}}"#,
            "A".repeat(300)
        );
        let mut lines: Vec<String> = of_request(other.as_bytes())
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
    fn a_byte_that_is_no_utf8_does_not_hide_an_answers_text() {
        // Gemini's JSON array, Ollama's lines, an answer: read around the byte, as SSE is.
        let array = b"[{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"caf\xe9 123-4\"}]}}]},\n{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"5-6789\"}]}}]}]";
        assert_eq!(
            stream_text(array).as_deref(),
            Some("caf\u{fffd} 123-45-6789".as_bytes())
        );
        let lines =
            b"{\"response\":\"caf\xc3 mock-fl\",\"done\":false}\n{\"response\":\"ag\",\"done\":true}\n";
        assert_eq!(of_body(lines), "caf\u{fffd} mock-flag");
        let answer = b"{\"choices\":[{\"message\":{\"content\":\"caf\xc3 mock-flag\"}}]}";
        assert_eq!(of_body(answer), "caf\u{fffd} mock-flag");
        assert_eq!(read_answer(answer).as_deref(), Some(&answer[..]));
        // The JSON document an answer starts with, whatever follows it.
        let trailed = b"{\"content\":\"mock-flag\"}\x00\xff";
        assert_eq!(
            read_answer(trailed).as_deref(),
            Some(&b"{\"content\":\"mock-flag\"}"[..])
        );
        assert_eq!(of_body(trailed), "mock-flag");
        // Binary answers (speech audio) are none.
        assert_eq!(read_answer(b"ID3\x04\x00 mock-flag \xff\xfb"), None);
        assert_eq!(of_body(b"ID3\x04\x00 mock-flag \xff\xfb"), "");
        let random: Vec<u8> = (0u32..4096)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
            .collect();
        assert_eq!(read_answer(&random), None);
    }

    #[test]
    fn json_lines_that_are_records_are_read_each_on_its_own() {
        // A batch's results (OpenAI's, Anthropic's): whole answers, one a line, not fragments
        // of one text: a match never spans two.
        let batch = concat!(
            r#"{"custom_id":"a","response":{"body":{"choices":[{"message":{"content":"ends 4111 1111"}}]}}}"#,
            "\n",
            r#"{"custom_id":"b","result":{"message":{"content":[{"type":"text","text":"1111 1111 starts"}]}}}"#,
            "\n",
        );
        assert_eq!(
            stream_text(batch.as_bytes()).as_deref(),
            Some(&b"ends 4111 1111\n1111 1111 starts"[..])
        );
        // Every string of records of no known shape, alike.
        let other = b"{\"k\":\"12-3\"}\n{\"k\":\"4\"}\n";
        assert_eq!(stream_text(other).as_deref(), Some(&b"12-3\n4"[..]));
        // Stream chunks (Ollama's, Cohere v1's) are fragments of one text: joined.
        let cohere = b"{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\"123-4\"}\n{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\"5-6789\"}\n";
        assert_eq!(stream_text(cohere).as_deref(), Some(&b"123-45-6789"[..]));
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
        let mut lines: Vec<String> = of_request(body).lines().map(str::to_owned).collect();
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
    #[test]
    fn answers_of_workers_ai_ollama_audio_and_reasoning_give_their_text() {
        let sse = |events: &[serde_json::Value]| {
            let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            body.push_str("data: [DONE]\n\n");
            body
        };
        // Workers AI's stream, and its answer with a tool call beside its text.
        let workers = sse(&[
            serde_json::json!({"response": "mock-fl", "p": "abc"}),
            serde_json::json!({"response": "ag"}),
        ]);
        assert_eq!(of_body(workers.as_bytes()), "mock-flag");
        let tools = br#"{"result":{"response":"words","tool_calls":[{"name":"f","arguments":{"q":"arg"}}]},"success":true}"#;
        let mut lines: Vec<String> = of_body(tools).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["arg", "words"]);
        // Ollama's /api/generate lines.
        let ollama = b"{\"response\":\"mock-fl\",\"done\":false}\n{\"response\":\"ag\",\"done\":true,\"context\":[1,2]}\n";
        assert_eq!(of_body(ollama), "mock-flag");
        // An audio answer's transcript; Groq's and OpenRouter's reasoning.
        let audio = sse(&[
            serde_json::json!({"choices": [{"index": 0, "delta": {"audio": {"id": "a1", "transcript": "say "}}}]}),
            serde_json::json!({"choices": [{"index": 0, "delta": {"audio": {"id": "a1", "data": "A".repeat(400)}}}]}),
            serde_json::json!({"choices": [{"index": 0, "delta": {"audio": {"transcript": "it"}}}]}),
        ]);
        assert_eq!(of_body(audio.as_bytes()), "say it");
        let reasoning = br#"{"choices":[{"message":{"content":"answer","reasoning":"thought"}}]}"#;
        let mut lines: Vec<String> = of_body(reasoning).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["answer", "thought"]);
        // A stream none of whose events has a text field: every string of them.
        let unknown = sse(&[
            serde_json::json!({"tok": "mock-fl"}),
            serde_json::json!({"tok": "ag"}),
        ]);
        assert_eq!(of_body(unknown.as_bytes()), "mock-flag");
    }

    #[test]
    fn an_answer_is_read_without_what_it_echoes_of_the_request() {
        let responses = br#"{"id":"resp_1","object":"response","instructions":"echoed","prompt":{"id":"p","variables":{"v":"echoed too"}},
            "output":[{"type":"message","content":[{"type":"output_text","text":"the answer"}]}]}"#;
        assert_eq!(of_body(responses), "the answer");
        let cohere =
            br#"{"text":"the answer","chat_history":[{"role":"USER","message":"echoed"}]}"#;
        assert_eq!(of_body(cohere), "the answer");
        let replicate = br#"{"id":"p1","input":{"prompt":"echoed"},"output":"the answer"}"#;
        assert_eq!(of_body(replicate), "the answer");
        // A request's own `instructions` and `input` are its text.
        let mut lines: Vec<String> = of_request(br#"{"instructions":"be brief","input":"q"}"#)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, ["be brief", "q"]);
    }

    #[test]
    fn each_text_of_a_responses_or_cohere_stream_is_read_once() {
        let item = serde_json::json!({"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": "Hello world"}]});
        let call =
            serde_json::json!({"type": "function_call", "id": "fc_1", "arguments": "{\"q\":1}"});
        let events = [
            serde_json::json!({"type": "response.created", "response": {"instructions": "echoed", "output": []}}),
            serde_json::json!({"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "content": []}}),
            serde_json::json!({"type": "response.output_text.delta", "output_index": 0, "delta": "Hello "}),
            serde_json::json!({"type": "response.output_text.delta", "output_index": 0, "delta": "world"}),
            serde_json::json!({"type": "response.output_text.done", "output_index": 0, "text": "Hello world"}),
            serde_json::json!({"type": "response.content_part.done", "output_index": 0, "part": {"type": "output_text", "text": "Hello world"}}),
            serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            serde_json::json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{\"q\":1}"}),
            serde_json::json!({"type": "response.function_call_arguments.done", "output_index": 1, "arguments": "{\"q\":1}"}),
            serde_json::json!({"type": "response.output_item.done", "output_index": 1, "item": call}),
            serde_json::json!({"type": "response.completed", "response": {"instructions": "echoed", "output": [item, call]}}),
        ];
        let body: String = events
            .iter()
            .map(|e| {
                format!(
                    "event: {}\ndata: {e}\n\n",
                    e["type"].as_str().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(of_body(body.as_bytes()), "Hello world\n{\"q\":1}");
        // A stream without deltas nor items done, its response's output empty: its `.done`
        // events (not the `content_part.done` copy).
        let done_only: String = [&events[4], &events[5]]
            .iter()
            .chain(&[&serde_json::json!({"type": "response.completed", "response": {"id": "r", "output": []}})])
            .map(|e| format!("data: {e}\n\n"))
            .collect();
        assert_eq!(of_body(done_only.as_bytes()), "Hello world");
        // Cut short before its items were done: its deltas.
        let cut: String = events[..4]
            .iter()
            .map(|e| format!("data: {e}\n\n"))
            .collect();
        assert_eq!(of_body(cut.as_bytes()), "Hello world");
        // Cohere v1: the `stream-end` answer (less its `chat_history`) in place of the deltas.
        let cohere = concat!(
            "{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\"Hello \"}\n",
            "{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\"world\"}\n",
            "{\"is_finished\":true,\"event_type\":\"stream-end\",\"response\":{\"text\":\"Hello world\",\"chat_history\":[{\"role\":\"USER\",\"message\":\"echoed\"}]}}\n",
        );
        assert_eq!(of_body(cohere.as_bytes()), "Hello world");
    }

    #[test]
    fn json_sent_in_a_string_is_read_as_its_text() {
        let found = r#"{"page": "\u0441\u0442\u0430\u0442\u044c\u044f"}"#;
        let body = serde_json::json!({"messages": [{"role": "tool", "tool_call_id": "t1", "content": found}]});
        assert_eq!(
            of_request(body.to_string().as_bytes()),
            r#"{"page": "статья"}"#
        );
        // A JSON string, a fragment (of a stream), a character past the BMP; plain text as is.
        assert_eq!(json_in_string(r#""\u0441""#).as_deref(), Some(r#""с""#));
        assert_eq!(
            json_in_string(r#"{"q": "\u0441"#).as_deref(),
            Some(r#"{"q": "с"#)
        );
        assert_eq!(
            json_in_string(r#"["\ud83d\ude00"]"#).as_deref(),
            Some(r#"["😀"]"#)
        );
        assert_eq!(json_in_string(r"say \u0441"), None);
        assert_eq!(json_in_string(r#"{"q": "plain"}"#), None);
    }

    #[test]
    fn cohere_tool_results_and_responses_prompt_variables_are_read() {
        let v2 = br#"{"messages":[{"role":"user","content":"q"},{"role":"tool","tool_call_id":"t1",
            "content":[{"type":"document","document":{"data":"{\"headline\": \"news\"}"}}]}]}"#;
        assert!(of_request(v2).contains(r#"{"headline": "news"}"#));
        let v1 = br#"{"message":"","chat_history":[{"role":"USER","message":"q"}],
            "tool_results":[{"call":{"name":"news","parameters":{"topic":"arg"}},"outputs":[{"headline":"news"}]}]}"#;
        let mut lines: Vec<String> = (of_request(v1).lines())
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, ["arg", "news", "q"]);
        let variables = br#"{"input":"write","prompt":{"id":"pmpt_1","version":"2","variables":{"topic":"the topic"}}}"#;
        assert!(of_request(variables).contains("the topic"));
        let plan = br#"{"messages":[{"role":"assistant","tool_plan":"I will search."}]}"#;
        assert_eq!(of_request(plan), "I will search.");
    }
}
