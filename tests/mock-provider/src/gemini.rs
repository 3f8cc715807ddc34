//! Google Gemini wire format (AI Studio and Vertex share it): `:generateContent`,
//! `:streamGenerateContent?alt=sse`, `:embedContent`, `:batchEmbedContents`, and Vertex's
//! embeddings `:predict`.
//!
//! Requests need an `x-goog-api-key` or `Authorization` header (403 otherwise, as Google
//! answers unregistered callers). With `tools` and a last turn that is not a function
//! response, the reply is a `functionCall` of the first allowed function; a user text
//! containing `mock-blocked` gets a prompt blocked for SAFETY; `responseMimeType:
//! application/json` gets `{"reply": ...}` as the text. Gemini 3 models (`gemini-3*`) sign
//! their function calls (`thoughtSignature`) and, as Google does, answer 400 to a request whose
//! current turn (since the last user text) has a model step whose first function call comes
//! back without one (the later calls of a parallel set carry none).
//!
//! With `generationConfig.thinkingConfig.includeThoughts` the answer starts with a thought
//! summary part (`"thought": true`), counted in `thoughtsTokenCount`.
//!
//! As Google does, `generateContent` refuses (400 `INVALID_ARGUMENT`, its words) a content
//! without parts, an empty text part (Vertex: a blank one), and an inline image of a MIME
//! type other than PNG, JPEG, WebP, HEIC or HEIF.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use crate::Ctx;
use crate::body::{MockBody, SseBuilder, json_ok, json_response, sse_response, write_json};
use crate::openai::embedding_of;
use crate::text;

/// Which Gemini method a path asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Generate,
    StreamGenerate,
    Embed,
    BatchEmbed,
    Predict,
}

impl Method {
    /// The method of a `.../models/{model}:{method}` path.
    pub(crate) fn of(path: &str) -> Option<Self> {
        let (_, method) = path.rsplit_once(':')?;
        match method {
            "generateContent" => Some(Self::Generate),
            "streamGenerateContent" => Some(Self::StreamGenerate),
            "embedContent" => Some(Self::Embed),
            "batchEmbedContents" => Some(Self::BatchEmbed),
            "predict" => Some(Self::Predict),
            _ => None,
        }
    }
}

fn model_of(path: &str) -> &str {
    let before = path.rsplit_once(':').map_or(path, |(p, _)| p);
    before.rsplit('/').next().unwrap_or(before)
}

/// `POST .../models/{model}:{method}`
pub(crate) fn handle(
    ctx: &Ctx<'_>,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<MockBody> {
    if !headers.contains_key("x-goog-api-key") && !headers.contains_key("authorization") {
        return error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            "PERMISSION_DENIED",
        );
    }
    let model = model_of(path);
    if let Some(status) = text::status_trigger(model) {
        let kind = match status.as_u16() {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "INTERNAL",
        };
        let message = format!(
            "mock error: status {} requested by model {model}",
            status.as_u16()
        );
        return error(status, &message, kind);
    }
    let req: Value = match text::parse_object(body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid JSON payload received. {e}"),
                "INVALID_ARGUMENT",
            );
        }
    };
    match method {
        Method::Generate | Method::StreamGenerate => {
            if let Some(message) = content_refusal(&req, path.contains("/publishers/")) {
                return error(StatusCode::BAD_REQUEST, &message, "INVALID_ARGUMENT");
            }
            generate(ctx, method, model, &req)
        }
        Method::Embed => {
            let text = parts_text(req.pointer("/content/parts"));
            json_ok(&json!({"embedding": {"values": embedding_of(text.as_bytes(), 8)}}))
        }
        Method::BatchEmbed => {
            let list: Vec<Value> = req
                .get("requests")
                .and_then(Value::as_array)
                .map(|rs| {
                    rs.iter()
                        .map(|r| {
                            let text = parts_text(r.pointer("/content/parts"));
                            let dims = r
                                .get("outputDimensionality")
                                .and_then(Value::as_u64)
                                .map_or(8, |d| d.clamp(1, 4096) as usize);
                            json!({"values": embedding_of(text.as_bytes(), dims)})
                        })
                        .collect()
                })
                .unwrap_or_default();
            json_ok(&json!({"embeddings": list}))
        }
        Method::Predict => {
            let instances = req.get("instances").and_then(Value::as_array);
            // As Vertex: gemini-embedding models take one instance per request.
            if model.starts_with("gemini-embedding") && instances.is_some_and(|i| i.len() > 1) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Unable to submit request because gemini-embedding models support only 1 instance per request.",
                    "INVALID_ARGUMENT",
                );
            }
            let list: Vec<Value> = instances
                .map(|is| {
                    is.iter()
                        .map(|i| {
                            let text = i.get("content").and_then(Value::as_str).unwrap_or("");
                            json!({"embeddings": {"values": embedding_of(text.as_bytes(), 8),
                                "statistics": {"token_count": text::words(text), "truncated": false}}})
                        })
                        .collect()
                })
                .unwrap_or_default();
            // As Vertex counts the characters it bills: code points, white space left out.
            let characters: usize = instances
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("content").and_then(Value::as_str))
                .map(|t| t.chars().filter(|c| !c.is_whitespace()).count())
                .sum();
            json_ok(
                &json!({"predictions": list, "metadata": {"billableCharacterCount": characters}}),
            )
        }
    }
}

