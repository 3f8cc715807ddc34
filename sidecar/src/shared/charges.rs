//! Charges waiting for the gateway's Redis: spend, tokens, and the counts (and give-backs) of
//! global windows, summed per key in memory and written by one task per Redis
//! ([`super::Shared`]'s flusher) in numbered batches.
//!
//! A batch whose answer never came may have been applied: it is sent again with its number, and
//! [`SCRIPT`] applies each number once (a marker key per process holds the last one applied), so
//! a charge is neither lost nor counted twice. A batch Redis refused (out of memory, a read-only
//! replica) was not applied: its charges wait again with the new ones. Charges whose window (or
//! spend period) ended before Redis took them are of no use and dropped, counted, as are new
//! keys past [`MAX_KEYS`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Applies batch `ARGV[1]` once: nothing when the marker (`KEYS[1]`, kept `ARGV[2]` ms) holds
/// that number or a later one. Then, for each charged key `KEYS[i]` (i ≥ 2), three arguments:
/// its kind (`f`: `INCRBYFLOAT`, `i`: `INCRBY`), the amount and the key's time to live in ms.
/// A negative count is a give-back: never below 0, and never bringing back a key that expired.
/// The marker is the script's first write, so a Redis refusing writes (out of memory, a
/// replica) refuses the whole batch; a key holding something else (another type) is skipped.
pub(super) const SCRIPT: &str = r"
local seq = tonumber(ARGV[1])
if seq <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do
  local k, kind, n, ttl = KEYS[i], ARGV[3 * i - 3], ARGV[3 * i - 2], ARGV[3 * i - 1]
  if kind == 'f' then
    redis.pcall('INCRBYFLOAT', k, n)
    redis.pcall('PEXPIRE', k, ttl)
  elseif tonumber(n) < 0 then
    local held = tonumber(redis.pcall('GET', k)) or 0
    local back = math.min(-tonumber(n), held)
    if back > 0 then redis.pcall('DECRBY', k, string.format('%d', back)) end
  else
    redis.pcall('INCRBY', k, n)
    redis.pcall('PEXPIRE', k, ttl)
  end
end
return 1
";

/// Most keys waiting at once (some 200 bytes each): new keys past it are dropped, counted.
pub(super) const MAX_KEYS: usize = 10_000;
/// Most keys written in one batch.
pub(super) const BATCH_KEYS: usize = 512;
/// How long the marker of the last batch applied is kept, in ms.
pub(super) const MARKER_TTL_MS: u64 = 2 * 86_400_000;
/// How long a batch whose answer never came is sent again, in ms: well within the marker's
/// life, so that Redis can still tell whether it applied it.
const UNCONFIRMED_FOR_MS: u64 = 86_400_000;
const _: () = assert!(UNCONFIRMED_FOR_MS < MARKER_TTL_MS);

/// An amount to add to a key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Amount {
    /// `INCRBY` (negative: a give-back).
    Count(i64),
    /// `INCRBYFLOAT` (USD).
    Usd(f64),
}

/// What waits for one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Charge {
    /// The sum of its charges.
    pub amount: Amount,
    /// Unix ms from which it is of no use (its window no longer weighs, its period ended).
    pub useful_until_ms: u64,
    /// Unix ms at which the key may expire in Redis.
    pub expire_at_ms: u64,
}

impl Charge {
    /// Adds `other`'s amount (of the same kind) to this one.
    fn absorb(&mut self, other: &Charge) {
        self.amount = match (self.amount, other.amount) {
            (Amount::Count(a), Amount::Count(b)) => Amount::Count(a.saturating_add(b)),
            (Amount::Usd(a), Amount::Usd(b)) => Amount::Usd(a + b),
            // Keys of counts and of USD never meet (different names).
            (mine, _) => mine,
        };
        self.useful_until_ms = self.useful_until_ms.max(other.useful_until_ms);
        self.expire_at_ms = self.expire_at_ms.max(other.expire_at_ms);
    }

    /// The script's arguments for this charge at `now_ms`: kind, amount, time to live.
    pub(super) fn args(&self, now_ms: u64) -> (&'static str, String, u64) {
        let ttl = self.expire_at_ms.saturating_sub(now_ms).max(1);
        match self.amount {
            Amount::Count(n) => ("i", n.to_string(), ttl),
            Amount::Usd(usd) => ("f", format!("{usd:.12}"), ttl),
        }
    }

