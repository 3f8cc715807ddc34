//! OpenAI wire format: Chat Completions (plain and SSE; audio in and out), Audio
//! Transcriptions, Embeddings, Models, errors.
//!
//! Also what OpenAI-compatible providers speak (Groq, Mistral, DeepSeek, Azure OpenAI,
//! OpenRouter, ...), which is why routes match on the path suffix only.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Ctx;
use crate::body::{MockBody, SseBuilder, json_ok, json_response, sse_response, write_json};
use crate::text::{self, Message};

/// Model echoed when a request names none.
const DEFAULT_MODEL: &str = "gpt-4o-mini";
const SYSTEM_FINGERPRINT: &str = "fp_mock";
/// Dimensions of an embedding unless the request asks for `dimensions`.
const EMBEDDING_DIMS: usize = 8;
const MAX_EMBEDDING_DIMS: u64 = 4096;
/// OpenAI's limit of inputs per embeddings request.
const MAX_EMBEDDING_INPUTS: usize = 2048;

// ---------------------------------------------------------------------------
// Requests

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// `["text", "audio"]` asks for a spoken answer.
    #[serde(default)]
    modalities: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(borrow, default)]
    encoding_format: Option<Cow<'a, str>>,
    #[serde(default)]
    dimensions: Option<u64>,
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    /// `null` in a spoken answer, whose text is the audio's transcript.
    content: Option<&'a str>,
    refusal: Option<()>,
    annotations: [(); 0],
    #[serde(skip_serializing_if = "Option::is_none")]
    audio: Option<AudioAnswer<'a>>,
}

/// The `audio` of a spoken answer.
#[derive(Serialize)]
struct AudioAnswer<'a> {
    id: String,
    /// Base64 of the audio (here the transcript's bytes).
    data: String,
    expires_at: u64,
    transcript: &'a str,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptTokensDetails,
    completion_tokens_details: CompletionTokensDetails,
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
    audio_tokens: u64,
    text_tokens: u64,
}

#[derive(Serialize)]
struct CompletionTokensDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
    text_tokens: u64,
}

impl Usage {
    /// Text and audio tokens in and out; the totals hold both, as OpenAI's do.
    fn with_audio(text_in: u64, audio_in: u64, text_out: u64, audio_out: u64) -> Self {
        let prompt_tokens = text_in.saturating_add(audio_in);
        let completion_tokens = text_out.saturating_add(audio_out);
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: 0,
                audio_tokens: audio_in,
                text_tokens: text_in,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
                audio_tokens: audio_out,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
                text_tokens: text_out,
            },
        }
    }
}

/// Audio tokens of an `input_audio` part: one per [`AUDIO_BYTES_PER_TOKEN`] bytes of its
/// base64 data, at least one.
fn input_audio_tokens(messages: &[Message<'_>]) -> u64 {
    messages
        .iter()
        .filter_map(|m| m.content.as_ref()?.as_array())
        .flatten()
        .filter_map(|part| part.get("input_audio")?.get("data")?.as_str())
        .map(|data| audio_tokens(data.len()))
        .sum()
}

/// Audio tokens of `bytes` of audio (or of its base64).
fn audio_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(AUDIO_BYTES_PER_TOKEN).max(1)
}

/// Audio tokens of a spoken answer, per word of its transcript.
const AUDIO_TOKENS_PER_WORD: u64 = 10;
/// Bytes of input audio per audio token.
const AUDIO_BYTES_PER_TOKEN: u64 = 100;

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent unless `stream_options.include_usage`; then `null` except on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<()>>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: EmbeddingVector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingVector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

// ---------------------------------------------------------------------------
// Handlers

