//! OpenAI chat completions and embeddings ⇄ AWS Bedrock Converse / ConverseStream (binary
//! event stream) and InvokeModel (Titan and Cohere embeddings), signed with SigV4 by the
//! gateway.
//!
//! Credentials are the key file `aws-bedrock.<alias>`, JSON:
//! `{"accessKeyId": "...", "secretAccessKey": "...", "sessionToken": "...", "region": "..."}`
//! (`sessionToken` and `region` optional). The region comes from the model string
//! (`aws-bedrock/{region}/{modelId}`) or else from the key file.
//!
//! Claude's extended thinking (`reasoningContent` blocks) is shown and sent back in the same
//! `reasoning_content` / `thinking_blocks` shape as for Anthropic (see `anthropic`).

use std::fmt;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::anthropic::{JSON_TOOL, JSON_TOOL_INSTRUCTION, JsonAnswer};
use super::eventstream::Decoder;
use super::openai::{
    self, ChatRequest, Choice, ChunkWriter, Completion, Content, EmbeddingsRequest, InvalidOutput,
    Message, Part, ResponseFormat, ThinkingBlock, Tool, ToolCallOut, Usage, bad,
};
use super::{ResponseCtx, StreamTranslator, Translated};
use crate::error::GatewayError;
use crate::error::json_error;

const PROVIDER: &str = "aws-bedrock";

/// AWS credentials from a key file; never printed.
pub struct AwsCredentials {
    access_key_id: String,
    secret_access_key: SecretString,
    session_token: Option<SecretString>,
    /// Default region for models named without one.
    pub region: Option<String>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AwsCredentials([redacted])")
    }
}

impl AwsCredentials {
    /// Parses the JSON key file, refusing values no request can be signed with (a line break
    /// kept from a file the value was read from, an empty key id, a region AWS does not name
    /// so); the error says which field, never quoting the file.
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct File {
            access_key_id: String,
            secret_access_key: String,
            #[serde(default)]
            session_token: Option<String>,
            #[serde(default)]
            region: Option<String>,
        }
        let f: File = serde_json::from_str(text).map_err(|_| {
            "not AWS credentials: JSON {\"accessKeyId\", \"secretAccessKey\", \"sessionToken\"?, \"region\"?}".to_owned()
        })?;
        if f.access_key_id.is_empty() {
            return Err("accessKeyId is empty".to_owned());
        }
        let fields = [
            ("accessKeyId", Some(&f.access_key_id)),
            ("secretAccessKey", Some(&f.secret_access_key)),
            ("sessionToken", f.session_token.as_ref()),
            ("region", f.region.as_ref()),
        ];
        for (name, value) in fields {
            // Control characters would panic aws-sigv4 as it writes them into headers (key id,
            // region, token), and no AWS credential holds one.
            if value.is_some_and(|v| v.chars().any(char::is_control)) {
                return Err(format!(
                    "{name} has a line break or other control character, which AWS credentials never hold"
                ));
            }
        }
        let region = f.region.filter(|r| !r.trim().is_empty());
        let lower_case_region =
            |r: &str| is_region(r) && !r.bytes().any(|b| b.is_ascii_uppercase());
        if region.as_deref().is_some_and(|r| !lower_case_region(r)) {
            return Err(
                "region is not an AWS region name in lower case (such as us-east-1)".to_owned(),
            );
        }
        Ok(Self {
            access_key_id: f.access_key_id,
            secret_access_key: SecretString::from(f.secret_access_key),
            session_token: f.session_token.map(SecretString::from),
            region,
        })
    }

    /// Signs `req` (whose body is `body`) for Bedrock in `region`, now: its `Authorization`,
    /// `X-Amz-Date` and (with a session token) `X-Amz-Security-Token` replace any it had.
    pub fn sign<B>(
        &self,
        req: &mut http::Request<B>,
        body: &[u8],
        region: &str,
        time: SystemTime,
    ) -> Result<(), GatewayError> {
        let unsigned = |why: &str| {
            GatewayError::UpstreamUnavailable(format!(
                "aws-bedrock: the request could not be signed: {why}"
            ))
        };
        // aws-sigv4 panics where these could not go into the request's Host or Authorization
        // header: the checks are made before it is called.
        if region.is_empty() || region.chars().any(char::is_control) {
            return Err(unsigned(
                "the region is not one a request can be signed for",
            ));
        }
        if req.uri().authority().is_none() && !req.headers().contains_key(http::header::HOST) {
            return Err(unsigned("the request names no host"));
        }
        let identity: Identity = Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.expose_secret().to_owned(),
            self.session_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            None,
            "sidegate-keys",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("bedrock")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|_| unsigned("the SigV4 signing parameters could not be built"))?
            .into();
        let uri = req.uri().to_string();
        let headers: Vec<(&str, &str)> = req
            .headers()
            .iter()
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
            .collect();
        let signable = SignableRequest::new(
            req.method().as_str(),
            &uri,
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|_| unsigned("the Bedrock request cannot be signed"))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|_| unsigned("the Bedrock request cannot be signed"))?
            .into_parts();
        // Set here rather than by `apply_to_request_http1x`, which unwraps each header value.
        let (signed, _) = instructions.into_parts();
        let mut values = Vec::with_capacity(signed.len());
        for h in &signed {
            let mut value = http::HeaderValue::from_str(h.value())
                .map_err(|_| unsigned("a signature header cannot be a header value"))?;
            // authorization and x-amz-security-token hold secrets or derive from them.
            value.set_sensitive(true);
            values.push((h.name(), value));
        }
        for (name, value) in values {
            req.headers_mut().insert(name, value);
        }
        Ok(())
    }
}

/// Stored credentials and the region they sign a request for. A request is signed anew for each
/// attempt as it is sent, as the AWS SDKs sign it: a signature is dated, and AWS refuses one
/// more than 5 minutes old ("Signature expired") — as a retry after an attempt that waited out
/// its timeout would be.
pub struct SigV4 {
    creds: AwsCredentials,
    region: String,
}

impl fmt::Debug for SigV4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigV4")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl SigV4 {
    /// Signs with `creds` for `region`.
    pub fn new(creds: AwsCredentials, region: String) -> Self {
        Self { creds, region }
    }

    /// Signs `req` over its body, now.
    pub fn sign(&self, req: &mut http::Request<Full<Bytes>>) -> Result<(), GatewayError> {
        // `Full` is a handle on the shared bytes: the copy costs a reference count.
        let body = req.body().clone().into_inner().unwrap_or_default();
        self.creds.sign(req, &body, &self.region, SystemTime::now())
    }
}

/// A region name as AWS writes them (`us-east-1`, `us-gov-west-1`, `eu-central-2`, the
/// European Sovereign Cloud's `eusc-de-east-1`).
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && (2..=4).contains(&parts[0].len())
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// `{region}/{modelId}` or `{modelId}`.
pub fn split_region(model: &str) -> (Option<&str>, &str) {
    match model.split_once('/') {
        Some((r, m)) if is_region(r) => (Some(r), m),
        _ => (None, model),
    }
}

