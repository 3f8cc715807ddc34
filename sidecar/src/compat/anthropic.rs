//! OpenAI chat completions ⇄ Anthropic Messages: request, response, SSE stream and errors.
//!
//! `response_format` JSON is expressed as one forced tool ([`JSON_TOOL`]) whose input is the
//! answer; its `tool_use` comes back as message content. Beside the request's own tools (an
//! agent with tools and an output type), or with extended thinking on (Anthropic refuses a
//! forced tool then), the JSON tool is offered (`tool_choice: auto`) with an instruction to
//! answer through it: a call of another tool comes back as a tool call (see [`JsonAnswer`]).
//!
//! Extended thinking comes back as LiteLLM shows it: `reasoning_content` (the text) and
//! `thinking_blocks` (the blocks with their signatures, or redacted data), in messages and in
//! stream deltas; an assistant message sent back with `thinking_blocks` starts its Anthropic
//! turn with them, unchanged, as Anthropic requires of a tool-use turn while thinking.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::openai::{
    self, ChatRequest, Choice, ChunkWriter, Completion, Content, Message, Part, ResponseFormat,
    ThinkingBlock, Tool, ToolCallOut, Usage, bad,
};
use super::sse::{Event, SseParser};
use super::{ResponseCtx, StreamTranslator};
use crate::error::GatewayError;
use crate::error::json_error;

/// Provider name in messages.
const PROVIDER: &str = "anthropic";
/// `max_tokens` when the client sets none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// Longest tool use id sent (Anthropic takes `[a-zA-Z0-9_-]+`; ids from Gemini carry thought
/// signatures, see [`openai::portable_call_id`]).
const MAX_CALL_ID: usize = 64;
/// Name of the tool that carries a `response_format` JSON answer.
pub const JSON_TOOL: &str = "json_response";
/// System instruction added when the JSON tool is offered, not forced ([`JsonAnswer::Offered`]).
pub const JSON_TOOL_INSTRUCTION: &str =
    "Give your final answer by calling the json_response tool; its input is the answer.";

/// How a `response_format` JSON answer is asked of Claude (Anthropic's and Bedrock's), which
/// has no JSON answer format of its own but tools: through the [`JSON_TOOL`], whose input is
/// the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonAnswer {
    /// No JSON answer asked, or the request forces a call of one of its tools (`tool_choice`
    /// `required` or a function): the answer is a tool call, which the format does not shape.
    NotAsked,
    /// The JSON tool forced: the request has no tools of its own, or `tool_choice: none` keeps
    /// the model from calling them.
    Forced,
    /// The JSON tool offered, unforced, with [`JSON_TOOL_INSTRUCTION`] in the system prompt:
    /// the model calls the request's tools as it needs, then answers through the JSON tool
    /// (or thinking is on, under which Claude refuses a forced tool).
    Offered,
}

impl JsonAnswer {
    /// The plan for a request's `response_format`, `tool_choice`, whether it has tools and
    /// whether thinking is on; `tool_choice: none` beside tools while thinking cannot be
    /// expressed (the JSON tool can be neither forced nor offered alone).
    pub fn of(
        format: Option<&ResponseFormat>,
        choice: Option<&Choice>,
        has_tools: bool,
        thinking: bool,
        provider: &str,
    ) -> Result<Self, GatewayError> {
        if matches!(format, None | Some(ResponseFormat::Text))
            || matches!(choice, Some(Choice::Required | Choice::Function(_)))
        {
            return Ok(Self::NotAsked);
        }
        let none = choice == Some(&Choice::None);
        match (thinking, has_tools && !none) {
            (true, _) if none && has_tools => Err(bad(format!(
                "tool_choice none with tools and response_format json cannot be expressed for provider {provider} while thinking is on (it refuses a forced tool); leave the tools out instead"
            ))),
            (true, _) | (false, true) => Ok(Self::Offered),
            (false, false) => Ok(Self::Forced),
        }
    }

    /// Whether the JSON tool is sent.
    pub fn uses_tool(self) -> bool {
        self != Self::NotAsked
    }
}

/// Whether the request turns extended thinking on (`thinking: {"type": "enabled" | "adaptive",
/// ...}`, passed through as Anthropic's own field).
fn thinking_on(rest: &Map<String, Value>) -> bool {
    rest.get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "disabled")
}

/// An assistant turn's thinking blocks as Anthropic content blocks, first in the turn.
fn thinking_content(blocks: &Option<Vec<ThinkingBlock>>) -> Vec<Value> {
    blocks
        .iter()
        .flatten()
        .map(|b| serde_json::to_value(b).unwrap_or(Value::Null))
        .collect()
}

