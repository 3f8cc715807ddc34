//! The human text inside request and response bodies (chat messages, prompts, stream deltas),
//! for the checks that read it: DLP and guardrails.

use serde_json::Value;

/// Keys whose string values carry text people or models wrote, in the APIs sidegate serves
/// (OpenAI, Anthropic, Gemini, Bedrock, Cohere, tool-call arguments, stream deltas).
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
];

fn walk(v: &Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        Value::String(s) if key.is_some_and(|k| TEXT_KEYS.contains(&k)) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| walk(i, key, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| walk(v, Some(k), out)),
        _ => {}
    }
}

/// Every string value of `v`, for a body of a shape [`TEXT_KEYS`] does not know.
fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| all_strings(i, out)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, out)),
        _ => {}
    }
}

/// For an SSE body: the text of all events joined in order, without separators (deltas are
/// fragments of one text); `None` for other bodies.
pub fn sse_text(body: &[u8]) -> Option<Vec<u8>> {
    if !(body.starts_with(b"data:") || body.starts_with(b"event:") || body.starts_with(b":")) {
        return None;
    }
    let mut parts = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        if let Some(data) = line.strip_prefix(b"data:")
            && let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii())
        {
            walk(&v, None, &mut parts);
        }
    }
    Some(parts.concat().into_bytes())
}

/// The text of a body: the joined deltas of a stream, the text fields of a JSON document
/// (one per line, in no particular order across fields; every string value when it has none
/// of them, so an API shape not listed is still read), or the body itself when it is neither.
pub fn of_body(body: &[u8]) -> String {
    if let Some(t) = sse_text(body) {
        return String::from_utf8_lossy(&t).into_owned();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let mut parts = Vec::new();
            walk(&v, None, &mut parts);
            if parts.is_empty() {
                all_strings(&v, &mut parts);
            }
            parts.join("\n")
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_of_every_api_give_their_text() {
        let openai = br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}"#;
        assert_eq!(of_body(openai), "be nice\nhello");
        let anthropic =
            br#"{"system":"sys","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        // Object keys may come in any order: compare the lines as a set.
        let mut lines: Vec<String> = of_body(anthropic).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["hi", "sys"]);
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"ciao"}]}]}"#;
        assert_eq!(of_body(gemini), "ciao");
        assert_eq!(of_body(b"plain words"), "plain words");
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(of_body(sse), "Hello");
        assert_eq!(sse_text(b"{\"content\":\"x\"}"), None);
        let cohere = br#"{"message":"hola","preamble":"be brief"}"#;
        let mut lines: Vec<String> = of_body(cohere).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["be brief", "hola"]);
        // A shape with none of the known fields: every string is read.
        let other = br#"{"model":"m","query":"what is x","documents":["doc one"]}"#;
        let mut lines: Vec<String> = of_body(other).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines, ["doc one", "m", "what is x"]);
    }
}
