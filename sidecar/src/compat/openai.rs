//! The OpenAI side of `/compat`: the request types clients send (typed, unknown fields kept in
//! `rest`), the `chat.completion` / `chat.completion.chunk` / embedding shapes sent back, the
//! OpenAI error shape, and the OpenAI-compatible providers (which only need the model rewritten).

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::error::json_error;

/// A chat completion request.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub logit_bias: Option<Map<String, Value>>,
    /// OpenAI-only features: refused unless the provider can express them.
    #[serde(default)]
    pub reasoning_effort: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub prediction: Option<Value>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub web_search_options: Option<Value>,
    /// The deprecated function-calling fields: refused (`tools` say the same).
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    /// OpenAI's successor of `user`: translated (or refused) like it.
    #[serde(default)]
    pub safety_identifier: Option<String>,
    /// OpenAI's own bookkeeping and hints: never sent to another format (they mean nothing
    /// there, and native APIs refuse fields they do not know).
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub service_tier: Option<Value>,
    #[serde(default)]
    pub prompt_cache_key: Option<Value>,
    #[serde(default)]
    pub prompt_cache_retention: Option<Value>,
    #[serde(default)]
    pub verbosity: Option<Value>,
    /// Fields this version does not know: passed to providers that accept top-level extras
    /// (a provider's own parameters, sent with the SDK's `extra_body`).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one sequence or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The sequences as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// A chat message, by role.
#[derive(Debug, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    System {
        content: Content,
        /// Participant name: refused by translators that cannot express it.
        #[serde(default)]
        name: Option<String>,
    },
    Developer {
        content: Content,
        #[serde(default)]
        name: Option<String>,
    },
    User {
        content: Content,
        #[serde(default)]
        name: Option<String>,
    },
    Assistant {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        content: Option<Content>,
        #[serde(default)]
        tool_calls: Option<Vec<ToolCall>>,
        #[serde(default)]
        refusal: Option<String>,
        #[serde(default)]
        function_call: Option<Value>,
        #[serde(default)]
        audio: Option<Value>,
        /// Anthropic's thinking of this turn as it was answered (LiteLLM's field): sent back
        /// unchanged, since Anthropic wants a tool-use turn to start with its signed thinking.
        #[serde(default)]
        thinking_blocks: Option<Vec<ThinkingBlock>>,
    },
    Tool {
        content: Content,
        tool_call_id: String,
    },
    Function {
        #[serde(default)]
        content: Option<Value>,
    },
}

/// Message content: a string or typed parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// Whether a text is empty or only whitespace: Anthropic, Bedrock and Google refuse such text
/// blocks (Claude often answers `"\n\n"` before a tool call, and clients send it back), so
/// translators leave them out.
pub fn is_blank(text: &str) -> bool {
    text.trim().is_empty()
}

impl Content {
    /// Whether every part is text (or a refusal): nothing but [`Content::text`] to send.
    pub fn is_text_only(&self) -> bool {
        match self {
            Content::Text(_) => true,
            Content::Parts(parts) => parts
                .iter()
                .all(|p| matches!(p, Part::Text { .. } | Part::Refusal { .. })),
        }
    }

    /// Whether a part carries a `cache_control` (which keeps the parts blocks of their own).
    pub fn has_cache_control(&self) -> bool {
        matches!(self, Content::Parts(parts) if parts.iter().any(|p| p.cache_control().is_some()))
    }

    /// The first part that is not text, with its index, for errors naming it.
    pub fn first_non_text(&self) -> Option<usize> {
        match self {
            Content::Text(_) => None,
            Content::Parts(parts) => parts
                .iter()
                .position(|p| !matches!(p, Part::Text { .. } | Part::Refusal { .. })),
        }
    }

    /// All text parts joined with a newline (non-text parts are the caller's concern).
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text, .. } => Some(text.as_str()),
                    Part::Refusal { refusal } => Some(refusal.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A content part. Text, images and files may carry Anthropic's `cache_control` (as LiteLLM
/// takes it), a prompt-caching breakpoint after them.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    ImageUrl {
        image_url: ImageUrl,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    InputAudio {
        input_audio: Value,
    },
    File {
        file: FilePart,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    Refusal {
        refusal: String,
    },
}

impl Part {
    /// The part's `cache_control`, if it has one.
    pub fn cache_control(&self) -> Option<&Value> {
        match self {
            Part::Text { cache_control, .. }
            | Part::ImageUrl { cache_control, .. }
            | Part::File { cache_control, .. } => cache_control.as_ref(),
            Part::InputAudio { .. } | Part::Refusal { .. } => None,
        }
    }
}

/// `image_url` of a part.
#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default)]
    pub detail: Option<String>,
}

/// `file` of a part.
#[derive(Debug, Deserialize)]
pub struct FilePart {
    #[serde(default)]
    pub file_data: Option<String>,
    #[serde(default)]
    pub file_id: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
}

/// A block of Claude's extended thinking, in LiteLLM's `thinking_blocks` shape (Anthropic's own
/// block shape): answered with the message and sent back with it, unchanged.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ThinkingBlock {
    Thinking {
        thinking: String,
        /// Anthropic's proof that the thinking is its own; it refuses the block without it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
}

/// A tool call made by the assistant earlier in the conversation.
#[derive(Debug, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub function: FunctionCall,
}

