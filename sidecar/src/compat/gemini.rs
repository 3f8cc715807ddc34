//! OpenAI chat completions and embeddings ⇄ Google Gemini `generateContent` /
//! `streamGenerateContent?alt=sse` / `batchEmbedContents` (AI Studio) and `:predict` (Vertex
//! embeddings). Both Google providers share the chat format; only URLs and auth differ.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::openai::{
    self, ChatRequest, Choice, ChunkWriter, Completion, Content, EmbeddingsRequest, InvalidOutput,
    Message, Part, ResponseFormat, SIGNATURE_MARK, Tool, ToolCallOut, Usage, bad,
};
use super::sse::{Event, SseParser};
use super::{ResponseCtx, StreamTranslator, Translated};
use crate::error::GatewayError;
use crate::error::json_error;

/// The thought signature Google documents for function calls Gemini did not make itself (a
/// history from another provider): Gemini 3 refuses a model turn whose first function call
/// comes without a signature.
pub const FOREIGN_SIGNATURE: &str = "skip_thought_signature_validator";

/// Whether `model` (its last path segment: `gemini-3-pro-preview`, `google/gemini-3-flash`,
/// `.../models/gemini-3.1-pro`) is Gemini 3 or later, which validates thought signatures.
fn validates_signatures(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    let Some(version) = name.strip_prefix("gemini-") else {
        return false;
    };
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    major.parse::<u32>().is_ok_and(|m| m >= 3)
}