/// Why Google would refuse the request's contents, in its words: a content without parts, an
/// empty text part (proto3 reads `""` as no data at all; Vertex refuses blank text too), an
/// inline image of a type Gemini does not read.
fn content_refusal(req: &Value, vertex: bool) -> Option<String> {
    const VERTEX_EMPTY: &str = "Unable to submit request because it has an empty text parameter. Add a value to the parameter and try again. Learn more: https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/send-request#text";
    let empty = |t: &str| {
        if vertex {
            t.trim().is_empty()
        } else {
            t.is_empty()
        }
    };
    let system = req
        .pointer("/systemInstruction/parts")
        .and_then(Value::as_array);
    for (j, p) in system.into_iter().flatten().enumerate() {
        if p.get("text").and_then(Value::as_str).is_some_and(empty) {
            return Some(if vertex {
                VERTEX_EMPTY.to_owned()
            } else {
                format!(
                    "* GenerateContentRequest.system_instruction.parts[{j}].data: required oneof field 'data' must have one initialized field\n"
                )
            });
        }
    }
    let contents = req.get("contents").and_then(Value::as_array);
    for (i, c) in contents.into_iter().flatten().enumerate() {
        let parts = c
            .get("parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if parts.is_empty() {
            return Some(format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            ));
        }
        for (j, p) in parts.iter().enumerate() {
            if p.get("text").and_then(Value::as_str).is_some_and(empty) {
                return Some(if vertex {
                    VERTEX_EMPTY.to_owned()
                } else {
                    format!(
                        "* GenerateContentRequest.contents[{i}].parts[{j}].data: required oneof field 'data' must have one initialized field\n"
                    )
                });
            }
            if let Some(mime) = p.pointer("/inlineData/mimeType").and_then(Value::as_str)
                && mime.starts_with("image/")
                && !matches!(
                    mime,
                    "image/png" | "image/jpeg" | "image/webp" | "image/heic" | "image/heif"
                )
            {
                return Some(format!("Unsupported MIME type: {mime}"));
            }
        }
    }
    None
}