/// Appends a turn of `role`, merged into the previous turn when it has the same role: the
/// translated APIs want user and assistant turns to alternate. A turn without blocks (a
/// message of blank text only) is left out: they refuse empty turns, and the turns around it
/// merge when they meet.
pub fn push_turn(
    turns: &mut Vec<(&'static str, Vec<Value>)>,
    role: &'static str,
    blocks: Vec<Value>,
) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((last, content)) if *last == role => content.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

/// Where the system and developer messages that end a conversation after an assistant
/// message begin (an instruction after the answer: "now rate it", a reflection step);
/// `messages.len()` when none do. OpenAI answers them with a new message, where lifted into
/// the translated system prompt they would leave the turns ending on the assistant's: a
/// prefill, which Claude goes on from (newer Claude models refuse it). Translators send them
/// as the user's last turn instead.
pub fn trailing_instructions(messages: &[Message]) -> usize {
    let last_turn = messages
        .iter()
        .rposition(|m| !matches!(m, Message::System { .. } | Message::Developer { .. }));
    match last_turn {
        Some(i) if matches!(messages[i], Message::Assistant { .. }) => i + 1,
        _ => messages.len(),
    }
}

/// Refuses a conversation that asks for an answer — its last message is the user's, a tool
/// result, or a [`trailing_instructions`] one — but whose translated turns end on the
/// assistant's (`"assistant"` or Gemini's `"model"`): its last message was blank text, which
/// the translated APIs refuse and leave out, and the model would go on from the assistant's
/// text (a prefill) instead of answering. `i` names the message in the error.
pub fn ends_where_sent(
    messages: &[Message],
    turns: &[(&'static str, Vec<Value>)],
    provider: &str,
) -> Result<(), GatewayError> {
    let role = match messages.last() {
        Some(Message::User { .. } | Message::Tool { .. }) => "user",
        Some(Message::System { .. }) if trailing_instructions(messages) < messages.len() => {
            "system"
        }
        Some(Message::Developer { .. }) if trailing_instructions(messages) < messages.len() => {
            "developer"
        }
        _ => return Ok(()),
    };
    if turns.last().is_none_or(|(last, _)| *last != "user") {
        return Err(bad(format!(
            "messages[{}]: a {role} message of blank text cannot be expressed for provider {provider} (it refuses blank text); send text",
            messages.len() - 1
        )));
    }
    Ok(())
}

/// Ends a conversation that ends on the assistant's turn (a prefill: the model goes on from
/// that text) without trailing whitespace in its last text block, which Claude refuses ("final
/// assistant content cannot end with trailing whitespace") where OpenAI takes it: the text is
/// trimmed at its end, a block left blank dropped, and a turn left empty too. Text blocks are
/// `{"text": ...}` (Anthropic's also say `"type": "text"`).
pub fn trim_prefill(turns: &mut Vec<(&'static str, Vec<Value>)>) {
    let Some(("assistant", blocks)) = turns.last_mut() else {
        return;
    };
    let Some(Value::Object(block)) = blocks.last_mut() else {
        return;
    };
    if block.get("type").is_some_and(|t| t != "text") {
        return;
    }
    let Some(Value::String(text)) = block.get_mut("text") else {
        return;
    };
    text.truncate(text.trim_end().len());
    if text.is_empty() {
        blocks.pop();
        if blocks.is_empty() {
            turns.pop();
        }
    }
}

/// A function's `parameters` as a tool input schema for Anthropic and Bedrock, which want an
/// object schema with its `type`: none is an empty object schema (OpenAI: "omitting parameters
/// defines a function with an empty parameter list"), and an object schema without `type`
/// (`{}`, which OpenAI takes) gets `"type": "object"`.
pub fn tool_input_schema(parameters: Option<&Value>) -> Value {
    match parameters {
        None => serde_json::json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) if !schema.contains_key("type") => {
            let mut schema = schema.clone();
            schema.insert("type".into(), Value::from("object"));
            Value::Object(schema)
        }
        Some(schema) => schema.clone(),
    }
}

/// Between a tool call's id and the Gemini thought signature it carries (see `gemini`).
pub const SIGNATURE_MARK: &str = "~ts~";

/// A tool call id as another provider takes it (`[A-Za-z0-9_-]`, at most `max` characters):
/// without a Gemini thought signature, and when what is left does not fit either, `call_` and
/// a hash of it, so that a call and its result still match.
pub fn portable_call_id(id: &str, max: usize) -> std::borrow::Cow<'_, str> {
    use sha2::Digest as _;
    let base = id.split_once(SIGNATURE_MARK).map_or(id, |(base, _)| base);
    let fits = !base.is_empty()
        && base.len() <= max
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if fits {
        return std::borrow::Cow::Borrowed(base);
    }
    let digest = sha2::Sha256::digest(base.as_bytes());
    std::borrow::Cow::Owned(format!("call_{}", hex::encode(&digest[..12])))
}

/// Longest tool call id OpenAI takes.
const OPENAI_MAX_CALL_ID: usize = 40;

/// The history of a request made fit for an OpenAI-format provider: tool call ids made
/// [`portable_call_id`]s (ids from Gemini carry signatures and run long), and `thinking_blocks`
/// left out of its messages — the gateway's Anthropic and Bedrock signed thinking, which no
/// OpenAI-format provider takes (OpenAI refuses unknown message fields). `reasoning_content`
/// stays: DeepSeek wants it back within a turn of tool calls.
fn portable_history(map: &mut Map<String, Value>) {
    let Some(Value::Array(messages)) = map.get_mut("messages") else {
        return;
    };
    let fix = |v: &mut Value| {
        if let Value::String(id) = v {
            let portable = portable_call_id(id, OPENAI_MAX_CALL_ID).into_owned();
            if portable != *id {
                *id = portable;
            }
        }
    };
    for m in messages.iter_mut() {
        if let Some(m) = m.as_object_mut() {
            m.shift_remove("thinking_blocks");
        }
        if let Some(id) = m.get_mut("tool_call_id") {
            fix(id);
        }
        if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
            for call in calls {
                if let Some(id) = call.get_mut("id") {
                    fix(id);
                }
            }
        }
    }
}

/// A tool call with its arguments parsed.
pub type ParsedCall<'a> = (&'a ToolCall, Value);

/// What every translator takes from an assistant message: its text (if any is not blank) and
/// its tool calls with their arguments as a JSON object (see [`FunctionCall::arguments_json`]).
pub fn assistant_parts<'a>(
    content: &Option<Content>,
    tool_calls: &'a Option<Vec<ToolCall>>,
) -> (Option<String>, Vec<ParsedCall<'a>>) {
    let text = content.as_ref().map(Content::text).filter(|t| !is_blank(t));
    let calls = tool_calls
        .iter()
        .flatten()
        .map(|call| (call, call.function.arguments_json()))
        .collect();
    (text, calls)
}

/// The key of the object that carries tool call arguments that are not a JSON object.
pub const RAW_ARGUMENTS: &str = "_raw";

/// The function of a tool call.
#[derive(Debug, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text of the arguments.
    pub arguments: String,
}

impl FunctionCall {
    /// The arguments as a JSON object, as the translated APIs take a tool call's input: `{}`
    /// when empty, and `{"_raw": "<text>"}` when they are not a JSON object — OpenAI says the
    /// model's arguments do not always parse (a history cut off by `max_tokens` holds half an
    /// object), and a conversation that holds them goes on.
    pub fn arguments_json(&self) -> Value {
        if is_blank(&self.arguments) {
            return Value::Object(Map::new());
        }
        match serde_json::from_str(&self.arguments) {
            Ok(Value::Object(o)) => Value::Object(o),
            _ => {
                let mut raw = Map::new();
                raw.insert(
                    RAW_ARGUMENTS.to_owned(),
                    Value::String(self.arguments.clone()),
                );
                Value::Object(raw)
            }
        }
    }
}

/// A tool definition.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Tool {
    Function {
        function: FunctionDef,
        /// Anthropic's prompt-caching breakpoint after this tool (as LiteLLM takes it).
        #[serde(default)]
        cache_control: Option<Value>,
    },
}

/// A function definition.
#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named { function: NamedFunction },
}

/// The function named by `tool_choice`.
#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// What `tool_choice` asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Auto,
    None,
    Required,
    Function(String),
}

impl ToolChoice {
    /// The checked choice.
    pub fn choice(&self) -> Result<Choice, GatewayError> {
        match self {
            ToolChoice::Mode(m) => match m.as_str() {
                "auto" => Ok(Choice::Auto),
                "none" => Ok(Choice::None),
                "required" => Ok(Choice::Required),
                other => Err(bad(format!(
                    "tool_choice {:?} is not one of auto, none, required",
                    truncate(other)
                ))),
            },
            ToolChoice::Named { function } => Ok(Choice::Function(function.name.clone())),
        }
    }
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize)]
pub struct JsonSchema {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ChatRequest {
    /// Parses a request body.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        serde_json::from_slice(body).map_err(|e| {
            bad(format!(
                "invalid chat completion request: {}",
                json_error(&e)
            ))
        })
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether the request declares any tools.
    pub fn has_tools(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| !t.is_empty())
    }

    /// Whether the last stream chunk should carry usage.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// `temperature` held to `max`: OpenAI takes 0 to 2, Anthropic and Bedrock's models 0 to 1
    /// (a value above is their most random, as 2 is OpenAI's).
    pub fn temperature_at_most(&self, max: f64) -> Option<f64> {
        self.temperature.map(|t| t.min(max))
    }

    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Refuses the first field that is set to something `provider` cannot express; `supported`
    /// lists the ones its translator maps.
    pub fn refuse_unsupported(
        &self,
        provider: &str,
        supported: &[&str],
    ) -> Result<(), GatewayError> {
        let set = [
            ("n", self.n.is_some_and(|n| n != 1)),
            (
                "presence_penalty",
                self.presence_penalty.is_some_and(|v| v != 0.0),
            ),
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|v| v != 0.0),
            ),
            ("seed", self.seed.is_some()),
            ("logprobs", self.logprobs == Some(true)),
            ("top_logprobs", self.top_logprobs.is_some()),
            (
                "logit_bias",
                self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()),
            ),
            ("reasoning_effort", self.reasoning_effort.is_some()),
            (
                "modalities",
                self.modalities
                    .as_ref()
                    .is_some_and(|m| m.iter().any(|x| x != "text")),
            ),
            ("audio", self.audio.is_some()),
            ("prediction", self.prediction.is_some()),
            ("store", self.store == Some(true)),
            ("web_search_options", self.web_search_options.is_some()),
            ("functions", self.functions.is_some()),
            ("function_call", self.function_call.is_some()),
            ("user", self.user.is_some()),
            ("safety_identifier", self.safety_identifier.is_some()),
        ];
        if let Some((name, _)) = set
            .iter()
            .find(|(name, is_set)| *is_set && !supported.contains(name))
        {
            return Err(unsupported(name, provider));
        }
        // No translated provider has participant names.
        for (i, m) in self.messages.iter().enumerate() {
            let named = match m {
                Message::System { name, .. }
                | Message::Developer { name, .. }
                | Message::User { name, .. }
                | Message::Assistant { name, .. } => name.is_some(),
                Message::Tool { .. } | Message::Function { .. } => false,
            };
            if named {
                return Err(unsupported(&format!("messages[{i}].name"), provider));
            }
        }
        Ok(())
    }
}