/// The model id as one URL path segment (ARNs hold `/` and `:`).
pub fn encode_model_id(id: &str) -> String {
    let mut s = String::with_capacity(id.len() + 8);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A thinking block as a Converse `reasoningContent` block.
fn reasoning_block(block: &ThinkingBlock) -> Value {
    match block {
        ThinkingBlock::Thinking {
            thinking,
            signature,
        } => {
            let mut text = Map::new();
            text.insert("text".into(), Value::from(thinking.as_str()));
            if let Some(sig) = signature {
                text.insert("signature".into(), Value::from(sig.as_str()));
            }
            json!({"reasoningContent": {"reasoningText": text}})
        }
        ThinkingBlock::RedactedThinking { data } => {
            json!({"reasoningContent": {"redactedContent": data}})
        }
    }
}

/// Whether Claude's extended thinking is on (`additionalModelRequestFields.thinking`), under
/// which a forced tool is refused.
fn thinking_on(rest: &Map<String, Value>) -> bool {
    rest.get("additionalModelRequestFields")
        .and_then(|f| f.pointer("/thinking/type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "disabled")
}

/// Longest `toolUseId` Bedrock takes (`[a-zA-Z0-9_-]+`; see [`openai::portable_call_id`]).
const MAX_CALL_ID: usize = 64;

/// The Converse request for `req`, and whether the JSON tool is used.
pub fn request(mut req: ChatRequest) -> Result<(Vec<u8>, bool), GatewayError> {
    // `user` and `safety_identifier` (end-user ids for abuse monitoring) have no Converse
    // equivalent: bookkeeping like `metadata`, left out rather than refused.
    req.refuse_unsupported(PROVIDER, &["user", "safety_identifier"])?;
    // Without tools there are no calls to keep apart: the field means nothing then.
    if req.parallel_tool_calls == Some(false) && req.has_tools() {
        return Err(openai::unsupported("parallel_tool_calls", PROVIDER));
    }
    let mut body = req.rest.clone();
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // Tools the conversation called: Bedrock wants a toolConfig wherever toolUse blocks are.
    let mut called: Vec<&str> = Vec::new();
    let mut names = DocumentNames::default();
    let trailing = openai::trailing_instructions(&req.messages);
    for (i, m) in req.messages.iter().enumerate() {
        match m {
            // An instruction after the assistant's last message: the user's turn it answers.
            Message::System { content, .. } | Message::Developer { content, .. }
                if i >= trailing =>
            {
                openai::text_only(content, i, "system", PROVIDER)?;
                openai::push_turn(&mut messages, "user", user_blocks(content, i, &mut names)?);
            }
            Message::System { content, .. } | Message::Developer { content, .. } => {
                // Converse system blocks hold text (and guard or cache points), no images.
                let text = openai::text_only(content, i, "system", PROVIDER)?;
                match content {
                    // Each part a block of its own, a cache point after those marked.
                    Content::Parts(parts) if content.has_cache_control() => {
                        for p in parts {
                            if let Part::Text {
                                text,
                                cache_control,
                            } = p
                                && !openai::is_blank(text)
                            {
                                system.push(json!({"text": text}));
                                if cache_control.is_some() {
                                    system.push(cache_point());
                                }
                            }
                        }
                    }
                    _ if !openai::is_blank(&text) => system.push(json!({"text": text})),
                    _ => {}
                }
            }
            Message::User { content, .. } => {
                openai::push_turn(&mut messages, "user", user_blocks(content, i, &mut names)?)
            }
            Message::Assistant {
                content,
                tool_calls,
                function_call,
                audio,
                thinking_blocks,
                ..
            } => {
                if function_call.is_some() || audio.is_some() {
                    return Err(bad(format!(
                        "messages[{i}]: function_call and audio cannot be expressed for provider aws-bedrock"
                    )));
                }
                let (text, calls) = openai::assistant_parts(content, tool_calls);
                let mut blocks: Vec<Value> = thinking_blocks
                    .iter()
                    .flatten()
                    .map(reasoning_block)
                    .collect();
                match content {
                    // A prompt-caching breakpoint on an assistant turn's part: its text parts
                    // stay blocks of their own, a cache point after each one marked.
                    Some(c @ Content::Parts(parts)) if c.has_cache_control() => {
                        for p in parts {
                            if let Part::Text { text, .. } | Part::Refusal { refusal: text } = p
                                && !openai::is_blank(text)
                            {
                                blocks.push(json!({"text": text}));
                                if p.cache_control().is_some() {
                                    blocks.push(cache_point());
                                }
                            }
                        }
                    }
                    _ => blocks.extend(text.map(|t| json!({"text": t}))),
                }
                for (call, input) in calls {
                    if !called.contains(&call.function.name.as_str()) {
                        called.push(&call.function.name);
                    }
                    blocks.push(json!({"toolUse": {
                        "toolUseId": openai::portable_call_id(&call.id, MAX_CALL_ID),
                        "name": call.function.name, "input": input}}));
                }
                if !blocks.is_empty() {
                    openai::push_turn(&mut messages, "assistant", blocks);
                }
            }
            Message::Tool {
                content,
                tool_call_id,
            } => {
                // A tool result holds text, images and documents as a user turn does. Bedrock
                // wants at least one block, and text that is not blank: an empty result is an
                // empty JSON object.
                let mut result = user_blocks(content, i, &mut names)?;
                // A tool result holds no cache point: one goes after the result instead.
                let cached = result.len();
                result.retain(|b| b.get("cachePoint").is_none());
                let cached = result.len() < cached;
                if result.is_empty() {
                    result.push(json!({"json": {}}));
                }
                let mut blocks = vec![json!({"toolResult": {
                    "toolUseId": openai::portable_call_id(tool_call_id, MAX_CALL_ID),
                    "content": result}})];
                if cached {
                    blocks.push(cache_point());
                }
                openai::push_turn(&mut messages, "user", blocks);
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
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }
    let mut inference = Map::new();
    if let Some(n) = req.max_output_tokens() {
        inference.insert("maxTokens".into(), Value::from(n));
    }
    if let Some(t) = req.temperature_at_most(1.0) {
        inference.insert("temperature".into(), Value::from(t));
    }
    if let Some(p) = req.top_p {
        inference.insert("topP".into(), Value::from(p));
    }
    if let Some(stop) = req.stop.take() {
        inference.insert("stopSequences".into(), Value::from(stop.into_vec()));
    }
    if !inference.is_empty() {
        super::merge_object(&mut body, "inferenceConfig", inference);
    }
    let mut tools: Vec<Value> = req
        .tools
        .iter()
        .flatten()
        .flat_map(
            |Tool::Function {
                 function: f,
                 cache_control,
             }| {
                let mut spec = Map::new();
                spec.insert("name".into(), Value::String(f.name.clone()));
                if let Some(d) = &f.description {
                    spec.insert("description".into(), Value::String(d.clone()));
                }
                spec.insert(
                    "inputSchema".into(),
                    json!({"json": openai::tool_input_schema(f.parameters.as_ref())}),
                );
                // `strict` is not passed on: strict tool use is a feature of some models only, which
                // the others refuse, and the OpenAI Agents SDK sets it on every tool.
                let cache = cache_control.as_ref().map(|_| cache_point());
                std::iter::once(json!({"toolSpec": spec})).chain(cache)
            },
        )
        .collect();
    let choice = req.tool_choice.as_ref().map(|c| c.choice()).transpose()?;
    let json_answer = JsonAnswer::of(
        req.response_format.as_ref(),
        choice.as_ref(),
        !tools.is_empty(),
        thinking_on(&req.rest),
        PROVIDER,
    )?;
    let tool_choice = match (json_answer, choice) {
        (JsonAnswer::Forced, _) => Some(json!({"tool": {"name": JSON_TOOL}})),
        // Bedrock's default choice is auto.
        (JsonAnswer::Offered, _) | (JsonAnswer::NotAsked, None | Some(Choice::Auto)) => None,
        (JsonAnswer::NotAsked, Some(Choice::None)) if tools.is_empty() => None,
        (JsonAnswer::NotAsked, Some(Choice::None)) => {
            return Err(bad(
                "tool_choice none cannot be expressed for provider aws-bedrock; leave the tools out instead",
            ));
        }
        (JsonAnswer::NotAsked, Some(Choice::Required)) => Some(json!({"any": {}})),
        (JsonAnswer::NotAsked, Some(Choice::Function(name))) => {
            Some(json!({"tool": {"name": name}}))
        }
    };
    if json_answer.uses_tool() {
        let schema = match &req.response_format {
            Some(ResponseFormat::JsonSchema { json_schema }) => json_schema
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"})),
            _ => json!({"type": "object"}),
        };
        tools.push(json!({"toolSpec": {"name": JSON_TOOL,
            "description": "Respond with the answer as JSON.", "inputSchema": {"json": schema}}}));
    }
    let json_tool = json_answer.uses_tool();
    if json_answer == JsonAnswer::Offered {
        let instruction = json!({"text": JSON_TOOL_INSTRUCTION});
        match body.get_mut("system") {
            Some(Value::Array(system)) => system.push(instruction),
            _ => {
                body.insert("system".into(), Value::Array(vec![instruction]));
            }
        }
    }
    // A conversation with tool calls but no `tools` (an agent's last turn, asking for text) is
    // refused by Bedrock without a toolConfig: the tools it called are declared, input-less.
    if req.tools.as_ref().is_none_or(Vec::is_empty) {
        for name in called {
            if !(json_tool && name == JSON_TOOL) {
                tools.push(json!({"toolSpec": {"name": name,
                    "inputSchema": {"json": {"type": "object", "properties": {}}}}}));
            }
        }
    }
    if !tools.is_empty() {
        let mut config = Map::new();
        config.insert("tools".into(), Value::Array(tools));
        if let Some(tc) = tool_choice {
            config.insert("toolChoice".into(), tc);
        }
        body.insert("toolConfig".into(), Value::Object(config));
    }
    Ok((openai::to_vec(&body), json_tool))
}

/// The Converse blocks of a user message or tool result: text that is not blank (Bedrock
/// refuses blank text), images and documents (named by `names`).
fn user_blocks(
    content: &Content,
    i: usize,
    names: &mut DocumentNames,
) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        Content::Text(t) if openai::is_blank(t) => return Ok(Vec::new()),
        Content::Text(t) => return Ok(vec![json!({"text": t})]),
        Content::Parts(parts) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let before = blocks.len();
        match p {
            Part::Text { text, .. } | Part::Refusal { refusal: text } => {
                if !openai::is_blank(text) {
                    blocks.push(json!({"text": text}));
                }
            }
            Part::ImageUrl { image_url, .. } => {
                let Some((mime, data)) = openai::parse_data_url(&image_url.url) else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].image_url: provider aws-bedrock takes images as base64 data URLs only"
                    )));
                };
                let format = mime.strip_prefix("image/").unwrap_or(&mime);
                blocks.push(json!({"image": {"format": format, "source": {"bytes": data}}}));
            }
            Part::File { file, .. } => {
                let Some((mime, data)) = file.file_data.as_deref().and_then(openai::parse_data_url)
                else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].file: only file_data as a base64 data URL can be expressed for provider aws-bedrock"
                    )));
                };
                let Some(format) = document_format(&mime) else {
                    return Err(bad(format!(
                        "messages[{i}].content[{j}].file: provider aws-bedrock takes pdf, csv, doc, docx, xls, xlsx, html, txt and md documents, not {}",
                        openai::truncate(&mime)
                    )));
                };
                let name = names.name(file.filename.as_deref());
                blocks.push(json!({"document": {"format": format, "name": name, "source": {"bytes": data}}}));
            }
            Part::InputAudio { .. } => {
                return Err(openai::unsupported(
                    &format!("messages[{i}].content[{j}] (input_audio)"),
                    PROVIDER,
                ));
            }
        }
        // Anthropic's `cache_control` on a part is a Converse cache point after its block.
        if p.cache_control().is_some() && blocks.len() > before {
            blocks.push(cache_point());
        }
    }
    Ok(blocks)
}