/// The Messages request for `req`, and whether the JSON tool is used.
pub fn request(mut req: ChatRequest, model: &str) -> Result<(Vec<u8>, bool), GatewayError> {
    req.refuse_unsupported(PROVIDER, &["user", "safety_identifier"])?;
    let mut body = req.rest.clone();
    // The system text blocks, each with its `cache_control` if the client set one.
    let mut system: Vec<(String, Option<Value>)> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let trailing = openai::trailing_instructions(&req.messages);
    for (i, m) in req.messages.iter().enumerate() {
        match m {
            // An instruction after the assistant's last message: the user's turn it answers.
            Message::System { content, .. } | Message::Developer { content, .. }
                if i >= trailing =>
            {
                openai::text_only(content, i, "system", PROVIDER)?;
                openai::push_turn(&mut messages, "user", user_blocks(content, i)?);
            }
            Message::System { content, .. } | Message::Developer { content, .. } => {
                let text = openai::text_only(content, i, "system", PROVIDER)?;
                match content {
                    // A caching breakpoint keeps its part a block of its own.
                    Content::Parts(parts) if content.has_cache_control() => {
                        for p in parts {
                            if let Part::Text {
                                text,
                                cache_control,
                            } = p
                                && !openai::is_blank(text)
                            {
                                system.push((text.clone(), cache_control.clone()));
                            }
                        }
                    }
                    _ if !openai::is_blank(&text) => system.push((text, None)),
                    _ => {}
                }
            }
            Message::User { content, .. } => {
                openai::push_turn(&mut messages, "user", user_blocks(content, i)?)
            }
            Message::Assistant {
                content,
                tool_calls,
                refusal: _,
                function_call,
                audio,
                name: _,
                thinking_blocks,
            } => {
                if function_call.is_some() {
                    return Err(bad(format!(
                        "messages[{i}].function_call is deprecated; send tool_calls"
                    )));
                }
                if audio.is_some() {
                    return Err(openai::unsupported(
                        &format!("messages[{i}].audio"),
                        PROVIDER,
                    ));
                }
                let (text, calls) = openai::assistant_parts(content, tool_calls);
                let mut blocks = thinking_content(thinking_blocks);
                match content {
                    // A prompt-caching breakpoint on an assistant turn's part (Anthropic caches
                    // assistant blocks too): the text parts stay blocks of their own.
                    Some(c @ Content::Parts(parts)) if c.has_cache_control() => {
                        blocks.extend(parts.iter().filter_map(|p| match p {
                            Part::Text { text, .. } | Part::Refusal { refusal: text }
                                if !openai::is_blank(text) =>
                            {
                                Some(text_block(text.clone(), p.cache_control().cloned()))
                            }
                            _ => None,
                        }));
                    }
                    _ => blocks.extend(text.map(|t| json!({"type": "text", "text": t}))),
                }
                for (call, input) in calls {
                    blocks.push(json!({"type": "tool_use",
                        "id": openai::portable_call_id(&call.id, MAX_CALL_ID),
                        "name": call.function.name, "input": input}));
                }
                if !blocks.is_empty() {
                    openai::push_turn(&mut messages, "assistant", blocks);
                }
            }
            Message::Tool {
                content,
                tool_call_id,
            } => {
                let mut result = Map::new();
                result.insert("type".into(), Value::from("tool_result"));
                result.insert(
                    "tool_use_id".into(),
                    Value::from(openai::portable_call_id(tool_call_id, MAX_CALL_ID)),
                );
                if let Some(content) = tool_result_content(content, i)? {
                    result.insert("content".into(), content);
                }
                openai::push_turn(&mut messages, "user", vec![Value::Object(result)]);
            }
            Message::Function { .. } => {
                return Err(bad(format!(
                    "messages[{i}]: role function is deprecated; send role tool"
                )));
            }
        }
    }
    openai::ends_where_sent(&req.messages, &messages, PROVIDER)?;
    openai::trim_prefill(&mut messages);
    let thinking = thinking_on(&req.rest);
    let choice = req.tool_choice.as_ref().map(|c| c.choice()).transpose()?;
    let json_answer = JsonAnswer::of(
        req.response_format.as_ref(),
        choice.as_ref(),
        req.has_tools(),
        thinking,
        PROVIDER,
    )?;
    if json_answer == JsonAnswer::Offered {
        system.push((JSON_TOOL_INSTRUCTION.to_owned(), None));
    }
    if system.iter().any(|(_, cache)| cache.is_some()) {
        let blocks = system
            .into_iter()
            .map(|(text, cache)| text_block(text, cache))
            .collect();
        body.insert("system".into(), Value::Array(blocks));
    } else if !system.is_empty() {
        let texts: Vec<String> = system.into_iter().map(|(text, _)| text).collect();
        body.insert("system".into(), Value::String(texts.join("\n\n")));
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    body.insert("model".into(), Value::String(model.to_owned()));
    body.insert("messages".into(), Value::Array(messages));
    body.insert(
        "max_tokens".into(),
        Value::from(
            req.max_output_tokens()
                .unwrap_or_else(|| default_max_tokens(&req.rest)),
        ),
    );
    if let Some(t) = req.temperature_at_most(1.0) {
        body.insert("temperature".into(), Value::from(t));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), Value::from(p));
    }
    if let Some(stop) = req.stop.take() {
        body.insert("stop_sequences".into(), Value::from(stop.into_vec()));
    }
    if req.is_stream() {
        body.insert("stream".into(), Value::Bool(true));
    }
    if let Some(user) = req.safety_identifier.as_ref().or(req.user.as_ref()) {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    let mut tools: Vec<Value> = req
        .tools
        .iter()
        .flatten()
        .map(
            |Tool::Function {
                 function: f,
                 cache_control,
             }| {
                let mut t = Map::new();
                t.insert("name".into(), Value::String(f.name.clone()));
                if let Some(d) = &f.description {
                    t.insert("description".into(), Value::String(d.clone()));
                }
                t.insert(
                    "input_schema".into(),
                    openai::tool_input_schema(f.parameters.as_ref()),
                );
                if let Some(cache) = cache_control {
                    t.insert("cache_control".into(), cache.clone());
                }
                // `strict` is not passed on: Anthropic's strict tool use is a feature of some models
                // only, which the others refuse, and the OpenAI Agents SDK sets it on every tool.
                Value::Object(t)
            },
        )
        .collect();
    let has_tools = !tools.is_empty();
    if json_answer.uses_tool()
        && let Some(format) = &req.response_format
    {
        let (description, schema) = match format {
            ResponseFormat::JsonSchema { json_schema } => (
                json_schema
                    .description
                    .clone()
                    .unwrap_or_else(|| format!("Respond with {} as JSON.", json_schema.name)),
                json_schema
                    .schema
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"})),
            ),
            _ => (
                "Respond with a JSON object.".to_owned(),
                json!({"type": "object"}),
            ),
        };
        tools.push(json!({"name": JSON_TOOL, "description": description, "input_schema": schema}));
    }
    let mut tool_choice = match (json_answer, choice) {
        (JsonAnswer::Forced, _) => Some(json!({"type": "tool", "name": JSON_TOOL})),
        (JsonAnswer::Offered, _) => Some(json!({"type": "auto"})),
        (JsonAnswer::NotAsked, None) => None,
        (JsonAnswer::NotAsked, Some(Choice::Auto)) => Some(json!({"type": "auto"})),
        (JsonAnswer::NotAsked, Some(Choice::None)) => Some(json!({"type": "none"})),
        (JsonAnswer::NotAsked, Some(Choice::Required)) => Some(json!({"type": "any"})),
        (JsonAnswer::NotAsked, Some(Choice::Function(name))) => {
            Some(json!({"type": "tool", "name": name}))
        }
    };
    // Without tools the field means nothing; with the JSON tool forced, no other is called.
    if req.parallel_tool_calls == Some(false) && has_tools && json_answer != JsonAnswer::Forced {
        let tc = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(obj) = tc.as_object_mut()
            && obj.get("type") != Some(&Value::from("none"))
        {
            obj.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(tc) = tool_choice {
        body.insert("tool_choice".into(), tc);
    }
    Ok((openai::to_vec(&body), json_answer.uses_tool()))
}

/// `max_tokens` when the client sets none: [`DEFAULT_MAX_TOKENS`] for the answer, beyond the
/// thinking budget when thinking is on (Anthropic wants `budget_tokens` below `max_tokens`).
fn default_max_tokens(rest: &Map<String, Value>) -> u64 {
    let budget = thinking_on(rest)
        .then(|| rest.get("thinking")?.get("budget_tokens")?.as_u64())
        .flatten()
        .unwrap_or(0);
    budget.saturating_add(DEFAULT_MAX_TOKENS)
}

/// A tool result's `content`: its text, or its blocks when it holds images or documents
/// (Anthropic takes them in a tool result); `None` when there is nothing but blank text —
/// Anthropic refuses blank text blocks, and a result without content is an empty one.
fn tool_result_content(content: &Content, i: usize) -> Result<Option<Value>, GatewayError> {
    if content.is_text_only() && !content.has_cache_control() {
        let text = content.text();
        return Ok((!openai::is_blank(&text)).then_some(Value::String(text)));
    }
    let blocks = user_blocks(content, i)?;
    Ok((!blocks.is_empty()).then_some(Value::Array(blocks)))
}

fn user_blocks(content: &Content, i: usize) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        Content::Text(t) if openai::is_blank(t) => return Ok(Vec::new()),
        Content::Text(t) => return Ok(vec![json!({"type": "text", "text": t})]),
        Content::Parts(parts) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let before = blocks.len();
        match p {
            Part::Text { text, .. } | Part::Refusal { refusal: text } => {
                if !openai::is_blank(text) {
                    blocks.push(json!({"type": "text", "text": text}));
                }
            }
            Part::ImageUrl { image_url, .. } => {
                let source = match openai::parse_data_url(&image_url.url) {
                    Some((mime, data)) => {
                        json!({"type": "base64", "media_type": mime, "data": data})
                    }
                    None if image_url.url.starts_with("https://")
                        || image_url.url.starts_with("http://") =>
                    {
                        json!({"type": "url", "url": image_url.url})
                    }
                    None => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}].image_url.url must be an http(s) or base64 data URL"
                        )));
                    }
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            Part::File { file, .. } => {
                let Some((mime, data)) = file.file_data.as_deref().and_then(openai::parse_data_url)
                else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].file: only file_data as a base64 data URL can be expressed for provider anthropic"
                    )));
                };
                blocks.push(json!({"type": "document",
                    "source": {"type": "base64", "media_type": mime, "data": data}}));
            }
            Part::InputAudio { .. } => {
                return Err(openai::unsupported(
                    &format!("messages[{i}].content[{j}] (input_audio)"),
                    PROVIDER,
                ));
            }
        }
        // A prompt-caching breakpoint after this part, as the client marked it.
        if let (Some(cache), Some(Value::Object(block))) =
            (p.cache_control(), blocks.get_mut(before))
        {
            block.insert("cache_control".into(), cache.clone());
        }
    }
    Ok(blocks)
}

