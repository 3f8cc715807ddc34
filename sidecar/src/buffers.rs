//! The process-wide budget of bytes held in buffered bodies: request bodies read whole,
//! responses held back whole (DLP or guardrail response checks, `/compat` JSON translation),
//! cache fills, and the unfinished events a stream's translation (`/compat`) or usage filter
//! holds between frames ([`reserve`]). Each of them alone is bounded
//! (`spec.limits.maxRequestBody`, the hold limits, the largest event), but not their sum over
//! concurrent requests: without this budget a few dozen large requests at once take the
//! sidecar past its container's memory limit, and its OOM kill ends every stream of the pod. With it, a request that does not fit is refused (`503`/2110,
//! `Retry-After: 1`) and the rest go on.
//!
//! Bytes are taken as they arrive ([`Held::grow`]), one compare-and-swap on a shared atomic per
//! buffered frame, and given back when the [`Held`] guard holding them drops — whatever ends
//! the request: success, refusal, error or the client going away. Bodies streamed through take
//! nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Default budget (`spec.limits.maxBufferedBytes`): 64 MiB. The injected sidecar container's
/// default memory limit is 256Mi and the sidecar idles at ~25 MB; a buffered body can briefly
/// cost up to about twice its size (a body joined from frames, a response and its translation
/// or the text a check extracts from it), so 64 MiB of accounted bytes stays well under the
/// limit with room for streams, connections and the cache.
pub const DEFAULT_MAX_BUFFERED: u64 = 64 << 20;

/// Most bytes allocated up front for a body from the length it declares (`Content-Length`):
/// a body up to this is allocated once, at its size; past it, the buffer grows as its bytes
/// arrive. A declaration is the sender's word, not bytes: one request declaring 500 TB under a
/// large `maxRequestBody` must not make the sidecar ask for 500 TB (an allocation failure
/// aborts the process, and every stream of the pod with it).
pub const MAX_PRESIZE: usize = 8 << 20;

/// The capacity to allocate up front for a body declaring `declared` bytes (see
/// [`MAX_PRESIZE`]).
pub fn presize(declared: u64) -> usize {
    usize::try_from(declared).map_or(MAX_PRESIZE, |n| n.min(MAX_PRESIZE))
}

/// The bytes held in buffered bodies now, shared by every request of the process; its metrics
/// are `sidegate_buffered_bytes` (the gauge is the account itself) and
/// `sidegate_buffer_refusals_total`.
#[derive(Clone, Debug, Default)]
pub struct BufferBudget(Arc<Account>);

#[derive(Debug, Default)]
struct Account {
    held: Gauge,
    refused: Counter,
}

/// A buffered body did not fit in the budget of `limit` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetExhausted {
    /// The budget, in bytes.
    pub limit: u64,
}

impl BudgetExhausted {
    /// The error the client gets: 503/2110 with `Retry-After: 1`.
    pub fn into_gateway_error(self) -> crate::error::GatewayError {
        crate::error::GatewayError::BuffersFull { limit: self.limit }
    }
}

impl BufferBudget {
    /// A budget whose account is `held` (bytes held now) and whose refusals count in `refused`.
    pub fn new(held: Gauge, refused: Counter) -> Self {
        Self(Arc::new(Account { held, refused }))
    }

