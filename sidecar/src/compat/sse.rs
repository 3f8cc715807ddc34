//! A small incremental server-sent-events parser (WHATWG "event stream" rules): fed the body
//! chunk by chunk at arbitrary boundaries, it hands out each event as soon as its blank line
//! arrives and never holds more than one event. [`DoneWatch`] tells whether an OpenAI-format
//! stream passed through unparsed ended whole.

use crate::buffers::{self, BudgetExhausted, Held};

/// Largest event (data plus the line being read) kept; a larger one is dropped whole, or ends
/// the parse ([`SseParser::ending_at_oversized`]).
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// The error that ends a translated stream at an event over [`MAX_EVENT_BYTES`].
pub fn too_large(provider: &str) -> String {
    format!(
        "the {provider} stream sent an event larger than {} MiB, which the gateway does not translate; the answer ends here",
        MAX_EVENT_BYTES >> 20
    )
}

/// Allocation kept from one event to the next; a larger one (a big event's: Gemini streams
/// images as megabytes of base64 in one event) is freed once its event passed.
const KEEP_BYTES: usize = 64 << 10;

/// One dispatched event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field; empty when the event had none.
    pub name: &'a str,
    /// The `data:` lines joined with `\n`.
    pub data: &'a str,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The unfinished line of the last chunk.
    line: Vec<u8>,
    name: String,
    data: String,
    has_data: bool,
    /// The last chunk ended in `\r`: a `\n` starting the next one belongs to it.
    skip_lf: bool,
    /// The current event grew past [`MAX_EVENT_BYTES`]; skip it up to its blank line.
    oversized: bool,
    /// A line was read: a byte order mark may start the first one only.
    past_first_line: bool,
    /// Takes the allocations of the unfinished line and event from the budget of buffered
    /// bodies before they grow (see [`Self::hold_in`]).
    held: Option<Held>,
    /// The budget had no room for the event being read: nothing more is read.
    refused: Option<BudgetExhausted>,
    /// An event over [`MAX_EVENT_BYTES`] ends the parse rather than being dropped.
    end_at_oversized: bool,
    /// An event over [`MAX_EVENT_BYTES`] ended the parse: nothing more is read.
    too_large: bool,
    /// Events dropped for size.
    pub dropped: u64,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser at the start of a stream whose events are translated: one over
    /// [`MAX_EVENT_BYTES`] cannot be, and is not dropped in silence (the answer would be missing
    /// a part, a Gemini image, with nothing saying so): it ends the parse, and
    /// [`Self::too_large`] says so, for the stream to end with an error the client sees.
    pub fn ending_at_oversized() -> Self {
        Self {
            end_at_oversized: true,
            ..Self::default()
        }
    }

    /// Whether an event over [`MAX_EVENT_BYTES`] ended the parse
    /// ([`Self::ending_at_oversized`]).
    pub fn too_large(&self) -> bool {
        self.too_large
    }

    /// Whether nothing more is read: the budget had no room, or an event was too large.
    fn stopped(&self) -> bool {
        self.refused.is_some() || self.too_large
    }

    /// Counts what this parser holds between chunks (an unfinished event: up to
    /// [`MAX_EVENT_BYTES`], twice while its last line is joined to it) in the budget of
    /// buffered bodies through `held`: the parser of a stream going to a client, beside
    /// others. One the budget has no room for stops reading ([`Self::refused`]).
    pub fn hold_in(&mut self, held: Held) {
        self.held = Some(held);
    }

    /// Why this parser stopped reading: the budget of buffered bodies had no room for the
    /// event being read.
    pub fn refused(&self) -> Option<BudgetExhausted> {
        self.refused
    }

    /// Feeds one chunk; `on_event` is called for each event it completes.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(Event<'_>)) {
        let mut rest = chunk;
        if self.skip_lf && !rest.is_empty() {
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
            self.skip_lf = false;
        }
        while !self.stopped()
            && let Some(i) = memchr::memchr2(b'\n', b'\r', rest)
        {
            let line = &rest[..i];
            let cr = rest[i] == b'\r';
            rest = &rest[i + 1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            if self.line.is_empty() {
                self.process_line(line, on_event);
                continue;
            }
            // The end of a line an earlier chunk started.
            let mut full = std::mem::take(&mut self.line);
            if full.len() + line.len() + self.data.len() > MAX_EVENT_BYTES {
                full.clear();
                self.line = full;
                self.mark_oversized();
                continue;
            }
            if let Err(e) = buffers::reserve(self.held.as_mut(), &mut full, line.len()) {
                self.refuse(e);
                return;
            }
            full.extend_from_slice(line);
            if let Some(rest) = self.take_first_data(full) {
                self.process_line(&rest, on_event);
                self.line = rest;
                self.line.clear();
                buffers::trim(self.held.as_mut(), &mut self.line, KEEP_BYTES);
            }
        }
        if !rest.is_empty() && !self.stopped() {
            if self.line.len() + rest.len() + self.data.len() > MAX_EVENT_BYTES {
                self.mark_oversized();
            } else if !self.oversized {
                if let Err(e) = buffers::reserve(self.held.as_mut(), &mut self.line, rest.len()) {
                    self.refuse(e);
                    return;
                }
                self.line.extend_from_slice(rest);
            }
        }
    }

    /// The stream ended: an event still open (no blank line after it) is dispatched, since
    /// some upstreams end their last event with the connection.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(Event<'_>)) {
        if self.stopped() {
            return;
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, on_event);
        }
        self.process_line(b"", on_event);
        self.skip_lf = false;
    }

    /// The first data line of an event, carried over chunks, becomes its data where it is
    /// (a Gemini image: megabytes, not copied into a second buffer); another line is given
    /// back to be read.
    fn take_first_data(&mut self, mut line: Vec<u8>) -> Option<Vec<u8>> {
        if self.has_data || self.oversized || !self.past_first_line || !line.starts_with(b"data:") {
            return Some(line);
        }
        let field = if line.get(5) == Some(&b' ') { 6 } else { 5 };
        line.drain(..field);
        let data = String::from_utf8(line)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        // The line's allocation, counted already, is the data's now; the data's own goes.
        let old = std::mem::replace(&mut self.data, data);
        if let Some(h) = self.held.as_mut() {
            h.release(old.capacity() as u64);
        }
        self.has_data = true;
        None
    }

    fn mark_oversized(&mut self) {
        self.oversized = true;
        self.too_large = self.end_at_oversized;
        self.line.clear();
        self.data.clear();
        self.has_data = false;
        buffers::trim(self.held.as_mut(), &mut self.line, KEEP_BYTES);
        buffers::trim(self.held.as_mut(), &mut self.data, KEEP_BYTES);
    }

    /// The budget had no room: what is held is freed (and given back with the guard), and
    /// nothing more is read.
    fn refuse(&mut self, e: BudgetExhausted) {
        self.refused = Some(e);
        self.line = Vec::new();
        self.data = String::new();
        self.has_data = false;
        self.held = None;
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut dyn FnMut(Event<'_>)) {
        // The stream's byte order mark is no part of its first field (as a UTF-8 decoder has it).
        let line = if self.past_first_line {
            line
        } else {
            self.past_first_line = true;
            line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line)
        };
        if line.is_empty() {
            if self.oversized {
                self.oversized = false;
                self.dropped += 1;
            } else if self.has_data {
                on_event(Event {
                    name: &self.name,
                    data: &self.data,
                });
            }
            self.name.clear();
            self.data.clear();
            self.has_data = false;
            buffers::trim(self.held.as_mut(), &mut self.data, KEEP_BYTES);
            return;
        }
        if self.oversized || line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.mark_oversized();
                    return;
                }
                let value = String::from_utf8_lossy(value);
                if let Err(e) =
                    buffers::reserve(self.held.as_mut(), &mut self.data, value.len() + 1)
                {
                    self.refuse(e);
                    return;
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => {
                self.name.clear();
                self.name
                    .push_str(&String::from_utf8_lossy(&value[..value.len().min(256)]));
            }
            // `id` and `retry` matter to reconnecting browsers, not to a translator.
            _ => {}
        }
    }
}

