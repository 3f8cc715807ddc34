//! Anthropic wire format: Messages (plain and SSE), count_tokens, Models, errors.
//!
//! With extended thinking on (`thinking: {"type": "enabled", ...}`) an answer starts with a
//! signed thinking block, and, as Anthropic does, the mock refuses a forced `tool_choice` and a
//! conversation whose last assistant tool-use turn does not start with its thinking block
//! (signature intact).
//!
//! Like the API, Messages requests are refused (400, Anthropic's words) for a top-level field
//! it does not know, a message without content, a text block that is empty or whitespace, and
//! an image whose `media_type` is not JPEG, PNG, GIF or WebP. Streams end with a
//! `message_delta` whose usage repeats the input side, cumulative, as Anthropic sends it now.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Ctx;
use crate::body::{MockBody, SseBuilder, json_ok, json_response, sse_response, write_json};
use crate::text::{self, Message};

// ---------------------------------------------------------------------------
// Requests

#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
}

impl MessagesRequest<'_> {
    /// The tool the mock calls: with tools and a last turn that is no tool result, the
    /// forced tool or else the first one.
    fn tool_to_call(&self) -> Option<String> {
        let tools = self.tools.as_deref().filter(|t| !t.is_empty())?;
        let last = self.messages.as_deref()?.last()?;
        let answered = last
            .content
            .as_ref()
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks
                    .iter()
                    .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            });
        if answered {
            return None;
        }
        let choice = self.tool_choice.as_ref();
        match choice.and_then(|c| c.get("type")).and_then(Value::as_str) {
            Some("none") => None,
            Some("tool") => choice
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => tools[0]
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_owned),
        }
    }

    /// Whether `tool` takes no input (its schema's properties are `{}`): it is called with `{}`,
    /// and a stream carries one empty `partial_json` for it, as Anthropic sends.
    fn tool_takes_no_input(&self, tool: &str) -> bool {
        self.tools.iter().flatten().any(|t| {
            t.get("name").and_then(Value::as_str) == Some(tool)
                && t.pointer("/input_schema/properties")
                    .and_then(Value::as_object)
                    .is_some_and(|p| p.is_empty())
        })
    }

    /// The text of the last turn's tool results, if it has any.
    fn tool_result_text(&self) -> Option<String> {
        let last = self.messages.as_deref()?.last()?;
        let blocks = last.content.as_ref()?.as_array()?;
        let texts: Vec<String> = blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| match b.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => text::content_text(other).into_owned(),
                None => String::new(),
            })
            .collect();
        (!texts.is_empty()).then(|| texts.join(" "))
    }
}