/// Most texts of one embeddings request sent one per upstream call.
pub const MAX_FAN_OUT: usize = 256;

/// An embeddings request.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `input` of an embeddings request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl EmbeddingsRequest {
    /// Parses a request body.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        serde_json::from_slice(body)
            .map_err(|e| bad(format!("invalid embeddings request: {}", json_error(&e))))
    }

    /// The inputs as texts; token arrays cannot be sent to other providers.
    pub fn texts(&self, provider: &str) -> Result<Vec<&str>, GatewayError> {
        match &self.input {
            EmbeddingInput::One(s) => Ok(vec![s.as_str()]),
            EmbeddingInput::Many(v) => Ok(v.iter().map(String::as_str).collect()),
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => Err(bad(format!(
                "input as token arrays cannot be expressed for provider {provider}; send text"
            ))),
        }
    }

    /// The texts of a list sent one per request, for providers that embed one text per call
    /// (Vertex `gemini-embedding-*`, Bedrock `amazon.titan-embed-*`), taken out of the request:
    /// each part is then built from the request with its one text as `input`, its other fields
    /// lent to every part, never copied. `None` for a single text or an empty list, sent as
    /// they are. At most [`MAX_FAN_OUT`] texts.
    pub fn take_texts(&mut self, provider: &str) -> Result<Option<Vec<String>>, GatewayError> {
        let n = self.texts(provider)?.len();
        if n > MAX_FAN_OUT {
            return Err(bad(format!(
                "input: provider {provider} embeds one text per request with {}, so at most {MAX_FAN_OUT} texts are sent at once, got {n}",
                truncate(&self.model),
            )));
        }
        match &mut self.input {
            EmbeddingInput::Many(texts) if n > 1 => Ok(Some(std::mem::take(texts))),
            _ => Ok(None),
        }
    }

    /// Whether the client wants base64 vectors (the openai SDKs ask for them by default).
    pub fn wants_base64(&self) -> bool {
        self.encoding_format.as_deref() == Some("base64")
    }
}

/// A 400 `/compat` error.
pub fn bad(message: impl Into<String>) -> GatewayError {
    GatewayError::CompatRequest(message.into())
}

/// The 400 for a part other than text in a message that takes only text (a system message,
/// or a tool result where the provider takes text only), naming the part.
pub fn text_only(
    content: &Content,
    i: usize,
    role: &str,
    provider: &str,
) -> Result<String, GatewayError> {
    match content.first_non_text() {
        Some(j) => Err(bad(format!(
            "messages[{i}].content[{j}]: only text parts can be expressed in a {role} message for provider {provider}"
        ))),
        None => Ok(content.text()),
    }
}

/// The 400 for a field the provider cannot express.
pub fn unsupported(field: &str, provider: &str) -> GatewayError {
    bad(format!(
        "field {field} cannot be expressed for provider {provider}"
    ))
}

/// The first 64 characters, for messages.
pub fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `data:<mime>[;<parameter>...];base64,<data>` → `(mime, data)`, the MIME type as the
/// providers take it ([`normal_mime`]).
pub fn parse_data_url(url: &str) -> Option<(std::borrow::Cow<'_, str>, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    Some((normal_mime(meta.strip_suffix(";base64")?), data))
}

/// A MIME type as Anthropic, Google and Bedrock take it: lowercase, without parameters, and
/// with the nonstandard names browsers and tools give JPEG and PNG (`image/jpg`,
/// `image/pjpeg`, `image/jfif`, `image/x-png`) replaced by the registered ones, which the
/// providers refuse otherwise (`text/plain` when empty, as RFC 2397 has it).
pub fn normal_mime(mime: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let mime = mime.split(';').next().unwrap_or_default().trim();
    if mime.is_empty() {
        return Cow::Borrowed("text/plain");
    }
    let lower: Cow<'_, str> = if mime.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(mime.to_ascii_lowercase())
    } else {
        Cow::Borrowed(mime)
    };
    match &*lower {
        "image/jpg" | "image/pjpeg" | "image/jfif" | "image/pjp" => Cow::Borrowed("image/jpeg"),
        "image/x-png" => Cow::Borrowed("image/png"),
        _ => lower,
    }
}

// ---------------------------------------------------------------------------
// Responses

/// Token usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt, the tokens read from the provider's prompt cache (when it says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Of the completion, the model's reasoning (thinking) tokens (when it has any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Usage from input and output counts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    /// With the count of prompt tokens read from a cache, when the provider gave one.
    pub fn with_cached(mut self, cached: Option<u64>) -> Self {
        self.prompt_tokens_details =
            cached.map(|cached_tokens| PromptTokensDetails { cached_tokens });
        self
    }

    /// With the count of reasoning tokens (part of the completion), when there are any.
    pub fn with_reasoning(mut self, reasoning: u64) -> Self {
        self.completion_tokens_details = (reasoning > 0).then_some(CompletionTokensDetails {
            reasoning_tokens: reasoning,
        });
        self
    }
}

/// A tool call in a response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

/// The function of a response tool call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

impl ToolCallOut {
    /// A function call with `arguments` serialized as JSON text.
    /// Missing input (`null`) is `{}`: clients parse the arguments as a JSON object.
    pub fn function(id: String, name: String, arguments: &Value) -> Self {
        let arguments = match arguments {
            Value::Null => "{}".to_owned(),
            other => other.to_string(),
        };
        Self {
            id,
            kind: "function",
            function: FunctionOut { name, arguments },
        }
    }
}

/// What a translator extracts from a provider's complete answer.
#[derive(Debug, Default)]
pub struct Completion {
    pub id: String,
    pub model: String,
    pub text: Option<String>,
    pub refusal: Option<String>,
    /// The thinking text (`reasoning_content`), when the model shows it.
    pub reasoning: Option<String>,
    /// The thinking as blocks to send back (`thinking_blocks`).
    pub thinking_blocks: Vec<ThinkingBlock>,
    pub tool_calls: Vec<ToolCallOut>,
    pub finish_reason: &'static str,
    pub usage: Usage,
}