/// A text block, with its `cache_control` if any.
fn text_block(text: String, cache_control: Option<Value>) -> Value {
    let mut block = Map::new();
    block.insert("type".into(), Value::from("text"));
    block.insert("text".into(), Value::String(text));
    if let Some(cache) = cache_control {
        block.insert("cache_control".into(), cache);
    }
    Value::Object(block)
}

/// OpenAI `finish_reason` for an Anthropic `stop_reason`; `json_only`: the JSON tool was the
/// only tool called (its input is the answer, the content).
fn finish_reason(stop: &str, json_only: bool) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" if json_only => "stop",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// `message.refusal` of an answer Claude refused (`stop_reason: refusal`) before writing any.
fn refused(stop: &str) -> String {
    format!("the model declined to answer (Anthropic stop_reason {stop})")
}

#[derive(Deserialize)]
struct MessageResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    fn prompt(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
    }
}

/// A complete Messages response as a `chat.completion`.
pub fn response(body: &[u8], ctx: &ResponseCtx) -> Result<Vec<u8>, String> {
    let m: MessageResponse = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected anthropic response: {}", json_error(&e)))?;
    let mut text = String::new();
    let mut json_answer: Option<String> = None;
    let mut tool_calls = Vec::new();
    let mut reasoning = String::new();
    let mut thinking_blocks = Vec::new();
    for block in m.content {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::ToolUse { name, input, .. } if ctx.json_tool && name == JSON_TOOL => {
                json_answer
                    .get_or_insert_with(String::new)
                    .push_str(&input.to_string());
            }
            Block::ToolUse { id, name, input } => {
                tool_calls.push(ToolCallOut::function(id, name, &input));
            }
            Block::Thinking {
                thinking,
                signature,
            } => {
                reasoning.push_str(&thinking);
                thinking_blocks.push(ThinkingBlock::Thinking {
                    thinking,
                    signature,
                });
            }
            Block::RedactedThinking { data } => {
                thinking_blocks.push(ThinkingBlock::RedactedThinking { data });
            }
            Block::Other => {}
        }
    }
    // The JSON tool's input is the whole answer: words around it (possible when it could not
    // be forced) would make the content invalid JSON.
    if let Some(json) = json_answer {
        text = json;
    }
    let stop = m.stop_reason.as_deref().unwrap_or("end_turn");
    let finish = finish_reason(stop, ctx.json_tool && tool_calls.is_empty());
    // A refusal with nothing written says so, as OpenAI's own refusals do.
    let refusal = (finish == "content_filter" && text.is_empty() && tool_calls.is_empty())
        .then(|| refused(stop));
    let completion = Completion {
        id: m.id,
        model: if m.model.is_empty() {
            ctx.model.clone()
        } else {
            m.model
        },
        text: (refusal.is_none() && (!text.is_empty() || tool_calls.is_empty())).then_some(text),
        refusal,
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        thinking_blocks,
        tool_calls,
        finish_reason: finish,
        usage: Usage::new(m.usage.prompt(), m.usage.output_tokens)
            .with_cached(m.usage.cache_read_input_tokens),
    };
    Ok(completion.to_json(ctx.created))
}

