//! AWS Bedrock runtime wire format: `POST /model/{modelId}/converse`, `/converse-stream`
//! (binary `application/vnd.amazon.eventstream` framing with CRCs) and `/invoke` for the
//! Titan and Cohere embedding models.
//!
//! Requests must carry a SigV4 `Authorization` header (`AWS4-HMAC-SHA256 Credential=.../
//! bedrock/aws4_request, SignedHeaders=..., Signature=...`) and `x-amz-date`; otherwise 403
//! as AWS answers. The signature itself is not verified (the mock knows no secret). With a
//! `toolConfig` and a last user turn without `toolResult`, the reply is a `toolUse` of the
//! forced tool, else of the first one.
//!
//! Like Bedrock, Converse refuses (400 `ValidationException`, its words) a message without
//! content blocks, a text block that is blank, and an image whose format is not one of
//! `gif`, `jpeg`, `png`, `webp`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::{Value, json};

use crate::Ctx;
use crate::body::{MockBody, json_ok, json_response, sse_response, write_json};
use crate::openai::embedding_of;
use crate::text;

/// Which Bedrock action a path asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Converse,
    ConverseStream,
    Invoke,
}

impl Action {
    /// The action of a `.../model/{modelId}/{action}` path.
    pub(crate) fn of(path: &str) -> Option<Self> {
        let (before, action) = path.rsplit_once('/')?;
        if !before.contains("/model/") {
            return None;
        }
        match action {
            "converse" => Some(Self::Converse),
            "converse-stream" => Some(Self::ConverseStream),
            "invoke" => Some(Self::Invoke),
            _ => None,
        }
    }
}