impl MessagesRequest<'_> {
    /// Whether extended thinking is on.
    fn thinking_on(&self) -> bool {
        self.thinking
            .as_ref()
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t != "disabled")
    }

    /// Why Anthropic would refuse this request with thinking on, in its words: a forced tool, a
    /// thinking budget below 1024 or not below `max_tokens`, or a last assistant turn holding `tool_use` that does not start with thinking, or whose
    /// thinking is not signed as it was answered.
    fn thinking_refusal(&self) -> Option<String> {
        let forced = self
            .tool_choice
            .as_ref()
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "any" || t == "tool");
        if forced {
            return Some("Thinking may not be enabled when tool_choice forces tool use.".into());
        }
        let budget = self
            .thinking
            .as_ref()
            .and_then(|t| t.get("budget_tokens"))
            .and_then(Value::as_u64);
        let max_tokens = self.max_tokens.as_ref().and_then(Value::as_u64);
        if let Some(budget) = budget {
            if budget < 1024 {
                return Some(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                        .into(),
                );
            }
            if max_tokens.is_some_and(|m| m <= budget) {
                return Some("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size".into());
            }
        }
        let messages = self.messages.as_deref()?;
        let (i, blocks) = messages.iter().enumerate().rev().find_map(|(i, m)| {
            (m.role.as_deref() == Some("assistant"))
                .then(|| Some((i, m.content.as_ref()?.as_array()?)))
                .flatten()
        })?;
        let kind = |b: &Value| {
            b.get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        if !blocks.iter().any(|b| kind(b) == "tool_use") {
            return None;
        }
        let first = blocks.first().map(kind).unwrap_or_default();
        if first != "thinking" && first != "redacted_thinking" {
            return Some(format!(
                "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{first}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from previous turns. To avoid this requirement, disable `thinking`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
            ));
        }
        blocks.iter().enumerate().find_map(|(j, b)| {
            let text = b.get("thinking").and_then(Value::as_str)?;
            let signed = b.get("signature").and_then(Value::as_str) == Some(&signature(text));
            (!signed).then(|| {
                format!("messages.{i}.content.{j}: Invalid `signature` in `thinking` block")
            })
        })
    }

    /// Why Anthropic would refuse the messages' content, in its words: a message without
    /// content (but a last assistant prefill), a text block empty or only whitespace, or an
    /// image of a media type it does not take.
    fn content_refusal(&self) -> Option<String> {
        let messages = self.messages.as_deref()?;
        for (i, m) in messages.iter().enumerate() {
            let last_assistant = i + 1 == messages.len() && m.role.as_deref() == Some("assistant");
            let empty = match &m.content {
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(blocks)) => blocks.is_empty(),
                _ => false,
            };
            if empty && !last_assistant {
                return Some(format!(
                    "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
                ));
            }
            let texts: Vec<&str> = match &m.content {
                Some(Value::String(s)) if !s.is_empty() => vec![s],
                Some(Value::Array(blocks)) => blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|b| b.get("text").and_then(Value::as_str))
                    .collect(),
                _ => Vec::new(),
            };
            for text in texts {
                if text.is_empty() {
                    return Some("messages: text content blocks must be non-empty".into());
                }
                if text.trim().is_empty() {
                    return Some(
                        "messages: text content blocks must contain non-whitespace text".into(),
                    );
                }
            }
            for (j, b) in m
                .content
                .as_ref()
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let media_type = b
                    .pointer("/source/media_type")
                    .and_then(Value::as_str)
                    .filter(|_| b.get("type") == Some(&Value::from("image")));
                if let Some(media_type) = media_type
                    && !matches!(
                        media_type,
                        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
                    )
                {
                    return Some(format!(
                        "messages.{i}.content.{j}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                    ));
                }
            }
        }
        None
    }

    /// The first required field the request lacks (Messages wants `max_tokens` too), in
    /// Anthropic's words.
    fn missing_field(&self, needs_max_tokens: bool) -> Option<&'static str> {
        if self.model.is_none() {
            Some("model: Field required")
        } else if self.messages.is_none() {
            Some("messages: Field required")
        } else if needs_max_tokens && self.max_tokens.is_none() {
            Some("max_tokens: Field required")
        } else {
            None
        }
    }

    fn input_tokens(&self) -> u64 {
        let messages = self.messages.as_deref().unwrap_or_default();
        let system = self.system.as_ref().map_or(0, text::content_words);
        text::messages_words(messages).saturating_add(system)
    }
}

/// The top-level fields of a Messages request (with the beta ones): Anthropic refuses others.
const MESSAGES_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_k",
    "top_p",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
    "inference_geo",
    "cache_control",
    "speed",
];

/// The first top-level field of a Messages request that Anthropic does not take, in its words.
fn unknown_field(body: &[u8]) -> Option<String> {
    let fields: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    fields
        .keys()
        .find(|k| !MESSAGES_FIELDS.contains(&k.as_str()))
        .map(|k| format!("{k}: Extra inputs are not permitted"))
}

// ---------------------------------------------------------------------------
// Responses

/// The mock's thinking before answering `user_text`.
fn thinking_about(user_text: &str) -> String {
    format!(
        "mock thinking about: {}",
        text::truncate_chars(user_text, text::MAX_QUOTE_CHARS)
    )
}

/// The mock's signature of a thinking text (FNV-1a, base64): the request check recomputes it.
fn signature(thinking: &str) -> String {
    use base64::Engine;
    let hash = thinking.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    base64::engine::general_purpose::STANDARD.encode(format!("mock-sig:{hash:016x}"))
}

/// A content block of an answer.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Thinking {
        thinking: &'a str,
        signature: String,
    },
    Text {
        text: &'a str,
    },
}

/// The stream events of a thinking block at `index`: start, text deltas, signature, stop.
fn thinking_events(sse: &mut SseBuilder, index: u32, thinking: &str) {
    sse.event(
        Some("content_block_start"),
        &serde_json::json!({"type": "content_block_start", "index": index,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    );
    for piece in text::stream_pieces(thinking) {
        sse.event(
            Some("content_block_delta"),
            &serde_json::json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "thinking_delta", "thinking": piece}}),
        );
    }
    sse.event(
        Some("content_block_delta"),
        &serde_json::json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "signature_delta", "signature": signature(thinking)}}),
    );
    sse.event(
        Some("content_block_stop"),
        &ContentBlockStop {
            kind: "content_block_stop",
            index,
        },
    );
}