/// An Anthropic error body in the OpenAI error shape.
pub fn error(status: u16, body: &[u8]) -> Vec<u8> {
    #[derive(Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(rename = "type", default)]
        kind: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Outer>(body) {
        Ok(o) => openai::error_json(&o.error.message, &o.error.kind, None),
        Err(_) => super::opaque_error(status, body),
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u64,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<DeltaUsage>,
    },
    MessageStop,
    Error {
        error: ErrorBody,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    ToolUse {
        id: String,
        name: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// `message_delta` usage: cumulative counts of the message so far (Anthropic sends the input
/// side too, grown when server tools ran); each count given replaces `message_start`'s.
#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Tool(u32),
    Json,
}

/// Anthropic SSE → `chat.completion.chunk` SSE, event by event.
pub struct Stream {
    sse: SseParser,
    state: StreamState,
}

struct StreamState {
    w: ChunkWriter,
    json_tool: bool,
    /// Tool and JSON blocks by content block index (text blocks need no state).
    blocks: Vec<(u64, BlockKind)>,
    /// The thinking block being streamed (its index, text and signature so far): sent whole
    /// as a `thinking_blocks` delta when it stops, since the client must send it back whole.
    /// Its size is bounded by the request's thinking budget.
    thinking: Option<(u64, String, Option<String>)>,
    /// With the JSON tool, text held back until the answer shows whether the tool was called
    /// (then the tool input alone is the content).
    held_text: String,
    /// Whether the JSON tool was called.
    json_called: bool,
    next_tool: u32,
    /// The prompt's parts as Anthropic counts them: uncached input, cache writes, cache reads.
    input: AnthropicUsage,
    output_tokens: u64,
    /// Whether `message_start` (and its usage) came.
    started: bool,
    done: bool,
}

impl Stream {
    /// A translator for one stream.
    pub fn new(ctx: &ResponseCtx) -> Self {
        Self {
            sse: SseParser::ending_at_oversized(),
            state: StreamState {
                w: ChunkWriter::new(
                    ctx.id.clone(),
                    ctx.model.clone(),
                    ctx.created,
                    ctx.include_usage,
                ),
                json_tool: ctx.json_tool,
                blocks: Vec::new(),
                thinking: None,
                held_text: String::new(),
                json_called: false,
                next_tool: 0,
                input: AnthropicUsage::default(),
                output_tokens: 0,
                started: false,
                done: false,
            },
        }
    }
}

impl StreamTranslator for Stream {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        let Self { sse, state } = self;
        sse.feed(chunk, &mut |e| state.on_event(e, out));
        if sse.too_large() && !state.done {
            state.done = true;
            state
                .w
                .error(out, &super::sse::too_large("anthropic"), "api_error");
        }
    }

    fn hold_in(&mut self, held: crate::buffers::Held) {
        self.sse.hold_in(held);
    }

    fn refused(&self) -> Option<crate::buffers::BudgetExhausted> {
        self.sse.refused()
    }

    fn usage(&self) -> Option<Usage> {
        self.state.started.then(|| self.state.usage())
    }

    fn ended_whole(&self) -> bool {
        self.state.w.sent_done()
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let Self { sse, state } = self;
        sse.finish(&mut |e| state.on_event(e, out));
        if !state.done {
            state.done = true;
            state.w.error(
                out,
                "the anthropic stream ended before message_stop",
                "api_error",
            );
        }
    }
}

impl StreamState {
    fn usage(&self) -> Usage {
        Usage::new(self.input.prompt(), self.output_tokens)
            .with_cached(self.input.cache_read_input_tokens)
    }

    fn block(&self, index: u64) -> Option<BlockKind> {
        self.blocks
            .iter()
            .find_map(|(i, k)| (*i == index).then_some(*k))
    }

    /// Text held back for the JSON tool, as content when the tool was not called.
    fn flush_held_text(&mut self, out: &mut BytesMut) {
        let text = std::mem::take(&mut self.held_text);
        if !self.json_called {
            self.w.content(out, &text);
        }
    }

    fn on_event(&mut self, e: Event<'_>, out: &mut BytesMut) {
        if self.done {
            return;
        }
        let Ok(event) = serde_json::from_str::<StreamEvent>(e.data) else {
            return;
        };
        match event {
            StreamEvent::MessageStart { message } => {
                if !message.id.is_empty() {
                    self.w.id = message.id;
                }
                if !message.model.is_empty() {
                    self.w.model = message.model;
                }
                self.input = message.usage;
                self.output_tokens = message.usage.output_tokens;
                self.started = true;
                self.w.role(out);
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block: StartBlock::ToolUse { id, name },
            } => {
                if self.json_tool && name == JSON_TOOL {
                    self.held_text.clear();
                    self.json_called = true;
                    self.blocks.push((index, BlockKind::Json));
                } else if self.blocks.len() < 1024 {
                    let k = self.next_tool;
                    self.next_tool += 1;
                    self.blocks.push((index, BlockKind::Tool(k)));
                    self.w.tool_start(out, k, &id, &name, "");
                }
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block:
                    StartBlock::Thinking {
                        thinking,
                        signature,
                    },
            } => {
                self.w.reasoning(out, &thinking);
                self.thinking = Some((index, thinking, signature));
            }
            StreamEvent::ContentBlockStart {
                content_block: StartBlock::RedactedThinking { data },
                ..
            } => self
                .w
                .thinking_block(out, &ThinkingBlock::RedactedThinking { data }),
            StreamEvent::ContentBlockStart { .. } => {}
            StreamEvent::ContentBlockStop { index } => {
                if let Some((_, thinking, signature)) =
                    self.thinking.take_if(|(i, _, _)| *i == index)
                {
                    self.w.thinking_block(
                        out,
                        &ThinkingBlock::Thinking {
                            thinking,
                            signature,
                        },
                    );
                }
            }
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if self.json_tool => {
                    if !self.json_called {
                        self.held_text.push_str(&text);
                    }
                }
                BlockDelta::TextDelta { text } => self.w.content(out, &text),
                BlockDelta::ThinkingDelta { thinking } => {
                    if let Some((i, held, _)) = &mut self.thinking
                        && *i == index
                    {
                        held.push_str(&thinking);
                        self.w.reasoning(out, &thinking);
                    }
                }
                BlockDelta::SignatureDelta { signature } => {
                    if let Some((i, _, held)) = &mut self.thinking
                        && *i == index
                    {
                        held.get_or_insert_with(String::new).push_str(&signature);
                    }
                }
                BlockDelta::InputJsonDelta { partial_json } => match self.block(index) {
                    Some(BlockKind::Tool(k)) => self.w.tool_arguments(out, k, &partial_json),
                    Some(BlockKind::Json) => self.w.content(out, &partial_json),
                    None => {}
                },
                BlockDelta::Other => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    if let Some(o) = u.output_tokens {
                        self.output_tokens = o;
                    }
                    if let Some(i) = u.input_tokens {
                        self.input.input_tokens = i;
                    }
                    if let Some(w) = u.cache_creation_input_tokens {
                        self.input.cache_creation_input_tokens = Some(w);
                    }
                    if let Some(r) = u.cache_read_input_tokens {
                        self.input.cache_read_input_tokens = Some(r);
                    }
                }
                if let Some(stop) = delta.stop_reason {
                    self.flush_held_text(out);
                    let json_only = self.json_tool && self.next_tool == 0;
                    let finish = finish_reason(&stop, json_only);
                    if finish == "content_filter" && !self.w.wrote_content() && self.next_tool == 0
                    {
                        self.w.refusal(out, &refused(&stop));
                    }
                    self.w.finish(out, finish);
                }
            }
            StreamEvent::MessageStop => {
                self.flush_held_text(out);
                self.w.finish(out, "stop");
                self.w.done(out, self.usage());
                self.done = true;
            }
            StreamEvent::Error { error } => {
                self.w.error(out, &error.message, &error.kind);
                self.done = true;
            }
            StreamEvent::Other => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::tests::{ctx, deltas, run_stream, thinking_of};
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":12}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn stream_with_text_and_tool_use_translates_to_chunks() {
        let out = run_stream(&mut Stream::new(&ctx(true, false)), &[STREAM.as_bytes()]);
        crate::compat::tests::golden("anthropic_stream_tool.sse", &out);
        assert!(out.contains(r#""tool_calls":[{"index":0,"id":"toolu_1","type":"function","function":{"name":"get_weather","arguments":""}}]"#));
        assert!(out.contains(r#""finish_reason":"tool_calls""#));
        assert!(
            out.contains(r#""usage":{"prompt_tokens":7,"completion_tokens":12,"total_tokens":19}"#)
        );
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn a_streamed_tool_call_without_input_finishes_with_empty_object_arguments() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_a\",\"name\":\"now\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_b\",\"name\":\"today\",\"input\":{}}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":5}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let out = run_stream(&mut Stream::new(&ctx(false, false)), &[stream.as_bytes()]);
        let mut arguments = [String::new(), String::new()];
        for event in out.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            let Ok(v) = serde_json::from_str::<Value>(event) else {
                continue;
            };
            if let Some(tc) = v.pointer("/choices/0/delta/tool_calls/0") {
                let k = tc["index"].as_u64().expect("index") as usize;
                arguments[k].push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        assert_eq!(arguments, ["{}", "{}"], "{out}");
        let finish = out.find(r#""finish_reason":"tool_calls""#).expect("finish");
        assert!(
            out.rfind(r#""arguments":"{}""#).expect("args") < finish,
            "{out}"
        );
        let plain = br#"{"id":"m","model":"b","content":[{"type":"tool_use","id":"t","name":"now"}],"stop_reason":"tool_use","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let v: Value = serde_json::from_slice(&response(plain, &ctx(false, false)).expect("ok"))
            .expect("json");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
    }

    #[test]
    fn temperature_is_held_to_anthropics_range_and_safety_identifier_is_the_user() {
        let req = ChatRequest::parse(
            br#"{"model":"anthropic/claude-x","temperature":1.6,"safety_identifier":"u-42",
            "metadata":{"team":"x"},"service_tier":"auto","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .expect("parse");
        let (body, _) = request(req, "claude-x").expect("translate");
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["metadata"], json!({"user_id": "u-42"}));
        assert!(body.get("service_tier").is_none(), "{body}");
    }

    #[test]
    fn request_maps_system_tools_images_and_tool_results() {
        let req = ChatRequest::parse(
            br#"{"model":"anthropic/claude-x","max_tokens":100,"stop":"END","top_k":5,
            "messages":[
              {"role":"system","content":"be brief"},
              {"role":"user","content":[{"type":"text","text":"what is here?"},
                 {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0K"}},
                 {"type":"image_url","image_url":{"url":"https://example.com/cat.jpg"}}]},
              {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"look","arguments":"{\"x\":1}"}}]},
              {"role":"tool","tool_call_id":"call_1","content":"a cat"}],
            "tools":[{"type":"function","function":{"name":"look","description":"d","parameters":{"type":"object","properties":{"x":{"type":"integer"}}}}}],
            "tool_choice":"required","parallel_tool_calls":false}"#,
        )
        .expect("parse");
        let (body, json_tool) = request(req, "claude-x").expect("translate");
        assert!(!json_tool);
        crate::compat::tests::golden_json("anthropic_request.json", &body);
    }

    #[test]
    fn response_format_json_schema_becomes_a_forced_tool_and_comes_back_as_content() {
        let req = ChatRequest::parse(
            br#"{"model":"a/b","messages":[{"role":"user","content":"hi"}],
            "response_format":{"type":"json_schema","json_schema":{"name":"person","schema":{"type":"object"}}}}"#,
        )
        .expect("parse");
        let (body, json_tool) = request(req, "b").expect("translate");
        assert!(json_tool);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));
        let resp = br#"{"id":"msg_2","model":"b","content":[{"type":"tool_use","id":"t","name":"json_response","input":{"name":"Ada"}}],"stop_reason":"tool_use","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let out: Value =
            serde_json::from_slice(&response(resp, &ctx(false, true)).expect("ok")).expect("json");
        assert_eq!(out["choices"][0]["message"]["content"], r#"{"name":"Ada"}"#);
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
    }

    const THINKING_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_t\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Paris is \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"in France.\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqoBsig==\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"redacted_thinking\",\"data\":\"EmwKAhgBEgy\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":30}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    /// The `choices[0].delta` objects of a translated stream.
    #[test]
    fn streamed_thinking_is_reasoning_content_then_the_signed_block_before_the_tool_call() {
        let out = run_stream(
            &mut Stream::new(&ctx(false, false)),
            &[THINKING_STREAM.as_bytes()],
        );
        let deltas = deltas(&out);
        let (reasoning, blocks) = thinking_of(&deltas);
        assert_eq!(reasoning, "Paris is in France.", "{out}");
        assert_eq!(
            blocks,
            [
                &json!({"index": 0, "type": "thinking", "thinking": "Paris is in France.", "signature": "EqoBsig=="}),
                &json!({"index": 1, "type": "redacted_thinking", "data": "EmwKAhgBEgy"}),
            ],
            "{out}"
        );
        let block_at = deltas
            .iter()
            .position(|d| d.get("thinking_blocks").is_some())
            .expect("block");
        let tool_at = deltas
            .iter()
            .position(|d| d.get("tool_calls").is_some())
            .expect("tool");
        assert!(block_at < tool_at, "{out}");
        assert!(out.contains(r#""finish_reason":"tool_calls""#), "{out}");
    }

    #[test]
    fn answered_thinking_is_reasoning_content_and_thinking_blocks_of_the_message() {
        let resp = br#"{"id":"msg_t","model":"claude-x","content":[
            {"type":"thinking","thinking":"Paris is in France.","signature":"EqoBsig=="},
            {"type":"redacted_thinking","data":"EmwKAhgBEgy"},
            {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":30}}"#;
        let out: Value =
            serde_json::from_slice(&response(resp, &ctx(false, false)).expect("ok")).expect("json");
        let message = &out["choices"][0]["message"];
        assert_eq!(message["reasoning_content"], "Paris is in France.");
        assert_eq!(
            message["thinking_blocks"],
            json!([{"type": "thinking", "thinking": "Paris is in France.", "signature": "EqoBsig=="},
                   {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}])
        );
        assert_eq!(message["tool_calls"][0]["id"], "toolu_1");
        let plain = br#"{"id":"m","model":"b","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;
        let out: Value = serde_json::from_slice(&response(plain, &ctx(false, false)).expect("ok"))
            .expect("json");
        assert!(
            out["choices"][0]["message"]
                .get("reasoning_content")
                .is_none(),
            "{out}"
        );
        assert!(
            out["choices"][0]["message"]
                .get("thinking_blocks")
                .is_none(),
            "{out}"
        );
    }

    #[test]
    fn thinking_blocks_sent_back_open_the_assistant_turn_unchanged() {
        let req = ChatRequest::parse(
            br#"{"model":"anthropic/claude-x","thinking":{"type":"enabled","budget_tokens":2048},
            "messages":[
              {"role":"user","content":"weather in Paris?"},
              {"role":"assistant","content":"Let me look.","reasoning_content":"Paris is in France.",
               "thinking_blocks":[{"type":"thinking","thinking":"Paris is in France.","signature":"EqoBsig=="},
                                  {"type":"redacted_thinking","data":"EmwKAhgBEgy"}],
               "tool_calls":[{"id":"toolu_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
              {"role":"tool","tool_call_id":"toolu_1","content":"sunny"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]}"#,
        )
        .expect("parse");
        let (body, _) = request(req, "claude-x").expect("translate");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v["thinking"],
            json!({"type": "enabled", "budget_tokens": 2048})
        );
        assert_eq!(
            v["messages"][1],
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Paris is in France.", "signature": "EqoBsig=="},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]})
        );
        assert!(v["messages"][1].get("reasoning_content").is_none());
    }

    #[test]
    fn response_format_json_with_thinking_offers_the_json_tool_without_forcing_it() {
        let req = ChatRequest::parse(
            br#"{"model":"a/b","thinking":{"type":"enabled","budget_tokens":1024},
            "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],
            "response_format":{"type":"json_object"}}"#,
        )
        .expect("parse");
        let (body, json_tool) = request(req, "b").expect("translate");
        assert!(json_tool);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["tool_choice"], json!({"type": "auto"}));
        assert_eq!(v["tools"][0]["name"], JSON_TOOL);
        assert_eq!(
            v["system"],
            format!("be brief\n\n{JSON_TOOL_INSTRUCTION}"),
            "{v}"
        );
        // Words before the tool call stay out of the JSON content.
        let resp = br#"{"id":"m","model":"b","content":[
            {"type":"thinking","thinking":"t","signature":"s"},
            {"type":"text","text":"Here it is:"},
            {"type":"tool_use","id":"t","name":"json_response","input":{"a":1}}],
            "stop_reason":"tool_use","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let out: Value =
            serde_json::from_slice(&response(resp, &ctx(false, true)).expect("ok")).expect("json");
        assert_eq!(out["choices"][0]["message"]["content"], r#"{"a":1}"#);
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Here it is:\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"json_response\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":4}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let out = run_stream(&mut Stream::new(&ctx(false, true)), &[stream.as_bytes()]);
        let content: String = deltas(&out)
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(content, r#"{"a":1}"#, "{out}");
        // Without the tool call, the text is the answer.
        let text_only = stream.replace("json_response", "other_tool");
        let out = run_stream(&mut Stream::new(&ctx(false, true)), &[text_only.as_bytes()]);
        let content: String = deltas(&out)
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(content, "Here it is:", "{out}");
    }

    #[test]
    fn cache_reads_are_part_of_the_prompt_and_named_in_the_details() {
        let resp = br#"{"id":"msg_3","model":"b","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":4}}"#;
        let out: Value =
            serde_json::from_slice(&response(resp, &ctx(false, false)).expect("ok")).expect("json");
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 115, "completion_tokens": 4, "total_tokens": 119,
                   "prompt_tokens_details": {"cached_tokens": 100}})
        );
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let out = run_stream(&mut Stream::new(&ctx(true, false)), &[stream.as_bytes()]);
        assert!(
            out.contains(r#""usage":{"prompt_tokens":110,"completion_tokens":4,"total_tokens":114,"prompt_tokens_details":{"cached_tokens":100}}"#),
            "{out}"
        );
    }

    /// The Messages body for a chat completion request body.
    fn translated(body: Value) -> Value {
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parse");
        let (body, _) = request(req, "claude-x").expect("translate");
        serde_json::from_slice(&body).expect("json")
    }

    #[test]
    fn a_blank_last_user_message_is_refused_not_turned_into_a_prefill() {
        let req = |last: &str| {
            let body = json!({"model": "anthropic/claude-x", "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": last}]});
            request(
                ChatRequest::parse(body.to_string().as_bytes()).expect("parse"),
                "claude-x",
            )
        };
        let err = req("  \n").expect_err("refused");
        assert_eq!(err.status().as_u16(), 400);
        assert!(err.to_string().contains("messages[2]"), "{err}");
        assert!(req("and?").is_ok());
    }

    #[test]
    fn cache_control_marks_reach_anthropic_where_the_client_put_them() {
        let mark = json!({"type": "ephemeral"});
        let v = translated(json!({"model": "anthropic/claude-x",
            "messages": [
                {"role": "system", "content": [
                    {"type": "text", "text": "long rules", "cache_control": mark},
                    {"type": "text", "text": "today"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "a long document", "cache_control": mark},
                    {"type": "text", "text": "question"}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [
                    {"type": "text", "text": "result", "cache_control": mark}]}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}},
                       "cache_control": mark}]}));
        assert_eq!(
            v["system"],
            json!([{"type": "text", "text": "long rules", "cache_control": mark},
                   {"type": "text", "text": "today"}])
        );
        assert_eq!(
            v["messages"][0]["content"],
            json!([{"type": "text", "text": "a long document", "cache_control": mark},
                   {"type": "text", "text": "question"}])
        );
        assert_eq!(
            v["messages"][2]["content"][0]["content"],
            json!([{"type": "text", "text": "result", "cache_control": mark}])
        );
        assert_eq!(v["tools"][0]["cache_control"], mark);
        assert_eq!(v["tools"][0]["input_schema"], json!({"type": "object"}));
        // Without marks the system prompt stays one string.
        let plain = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "hi"}]}));
        assert!(plain["system"].is_string(), "{plain}");
    }

    #[test]
    fn blank_text_is_left_out_and_a_turn_left_empty_merges_with_its_neighbours() {
        // Claude answers "\n\n" before a tool call; clients send it back, and tools return "".
        let v = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "system", "content": "  "},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "\n\n", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": " "},
                {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/"}}]},
            {"role": "assistant", "content": " \t "},
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "go on"}]}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}));
        assert!(v.get("system").is_none(), "{v}");
        assert_eq!(
            v["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}},
                    {"type": "text", "text": "go on"}]}]),
            "{v}"
        );
    }

    #[test]
    fn tool_results_with_images_become_blocks_and_text_stays_a_string() {
        let v = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "user", "content": "look"},
            {"role": "assistant", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": ""}},
                {"id": "t2", "type": "function", "function": {"name": "shot", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "t1", "content": [
                {"type": "text", "text": "the screen:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
            {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "done"}]}]}));
        assert_eq!(
            v["messages"][2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "the screen:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "done"}]),
            "{v}"
        );
    }

    #[test]
    fn arguments_that_do_not_parse_go_as_a_raw_wrapper_and_the_conversation_goes_on() {
        let v = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Par"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "cut off"}]}));
        assert_eq!(
            v["messages"][1]["content"][0]["input"],
            json!({"_raw": "{\"city\": \"Par"})
        );
    }

    #[test]
    fn the_default_max_tokens_leaves_room_beyond_the_thinking_budget() {
        let ask = |extra: Value| {
            let mut body = json!({"model": "a/b", "messages": [{"role": "user", "content": "hi"}]});
            if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
                b.extend(e);
            }
            translated(body)["max_tokens"].clone()
        };
        assert_eq!(ask(json!({})), DEFAULT_MAX_TOKENS);
        assert_eq!(
            ask(json!({"thinking": {"type": "enabled", "budget_tokens": 10000}})),
            10000 + DEFAULT_MAX_TOKENS
        );
        assert_eq!(
            ask(json!({"thinking": {"type": "disabled", "budget_tokens": 10000}})),
            DEFAULT_MAX_TOKENS
        );
        assert_eq!(
            ask(json!({"thinking": {"type": "adaptive"}})),
            DEFAULT_MAX_TOKENS
        );
        assert_eq!(
            ask(
                json!({"max_tokens": 20000, "thinking": {"type": "enabled", "budget_tokens": 10000}})
            ),
            20000
        );
    }

    #[test]
    fn strict_is_not_passed_on_to_models_that_may_refuse_it() {
        let v = translated(
            json!({"model": "a/b", "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "s", "strict": true, "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "l", "strict": false}}]}),
        );
        assert!(v["tools"][0].get("strict").is_none(), "{v}");
        assert!(v["tools"][1].get("strict").is_none(), "{v}");
        let v = translated(
            json!({"model": "a/b", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true,
                "schema": {"type": "object"}}}}),
        );
        assert_eq!(v["tools"][0]["name"], JSON_TOOL);
        assert!(v["tools"][0].get("strict").is_none(), "{v}");
    }

    #[test]
    fn message_delta_usage_replaces_the_input_counts_of_message_start() {
        // Current Anthropic streams repeat the input side in message_delta, cumulative (grown
        // when server tools ran).
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":200,\"output_tokens\":9}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut t = Stream::new(&ctx(true, false));
        run_stream(&mut t, &[stream.as_bytes()]);
        assert_eq!(t.usage(), Some(Usage::new(230, 9).with_cached(Some(200))));
        // A delta with the output alone keeps message_start's input.
        let mut t = Stream::new(&ctx(true, false));
        run_stream(&mut t, &[STREAM.as_bytes()]);
        assert_eq!(t.usage(), Some(Usage::new(7, 12)));
    }

    #[test]
    fn anthropic_errors_take_the_openai_shape() {
        let out = error(
            429,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        );
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }

    #[test]
    fn a_stream_cut_before_message_stop_ends_with_an_error_event_and_not_whole() {
        let cut = &STREAM[..STREAM.find("event: message_delta").expect("has delta")];
        let mut t = Stream::new(&ctx(false, false));
        let out = run_stream(&mut t, &[cut.as_bytes()]);
        assert!(out.contains("ended before message_stop"), "{out}");
        assert!(!out.contains("[DONE]"));
        assert!(!t.ended_whole());
        let mut whole = Stream::new(&ctx(false, false));
        run_stream(&mut whole, &[STREAM.as_bytes()]);
        assert!(whole.ended_whole());
        // Broken off by the upstream's error event: not whole either.
        let overloaded = format!(
            "{cut}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
        );
        let mut broken = Stream::new(&ctx(false, false));
        let out = run_stream(&mut broken, &[overloaded.as_bytes()]);
        assert!(out.contains("Overloaded"), "{out}");
        assert!(!broken.ended_whole());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

        #[test]
        fn any_chunking_gives_the_same_output(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..20)) {
            let whole = run_stream(&mut Stream::new(&ctx(true, false)), &[STREAM.as_bytes()]);
            let pieces = crate::compat::tests::cut(STREAM.as_bytes(), cuts);
            prop_assert_eq!(run_stream(&mut Stream::new(&ctx(true, false)), &pieces), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       cuts in proptest::collection::vec(0usize..2048, 0..10)) {
            let pieces = crate::compat::tests::cut(&data, cuts);
            let _ = run_stream(&mut Stream::new(&ctx(true, true)), &pieces);
        }

        #[test]
        fn any_chunking_of_thinking_gives_the_same_output(cuts in proptest::collection::vec(0usize..THINKING_STREAM.len(), 0..20)) {
            let whole = run_stream(&mut Stream::new(&ctx(true, false)), &[THINKING_STREAM.as_bytes()]);
            let pieces = crate::compat::tests::cut(THINKING_STREAM.as_bytes(), cuts);
            prop_assert_eq!(run_stream(&mut Stream::new(&ctx(true, false)), &pieces), whole);
        }

        #[test]
        fn shuffled_real_events_never_panic(order in proptest::collection::vec(0usize..11, 0..30)) {
            let events: Vec<&str> = STREAM.split_inclusive("\n\n").collect();
            let text: String = order.iter().map(|&i| events[i % events.len()]).collect();
            let _ = run_stream(&mut Stream::new(&ctx(true, true)), &[text.as_bytes()]);
        }
    }

    #[test]
    fn an_instruction_after_the_assistants_answer_is_the_users_last_turn_not_a_prefill() {
        let v = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "system", "content": "You write haiku."},
            {"role": "user", "content": "Write a haiku about rain."},
            {"role": "assistant", "content": "Soft rain on the roof"},
            {"role": "developer", "content": "Now rate it."},
            {"role": "system", "content": [{"type": "text", "text": "From 1 to 10.",
                "cache_control": {"type": "ephemeral"}}]}]}));
        assert_eq!(v["system"], "You write haiku.");
        assert_eq!(
            v["messages"][2],
            json!({"role": "user", "content": [
                {"type": "text", "text": "Now rate it."},
                {"type": "text", "text": "From 1 to 10.", "cache_control": {"type": "ephemeral"}}]})
        );
        // One before the assistant's message stays in the system prompt; one after a tool
        // result too (the turns end on the user's already).
        let v = translated(json!({"model": "anthropic/claude-x", "messages": [
            {"role": "user", "content": "Q"},
            {"role": "developer", "content": "Be brief."},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "developer", "content": "One sentence."}]}));
        assert_eq!(v["system"], "Be brief.\n\nOne sentence.");
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(3));
        // Blank, it is refused as a blank user message is.
        let req = ChatRequest::parse(
            json!({"model": "anthropic/claude-x", "messages": [
                {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                {"role": "developer", "content": " "}]})
            .to_string()
            .as_bytes(),
        )
        .expect("parse");
        let err = request(req, "claude-x").expect_err("refused");
        assert!(
            err.to_string()
                .contains("messages[2]: a developer message of blank text"),
            "{err}"
        );
    }

    #[test]
    fn tools_with_a_json_schema_answer_offer_the_json_tool_beside_them_unforced() {
        let body = |extra: Value| {
            let mut body = json!({"model": "anthropic/claude-x",
                "messages": [{"role": "user", "content": "Oslo?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "verdict",
                    "schema": {"type": "object", "properties": {"verdict": {"type": "string"}}}}}});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            ChatRequest::parse(body.to_string().as_bytes()).expect("parse")
        };
        let (sent, json_tool) =
            request(body(json!({"parallel_tool_calls": false})), "claude-x").expect("served");
        assert!(json_tool);
        let v: Value = serde_json::from_slice(&sent).expect("json");
        let names: Vec<&str> = v["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(names, ["get_weather", JSON_TOOL]);
        assert_eq!(
            v["tools"][1]["input_schema"],
            json!({"type": "object", "properties": {"verdict": {"type": "string"}}})
        );
        assert_eq!(
            v["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert_eq!(v["system"], JSON_TOOL_INSTRUCTION);
        // tool_choice none: the JSON tool forced, the agent's tools still declared.
        let (sent, json_tool) =
            request(body(json!({"tool_choice": "none"})), "claude-x").expect("served");
        assert!(json_tool);
        let v: Value = serde_json::from_slice(&sent).expect("json");
        assert_eq!(v["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));
        assert_eq!(v["tools"].as_array().map(Vec::len), Some(2));
        assert!(v.get("system").is_none(), "{v}");
        // A call forced: the answer is that call; no JSON tool.
        let (sent, json_tool) = request(
            body(json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}})),
            "claude-x",
        )
        .expect("served");
        assert!(!json_tool);
        let v: Value = serde_json::from_slice(&sent).expect("json");
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": "get_weather"})
        );
        assert_eq!(v["tools"].as_array().map(Vec::len), Some(1));
        // Thinking: none beside tools cannot be expressed (no forced tool while thinking).
        let err = request(
            body(json!({"tool_choice": "none",
                "thinking": {"type": "enabled", "budget_tokens": 1024}})),
            "claude-x",
        )
        .expect_err("refused");
        assert!(err.to_string().contains("tool_choice none"), "{err}");
    }

    #[test]
    fn with_the_json_tool_offered_a_call_of_another_tool_finishes_as_tool_calls() {
        let called = br#"{"id":"m","model":"b","content":[{"type":"text","text":"Checking."},
            {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Oslo"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let v: Value = serde_json::from_slice(&response(called, &ctx(false, true)).expect("ok"))
            .expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["choices"][0]["message"]["content"], "Checking.");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        // Streamed: the tool call, then the words held back for the JSON tool, as content.
        let out = run_stream(&mut Stream::new(&ctx(false, true)), &[STREAM.as_bytes()]);
        assert!(out.contains(r#""finish_reason":"tool_calls""#), "{out}");
        let d = deltas(&out);
        let text: String = d.iter().filter_map(|d| d["content"].as_str()).collect();
        assert_eq!(text, "Hi ");
        assert!(
            d.iter()
                .any(|d| d["tool_calls"][0]["function"]["name"] == "get_weather")
        );
        // The JSON tool alone: its input is the content, and the answer finished.
        let answered = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_2\",\"name\":\"json_response\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"verdict\\\":\\\"cold\\\"}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":5}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let out = run_stream(&mut Stream::new(&ctx(false, true)), &[answered.as_bytes()]);
        assert!(out.contains(r#""finish_reason":"stop""#), "{out}");
        let text: String = deltas(&out)
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(text, r#"{"verdict":"cold"}"#);
    }

    #[test]
    fn a_refusal_with_nothing_written_says_so_in_message_refusal() {
        let refused_body = br#"{"id":"m","model":"b","content":[],"stop_reason":"refusal",
            "usage":{"input_tokens":3,"output_tokens":0}}"#;
        let v: Value =
            serde_json::from_slice(&response(refused_body, &ctx(false, false)).expect("ok"))
                .expect("json");
        let message = &v["choices"][0]["message"];
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(message["content"], Value::Null);
        assert!(
            message["refusal"]
                .as_str()
                .is_some_and(|r| r.contains("stop_reason refusal")),
            "{v}"
        );
        // Words written before it are the answer, as Gemini's are.
        let partial = br#"{"id":"m","model":"b","content":[{"type":"text","text":"Here"}],
            "stop_reason":"refusal","usage":{"input_tokens":3,"output_tokens":1}}"#;
        let v: Value = serde_json::from_slice(&response(partial, &ctx(false, false)).expect("ok"))
            .expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], "Here");
        assert!(v["choices"][0]["message"].get("refusal").is_none(), "{v}");
        let stream = |text: &str| {
            format!(
                "{}{}{}",
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
                if text.is_empty() {
                    String::new()
                } else {
                    format!(
                        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
                    )
                },
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal\"},\"usage\":{\"output_tokens\":1}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            )
        };
        for (text, refused_too) in [("", true), ("Here", false)] {
            let out = run_stream(&mut Stream::new(&ctx(false, false)), &[stream(text)]);
            let d = deltas(&out);
            let refusal: String = d.iter().filter_map(|d| d["refusal"].as_str()).collect();
            assert_eq!(
                refusal.contains("stop_reason refusal"),
                refused_too,
                "{out}"
            );
            assert!(out.contains(r#""finish_reason":"content_filter""#), "{out}");
        }
    }

    #[test]
    fn an_event_too_large_to_translate_ends_the_stream_with_an_error_not_in_silence() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"b\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
        let big = format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
            "x".repeat(crate::compat::sse::MAX_EVENT_BYTES)
        );
        let rest = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut t = Stream::new(&ctx(false, false));
        let chunks: Vec<&[u8]> = [start.as_bytes(), big.as_bytes(), rest.as_bytes()]
            .into_iter()
            .flat_map(|c| c.chunks(1 << 20))
            .collect();
        let out = run_stream(&mut t, &chunks);
        assert!(!t.ended_whole());
        let last = out.trim_end().rsplit("\n\n").next().expect("event");
        assert!(
            last.contains("larger than 8 MiB") && last.contains(r#""type":"api_error""#),
            "{last}"
        );
        assert!(
            !out.contains("[DONE]") && !out.contains("finish_reason\":\"stop"),
            "{out}"
        );
        let text: String = deltas(&out)
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(text, "Hi");
    }
}
