//! The chunked transfer coding (RFC 9112 §7.1), decoded as bytes arrive, strictly: every line
//! ends in CRLF, a size is at most 16 hex digits, extensions and trailers are bounded. Framing
//! two readers could read differently is how requests are smuggled (hyper, for one, reads a
//! bare LF in trailers as a trailer byte and takes the next pipelined request with it), so
//! whatever is not exactly well framed is refused, never guessed at. Extensions and trailers
//! are read and dropped. Used for upstream answers ([`crate::upstream`]) and client requests
//! ([`crate::server`]).

use bytes::BytesMut;

/// Largest trailer section read.
pub const MAX_TRAILERS: usize = 64 * 1024;
/// Longest chunk extension read (hyper's 16 KiB, over a whole body there): a line that never
/// ends would be read until the timeout.
pub const MAX_CHUNK_EXTENSION: usize = 16 * 1024;

/// Why chunked framing was refused.
pub type Malformed = &'static str;

/// Decoder states.
#[derive(Clone, Copy, Debug)]
pub enum Chunked {
    /// Reading the hex size.
    Size { size: u64, digits: u8 },
    /// Whitespace after the size: more, an extension's `;`, or CR.
    SizeWs { size: u64, len: u16 },
    /// An extension after the size, up to CR.
    Ext { size: u64, len: u16 },
    /// LF after the size line.
    SizeLf { size: u64 },
    /// Chunk data, `left` bytes to go.
    Data { left: u64 },
    /// CR after data.
    DataCr,
    /// LF after data.
    DataLf,
    /// Trailer section: bytes on the current line, bytes seen in all.
    Trailers { line: usize, total: usize },
    /// LF after a trailer line (or the empty line ending them, `line` 0).
    TrailerLf { line: usize, total: usize },
    /// Done.
    End,
}

impl Chunked {
    /// Before the first chunk.
    pub const START: Self = Self::Size { size: 0, digits: 0 };
}

/// Where decoded chunk data goes.
pub trait Sink {
    fn put(&mut self, data: &[u8]);
}