#[derive(Serialize)]
struct MessageBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: &'a [Block<'a>],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    usage: Usage,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
    service_tier: &'static str,
}

impl Usage {
    fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            output_tokens,
            service_tier: "standard",
        }
    }
}

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: MessageBody<'a>,
}

#[derive(Serialize)]
struct ContentBlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: TextBlock<'a>,
}

#[derive(Serialize)]
struct ContentBlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: TextDelta<'a>,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct ContentBlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: DeltaUsage,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<()>,
}

/// `message_delta` usage: the whole message's counts so far, input side included (current
/// Anthropic; the input grows there when server tools ran).
#[derive(Serialize)]
struct DeltaUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

impl DeltaUsage {
    fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            output_tokens,
        }
    }
}

#[derive(Serialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
    request_id: &'a str,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

// ---------------------------------------------------------------------------
// Handlers

/// `POST .../v1/messages`
pub(crate) fn messages(ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    let req: MessagesRequest<'_> = match text::parse_object(body) {
        Ok(req) => req,
        Err(err) => return invalid_json(ctx, &err),
    };
    if let Some(message) = req.missing_field(true) {
        return invalid_request(ctx, message);
    }
    if let Some(message) = unknown_field(body).or_else(|| req.content_refusal()) {
        return invalid_request(ctx, &message);
    }
    let model = req.model.as_deref().unwrap_or_default();
    if let Some(status) = text::status_trigger(model) {
        return status_error(ctx, status, model);
    }
    if req.thinking_on()
        && let Some(message) = req.thinking_refusal()
    {
        return invalid_request(ctx, &message);
    }
    let messages = req.messages.as_deref().unwrap_or_default();
    let user_text = text::last_user_text(messages);
    let thinking = req.thinking_on().then(|| thinking_about(&user_text));
    let thinking = thinking.as_deref();
    let reply = match req.tool_result_text() {
        Some(t) => format!("mock reply to tool result: {t}"),
        None => text::reply_to(&user_text),
    };
    let input_tokens = req.input_tokens();
    let output_tokens = text::words(&reply);
    let id = format!("msg_mock_{}", ctx.id);
    if let Some(tool) = req.tool_to_call() {
        let mut resp = tool_use(
            ctx,
            &req,
            &id,
            model,
            &tool,
            &user_text,
            input_tokens,
            thinking,
        );
        set_request_id(&mut resp, ctx);
        return resp;
    }

    let mut resp = if req.stream == Some(true) {
        let events = message_stream(&id, model, &reply, input_tokens, output_tokens, thinking);
        sse_response(events, ctx.chunk_delay, ctx.stats)
    } else {
        json_ok(&MessageBody {
            id: &id,
            kind: "message",
            role: "assistant",
            model,
            content: &thinking
                .map(|t| Block::Thinking {
                    thinking: t,
                    signature: signature(t),
                })
                .into_iter()
                .chain([Block::Text { text: &reply }])
                .collect::<Vec<_>>(),
            stop_reason: Some("end_turn"),
            stop_sequence: None,
            usage: Usage::new(input_tokens, output_tokens),
        })
    };
    set_request_id(&mut resp, ctx);
    resp
}