    /// A guard holding nothing yet, taking from this budget up to `limit` bytes in all (the
    /// limit of the config the request started with, so a reload applies to new requests).
    pub fn guard(&self, limit: u64) -> Held {
        Held {
            budget: self.clone(),
            limit,
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        u64::try_from(self.0.held.get()).unwrap_or(0)
    }

    /// Takes `n` bytes if the total stays within `limit`.
    fn take(&self, n: u64, limit: u64) -> Result<(), BudgetExhausted> {
        let Ok(n) = i64::try_from(n) else {
            return Err(self.refuse(limit));
        };
        let max = i64::try_from(limit).unwrap_or(i64::MAX);
        let held = self.0.held.inner();
        let mut now = held.load(Ordering::Relaxed);
        loop {
            if now.saturating_add(n) > max {
                return Err(self.refuse(limit));
            }
            match held.compare_exchange_weak(now, now + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => now = actual,
            }
        }
    }

    fn refuse(&self, limit: u64) -> BudgetExhausted {
        self.0.refused.inc();
        BudgetExhausted { limit }
    }

    fn give_back(&self, n: u64) {
        self.0.held.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// What a JSON value costs in memory once parsed into a `serde_json::Value` tree beyond its
/// text, about: the `Value` itself, its slot in an array or map entry, and an allocation for a
/// key or string (measured: 40 to 75 bytes a value on the paths that parse). `[0,0,0,...]`
/// grows ~30x when parsed.
const PARSED_VALUE_BYTES: u64 = 80;

/// The memory a JSON body takes when parsed into a tree, beyond its own bytes: one
/// [`PARSED_VALUE_BYTES`] per separator or opener (`,` `:` `[` `{`: each value has one, or
/// more) outside strings. A string is one value whatever it holds (code, CSV, base64), so the
/// scan jumps over each to its closing quote.
pub fn parse_overhead(body: &[u8]) -> u64 {
    let marks = |part: &[u8]| {
        part.iter()
            .filter(|&&b| matches!(b, b',' | b':' | b'[' | b'{'))
            .count()
    };
    let mut count = 0;
    let mut rest = body;
    while let Some(open) = memchr::memchr(b'"', rest) {
        count += marks(&rest[..open]);
        rest = &rest[open + 1..];
        // To the closing quote, past escaped characters.
        loop {
            match memchr::memchr2(b'"', b'\\', rest) {
                Some(at) if rest[at] == b'\\' => rest = rest.get(at + 2..).unwrap_or_default(),
                Some(at) => {
                    rest = &rest[at + 1..];
                    break;
                }
                None => rest = &[],
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    count += marks(rest);
    u64::try_from(count)
        .unwrap_or(u64::MAX)
        .saturating_mul(PARSED_VALUE_BYTES)
}

/// Bytes of one buffered body taken from the [`BufferBudget`]; given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: BufferBudget,
    limit: u64,
    bytes: u64,
}

impl Held {
    /// Takes `n` more bytes, or refuses (counted in `sidegate_buffer_refusals_total`) when
    /// the budget has no room for them; what this guard holds already stays held.
    pub fn grow(&mut self, n: u64) -> Result<(), BudgetExhausted> {
        if n == 0 {
            return Ok(());
        }
        self.budget.take(n, self.limit)?;
        self.bytes += n;
        Ok(())
    }

    /// Refuses now (counted like [`Self::grow`]) when `n` more bytes would not fit: a declared
    /// length refused before any of it is read. Not a reservation: [`Self::grow`] decides.
    pub fn check_room(&self, n: u64) -> Result<(), BudgetExhausted> {
        if n == 0 || self.budget.held().saturating_add(n) <= self.limit {
            Ok(())
        } else {
            Err(self.budget.refuse(self.limit))
        }
    }

    /// Takes room for parsing `body` into a JSON tree (see [`parse_overhead`]) before it is
    /// parsed: a body the byte limits let through may hold millions of tiny values. One whose
    /// bytes and tree could never fit together is 413/2102; one that does not fit now is
    /// [`Self::grow`]'s 503/2110.
    pub fn reserve_parse(&mut self, body: &[u8]) -> Result<(), crate::error::GatewayError> {
        let n = parse_overhead(body);
        if n.saturating_add(body.len() as u64) > self.limit {
            self.budget.refuse(self.limit);
            return Err(crate::error::GatewayError::BodyTooComplex { limit: self.limit });
        }
        self.grow(n).map_err(BudgetExhausted::into_gateway_error)
    }

    /// Bytes this guard holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back `n` of the bytes this guard holds (a buffer it accounts for shrank).
    pub fn release(&mut self, n: u64) {
        let n = n.min(self.bytes);
        if n > 0 {
            self.budget.give_back(n);
            self.bytes -= n;
        }
    }

    /// Takes over what `other` holds (one guard for a body made of several).
    pub fn absorb(&mut self, mut other: Held) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

/// A buffer kept between the frames of a stream (an unfinished event), whose allocation a
/// [`Held`] accounts for: see [`reserve`].
pub trait HeldBuffer: Default {
    /// Bytes allocated.
    fn allocated(&self) -> usize;
    /// Bytes in use.
    fn used(&self) -> usize;
    /// Allocates room for `additional` more bytes in use, no more.
    fn allocate(&mut self, additional: usize);
}

impl HeldBuffer for Vec<u8> {
    fn allocated(&self) -> usize {
        self.capacity()
    }
    fn used(&self) -> usize {
        self.len()
    }
    fn allocate(&mut self, additional: usize) {
        self.reserve_exact(additional);
    }
}

impl HeldBuffer for String {
    fn allocated(&self) -> usize {
        self.capacity()
    }
    fn used(&self) -> usize {
        self.len()
    }
    fn allocate(&mut self, additional: usize) {
        self.reserve_exact(additional);
    }
}

/// How a held buffer grows ([`reserve`]): doubling, from at least this many bytes...
const MIN_GROWTH: usize = 64;
/// ...up to this step, then by this much at a time: its allocation exceeds what it holds by at
/// most this (a doubling 6 MiB event would take 8).
const MAX_GROWTH: usize = 1 << 20;

/// Makes room in `buf` for `extra` more bytes; with `held`, the allocation it grows to is
/// taken from the budget first (so a stream holding a long unfinished event is refused before
/// its memory is taken, not after). Refused, `buf` is as it was.
pub fn reserve(
    held: Option<&mut Held>,
    buf: &mut impl HeldBuffer,
    extra: usize,
) -> Result<(), BudgetExhausted> {
    let (capacity, len) = (buf.allocated(), buf.used());
    let needed = len.saturating_add(extra);
    if needed <= capacity {
        return Ok(());
    }
    let target = needed.max(capacity.saturating_add(capacity.clamp(MIN_GROWTH, MAX_GROWTH)));
    if let Some(h) = held {
        h.grow((target - capacity) as u64)?;
    }
    buf.allocate(target - len);
    Ok(())
}

/// Frees the allocation of an emptied `buf` when it is larger than `keep` (a big event passed:
/// its capacity is not kept for the rest of the stream), giving it back to the budget.
pub fn trim(held: Option<&mut Held>, buf: &mut impl HeldBuffer, keep: usize) {
    if buf.used() == 0 && buf.allocated() > keep {
        let freed = std::mem::take(buf).allocated();
        if let Some(h) = held {
            h.release(freed as u64);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_room_is_counted_by_values_and_refused_past_the_limit() {
        // Tiny values cost their tree; a string is one value whatever it holds.
        assert_eq!(parse_overhead(b"[0,0,0]"), 3 * PARSED_VALUE_BYTES);
        let image = format!(r#"{{"content":"{}"}}"#, "QUJD".repeat(10_000));
        assert_eq!(parse_overhead(image.as_bytes()), 2 * PARSED_VALUE_BYTES);
        let csv = r#"{"content":"a,b:[c{d,\"e,f\",g","n":[1,2]}"#;
        assert_eq!(parse_overhead(csv.as_bytes()), 6 * PARSED_VALUE_BYTES);
        // An unterminated string ends the count; an escape at the very end too.
        assert_eq!(parse_overhead(br#"[1,"a,b"#), 2 * PARSED_VALUE_BYTES);
        assert_eq!(parse_overhead(br#"[1,"a"#), 2 * PARSED_VALUE_BYTES);
        let budget = BufferBudget::default();
        let mut held = budget.guard(1000);
        held.reserve_parse(b"[0,0]").expect("fits");
        assert_eq!(budget.held(), 2 * PARSED_VALUE_BYTES);
        // Could never fit: 413; does not fit now: 503.
        let many = "0,".repeat(20);
        assert!(matches!(
            budget.guard(1000).reserve_parse(many.as_bytes()),
            Err(crate::error::GatewayError::BodyTooComplex { limit: 1000 })
        ));
        // Its bytes count too: a tree that fits beside nothing else is refused for good.
        let near = format!("[0,0,0,0,0,0,0,0,0,0,0,\"{}\"]", "x".repeat(100));
        assert!(parse_overhead(near.as_bytes()) <= 1000);
        assert!(matches!(
            budget.guard(1000).reserve_parse(near.as_bytes()),
            Err(crate::error::GatewayError::BodyTooComplex { limit: 1000 })
        ));
        let mut other = budget.guard(1000);
        other.grow(1000 - budget.held()).expect("the rest");
        assert!(matches!(
            held.reserve_parse(b"[0]"),
            Err(crate::error::GatewayError::BuffersFull { .. })
        ));
        drop((held, other));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn bytes_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let budget = BufferBudget::default();
        let mut a = budget.guard(100);
        a.grow(60).expect("fits");
        let mut b = budget.guard(100);
        b.grow(30).expect("fits");
        assert_eq!(budget.held(), 90);
        assert_eq!(b.grow(11), Err(BudgetExhausted { limit: 100 }));
        // A refused grow takes nothing: the guard keeps what it held.
        assert_eq!((b.bytes(), budget.held()), (30, 90));
        assert_eq!(b.check_room(10), Ok(()));
        assert_eq!(b.check_room(11), Err(BudgetExhausted { limit: 100 }));
        drop(a);
        assert_eq!(budget.held(), 30);
        b.grow(70).expect("room again");
        drop(b);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.0.refused.get(), 2);
    }

    #[test]
    fn a_declared_length_is_allocated_up_front_only_up_to_a_bound() {
        assert_eq!(super::presize(1000), 1000);
        assert_eq!(super::presize(500_000_000_000_000), super::MAX_PRESIZE);
        assert_eq!(super::presize(u64::MAX), super::MAX_PRESIZE);
    }

    #[test]
    fn a_body_larger_than_the_whole_budget_is_refused_and_holds_nothing() {
        let budget = BufferBudget::default();
        let mut g = budget.guard(10);
        assert!(g.grow(u64::MAX).is_err());
        assert!(g.grow(11).is_err());
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn held_buffers_take_their_growth_before_it_and_give_big_allocations_back() {
        let budget = BufferBudget::default();
        let mut held = budget.guard(4 << 20);
        let mut buf = Vec::new();
        reserve(Some(&mut held), &mut buf, 10).expect("fits");
        assert_eq!((buf.capacity(), budget.held()), (64, 64));
        buf.extend_from_slice(&[0; 10]);
        // Doubling while small, then 1 MiB at a time.
        reserve(Some(&mut held), &mut buf, 100).expect("fits");
        assert_eq!(buf.capacity(), 128);
        let mut big = Vec::new();
        reserve(Some(&mut held), &mut big, 1 << 20).expect("fits");
        big.resize(1 << 20, 0);
        reserve(Some(&mut held), &mut big, 1).expect("fits");
        assert_eq!(big.capacity(), 2 << 20);
        // Past the limit: refused before allocating, the buffer as it was.
        reserve(Some(&mut held), &mut big, 3 << 20).expect_err("refused");
        assert_eq!((big.capacity(), budget.held()), (2 << 20, 128 + (2 << 20)));
        // Emptied, a big allocation is freed and given back; a small one kept.
        big.clear();
        trim(Some(&mut held), &mut big, 64 << 10);
        assert_eq!((big.capacity(), budget.held()), (0, 128));
        let mut text = String::new();
        reserve(Some(&mut held), &mut text, 5).expect("fits");
        trim(Some(&mut held), &mut text, 64 << 10);
        assert_eq!((text.capacity(), budget.held()), (64, 192));
        drop(held);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn absorbed_guards_are_given_back_once() {
        let budget = BufferBudget::default();
        let mut whole = budget.guard(100);
        whole.grow(10).expect("fits");
        let mut part = budget.guard(100);
        part.grow(20).expect("fits");
        whole.absorb(part);
        assert_eq!((whole.bytes(), budget.held()), (30, 30));
        drop(whole);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_request_gives_its_bytes_back() {
        let budget = BufferBudget::default();
        let (started, wait) = tokio::sync::oneshot::channel::<()>();
        let b = budget.clone();
        let task = tokio::spawn(async move {
            let mut g = b.guard(100);
            g.grow(80).expect("fits");
            let _ = started.send(());
            // Never ends on its own: the client went away.
            std::future::pending::<()>().await;
        });
        wait.await.expect("started");
        assert_eq!(budget.held(), 80);
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_limit() {
        let budget = BufferBudget::default();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for _ in 0..1000 {
                        let mut g = budget.guard(1000);
                        if g.grow(7).is_ok() {
                            assert!(budget.held() <= 1000);
                            kept.push(g);
                        }
                        if kept.len() > 20 {
                            kept.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert_eq!(budget.held(), 0);
    }
}