impl Completion {
    /// The `chat.completion` JSON.
    pub fn to_json(&self, created: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
            choices: [ChoiceOut<'a>; 1],
            usage: Usage,
        }
        #[derive(Serialize)]
        struct ChoiceOut<'a> {
            index: u32,
            message: MessageOut<'a>,
            logprobs: Option<()>,
            finish_reason: &'a str,
        }
        #[derive(Serialize)]
        struct MessageOut<'a> {
            role: &'static str,
            content: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            refusal: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reasoning_content: Option<&'a str>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            thinking_blocks: &'a [ThinkingBlock],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            tool_calls: &'a [ToolCallOut],
        }
        let body = Body {
            id: &self.id,
            object: "chat.completion",
            created,
            model: &self.model,
            choices: [ChoiceOut {
                index: 0,
                message: MessageOut {
                    role: "assistant",
                    content: self.text.as_deref(),
                    refusal: self.refusal.as_deref(),
                    reasoning_content: self.reasoning.as_deref(),
                    thinking_blocks: &self.thinking_blocks,
                    tool_calls: &self.tool_calls,
                },
                logprobs: None,
                finish_reason: self.finish_reason,
            }],
            usage: self.usage,
        };
        to_vec(&body)
    }
}

/// Serializes our own response types (cannot fail; `null` if it ever did).
pub fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec())
}

/// The OpenAI error body: `{"error":{"message","type","param","code"}}`.
pub fn error_json(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<()>,
        code: Option<&'a str>,
    }
    to_vec(&Body {
        error: Detail {
            message,
            kind,
            param: None,
            code,
        },
    })
}

/// Output of the model that is not valid — a tool call it could not form (Gemini's
/// `finishReason` `MALFORMED_FUNCTION_CALL`, Bedrock's `stopReason` `malformed_tool_use`) —:
/// no answer, though the provider billed its tokens. OpenAI answers its own with a `500` of
/// type `model_error` ("The model produced invalid content"), which its SDKs raise as an
/// `InternalServerError` (and retry), rather than an empty answer that looks finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOutput {
    /// Which provider said so, and in which field (`Google finishReason`).
    pub said_by: &'static str,
    /// The provider's reason (`MALFORMED_FUNCTION_CALL`): the error's `code`.
    pub reason: String,
    /// The provider's own words on it (Gemini's `finishMessage`), cut at [`DETAIL_CHARS`].
    pub detail: Option<String>,
}

/// Most characters of a provider's own words on invalid output kept in the error message.
pub const DETAIL_CHARS: usize = 300;

impl InvalidOutput {
    /// The status OpenAI answers invalid output of its models with.
    pub const STATUS: http::StatusCode = http::StatusCode::INTERNAL_SERVER_ERROR;

    /// The OpenAI error body: OpenAI's message, with the provider's reason and words.
    pub fn to_json(&self) -> Vec<u8> {
        let Self {
            said_by, reason, ..
        } = self;
        let message = match self.detail.as_deref().filter(|d| !d.is_empty()) {
            Some(detail) => {
                let detail: String = detail.chars().take(DETAIL_CHARS).collect();
                format!(
                    "The model produced invalid content ({said_by} {reason}: {detail}). Consider modifying your prompt if you are seeing this error persistently."
                )
            }
            None => format!(
                "The model produced invalid content ({said_by} {reason}). Consider modifying your prompt if you are seeing this error persistently."
            ),
        };
        error_json(&message, "model_error", Some(reason))
    }
}

/// The OpenAI error `type` for an HTTP status.
pub fn error_type_for(status: u16) -> &'static str {
    match status {
        400 | 404 | 409 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "api_error",
    }
}

/// Writes `chat.completion.chunk` events of one stream.
#[derive(Debug)]
pub struct ChunkWriter {
    pub id: String,
    pub model: String,
    created: u64,
    include_usage: bool,
    role_sent: bool,
    finished: bool,
    /// `[DONE]` was written: the stream ended whole.
    done_sent: bool,
    /// Content (text) was written.
    content_sent: bool,
    /// Tool calls started with no argument text yet: they get `{}` before the finish chunk
    /// (a tool without input streams none, and a finished call must carry valid JSON).
    tools_without_arguments: Vec<u32>,
    /// Thinking blocks written so far: the next one's `index`.
    thinking_blocks: u32,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// Left out unless the client asked for usage; then `null` in every chunk but the last
    /// (as OpenAI sends it: clients read the field on every chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_blocks: Option<[NumberedBlock<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

/// A thinking block in a stream, with its place among the message's blocks: clients merge
/// list deltas by `index` (the `openai` SDK's stream helper refuses a second entry without).
#[derive(Serialize)]
struct NumberedBlock<'a> {
    index: u32,
    #[serde(flatten)]
    block: &'a ThinkingBlock,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

impl ChunkWriter {
    /// A writer for a stream answering with `id` and `model`.
    pub fn new(id: String, model: String, created: u64, include_usage: bool) -> Self {
        Self {
            id,
            model,
            created,
            include_usage,
            role_sent: false,
            finished: false,
            done_sent: false,
            content_sent: false,
            tools_without_arguments: Vec::new(),
            thinking_blocks: 0,
        }
    }

    fn event<T: Serialize>(out: &mut BytesMut, v: &T) {
        out.put_slice(b"data: ");
        let start = out.len();
        let mut w = out.writer();
        if serde_json::to_writer(&mut w, v).is_err() {
            let out = w.into_inner();
            out.truncate(start);
            out.put_slice(b"null");
            out.put_slice(b"\n\n");
            return;
        }
        w.into_inner().put_slice(b"\n\n");
    }

    fn chunk(&mut self, out: &mut BytesMut, delta: Delta<'_>, finish: Option<&str>) {
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }];
        Self::event(
            out,
            &Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: &choices,
                usage: self.include_usage.then_some(None),
            },
        );
    }

    /// The first chunk (`role: assistant`), once.
    pub fn role(&mut self, out: &mut BytesMut) {
        if !self.role_sent {
            self.role_sent = true;
            self.chunk(
                out,
                Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                },
                None,
            );
        }
    }

    /// A text delta.
    pub fn content(&mut self, out: &mut BytesMut, text: &str) {
        if text.is_empty() {
            return;
        }
        self.content_sent = true;
        self.role(out);
        self.chunk(
            out,
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
        );
    }

    /// A refusal delta.
    pub fn refusal(&mut self, out: &mut BytesMut, text: &str) {
        self.role(out);
        self.chunk(
            out,
            Delta {
                refusal: Some(text),
                ..Delta::default()
            },
            None,
        );
    }

    /// A delta of thinking text (`reasoning_content`, as LiteLLM streams it).
    pub fn reasoning(&mut self, out: &mut BytesMut, text: &str) {
        if text.is_empty() {
            return;
        }
        self.role(out);
        self.chunk(
            out,
            Delta {
                reasoning_content: Some(text),
                ..Delta::default()
            },
            None,
        );
    }

    /// A finished thinking block, signature included, for the client to send back.
    pub fn thinking_block(&mut self, out: &mut BytesMut, block: &ThinkingBlock) {
        self.role(out);
        self.chunk(
            out,
            Delta {
                thinking_blocks: Some([NumberedBlock {
                    index: self.thinking_blocks,
                    block,
                }]),
                ..Delta::default()
            },
            None,
        );
        self.thinking_blocks += 1;
    }

    /// The start of tool call `index` (arguments follow in [`Self::tool_arguments`]).
    pub fn tool_start(&mut self, out: &mut BytesMut, index: u32, id: &str, name: &str, args: &str) {
        if args.trim().is_empty() {
            self.tools_without_arguments.push(index);
        }
        self.role(out);
        self.chunk(
            out,
            Delta {
                tool_calls: Some([ToolCallDelta {
                    index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: args,
                    },
                }]),
                ..Delta::default()
            },
            None,
        );
    }

    /// More argument text of tool call `index`.
    pub fn tool_arguments(&mut self, out: &mut BytesMut, index: u32, args: &str) {
        if args.is_empty() {
            return;
        }
        if !args.trim().is_empty() {
            self.tools_without_arguments.retain(|&k| k != index);
        }
        self.role(out);
        self.chunk(
            out,
            Delta {
                tool_calls: Some([ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: args,
                    },
                }]),
                ..Delta::default()
            },
            None,
        );
    }

    /// The chunk carrying `finish_reason`, once.
    pub fn finish(&mut self, out: &mut BytesMut, reason: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        for index in std::mem::take(&mut self.tools_without_arguments) {
            self.tool_arguments(out, index, "{}");
        }
        self.role(out);
        self.chunk(out, Delta::default(), Some(reason));
    }

    /// Whether any content (text) was written.
    pub fn wrote_content(&self) -> bool {
        self.content_sent
    }

    /// Whether the finish chunk was written.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The usage chunk (when the client asked for it) and `[DONE]`.
    pub fn done(&mut self, out: &mut BytesMut, usage: Usage) {
        if self.include_usage {
            Self::event(
                out,
                &Chunk {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: &[],
                    usage: Some(Some(usage)),
                },
            );
        }
        out.put_slice(b"data: [DONE]\n\n");
        self.done_sent = true;
    }

    /// Whether the stream ended whole: `[DONE]` was written (not an error event, or nothing).
    pub fn sent_done(&self) -> bool {
        self.done_sent
    }

    /// An error event (the openai SDKs raise it as an `APIError`).
    pub fn error(&mut self, out: &mut BytesMut, message: &str, kind: &str) {
        Self::error_event(out, &error_json(message, kind, None));
    }

    /// The stream's end for output of the model that is not valid: an error event in place of
    /// its finish (see [`InvalidOutput`]).
    pub fn invalid_output(&mut self, out: &mut BytesMut, invalid: &InvalidOutput) {
        Self::error_event(out, &invalid.to_json());
    }

    fn error_event(out: &mut BytesMut, body: &[u8]) {
        out.put_slice(b"data: ");
        out.put_slice(body);
        out.put_slice(b"\n\n");
    }
}