    /// Whether it changes nothing (a count and its give-back).
    fn is_zero(&self) -> bool {
        matches!(self.amount, Amount::Count(0))
    }
}

/// A batch of charges on its way to Redis.
#[derive(Debug)]
pub(super) struct Batch {
    /// Its number: Redis applies each once.
    pub seq: u64,
    /// The keys and what to add to them.
    pub entries: Vec<(String, Charge)>,
    /// When it was first sent (unix ms).
    first_sent_ms: u64,
    /// Whether Redis may have applied it (an answer never came): then it keeps its number
    /// until Redis answers, whatever becomes of the next tries.
    maybe_applied: bool,
}

/// What became of a batch sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Redis answered: applied (now or before).
    Applied,
    /// Not applied: not sent, or refused by Redis.
    NotApplied,
    /// No answer: Redis may have applied it.
    Unanswered,
}

/// The charges waiting for one Redis, and the batch whose answer never came.
#[derive(Debug, Default)]
pub(super) struct Charges {
    state: Mutex<State>,
    /// Whether any charge waits (reads add what waits for their keys only then).
    waiting: AtomicBool,
    /// Whether the flusher runs (one per Redis).
    flushing: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    waiting: HashMap<String, Charge>,
    /// The number of the last batch made.
    seq: u64,
    /// A batch whose answer never came: sent again, with its number, before any other.
    unanswered: Option<Batch>,
}

impl Charges {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `c` to what waits for `key`; `false` when it was dropped: a new key while
    /// [`MAX_KEYS`] wait.
    pub(super) fn add(&self, key: String, c: Charge) -> bool {
        let mut s = self.state();
        let full = s.waiting.len() >= MAX_KEYS;
        match s.waiting.get_mut(&key) {
            Some(held) => held.absorb(&c),
            None if full => return false,
            None => {
                s.waiting.insert(key, c);
            }
        }
        self.waiting.store(true, Ordering::Relaxed);
        true
    }

    /// What waits for `key` (not what is on its way): a count.
    pub(super) fn waiting_count(&self, key: &str) -> u64 {
        if !self.waiting.load(Ordering::Relaxed) {
            return 0;
        }
        match self.state().waiting.get(key).map(|c| c.amount) {
            Some(Amount::Count(n)) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        }
    }

    /// What waits for `key`: USD.
    pub(super) fn waiting_usd(&self, key: &str) -> f64 {
        if !self.waiting.load(Ordering::Relaxed) {
            return 0.0;
        }
        match self.state().waiting.get(key).map(|c| c.amount) {
            Some(Amount::Usd(usd)) => usd,
            _ => 0.0,
        }
    }

    /// Whether a flusher should start now (`true` once, until [`Self::next_batch`] finds
    /// nothing to send).
    pub(super) fn start_flushing(&self) -> bool {
        !self.flushing.swap(true, Ordering::AcqRel)
    }

    /// The batch to send at `now_ms`: the unanswered one (its number kept) or a new one of at
    /// most [`BATCH_KEYS`] keys of what waits. Charges of no use any more are dropped first;
    /// their number is the second value. `None`: nothing to send, and the flusher stops.
    pub(super) fn next_batch(&self, now_ms: u64) -> (Option<Batch>, u64) {
        let mut s = self.state();
        let mut dropped = 0;
        if let Some(mut b) = s.unanswered.take() {
            if now_ms.saturating_sub(b.first_sent_ms) >= UNCONFIRMED_FOR_MS {
                // Redis may have forgotten whether it applied it.
                dropped += b.entries.len() as u64;
            } else {
                let before = b.entries.len();
                b.entries.retain(|(_, c)| c.useful_until_ms > now_ms);
                dropped += (before - b.entries.len()) as u64;
                if !b.entries.is_empty() {
                    return (Some(b), dropped);
                }
            }
        }
        s.waiting.retain(|_, c| {
            if c.is_zero() {
                return false;
            }
            let useful = c.useful_until_ms > now_ms;
            dropped += u64::from(!useful);
            useful
        });
        if s.waiting.is_empty() {
            self.waiting.store(false, Ordering::Relaxed);
            // Under the lock: a charge added after this starts a new flusher.
            self.flushing.store(false, Ordering::Release);
            return (None, dropped);
        }
        let entries: Vec<(String, Charge)> = if s.waiting.len() <= BATCH_KEYS {
            s.waiting.drain().collect()
        } else {
            let keys: Vec<String> = s.waiting.keys().take(BATCH_KEYS).cloned().collect();
            keys.into_iter()
                .filter_map(|k| s.waiting.remove_entry(&k))
                .collect()
        };
        if s.waiting.is_empty() {
            self.waiting.store(false, Ordering::Relaxed);
        }
        s.seq += 1;
        let batch = Batch {
            seq: s.seq,
            entries,
            first_sent_ms: now_ms,
            maybe_applied: false,
        };
        (Some(batch), dropped)
    }

