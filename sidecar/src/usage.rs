//! Token counts read from responses as they stream through, for logs and metrics: the `usage`
//! objects of OpenAI (`prompt_tokens`/`completion_tokens`), Anthropic (`input_tokens`/
//! `output_tokens`, in `message_start` and `message_delta` for streams), Gemini
//! (`usageMetadata.promptTokenCount`/`candidatesTokenCount`) and Bedrock Converse
//! (`inputTokens`/`outputTokens`). No JSON is parsed: each body frame is searched for `"usage`
//! and the numbers after it are read; the last value seen wins (stream usage is cumulative).
//! The tail of each frame is kept so that an object split across two frames is still read.

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
/// Bytes of one frame kept for the next (a usage object is well under this).
const CARRY: usize = 512;

/// Tokens of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: Option<u64>,
    /// Generated tokens.
    pub output: Option<u64>,
    carry: Vec<u8>,
}

impl Usage {
    /// Reads the usage numbers in `data` (the next frame of the body).
    pub fn observe(&mut self, data: &[u8]) {
        if !self.carry.is_empty() {
            // Objects that started in the previous frame: read the seam first, in order, so
            // that what this frame holds is read last.
            let mut seam = std::mem::take(&mut self.carry);
            seam.extend_from_slice(&data[..data.len().min(CARRY)]);
            self.scan(&seam);
        }
        self.scan(data);
        let tail = &data[data.len().saturating_sub(CARRY)..];
        self.carry.clear();
        self.carry.extend_from_slice(tail);
    }

    /// Reads every usage object in `buf`, in order.
    fn scan(&mut self, buf: &[u8]) {
        let mut rest = buf;
        while let Some(at) = memmem::find(rest, b"\"usage") {
            rest = &rest[at + 6..];
            self.read_object(rest);
        }
    }

    /// Reads the numbers of the object starting at `s` (just after `"usage`), in one pass over
    /// its `"key": value` pairs until the object closes (or `CARRY` bytes).
    fn read_object(&mut self, s: &[u8]) {
        let window = &s[..s.len().min(CARRY)];
        let mut depth = 0usize;
        let mut i = 0;
        while i < window.len() {
            match window[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return;
                    }
                }
                b'"' if depth > 0 => {
                    let start = i + 1;
                    let Some(len) = window[start..].iter().position(|&c| c == b'"') else {
                        return;
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
                            } else if OUTPUT_KEYS.contains(&key) {
                                self.output = Some(n);
                            }
                        }
                    }
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
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
        // An object split anywhere.
        let whole = r#"{"usage":{"prompt_tokens":21,"completion_tokens":43}}"#;
        for cut in 1..whole.len() {
            assert_eq!(
                usage_of(&[&whole[..cut], &whole[cut..]]),
                (Some(21), Some(43)),
                "cut at {cut}"
            );
        }
    }
}
