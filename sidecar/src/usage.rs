//! Token counts read from responses as they stream through, for logs and metrics: the `usage`
//! objects of OpenAI (`prompt_tokens`/`completion_tokens`), Anthropic (`input_tokens`/
//! `output_tokens`, in `message_start` and `message_delta` for streams), Gemini
//! (`usageMetadata.promptTokenCount`/`candidatesTokenCount`) and Bedrock Converse
//! (`inputTokens`/`outputTokens`). No JSON is parsed: each body frame is searched for `"usage`
//! and the numbers after it are read; the last value seen wins (stream usage is cumulative).
//! When a frame ends inside a usage object (or inside `"usage` itself), that piece is kept and
//! read again together with the start of the next frame; nothing is copied otherwise.

use std::sync::LazyLock;

use memchr::memmem;

const INPUT_KEYS: &[&[u8]] = &[
    b"prompt_tokens",
    b"input_tokens",
    b"promptTokenCount",
    b"inputTokens",
];
const OUTPUT_KEYS: &[&[u8]] = &[
    b"completion_tokens",
    b"output_tokens",
    b"candidatesTokenCount",
    b"outputTokens",
];
const NEEDLE: &[u8] = b"\"usage";
/// What the finder looks for: `usage` without the quote, which JSON is full of (a quote as
/// the first byte would make every string a candidate); the quote is checked after.
const WORD: &[u8] = b"usage";
/// Longest usage object read (they are well under this).
const WINDOW: usize = 512;

static FINDER: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(WORD));

/// Whether an OpenAI-format provider takes `stream_options.include_usage`, which the gateway
/// adds to streams that lack it so that their tokens are counted. Providers that refuse fields
/// they do not know are left out: Mistral answers 422 to it (and, like Perplexity, sends usage
/// in every stream anyway); Azure takes it from `api-version` 2024-09-01 on; others
/// (`cohere`, `huggingface`, `workers-ai`, `custom-*`) are not known to take it.
pub fn takes_stream_options(provider: &str, query: Option<&str>) -> bool {
    match provider {
        "openai" | "groq" | "deepseek" | "grok" | "openrouter" => true,
        "azure-openai" => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("api-version="))
            .is_some_and(|v| v.get(..10).is_some_and(|date| date >= "2024-09-01")),
        _ => false,
    }
}

/// Tokens of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: Option<u64>,
    /// Generated tokens.
    pub output: Option<u64>,
    /// The unfinished usage object (or `"usage` prefix) the last frame ended in.
    pending: Vec<u8>,
}

impl Usage {
    /// Reads the usage numbers in `data` (the next frame of the body).
    pub fn observe(&mut self, data: &[u8]) {
        let mut carried = false;
        if !self.pending.is_empty() {
            // The object that started in an earlier frame, read across the seam first so that
            // what this frame holds is read last.
            let mut seam = std::mem::take(&mut self.pending);
            let before = seam.len();
            seam.extend_from_slice(&data[..data.len().min(WINDOW)]);
            if let Some(at) = self.scan(&seam)
                && at < before
                && data.len() <= WINDOW
            {
                // Still unfinished, and this whole frame is in the seam: wait for more.
                seam.drain(..at);
                self.pending = seam;
                carried = true;
            }
        }
        if let Some(from) = self.scan(data)
            && !carried
        {
            let from = from.max(data.len().saturating_sub(WINDOW));
            self.pending.extend_from_slice(&data[from..]);
        }
    }