/// Gives the first function call of every model turn a signature where it has none (the
/// calls of another provider, or ids that lost theirs): Gemini 3 checks only that one, the
/// first of parallel calls.
fn sign_foreign_calls(contents: &mut [(&'static str, Vec<Value>)]) {
    for (_, parts) in contents.iter_mut().filter(|(role, _)| *role == "model") {
        if let Some(Value::Object(first)) =
            parts.iter_mut().find(|p| p.get("functionCall").is_some())
        {
            first
                .entry("thoughtSignature")
                .or_insert_with(|| Value::from(FOREIGN_SIGNATURE));
        }
    }
}

/// The `generateContent` request for `req` to `model`.
pub fn request(mut req: ChatRequest, model: &str, provider: &str) -> Result<Vec<u8>, GatewayError> {
    // `user` and `safety_identifier` are OpenAI's end-user ids for abuse monitoring, with no
    // Gemini equivalent: bookkeeping like `metadata`, left out rather than refused.
    req.refuse_unsupported(
        provider,
        &[
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "user",
            "safety_identifier",
        ],
    )?;
    // Without tools there are no calls to keep apart: the field means nothing then.
    if req.parallel_tool_calls == Some(false) && req.has_tools() {
        return Err(openai::unsupported("parallel_tool_calls", provider));
    }
    let mut body = req.rest.clone();
    let mut system: Vec<String> = Vec::new();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // Gemini answers tool results by function name; OpenAI by call id.
    let mut call_names: Vec<(String, String)> = Vec::new();
    let trailing = openai::trailing_instructions(&req.messages);
    for (i, m) in req.messages.iter().enumerate() {
        match m {
            // An instruction after the assistant's last message: the user's turn it answers.
            Message::System { content, .. } | Message::Developer { content, .. }
                if i >= trailing =>
            {
                openai::text_only(content, i, "system", provider)?;
                openai::push_turn(&mut contents, "user", user_parts(content, i)?);
            }
            Message::System { content, .. } | Message::Developer { content, .. } => {
                // Gemini's systemInstruction takes text only.
                let text = openai::text_only(content, i, "system", provider)?;
                if !openai::is_blank(&text) {
                    system.push(text);
                }
            }
            Message::User { content, .. } => {
                openai::push_turn(&mut contents, "user", user_parts(content, i)?)
            }
            Message::Assistant {
                content,
                tool_calls,
                function_call,
                audio,
                ..
            } => {
                if function_call.is_some() || audio.is_some() {
                    return Err(bad(format!(
                        "messages[{i}]: function_call and audio cannot be expressed for provider {provider}"
                    )));
                }
                let (text, calls) = openai::assistant_parts(content, tool_calls);
                let mut parts: Vec<Value> = text.map(|t| json!({"text": t})).into_iter().collect();
                for (call, args) in calls {
                    call_names.push((call.id.clone(), call.function.name.clone()));
                    let mut part =
                        json!({"functionCall": {"name": call.function.name, "args": args}});
                    // Gemini 3 refuses a function call of the current turn without the
                    // signature it gave with it (carried in the tool call id).
                    if let Some((_, signature)) = call.id.split_once(SIGNATURE_MARK) {
                        part["thoughtSignature"] = Value::from(signature);
                    }
                    parts.push(part);
                }
                if !parts.is_empty() {
                    openai::push_turn(&mut contents, "model", parts);
                }
            }
            Message::Tool {
                content,
                tool_call_id,
            } => {
                let Some((_, name)) = call_names.iter().rev().find(|(id, _)| id == tool_call_id)
                else {
                    return Err(bad(format!(
                        "messages[{i}].tool_call_id {:?} names no earlier assistant tool call",
                        openai::truncate(tool_call_id)
                    )));
                };
                // A function response is JSON: images or files have no place in it here.
                let text = openai::text_only(content, i, "tool", provider)?;
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(o)) => Value::Object(o),
                    _ => json!({"content": text}),
                };
                openai::push_turn(
                    &mut contents,
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            Message::Function { .. } => {
                return Err(bad(format!(
                    "messages[{i}]: role function is deprecated; send role tool"
                )));
            }
        }
    }
    openai::ends_where_sent(&req.messages, &contents, provider)?;
    if validates_signatures(model) {
        sign_foreign_calls(&mut contents);
    }
    let contents: Vec<Value> = contents
        .into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system.join("\n\n")}]}),
        );
    }
    let mut generation = Map::new();
    if let Some(t) = req.temperature {
        generation.insert("temperature".into(), Value::from(t));
    }
    if let Some(p) = req.top_p {
        generation.insert("topP".into(), Value::from(p));
    }
    if let Some(n) = req.max_output_tokens() {
        generation.insert("maxOutputTokens".into(), Value::from(n));
    }
    if let Some(stop) = req.stop.take() {
        generation.insert("stopSequences".into(), Value::from(stop.into_vec()));
    }
    if let Some(p) = req.presence_penalty {
        generation.insert("presencePenalty".into(), Value::from(p));
    }
    if let Some(p) = req.frequency_penalty {
        generation.insert("frequencyPenalty".into(), Value::from(p));
    }
    if let Some(s) = req.seed {
        generation.insert("seed".into(), Value::from(s));
    }
    match &req.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            generation.insert("responseMimeType".into(), "application/json".into());
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            generation.insert("responseMimeType".into(), "application/json".into());
            if let Some(schema) = &json_schema.schema {
                generation.insert("responseJsonSchema".into(), schema.clone());
            }
        }
    }
    if !generation.is_empty() {
        super::merge_object(&mut body, "generationConfig", generation);
    }
    let declarations: Vec<Value> = req
        .tools
        .iter()
        .flatten()
        .map(|Tool::Function { function: f, .. }| {
            let mut d = Map::new();
            d.insert("name".into(), Value::String(f.name.clone()));
            if let Some(desc) = &f.description {
                d.insert("description".into(), Value::String(desc.clone()));
            }
            if let Some(p) = &f.parameters {
                d.insert("parametersJsonSchema".into(), p.clone());
            }
            Value::Object(d)
        })
        .collect();
    if !declarations.is_empty() {
        body.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
    }
    // `strict` is not passed on (as the function calling mode `VALIDATED`): not every API
    // version and model takes it, and the OpenAI Agents SDK sets it on every tool.
    let choice = req.tool_choice.as_ref().map(|c| c.choice()).transpose()?;
    if let Some(choice) = choice {
        let config = match choice {
            Choice::Auto => json!({"mode": "AUTO"}),
            Choice::None => json!({"mode": "NONE"}),
            Choice::Required => json!({"mode": "ANY"}),
            Choice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        body.insert(
            "toolConfig".into(),
            json!({"functionCallingConfig": config}),
        );
    }
    Ok(openai::to_vec(&body))
}

/// The parts of a user message: text that is not blank (Google refuses empty text parts),
/// images, files and audio.
fn user_parts(content: &Content, i: usize) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        Content::Text(t) if openai::is_blank(t) => return Ok(Vec::new()),
        Content::Text(t) => return Ok(vec![json!({"text": t})]),
        Content::Parts(parts) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        match p {
            Part::Text { text, .. } | Part::Refusal { refusal: text } => {
                if !openai::is_blank(text) {
                    out.push(json!({"text": text}));
                }
            }
            Part::ImageUrl { image_url, .. } => match openai::parse_data_url(&image_url.url) {
                Some((mime, data)) => {
                    out.push(json!({"inlineData": {"mimeType": mime, "data": data}}));
                }
                None => out.push(json!({"fileData": {
                    "mimeType": mime_from_extension(&image_url.url), "fileUri": image_url.url}})),
            },
            Part::File { file, .. } => {
                let Some((mime, data)) = file.file_data.as_deref().and_then(openai::parse_data_url)
                else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].file: only file_data as a base64 data URL can be expressed for Google providers"
                    )));
                };
                out.push(json!({"inlineData": {"mimeType": mime, "data": data}}));
            }
            Part::InputAudio { input_audio } => {
                let data = input_audio.get("data").and_then(Value::as_str);
                let format = input_audio.get("format").and_then(Value::as_str);
                let (Some(data), Some(format)) = (data, format) else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].input_audio needs data and format"
                    )));
                };
                out.push(
                    json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}),
                );
            }
        }
    }
    Ok(out)
}