impl Sink for BytesMut {
    fn put(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Counted only: the framing is checked, the data taken later, once it is whole.
impl Sink for usize {
    fn put(&mut self, data: &[u8]) {
        *self += data.len();
    }
}

/// Decodes what `bytes` holds from `state` on, giving chunk data to `out`: how many bytes it
/// read, and whether the last chunk and the trailers have all been read (then nothing after
/// them is read).
pub fn decode(
    state: &mut Chunked,
    bytes: &[u8],
    out: &mut impl Sink,
) -> Result<(usize, bool), Malformed> {
    let mut i = 0;
    loop {
        if matches!(state, Chunked::End) {
            return Ok((i, true));
        }
        if i >= bytes.len() {
            return Ok((i, false));
        }
        // The common case, a whole chunk at hand (`1a\r\n`, data, `\r\n`), in one step; the
        // rest (extensions, the last chunk, a chunk cut by the read) byte by byte below.
        if let Chunked::Size { size: 0, digits: 0 } = *state
            && let Some((data_at, size)) = size_line(&bytes[i..])
            && let Some(end) = data_at.checked_add(size)
            && bytes[i..].get(end..end + 2) == Some(b"\r\n")
        {
            out.put(&bytes[i + data_at..i + end]);
            i += end + 2;
            continue;
        }
        if let Chunked::Data { left } = *state {
            let n = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
            out.put(&bytes[i..i + n]);
            i += n;
            let left = left - n as u64;
            *state = if left == 0 {
                Chunked::DataCr
            } else {
                Chunked::Data { left }
            };
            continue;
        }
        let b = bytes[i];
        i += 1;
        *state = match *state {
            Chunked::Size { size, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits >= 16 {
                        return Err("chunk size");
                    }
                    Chunked::Size {
                        size: size << 4 | u64::from(hex(b)),
                        digits: digits + 1,
                    }
                }
                b'\r' if digits > 0 => Chunked::SizeLf { size },
                b';' if digits > 0 => Chunked::Ext { size, len: 1 },
                // `BWS` before an extension (RFC 9112 §7.1.1): nothing else may follow it, or
                // `48 5` would be 0x48 here and 0x485 to a reader that drops the space.
                b' ' | b'\t' if digits > 0 => Chunked::SizeWs { size, len: 1 },
                _ => return Err("chunk size"),
            },
            Chunked::SizeWs { size, len } => match b {
                b'\r' => Chunked::SizeLf { size },
                b';' => Chunked::Ext { size, len: len + 1 },
                _ if usize::from(len) >= MAX_CHUNK_EXTENSION => {
                    return Err("chunk extension too long");
                }
                b' ' | b'\t' => Chunked::SizeWs { size, len: len + 1 },
                _ => return Err("chunk size"),
            },
            Chunked::Ext { size, len } => match b {
                b'\r' => Chunked::SizeLf { size },
                b'\n' => return Err("chunk extension"),
                _ if usize::from(len) >= MAX_CHUNK_EXTENSION => {
                    return Err("chunk extension too long");
                }
                _ => Chunked::Ext { size, len: len + 1 },
            },
            Chunked::SizeLf { size } => match b {
                b'\n' if size == 0 => Chunked::Trailers { line: 0, total: 0 },
                b'\n' => Chunked::Data { left: size },
                _ => return Err("chunk size line"),
            },
            Chunked::DataCr => match b {
                b'\r' => Chunked::DataLf,
                _ => return Err("chunk data"),
            },
            Chunked::DataLf => match b {
                b'\n' => Chunked::START,
                _ => return Err("chunk data"),
            },
            Chunked::Trailers { line, total } => {
                if total >= MAX_TRAILERS {
                    return Err("trailers too large");
                }
                let total = total + 1;
                match b {
                    b'\r' => Chunked::TrailerLf { line, total },
                    b'\n' => return Err("bare LF in trailers"),
                    // A folded line (obsolete, RFC 9112 §5.2) would read as part of the last.
                    b' ' | b'\t' if line == 0 => return Err("folded trailer line"),
                    b'\t' | b' '..=0x7e | 0x80.. => Chunked::Trailers {
                        line: line + 1,
                        total,
                    },
                    _ => return Err("control character in trailers"),
                }
            }
            Chunked::TrailerLf { line, total } => match b {
                b'\n' if line == 0 => Chunked::End,
                b'\n' => Chunked::Trailers { line: 0, total },
                _ => return Err("bare CR in trailers"),
            },
            Chunked::Data { .. } | Chunked::End => unreachable!("handled above"),
        };
    }
}

/// The size of the one data chunk of `wire`, a whole chunked body already checked, and where
/// its data starts; `None` when it has another number of chunks.
pub fn single(wire: &[u8]) -> Option<(usize, usize)> {
    let (at, size) = size_line(wire)?;
    let last = wire.get(at + size + 2..)?;
    let zeros = last.iter().take_while(|&&b| b == b'0').count();
    (zeros > 0 && matches!(last.get(zeros), Some(b'\r' | b';' | b' ' | b'\t')))
        .then_some((size, at))
}

/// The value of hex digit `b`.
fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// A chunk-size line of hex digits alone (no extension) at the start of `bytes`, of a chunk
/// other than the last: where its data starts and its size.
fn size_line(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut size = 0usize;
    // At most 15 digits: the size fits a `usize`, and longer lines take the slow path.
    for (i, &b) in bytes.iter().enumerate().take(16) {
        match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if i < 15 => {
                size = size << 4 | usize::from(hex(b));
            }
            b'\r' if i > 0 && size > 0 => {
                return (bytes.get(i + 1) == Some(&b'\n')).then_some((i + 2, size));
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in those parts: the data, whether it ended, and the bytes read.
    fn decode_all(input: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), Malformed> {
        let mut state = Chunked::START;
        let mut out = BytesMut::new();
        let (mut done, mut read) = (false, 0);
        let mut buf = BytesMut::new();
        for part in input {
            buf.extend_from_slice(part);
            let (used, end) = decode(&mut state, &buf, &mut out)?;
            let _ = buf.split_to(used);
            read += used;
            done = end;
        }
        Ok((out.to_vec(), done, read))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire: &[u8] =
            b"5\r\nhello\r\n6 \t;ext=1\r\n world\r\n2  \r\n!!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..wire.len() {
            let (out, done, _) = decode_all(&[&wire[..split], &wire[split..]]).expect("valid");
            assert_eq!(out, b"hello world!!", "split at {split}");
            assert!(done, "split at {split}");
        }
        let (out, done, _) = decode_all(&[b"A\r\n0123456789\r\n"]).expect("valid");
        assert_eq!(out, b"0123456789");
        assert!(!done);
        // Whole chunks in a row (the one-step path, up to 15 digits), a size of 16 digits
        // (byte by byte), and the last chunk.
        let wire: &[u8] =
            b"3\r\nabc\r\n000000000000002\r\nde\r\n0000000000000001\r\nf\r\n0A\r\n0123456789\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let (out, done, _) = decode_all(&[&wire[..split], &wire[split..]]).expect("valid");
            assert_eq!(out, b"abcdef0123456789", "split at {split}");
            assert!(done, "split at {split}");
        }
    }

    #[test]
    fn a_body_of_one_chunk_is_told_with_its_data() {
        assert_eq!(single(b"5\r\nhello\r\n0\r\n\r\n"), Some((5, 3)));
        assert_eq!(
            single(b"5\r\nhello\r\n00;x\r\nx-t: 1\r\n\r\n"),
            Some((5, 3))
        );
        assert_eq!(single(b"5\r\nhello\r\n10\r\n"), None);
        assert_eq!(single(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"), None);
        assert_eq!(single(b"0\r\n\r\n"), None);
    }

    #[test]
    fn nothing_after_the_end_is_read() {
        let wire = b"2\r\nhi\r\n0\r\nx-t: 1\r\nx-u:\r\n\r\nGET / HTTP/1.1\r\n";
        let (out, done, read) = decode_all(&[wire]).expect("valid");
        assert_eq!((&out[..], done), (&b"hi"[..], true));
        assert_eq!(&wire[read..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn malformed_framing_is_refused() {
        for (bad, why) in [
            (&b"x\r\n"[..], "chunk size"),
            (b"\r\n", "chunk size"),
            (b" 5\r\n", "chunk size"),
            (b"-1\r\n", "chunk size"),
            (b"5\r\nhelloXX", "chunk data"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data"),
            (b"5\n", "chunk size"),
            (b"5;a\n", "chunk extension"),
            (b"5\rx", "chunk size line"),
            // Whitespace after a size, then anything but an extension or the line's end.
            (b"48 5\r\n", "chunk size"),
            (b"48\tx\r\n", "chunk size"),
            (b"48 \t=1\r\n", "chunk size"),
            (b"48 a;b\r\n", "chunk size"),
            (b"11111111111111111\r\n", "chunk size"),
            (
                &[&b"1;"[..], &[b'a'; MAX_CHUNK_EXTENSION]].concat(),
                "chunk extension too long",
            ),
            // Trailers: each line ends in CRLF, none folded or with control characters.
            (b"0\r\nx-t: 1\n\r\n", "bare LF in trailers"),
            (b"0\r\nx-t: 1\n\n", "bare LF in trailers"),
            (b"0\r\n\n", "bare LF in trailers"),
            (b"0\r\nx-t: 1\rx", "bare CR in trailers"),
            (b"0\r\nx-t: 1\r\n folded\r\n\r\n", "folded trailer line"),
            (b"0\r\nx-t: a\x00b\r\n\r\n", "control character in trailers"),
            (
                &[&b"0\r\nx-t: "[..], &[b'a'; MAX_TRAILERS]].concat(),
                "trailers too large",
            ),
        ] {
            assert_eq!(
                decode_all(&[bad]).map(|_| ()),
                Err(why),
                "{}",
                String::from_utf8_lossy(&bad[..bad.len().min(40)])
            );
        }
    }
}