/// `POST .../chat/completions`
pub(crate) fn chat_completions(ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    let req: ChatRequest<'_> = match text::parse_object(body) {
        Ok(req) => req,
        Err(err) => return invalid_json(ctx, &err),
    };
    let model = req.model.as_deref().unwrap_or(DEFAULT_MODEL);
    if let Some(status) = text::status_trigger(model) {
        return status_error(ctx, status, model);
    }
    let messages = req.messages.as_deref().unwrap_or_default();
    let reply = text::reply_to(&text::last_user_text(messages));
    let spoken = req
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m == "audio"));
    let audio_out = if spoken {
        text::words(&reply) * AUDIO_TOKENS_PER_WORD
    } else {
        0
    };
    let usage = Usage::with_audio(
        text::messages_words(messages),
        input_audio_tokens(messages),
        text::words(&reply),
        audio_out,
    );
    let id = format!("chatcmpl-mock-{}", ctx.id);
    let created = text::unix_now();

    let mut resp = if req.stream == Some(true) {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let events = chat_stream(&id, created, model, &reply, include_usage.then_some(&usage));
        sse_response(events, ctx.chunk_delay, ctx.stats)
    } else {
        json_ok(&ChatCompletion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: (!spoken).then_some(reply.as_str()),
                    refusal: None,
                    annotations: [],
                    audio: spoken.then(|| {
                        use base64::Engine;
                        AudioAnswer {
                            id: format!("audio_mock_{}", ctx.id),
                            data: base64::engine::general_purpose::STANDARD.encode(&reply),
                            expires_at: created + 3600,
                            transcript: &reply,
                        }
                    }),
                },
                logprobs: None,
                finish_reason: "stop",
            }],
            usage,
            service_tier: "default",
            system_fingerprint: SYSTEM_FINGERPRINT,
        })
    };
    set_api_headers(&mut resp, ctx);
    resp
}

/// `POST .../audio/transcriptions` (`multipart/form-data` with `file` and `model`, optional
/// `prompt` and `response_format`): the transcript `mock transcript of <n> bytes`. The
/// GPT-4o transcription models report tokens (`input_token_details` with the prompt's words as
/// `text_tokens` and one audio token per 100 bytes of the file), others (`whisper-1`) the
/// audio's duration (a second per 32,000 bytes); `response_format: text` answers the bare text.
pub(crate) fn transcriptions(ctx: &Ctx<'_>, content_type: &str, body: &[u8]) -> Response<MockBody> {
    let Some(boundary) = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
    else {
        return invalid_request(
            ctx,
            "Invalid Content-Type header: expected multipart/form-data",
        );
    };
    let form = form_fields(body, boundary.as_bytes());
    let field = |name: &str| {
        form.iter()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|f| f.1)
    };
    let text_field = |name: &str| field(name).and_then(|v| std::str::from_utf8(v).ok());
    let (Some(file), Some(model)) = (field("file"), text_field("model")) else {
        return invalid_request(ctx, "file and model are required");
    };
    if let Some(status) = text::status_trigger(model) {
        return status_error(ctx, status, model);
    }
    let transcript = format!("mock transcript of {} bytes", file.len());
    let mut resp = if text_field("response_format") == Some("text") {
        let mut resp = Response::new(MockBody::full(format!("{transcript}\n")));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    } else if model.starts_with("gpt-4o") {
        let text_in = text_field("prompt").map_or(0, text::words);
        let audio_in = audio_tokens(file.len());
        let out = text::words(&transcript);
        json_ok(&serde_json::json!({
            "text": transcript,
            "usage": {
                "type": "tokens",
                "input_tokens": text_in + audio_in,
                "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in},
                "output_tokens": out,
                "total_tokens": text_in + audio_in + out,
            },
        }))
    } else {
        let seconds = (file.len() as u64).div_ceil(32_000).max(1);
        json_ok(&serde_json::json!({
            "text": transcript,
            "usage": {"type": "duration", "seconds": seconds},
        }))
    };
    set_api_headers(&mut resp, ctx);
    resp
}

/// The fields of a `multipart/form-data` body: each part's `name` and content.
fn form_fields<'a>(body: &'a [u8], boundary: &[u8]) -> Vec<(&'a [u8], &'a [u8])> {
    let mut delimiter = b"--".to_vec();
    delimiter.extend_from_slice(boundary);
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, &delimiter) {
        rest = &rest[start + delimiter.len()..];
        let Some(next) = find(rest, &delimiter) else {
            break;
        };
        let part = &rest[..next];
        let Some(head_end) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = &part[..head_end];
        let content = &part[head_end + 4..];
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        // `name="..."`, not `filename="..."`.
        let Some(at) = find(head, b"; name=\"") else {
            continue;
        };
        let name = &head[at + 8..];
        let Some(end) = name.iter().position(|&c| c == b'"') else {
            continue;
        };
        fields.push((&name[..end], content));
    }
    fields
}