fn mime_from_extension(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        _ => "image/jpeg",
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    error: Option<GoogleError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
    /// Google's own words on why the model stopped.
    #[serde(default)]
    finish_message: Option<String>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<GeminiPart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<FunctionCall>,
    /// The model's encrypted reasoning state; Gemini 3 requires it back with a function call.
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct FunctionCall {
    name: String,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    /// Of the prompt, the tokens from cached content.
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    /// Input beside the prompt: what the model's tool calls read.
    #[serde(default)]
    tool_use_prompt_token_count: u64,
}

impl UsageMetadata {
    /// As the gateway counts it on passthrough: the tool-use prompt is input, thinking output.
    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_token_count
                .saturating_add(self.tool_use_prompt_token_count),
            self.candidates_token_count
                .saturating_add(self.thoughts_token_count),
        )
        .with_cached(self.cached_content_token_count)
        .with_reasoning(self.thoughts_token_count)
    }
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: Option<String>,
}

/// OpenAI `finish_reason` for a Gemini `finishReason`.
fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ => "stop",
    }
}

/// Output of the model that is not valid, for a `finishReason` that says so: a function call
/// it could not form (`MALFORMED_FUNCTION_CALL`), or one the request did not allow
/// (`UNEXPECTED_TOOL_CALL`: no tools, or not a declared one).
fn invalid_output(reason: &str, message: Option<&str>) -> Option<InvalidOutput> {
    matches!(reason, "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL").then(|| InvalidOutput {
        said_by: "Google finishReason",
        reason: reason.to_owned(),
        detail: message.map(str::to_owned),
    })
}

fn blocked_prompt(reason: &str) -> String {
    format!("the prompt was blocked by Google's safety filters (blockReason {reason})")
}

fn blocked_response(reason: &str) -> String {
    format!("the response was blocked by Google's safety filters (finishReason {reason})")
}

/// The OpenAI id of a function call: Google's id (or one made from the response id), and the
/// part's thought signature after [`SIGNATURE_MARK`]. Clients send tool call ids back as they
/// got them, so the signature reaches Gemini again with the call (as Gemini 3 requires).
fn call_id(ctx_id: &str, call: &FunctionCall, n: usize, signature: Option<&str>) -> String {
    let mut id = match &call.id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            let tail: String = ctx_id
                .chars()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("call_{tail}_{n}")
        }
    };
    if let Some(sig) = signature.filter(|s| !s.is_empty()) {
        id.push_str(SIGNATURE_MARK);
        id.push_str(sig);
    }
    id
}

/// A complete `generateContent` response as a `chat.completion`, or OpenAI's error for output of
/// the model that is not valid.
pub fn response(body: &[u8], ctx: &ResponseCtx) -> Result<Translated, String> {
    let r: GenerateResponse = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected Google response: {}", json_error(&e)))?;
    let mut c = Completion {
        id: ctx.id.clone(),
        model: r.model_version.clone().unwrap_or_else(|| ctx.model.clone()),
        usage: r.usage_metadata.unwrap_or_default().usage(),
        finish_reason: "stop",
        ..Completion::default()
    };
    let Some(candidate) = r.candidates.into_iter().next() else {
        let reason = r
            .prompt_feedback
            .and_then(|f| f.block_reason)
            .unwrap_or_else(|| "OTHER".to_owned());
        c.refusal = Some(blocked_prompt(&reason));
        c.finish_reason = "content_filter";
        return Ok(Translated::Answer(c.to_json(ctx.created)));
    };
    let finish = candidate.finish_reason.as_deref();
    if let Some(e) = finish.and_then(|r| invalid_output(r, candidate.finish_message.as_deref())) {
        return Ok(Translated::InvalidOutput(e));
    }
    let mut text = String::new();
    let mut reasoning = String::new();
    for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
        if let Some(call) = part.function_call {
            let signature = part.thought_signature.as_deref();
            let id = call_id(&ctx.id, &call, c.tool_calls.len(), signature);
            let args = call.args.clone().unwrap_or_else(|| json!({}));
            c.tool_calls
                .push(ToolCallOut::function(id, call.name, &args));
        } else if let Some(t) = part.text {
            // Thought summaries (`includeThoughts`) are the model's reasoning.
            if part.thought == Some(true) {
                reasoning.push_str(&t);
            } else {
                text.push_str(&t);
            }
        }
    }
    c.reasoning = (!reasoning.is_empty()).then_some(reasoning);
    let reason = candidate.finish_reason.as_deref().unwrap_or("STOP");
    c.finish_reason = if c.tool_calls.is_empty() {
        finish_reason(reason)
    } else {
        "tool_calls"
    };
    if c.finish_reason == "content_filter" && text.is_empty() {
        c.refusal = Some(blocked_response(reason));
    } else if !text.is_empty() || c.tool_calls.is_empty() {
        c.text = Some(text);
    }
    Ok(Translated::Answer(c.to_json(ctx.created)))
}