/// Longest document name sent, before the ` (n)` that keeps it apart from another.
const MAX_DOCUMENT_NAME: usize = 64;

/// The names of a request's documents. Bedrock takes a name of alphanumerics, single spaces,
/// hyphens, parentheses and square brackets ("no more than one [whitespace] in a row"), and
/// refuses a request in which two documents share one ("Messages can't contain duplicate
/// document names"), where OpenAI's `filename` is optional and free: each character it
/// refuses becomes a space, runs of spaces one, a name left empty (or none) `document`, and one
/// that an earlier document of the request has (compared ignoring case) gets ` (2)`, ` (3)`,
/// ... Names are given in the order of the messages, so a conversation sent again with a new
/// turn keeps its documents' names.
#[derive(Debug, Default)]
struct DocumentNames {
    /// The names given so far, lowercase.
    given: std::collections::HashSet<String>,
    /// Of each name (lowercase) given more than once, the last `n` of ` (n)` tried: the next
    /// search starts past it (a request may hold thousands of untitled documents).
    last_suffix: std::collections::HashMap<String, u32>,
}

impl DocumentNames {
    /// The name of the request's next document, sent with `filename`.
    fn name(&mut self, filename: Option<&str>) -> String {
        let mut base = String::new();
        for c in filename.unwrap_or_default().chars() {
            if base.len() >= MAX_DOCUMENT_NAME {
                break;
            }
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '(' | ')' | '[' | ']') {
                base.push(c);
            } else if !base.is_empty() && !base.ends_with(' ') {
                base.push(' ');
            }
        }
        base.truncate(base.trim_end().len());
        if base.is_empty() {
            base.push_str("document");
        }
        let mut name = base.clone();
        if self.given.contains(&name.to_ascii_lowercase()) {
            let n = self
                .last_suffix
                .entry(base.to_ascii_lowercase())
                .or_insert(1);
            loop {
                *n += 1;
                name = format!("{base} ({n})");
                if !self.given.contains(&name.to_ascii_lowercase()) {
                    break;
                }
            }
        }
        self.given.insert(name.to_ascii_lowercase());
        name
    }
}

/// A Converse prompt-caching checkpoint: what comes before it is cached.
fn cache_point() -> Value {
    json!({"cachePoint": {"type": "default"}})
}

/// OpenAI `finish_reason` for a Bedrock `stopReason`; `json_only`: the JSON tool was the only
/// tool called (its input is the answer, the content).
fn finish_reason(stop: &str, json_only: bool) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" if json_only => "stop",
        "tool_use" => "tool_calls",
        "guardrail_intervened" | "content_filtered" => "content_filter",
        _ => "stop",
    }
}

/// Output of the model that is not valid, for a `stopReason` that says so: text or a tool
/// use Bedrock could not read (`malformed_model_output`, `malformed_tool_use`).
fn invalid_output(stop: &str) -> Option<InvalidOutput> {
    matches!(stop, "malformed_model_output" | "malformed_tool_use").then(|| InvalidOutput {
        said_by: "Bedrock stopReason",
        reason: stop.to_owned(),
        detail: None,
    })
}