/// The percent-decoded model id of the path.
fn model_of(path: &str) -> String {
    let after = path.split_once("/model/").map_or("", |(_, a)| a);
    let id = after.rsplit_once('/').map_or(after, |(id, _)| id);
    let bytes = id.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let (b'%', Some(b)) = (bytes[i], hex) {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the request carries a SigV4 signature for the bedrock service.
fn is_signed(headers: &HeaderMap) -> bool {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    auth.starts_with("AWS4-HMAC-SHA256 Credential=")
        && auth.contains("/bedrock/aws4_request")
        && auth.contains("SignedHeaders=")
        && auth.contains("Signature=")
        && headers.contains_key("x-amz-date")
}

/// `POST .../model/{modelId}/{action}`
pub(crate) fn handle(
    ctx: &Ctx<'_>,
    action: Action,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<MockBody> {
    if !is_signed(headers) {
        let (kind, message) = if headers.contains_key("authorization") {
            (
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        } else {
            (
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            )
        };
        return error(StatusCode::FORBIDDEN, kind, message);
    }
    let model = model_of(path);
    if let Some(status) = text::status_trigger(&model) {
        let kind = match status.as_u16() {
            400 => "ValidationException",
            403 => "AccessDeniedException",
            404 => "ResourceNotFoundException",
            429 => "ThrottlingException",
            503 => "ServiceUnavailableException",
            _ => "InternalServerException",
        };
        let message = format!(
            "mock error: status {} requested by model {model}",
            status.as_u16()
        );
        return error(status, kind, &message);
    }
    let req: Value = match text::parse_object(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "ValidationException", &e),
    };
    match action {
        Action::Invoke => invoke(&model, &req),
        Action::Converse | Action::ConverseStream => converse(ctx, action, &req),
    }
}

fn content_text(content: Option<&Value>) -> String {
    content
        .and_then(Value::as_array)
        .map(|bs| {
            bs.iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Why Bedrock would refuse the messages' content blocks, in its words: none at all, blank
/// text (the message names the block; AWS's enum message counts from 1), an image format it
/// does not take.
fn content_refusal(messages: &[Value]) -> Option<String> {
    for (i, m) in messages.iter().enumerate() {
        let blocks = m
            .get("content")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if blocks.is_empty() {
            return Some(format!(
                "1 validation error detected: Value '[]' at 'messages.{}.member.content' failed to satisfy constraint: Member must have length greater than or equal to 1",
                i + 1
            ));
        }
        for (j, b) in blocks.iter().enumerate() {
            if b.get("text")
                .and_then(Value::as_str)
                .is_some_and(|t| t.trim().is_empty())
            {
                return Some(format!(
                    "The text field in the ContentBlock object at messages.{i}.content.{j} is blank. Add text to the text field, and try again."
                ));
            }
            if let Some(format) = b.pointer("/image/format").and_then(Value::as_str)
                && !matches!(format, "gif" | "jpeg" | "png" | "webp")
            {
                return Some(format!(
                    "1 validation error detected: Value '{format}' at 'messages.{}.member.content.{}.member.image.format' failed to satisfy constraint: Member must satisfy enum value set: [gif, jpeg, png, webp]",
                    i + 1,
                    j + 1
                ));
            }
        }
    }
    None
}

fn converse(ctx: &Ctx<'_>, action: Action, req: &Value) -> Response<MockBody> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(message) = content_refusal(&messages) {
        return error(StatusCode::BAD_REQUEST, "ValidationException", &message);
    }
    let has_tool_blocks = messages.iter().any(|m| {
        m.get("content")
            .and_then(Value::as_array)
            .is_some_and(|bs| {
                bs.iter()
                    .any(|b| b.get("toolUse").is_some() || b.get("toolResult").is_some())
            })
    });
    if has_tool_blocks && req.get("toolConfig").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "The toolConfig field must be defined when using toolUse and toolResult content blocks.",
        );
    }
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let content = last_user.and_then(|m| m.get("content"));
    let user_text = content_text(content);
    let tool_result = content
        .and_then(Value::as_array)
        .and_then(|bs| bs.iter().find_map(|b| b.get("toolResult")));
    let prompt_tokens: u64 = messages
        .iter()
        .map(|m| text::words(&content_text(m.get("content"))))
        .sum();
    let tool = match tool_result {
        Some(_) => None,
        None => req
            .pointer("/toolConfig/toolChoice/tool/name")
            .or_else(|| req.pointer("/toolConfig/tools/0/toolSpec/name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    let reply = match tool_result {
        Some(tr) => format!(
            "mock reply to tool result: {}",
            content_text(tr.get("content"))
        ),
        None => text::reply_to(&user_text),
    };
    let output_tokens = if tool.is_some() {
        3
    } else {
        text::words(&reply)
    };
    let usage = json!({"inputTokens": prompt_tokens, "outputTokens": output_tokens,
        "totalTokens": prompt_tokens + output_tokens});
    let tool_id = format!("tooluse_mock_{}", ctx.id);
    // A tool whose schema's properties are `{}` is called with `{}`; its stream has no input
    // delta.
    let no_input = tool.as_deref().is_some_and(|name| {
        req.pointer("/toolConfig/tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|t| {
                t.pointer("/toolSpec/name").and_then(Value::as_str) == Some(name)
                    && t.pointer("/toolSpec/inputSchema/json/properties")
                        .and_then(Value::as_object)
                        .is_some_and(|p| p.is_empty())
            })
    });
    let input = if no_input {
        json!({})
    } else {
        json!({"text": user_text})
    };
    if action == Action::Converse {
        let (content, stop) = match &tool {
            Some(name) => (
                json!([{"toolUse": {"toolUseId": tool_id, "name": name, "input": input}}]),
                "tool_use",
            ),
            None => (json!([{"text": reply}]), "end_turn"),
        };
        return json_ok(
            &json!({"output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 1}}),
        );
    }
    let mut frames = vec![event("messageStart", &json!({"role": "assistant"}))];
    let stop = match &tool {
        Some(name) => {
            frames.push(event(
                "contentBlockStart",
                &json!({"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": tool_id, "name": name}}}),
            ));
            let args = if no_input {
                String::new()
            } else {
                input.to_string()
            };
            let mid = args.len() / 2;
            let mid = (mid..args.len())
                .find(|&i| args.is_char_boundary(i))
                .unwrap_or(args.len());
            let pieces: &[&str] = if no_input {
                &[]
            } else {
                &[&args[..mid], &args[mid..]]
            };
            for piece in pieces {
                frames.push(event(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}),
                ));
            }
            "tool_use"
        }
        None => {
            for piece in text::stream_pieces(&reply) {
                frames.push(event(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
                ));
            }
            "end_turn"
        }
    };
    frames.push(event("contentBlockStop", &json!({"contentBlockIndex": 0})));
    frames.push(event("messageStop", &json!({"stopReason": stop})));
    frames.push(event(
        "metadata",
        &json!({"usage": usage, "metrics": {"latencyMs": 1}}),
    ));
    let mut resp = sse_response(frames, ctx.chunk_delay, ctx.stats);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.amazon.eventstream"),
    );
    resp.headers_mut().remove(http::header::CACHE_CONTROL);
    resp
}

fn invoke(model: &str, req: &Value) -> Response<MockBody> {
    let base = model.rsplit('/').next().unwrap_or(model);
    if base.contains("titan-embed") {
        let text = req.get("inputText").and_then(Value::as_str).unwrap_or("");
        let dims = req
            .get("dimensions")
            .and_then(Value::as_u64)
            .map_or(8, |d| d.clamp(1, 4096) as usize);
        return json_ok(&json!({"embedding": embedding_of(text.as_bytes(), dims),
            "inputTextTokenCount": text::words(text)}));
    }
    if base.contains("cohere.embed") {
        let texts: Vec<&str> = req
            .get("texts")
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let embeddings: Vec<Vec<f32>> = texts
            .iter()
            .map(|t| embedding_of(t.as_bytes(), 8))
            .collect();
        return json_ok(&json!({"id": "mock-embed", "embeddings": embeddings,
            "response_type": "embeddings_floats", "texts": texts}));
    }
    error(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        "The mock invokes only titan-embed and cohere.embed models",
    )
}

/// One event-stream message: `:event-type`, `:content-type`, `:message-type` headers and a
/// JSON payload, framed with the prelude and message CRC32s.
pub fn event(kind: &str, payload: &Value) -> Bytes {
    let mut body = Vec::new();
    write_json(&mut body, payload);
    Bytes::from(frame(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        &body,
    ))
}

/// The binary framing of one message with string headers.
pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (12 + h.len() + payload.len() + 4) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    let mut buf = Vec::with_capacity(64 + message.len());
    write_json(&mut buf, &json!({"message": message}));
    let mut resp = json_response(status, Bytes::from(buf));
    if let Ok(v) = HeaderValue::try_from(format!(
        "{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )) {
        resp.headers_mut().insert("x-amzn-errortype", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_crcs() {
        let f = frame(&[(":event-type", "x")], b"{}");
        assert_eq!(
            u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize,
            f.len()
        );
        assert_eq!(
            crc32fast::hash(&f[..8]),
            u32::from_be_bytes([f[8], f[9], f[10], f[11]])
        );
        let n = f.len();
        assert_eq!(
            crc32fast::hash(&f[..n - 4]),
            u32::from_be_bytes([f[n - 4], f[n - 3], f[n - 2], f[n - 1]])
        );
    }

    #[test]
    fn blank_text_empty_messages_and_other_image_formats_are_refused_in_bedrocks_words() {
        let user = |content: Value| vec![json!({"role": "user", "content": content})];
        assert_eq!(
            content_refusal(&user(json!([{"text": "hi"}, {"text": "\n\n"}]))).as_deref(),
            Some(
                "The text field in the ContentBlock object at messages.0.content.1 is blank. Add text to the text field, and try again."
            )
        );
        assert!(
            content_refusal(&user(json!([])))
                .is_some_and(|m| m.contains("messages.1.member.content"))
        );
        let jpg = json!([{"image": {"format": "jpg", "source": {"bytes": "/9j/"}}}]);
        assert!(content_refusal(&user(jpg)).is_some_and(|m| m.contains("Value 'jpg'")));
        let fine =
            json!([{"text": "hi"}, {"toolResult": {"toolUseId": "t", "content": [{"json": {}}]}}]);
        assert_eq!(content_refusal(&user(fine)), None);
    }

    #[test]
    fn model_ids_are_percent_decoded_and_actions_recognised() {
        assert_eq!(
            model_of("/model/anthropic.claude-v2%3A1/converse"),
            "anthropic.claude-v2:1"
        );
        assert_eq!(
            Action::of("/model/x/converse-stream"),
            Some(Action::ConverseStream)
        );
        assert_eq!(Action::of("/v1/chat/completions"), None);
    }
}
