//! Guardrails: prompts and responses classified by an OpenAI-compatible moderation endpoint
//! (`spec.guardrails.moderationURL`), with an action per hazard category.
//!
//! The text of the request (chat messages, prompt, input; see [`crate::text`]) is sent as
//! `{"input": text}` before the request goes upstream; a category marked `block` that the
//! moderation flags refuses it with `424` and code 2016, one marked `flag` lets it through, logs
//! it and counts it. Response categories work the same on the whole response (held back and
//! checked before delivery, like DLP response policies; streams arrive in one piece), code 2017.
//! The gateway's OpenAI key is sent only to `api.openai.com`. When the moderation endpoint
//! cannot answer, the request is served (fail open), logged and counted.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use sidegate_crds::policy::{GuardrailAction, Guardrails};

use crate::error::GatewayError;
use crate::proxy::Gateway;

/// Categories of OpenAI's moderation API.
pub use sidegate_crds::policy::GUARDRAIL_CATEGORIES as CATEGORIES;

/// Time for the moderation endpoint to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Most text in one moderation input; longer text goes as several inputs of one request.
const MAX_TEXT: usize = 64 << 10;
/// Bytes each input repeats of the one before, so that a phrase across a cut is seen whole.
const OVERLAP: usize = 1 << 10;
/// Most inputs in one check (about 2 MiB of text); longer text is refused, not half checked.
const MAX_INPUTS: usize = 32;
/// Largest moderation answer read.
const MAX_ANSWER: usize = 1 << 20;

/// The guardrails of a loaded config.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    url: Option<http::Uri>,
    prompt: BTreeMap<String, GuardrailAction>,
    response: BTreeMap<String, GuardrailAction>,
}

/// Which side a check is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The prompt (code 2016).
    Prompt,
    /// The response (code 2017).
    Response,
}

impl Settings {
    /// Settings from `spec.guardrails`; the error names the bad field.
    pub fn from_policy(g: Option<&Guardrails>) -> Result<Self, String> {
        let Some(g) = g else {
            return Ok(Self::default());
        };
        for (side, map) in [("prompt", &g.prompt), ("response", &g.response)] {
            if let Some(bad) = map.keys().find(|c| !CATEGORIES.contains(&c.as_str())) {
                return Err(format!(
                    "spec.guardrails.{side}: unknown category {bad:?} (known: {})",
                    CATEGORIES.join(", ")
                ));
            }
        }
        if g.prompt.is_empty() && g.response.is_empty() {
            return Ok(Self::default());
        }
        let url = g.moderation_url.as_deref().ok_or(
            "spec.guardrails.moderationURL is required when prompt or response categories are set",
        )?;
        let url: http::Uri = url
            .parse()
            .ok()
            .filter(|u: &http::Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            })
            .ok_or_else(|| {
                format!("spec.guardrails.moderationURL {url:?} is not an http(s) URL")
            })?;
        Ok(Self {
            url: Some(url),
            prompt: g.prompt.clone(),
            response: g.response.clone(),
        })
    }

    /// Whether prompts are checked.
    pub fn checks_prompts(&self) -> bool {
        !self.prompt.is_empty()
    }

    /// Whether responses are checked (they are then held back until checked).
    pub fn checks_responses(&self) -> bool {
        !self.response.is_empty()
    }

    /// The moderation endpoint and the actions of `side`, when it is checked.
    fn actions(&self, side: Side) -> Option<(&http::Uri, &BTreeMap<String, GuardrailAction>)> {
        let actions = match side {
            Side::Prompt => &self.prompt,
            Side::Response => &self.response,
        };
        self.url
            .as_ref()
            .filter(|_| !actions.is_empty())
            .map(|url| (url, actions))
    }
}