/// `message.refusal` of an answer Bedrock filtered before any of it was written.
fn filtered(stop: &str) -> String {
    let by = if stop == "guardrail_intervened" {
        "a Bedrock guardrail"
    } else {
        "Bedrock's content filters"
    };
    format!("the response was blocked by {by} (stopReason {stop})")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseResponse {
    output: ConverseOutput,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: BedrockUsage,
}

#[derive(Deserialize)]
struct ConverseOutput {
    message: OutputMessage,
}

#[derive(Deserialize)]
struct OutputMessage {
    #[serde(default)]
    content: Vec<OutputBlock>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutputBlock {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<ToolUse>,
    #[serde(default)]
    reasoning_content: Option<ReasoningContent>,
}

/// A `reasoningContent` block: Claude's thinking, signed, or redacted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReasoningContent {
    #[serde(default)]
    reasoning_text: Option<ReasoningText>,
    #[serde(default)]
    redacted_content: Option<String>,
}

#[derive(Deserialize)]
struct ReasoningText {
    #[serde(default)]
    text: String,
    #[serde(default)]
    signature: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUse {
    tool_use_id: String,
    name: String,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct BedrockUsage {
    /// The input not read from nor written to the prompt cache.
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_write_input_tokens: Option<u64>,
}

impl BedrockUsage {
    /// As OpenAI counts it: the whole prompt, of which the cached part in the details.
    fn usage(&self) -> Usage {
        let prompt = self
            .input_tokens
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_write_input_tokens.unwrap_or(0));
        Usage::new(prompt, self.output_tokens).with_cached(self.cache_read_input_tokens)
    }
}

/// A complete Converse response as a `chat.completion`, or OpenAI's error for output of the
/// model that is not valid.
pub fn response(body: &[u8], ctx: &ResponseCtx) -> Result<Translated, String> {
    let r: ConverseResponse = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected Bedrock response: {}", json_error(&e)))?;
    if let Some(e) = r.stop_reason.as_deref().and_then(invalid_output) {
        return Ok(Translated::InvalidOutput(e));
    }
    let mut text = String::new();
    let mut json_answer: Option<String> = None;
    let mut tool_calls = Vec::new();
    let mut reasoning = String::new();
    let mut thinking_blocks = Vec::new();
    for block in r.output.message.content {
        if let Some(t) = block.text {
            text.push_str(&t);
        }
        if let Some(u) = block.tool_use {
            if ctx.json_tool && u.name == JSON_TOOL {
                json_answer
                    .get_or_insert_with(String::new)
                    .push_str(&u.input.to_string());
            } else {
                tool_calls.push(ToolCallOut::function(u.tool_use_id, u.name, &u.input));
            }
        }
        if let Some(rc) = block.reasoning_content {
            if let Some(t) = rc.reasoning_text {
                reasoning.push_str(&t.text);
                thinking_blocks.push(ThinkingBlock::Thinking {
                    thinking: t.text,
                    signature: t.signature,
                });
            }
            if let Some(data) = rc.redacted_content {
                thinking_blocks.push(ThinkingBlock::RedactedThinking { data });
            }
        }
    }
    // The JSON tool's input is the whole answer (words around it would make it invalid JSON).
    if let Some(json) = json_answer {
        text = json;
    }
    let stop = r.stop_reason.as_deref().unwrap_or("end_turn");
    let finish = finish_reason(stop, ctx.json_tool && tool_calls.is_empty());
    // A filtered answer with nothing written says why, as OpenAI's own refusals do.
    let refusal = (finish == "content_filter" && text.is_empty() && tool_calls.is_empty())
        .then(|| filtered(stop));
    let c = Completion {
        id: ctx.id.clone(),
        model: ctx.model.clone(),
        text: (refusal.is_none() && (!text.is_empty() || tool_calls.is_empty())).then_some(text),
        refusal,
        tool_calls,
        finish_reason: finish,
        usage: r.usage.usage(),
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        thinking_blocks,
    };
    Ok(Translated::Answer(c.to_json(ctx.created)))
}

/// A Bedrock error (`{"message"}` plus `x-amzn-errortype`) in the OpenAI error shape.
pub fn error(status: u16, error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let message = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.get("message")
            .or_else(|| v.get("Message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    match message {
        Some(m) => {
            let kind = error_type
                .map(|t| t.split(':').next().unwrap_or(t))
                .filter(|t| !t.is_empty());
            openai::error_json(&m, openai::error_type_for(status), kind)
        }
        None => super::opaque_error(status, body),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Tool(u32),
    Json,
}

/// ConverseStream event stream → `chat.completion.chunk` SSE, message by message.
pub struct Stream {
    decoder: Decoder,
    w: ChunkWriter,
    json_tool: bool,
    blocks: Vec<(u64, BlockKind)>,
    /// The reasoning block being streamed (index, text, signature): sent whole as a
    /// `thinking_blocks` delta when it stops (bounded by the thinking budget).
    thinking: Option<(u64, String, Option<String>)>,
    /// With the JSON tool, text held back until the answer shows whether the tool was called
    /// (then the tool input alone is the content: with thinking on the tool is not forced, and
    /// the model may write words before calling it).
    held_text: String,
    /// Whether the JSON tool was called.
    json_called: bool,
    next_tool: u32,
    usage: Usage,
    /// Whether the stream's metadata reported usage yet.
    usage_seen: bool,
    /// The model's output was not valid (its `messageStop` said so): the stream ends with
    /// OpenAI's error once its usage came (see [`InvalidOutput`]).
    invalid: Option<InvalidOutput>,
    done: bool,
}

impl Stream {
    /// A translator for one stream.
    pub fn new(ctx: &ResponseCtx) -> Self {
        Self {
            decoder: Decoder::new(),
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
            usage: Usage::default(),
            usage_seen: false,
            invalid: None,
            done: false,
        }
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

    /// A `reasoningContent` delta: thinking text, its signature, or redacted thinking.
    fn on_reasoning(&mut self, index: u64, rc: &Value, out: &mut BytesMut) {
        if let Some(data) = rc.get("redactedContent").and_then(Value::as_str) {
            self.w.thinking_block(
                out,
                &ThinkingBlock::RedactedThinking {
                    data: data.to_owned(),
                },
            );
            return;
        }
        let (_, text, signature) = self
            .thinking
            .get_or_insert_with(|| (index, String::new(), None));
        if let Some(t) = rc.get("text").and_then(Value::as_str) {
            text.push_str(t);
            self.w.reasoning(out, t);
        }
        if let Some(sig) = rc.get("signature").and_then(Value::as_str) {
            signature.get_or_insert_with(String::new).push_str(sig);
        }
    }

    fn on_message(&mut self, m: &super::eventstream::Message, out: &mut BytesMut) {
        let Ok(payload) = serde_json::from_slice::<Value>(&m.payload) else {
            return;
        };
        match m.header_str(":message-type") {
            Some("event") => {}
            Some("exception") | Some("error") => {
                let kind = m
                    .header_str(":exception-type")
                    .or_else(|| m.header_str(":error-code"))
                    .unwrap_or("api_error");
                let message = payload
                    .get("message")
                    .and_then(Value::as_str)
                    .or_else(|| m.header_str(":error-message"))
                    .unwrap_or("Bedrock stream error");
                self.w.error(out, message, kind);
                self.done = true;
                return;
            }
            _ => return,
        }
        let index = payload
            .get("contentBlockIndex")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match m.header_str(":event-type") {
            Some("messageStart") => self.w.role(out),
            Some("contentBlockStart") => {
                let Some(tu) = payload.pointer("/start/toolUse") else {
                    return;
                };
                let name = tu.get("name").and_then(Value::as_str).unwrap_or_default();
                let id = tu
                    .get("toolUseId")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if self.json_tool && name == JSON_TOOL {
                    self.held_text.clear();
                    self.json_called = true;
                    self.blocks.push((index, BlockKind::Json));
                } else if self.blocks.len() < 1024 {
                    let k = self.next_tool;
                    self.next_tool += 1;
                    self.blocks.push((index, BlockKind::Tool(k)));
                    self.w.tool_start(out, k, id, name, "");
                }
            }
            Some("contentBlockDelta") => {
                let Some(delta) = payload.get("delta") else {
                    return;
                };
                if let Some(t) = delta.get("text").and_then(Value::as_str) {
                    if !self.json_tool {
                        self.w.content(out, t);
                    } else if !self.json_called {
                        self.held_text.push_str(t);
                    }
                } else if let Some(rc) = delta.get("reasoningContent") {
                    self.on_reasoning(index, rc, out);
                } else if let Some(input) = delta.pointer("/toolUse/input").and_then(Value::as_str)
                {
                    match self.block(index) {
                        Some(BlockKind::Tool(k)) => self.w.tool_arguments(out, k, input),
                        Some(BlockKind::Json) => self.w.content(out, input),
                        None => {}
                    }
                }
            }
            Some("contentBlockStop") => {
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
            Some("messageStop") => {
                let stop = payload
                    .get("stopReason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                // No finish: the metadata event that follows carries the usage, which is
                // counted from the provider's stream before the client reads the error.
                if let Some(e) = invalid_output(stop) {
                    self.invalid = Some(e);
                    return;
                }
                self.flush_held_text(out);
                let finish = finish_reason(stop, self.json_tool && self.next_tool == 0);
                if finish == "content_filter" && !self.w.wrote_content() && self.next_tool == 0 {
                    self.w.refusal(out, &filtered(stop));
                }
                self.w.finish(out, finish);
            }
            Some("metadata") => {
                if let Some(u) = payload
                    .get("usage")
                    .and_then(|u| BedrockUsage::deserialize(u).ok())
                {
                    self.usage = u.usage();
                    self.usage_seen = true;
                }
                if let Some(e) = self.invalid.take() {
                    self.w.invalid_output(out, &e);
                    self.done = true;
                } else if self.w.is_finished() {
                    self.w.done(out, self.usage);
                    self.done = true;
                }
            }
            _ => {}
        }
    }
}

impl StreamTranslator for Stream {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        if self.done {
            return;
        }
        self.decoder.push(chunk);
        while let Some(next) = self.decoder.next_message() {
            match next {
                Ok(m) => self.on_message(&m, out),
                Err(e) => {
                    self.w.error(out, &e.to_string(), "api_error");
                    self.done = true;
                }
            }
            if self.done {
                return;
            }
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage_seen.then_some(self.usage)
    }

    fn hold_in(&mut self, held: crate::buffers::Held) {
        self.decoder.hold_in(held);
    }

    fn refused(&self) -> Option<crate::buffers::BudgetExhausted> {
        self.decoder.refused()
    }

    fn ended_whole(&self) -> bool {
        self.w.sent_done()
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(e) = self.invalid.take() {
            self.w.invalid_output(out, &e);
        } else if self.w.is_finished() {
            self.w.done(out, self.usage);
        } else {
            self.w.error(
                out,
                "the Bedrock stream ended before messageStop",
                "api_error",
            );
        }
    }
}

/// Which InvokeModel body an embedding model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedModel {
    Titan,
    Cohere,
}

/// The embedding family of a model id.
pub fn embed_model(id: &str) -> Result<EmbedModel, GatewayError> {
    let base = id.rsplit('/').next().unwrap_or(id);
    let base = base.split_once('.').map_or(
        base,
        |(prefix, rest)| {
            if prefix.len() == 2 { rest } else { base }
        },
    );
    if base.starts_with("amazon.titan-embed") {
        Ok(EmbedModel::Titan)
    } else if base.starts_with("cohere.embed") {
        Ok(EmbedModel::Cohere)
    } else {
        Err(bad(format!(
            "aws-bedrock embeddings are available for amazon.titan-embed-* and cohere.embed-* models, not {:?}",
            openai::truncate(id)
        )))
    }
}

/// The InvokeModel body for an embeddings request.
pub fn embed_request(req: &EmbeddingsRequest, family: EmbedModel) -> Result<Vec<u8>, GatewayError> {
    let texts = req.texts(PROVIDER)?;
    let mut body = req.rest.clone();
    match family {
        EmbedModel::Titan => {
            // A list is sent one text per request (`EmbeddingsRequest::take_texts`).
            let [text] = texts.as_slice() else {
                return Err(bad(
                    "amazon.titan-embed models take one input per request; send input as a single string",
                ));
            };
            body.insert("inputText".into(), Value::from(*text));
            if let Some(d) = req.dimensions {
                body.insert("dimensions".into(), Value::from(d));
            }
        }
        EmbedModel::Cohere => {
            if req.dimensions.is_some() {
                return Err(openai::unsupported("dimensions", PROVIDER));
            }
            body.insert("texts".into(), Value::from(texts));
            body.entry("input_type")
                .or_insert_with(|| Value::from("search_document"));
        }
    }
    Ok(openai::to_vec(&body))
}

/// The InvokeModel embeddings response as an OpenAI embedding list.
pub fn embed_response(body: &[u8], ctx: &ResponseCtx) -> Result<Vec<u8>, String> {
    let (vectors, tokens) = embed_vectors(body)?;
    Ok(openai::embeddings_json(
        &ctx.model, &vectors, ctx.base64, tokens,
    ))
}

/// The vectors and input tokens of an InvokeModel embeddings response (Cohere reports none).
pub fn embed_vectors(body: &[u8]) -> Result<(Vec<Vec<f32>>, u64), String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected Bedrock response: {}", json_error(&e)))?;
    if let Some(e) = v.get("embedding") {
        let vector = openai::floats(e).ok_or("Titan embedding is not a number array")?;
        let tokens = v
            .get("inputTextTokenCount")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        return Ok((vec![vector], tokens));
    }
    let list = v
        .get("embeddings")
        .and_then(|e| e.get("float").or(Some(e)))
        .and_then(Value::as_array)
        .ok_or("Bedrock embeddings response without embeddings")?;
    let vectors = list
        .iter()
        .map(openai::floats)
        .collect::<Option<Vec<_>>>()
        .ok_or("Cohere embedding is not a number array")?;
    Ok((vectors, 0))
}

/// Bedrock's document format (its `DocumentFormat`) of a MIME type.
fn document_format(mime: &str) -> Option<&'static str> {
    Some(match mime.trim().to_ascii_lowercase().as_str() {
        "application/pdf" => "pdf",
        "text/csv" => "csv",
        "application/msword" => "doc",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => "docx",
        "application/vnd.ms-excel" => "xls",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" => "xlsx",
        "text/html" => "html",
        "text/plain" => "txt",
        "text/markdown" => "md",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::eventstream::encode;
    use crate::compat::tests::{
        answer, ctx, cut, deltas, golden, golden_json, run_stream_bytes, thinking_of,
    };
    use proptest::prelude::*;

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        encode(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.as_bytes(),
        )
    }

    fn stream_bytes() -> Vec<u8> {
        [
            event("messageStart", r#"{"role":"assistant"}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Let me check."}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":0}"#),
            event("contentBlockStart", r#"{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"tooluse_1","name":"get_weather"}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"city\":"}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"\"Oslo\"}"}}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":1}"#),
            event("messageStop", r#"{"stopReason":"tool_use"}"#),
            event("metadata", r#"{"usage":{"inputTokens":11,"outputTokens":9,"totalTokens":20},"metrics":{"latencyMs":100}}"#),
        ]
        .concat()
    }

    #[test]
    fn cache_control_marks_are_cache_points_after_their_blocks() {
        let mark = json!({"type": "ephemeral"});
        let body = json!({"model": "aws-bedrock/m",
            "messages": [
                {"role": "system", "content": [
                    {"type": "text", "text": "long rules", "cache_control": mark},
                    {"type": "text", "text": "today"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "a long document", "cache_control": mark},
                    {"type": "text", "text": "question"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "a long answer", "cache_control": mark},
                    {"type": "text", "text": "calling"}],
                    "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [
                    {"type": "text", "text": "result", "cache_control": mark}]}],
            "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": mark}]});
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parse");
        let (body, _) = request(req).expect("translate");
        let v: Value = serde_json::from_slice(&body).expect("json");
        let point = json!({"cachePoint": {"type": "default"}});
        assert_eq!(
            v["system"],
            json!([{"text": "long rules"}, point, {"text": "today"}])
        );
        assert_eq!(
            v["messages"][0]["content"],
            json!([{"text": "a long document"}, point, {"text": "question"}])
        );
        // An assistant turn's parts stay blocks, the marked one followed by its point.
        assert_eq!(
            v["messages"][1]["content"],
            json!([{"text": "a long answer"}, point, {"text": "calling"},
                {"toolUse": {"toolUseId": "c1", "name": "f", "input": {}}}])
        );
        // A tool result holds no cache point: it follows the result.
        assert_eq!(
            v["messages"][2]["content"],
            json!([{"toolResult": {"toolUseId": "c1", "content": [{"text": "result"}]}}, point])
        );
        assert_eq!(v["toolConfig"]["tools"][1], point);
    }

    #[test]
    fn event_stream_translates_to_chunks() {
        let out = run_stream_bytes(&mut Stream::new(&ctx(true, false)), &[&stream_bytes()]);
        golden("bedrock_stream_tool.sse", &out);
        assert!(out.contains(r#""function":{"name":"get_weather","arguments":""}"#));
        assert!(out.contains(r#""arguments":"\"Oslo\"}""#));
        assert!(out.contains(r#""finish_reason":"tool_calls""#));
        assert!(out.contains(r#""prompt_tokens":11,"completion_tokens":9"#));
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn claudes_reasoning_is_reasoning_content_and_signed_thinking_blocks_streamed_or_not() {
        let bytes = [
            event("messageStart", r#"{"role":"assistant"}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"Oslo is "}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"cold."}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"signature":"sig=="}}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":0}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"reasoningContent":{"redactedContent":"cmVk"}}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":1}"#),
            event("contentBlockStart", r#"{"contentBlockIndex":2,"start":{"toolUse":{"toolUseId":"tooluse_1","name":"get_weather"}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":2,"delta":{"toolUse":{"input":"{}"}}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":2}"#),
            event("messageStop", r#"{"stopReason":"tool_use"}"#),
            event("metadata", r#"{"usage":{"inputTokens":1,"outputTokens":2}}"#),
        ]
        .concat();
        let out = run_stream_bytes(&mut Stream::new(&ctx(false, false)), &[&bytes]);
        let deltas = deltas(&out);
        let (reasoning, blocks) = thinking_of(&deltas);
        assert_eq!(reasoning, "Oslo is cold.", "{out}");
        // Each with its place: clients merge list deltas by `index`.
        let want = json!([{"index": 0, "type": "thinking", "thinking": "Oslo is cold.", "signature": "sig=="},
                          {"index": 1, "type": "redacted_thinking", "data": "cmVk"}]);
        assert_eq!(json!(blocks), want, "{out}");

        let plain = br#"{"output":{"message":{"role":"assistant","content":[
            {"reasoningContent":{"reasoningText":{"text":"Oslo is cold.","signature":"sig=="}}},
            {"reasoningContent":{"redactedContent":"cmVk"}},
            {"toolUse":{"toolUseId":"tooluse_1","name":"get_weather","input":{}}}]}},
            "stopReason":"tool_use","usage":{"inputTokens":1,"outputTokens":2}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(plain, &ctx(false, false)))).expect("json");
        assert_eq!(
            v["choices"][0]["message"]["reasoning_content"],
            "Oslo is cold."
        );
        let whole = json!([{"type": "thinking", "thinking": "Oslo is cold.", "signature": "sig=="},
                           {"type": "redacted_thinking", "data": "cmVk"}]);
        assert_eq!(v["choices"][0]["message"]["thinking_blocks"], whole);
    }

    #[test]
    fn with_the_json_tool_unforced_words_before_it_are_not_content() {
        // With thinking on, the JSON tool is offered, not forced: the model may write words
        // first. The tool input alone is the content; without a tool call, the words are.
        let called = [
            event("messageStart", r#"{"role":"assistant"}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Here it is:"}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":0}"#),
            event("contentBlockStart", r#"{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"t1","name":"json_response"}}}"#),
            event("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"a\":1}"}}}"#),
            event("contentBlockStop", r#"{"contentBlockIndex":1}"#),
            event("messageStop", r#"{"stopReason":"tool_use"}"#),
            event("metadata", r#"{"usage":{"inputTokens":1,"outputTokens":2}}"#),
        ]
        .concat();
        let content = |bytes: &[u8]| -> String {
            deltas(&run_stream_bytes(
                &mut Stream::new(&ctx(false, true)),
                &[bytes],
            ))
            .iter()
            .filter_map(|d| d["content"].as_str().map(str::to_owned))
            .collect()
        };
        assert_eq!(content(&called), r#"{"a":1}"#);
        let words = [
            event("messageStart", r#"{"role":"assistant"}"#),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"No JSON today"}}"#,
            ),
            event("messageStop", r#"{"stopReason":"end_turn"}"#),
            event(
                "metadata",
                r#"{"usage":{"inputTokens":1,"outputTokens":2}}"#,
            ),
        ]
        .concat();
        assert_eq!(content(&words), "No JSON today");
    }

    #[test]
    fn thinking_blocks_sent_back_open_the_turn_as_reasoning_content_blocks() {
        let req = ChatRequest::parse(
            br#"{"model":"aws-bedrock/m","additionalModelRequestFields":{"thinking":{"type":"enabled","budget_tokens":1024}},
            "messages":[{"role":"user","content":"weather in Oslo?"},
              {"role":"assistant","content":null,
               "thinking_blocks":[{"type":"thinking","thinking":"Oslo is cold.","signature":"sig=="},{"type":"redacted_thinking","data":"cmVk"}],
               "tool_calls":[{"id":"t1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},
              {"role":"tool","tool_call_id":"t1","content":"cold"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]}"#,
        )
        .expect("parse");
        let (body, _) = request(req).expect("translate");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v["messages"][1]["content"],
            json!([{"reasoningContent": {"reasoningText": {"text": "Oslo is cold.", "signature": "sig=="}}},
                   {"reasoningContent": {"redactedContent": "cmVk"}},
                   {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {}}}])
        );
        let req = ChatRequest::parse(
            br#"{"model":"aws-bedrock/m","additionalModelRequestFields":{"thinking":{"type":"enabled","budget_tokens":1024}},
            "messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
        )
        .expect("parse");
        let (body, json_tool) = request(req).expect("translate");
        assert!(json_tool);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert!(v["toolConfig"].get("toolChoice").is_none(), "{v}");
        assert_eq!(v["toolConfig"]["tools"][0]["toolSpec"]["name"], JSON_TOOL);
        assert!(
            v["system"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains(JSON_TOOL)),
            "{v}"
        );
    }

    #[test]
    fn an_exception_message_becomes_an_error_event() {
        let bytes = [
            event("messageStart", r#"{"role":"assistant"}"#),
            encode(
                &[
                    (":message-type", "exception"),
                    (":exception-type", "throttlingException"),
                ],
                br#"{"message":"Too many requests"}"#,
            ),
        ]
        .concat();
        let out = run_stream_bytes(&mut Stream::new(&ctx(false, false)), &[&bytes]);
        assert!(
            out.contains(r#""message":"Too many requests","type":"throttlingException""#),
            "{out}"
        );
    }

    #[test]
    fn request_maps_system_inference_config_and_tools() {
        let req = ChatRequest::parse(
            br#"{"model":"aws-bedrock/us-east-1/anthropic.claude-3-haiku-20240307-v1:0","max_tokens":64,"temperature":0.1,"stop":["X"],
            "additionalModelRequestFields":{"top_k":5},
            "messages":[{"role":"system","content":"sys"},{"role":"user","content":"weather in Oslo?"},
              {"role":"assistant","content":"checking","tool_calls":[{"id":"t1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},
              {"role":"tool","tool_call_id":"t1","content":"cold"}],
            "tools":[{"type":"function","function":{"name":"get_weather","description":"w","parameters":{"type":"object"}}}],
            "tool_choice":"required"}"#,
        )
        .expect("parse");
        let (body, json_tool) = request(req).expect("translate");
        assert!(!json_tool);
        golden_json("bedrock_request.json", &body);
    }

    #[test]
    fn cache_reads_and_writes_are_part_of_the_prompt() {
        let resp = br#"{"output":{"message":{"role":"assistant","content":[{"text":"hi"}]}},"stopReason":"end_turn",
            "usage":{"inputTokens":4,"outputTokens":200,"totalTokens":2268,"cacheReadInputTokens":2064,"cacheWriteInputTokens":0}}"#;
        let out: Value =
            serde_json::from_slice(&answer(response(resp, &ctx(false, false)))).expect("json");
        assert_eq!(out["usage"]["prompt_tokens"], 2068);
        assert_eq!(out["usage"]["total_tokens"], 2268);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 2064);
    }

    #[test]
    fn documents_take_bedrocks_formats_and_temperature_its_range() {
        let doc = |mime: &str| {
            ChatRequest::parse(
                format!(
                    r#"{{"model":"aws-bedrock/us-east-1/m","temperature":2,"messages":[{{"role":"user","content":[
                    {{"type":"file","file":{{"filename":"notes","file_data":"data:{mime};base64,aGk="}}}}]}}]}}"#
                )
                .as_bytes(),
            )
            .expect("parse")
        };
        let (body, _) = request(doc("text/plain")).expect("txt");
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            body["messages"][0]["content"][0]["document"]["format"],
            "txt"
        );
        assert_eq!(body["inferenceConfig"]["temperature"], 1.0);
        let (body, _) = request(doc(
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ))
        .expect("docx");
        assert!(String::from_utf8_lossy(&body).contains(r#""format":"docx""#));
        let err = request(doc("image/svg+xml")).expect_err("not a document format");
        assert!(err.to_string().contains("image/svg+xml"), "{err}");
    }

    #[test]
    fn signing_adds_a_sigv4_authorization_and_session_token() {
        let creds = AwsCredentials::parse(
            r#"{"accessKeyId":"AKIDEXAMPLE","secretAccessKey":"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY","sessionToken":"tok"}"#,
        )
        .expect("creds");
        let mut req = http::Request::builder()
            .method("POST")
            .uri("https://bedrock-runtime.us-east-1.amazonaws.com/model/a%3A0/converse")
            .header("host", "bedrock-runtime.us-east-1.amazonaws.com")
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        creds.sign(&mut req, b"{}", "us-east-1", t).expect("signed");
        let auth = req.headers()["authorization"].to_str().expect("ascii");
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="), "{auth}");
        assert_eq!(req.headers()["x-amz-date"], "20231114T221320Z");
        assert!(req.headers()["authorization"].is_sensitive());
        assert!(!format!("{creds:?}").contains("EXAMPLEKEY"));
    }

    #[test]
    fn credentials_no_request_can_be_signed_with_are_refused_naming_the_field_not_the_value() {
        let file = |field: &str, value: &str| {
            let mut f = json!({"accessKeyId": "AKIDEXAMPLE", "secretAccessKey": "secret/key+x",
                "sessionToken": "FwoGZXIvYXdzEXAMPLE", "region": "eu-west-3"});
            f[field] = json!(value);
            AwsCredentials::parse(&f.to_string())
        };
        assert!(file("region", "us-gov-west-1").is_ok());
        let blank_region = file("region", " ").expect("blank is no region");
        assert_eq!(blank_region.region, None);
        for (field, value, says) in [
            (
                "accessKeyId",
                "AKIDEXAMPLE\n",
                "accessKeyId has a line break",
            ),
            ("accessKeyId", "", "accessKeyId is empty"),
            (
                "secretAccessKey",
                "secret/key+x\r\n",
                "secretAccessKey has a line break",
            ),
            (
                "sessionToken",
                "FwoG\u{7f}",
                "sessionToken has a line break",
            ),
            ("region", "us-east-1\n", "region has a line break"),
            (
                "region",
                "US-EAST-1",
                "region is not an AWS region name in lower case",
            ),
            (
                "region",
                "us east 1",
                "region is not an AWS region name in lower case",
            ),
        ] {
            let err = file(field, value).map(|_| ()).expect_err(field);
            assert!(err.starts_with(says), "{field} {value:?}: {err}");
            assert!(
                !err.contains("AKIDEXAMPLE") && !err.contains("secret/key"),
                "{err}"
            );
        }
        let err = AwsCredentials::parse("AKIDEXAMPLE:secret")
            .map(|_| ())
            .expect_err("not JSON");
        assert!(
            err.contains("accessKeyId") && !err.contains("secret\""),
            "{err}"
        );
    }

    #[test]
    fn a_region_or_host_a_header_cannot_carry_is_an_error_not_a_panic() {
        let creds = AwsCredentials::parse(r#"{"accessKeyId":"AKIDEXAMPLE","secretAccessKey":"s"}"#)
            .expect("creds");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let request = |uri: &str| {
            http::Request::builder()
                .method("POST")
                .uri(uri)
                .body(())
                .expect("request")
        };
        let mut req = request("https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse");
        let err = creds
            .sign(&mut req, b"{}", "us-east-1\n", t)
            .expect_err("region");
        assert_eq!(err.code(), 2104, "{err}");
        assert!(!req.headers().contains_key("authorization"));
        let mut req = request("/model/m/converse");
        let err = creds
            .sign(&mut req, b"{}", "us-east-1", t)
            .expect_err("host");
        assert_eq!(err.code(), 2104, "{err}");
    }

    /// The Converse body for a chat completion request body.
    fn translated(body: Value) -> Result<Value, GatewayError> {
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parse");
        let (body, _) = request(req)?;
        Ok(serde_json::from_slice(&body).expect("json"))
    }

    #[test]
    fn blank_text_is_left_out_and_an_empty_tool_result_is_an_empty_json_object() {
        // Bedrock: "The text field in the ContentBlock object at messages.1.content.0 is blank".
        let v = translated(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": " \n"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "\n\n", "tool_calls": [
                {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "tooluse_1", "content": ""},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "thanks"}]}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}))
        .expect("translate");
        assert_eq!(v["system"], json!([{"text": "be brief"}]));
        assert_eq!(
            v["messages"],
            json!([
                {"role": "user", "content": [{"text": "weather?"}]},
                {"role": "assistant", "content": [
                    {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {}}}]},
                {"role": "user", "content": [
                    {"toolResult": {"toolUseId": "tooluse_1", "content": [{"json": {}}]}},
                    {"text": "thanks"}]}]),
            "{v}"
        );
    }

    #[test]
    fn tool_result_images_are_sent_and_system_images_refused() {
        let v = translated(json!({"model": "m", "messages": [
            {"role": "user", "content": "look"},
            {"role": "assistant", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": [
                {"type": "text", "text": "the screen:"},
                {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/"}}]}],
            "tools": [{"type": "function", "function": {"name": "shot"}}]}))
        .expect("translate");
        assert_eq!(
            v["messages"][1]["content"][0]["toolUse"]["input"],
            json!({"_raw": "{"})
        );
        assert_eq!(
            v["messages"][2]["content"][0]["toolResult"]["content"],
            json!([{"text": "the screen:"},
                   {"image": {"format": "jpeg", "source": {"bytes": "/9j/"}}}])
        );
        let err = translated(json!({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
            {"role": "user", "content": "hi"}]}))
        .expect_err("refused");
        assert_eq!(err.code(), 2107);
        assert!(err.to_string().contains("messages[0].content[1]"), "{err}");
    }

    #[test]
    fn strict_is_not_passed_on_to_models_that_may_refuse_it() {
        let v = translated(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "s", "strict": true}},
                      {"type": "function", "function": {"name": "l"}}]}),
        )
        .expect("translate");
        for t in 0..2 {
            assert!(
                v["toolConfig"]["tools"][t]["toolSpec"]
                    .get("strict")
                    .is_none()
            );
        }
        let v = translated(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true}}}))
        .expect("translate");
        assert_eq!(v["toolConfig"]["tools"][0]["toolSpec"]["name"], JSON_TOOL);
        assert!(
            v["toolConfig"]["tools"][0]["toolSpec"]
                .get("strict")
                .is_none()
        );
    }

    #[test]
    fn regions_and_model_ids_split_and_encode() {
        assert_eq!(
            split_region("us-west-2/anthropic.claude-v2:1"),
            (Some("us-west-2"), "anthropic.claude-v2:1")
        );
        assert_eq!(
            split_region("anthropic.claude-v2:1"),
            (None, "anthropic.claude-v2:1")
        );
        assert!(is_region("us-gov-west-1"));
        assert!(is_region("eusc-de-east-1"));
        assert_eq!(
            split_region("eusc-de-east-1/anthropic.claude-v2"),
            (Some("eusc-de-east-1"), "anthropic.claude-v2")
        );
        assert_eq!(
            split_region("amazon.titan-embed-text-v2:0"),
            (None, "amazon.titan-embed-text-v2:0")
        );
        assert!(!is_region("arn:aws:bedrock"));
        assert_eq!(encode_model_id("a.b-c:0"), "a.b-c%3A0");
        assert_eq!(
            embed_model("us.cohere.embed-v4:0").ok(),
            Some(EmbedModel::Cohere)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

        #[test]
        fn any_chunking_gives_the_same_output(cuts in proptest::collection::vec(0usize..1500, 0..20)) {
            let bytes = stream_bytes();
            let whole = run_stream_bytes(&mut Stream::new(&ctx(true, false)), &[&bytes]);
            let pieces = cut(&bytes, cuts);
            prop_assert_eq!(run_stream_bytes(&mut Stream::new(&ctx(true, false)), &pieces), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       cuts in proptest::collection::vec(0usize..2048, 0..10)) {
            let _ = run_stream_bytes(&mut Stream::new(&ctx(true, true)), &cut(&data, cuts));
        }

        #[test]
        fn valid_frames_with_arbitrary_payloads_never_panic(
            frames in proptest::collection::vec((0usize..7, proptest::collection::vec(any::<u8>(), 0..80)), 0..12)) {
            const KINDS: [&str; 7] = ["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata", "other"];
            let bytes: Vec<u8> = frames.iter().flat_map(|(k, p)| encode(&[(":event-type", KINDS[*k]), (":message-type", "event")], p)).collect();
            let _ = run_stream_bytes(&mut Stream::new(&ctx(true, true)), &[&bytes]);
        }
    }

    /// The Converse body for a chat completion request body.
    fn converse_of(body: Value) -> Result<(Value, bool), GatewayError> {
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parse");
        let (body, json_tool) = request(req)?;
        Ok((serde_json::from_slice(&body).expect("json"), json_tool))
    }

    fn names_sent(body: &Value) -> Vec<String> {
        body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .flat_map(|m| m["content"].as_array().expect("content"))
            // A tool result's documents too.
            .flat_map(|b| match b.pointer("/toolResult/content") {
                Some(Value::Array(inner)) => inner.iter().collect(),
                _ => vec![b],
            })
            .filter_map(|b| b.pointer("/document/name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn document_names_are_made_fit_for_bedrock_and_kept_apart_in_the_order_sent() {
        let mut names = DocumentNames::default();
        let given: Vec<String> = [
            None,
            None,
            Some("Q3 results – summary (final).pdf"),
            Some("  ...  "),
            Some("Document"),
            Some("document (3)"),
            None,
            Some("a_b\tc"),
        ]
        .into_iter()
        .map(|f| names.name(f))
        .collect();
        assert_eq!(
            given,
            [
                "document",
                "document (2)",
                "Q3 results summary (final) pdf",
                "document (3)",
                "Document (4)",
                "document (3) (2)",
                "document (5)",
                "a b c",
            ]
        );
        // Long names are cut at 64 characters, never on a space.
        let long = names.name(Some(&format!("{} b", "a".repeat(63))));
        assert_eq!(long, "a".repeat(63));
        // Thousands of untitled documents cost one look-up each.
        for _ in 0..5000 {
            names.name(None);
        }
        assert_eq!(names.name(None), "document (5006)");
    }

    #[test]
    fn untitled_documents_of_a_conversation_get_names_of_their_own_that_its_next_turn_keeps() {
        let file =
            json!({"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}});
        let mut messages = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "Read this."}, file]}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "fetch", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": [file]}),
        ];
        let (body, _) = converse_of(json!({"model": "m", "messages": messages})).expect("sent");
        assert_eq!(names_sent(&body), ["document", "document (2)"]);
        messages.push(json!({"role": "assistant", "content": "Both read."}));
        messages.push(
            json!({"role": "user", "content": [file, {"type": "text", "text": "And this?"}]}),
        );
        let (body, _) = converse_of(json!({"model": "m", "messages": messages})).expect("sent");
        assert_eq!(
            names_sent(&body),
            ["document", "document (2)", "document (3)"]
        );
    }

    #[test]
    fn tools_with_a_json_schema_answer_offer_the_json_tool_beside_them_unforced() {
        let weather = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let format = json!({"type": "json_schema", "json_schema": {"name": "v",
            "schema": {"type": "object", "properties": {"verdict": {"type": "string"}}}}});
        let ask = |extra: Value| {
            let mut body = json!({"model": "m", "tools": weather, "response_format": format,
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Oslo?"}]});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            converse_of(body)
        };
        let (body, json_tool) = ask(json!({})).expect("served");
        assert!(json_tool);
        let tools: Vec<&str> = body["toolConfig"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t.pointer("/toolSpec/name").and_then(Value::as_str))
            .collect();
        assert_eq!(tools, ["get_weather", JSON_TOOL]);
        assert!(body["toolConfig"].get("toolChoice").is_none(), "{body}");
        assert_eq!(
            body["system"],
            json!([{"text": "be brief"}, {"text": JSON_TOOL_INSTRUCTION}])
        );
        assert_eq!(
            body["toolConfig"]["tools"][1]["toolSpec"]["inputSchema"]["json"],
            format["json_schema"]["schema"]
        );
        // tool_choice none: the JSON tool forced, the others still declared.
        let (body, json_tool) = ask(json!({"tool_choice": "none"})).expect("served");
        assert!(json_tool);
        assert_eq!(
            body["toolConfig"]["toolChoice"],
            json!({"tool": {"name": JSON_TOOL}})
        );
        assert_eq!(body["system"], json!([{"text": "be brief"}]));
        // A call forced: the answer is that call, the format shapes nothing.
        let (body, json_tool) = ask(json!({"tool_choice": "required"})).expect("served");
        assert!(!json_tool);
        assert_eq!(body["toolConfig"]["toolChoice"], json!({"any": {}}));
        assert_eq!(
            body["toolConfig"]["tools"].as_array().map(Vec::len),
            Some(1)
        );
        // Thinking refuses a forced tool: none beside tools cannot be expressed then.
        let err = ask(json!({"tool_choice": "none",
            "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 1024}}}))
        .expect_err("refused");
        assert!(err.to_string().contains("tool_choice none"), "{err}");
    }

    #[test]
    fn with_the_json_tool_offered_a_call_of_another_tool_finishes_as_tool_calls() {
        let called = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Checking."},
            {"toolUse":{"toolUseId":"t1","name":"get_weather","input":{"city":"Oslo"}}}]}},
            "stopReason":"tool_use","usage":{"inputTokens":5,"outputTokens":6}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(called, &ctx(false, true)))).expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["choices"][0]["message"]["content"], "Checking.");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        let answered = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Done."},
            {"toolUse":{"toolUseId":"t2","name":"json_response","input":{"verdict":"cold"}}}]}},
            "stopReason":"tool_use","usage":{"inputTokens":5,"outputTokens":6}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(answered, &ctx(false, true)))).expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            r#"{"verdict":"cold"}"#
        );
        assert!(
            v["choices"][0]["message"].get("tool_calls").is_none(),
            "{v}"
        );
        // Streamed.
        let out = run_stream_bytes(&mut Stream::new(&ctx(false, true)), &[stream_bytes()]);
        assert!(out.contains(r#""finish_reason":"tool_calls""#), "{out}");
        let text: String = deltas(&out)
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(text, "Let me check.");
    }

    #[test]
    fn malformed_model_output_is_openais_model_error_not_an_empty_finished_answer() {
        for stop in ["malformed_model_output", "malformed_tool_use"] {
            let body = format!(
                r#"{{"output":{{"message":{{"role":"assistant","content":[]}}}},
                "stopReason":"{stop}","usage":{{"inputTokens":5,"outputTokens":7}}}}"#
            );
            let Ok(Translated::InvalidOutput(e)) = response(body.as_bytes(), &ctx(false, false))
            else {
                panic!("{stop}: not an error")
            };
            let v: Value = serde_json::from_slice(&e.to_json()).expect("json");
            assert_eq!(
                (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
                (Some("model_error"), Some(stop))
            );
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("The model produced invalid content")),
                "{v}"
            );
        }
        // Streamed: the error once the metadata (its usage) came, in place of the finish.
        let stopped = [
            event("messageStart", r#"{"role":"assistant"}"#),
            event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"Let me"}}"#,
            ),
            event("messageStop", r#"{"stopReason":"malformed_tool_use"}"#),
        ]
        .concat();
        let metadata = event(
            "metadata",
            r#"{"usage":{"inputTokens":5,"outputTokens":7,"totalTokens":12}}"#,
        );
        let mut stream = Stream::new(&ctx(true, false));
        let mut out = BytesMut::new();
        stream.push(&stopped, &mut out);
        assert!(!String::from_utf8_lossy(&out).contains("error"), "too soon");
        stream.push(&metadata, &mut out);
        stream.finish(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(out.ends_with("\n\n") && out.contains("Let me"), "{out}");
        let last = out.trim_end().rsplit("\n\n").next().unwrap_or_default();
        let v: Value =
            serde_json::from_str(last.strip_prefix("data: ").unwrap_or_default()).expect("json");
        assert_eq!(v["error"]["code"], "malformed_tool_use", "{out}");
        assert!(
            !out.contains("finish_reason\":\"stop") && !out.contains("[DONE]"),
            "{out}"
        );
        assert!(!stream.ended_whole());
        // A stream that ends before its metadata ends with the error all the same.
        let out = run_stream_bytes(&mut Stream::new(&ctx(false, false)), &[stopped]);
        assert!(out.contains("\"code\":\"malformed_tool_use\""), "{out}");
    }

    #[test]
    fn a_filtered_answer_with_nothing_written_says_why_in_its_refusal() {
        let filtered = br#"{"output":{"message":{"role":"assistant","content":[]}},
            "stopReason":"content_filtered","usage":{"inputTokens":5,"outputTokens":0}}"#;
        let v: Value =
            serde_json::from_slice(&answer(response(filtered, &ctx(false, false)))).expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert!(
            v["choices"][0]["message"]["refusal"]
                .as_str()
                .is_some_and(|r| r.contains("content_filtered")),
            "{v}"
        );
        let out = run_stream_bytes(
            &mut Stream::new(&ctx(false, false)),
            &[[
                event("messageStart", r#"{"role":"assistant"}"#),
                event("messageStop", r#"{"stopReason":"guardrail_intervened"}"#),
                event(
                    "metadata",
                    r#"{"usage":{"inputTokens":1,"outputTokens":0,"totalTokens":1}}"#,
                ),
            ]
            .concat()],
        );
        let refusal: String = deltas(&out)
            .iter()
            .filter_map(|d| d["refusal"].as_str())
            .collect();
        assert!(refusal.contains("guardrail"), "{out}");
    }
}