/// Watches an event stream passed through unparsed for its last event, keeping only the
/// stream's last bytes: an OpenAI-format stream's `data: [DONE]`, or an Anthropic Messages
/// stream's `message_stop`. Without it the stream was cut short, or failed in band (Anthropic's
/// `event: error`, after which the stream ends).
#[derive(Debug)]
pub struct DoneWatch {
    tail: [u8; DoneWatch::KEPT],
    len: usize,
    /// The last event is Anthropic's `message_stop` (else OpenAI's `[DONE]`).
    message_stop: bool,
}

impl DoneWatch {
    /// Bytes kept: `data: {"type":"message_stop"}` with room for the line endings and spaces
    /// around it.
    const KEPT: usize = 48;

    /// A watch for an Anthropic Messages stream's last event, `message_stop`.
    pub fn message_stop() -> Self {
        Self {
            message_stop: true,
            ..Self::default()
        }
    }
}

impl Default for DoneWatch {
    /// A watch for an OpenAI-format stream's last event, `data: [DONE]`.
    fn default() -> Self {
        Self {
            tail: [0; Self::KEPT],
            len: 0,
            message_stop: false,
        }
    }
}

impl DoneWatch {
    /// Takes the next bytes of the stream.
    pub fn observe(&mut self, data: &[u8]) {
        if data.len() >= Self::KEPT {
            self.tail.copy_from_slice(&data[data.len() - Self::KEPT..]);
            self.len = Self::KEPT;
            return;
        }
        let keep = (Self::KEPT - data.len()).min(self.len);
        self.tail.copy_within(self.len - keep..self.len, 0);
        self.tail[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }

    /// Whether the stream so far ends with its last event (a `data: [DONE]` line, or the data
    /// line of a `message_stop` event).
    pub fn saw_done(&self) -> bool {
        let tail = self.tail[..self.len].trim_ascii_end();
        if self.message_stop {
            let line = tail
                .iter()
                .rposition(|&b| b == b'\n' || b == b'\r')
                .map_or(tail, |at| &tail[at + 1..]);
            return line.starts_with(b"data:")
                && memchr::memmem::find(line, b"\"message_stop\"").is_some();
        }
        let Some(before) = tail.strip_suffix(b"[DONE]") else {
            return false;
        };
        let before = before.strip_suffix(b" ").unwrap_or(before);
        before
            .strip_suffix(b"data:")
            .is_some_and(|line_start| matches!(line_start.last(), None | Some(b'\n' | b'\r')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut on = |e: Event<'_>| out.push((e.name.to_owned(), e.data.to_owned()));
        for c in chunks {
            p.feed(c, &mut on);
        }
        p.finish(&mut on);
        out
    }

    #[test]
    fn events_are_split_on_blank_lines_with_names_and_multiline_data() {
        let got = parse_chunks(&[
            b"event: message_start\ndata: {\"a\":1}\n\n: comment\ndata: x\ndata: y\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                ("message_start".into(), "{\"a\":1}".into()),
                (String::new(), "x\ny".into())
            ]
        );
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let got = parse_chunks(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(
            got,
            vec![(String::new(), "a".into()), (String::new(), "b".into())]
        );
    }

    #[test]
    fn a_byte_order_mark_starting_the_stream_is_no_part_of_its_first_field() {
        for chunks in [
            &[&b"\xef\xbb\xbfdata: a\n\n"[..]][..],
            &[b"\xef\xbb", b"\xbfdata: a\n\n"],
        ] {
            assert_eq!(parse_chunks(chunks), vec![(String::new(), "a".into())]);
        }
        // Only there.
        assert_eq!(
            parse_chunks(&[b"data: a\n\n\xef\xbb\xbfdata: b\n\n"]),
            vec![(String::new(), "a".into())]
        );
    }

    #[test]
    fn a_last_event_without_blank_line_is_still_delivered() {
        assert_eq!(
            parse_chunks(&[b"data: [DONE]"]),
            vec![(String::new(), "[DONE]".into())]
        );
    }

    #[test]
    fn an_event_larger_than_the_limit_is_dropped_and_the_next_one_kept() {
        let mut p = SseParser::new();
        let mut n = 0;
        let big = vec![b'x'; MAX_EVENT_BYTES / 2];
        p.feed(b"data: ", &mut |_| n += 1);
        for _ in 0..3 {
            p.feed(&big, &mut |_| n += 1);
        }
        p.feed(b"\n\ndata: ok\n\n", &mut |e| {
            assert_eq!(e.data, "ok");
            n += 1;
        });
        assert_eq!((n, p.dropped), (1, 1));
    }

    #[test]
    fn a_parser_for_translation_ends_at_an_event_larger_than_the_limit() {
        let big = vec![b'x'; MAX_EVENT_BYTES / 2];
        // Whether the event grows past the limit within a line or over lines.
        for lines in [false, true] {
            let mut p = SseParser::ending_at_oversized();
            let mut got = Vec::new();
            p.feed(b"data: before\n\ndata: ", &mut |e| {
                got.push(e.data.to_owned())
            });
            for _ in 0..3 {
                p.feed(&big, &mut |e| got.push(e.data.to_owned()));
                if lines {
                    p.feed(b"\ndata: ", &mut |e| got.push(e.data.to_owned()));
                }
            }
            p.feed(b"\n\ndata: after\n\n", &mut |e| got.push(e.data.to_owned()));
            p.finish(&mut |e| got.push(e.data.to_owned()));
            assert_eq!(got, ["before"]);
            assert!(p.too_large() && p.refused().is_none());
        }
        assert!(!SseParser::new().too_large());
    }

    #[test]
    fn an_unfinished_event_is_held_in_the_budget_and_its_allocation_freed_after_it() {
        let budget = crate::buffers::BufferBudget::default();
        let mut p = SseParser::new();
        p.hold_in(budget.guard(64 << 20));
        let mut got = Vec::new();
        let mut on = |e: Event<'_>| got.push(e.data.len());
        p.feed(b"data: {\"a\":1}\n\ndata: ", &mut on);
        let small = budget.held();
        assert!(small > 0 && small < 1024, "{small}");
        let piece = vec![b'x'; 1 << 20];
        for _ in 0..5 {
            p.feed(&piece, &mut on);
        }
        // The line's allocation: 5 MiB, grown a MiB at a time past the first.
        let held = budget.held();
        assert!((5 << 20..=(6 << 20) + 1024).contains(&held), "{held}");
        // Ended, it is the event's data where it is: not held twice.
        p.feed(b"\n", &mut on);
        assert!(budget.held() <= held, "{} held", budget.held());
        p.feed(b"\ndata: b\n\n", &mut on);
        assert_eq!(got, vec![7, 5 << 20, 1]);
        assert!(budget.held() <= small + 256, "{} kept", budget.held());
        assert_eq!(p.refused(), None);
        drop(p);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn an_event_the_budget_has_no_room_for_stops_the_parser_and_frees_it() {
        let budget = crate::buffers::BufferBudget::default();
        let mut other = budget.guard(4 << 20);
        other.grow(1 << 20).expect("fits");
        let mut p = SseParser::new();
        p.hold_in(budget.guard(4 << 20));
        let mut n = 0;
        p.feed(b"data: a\n\ndata: ", &mut |_| n += 1);
        let piece = vec![b'x'; 1 << 20];
        for _ in 0..4 {
            p.feed(&piece, &mut |_| n += 1);
        }
        assert_eq!(p.refused(), Some(BudgetExhausted { limit: 4 << 20 }));
        assert_eq!(budget.held(), 1 << 20, "the parser's share given back");
        p.feed(b"\n\ndata: b\n\n", &mut |_| n += 1);
        p.finish(&mut |_| n += 1);
        assert_eq!(n, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                       cuts in proptest::collection::vec(0usize..2048, 0..16)) {
            let mut p = SseParser::new();
            let mut count = 0usize;
            let mut on = |_e: Event<'_>| count += 1;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut start = 0;
            for c in cuts {
                p.feed(&data[start..c], &mut on);
                start = c;
            }
            p.feed(&data[start..], &mut on);
            p.finish(&mut on);
            prop_assert!(count <= data.len() + 1);
        }

        #[test]
        fn chunk_boundaries_do_not_change_the_events(
            events in proptest::collection::vec(("[a-z_]{0,8}", "[ -~]{0,40}"), 0..8),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..4096, 0..12)) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for (name, data) in &events {
                if !name.is_empty() {
                    text.push_str(&format!("event: {name}{nl}"));
                }
                text.push_str(&format!("data: {data}{nl}{nl}"));
            }
            let bytes = text.as_bytes();
            let whole = parse_chunks(&[bytes]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for c in cuts {
                pieces.push(&bytes[start..c]);
                start = c;
            }
            pieces.push(&bytes[start..]);
            prop_assert_eq!(&parse_chunks(&pieces), &whole);
            let expected: Vec<(String, String)> = events
                .iter()
                .map(|(n, d)| (n.clone(), d.clone()))
                .collect();
            prop_assert_eq!(whole, expected);
        }
    }

    fn watched(chunks: &[&str]) -> bool {
        let mut w = DoneWatch::default();
        for c in chunks {
            w.observe(c.as_bytes());
        }
        w.saw_done()
    }

    #[test]
    fn a_stream_ends_whole_only_with_a_done_line() {
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        assert!(watched(&[chunk, "data: [DONE]\n\n"]));
        assert!(watched(&[chunk, "data:[DONE]\r\n\r\n"]));
        assert!(watched(&[chunk, "data: [DONE]"]));
        // Cut anywhere, in pieces as small as a byte.
        let whole = format!("{chunk}data: [DONE]\n\n");
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        assert!(watched(
            &bytes.iter().map(String::as_str).collect::<Vec<_>>()
        ));
        assert!(!watched(&[]));
        assert!(!watched(&[chunk]));
        assert!(!watched(&[chunk, "data: [DO"]));
        assert!(!watched(&["data: {\"content\":\"data: [DONE]\"}\n\n"]));
        assert!(!watched(&["data: {\"content\":\"x data: [DONE]"]));
        assert!(!watched(&["data: [DONE]\n\n", chunk]));
    }

    #[test]
    fn an_anthropic_stream_ends_whole_only_with_message_stop() {
        let watched = |chunks: &[&str]| {
            let mut w = DoneWatch::message_stop();
            for c in chunks {
                w.observe(c.as_bytes());
            }
            w.saw_done()
        };
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(watched(&[delta, stop]));
        assert!(watched(&[
            delta,
            "event: message_stop\r\ndata: {\"type\": \"message_stop\"}"
        ]));
        let whole = format!("{delta}{stop}");
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        assert!(watched(
            &bytes.iter().map(String::as_str).collect::<Vec<_>>()
        ));
        // Cut short, or failed in band (the stream ends after its error event).
        assert!(!watched(&[delta]));
        assert!(!watched(&[delta, "event: message_stop\n"]));
        assert!(!watched(&[
            delta,
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
        ]));
        assert!(!watched(&[stop, delta]));
        // `data: [DONE]` is OpenAI's end, not this one.
        assert!(!watched(&[delta, "data: [DONE]\n\n"]));
    }
}
