//! Helpers shared by the provider formats: reading message text, the deterministic
//! reply, rough token counts and the error trigger.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

/// Longest quoted user text in a reply, in characters.
pub const MAX_QUOTE_CHARS: usize = 200;

/// Prefix of every reply.
pub const REPLY_PREFIX: &str = "mock reply to: ";

/// Model name prefix that makes the mock answer with an error status.
pub const STATUS_MODEL_PREFIX: &str = "mock-status-";

/// A chat message of either format: only the role and the content matter here.
#[derive(Deserialize)]
pub struct Message<'a> {
    #[serde(borrow, default)]
    pub role: Option<Cow<'a, str>>,
    #[serde(default)]
    pub content: Option<Value>,
}

/// Text of a message content: a string, or an array of parts / blocks whose `text`
/// fields are joined with a space. Anything else has no text.
pub fn content_text(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(s) => Cow::Borrowed(s),
        Value::Array(parts) => {
            let mut texts = parts.iter().filter_map(part_text);
            let Some(first) = texts.next() else {
                return Cow::Borrowed("");
            };
            match texts.next() {
                None => Cow::Borrowed(first),
                Some(second) => {
                    let mut out = String::with_capacity(first.len() + second.len() + 1);
                    out.push_str(first);
                    out.push(' ');
                    out.push_str(second);
                    for t in texts {
                        out.push(' ');
                        out.push_str(t);
                    }
                    Cow::Owned(out)
                }
            }
        }
        _ => Cow::Borrowed(""),
    }
}

/// Rough token count of a message content (its words).
pub fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => words(s),
        Value::Array(parts) => parts.iter().filter_map(part_text).map(words).sum(),
        _ => 0,
    }
}

fn part_text(part: &Value) -> Option<&str> {
    match part {
        Value::String(s) => Some(s),
        Value::Object(map) => map.get("text").and_then(Value::as_str),
        _ => None,
    }
}

/// Rough, deterministic token count: whitespace-separated words.
pub fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Text of the last message with role `user` (empty when there is none).
pub fn last_user_text<'m>(messages: &'m [Message<'_>]) -> Cow<'m, str> {
    messages
        .iter()
        .rev()
        .find(|m| m.role.as_deref() == Some("user"))
        .and_then(|m| m.content.as_ref())
        .map_or(Cow::Borrowed(""), content_text)
}

/// Prompt token count of all messages.
pub fn messages_words(messages: &[Message<'_>]) -> u64 {
    messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(content_words)
        .sum()
}

/// The deterministic reply: `mock reply to: <user text, at most 200 chars>`.
pub fn reply_to(user_text: &str) -> String {
    let quoted = truncate_chars(user_text, MAX_QUOTE_CHARS);
    let mut reply = String::with_capacity(REPLY_PREFIX.len() + quoted.len());
    reply.push_str(REPLY_PREFIX);
    reply.push_str(quoted);
    reply
}

/// The first `max` characters of `s` (never splits a character).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// Splits `s` into stream pieces, one per word with its following whitespace, so
/// that the pieces concatenate back to `s`.
pub fn stream_pieces(s: &str) -> Vec<&str> {
    let mut pieces = Vec::with_capacity(s.len() / 4 + 1);
    let mut start = 0;
    let mut after_space = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            after_space = true;
        } else if after_space {
            pieces.push(&s[start..i]);
            start = i;
            after_space = false;
        }
    }
    if start < s.len() {
        pieces.push(&s[start..]);
    }
    pieces
}

/// The error status requested by a model named `mock-status-<code>` (400..=599).
pub fn status_trigger(model: &str) -> Option<StatusCode> {
    let code: u16 = model.strip_prefix(STATUS_MODEL_PREFIX)?.parse().ok()?;
    if (400..=599).contains(&code) {
        StatusCode::from_u16(code).ok()
    } else {
        None
    }
}

/// Parses a request body that must be a JSON object (serde would also accept an
/// array for a struct).
pub fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body).map_err(|e| e.to_string()),
        _ => Err("expected a JSON object".to_owned()),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_concatenate_back() {
        for s in ["mock reply to: hello  world ", "  a", "one", "é ü ß", ""] {
            assert_eq!(stream_pieces(s).concat(), s);
        }
        assert_eq!(
            stream_pieces("mock reply to: hi"),
            ["mock ", "reply ", "to: ", "hi"]
        );
    }

    #[test]
    fn truncates_on_char_boundary() {
        let long = "é".repeat(300);
        assert_eq!(truncate_chars(&long, 200).chars().count(), 200);
        assert_eq!(truncate_chars("short", 200), "short");
    }

    #[test]
    fn content_text_of_parts() {
        let v: Value = serde_json::json!([
            {"type": "text", "text": "a b"},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": "c"}
        ]);
        assert_eq!(content_text(&v), "a b c");
        assert_eq!(content_words(&v), 3);
        assert_eq!(content_text(&Value::Null), "");
    }

    #[test]
    fn status_trigger_parses() {
        assert_eq!(
            status_trigger("mock-status-429"),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(
            status_trigger("mock-status-529").map(|s| s.as_u16()),
            Some(529)
        );
        assert_eq!(status_trigger("mock-status-200"), None);
        assert_eq!(status_trigger("mock-status-x"), None);
        assert_eq!(status_trigger("gpt-4o"), None);
    }
}