fn invalid_request(ctx: &Ctx<'_>, message: &str) -> Response<MockBody> {
    error_response(
        ctx,
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
        None,
    )
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The SSE events of a streamed chat completion: role chunk, one chunk per word,
/// finish chunk, optional usage chunk, `[DONE]`.
fn chat_stream(
    id: &str,
    created: u64,
    model: &str,
    reply: &str,
    usage: Option<&Usage>,
) -> Vec<Bytes> {
    let pieces = text::stream_pieces(reply);
    let mut sse = SseBuilder::with_capacity(pieces.len() + 4);
    let head = ChunkHead {
        id,
        created,
        model,
        with_usage: usage.is_some(),
    };
    let chunk = ChunkHead::chunk;

    let first = Delta {
        role: Some("assistant"),
        content: Some(""),
        refusal: Some(None),
    };
    sse.event(None, &chunk(&head, &[choice(first, None)], None));
    for piece in pieces {
        let delta = Delta {
            content: Some(piece),
            ..Delta::default()
        };
        sse.event(None, &chunk(&head, &[choice(delta, None)], None));
    }
    sse.event(
        None,
        &chunk(&head, &[choice(Delta::default(), Some("stop"))], None),
    );
    if let Some(usage) = usage {
        sse.event(None, &chunk(&head, &[], Some(usage)));
    }
    sse.raw(b"data: [DONE]\n\n");
    sse.finish()
}

/// What every chunk of one stream shares.
struct ChunkHead<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    with_usage: bool,
}

impl ChunkHead<'_> {
    fn chunk<'b>(&'b self, choices: &'b [ChunkChoice<'b>], usage: Option<&'b Usage>) -> Chunk<'b> {
        Chunk {
            id: self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model,
            service_tier: "default",
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage: self.with_usage.then_some(usage),
        }
    }
}

fn choice<'a>(delta: Delta<'a>, finish_reason: Option<&'static str>) -> ChunkChoice<'a> {
    ChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason,
    }
}

/// Categories of OpenAI's moderation API (omni-moderation).
pub const MODERATION_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// `POST .../moderations`: a category is flagged when the input contains
/// `mock-flag:<category>` (deterministic, so tests choose what gets flagged).
pub(crate) fn moderations(ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(err) => return invalid_json(ctx, &err.to_string()),
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
            .collect(),
        _ => {
            return error_response(
                ctx,
                StatusCode::BAD_REQUEST,
                "'input' must be a string or an array",
                "invalid_request_error",
                Some("input"),
                None,
            );
        }
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let mut categories = serde_json::Map::new();
            let mut scores = serde_json::Map::new();
            let mut flagged = false;
            for c in MODERATION_CATEGORIES {
                let hit = text.contains(&format!("mock-flag:{c}"));
                flagged |= hit;
                categories.insert((*c).into(), Value::Bool(hit));
                scores.insert((*c).into(), serde_json::json!(if hit { 0.98 } else { 0.0001 }));
            }
            serde_json::json!({"flagged": flagged, "categories": categories, "category_scores": scores})
        })
        .collect();
    json_ok(&serde_json::json!({
        "id": format!("modr-mock-{}", ctx.id),
        "model": req.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
        "results": results,
    }))
}

/// `POST .../embeddings`
pub(crate) fn embeddings(ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    let req: EmbeddingsRequest<'_> = match text::parse_object(body) {
        Ok(req) => req,
        Err(err) => return invalid_json(ctx, &err),
    };
    let model = req.model.as_deref().unwrap_or("text-embedding-3-small");
    if let Some(status) = text::status_trigger(model) {
        return status_error(ctx, status, model);
    }
    let inputs: Vec<&Value> = match &req.input {
        // One input given as token ids.
        Some(input @ Value::Array(items))
            if !items.is_empty() && items.iter().all(Value::is_number) =>
        {
            vec![input]
        }
        Some(Value::Array(items)) if (1..=MAX_EMBEDDING_INPUTS).contains(&items.len()) => {
            items.iter().collect()
        }
        Some(input @ Value::String(_)) => vec![input],
        _ => {
            return error_response(
                ctx,
                StatusCode::BAD_REQUEST,
                "'input' must be a string or an array of 1 to 2048 inputs",
                "invalid_request_error",
                Some("input"),
                None,
            );
        }
    };
    let dims = req
        .dimensions
        .filter(|d| (1..=MAX_EMBEDDING_DIMS).contains(d))
        .map_or(EMBEDDING_DIMS, |d| d as usize);
    let base64 = req.encoding_format.as_deref() == Some("base64");

    let mut tokens = 0u64;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = match input {
                Value::String(s) => {
                    tokens += text::words(s);
                    embedding_of(s.as_bytes(), dims)
                }
                other => {
                    tokens += match other {
                        Value::Array(ids) => ids.len() as u64,
                        _ => 1,
                    };
                    let mut repr = Vec::new();
                    write_json(&mut repr, other);
                    embedding_of(&repr, dims)
                }
            };
            Embedding {
                object: "embedding",
                index,
                embedding: if base64 {
                    EmbeddingVector::Base64(base64_f32(&vector))
                } else {
                    EmbeddingVector::Floats(vector)
                },
            }
        })
        .collect();

    let mut resp = json_ok(&EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    });
    set_api_headers(&mut resp, ctx);
    resp
}

