//! Decoder of AWS's binary event-stream framing (`application/vnd.amazon.eventstream`), as
//! Bedrock's ConverseStream sends it. Each message:
//!
//! ```text
//! total length u32 | headers length u32 | prelude CRC32 u32 | headers | payload | message CRC32 u32
//! ```
//!
//! all big-endian; a header is `name length u8 | name | type u8 | value`. Fed at arbitrary
//! chunk boundaries, the decoder keeps at most one unfinished message.

use bytes::{Buf, Bytes, BytesMut};

use crate::buffers::{BudgetExhausted, Held};

/// Largest message accepted (AWS caps payloads at 16 MiB; headers at 128 KiB).
pub const MAX_MESSAGE_BYTES: usize = (16 << 20) + (128 << 10);
const PRELUDE: usize = 12;
const MIN_MESSAGE: usize = PRELUDE + 4;
/// A message longer than this gets an allocation of its own, freed once it is decoded (not
/// kept for the rest of the stream).
const OWN_ALLOCATION: usize = 64 << 10;

/// A header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(Bytes),
    String(String),
    Timestamp(i64),
    Uuid([u8; 16]),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Headers in wire order.
    pub headers: Vec<(String, HeaderValue)>,
    /// The payload (JSON for Bedrock).
    pub payload: Bytes,
}

impl Message {
    /// A string header's value.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|(n, v)| match v {
            HeaderValue::String(s) if n == name => Some(s.as_str()),
            _ => None,
        })
    }

    /// The model's own event inside an InvokeModelWithResponseStream `chunk` event: its
    /// payload's `{"bytes": "<base64>"}` decoded; `None` for other events.
    pub fn invoke_chunk(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        #[derive(serde::Deserialize)]
        struct Chunk {
            bytes: String,
        }
        if self.header_str(":event-type") != Some("chunk") {
            return None;
        }
        let chunk: Chunk = serde_json::from_slice(&self.payload).ok()?;
        base64::engine::general_purpose::STANDARD
            .decode(chunk.bytes)
            .ok()
    }
}

/// Why the byte stream is not a valid event stream; the framing is lost after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event-stream message length {0} out of range")]
    Length(u32),
    #[error("event-stream prelude checksum mismatch")]
    PreludeCrc,
    #[error("event-stream message checksum mismatch")]
    MessageCrc,
    #[error("event-stream header malformed: {0}")]
    Header(&'static str),
}

/// Incremental decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    failed: bool,
    /// Takes an unfinished message's length from the budget of buffered bodies (see
    /// [`Self::hold_in`]).
    held: Option<Held>,
    /// The budget had no room for the message being read: nothing more is decoded.
    refused: Option<BudgetExhausted>,
    /// Messages longer than this are skipped, not kept (see [`Self::skipping_past`]).
    skip_past: Option<usize>,
    /// Bytes of a skipped message still to come.
    skipping: usize,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts the message this decoder holds unfinished between chunks (up to
    /// [`MAX_MESSAGE_BYTES`]) in the budget of buffered bodies through `held`, from when its
    /// prelude tells its length. One the budget has no room for stops decoding
    /// ([`Self::refused`]).
    pub fn hold_in(&mut self, held: Held) {
        self.held = Some(held);
    }

    /// Why this decoder stopped: the budget of buffered bodies had no room for the message
    /// being read.
    pub fn refused(&self) -> Option<BudgetExhausted> {
        self.refused
    }

    /// A decoder that skips the messages longer than `limit`, keeping none of their bytes:
    /// a reader that wants only small messages (a stream's usage) holds at most `limit`.
    pub fn skipping_past(limit: usize) -> Self {
        Self {
            skip_past: Some(limit),
            ..Self::default()
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.failed {
            return;
        }
        let skipped = self.skipping.min(chunk.len());
        self.skipping -= skipped;
        self.buf.extend_from_slice(&chunk[skipped..]);
    }

    /// Bytes received but not yet part of a complete message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `None` when more bytes are needed (or after an error).
    pub fn next_message(&mut self) -> Option<Result<Message, DecodeError>> {
        if self.failed || self.buf.len() < PRELUDE {
            return None;
        }
        let total = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let headers_len =
            u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        let prelude_crc =
            u32::from_be_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]]);
        if crc32fast::hash(&self.buf[..8]) != prelude_crc {
            return Some(Err(self.fail(DecodeError::PreludeCrc)));
        }
        let total_len = total as usize;
        if !(MIN_MESSAGE..=MAX_MESSAGE_BYTES).contains(&total_len)
            || headers_len > total_len - MIN_MESSAGE
        {
            return Some(Err(self.fail(DecodeError::Length(total))));
        }
        if self.skip_past.is_some_and(|limit| total_len > limit) {
            let here = total_len.min(self.buf.len());
            self.skipping = total_len - here;
            self.buf.advance(here);
            return self.next_message();
        }
        if self.buf.len() < total_len {
            if let Err(e) = self.hold(total_len) {
                self.refused = Some(e);
                self.fail(DecodeError::Length(total));
            }
            return None;
        }
        let frame = self.buf.split_to(total_len).freeze();
        if total_len > OWN_ALLOCATION {
            // The rest in an allocation of its own: the message's goes with it.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        if let Some(h) = &mut self.held {
            h.release(h.bytes());
        }
        let body_end = total_len - 4;
        let message_crc = u32::from_be_bytes([
            frame[body_end],
            frame[body_end + 1],
            frame[body_end + 2],
            frame[body_end + 3],
        ]);
        if crc32fast::hash(&frame[..body_end]) != message_crc {
            return Some(Err(self.fail(DecodeError::MessageCrc)));
        }
        let headers = match parse_headers(frame.slice(PRELUDE..PRELUDE + headers_len)) {
            Ok(h) => h,
            Err(e) => return Some(Err(self.fail(e))),
        };
        Some(Ok(Message {
            headers,
            payload: frame.slice(PRELUDE + headers_len..body_end),
        }))
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.failed = true;
        self.buf = BytesMut::new();
        self.held = None;
        e
    }

    /// Room for the whole of an unfinished message of `total` bytes, taken from the budget
    /// before it is allocated.
    fn hold(&mut self, total: usize) -> Result<(), BudgetExhausted> {
        if let Some(h) = &mut self.held
            && h.bytes() < total as u64
        {
            h.grow(total as u64 - h.bytes())?;
        }
        if self.buf.capacity() < total {
            if total > OWN_ALLOCATION {
                let mut room = BytesMut::with_capacity(total);
                room.extend_from_slice(&self.buf);
                self.buf = room;
            } else {
                self.buf.reserve(total - self.buf.len());
            }
        }
        Ok(())
    }
}