impl Gateway {
    /// Checks `body` (a request or a whole response) with the moderation endpoint: `Err` when a
    /// blocking category was flagged; flagged categories otherwise (logged and counted here).
    /// `content_type`: a request's, which says whether it is a form and whether it is text
    /// ([`crate::text::of_prompt`]).
    pub(crate) async fn guardrails_check(
        &self,
        snap: &crate::config::Snapshot,
        side: Side,
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Result<Vec<String>, GatewayError> {
        if snap.guardrails.actions(side).is_none() {
            return Ok(Vec::new());
        }
        let text = match side {
            Side::Prompt => crate::text::of_prompt(content_type, body)?,
            Side::Response => crate::text::of_body(body),
        };
        self.guardrails_check_text(snap, side, &text).await
    }

    /// [`Self::guardrails_check`] of the text read already (the steps of a universal request,
    /// each read as the body it is).
    pub(crate) async fn guardrails_check_text(
        &self,
        snap: &crate::config::Snapshot,
        side: Side,
        text: &str,
    ) -> Result<Vec<String>, GatewayError> {
        let Some((url, actions)) = snap.guardrails.actions(side) else {
            return Ok(Vec::new());
        };
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let inputs = pieces(text, MAX_TEXT, OVERLAP);
        if inputs.len() > MAX_INPUTS {
            self.metrics.count_guardrail("block");
            return Err(GatewayError::GuardrailTooLong {
                response: side == Side::Response,
                limit: MAX_INPUTS * (MAX_TEXT - OVERLAP),
            });
        }
        let flagged = match self.moderate(snap, url.clone(), &inputs).await {
            Ok(f) => f,
            Err(why) => {
                self.metrics.count_guardrail("error");
                tracing::warn!(error = %why, log_id = crate::log_id::current().as_deref(), "guardrails: moderation unavailable; serving without it (fail open)");
                return Ok(Vec::new());
            }
        };
        let side_name = match side {
            Side::Prompt => "prompt",
            Side::Response => "response",
        };
        let mut matched = Vec::new();
        for category in flagged {
            match actions.get(&category) {
                Some(GuardrailAction::Block) => {
                    self.metrics.count_guardrail("block");
                    tracing::info!(side = side_name, category = %category, log_id = crate::log_id::current().as_deref(), "guardrails: blocked");
                    return Err(GatewayError::GuardrailBlocked {
                        response: side == Side::Response,
                        category,
                    });
                }
                Some(GuardrailAction::Flag) => matched.push(category),
                None => {}
            }
        }
        if !matched.is_empty() {
            self.metrics.count_guardrail("flag");
            tracing::info!(side = side_name, categories = ?matched, log_id = crate::log_id::current().as_deref(), "guardrails: flagged");
        }
        Ok(matched)
    }

    /// The categories the moderation endpoint flags for any of `inputs`.
    async fn moderate(
        &self,
        snap: &crate::config::Snapshot,
        url: http::Uri,
        inputs: &[&str],
    ) -> Result<Vec<String>, String> {
        let body = match inputs {
            [one] => serde_json::json!({ "input": one }),
            many => serde_json::json!({ "input": many }),
        }
        .to_string();
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        let openai = is_openai_over_tls(&url);
        *req.uri_mut() = url;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if openai
            && let Some(provider) = snap.providers.get("openai")
            && let Ok(crate::providers::KeyChoice::Stored(key)) = provider.choose_key(None)
        {
            req.headers_mut()
                .insert(header::AUTHORIZATION, key.header().clone());
        }
        // Bounded as a whole, the body too: a stalled answer fails open like a missing one.
        let (status, raw) = self
            .fetch(req, TIMEOUT, MAX_ANSWER)
            .await
            .map_err(|e| format!("moderation endpoint: {e}"))?;
        if !status.is_success() {
            return Err(format!("moderation endpoint answered {status}"));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| format!("moderation answer: {e}"))?;
        let results = v
            .get("results")
            .and_then(|r| r.as_array())
            .ok_or("moderation answer has no results")?;
        // One result per input, each with its categories: an answer that leaves an input
        // unclassified is no answer (an error, as a missing one), never a clean one.
        if results.len() != inputs.len() {
            return Err(format!(
                "moderation answer has {} results for {} inputs",
                results.len(),
                inputs.len()
            ));
        }
        let mut flagged = Vec::new();
        for r in results {
            let cats = r
                .get("categories")
                .and_then(|c| c.as_object())
                .ok_or("moderation answer has a result without categories")?;
            for (name, on) in cats {
                if on.as_bool() == Some(true) && !flagged.contains(name) {
                    flagged.push(name.clone());
                }
            }
        }
        Ok(flagged)
    }
}

/// Whether the response guardrails read the answer to a `method` request to `path`: a model's
/// answer (a `POST`, or a stored response fetched, `GET .../responses/{id}`), not a list of
/// models, a file's content, a batch's status, nor embeddings (numbers, and Cohere's echo the
/// texts embedded: the prompt, checked as one).
pub fn reads_answer(method: &Method, path: &str) -> bool {
    use crate::background::RequestKind;
    match RequestKind::of(method, path, b"") {
        RequestKind::ModelCall { .. } => !is_embedding(path),
        RequestKind::Poll(_) => true,
        RequestKind::Delete(_) | RequestKind::Other => false,
    }
}

/// Whether `path` asks for embeddings: OpenAI's and the compatible APIs' `embeddings`,
/// Cohere's `embed`, Gemini's `:embedContent` and `:batchEmbedContents`, a Bedrock embedding
/// model (`amazon.titan-embed-*`, `cohere.embed-*`) invoked.
fn is_embedding(path: &str) -> bool {
    let [last, before, _] = crate::background::decoded_last_segments(path);
    let (last, before) = (
        last.as_deref().unwrap_or(""),
        before.as_deref().unwrap_or(""),
    );
    matches!(last, "embeddings" | "embed")
        || last.ends_with(":embedContent")
        || last.ends_with(":batchEmbedContents")
        || (last == "invoke" && before.contains("embed"))
}

/// Whether the stored OpenAI key may go to moderation `url`: OpenAI's own host (in any case, a
/// trailing dot too), over TLS only.
fn is_openai_over_tls(url: &http::Uri) -> bool {
    url.scheme_str() == Some("https")
        && url.host().is_some_and(|h| {
            h.trim_end_matches('.')
                .eq_ignore_ascii_case("api.openai.com")
        })
}

/// `text` cut into pieces of at most `max` bytes (on character boundaries), each starting
/// `overlap` bytes before the end of the one before.
fn pieces(text: &str, max: usize, overlap: usize) -> Vec<&str> {
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = floor((start + max).min(text.len()));
        out.push(&text[start..end]);
        if end == text.len() {
            return out;
        }
        // Always forward, even when a piece is shorter than the overlap (a wide character).
        start = floor(end.saturating_sub(overlap)).max(start + 1);
        start = (start..=end)
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_openai_key_goes_to_openais_host_over_tls_only() {
        let url = |u: &str| u.parse::<http::Uri>().expect("uri");
        for yes in [
            "https://api.openai.com/v1/moderations",
            "https://API.OpenAI.com/v1/moderations",
            "https://api.openai.com./v1/moderations",
        ] {
            assert!(is_openai_over_tls(&url(yes)), "{yes}");
        }
        for no in [
            "http://api.openai.com/v1/moderations",
            "https://api.openai.com.evil.example/v1/moderations",
            "https://moderation.internal/v1/moderations",
        ] {
            assert!(!is_openai_over_tls(&url(no)), "{no}");
        }
    }

    #[test]
    fn only_the_answers_of_models_are_moderated() {
        for (method, path) in [
            (Method::POST, "/openai/v1/chat/completions"),
            (
                Method::POST,
                "/v1/acct/gw/workers-ai/@cf/meta/llama-3.1-8b-instruct",
            ),
            (Method::POST, "/"),
            (Method::GET, "/openai/v1/responses/resp_123"),
        ] {
            assert!(reads_answer(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "/openai/v1/models"),
            (Method::GET, "/openai/v1/files/file-1/content"),
            (Method::GET, "/openai/v1/responses/resp_123/input_items"),
            (Method::POST, "/openai/v1/embeddings"),
            (Method::POST, "/openai/v1/%65mbeddings"),
            (Method::POST, "/compat/embeddings"),
            (Method::POST, "/cohere/v2/embed"),
            (
                Method::POST,
                "/google-ai-studio/v1beta/models/text-embedding-004:embedContent",
            ),
            (
                Method::POST,
                "/aws-bedrock/bedrock-runtime/us-east-1/model/amazon.titan-embed-text-v2:0/invoke",
            ),
        ] {
            assert!(!reads_answer(&method, path), "{method} {path}");
        }
    }

    #[test]
    fn long_text_is_cut_into_overlapping_pieces_that_cover_it() {
        assert_eq!(pieces("short", 10, 2), ["short"]);
        assert_eq!(pieces("abcdefghij", 4, 1), ["abcd", "defg", "ghij"]);
        // A phrase across a cut is whole in one piece.
        let text = format!("{}mock-flag:violence{}", "x".repeat(95), "y".repeat(100));
        let cut = pieces(&text, 100, 20);
        assert!(
            cut.iter().any(|p| p.contains("mock-flag:violence")),
            "{cut:?}"
        );
        assert!(cut.iter().all(|p| p.len() <= 100));
        // Multi-byte characters are never split.
        let wide = "é".repeat(100);
        for p in pieces(&wide, 7, 3) {
            assert!(p.chars().all(|c| c == 'é') && !p.is_empty());
        }
        assert_eq!(pieces("", 10, 2), [""]);
    }

    /// The text `guardrails_check` sends to moderation for `body`.
    fn moderated(body: &[u8]) -> String {
        crate::text::of_body(body)
    }

    #[test]
    fn bedrock_and_gemini_json_streams_are_moderated_as_their_text() {
        use crate::text::tests::{converse_stream, gemini_array, invoke_stream};
        let pieces = ["mock reply to: say mock-fl", "ag:violence"];
        for (name, body) in [
            ("converse-stream", converse_stream(&pieces)),
            ("invoke-with-response-stream", invoke_stream(&pieces)),
            ("gemini array", gemini_array(&pieces)),
        ] {
            // The model's words only: no framing, base64, JSON or ids.
            assert_eq!(
                moderated(&body),
                "mock reply to: say mock-flag:violence",
                "{name}"
            );
        }
    }

    #[test]
    fn tool_inputs_results_and_documents_of_a_prompt_are_moderated() {
        // Each beside a plain text part (a body with no text field has all its strings read).
        let prompts: [&[u8]; 4] = [
            br#"{"messages":[{"role":"user","content":"look"},{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{"q":"mock-flag:violence"}}]}]}"#,
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"read"},{"type":"document","source":{"type":"text","media_type":"text/plain","data":"mock-flag:violence"}}]}]}"#,
            br#"{"contents":[{"role":"user","parts":[{"text":"look"}]},{"role":"model","parts":[{"functionCall":{"name":"f","args":{"q":{"r":"mock-flag:violence"}}}}]}]}"#,
            br#"{"messages":[{"role":"user","content":[{"text":"look"},{"toolResult":{"toolUseId":"t1","content":[{"json":{"r":"mock-flag:violence"}}]}}]}]}"#,
        ];
        for p in prompts {
            assert!(
                crate::text::of_request(p).contains("mock-flag:violence"),
                "{}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn settings_name_what_is_wrong() {
        let mut g = Guardrails {
            moderation_url: Some("http://moderation.local/v1/moderations".into()),
            ..Guardrails::default()
        };
        g.prompt.insert("violence".into(), GuardrailAction::Block);
        let s = Settings::from_policy(Some(&g)).expect("valid");
        assert!(s.checks_prompts() && !s.checks_responses());
        g.response.insert("gore".into(), GuardrailAction::Flag);
        let err = Settings::from_policy(Some(&g)).expect_err("category");
        assert!(
            err.contains("spec.guardrails.response") && err.contains("gore"),
            "{err}"
        );
        g.response.clear();
        g.moderation_url = None;
        let err = Settings::from_policy(Some(&g)).expect_err("url");
        assert!(err.contains("moderationURL is required"), "{err}");
        g.moderation_url = Some("ftp://x".into());
        assert!(Settings::from_policy(Some(&g)).is_err());
        // Nothing to check: no URL needed.
        assert!(
            Settings::from_policy(Some(&Guardrails::default()))
                .expect("empty")
                .url
                .is_none()
        );
    }
}