/// A deterministic unit vector derived from `input` (FNV-1a seed, splitmix64 stream).
pub(crate) fn embedding_of(input: &[u8], dims: usize) -> Vec<f32> {
    let mut state = input.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut vector: Vec<f32> = (0..dims)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits → [-1, 1)
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut vector {
            *x /= norm;
        }
    }
    vector
}

/// Base64 of the little-endian f32 bytes, as OpenAI sends for `encoding_format: base64`.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET .../models`
pub(crate) fn models(ctx: &Ctx<'_>) -> Response<MockBody> {
    const MODELS: &[u8] = br#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"system"},{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"system"},{"id":"text-embedding-3-small","object":"model","created":1705948997,"owned_by":"system"}]}"#;
    let mut resp = json_response(StatusCode::OK, Bytes::from_static(MODELS));
    set_api_headers(&mut resp, ctx);
    resp
}

// ---------------------------------------------------------------------------
// Errors

/// 401 for a request without its key: OpenAI's words, or Azure's on its deployment paths.
pub(crate) fn unauthorized(ctx: &Ctx<'_>, api: crate::auth::Api) -> Response<MockBody> {
    if api == crate::auth::Api::Azure {
        const DENIED: &[u8] = br#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;
        return json_response(StatusCode::UNAUTHORIZED, Bytes::from_static(DENIED));
    }
    error_response(
        ctx,
        StatusCode::UNAUTHORIZED,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        None,
    )
}

/// 400 for a body that is not valid JSON (or not the expected shape).
fn invalid_json(ctx: &Ctx<'_>, err: &str) -> Response<MockBody> {
    let message = format!("We could not parse the JSON body of your request: {err}");
    error_response(
        ctx,
        StatusCode::BAD_REQUEST,
        &message,
        "invalid_request_error",
        None,
        None,
    )
}

/// The error asked for by a `mock-status-<code>` model.
fn status_error(ctx: &Ctx<'_>, status: StatusCode, model: &str) -> Response<MockBody> {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", "invalid_api_key"),
        403 => ("permission_error", "permission_denied"),
        404 => ("invalid_request_error", "model_not_found"),
        429 => ("requests", "rate_limit_exceeded"),
        500..=599 => ("server_error", "server_error"),
        _ => ("invalid_request_error", "mock_error"),
    };
    let message = format!(
        "mock error: status {} requested by model {model}",
        status.as_u16()
    );
    error_response(ctx, status, &message, kind, None, Some(code))
}

fn error_response(
    ctx: &Ctx<'_>,
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<MockBody> {
    let mut buf = Vec::with_capacity(160 + message.len());
    write_json(
        &mut buf,
        &ErrorBody {
            error: ErrorDetail {
                message,
                kind,
                param,
                code,
            },
        },
    );
    let mut resp = json_response(status, buf);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    set_api_headers(&mut resp, ctx);
    resp
}

/// 404 for a route the mock does not know (OpenAI's shape).
pub(crate) fn unknown_route(ctx: &Ctx<'_>, method: &str, path: &str) -> Response<MockBody> {
    let message = format!("Unknown request URL: {method} {path}.");
    error_response(
        ctx,
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        None,
        Some("unknown_url"),
    )
}

/// The headers OpenAI sends with every API response: request id, organization, version and
/// processing time, and the rate-limit state (OpenAI API reference, "Debugging requests" and
/// "Rate limits"; values fixed here).
fn set_api_headers(resp: &mut Response<MockBody>, ctx: &Ctx<'_>) {
    let h = resp.headers_mut();
    if let Ok(value) = HeaderValue::try_from(ctx.request_id()) {
        h.insert("x-request-id", value);
    }
    for (name, value) in [
        ("openai-organization", "mock-org"),
        ("openai-processing-ms", "12"),
        ("openai-project", "proj_mock"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", "29999990"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-reset-tokens", "0s"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding_of(b"hello", 8);
        assert_eq!(a, embedding_of(b"hello", 8));
        assert_ne!(a, embedding_of(b"world", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        assert!(a.iter().all(|x| (-1.0..=1.0).contains(x)));
    }

    #[test]
    fn base64_matches_reference() {
        // 1.0f32 little-endian = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
        assert_eq!(base64_f32(&[]), "");
    }
}