/// The embeddings list response.
pub fn embeddings_json(
    model: &str,
    vectors: &[Vec<f32>],
    base64: bool,
    prompt_tokens: u64,
) -> Vec<u8> {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let mut raw = Vec::with_capacity(v.len() * 4);
                for f in v {
                    raw.extend_from_slice(&f.to_le_bytes());
                }
                Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                Value::from(v.clone())
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    to_vec(&serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
}

/// Floats of a JSON array (non-numbers are refused).
pub fn floats(v: &Value) -> Option<Vec<f32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

/// An OpenAI-compatible provider's body: the client's, with `model` replaced.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Bytes, GatewayError> {
    rewrite_model_asking_usage(body, model, false).map(|(body, _)| body)
}

/// [`rewrite_model`], and when `ask_usage` and the client streams without
/// `stream_options.include_usage`, that option set (the second value says so: the usage chunk
/// is then the gateway's, held out of the client's stream by [`HiddenUsage`]).
pub fn rewrite_model_asking_usage(
    body: &[u8],
    model: &str,
    ask_usage: bool,
) -> Result<(Bytes, bool), GatewayError> {
    let mut map: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("invalid request body: {}", json_error(&e))))?;
    map.insert("model".to_owned(), Value::String(model.to_owned()));
    portable_history(&mut map);
    let asked = ask_usage && ask_stream_usage(&mut map);
    Ok((Bytes::from(to_vec(&map)), asked))
}

/// A chat completions body that streams without `stream_options.include_usage`, with that
/// option set; `None` for any other body (not JSON, not a stream, usage asked already).
pub fn with_stream_usage(body: &[u8]) -> Option<Bytes> {
    // Most bodies do not stream: those are not parsed.
    if !may_stream(body) {
        return None;
    }
    let mut map: Map<String, Value> = serde_json::from_slice(body).ok()?;
    ask_stream_usage(&mut map).then(|| Bytes::from(to_vec(&map)))
}

/// Whether a body could ask for a stream, without parsing it: a `"stream"` key followed by
/// `true` (any of them: providers' parsers keep the last of repeated keys), or an escape of an
/// ASCII letter (`\u0073tream`: the providers decode it; text in other scripts escapes only
/// code points past ASCII).
fn may_stream(body: &[u8]) -> bool {
    memchr::memmem::find_iter(body, b"\"stream\"").any(|at| {
        body[at + 8..]
            .trim_ascii_start()
            .strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"true"))
    }) || crate::cost::escapes_ascii_letter(body)
}

/// Sets `stream_options.include_usage` in a streamed request that lacks it; whether it did.
pub fn ask_stream_usage(map: &mut Map<String, Value>) -> bool {
    if map.get("stream") != Some(&Value::Bool(true)) {
        return false;
    }
    let options = map
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if options.is_null() {
        *options = Value::Object(Map::new());
    }
    match options.as_object_mut() {
        Some(o) if o.get("include_usage") != Some(&Value::Bool(true)) => {
            o.insert("include_usage".to_owned(), Value::Bool(true));
            true
        }
        _ => false,
    }
}

/// Longest event [`HiddenUsage`] holds until its end to see whether it is the usage-only chunk
/// (a few hundred bytes; the providers that add fields to it stay far below this): a longer
/// one is passed on as it comes.
const MAX_USAGE_EVENT: usize = 64 << 10;

/// An OpenAI-format stream passed through unchanged but for the usage-only chunk
/// (`"choices":[]` with `usage`) the gateway asked for and the client did not: it is held
/// out of the client's stream, and its tokens counted for the request. Only an unfinished
/// event short enough to be that chunk is held (in the budget of buffered bodies); each byte
/// is searched once for the end of its event.
#[derive(Default)]
pub struct HiddenUsage {
    /// The start of an event the last chunk ended inside, not passed on yet (at most
    /// [`MAX_USAGE_EVENT`]); or, while `passing`, the last bytes passed on of the event that
    /// its end may begin with (a line end, at most two bytes).
    pending: Vec<u8>,
    /// Where in `pending` the search for the end of its event goes on.
    searched: usize,
    /// The event being read is passed on as it comes: longer than the usage chunk can be, or
    /// the budget had no room to hold it.
    passing: bool,
    /// The last event ended with a blank line's `\r` last in its chunk: a `\n` starting the
    /// next chunk is that line end's, passed on with it or left out with it (`Some(passed)`).
    cr_last: Option<bool>,
    /// Takes `pending`'s allocation from the budget of buffered bodies.
    held: Option<crate::buffers::Held>,
    tokens: crate::usage::Usage,
    end: super::sse::DoneWatch,
}

impl HiddenUsage {
    /// A filter for one stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `pending`'s allocation from the budget (kept at most [`MAX_USAGE_EVENT`]); with
    /// no room for it, its event is passed on as it comes instead of held.
    fn account(&mut self, out: &mut BytesMut) {
        if self.pending.capacity() > MAX_USAGE_EVENT {
            self.pending.shrink_to_fit();
        }
        let Some(h) = self.held.as_mut() else {
            return;
        };
        let (capacity, taken) = (self.pending.capacity() as u64, h.bytes());
        if capacity <= taken {
            h.release(taken - capacity);
            return;
        }
        if h.grow(capacity - taken).is_ok() {
            return;
        }
        if !self.passing {
            out.extend_from_slice(&self.pending);
            self.passing = true;
            self.pending.drain(..self.searched);
            self.searched = 0;
        }
        // At most the two bytes of a line end, uncounted.
        self.pending.shrink_to_fit();
        h.release(h.bytes());
    }
}