/// Whether a Gemini 3 request lacks a thought signature it checks: on the first function call
/// of each model step of the current turn (the contents after the last user content holding
/// more than function responses). Earlier turns, and the other calls of a parallel set, are
/// not checked.
fn missing_signature(contents: &[Value]) -> bool {
    fn parts(c: &Value) -> &[Value] {
        c.get("parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
    let turn_start = contents
        .iter()
        .rposition(|c| {
            c.get("role").and_then(Value::as_str) != Some("model")
                && parts(c).iter().any(|p| p.get("functionResponse").is_none())
        })
        .map_or(0, |k| k + 1);
    contents[turn_start..]
        .iter()
        .filter(|c| c.get("role").and_then(Value::as_str) == Some("model"))
        .any(|c| {
            parts(c)
                .iter()
                .find(|p| p.get("functionCall").is_some())
                .is_some_and(|p| p.get("thoughtSignature").is_none())
        })
}

/// Text parts of a `parts` array, joined with a space.
fn parts_text(parts: Option<&Value>) -> String {
    parts
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn generate(ctx: &Ctx<'_>, method: Method, model: &str, req: &Value) -> Response<MockBody> {
    let contents = req
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last_user = contents
        .iter()
        .rev()
        .find(|c| c.get("role").and_then(Value::as_str) != Some("model"));
    let last_parts = last_user.and_then(|c| c.get("parts"));
    let user_text = parts_text(last_parts);
    let prompt_tokens: u64 = contents
        .iter()
        .map(|c| text::words(&parts_text(c.get("parts"))))
        .sum();
    let gemini_3 = model.starts_with("gemini-3");
    if gemini_3 && missing_signature(&contents) {
        return error(
            StatusCode::BAD_REQUEST,
            "Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance.",
            "INVALID_ARGUMENT",
        );
    }
    if user_text.contains("mock-blocked") {
        let body = json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
            "modelVersion": model});
        return if method == Method::StreamGenerate {
            let mut sse = SseBuilder::with_capacity(1);
            sse.raw(&sse_data(&body));
            sse_response(sse.finish(), ctx.chunk_delay, ctx.stats)
        } else {
            json_ok(&body)
        };
    }
    let function_response = last_parts
        .and_then(Value::as_array)
        .and_then(|ps| ps.iter().find_map(|p| p.get("functionResponse")));
    let call = match function_response {
        Some(_) => None,
        None => function_to_call(req),
    };
    let reply = match function_response {
        Some(fr) => format!(
            "mock reply to tool result: {}",
            fr.get("response").map(Value::to_string).unwrap_or_default()
        ),
        None => text::reply_to(&user_text),
    };
    let json_mode =
        req.pointer("/generationConfig/responseMimeType") == Some(&json!("application/json"));
    let reply = if json_mode {
        json!({"reply": reply}).to_string()
    } else {
        reply
    };
    let output_tokens = text::words(&reply);
    // Thought summaries, when asked for, come first (the reasoning before the answer).
    let thought = (req.pointer("/generationConfig/thinkingConfig/includeThoughts")
        == Some(&json!(true)))
    .then(|| {
        format!(
            "mock thinking about: {}",
            text::truncate_chars(&user_text, text::MAX_QUOTE_CHARS)
        )
    });
    let thoughts_tokens = thought.as_deref().map_or(0, text::words);
    let usage = |out: u64| {
        let mut u = json!({"promptTokenCount": prompt_tokens, "candidatesTokenCount": out,
        "totalTokenCount": prompt_tokens + out + thoughts_tokens});
        if thoughts_tokens > 0 {
            u["thoughtsTokenCount"] = json!(thoughts_tokens);
        }
        u
    };
    let thought_part = thought.map(|t| json!({"text": t, "thought": true}));
    let response_id = format!("mock-resp-{}", ctx.id);
    if let Some(name) = call {
        // A function without parameters is called without `args`, as Gemini does.
        let no_input = req
            .pointer("/tools/0/functionDeclarations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|d| {
                d.get("name").and_then(Value::as_str) == Some(name.as_str())
                    && ["parametersJsonSchema", "parameters"].iter().all(|k| {
                        d.get(*k)
                            .and_then(|s| s.get("properties"))
                            .and_then(Value::as_object)
                            .is_none_or(|p| p.is_empty())
                    })
            });
        let mut part = if no_input {
            json!({"functionCall": {"name": name}})
        } else {
            json!({"functionCall": {"name": name, "args": {"text": user_text}}})
        };
        if gemini_3 {
            part["thoughtSignature"] = Value::from(format!("c2lnLW1vY2st{}", ctx.id));
        }
        let parts: Vec<Value> = thought_part.into_iter().chain([part]).collect();
        let body = json!({"candidates": [{"content": {"role": "model", "parts": parts},
            "finishReason": "STOP", "index": 0}], "usageMetadata": usage(3),
            "modelVersion": model, "responseId": response_id});
        return if method == Method::StreamGenerate {
            let mut sse = SseBuilder::with_capacity(1);
            sse.raw(&sse_data(&body));
            sse_response(sse.finish(), ctx.chunk_delay, ctx.stats)
        } else {
            json_ok(&body)
        };
    }
    if method == Method::StreamGenerate {
        let pieces = text::stream_pieces(&reply);
        let mut sse = SseBuilder::with_capacity(pieces.len() + 1);
        if let Some(part) = thought_part {
            sse.raw(&sse_data(
                &json!({"candidates": [{"content": {"role": "model", "parts": [part]}, "index": 0}],
                "usageMetadata": usage(0), "modelVersion": model, "responseId": response_id}),
            ));
        }
        let mut sent = 0u64;
        let last = pieces.len().saturating_sub(1);
        for (i, piece) in pieces.iter().enumerate() {
            sent += text::words(piece);
            let mut candidate =
                json!({"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0});
            if i == last {
                candidate["finishReason"] = json!("STOP");
            }
            sse.raw(&sse_data(
                &json!({"candidates": [candidate], "usageMetadata": usage(sent),
                "modelVersion": model, "responseId": response_id}),
            ));
        }
        return sse_response(sse.finish(), ctx.chunk_delay, ctx.stats);
    }
    let parts: Vec<Value> = thought_part
        .into_iter()
        .chain([json!({"text": reply})])
        .collect();
    json_ok(
        &json!({"candidates": [{"content": {"role": "model", "parts": parts},
        "finishReason": "STOP", "index": 0}], "usageMetadata": usage(output_tokens),
        "modelVersion": model, "responseId": response_id}),
    )
}

/// The function the mock calls: the only allowed one, else the first declared one.
fn function_to_call(req: &Value) -> Option<String> {
    let config = req.pointer("/toolConfig/functionCallingConfig");
    if config.and_then(|c| c.get("mode")).and_then(Value::as_str) == Some("NONE") {
        return None;
    }
    if let Some(name) = config
        .and_then(|c| c.pointer("/allowedFunctionNames/0"))
        .and_then(Value::as_str)
    {
        return Some(name.to_owned());
    }
    req.pointer("/tools/0/functionDeclarations/0/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// One SSE event as Google sends them (`data: ...` and CRLF line ends).
fn sse_data(v: &Value) -> Vec<u8> {
    let mut buf = b"data: ".to_vec();
    write_json(&mut buf, v);
    buf.extend_from_slice(b"\r\n\r\n");
    buf
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response<MockBody> {
    let mut buf = Vec::with_capacity(128 + message.len());
    write_json(
        &mut buf,
        &json!({"error": {"code": status.as_u16(), "message": message, "status": kind}}),
    );
    json_response(status, Bytes::from(buf))
}

/// `POST .../token`: Google's OAuth token endpoint for service accounts. Checks the grant type
/// and the assertion's shape and claims (not its signature: the sidecar's own tests verify
/// that), and answers a token naming the account.
pub(crate) fn token(_ctx: &Ctx<'_>, body: &[u8]) -> Response<MockBody> {
    use base64::Engine;
    let form = String::from_utf8_lossy(body);
    let field = |name: &str| {
        form.split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_default()
            .to_owned()
    };
    let refuse = |why: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            Bytes::from(json!({"error": "invalid_grant", "error_description": why}).to_string()),
        )
    };
    if field("grant_type") != "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" {
        return refuse("grant_type must be urn:ietf:params:oauth:grant-type:jwt-bearer");
    }
    let assertion = field("assertion");
    let parts: Vec<&str> = assertion.split('.').collect();
    let decode = |p: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    let (Some(header), Some(claims)) = (
        parts.first().and_then(|p| decode(p)),
        parts.get(1).and_then(|p| decode(p)),
    ) else {
        return refuse("the assertion is not a JWT");
    };
    if parts.len() != 3 || parts[2].is_empty() || header["alg"] != "RS256" {
        return refuse("the assertion must be an RS256-signed JWT");
    }
    let Some(iss) = claims["iss"].as_str() else {
        return refuse("the assertion has no iss");
    };
    if claims["scope"].as_str().is_none() || claims["aud"].as_str().is_none() {
        return refuse("the assertion needs scope and aud");
    }
    json_ok(&json!({
        "access_token": format!("ya29.mock-{iss}"),
        "expires_in": 3599,
        "token_type": "Bearer",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(signed: bool) -> Value {
        let mut p = json!({"functionCall": {"name": "f", "args": {}}});
        if signed {
            p["thoughtSignature"] = json!("c2ln");
        }
        p
    }

    #[test]
    fn gemini_3_checks_the_first_call_of_each_step_of_the_current_turn_only() {
        let user = json!({"role": "user", "parts": [{"text": "hi"}]});
        let answer =
            json!({"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]});
        let step = |parts: Vec<Value>| json!({"role": "model", "parts": parts});
        // Parallel calls: the first is signed, the others need not be.
        assert!(!missing_signature(&[
            user.clone(),
            step(vec![call(true), call(false)]),
            answer.clone()
        ]));
        assert!(missing_signature(&[
            user.clone(),
            step(vec![call(false), call(true)]),
            answer.clone()
        ]));
        // A later step of the same turn is checked too.
        assert!(missing_signature(&[
            user.clone(),
            step(vec![call(true)]),
            answer.clone(),
            step(vec![call(false)]),
            answer.clone(),
        ]));
        // An earlier turn is not.
        assert!(!missing_signature(&[
            user.clone(),
            step(vec![call(false)]),
            answer.clone(),
            step(vec![json!({"text": "done"})]),
            user,
        ]));
    }

    #[test]
    fn empty_text_parts_and_unsupported_images_are_refused_in_googles_words() {
        let req = |parts: Value| json!({"contents": [{"role": "user", "parts": parts}]});
        let studio = content_refusal(&req(json!([{"text": ""}])), false).expect("refused");
        assert!(
            studio.contains("contents[0].parts[0].data: required oneof field 'data'"),
            "{studio}"
        );
        assert_eq!(content_refusal(&req(json!([{"text": " "}])), false), None);
        let vertex = content_refusal(&req(json!([{"text": " "}])), true).expect("refused");
        assert!(vertex.contains("empty text parameter"), "{vertex}");
        assert!(
            content_refusal(&req(json!([])), false)
                .is_some_and(|m| m.contains("must not be empty"))
        );
        let jpg = json!([{"inlineData": {"mimeType": "image/jpg", "data": "/9j/"}}]);
        assert_eq!(
            content_refusal(&req(jpg), false).as_deref(),
            Some("Unsupported MIME type: image/jpg")
        );
        let system = json!({"systemInstruction": {"parts": [{"text": ""}]}, "contents": []});
        assert!(
            content_refusal(&system, false)
                .is_some_and(|m| m.contains("system_instruction.parts[0]"))
        );
    }
}