/// A Google error body in the OpenAI error shape.
pub fn error(status: u16, body: &[u8]) -> Vec<u8> {
    // Errors come as an object, or (from streaming endpoints) as a one-element array.
    let parsed = serde_json::from_slice::<GenerateResponse>(body)
        .ok()
        .or_else(|| {
            serde_json::from_slice::<Vec<GenerateResponse>>(body)
                .ok()
                .and_then(|v| v.into_iter().next())
        });
    match parsed.and_then(|r| r.error) {
        Some(e) => openai::error_json(
            &e.message,
            openai::error_type_for(status),
            e.status.as_deref(),
        ),
        None => super::opaque_error(status, body),
    }
}

/// `streamGenerateContent?alt=sse` → `chat.completion.chunk` SSE, event by event.
pub struct Stream {
    sse: SseParser,
    state: StreamState,
}

struct StreamState {
    w: ChunkWriter,
    usage: Usage,
    /// Whether the stream reported usage yet.
    usage_seen: bool,
    tools: usize,
    /// Text of the answer was written: a safety stop after it is a `content_filter` finish
    /// without a refusal, as the same answer unstreamed has.
    wrote_text: bool,
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
                usage: Usage::default(),
                usage_seen: false,
                tools: 0,
                wrote_text: false,
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
                .error(out, &super::sse::too_large("Google"), "api_error");
        }
    }

    fn hold_in(&mut self, held: crate::buffers::Held) {
        self.sse.hold_in(held);
    }

    fn refused(&self) -> Option<crate::buffers::BudgetExhausted> {
        self.sse.refused()
    }

    fn usage(&self) -> Option<Usage> {
        self.state.usage_seen.then_some(self.state.usage)
    }

    fn ended_whole(&self) -> bool {
        self.state.w.sent_done()
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let Self { sse, state } = self;
        sse.finish(&mut |e| state.on_event(e, out));
        if state.done {
            return;
        }
        state.done = true;
        if state.w.is_finished() {
            state.w.done(out, state.usage);
        } else {
            state.w.error(
                out,
                "the Google stream ended without a finishReason",
                "api_error",
            );
        }
    }
}

impl StreamState {
    fn on_event(&mut self, e: Event<'_>, out: &mut BytesMut) {
        if self.done {
            return;
        }
        let Ok(r) = serde_json::from_str::<GenerateResponse>(e.data) else {
            return;
        };
        if let Some(err) = r.error {
            self.w.error(
                out,
                &err.message,
                err.status.as_deref().unwrap_or("api_error"),
            );
            self.done = true;
            return;
        }
        if let Some(v) = &r.model_version
            && self.w.model != *v
            && !v.is_empty()
        {
            self.w.model.clone_from(v);
        }
        if let Some(u) = r.usage_metadata {
            self.usage = u.usage();
            self.usage_seen = true;
        }
        let Some(candidate) = r.candidates.into_iter().next() else {
            if let Some(reason) = r.prompt_feedback.and_then(|f| f.block_reason) {
                self.w.refusal(out, &blocked_prompt(&reason));
                self.w.finish(out, "content_filter");
            }
            return;
        };
        self.w.role(out);
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            if let Some(call) = part.function_call {
                let signature = part.thought_signature.as_deref();
                let id = call_id(&self.w.id, &call, self.tools, signature);
                let args = call.args.unwrap_or_else(|| json!({})).to_string();
                let index = u32::try_from(self.tools).unwrap_or(u32::MAX);
                self.w.tool_start(out, index, &id, &call.name, &args);
                self.tools += 1;
            } else if let Some(t) = part.text {
                if part.thought == Some(true) {
                    self.w.reasoning(out, &t);
                } else {
                    self.wrote_text |= !t.is_empty();
                    self.w.content(out, &t);
                }
            }
        }
        if let Some(e) = (candidate.finish_reason.as_deref())
            .and_then(|r| invalid_output(r, candidate.finish_message.as_deref()))
        {
            // In place of the finish: the stream ends with OpenAI's error (its usage, in this
            // same event, counted from the provider's stream).
            self.w.invalid_output(out, &e);
            self.done = true;
            return;
        }
        if let Some(reason) = candidate.finish_reason {
            let mapped = if self.tools > 0 {
                "tool_calls"
            } else {
                finish_reason(&reason)
            };
            if mapped == "content_filter" && !self.wrote_text {
                self.w.refusal(out, &blocked_response(&reason));
            }
            self.w.finish(out, mapped);
        }
    }
}