impl super::StreamTranslator for HiddenUsage {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.tokens.observe(chunk);
        self.end.observe(chunk);
        let mut chunk = chunk;
        if !chunk.is_empty()
            && let Some(passed) = self.cr_last.take()
            && let Some(rest) = chunk.strip_prefix(b"\n")
        {
            if passed {
                out.extend_from_slice(b"\n");
            }
            chunk = rest;
        }
        if chunk.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.pending);
        let kept = buf.len();
        if kept > 0 {
            buf.extend_from_slice(chunk);
        }
        let whole: &[u8] = if kept > 0 { &buf } else { chunk };
        // The unfinished event starts at `start`; its end is searched for from `from`.
        let (mut start, mut from) = (0, self.searched);
        // Where the last event that ended in `whole` ends, and whether it was passed on.
        let mut ended = None;
        let mut passed = false;
        if self.passing {
            // The `kept` bytes went out already.
            match event_end(whole, from) {
                Ok(len) => {
                    out.extend_from_slice(&whole[kept..len]);
                    (start, from) = (len, len);
                    (ended, passed) = (Some(len), true);
                    self.passing = false;
                }
                Err(at) => {
                    out.extend_from_slice(&whole[kept..]);
                    (start, from) = (at, at);
                }
            }
        }
        if !self.passing {
            loop {
                match event_end(&whole[start..], from - start) {
                    Ok(len) => {
                        let event = &whole[start..start + len];
                        passed = !is_usage_only(event);
                        if passed {
                            out.extend_from_slice(event);
                        }
                        start += len;
                        from = start;
                        ended = Some(start);
                    }
                    Err(at) => {
                        from = start + at;
                        break;
                    }
                }
            }
        }
        if ended == Some(whole.len()) && whole.ends_with(b"\r") {
            self.cr_last = Some(passed);
        }
        if !self.passing && whole.len() - start > MAX_USAGE_EVENT {
            // Longer than the usage chunk: passed on, and the rest of it as it comes.
            out.extend_from_slice(&whole[start..]);
            self.passing = true;
            start = from;
        }
        self.searched = from - start;
        // What stays is `whole[start..]`, in `buf`'s allocation.
        if kept > 0 {
            buf.drain(..start);
        } else {
            buf.clear();
            buf.extend_from_slice(&chunk[start..]);
        }
        self.pending = buf;
        self.account(out);
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let rest = std::mem::take(&mut self.pending);
        if !self.passing && !is_usage_only(&rest) {
            out.extend_from_slice(&rest);
        }
        self.held = None;
    }

    fn ended_whole(&self) -> bool {
        self.end.saw_done()
    }

    fn usage(&self) -> Option<Usage> {
        let t = self.tokens.tokens();
        (t.input.is_some() || t.output.is_some()).then(|| {
            // Its cache reads too, priced apart.
            Usage::new(t.input.unwrap_or(0), t.output.unwrap_or(0))
                .with_cached((t.cache_read > 0).then_some(t.cache_read))
        })
    }

    fn hold_in(&mut self, held: crate::buffers::Held) {
        self.held = Some(held);
    }
}

/// The length of the first SSE event of `buf` with the blank line ending it, if it is
/// complete: a line end (`\r\n`, `\n` or `\r`) right after another; else where to search
/// again once more bytes follow `buf` (`from` is such a place, from an earlier search: the
/// search never looks back). A line's `\r` last in `buf` may be the start of a `\r\n` (or of a
/// blank line after it): the event waits for what follows. A blank line's `\r` last in `buf`
/// ends it (a `\n` may follow: see `HiddenUsage::cr_last`).
fn event_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    // Where the line end at `p` ends.
    let line_end = |p: usize| match (buf[p], buf.get(p + 1)) {
        (b'\r', None) => None,
        (b'\r', Some(b'\n')) => Some(p + 2),
        _ => Some(p + 1),
    };
    let mut at = from.min(buf.len());
    while let Some(i) = memchr::memchr2(b'\n', b'\r', &buf[at..]) {
        let p = at + i;
        let Some(end) = line_end(p) else {
            return Err(p);
        };
        match buf.get(end) {
            Some(b'\n' | b'\r') => return Ok(line_end(end).unwrap_or(end + 1)),
            Some(_) => at = end,
            None => return Err(p),
        }
    }
    Err(buf.len())
}