    /// Settles `batch` by what became of it.
    pub(super) fn settle(&self, mut batch: Batch, outcome: Outcome) {
        match outcome {
            Outcome::Applied => {}
            Outcome::Unanswered => {
                batch.maybe_applied = true;
                self.state().unanswered = Some(batch);
            }
            // Not applied this time, but perhaps the time before.
            Outcome::NotApplied if batch.maybe_applied => self.state().unanswered = Some(batch),
            Outcome::NotApplied => {
                let mut s = self.state();
                for (key, c) in batch.entries {
                    match s.waiting.get_mut(&key) {
                        Some(held) => held.absorb(&c),
                        None => {
                            s.waiting.insert(key, c);
                        }
                    }
                }
                self.waiting.store(!s.waiting.is_empty(), Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: i64, until: u64) -> Charge {
        Charge {
            amount: Amount::Count(n),
            useful_until_ms: until,
            expire_at_ms: until.saturating_add(1_000),
        }
    }

    fn usd(x: f64, until: u64) -> Charge {
        Charge {
            amount: Amount::Usd(x),
            useful_until_ms: until,
            expire_at_ms: until.saturating_add(86_400_000),
        }
    }

    #[test]
    fn charges_are_summed_per_key_and_read_back_until_sent() {
        let c = Charges::default();
        assert_eq!(c.waiting_usd("spend"), 0.0);
        assert!(c.add("spend".into(), usd(0.25, 10_000)));
        assert!(c.add("spend".into(), usd(0.5, 10_000)));
        assert!(c.add("rl:7".into(), count(1, 10_000)));
        assert!(c.add("rl:7".into(), count(1, 10_000)));
        assert_eq!(c.waiting_usd("spend"), 0.75);
        assert_eq!(c.waiting_count("rl:7"), 2);
        assert_eq!(c.waiting_count("spend"), 0, "another kind");
        let (batch, dropped) = c.next_batch(5_000);
        let batch = batch.expect("something waits");
        assert_eq!((batch.seq, batch.entries.len(), dropped), (1, 2, 0));
        assert_eq!(c.waiting_usd("spend"), 0.0, "on its way, no longer waiting");
        c.settle(batch, Outcome::Applied);
        assert!(c.next_batch(5_000).0.is_none());
    }

    #[test]
    fn a_count_and_its_give_back_cancel_out_before_they_are_sent() {
        let c = Charges::default();
        c.add("route:1".into(), count(1, 10_000));
        c.add("route:1".into(), count(-1, 10_000));
        let (batch, dropped) = c.next_batch(5_000);
        assert!(batch.is_none(), "nothing to write");
        assert_eq!(dropped, 0, "not counted as dropped: it changes nothing");
    }

    #[test]
    fn a_batch_whose_answer_never_came_is_sent_again_with_its_number_before_the_others() {
        let c = Charges::default();
        c.add("spend".into(), usd(1.0, 10_000));
        let (first, _) = c.next_batch(1_000);
        let first = first.expect("batch");
        c.add("spend".into(), usd(2.0, 10_000));
        c.settle(first, Outcome::Unanswered);
        let (again, _) = c.next_batch(2_000);
        let again = again.expect("sent again");
        assert_eq!(again.seq, 1, "the same number: Redis applies it once");
        assert_eq!(again.entries[0].1.amount, Amount::Usd(1.0), "not merged");
        assert_eq!(c.waiting_usd("spend"), 2.0);
        c.settle(again, Outcome::Applied);
        let (next, _) = c.next_batch(3_000);
        let next = next.expect("the new charge");
        assert_eq!((next.seq, next.entries[0].1.amount), (2, Amount::Usd(2.0)));
    }

    #[test]
    fn a_batch_that_may_have_been_applied_keeps_its_number_when_a_later_try_is_not_sent() {
        let c = Charges::default();
        c.add("spend".into(), usd(1.0, 10_000));
        let (b, _) = c.next_batch(1_000);
        c.settle(b.expect("batch"), Outcome::Unanswered);
        // Sent again, but Redis is skipped this time (a back-off, the connection refused).
        let (b, _) = c.next_batch(2_000);
        c.settle(b.expect("batch"), Outcome::NotApplied);
        c.add("spend".into(), usd(2.0, 10_000));
        let (b, _) = c.next_batch(3_000);
        let b = b.expect("batch");
        assert_eq!(b.seq, 1, "Redis may hold it: only its own number tells");
        assert_eq!(b.entries[0].1.amount, Amount::Usd(1.0));
        assert_eq!(c.waiting_usd("spend"), 2.0);
    }

    #[test]
    fn a_refused_batch_waits_again_with_the_new_charges() {
        let c = Charges::default();
        c.add("spend".into(), usd(1.0, 10_000));
        let (b, _) = c.next_batch(1_000);
        c.add("spend".into(), usd(2.0, 10_000));
        c.settle(b.expect("batch"), Outcome::NotApplied);
        assert_eq!(
            c.waiting_usd("spend"),
            3.0,
            "read back by the spend check meanwhile"
        );
        let (b, _) = c.next_batch(2_000);
        let b = b.expect("batch");
        assert_eq!((b.seq, b.entries.len()), (2, 1));
        assert_eq!(b.entries[0].1.amount, Amount::Usd(3.0));
    }

    #[test]
    fn charges_of_a_window_that_ended_are_dropped_and_counted() {
        let c = Charges::default();
        c.add("rl:1".into(), count(1, 2_000));
        c.add("rl:2".into(), count(3, 4_000));
        let (b, dropped) = c.next_batch(3_000);
        assert_eq!(dropped, 1);
        let b = b.expect("the open window's");
        assert_eq!(b.entries[0].0, "rl:2");
        // Unanswered, then its window ends too.
        c.settle(b, Outcome::Unanswered);
        let (b, dropped) = c.next_batch(4_000);
        assert!(b.is_none());
        assert_eq!(dropped, 1);
    }

    #[test]
    fn an_unanswered_batch_is_not_sent_again_once_redis_may_have_forgotten_it() {
        let c = Charges::default();
        c.add("spend".into(), usd(1.0, u64::MAX));
        let (b, _) = c.next_batch(0);
        c.settle(b.expect("batch"), Outcome::Unanswered);
        let (b, dropped) = c.next_batch(UNCONFIRMED_FOR_MS);
        assert!(b.is_none());
        assert_eq!(dropped, 1);
    }

    #[test]
    fn new_keys_past_the_bound_are_dropped_and_known_ones_still_summed() {
        let c = Charges::default();
        for i in 0..MAX_KEYS {
            assert!(c.add(format!("k{i}"), count(1, 10_000)));
        }
        assert!(!c.add("one more".into(), count(1, 10_000)));
        assert!(c.add("k0".into(), count(1, 10_000)));
        assert_eq!(c.waiting_count("k0"), 2);
        let (b, _) = c.next_batch(0);
        assert_eq!(b.expect("batch").entries.len(), BATCH_KEYS);
        assert_eq!(c.state().waiting.len(), MAX_KEYS - BATCH_KEYS);
    }

    #[test]
    fn one_flusher_at_a_time_and_a_new_one_once_it_found_nothing() {
        let c = Charges::default();
        assert!(c.start_flushing());
        assert!(!c.start_flushing());
        assert!(c.next_batch(0).0.is_none());
        assert!(c.start_flushing(), "it stopped: the next charge starts one");
    }
}