/// Embeddings: AI Studio `batchEmbedContents` request.
pub fn embed_request(
    req: &EmbeddingsRequest,
    model: &str,
    provider: &str,
) -> Result<Vec<u8>, GatewayError> {
    let texts = req.texts(provider)?;
    let requests: Vec<Value> = texts
        .iter()
        .map(|t| {
            let mut r =
                json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}});
            if let (Some(d), Some(obj)) = (req.dimensions, r.as_object_mut()) {
                obj.insert("outputDimensionality".into(), Value::from(d));
            }
            if let Some(obj) = r.as_object_mut() {
                for (k, v) in &req.rest {
                    obj.insert(k.clone(), v.clone());
                }
            }
            r
        })
        .collect();
    Ok(openai::to_vec(&json!({"requests": requests})))
}

/// Whether a Vertex embedding model takes one text per request (Vertex answers a list to
/// `gemini-embedding-*` with a 400): a list is then sent one text at a time.
pub fn vertex_embeds_one_per_request(model: &str) -> bool {
    model.starts_with("gemini-embedding")
}

/// Embeddings: Vertex `:predict` request.
pub fn vertex_embed_request(
    req: &EmbeddingsRequest,
    provider: &str,
) -> Result<Vec<u8>, GatewayError> {
    let texts = req.texts(provider)?;
    let instances: Vec<Value> = texts.iter().map(|t| json!({"content": t})).collect();
    let mut body = json!({"instances": instances});
    if let (Some(d), Some(obj)) = (req.dimensions, body.as_object_mut()) {
        obj.insert("parameters".into(), json!({"outputDimensionality": d}));
    }
    Ok(openai::to_vec(&body))
}

/// Embeddings response of either Google API as an OpenAI embedding list.
pub fn embed_response(body: &[u8], ctx: &ResponseCtx) -> Result<Vec<u8>, String> {
    let (vectors, tokens) = embed_vectors(body)?;
    Ok(openai::embeddings_json(
        &ctx.model, &vectors, ctx.base64, tokens,
    ))
}