/// Whether an SSE event is a chunk with no choices and a usage object (the last chunk of a
/// stream with `include_usage`).
fn is_usage_only(event: &[u8]) -> bool {
    let Some(at) = memchr::memmem::find(event, b"\"choices\"") else {
        return false;
    };
    let rest = event[at + 9..].trim_ascii_start();
    let empty = rest
        .strip_prefix(b":")
        .map(<[u8]>::trim_ascii_start)
        .and_then(|r| r.strip_prefix(b"["))
        .is_some_and(|r| r.trim_ascii_start().starts_with(b"]"));
    empty
        && memchr::memmem::find_iter(event, b"\"usage\"").any(|u| {
            let v = event[u + 7..].trim_ascii_start();
            v.strip_prefix(b":")
                .is_some_and(|v| v.trim_ascii_start().starts_with(b"{"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_input_schemas_are_object_schemas_with_their_type() {
        assert_eq!(
            tool_input_schema(None),
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(
            tool_input_schema(Some(&json!({}))),
            json!({"type": "object"})
        );
        let props = json!({"properties": {"b": {}, "a": {}}});
        let typed = tool_input_schema(Some(&props));
        assert_eq!(typed["type"], "object");
        // The client's order stays (it orders what the model writes).
        let keys: Vec<&String> = typed["properties"]
            .as_object()
            .expect("object")
            .keys()
            .collect();
        assert_eq!(keys, ["b", "a"]);
        let full = json!({"type": "object", "properties": {"x": {"type": "string"}}});
        assert_eq!(tool_input_schema(Some(&full)), full);
    }

    #[test]
    fn a_prefill_ends_without_trailing_whitespace() {
        let user = ("user", vec![json!({"type": "text", "text": "Q?"})]);
        let trimmed = |blocks: Vec<Value>| {
            let mut turns = vec![user.clone(), ("assistant", blocks)];
            trim_prefill(&mut turns);
            turns
        };
        let t = trimmed(vec![json!({"type": "text", "text": "The answer is: \n "})]);
        assert_eq!(t[1].1, [json!({"type": "text", "text": "The answer is:"})]);
        // Bedrock's text blocks have no type.
        let t = trimmed(vec![json!({"text": "x"}), json!({"text": " \t"})]);
        assert_eq!(t[1].1, [json!({"text": "x"})]);
        // A turn left with nothing is dropped; a tool call is left alone.
        let left = trimmed(vec![json!({"type": "text", "text": "  "})]);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0], user);
        let call = json!({"type": "tool_use", "id": "c", "name": "f", "input": {}});
        assert_eq!(trimmed(vec![call.clone()])[1].1, [call]);
        // Not the assistant's turn last: nothing changes.
        let mut turns = vec![("user", vec![json!({"type": "text", "text": "Q? "})])];
        trim_prefill(&mut turns);
        assert_eq!(turns[0].1, [json!({"type": "text", "text": "Q? "})]);
    }

    #[test]
    fn unknown_fields_are_kept_in_rest() {
        let r = ChatRequest::parse(
            br#"{"model":"a/b","messages":[{"role":"user","content":"hi"}],"top_k":3,"temperature":0.5}"#,
        )
        .expect("parse");
        assert_eq!(r.rest.get("top_k"), Some(&Value::from(3)));
        assert_eq!(r.temperature, Some(0.5));
    }

    #[test]
    fn openai_hints_are_not_extras_for_other_providers() {
        let r = ChatRequest::parse(
            br#"{"model":"a/b","messages":[],"metadata":{"team":"x"},"service_tier":"default",
            "prompt_cache_key":"k","prompt_cache_retention":"24h","verbosity":"low","top_k":3}"#,
        )
        .expect("parse");
        assert_eq!(r.rest.keys().collect::<Vec<_>>(), ["top_k"]);
        assert!(r.refuse_unsupported("anthropic", &[]).is_ok());
        let old = ChatRequest::parse(
            br#"{"model":"a/b","messages":[],"functions":[{"name":"f","parameters":{}}]}"#,
        )
        .expect("parse");
        let err = old
            .refuse_unsupported("anthropic", &[])
            .expect_err("refused");
        assert!(err.to_string().contains("functions"), "{err}");
    }

    #[test]
    fn fields_the_provider_cannot_express_are_named() {
        let r =
            ChatRequest::parse(br#"{"model":"a/b","messages":[],"n":1,"presence_penalty":0.5}"#)
                .expect("parse");
        let err = r.refuse_unsupported("anthropic", &[]).expect_err("refused");
        assert_eq!(err.code(), 2107);
        assert!(err.to_string().contains("presence_penalty"), "{err}");
        assert!(r.refuse_unsupported("x", &["presence_penalty"]).is_ok());
    }

    #[test]
    fn chunk_writer_writes_role_once_then_deltas_finish_usage_and_done() {
        let mut w = ChunkWriter::new("id1".into(), "m".into(), 7, true);
        let mut out = BytesMut::new();
        w.content(&mut out, "Hel");
        w.content(&mut out, "lo");
        w.finish(&mut out, "stop");
        w.done(&mut out, Usage::new(3, 2));
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 6, "{text}");
        assert!(events[0].contains(r#""delta":{"role":"assistant","content":""}"#));
        // With usage asked for, OpenAI's other chunks carry `"usage": null`.
        assert!(
            events[..4].iter().all(|e| e.ends_with(r#","usage":null}"#)),
            "{text}"
        );
        assert!(events[3].contains(r#""finish_reason":"stop""#));
        assert!(events[4].contains(
            r#""choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}"#
        ));
        assert_eq!(events[5], "data: [DONE]");
        let mut w = ChunkWriter::new("id1".into(), "m".into(), 7, false);
        let mut out = BytesMut::new();
        w.content(&mut out, "Hi");
        w.finish(&mut out, "stop");
        w.done(&mut out, Usage::new(3, 2));
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert!(!text.contains("usage"), "{text}");
    }

    const USAGE_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"c\",\"choices\": [ ],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn the_usage_chunk_the_client_did_not_ask_for_is_held_out_and_counted() {
        use crate::compat::StreamTranslator;
        let usage_at = USAGE_STREAM
            .find("data: {\"id\":\"c\",\"choices\": [")
            .expect("usage");
        let done_at = USAGE_STREAM.find("data: [DONE]").expect("done");
        let expected = [&USAGE_STREAM[..usage_at], &USAGE_STREAM[done_at..]].concat();
        for cut in 0..=USAGE_STREAM.len() {
            let mut f = HiddenUsage::new();
            let mut out = BytesMut::new();
            f.push(&USAGE_STREAM.as_bytes()[..cut], &mut out);
            f.push(&USAGE_STREAM.as_bytes()[cut..], &mut out);
            f.finish(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), expected, "cut at {cut}");
            assert_eq!(f.usage(), Some(Usage::new(5, 2)), "cut at {cut}");
        }
        // Bare CR line ends too (each event passed on as soon as its blank line came).
        let cr = USAGE_STREAM.replace("\r\n", "\n").replace('\n', "\r");
        let cr_expected = expected.replace("\r\n", "\n").replace('\n', "\r");
        for cut in 0..=cr.len() {
            let mut f = HiddenUsage::new();
            let mut out = BytesMut::new();
            f.push(&cr.as_bytes()[..cut], &mut out);
            let first = out.len();
            f.push(&cr.as_bytes()[cut..], &mut out);
            f.finish(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), cr_expected, "cut at {cut}");
            let first_event = cr.find("\r\r").expect("event") + 2;
            assert!(
                cut < first_event || first >= first_event,
                "cut at {cut}: held back"
            );
        }
    }

    /// `stream` through a [`HiddenUsage`] in pieces cut at `cuts`; what went out after each.
    fn hide_in_pieces(f: &mut HiddenUsage, stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<usize>) {
        use crate::compat::StreamTranslator;
        let mut out = BytesMut::new();
        let mut after = Vec::new();
        let mut start = 0;
        for &c in cuts.iter().chain([&stream.len()]) {
            let c = c.clamp(start, stream.len());
            f.push(&stream[start..c], &mut out);
            after.push(out.len());
            start = c;
        }
        f.finish(&mut out);
        (out.to_vec(), after)
    }

    #[test]
    fn a_long_event_is_passed_on_as_it_comes_and_the_usage_chunk_after_it_still_hidden() {
        let long = format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(3 * MAX_USAGE_EVENT)
        );
        let usage_at = USAGE_STREAM
            .find("data: {\"id\":\"c\",\"choices\": [")
            .expect("usage");
        let done_at = USAGE_STREAM.find("data: [DONE]").expect("done");
        for nl in ["\n", "\r\n", "\r"] {
            let stream = format!("{long}{USAGE_STREAM}")
                .replace("\r\n", "\n")
                .replace('\n', nl);
            let expected = format!(
                "{long}{}{}",
                &USAGE_STREAM[..usage_at],
                &USAGE_STREAM[done_at..]
            )
            .replace("\r\n", "\n")
            .replace('\n', nl);
            let long_len = long.replace('\n', nl).len();
            // In pieces of 1000 bytes, and cut around the long event's end.
            let pieces: Vec<usize> = (1..=stream.len() / 1000).map(|i| i * 1000).collect();
            for cuts in [
                pieces,
                vec![long_len - 2, long_len - 1, long_len, long_len + 1],
            ] {
                let mut f = HiddenUsage::new();
                let (out, after) = hide_in_pieces(&mut f, stream.as_bytes(), &cuts);
                assert_eq!(String::from_utf8_lossy(&out), expected, "{nl:?}");
                // Past the first 64 KiB of it, each piece of the long event went out as it came
                // (but for a line end its end may start with).
                for (&cut, &sent) in cuts.iter().zip(&after) {
                    if cut > MAX_USAGE_EVENT + 1000 && cut + 2 < long_len {
                        assert!(sent + 2 >= cut, "{nl:?}: {sent} of {cut} sent");
                    }
                }
                assert!(f.pending.capacity() <= MAX_USAGE_EVENT);
            }
        }
    }

    #[test]
    fn a_short_event_in_pieces_of_any_size_is_held_whole_in_the_budget() {
        use crate::compat::StreamTranslator;
        let budget = crate::buffers::BufferBudget::default();
        let usage_at = USAGE_STREAM
            .find("data: {\"id\":\"c\",\"choices\": [")
            .expect("usage");
        let done_at = USAGE_STREAM.find("data: [DONE]").expect("done");
        let expected = [&USAGE_STREAM[..usage_at], &USAGE_STREAM[done_at..]].concat();
        for size in [1, 2, 3, 7, 50] {
            let mut f = HiddenUsage::new();
            f.hold_in(budget.guard(1 << 20));
            let cuts: Vec<usize> = (1..USAGE_STREAM.len() / size).map(|i| i * size).collect();
            let (out, _) = hide_in_pieces(&mut f, USAGE_STREAM.as_bytes(), &cuts);
            assert_eq!(String::from_utf8_lossy(&out), expected, "pieces of {size}");
            assert_eq!(f.usage(), Some(Usage::new(5, 2)));
        }
        // Held while unfinished, given back at the end.
        let mut f = HiddenUsage::new();
        f.hold_in(budget.guard(1 << 20));
        let mut out = BytesMut::new();
        f.push(&USAGE_STREAM.as_bytes()[..usage_at + 20], &mut out);
        assert!(budget.held() >= 20);
        f.finish(&mut out);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn an_event_the_budget_has_no_room_for_is_passed_on_unheld() {
        use crate::compat::StreamTranslator;
        let budget = crate::buffers::BufferBudget::default();
        let mut full = budget.guard(1000);
        full.grow(1000).expect("fits");
        let mut f = HiddenUsage::new();
        f.hold_in(budget.guard(1000));
        let usage_at = USAGE_STREAM
            .find("data: {\"id\":\"c\",\"choices\": [")
            .expect("usage");
        let (out, after) = hide_in_pieces(&mut f, USAGE_STREAM.as_bytes(), &[usage_at + 20]);
        // All of it, the usage chunk too (still counted), as it came.
        assert_eq!(String::from_utf8_lossy(&out), USAGE_STREAM);
        assert_eq!(after[0], usage_at + 20);
        assert_eq!(f.usage(), Some(Usage::new(5, 2)));
        assert_eq!(budget.held(), 1000);
    }

    #[test]
    fn events_end_at_a_blank_line_of_any_line_end() {
        for (buf, len) in [
            ("data: a\n\ndata: b", Some(9)),
            ("data: a\r\n\r\n", Some(11)),
            ("data: a\n\r\n", Some(10)),
            ("data: a\r\r", Some(9)),
            ("data: a\r\rdata: b", Some(9)),
            ("data: a\r\n\r", Some(10)),
            // A line's CR last: the LF of a CRLF, or a blank line, may follow.
            ("data: a\r", None),
            ("data: a\r\n", None),
            ("data: a\ndata: b\r\n", None),
        ] {
            assert_eq!(event_end(buf.as_bytes(), 0).ok(), len, "{buf:?}");
        }
    }

    #[test]
    fn stream_usage_is_asked_for_only_where_the_client_did_not() {
        let asked = with_stream_usage(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#)
            .expect("asked");
        let v: Value = serde_json::from_slice(&asked).expect("json");
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        assert!(
            with_stream_usage(
                br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
            )
            .is_none()
        );
        assert!(with_stream_usage(br#"{"model":"m"}"#).is_none());
        // Not parsed unless a stream could be asked for; escaped and repeated keys are read
        // as the providers read them.
        assert!(!may_stream(br#"{"model":"m","stream":false,"x":"stream"}"#));
        assert!(!may_stream(
            "{\"stream\":false,\"text\":\"caf\\u00e9 \\u4e2d\"}".as_bytes()
        ));
        for streams in [
            r#"{"\u0073tream":true}"#,
            r#"{"str\u0065am" : true}"#,
            r#"{"stream":false,"stream":true}"#,
        ] {
            let asked = with_stream_usage(streams.as_bytes()).expect(streams);
            let v: Value = serde_json::from_slice(&asked).expect("json");
            assert_eq!(v["stream_options"]["include_usage"], true, "{streams}");
        }
        assert!(with_stream_usage(br#"{"stream":true,"stream":false}"#).is_none());
        assert!(with_stream_usage(b"not json").is_none());
    }

    #[test]
    fn tool_call_ids_lose_gemini_signatures_and_invalid_ones_become_hashes() {
        assert_eq!(portable_call_id("toolu_01Ab-c", 64), "toolu_01Ab-c");
        assert_eq!(
            portable_call_id("call_abcd1234_0~ts~CiQB0e2Kb+/sig==", 40),
            "call_abcd1234_0"
        );
        let odd = portable_call_id("call.with:odd/chars", 64);
        assert!(odd.starts_with("call_") && odd.len() == 29, "{odd}");
        assert_eq!(
            odd,
            portable_call_id("call.with:odd/chars", 64),
            "deterministic"
        );
        let long = "x".repeat(41);
        assert_eq!(portable_call_id(&long, 40).len(), 29);
        let mut body = serde_json::from_str::<Map<String, Value>>(
            r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c_1~ts~s+/="}]},{"role":"tool","tool_call_id":"c_1~ts~s+/="}]}"#,
        )
        .expect("json");
        portable_history(&mut body);
        assert_eq!(body["messages"][0]["tool_calls"][0]["id"], "c_1");
        assert_eq!(body["messages"][1]["tool_call_id"], "c_1");
    }

    #[test]
    fn signed_thinking_sent_back_stays_out_of_openai_format_requests() {
        let (body, _) = rewrite_model_asking_usage(
            br#"{"model":"openai/gpt-4o","messages":[{"role":"user","content":"hi"},
                 {"role":"assistant","content":"Paris.","reasoning_content":"France's capital.",
                  "thinking_blocks":[{"type":"thinking","thinking":"France's capital.","signature":"EqoB"}]},
                 {"role":"user","content":"and Spain?"}]}"#,
            "gpt-4o",
            false,
        )
        .expect("rewritten");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["model"], "gpt-4o");
        let assistant = &v["messages"][1];
        assert!(assistant.get("thinking_blocks").is_none(), "{assistant}");
        assert_eq!(assistant["reasoning_content"], "France's capital.");
        assert_eq!(assistant["content"], "Paris.");
    }

    #[test]
    fn data_urls_split_into_mime_and_base64() {
        let parsed = |url| parse_data_url(url).map(|(m, d)| (m.into_owned(), d));
        assert_eq!(
            parsed("data:image/png;base64,iVBO"),
            Some(("image/png".into(), "iVBO"))
        );
        assert_eq!(parsed("https://x/y.png"), None);
        assert_eq!(parsed("data:image/png,raw"), None);
        assert_eq!(
            parsed("data:;base64,eA=="),
            Some(("text/plain".into(), "eA=="))
        );
    }

    #[test]
    fn image_media_types_are_normalized_for_the_providers() {
        for (url, mime) in [
            ("data:image/jpg;base64,/9j/", "image/jpeg"),
            ("data:image/JPG;base64,/9j/", "image/jpeg"),
            ("data:image/pjpeg;base64,/9j/", "image/jpeg"),
            ("data:image/jfif;base64,/9j/", "image/jpeg"),
            ("data:image/x-png;base64,iVBO", "image/png"),
            ("data:image/png;name=cat.png;base64,iVBO", "image/png"),
            ("data:Image/WebP;base64,UklG", "image/webp"),
            ("data:application/pdf;base64,JVBE", "application/pdf"),
        ] {
            assert_eq!(
                parse_data_url(url).map(|(m, _)| m.into_owned()),
                Some(mime.into()),
                "{url}"
            );
        }
    }

    #[test]
    fn blank_text_and_unparsable_arguments_are_made_fit_for_other_providers() {
        assert!(is_blank("") && is_blank("\n\n") && is_blank(" \t") && !is_blank(" x "));
        let call = |arguments: &str| FunctionCall {
            name: "f".into(),
            arguments: arguments.into(),
        };
        assert_eq!(call("").arguments_json(), serde_json::json!({}));
        assert_eq!(
            call(r#"{"a":1}"#).arguments_json(),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            call(r#"{"city":"Par"#).arguments_json(),
            serde_json::json!({"_raw": r#"{"city":"Par"#})
        );
        assert_eq!(
            call("[1]").arguments_json(),
            serde_json::json!({"_raw": "[1]"})
        );
        let assistant: Message = serde_json::from_str(
            r#"{"role":"assistant","content":"\n\n","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{"}}]}"#,
        )
        .expect("parse");
        let Message::Assistant {
            content,
            tool_calls,
            ..
        } = &assistant
        else {
            panic!("assistant");
        };
        let (text, calls) = assistant_parts(content, tool_calls);
        assert_eq!(text, None);
        assert_eq!(calls[0].1, serde_json::json!({"_raw": "{"}));
    }

    #[test]
    fn participant_names_are_refused_naming_the_field() {
        let named = ChatRequest::parse(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"user","name":"bob","content":"x"}]}"#,
        )
        .expect("parses");
        let err = named
            .refuse_unsupported("anthropic", &[])
            .expect_err("name refused");
        assert!(err.to_string().contains("messages[1].name"), "{err}");
        let user =
            ChatRequest::parse(br#"{"model":"m","user":"u-1","messages":[]}"#).expect("parses");
        assert!(user.refuse_unsupported("x", &[]).is_err());
        assert!(user.refuse_unsupported("anthropic", &["user"]).is_ok());
    }
}