    /// Reads every usage object in `buf`, in order. Returns where an object that `buf` ends
    /// inside starts (or a prefix of `"usage` at its very end), to be read again with more.
    fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let mut at = 1;
        while let Some(found) = buf.get(at..).and_then(|rest| FINDER.find(rest)) {
            let start = at + found - 1;
            at = start + NEEDLE.len();
            if buf[start] == b'"' && !self.read_object(&buf[at..]) {
                return Some(start);
            }
        }
        // `"usa` at the very end: the needle may go on in the next frame.
        (1..NEEDLE.len())
            .rev()
            .find(|&n| buf.ends_with(&NEEDLE[..n]))
            .map(|n| buf.len() - n)
    }

    /// Reads the numbers of the object starting at `s` (just after `"usage`), in one pass over
    /// its `"key": value` pairs. Returns false when `s` ends before the object (or the scalar
    /// value, `null`) does.
    fn read_object(&mut self, s: &[u8]) -> bool {
        let cut = s.len() > WINDOW;
        let window = &s[..s.len().min(WINDOW)];
        let (mut input, mut output) = (false, false);
        let mut depth = 0usize;
        let mut i = 0;
        while let Some(off) = memchr::memchr3(b'{', b'}', b'"', &window[i..]) {
            i += off;
            match window[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return true;
                    }
                }
                // A quote outside the object: the key's own closing quote (`"usage"`,
                // `"usageMetadata"`) comes before the colon; one after it means the value
                // was a scalar (`"usage":null,"x"`).
                _ if depth == 0 => {
                    if window[..i].contains(&b':') {
                        return true;
                    }
                }
                _ => {
                    let start = i + 1;
                    let Some(len) = memchr::memchr(b'"', &window[start..]) else {
                        return cut;
                    };
                    let key = &window[start..start + len];
                    i = start + len + 1;
                    let rest = window[i..].trim_ascii_start();
                    if let Some(value) = rest.strip_prefix(b":") {
                        let value = value.trim_ascii_start();
                        let digits = value.iter().take_while(|c| c.is_ascii_digit()).count();
                        if digits > 0
                            && digits < value.len()
                            && let Some(n) = std::str::from_utf8(&value[..digits])
                                .ok()
                                .and_then(|d| d.parse().ok())
                        {
                            if INPUT_KEYS.contains(&key) {
                                self.input = Some(n);
                                input = true;
                            } else if OUTPUT_KEYS.contains(&key) {
                                self.output = Some(n);
                                output = true;
                            }
                            if input && output {
                                // Both numbers of this object: the rest (details) adds none.
                                return true;
                            }
                        }
                    }
                    continue;
                }
            }
            i += 1;
        }
        // The data ended first. Done only if it was cut at WINDOW (too long to read) or a
        // scalar value has begun after the colon (`"usage": null`).
        cut || (depth == 0
            && window
                .iter()
                .position(|&c| c == b':')
                .is_some_and(|colon| !window[colon + 1..].trim_ascii().is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(frames: &[&str]) -> (Option<u64>, Option<u64>) {
        let mut u = Usage::default();
        for f in frames {
            u.observe(f.as_bytes());
        }
        (u.input, u.output)
    }

    #[test]
    fn stream_options_go_only_to_providers_that_take_them() {
        assert!(takes_stream_options("openai", None));
        assert!(takes_stream_options("groq", None));
        assert!(
            !takes_stream_options("mistral", None),
            "Mistral answers 422"
        );
        assert!(!takes_stream_options("custom-local", None));
        assert!(takes_stream_options(
            "azure-openai",
            Some("api-version=2024-10-21")
        ));
        assert!(!takes_stream_options(
            "azure-openai",
            Some("api-version=2024-06-01")
        ));
        assert!(!takes_stream_options("azure-openai", None));
    }

    #[test]
    fn every_provider_format_is_read() {
        assert_eq!(
            usage_of(&[
                r#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"prompt_tokens_details":{"cached_tokens":0}}}"#
            ]),
            (Some(12), Some(34))
        );
        assert_eq!(
            usage_of(&[r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":9}}"#]),
            (Some(7), Some(9))
        );
        assert_eq!(
            usage_of(&[
                r#"{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"totalTokenCount":8}}"#
            ]),
            (Some(3), Some(5))
        );
        assert_eq!(
            usage_of(&[
                r#"{"output":{},"usage":{"inputTokens":4,"outputTokens":6,"totalTokens":10}}"#
            ]),
            (Some(4), Some(6))
        );
        assert_eq!(usage_of(&[r#"{"choices":[]}"#]), (None, None));
    }

    #[test]
    fn only_unfinished_objects_are_kept_between_frames() {
        let mut u = Usage::default();
        u.observe(br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert!(u.pending.is_empty());
        u.observe(b"data: {\"choices\":[],\"usage\":null}\n\n");
        assert!(u.pending.is_empty());
        u.observe(b"data: {\"choices\":[],\"usage\": ");
        assert_eq!(u.pending, b"\"usage\": ");
        u.observe(b"{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n");
        assert!(u.pending.is_empty());
        assert_eq!((u.input, u.output), (Some(5), Some(6)));
        u.observe(b"data: {\"us");
        assert_eq!(u.pending, b"\"us");
    }

    #[test]
    fn streams_take_the_last_values_and_survive_split_frames() {
        // OpenAI: usage null until the last chunk.
        assert_eq!(
            usage_of(&[
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ]),
            (Some(5), Some(2))
        );
        // Anthropic: input in message_start, cumulative output in message_delta.
        assert_eq!(
            usage_of(&[
                "event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n",
                "event: message_delta\ndata: {\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n",
            ]),
            (Some(11), Some(15))
        );
        // Both events in one frame, then an unrelated frame: the later event still wins.
        assert_eq!(
            usage_of(&[
                "data: {\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}\n\ndata: {\"usage\":{\"output_tokens\":15}}\n\n",
                "data: {\"type\":\"message_stop\"}\n\n",
            ]),
            (Some(11), Some(15))
        );
        // An object split anywhere, in two or three frames.
        let whole = r#"{"usage":{"prompt_tokens":21,"completion_tokens":43}}"#;
        for cut in 1..whole.len() {
            assert_eq!(
                usage_of(&[&whole[..cut], &whole[cut..]]),
                (Some(21), Some(43)),
                "cut at {cut}"
            );
            for second in cut + 1..whole.len() {
                assert_eq!(
                    usage_of(&[&whole[..cut], &whole[cut..second], &whole[second..]]),
                    (Some(21), Some(43)),
                    "cut at {cut} and {second}"
                );
            }
        }
    }
}