/// A `tool_use` answer (plain or streamed) calling `tool` with `{"text": <user text>}`, after
/// `thinking` when it is on.
#[allow(clippy::too_many_arguments)]
fn tool_use(
    ctx: &Ctx<'_>,
    req: &MessagesRequest<'_>,
    id: &str,
    model: &str,
    tool: &str,
    user_text: &str,
    input_tokens: u64,
    thinking: Option<&str>,
) -> Response<MockBody> {
    let tool_id = format!("toolu_mock_{}", ctx.id);
    let no_input = req.tool_takes_no_input(tool);
    let input = if no_input {
        serde_json::json!({})
    } else {
        serde_json::json!({"text": user_text})
    };
    let usage = |out: u64| serde_json::json!({"input_tokens": input_tokens, "output_tokens": out});
    if req.stream != Some(true) {
        let mut content: Vec<Value> = thinking
            .map(|t| serde_json::json!({"type": "thinking", "thinking": t, "signature": signature(t)}))
            .into_iter()
            .collect();
        content.push(
            serde_json::json!({"type": "tool_use", "id": tool_id, "name": tool, "input": input}),
        );
        return json_ok(
            &serde_json::json!({"id": id, "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": "tool_use", "stop_sequence": null, "usage": usage(3)}),
        );
    }
    let args = if no_input {
        String::new()
    } else {
        input.to_string()
    };
    let mid = (args.len() / 2..args.len())
        .find(|&i| args.is_char_boundary(i))
        .unwrap_or(args.len());
    let pieces: &[&str] = if no_input {
        &[""]
    } else {
        &[&args[..mid], &args[mid..]]
    };
    let mut sse = SseBuilder::with_capacity(8);
    sse.event(
        Some("message_start"),
        &serde_json::json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": usage(1)}}),
    );
    if let Some(t) = thinking {
        thinking_events(&mut sse, 0, t);
    }
    let index = u32::from(thinking.is_some());
    sse.event(
        Some("content_block_start"),
        &serde_json::json!({"type": "content_block_start", "index": index,
        "content_block": {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}}),
    );
    for piece in pieces {
        sse.event(
            Some("content_block_delta"),
            &serde_json::json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "input_json_delta", "partial_json": piece}}),
        );
    }
    sse.event(
        Some("content_block_stop"),
        &serde_json::json!({"type": "content_block_stop", "index": index}),
    );
    sse.event(
        Some("message_delta"),
        &MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: "tool_use",
                stop_sequence: None,
            },
            usage: DeltaUsage::new(input_tokens, 3),
        },
    );
    sse.event(
        Some("message_stop"),
        &TypeOnly {
            kind: "message_stop",
        },
    );
    sse_response(sse.finish(), ctx.chunk_delay, ctx.stats)
}

/// The SSE events of a streamed message, in Anthropic's order (`thinking` first when on).
fn message_stream(
    id: &str,
    model: &str,
    reply: &str,
    input_tokens: u64,
    output_tokens: u64,
    thinking: Option<&str>,
) -> Vec<Bytes> {
    let pieces = text::stream_pieces(reply);
    let mut sse = SseBuilder::with_capacity(pieces.len() + 6);
    sse.event(
        Some("message_start"),
        &MessageStart {
            kind: "message_start",
            message: MessageBody {
                id,
                kind: "message",
                role: "assistant",
                model,
                content: &[],
                stop_reason: None,
                stop_sequence: None,
                usage: Usage::new(input_tokens, 1),
            },
        },
    );
    if let Some(t) = thinking {
        thinking_events(&mut sse, 0, t);
    }
    let index = u32::from(thinking.is_some());
    sse.event(
        Some("content_block_start"),
        &ContentBlockStart {
            kind: "content_block_start",
            index,
            content_block: TextBlock {
                kind: "text",
                text: "",
            },
        },
    );
    sse.event(Some("ping"), &TypeOnly { kind: "ping" });
    for piece in pieces {
        sse.event(
            Some("content_block_delta"),
            &ContentBlockDelta {
                kind: "content_block_delta",
                index,
                delta: TextDelta {
                    kind: "text_delta",
                    text: piece,
                },
            },
        );
    }
    sse.event(
        Some("content_block_stop"),
        &ContentBlockStop {
            kind: "content_block_stop",
            index,
        },
    );
    sse.event(
        Some("message_delta"),
        &MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: "end_turn",
                stop_sequence: None,
            },
            usage: DeltaUsage::new(input_tokens, output_tokens),
        },
    );
    sse.event(
        Some("message_stop"),
        &TypeOnly {
            kind: "message_stop",
        },
    );
    sse.finish()
}

/// `POST .../v1/messages/count_tokens`
pub(crate) fn count_tokens(ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    let req: MessagesRequest<'_> = match text::parse_object(body) {
        Ok(req) => req,
        Err(err) => return invalid_json(ctx, &err),
    };
    if let Some(message) = req.missing_field(false) {
        return invalid_request(ctx, message);
    }
    let model = req.model.as_deref().unwrap_or_default();
    if let Some(status) = text::status_trigger(model) {
        return status_error(ctx, status, model);
    }
    #[derive(Serialize)]
    struct Count {
        input_tokens: u64,
    }
    let mut resp = json_ok(&Count {
        input_tokens: req.input_tokens(),
    });
    set_request_id(&mut resp, ctx);
    resp
}