/// The vectors and input tokens of an embeddings response of either Google API.
pub fn embed_vectors(body: &[u8]) -> Result<(Vec<Vec<f32>>, u64), String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected Google response: {}", json_error(&e)))?;
    let mut vectors = Vec::new();
    let mut tokens = 0u64;
    if let Some(list) = v.get("embeddings").and_then(Value::as_array) {
        for e in list {
            vectors.push(
                e.get("values")
                    .and_then(openai::floats)
                    .ok_or("Google embedding without values")?,
            );
        }
    } else if let Some(list) = v.get("predictions").and_then(Value::as_array) {
        for p in list {
            let e = p
                .get("embeddings")
                .ok_or("Vertex prediction without embeddings")?;
            vectors.push(
                e.get("values")
                    .and_then(openai::floats)
                    .ok_or("Vertex embedding without values")?,
            );
            tokens += e
                .pointer("/statistics/token_count")
                .and_then(Value::as_f64)
                .map_or(0, |t| t as u64);
        }
    } else {
        return Err("Google embeddings response without embeddings".into());
    }
    Ok((vectors, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::tests::{answer, ctx, cut, golden, golden_json, run_stream};
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hello \"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 5,\"candidatesTokenCount\": 1,\"totalTokenCount\": 6},\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"world\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 5,\"candidatesTokenCount\": 2,\"totalTokenCount\": 7},\"modelVersion\": \"gemini-2.5-flash\"}\r\n\r\n",
    );

    #[test]
    fn stream_translates_text_finish_and_usage() {
        let out = run_stream(&mut Stream::new(&ctx(true, false)), &[STREAM.as_bytes()]);
        golden("gemini_stream.sse", &out);
        assert!(out.contains(r#""content":"Hello ""#));
        assert!(out.contains(r#""finish_reason":"stop""#));
        assert!(out.contains(r#""prompt_tokens":5,"completion_tokens":2"#));
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn cached_content_and_thoughts_are_named_in_the_usage_details() {
        let resp = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hi"}]},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":120,"candidatesTokenCount":5,"thoughtsTokenCount":30,"cachedContentTokenCount":100}}"#;
        let out: Value =
            serde_json::from_slice(&answer(response(resp, &ctx(false, false)))).expect("json");
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 120, "completion_tokens": 35, "total_tokens": 155,
                   "prompt_tokens_details": {"cached_tokens": 100},
                   "completion_tokens_details": {"reasoning_tokens": 30}})
        );
    }

    #[test]
    fn request_maps_system_tools_and_function_responses() {
        let req = ChatRequest::parse(
            br#"{"model":"google-ai-studio/gemini-2.5-flash","temperature":0.2,"max_tokens":50,"seed":7,
            "safetySettings":[{"category":"HARM_CATEGORY_HARASSMENT","threshold":"BLOCK_NONE"}],
            "messages":[
              {"role":"system","content":"be brief"},
              {"role":"user","content":[{"type":"text","text":"weather?"},{"type":"image_url","image_url":{"url":"data:image/jpeg;base64,/9j/"}}]},
              {"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
              {"role":"tool","tool_call_id":"c1","content":"{\"temp\":21}"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],
            "tool_choice":{"type":"function","function":{"name":"get_weather"}},
            "response_format":{"type":"json_object"}}"#,
        )
        .expect("parse");
        golden_json(
            "gemini_request.json",
            &request(req, "gemini-2.5-flash", "google-ai-studio").expect("translate"),
        );
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_finish_with_a_refusal() {
        let body = br#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(body, &ctx(false, false)))).expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
        assert!(
            v["choices"][0]["message"]["refusal"]
                .as_str()
                .is_some_and(|r| r.contains("blockReason SAFETY"))
        );
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn a_malformed_function_call_is_openais_model_error_not_an_empty_finished_answer() {
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Let me "}]},
            "finishReason":"MALFORMED_FUNCTION_CALL","finishMessage":"Malformed function call: print(f(a=))"}],
            "usageMetadata":{"promptTokenCount":2595,"totalTokenCount":2595}}"#;
        let Ok(Translated::InvalidOutput(e)) = response(body, &ctx(false, false)) else {
            panic!("not an error")
        };
        let v: Value = serde_json::from_slice(&e.to_json()).expect("json");
        assert_eq!(v["error"]["type"], "model_error");
        assert_eq!(v["error"]["code"], "MALFORMED_FUNCTION_CALL");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("The model produced invalid content (Google finishReason MALFORMED_FUNCTION_CALL: Malformed function call: print(f(a=)))"),
            "{message}"
        );
        // A call the request did not allow is one too; other finishes are answers.
        let unexpected = br#"{"candidates":[{"finishReason":"UNEXPECTED_TOOL_CALL"}]}"#;
        assert!(matches!(
            response(unexpected, &ctx(false, false)),
            Ok(Translated::InvalidOutput(e)) if e.reason == "UNEXPECTED_TOOL_CALL" && e.detail.is_none()
        ));
        let other =
            br#"{"candidates":[{"content":{"parts":[{"text":"hi"}]},"finishReason":"OTHER"}]}"#;
        assert!(matches!(
            response(other, &ctx(false, false)),
            Ok(Translated::Answer(_))
        ));
        // Streamed: what came before, then the error in place of the finish; no [DONE].
        let out = run_stream(
            &mut Stream::new(&ctx(true, false)),
            &[
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Let me \"}],\"role\":\"model\"}}]}\r\n\r\n",
                "data: {\"candidates\":[{\"finishReason\":\"MALFORMED_FUNCTION_CALL\"}],\"usageMetadata\":{\"promptTokenCount\":5}}\r\n\r\n",
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"ignored\"}]}}]}\r\n\r\n",
            ],
        );
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        let last: Value = serde_json::from_str(
            events
                .last()
                .and_then(|e| e.strip_prefix("data: "))
                .unwrap_or_default(),
        )
        .expect("json");
        assert_eq!(last["error"]["type"], "model_error", "{out}");
        assert_eq!(last["error"]["code"], "MALFORMED_FUNCTION_CALL");
        assert!(out.contains("Let me ") && !out.contains("ignored"), "{out}");
        assert!(
            !out.contains("finish_reason\":\"stop") && !out.contains("[DONE]"),
            "{out}"
        );
    }

    #[test]
    fn function_calls_get_ids_and_the_tool_calls_finish_reason() {
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"f","args":{"a":1}}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(body, &ctx(false, false)))).expect("json");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["arguments"], r#"{"a":1}"#);
        assert!(
            call["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_"))
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn thought_signatures_go_out_in_the_tool_call_id_and_come_back_with_the_call() {
        let resp = br#"{"candidates":[{"content":{"role":"model","parts":[
            {"functionCall":{"name":"get_weather","args":{"city":"Oslo"}},"thoughtSignature":"CiQB0e2Kb+/sig=="}]},
            "finishReason":"STOP"}]}"#;
        let out: Value =
            serde_json::from_slice(&answer(response(resp, &ctx(false, false)))).expect("json");
        let id = out["choices"][0]["message"]["tool_calls"][0]["id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(id.ends_with("~ts~CiQB0e2Kb+/sig=="), "{id}");
        let stream = format!(
            "data: {}\r\n\r\n",
            std::str::from_utf8(resp).expect("utf8").replace('\n', "")
        );
        let chunks = run_stream(&mut Stream::new(&ctx(false, false)), &[stream.as_bytes()]);
        assert!(chunks.contains("~ts~CiQB0e2Kb+/sig=="), "{chunks}");
        // The next turn: the call goes back with its signature, the result finds its name.
        let next = json!({"model": "g/gemini-3-pro", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": id, "content": "cold"}]});
        let req = ChatRequest::parse(next.to_string().as_bytes()).expect("parse");
        let body = request(req, "gemini-3-pro", "google-ai-studio").expect("translate");
        let body: Value = serde_json::from_slice(&body).expect("json");
        let call = &body["contents"][1]["parts"][0];
        assert_eq!(call["thoughtSignature"], "CiQB0e2Kb+/sig==");
        assert_eq!(call["functionCall"]["name"], "get_weather");
        assert_eq!(
            body["contents"][2]["parts"][0]["functionResponse"]["name"],
            "get_weather"
        );
    }

    /// The `generateContent` body for a chat completion request body sent to `model`.
    fn translated(model: &str, body: Value) -> Result<Value, GatewayError> {
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parse");
        let body = request(req, model, "google-ai-studio")?;
        Ok(serde_json::from_slice(&body).expect("json"))
    }

    /// A conversation whose tool calls another provider made: two parallel, then one.
    fn foreign_history() -> Value {
        let call = |id: &str| {
            json!({"id": id, "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}})
        };
        json!({"model": "dynamic/agent", "messages": [
            {"role": "user", "content": "weather in Oslo and Rome?"},
            {"role": "assistant", "content": "\n\n", "tool_calls": [call("toolu_1"), call("toolu_2")]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "warm"},
            {"role": "assistant", "tool_calls": [call("toolu_3~ts~CiQBreal")]},
            {"role": "tool", "tool_call_id": "toolu_3~ts~CiQBreal", "content": "windy"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    }

    #[test]
    fn gemini_3_gets_the_documented_signature_on_the_first_call_of_each_foreign_turn() {
        let v = translated("gemini-3-pro-preview", foreign_history()).expect("translate");
        let contents = v["contents"].as_array().expect("contents");
        let signatures: Vec<Vec<Value>> = contents
            .iter()
            .filter(|c| c["role"] == "model")
            .map(|c| {
                c["parts"]
                    .as_array()
                    .expect("parts")
                    .iter()
                    .map(|p| p["thoughtSignature"].clone())
                    .collect()
            })
            .collect();
        assert_eq!(
            signatures,
            [
                vec![json!(FOREIGN_SIGNATURE), Value::Null],
                vec![json!("CiQBreal")],
            ],
            "{v}"
        );
        // Not for models that do not check them.
        let v = translated("gemini-2.5-flash", foreign_history()).expect("translate");
        assert!(!v.to_string().contains(FOREIGN_SIGNATURE), "{v}");
        for (model, checks) in [
            ("gemini-3-pro-preview", true),
            ("models/gemini-3-flash", true),
            ("google/gemini-3.1-pro", true),
            ("my-proj/us-central1/gemini-10-ultra", true),
            ("gemini-2.5-pro", false),
            ("gemini-embedding-001", false),
            ("gemma-3-27b-it", false),
        ] {
            assert_eq!(validates_signatures(model), checks, "{model}");
        }
    }

    #[test]
    fn blank_text_parts_are_left_out_and_images_where_only_text_goes_refused() {
        let v = translated("gemini-2.5-flash", foreign_history()).expect("translate");
        assert_eq!(
            v["contents"][1]["parts"][0]["functionCall"]["name"],
            "get_weather"
        );
        assert!(!v.to_string().contains(r#""text":"\n\n""#), "{v}");
        let v = translated(
            "gemini-2.5-flash",
            json!({"model": "m", "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": " "},
                {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/"}}]},
            {"role": "assistant", "content": "  "},
            {"role": "user", "content": "and?"}]}),
        )
        .expect("translate");
        assert!(v.get("systemInstruction").is_none(), "{v}");
        assert_eq!(
            v["contents"],
            json!([{"role": "user", "parts": [
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}}, {"text": "and?"}]}])
        );
        let image =
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}});
        let err = translated(
            "gemini-2.5-flash",
            json!({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "see"}, image]},
            {"role": "user", "content": "hi"}]}),
        )
        .expect_err("system image");
        assert!(err.to_string().contains("messages[0].content[1]"), "{err}");
        let mut history = foreign_history();
        history["messages"][2]["content"] = json!([image]);
        let err = translated("gemini-2.5-flash", history).expect_err("tool image");
        assert_eq!(err.code(), 2107);
        assert!(err.to_string().contains("messages[2].content[0]"), "{err}");
    }

    #[test]
    fn thought_summaries_are_reasoning_content_streamed_or_not() {
        let resp = br#"{"candidates":[{"content":{"role":"model","parts":[
            {"text":"Oslo is far north.","thought":true},{"text":"Cold."}]},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"thoughtsTokenCount":5}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(resp, &ctx(false, false)))).expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], "Cold.");
        assert_eq!(
            v["choices"][0]["message"]["reasoning_content"],
            "Oslo is far north."
        );
        let stream = format!(
            "data: {}\r\n\r\n",
            std::str::from_utf8(resp).expect("utf8").replace('\n', "")
        );
        let out = run_stream(&mut Stream::new(&ctx(false, false)), &[stream.as_bytes()]);
        let deltas = crate::compat::tests::deltas(&out);
        let (reasoning, _) = crate::compat::tests::thinking_of(&deltas);
        assert_eq!(reasoning, "Oslo is far north.", "{out}");
        let content: String = deltas
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(content, "Cold.", "{out}");
    }

    #[test]
    fn strict_tools_keep_the_mode_tool_choice_asks_for() {
        let strict = |choice: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "strict": true}}]});
            if !choice.is_null() {
                body["tool_choice"] = choice;
            }
            translated("gemini-2.5-flash", body).expect("translate")["toolConfig"]
                ["functionCallingConfig"]
                .clone()
        };
        assert_eq!(strict(Value::Null), Value::Null);
        assert_eq!(strict(json!("auto")), json!({"mode": "AUTO"}));
        assert_eq!(strict(json!("required")), json!({"mode": "ANY"}));
        assert_eq!(strict(json!("none")), json!({"mode": "NONE"}));
    }

    #[test]
    fn tool_results_need_a_known_call_id() {
        let req = ChatRequest::parse(
            br#"{"model":"g/m","messages":[{"role":"tool","tool_call_id":"nope","content":"x"}]}"#,
        )
        .expect("parse");
        let err = request(req, "gemini-2.5-flash", "google-ai-studio").expect_err("unknown id");
        assert!(
            err.to_string().contains("messages[0].tool_call_id"),
            "{err}"
        );
    }

    #[test]
    fn google_errors_take_the_openai_shape() {
        let v: Value = serde_json::from_slice(&error(
            400,
            br#"{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}"#,
        ))
        .expect("json");
        assert_eq!(v["error"]["message"], "API key not valid");
        assert_eq!(v["error"]["code"], "INVALID_ARGUMENT");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

        #[test]
        fn any_chunking_gives_the_same_output(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..20)) {
            let whole = run_stream(&mut Stream::new(&ctx(true, false)), &[STREAM.as_bytes()]);
            let pieces = cut(STREAM.as_bytes(), cuts);
            prop_assert_eq!(run_stream(&mut Stream::new(&ctx(true, false)), &pieces), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       cuts in proptest::collection::vec(0usize..2048, 0..10)) {
            let _ = run_stream(&mut Stream::new(&ctx(true, false)), &cut(&data, cuts));
        }
    }

    #[test]
    fn an_instruction_after_the_models_answer_is_the_users_last_turn() {
        let v = translated(
            "gemini-2.5-flash",
            json!({"model": "m", "messages": [
            {"role": "system", "content": "You write haiku."},
            {"role": "user", "content": "Write a haiku about rain."},
            {"role": "assistant", "content": "Soft rain on the roof"},
            {"role": "developer", "content": "Now rate it."}]}),
        )
        .expect("sent");
        assert_eq!(
            v["systemInstruction"],
            json!({"parts": [{"text": "You write haiku."}]})
        );
        assert_eq!(
            v["contents"][2],
            json!({"role": "user", "parts": [{"text": "Now rate it."}]})
        );
        // A blank last message leaves the turns ending on the model's: refused, naming it.
        for last in [
            json!({"role": "user", "content": "  "}),
            json!({"role": "developer", "content": ""}),
        ] {
            let err = translated(
                "gemini-2.5-flash",
                json!({"model": "m", "messages": [
                {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, last]}),
            )
            .expect_err("refused");
            assert!(err.to_string().contains("messages[2]"), "{err}");
        }
    }

    #[test]
    fn an_event_too_large_to_translate_ends_the_stream_with_an_error_not_in_silence() {
        let big = format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"inlineData\": {{\"mimeType\": \"image/png\", \"data\": \"{}\"}}}}]}}}}]}}\r\n\r\n",
            "A".repeat(crate::compat::sse::MAX_EVENT_BYTES)
        );
        let mut t = Stream::new(&ctx(false, false));
        let out = run_stream(&mut t, &[big.as_bytes(), STREAM.as_bytes()]);
        assert!(!t.ended_whole());
        assert!(
            out.contains("the Google stream sent an event larger than 8 MiB"),
            "{out}"
        );
        assert!(!out.contains("Hello") && !out.contains("[DONE]"), "{out}");
    }
}