fn take(b: &mut Bytes, n: usize) -> Result<Bytes, DecodeError> {
    if b.remaining() < n {
        return Err(DecodeError::Header("value runs past the headers"));
    }
    Ok(b.split_to(n))
}

fn parse_headers(mut b: Bytes) -> Result<Vec<(String, HeaderValue)>, DecodeError> {
    let mut out = Vec::new();
    while b.has_remaining() {
        let name_len = usize::from(take(&mut b, 1)?[0]);
        let name = take(&mut b, name_len)?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| DecodeError::Header("name is not UTF-8"))?;
        let kind = take(&mut b, 1)?[0];
        let value = match kind {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(take(&mut b, 1)?.get_i8()),
            3 => HeaderValue::Short(take(&mut b, 2)?.get_i16()),
            4 => HeaderValue::Int(take(&mut b, 4)?.get_i32()),
            5 => HeaderValue::Long(take(&mut b, 8)?.get_i64()),
            6 | 7 => {
                let len = usize::from(take(&mut b, 2)?.get_u16());
                let v = take(&mut b, len)?;
                if kind == 6 {
                    HeaderValue::Bytes(v)
                } else {
                    HeaderValue::String(
                        String::from_utf8(v.to_vec())
                            .map_err(|_| DecodeError::Header("string value is not UTF-8"))?,
                    )
                }
            }
            8 => HeaderValue::Timestamp(take(&mut b, 8)?.get_i64()),
            9 => {
                let v = take(&mut b, 16)?;
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(&v);
                HeaderValue::Uuid(uuid)
            }
            _ => return Err(DecodeError::Header("unknown value type")),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Encodes a message with string headers (tests and benchmarks; the mock has its own).
pub fn encode(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (PRELUDE + h.len() + payload.len() + 4) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(d: &mut Decoder) -> Vec<Result<Message, DecodeError>> {
        std::iter::from_fn(|| d.next_message()).collect()
    }

    #[test]
    fn decodes_a_converse_stream_event_split_anywhere() {
        let msg = encode(
            &[
                (":event-type", "contentBlockDelta"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            br#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#,
        );
        for cut in 0..msg.len() {
            let mut d = Decoder::new();
            d.push(&msg[..cut]);
            assert!(drain(&mut d).is_empty(), "cut {cut}");
            d.push(&msg[cut..]);
            let got = drain(&mut d);
            assert_eq!(got.len(), 1);
            let m = got[0].as_ref().expect("message");
            assert_eq!(m.header_str(":event-type"), Some("contentBlockDelta"));
            assert_eq!(
                &m.payload[..],
                br#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#
            );
        }
    }

    #[test]
    fn a_flipped_bit_is_a_checksum_error_and_stops_the_decoder() {
        let mut msg = encode(&[(":message-type", "event")], b"{}");
        let last = msg.len() - 6;
        msg[last] ^= 1;
        let mut d = Decoder::new();
        d.push(&msg);
        d.push(&encode(&[], b"{}"));
        let got = drain(&mut d);
        assert_eq!(got, vec![Err(DecodeError::MessageCrc)]);
    }

    #[test]
    fn all_header_value_types_decode() {
        let mut h = Vec::new();
        for (kind, value) in [
            (0u8, vec![]),
            (1, vec![]),
            (2, vec![0xff]),
            (3, vec![0, 7]),
            (4, vec![0, 0, 0, 9]),
            (5, vec![0; 8]),
            (6, vec![0, 2, 1, 2]),
            (8, vec![0; 8]),
            (9, vec![3; 16]),
        ] {
            h.extend_from_slice(&[1, b'a' + kind, kind]);
            h.extend_from_slice(&value);
        }
        let headers = parse_headers(Bytes::from(h)).expect("headers");
        assert_eq!(headers.len(), 9);
        assert_eq!(headers[2].1, HeaderValue::Byte(-1));
        assert_eq!(
            headers[6].1,
            HeaderValue::Bytes(Bytes::from_static(&[1, 2]))
        );
    }

    #[test]
    fn an_unfinished_message_is_held_in_the_budget_or_refused() {
        let payload = vec![b'x'; 3 << 20];
        let msg = encode(&[(":event-type", "chunk")], &payload);
        let budget = crate::buffers::BufferBudget::default();
        let mut d = Decoder::new();
        d.hold_in(budget.guard(8 << 20));
        d.push(&msg[..100]);
        assert!(drain(&mut d).is_empty());
        // Its whole length, from its prelude on; given back once it is decoded.
        assert_eq!(budget.held(), msg.len() as u64);
        for piece in msg[100..].chunks(64 << 10) {
            d.push(piece);
            let got = drain(&mut d);
            assert!(got.iter().all(Result::is_ok));
        }
        assert_eq!((d.pending(), budget.held()), (0, 0));
        // No room: the decoder stops, holding nothing.
        let mut other = budget.guard(8 << 20);
        other.grow(6 << 20).expect("fits");
        d.push(&msg[..100]);
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.refused(), Some(BudgetExhausted { limit: 8 << 20 }));
        assert_eq!((d.pending(), budget.held()), (0, 6 << 20));
        d.push(&msg[100..]);
        assert!(drain(&mut d).is_empty());
    }

    #[test]
    fn a_decoder_skipping_long_messages_keeps_none_of_their_bytes() {
        let long = encode(&[(":event-type", "chunk")], &vec![b'x'; 100_000]);
        let short = encode(&[(":event-type", "chunk")], b"{}");
        let stream = [&short[..], &long, &short, &long, &long, &short].concat();
        for piece in [1000, 7, stream.len()] {
            let mut d = Decoder::skipping_past(1000);
            let mut got = Vec::new();
            for p in stream.chunks(piece) {
                d.push(p);
                assert!(d.pending() <= 1000 + piece, "{} pending", d.pending());
                got.extend(drain(&mut d));
            }
            let payloads: Vec<_> = got
                .into_iter()
                .map(|m| m.expect("message").payload)
                .collect();
            assert_eq!(
                payloads,
                vec![Bytes::from_static(b"{}"); 3],
                "pieces of {piece}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024),
                                       cut in 0usize..1024) {
            let mut d = Decoder::new();
            let cut = cut.min(data.len());
            d.push(&data[..cut]);
            let mut n = drain(&mut d).len();
            d.push(&data[cut..]);
            n += drain(&mut d).len();
            prop_assert!(n <= data.len() / MIN_MESSAGE + 1);
        }

        #[test]
        fn valid_messages_survive_any_chunking(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..6),
            cuts in proptest::collection::vec(0usize..512, 0..10)) {
            let mut bytes = Vec::new();
            for p in &payloads {
                bytes.extend(encode(&[(":event-type", "x")], p));
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut d = Decoder::new();
            let mut got = Vec::new();
            let mut start = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                d.push(&bytes[start..c]);
                start = c;
                got.extend(drain(&mut d));
            }
            let got: Vec<Vec<u8>> = got.into_iter().map(|m| m.map(|m| m.payload.to_vec())).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, payloads);
        }
    }
}