/// `GET .../v1/models` when the request carries `anthropic-version`.
pub(crate) fn models(ctx: &Ctx<'_>) -> Response<MockBody> {
    const MODELS: &[u8] = br#"{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"},{"type":"model","id":"claude-haiku-4-5","display_name":"Claude Haiku 4.5","created_at":"2025-10-15T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-haiku-4-5"}"#;
    let mut resp = json_response(StatusCode::OK, Bytes::from_static(MODELS));
    set_request_id(&mut resp, ctx);
    resp
}

// ---------------------------------------------------------------------------
// Errors

fn invalid_json(ctx: &Ctx<'_>, err: &str) -> Response<MockBody> {
    let message = format!("Request body is not valid JSON: {err}");
    error_response(
        ctx,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        &message,
    )
}

/// `400` for a request the API would not take (a required field missing).
fn invalid_request(ctx: &Ctx<'_>, message: &str) -> Response<MockBody> {
    error_response(
        ctx,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
    )
}

/// `401` for a request without `x-api-key`, in Anthropic's words.
pub(crate) fn unauthorized(ctx: &Ctx<'_>) -> Response<MockBody> {
    error_response(
        ctx,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "x-api-key header is required",
    )
}

/// `400` for a request without `anthropic-version`, in Anthropic's words.
pub(crate) fn version_required(ctx: &Ctx<'_>) -> Response<MockBody> {
    error_response(
        ctx,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "anthropic-version: header is required",
    )
}

/// The error asked for by a `mock-status-<code>` model.
fn status_error(ctx: &Ctx<'_>, status: StatusCode, model: &str) -> Response<MockBody> {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    let message = format!(
        "mock error: status {} requested by model {model}",
        status.as_u16()
    );
    error_response(ctx, status, kind, &message)
}

fn error_response(
    ctx: &Ctx<'_>,
    status: StatusCode,
    kind: &str,
    message: &str,
) -> Response<MockBody> {
    let request_id = ctx.request_id();
    let mut buf = Vec::with_capacity(128 + message.len());
    write_json(
        &mut buf,
        &ErrorBody {
            kind: "error",
            error: ErrorDetail { kind, message },
            request_id: &request_id,
        },
    );
    let mut resp = json_response(status, buf);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    set_request_id(&mut resp, ctx);
    resp
}

fn set_request_id(resp: &mut Response<MockBody>, ctx: &Ctx<'_>) {
    if let Ok(value) = HeaderValue::try_from(ctx.request_id()) {
        resp.headers_mut().insert("request-id", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: Value) -> Option<String> {
        let bytes = body.to_string();
        let req: MessagesRequest<'_> = serde_json::from_str(&bytes).expect("parse");
        unknown_field(bytes.as_bytes()).or_else(|| req.content_refusal())
    }

    #[test]
    fn blank_text_empty_messages_odd_images_and_unknown_fields_are_refused_in_anthropics_words() {
        let with = |messages: Value| {
            refusal(serde_json::json!({"model": "m", "max_tokens": 8, "messages": messages}))
        };
        assert_eq!(
            with(serde_json::json!([{"role": "user", "content": "hi"}])),
            None
        );
        assert_eq!(
            with(serde_json::json!([{"role": "user", "content": [{"type": "text", "text": ""}]}]))
                .as_deref(),
            Some("messages: text content blocks must be non-empty")
        );
        assert_eq!(
            with(serde_json::json!([{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "\n\n"},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]))
            .as_deref(),
            Some("messages: text content blocks must contain non-whitespace text")
        );
        assert!(
            with(serde_json::json!([{"role": "user", "content": []}])).is_some_and(
                |m| m.starts_with("messages.0: all messages must have non-empty content")
            )
        );
        let jpg = serde_json::json!([{"role": "user", "content": [{"type": "image",
            "source": {"type": "base64", "media_type": "image/jpg", "data": "/9j/"}}]}]);
        assert!(
            with(jpg).is_some_and(
                |m| m.starts_with("messages.0.content.0.image.source.base64.media_type")
            )
        );
        assert_eq!(
            refusal(serde_json::json!({"model": "m", "max_tokens": 8, "n": 2,
                "messages": [{"role": "user", "content": "hi"}]}))
            .as_deref(),
            Some("n: Extra inputs are not permitted")
        );
    }
}
