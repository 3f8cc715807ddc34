//! Charges waiting for the gateway's Redis: spend, tokens, and the counts (and give-backs) of
//! global windows, summed per key in memory and written by one task per Redis
//! ([`super::Shared`]'s flusher) in numbered batches.
//!
//! A batch whose answer never came may have been applied: it is sent again with its number, and
//! [`SCRIPT`] applies each number once (a marker key per process holds the last one applied), so
//! a charge is neither lost nor counted twice; should Redis evict the marker meanwhile, the batch
//! is dropped, counted, rather than perhaps applied twice ([`MARKER_PRIME`]). A batch Redis refused (out of memory, a read-only
//! replica) was not applied: its charges wait again with the new ones. Charges whose window (or
//! spend period) ended before Redis took them are of no use and dropped, counted, as are new
//! keys past [`MAX_KEYS`] (a route node's count first: spend and tokens win).
//!
//! A reload that replaces the client of the same Redis (its password rotated) hands what waits,
//! and the batches whose answer never came with their marker and number, to the new client
//! ([`Charges::hand_over`]); the old writer stops, and what it had on its way follows once
//! answered.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Applies batch `ARGV[1]` once: nothing when the marker (`KEYS[1]`, kept `ARGV[2]` ms) holds
/// that number or a later one. A batch first sent (`ARGV[3]` is `0`) carries the `run_id` of the
/// Redis that answered [`MARKER_PRIME`] (`ARGV[4]`): another instance (restarted without its
/// data, a replica promoted, since that answer; a restart only requests noticed) applies
/// nothing and answers [`ELSEWHERE`], so a batch's first try is only ever applied by the Redis
/// whose `run_id` it carries, the one whose marker was made. A batch sent again (`ARGV[3]` is
/// `1`: its first try may have been applied) whose marker is gone is applied only when Redis is
/// another instance than that one (it lost or never had what the first try did, marker and
/// charges together). The same Redis lost the marker alone (evicted under a `maxmemory-policy`
/// other than `noeviction`, or deleted): nobody can tell whether the first try was applied, and
/// a charge counted twice is worse than one lost, so the batch is not applied, answered
/// [`MARKER_LOST`] (see [`MARKER_PRIME`]); so too when Redis does not say its `run_id`. Then,
/// for each charged key `KEYS[i]` (i ≥ 2), three arguments: its kind (`f`: `INCRBYFLOAT`, `i`:
/// `INCRBY`), the amount and the key's time to live in ms. A negative count is a give-back: never
/// below 0, and never bringing back a key that expired. The marker is the script's first write,
/// so a Redis refusing writes (out of memory, a replica) refuses the whole batch; a key holding
/// something else (another type) is skipped. (`INFO` is not deterministic: Redis before 5
/// replicates such a script's effects only when asked first.)
pub(super) const SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local info = redis.pcall('INFO', 'server')
local run = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local seq = tonumber(ARGV[1])
local held = redis.call('GET', KEYS[1])
if ARGV[3] ~= '1' then
  if run ~= ARGV[4] then return 3 end
elseif not held then
  if run == '' or ARGV[4] == '' or run == ARGV[4] then return 2 end
end
if held and seq <= tonumber(held) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do
  local k, kind, n, ttl = KEYS[i], ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
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

/// [`SCRIPT`]'s answer for a batch sent again whose marker Redis no longer holds: not applied.
pub(super) const MARKER_LOST: i64 = 2;

/// [`SCRIPT`]'s answer for a batch first sent to another Redis than the one whose marker was
/// made: not applied; the marker is made there, and the batch sent as new.
pub(super) const ELSEWHERE: i64 = 3;

/// Makes sure the marker (`KEYS[1]`) exists, for `ARGV[1]` ms, before a batch is first sent,
/// and answers Redis's `run_id` (empty when it does not say): then a marker missing when that
/// batch is sent again to the same Redis was lost (evicted, deleted), never "not yet made", and
/// [`SCRIPT`] applies nothing it cannot tell was not applied. Sent once per client, again after
/// the writer's connection broke or could not be made (Redis may have restarted), when a batch
/// first sent found another Redis ([`ELSEWHERE`]: a restart only requests' calls noticed) and
/// when the marker may have expired; not per batch: every batch applied keeps the marker for
/// [`MARKER_TTL_MS`] anyway. Never before a batch sent again: it would make anew the marker
/// whose absence says the batch's fate is unknown. Only an answer counts: one that did not come
/// in time may not have been made at all (the client sends a script as `EVALSHA`, and on a
/// Redis that does not hold it yet the `EVAL` follows only the `NOSCRIPT` answer, which came
/// too late and was not read), so no batch is first sent until it comes; the charges wait.
///
/// Why not keep the marker inside each charged key, where it would be evicted only with the
/// charge: those keys are plain counters that every pod's rate script and reads use (`GET`,
/// `INCR`, `MGET`); hashes would change the keys of all sidegate versions sharing a Redis during
/// a rolling update. The residual risk of a separate marker is a loss, not a double count: a
/// batch whose answer never came and whose marker was evicted before it was sent again (about
/// a second) is dropped, counted in `sidegate_redis_charges_dropped_total{reason="unconfirmed"}`,
/// on a Redis that evicts the charged keys themselves just as well; the sidecar warns at its
/// first connection when Redis may evict keys at all.
pub(super) const MARKER_PRIME: &str = r"
if not redis.call('SET', KEYS[1], '0', 'PX', ARGV[1], 'NX') then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local info = redis.pcall('INFO', 'server')
return type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
";

/// Most keys held at once (some 200 bytes each), those of the batches on their way or whose
/// answer never came included: new keys past it are dropped, counted.
pub(super) const MAX_KEYS: usize = 10_000;
/// Most keys written in one batch.
pub(super) const BATCH_KEYS: usize = 512;
/// Most budget windows whose count read last is kept for [`Charges::floor`].
pub(super) const MAX_SEEN: usize = 10_000;
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
    /// `INCRBYFLOAT` of whole billionths of a USD ([`crate::budget::UNITS_PER_USD`]): summed
    /// exactly here, sent as an exact decimal.
    Usd(u64),
}

/// What a key counts: which charges win for the [`MAX_KEYS`] bound, and what a loss says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The gateway's spend in a day (USD).
    Spend,
    /// The same spend again, in a week or a month.
    SpendAlso,
    /// The gateway's tokens in a minute.
    Tokens,
    /// Requests in a window of the gateway's rate limit.
    Requests,
    /// A route's rate or budget node, for one value of its key: as many keys as values, so the
    /// first dropped when the bound is reached.
    RouteNode,
}

/// What waits for one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Charge {
    /// What the key counts.
    pub kind: Kind,
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
            (Amount::Usd(a), Amount::Usd(b)) => Amount::Usd(a.saturating_add(b)),
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
            Amount::Usd(units) => ("f", usd_decimal(units), ttl),
        }
    }

    /// Whether it changes nothing (a count and its give-back).
    fn is_zero(&self) -> bool {
        matches!(self.amount, Amount::Count(0))
    }
}

/// `units` ([`crate::budget::UNITS_PER_USD`]) as the decimal number of USD they are exactly
/// (`0.100000000`), for `INCRBYFLOAT`.
fn usd_decimal(units: u64) -> String {
    format!("{}.{:09}", units / 1_000_000_000, units % 1_000_000_000)
}

/// A batch of charges on its way to Redis.
#[derive(Debug)]
pub(super) struct Batch {
    /// The key holding the last number applied of the client that made it.
    pub marker: Arc<str>,
    /// Its number: Redis applies each once.
    pub seq: u64,
    /// The keys and what to add to them.
    pub entries: Vec<(String, Charge)>,
    /// When it was first sent (unix ms).
    first_sent_ms: u64,
    /// Whether Redis may have applied it (an answer never came): then it keeps its number
    /// until Redis answers, whatever becomes of the next tries.
    maybe_applied: bool,
    /// The `run_id` of the Redis whose marker was made when it was first sent (empty: unknown):
    /// [`SCRIPT`] applies a first try only there, so the only instance that may have applied it.
    pub run_id: Arc<str>,
}

impl Batch {
    /// Whether it is sent again: Redis may have applied it already.
    pub(super) fn is_resent(&self) -> bool {
        self.maybe_applied
    }

    /// What it adds up to.
    pub(super) fn tally(&self) -> Tally {
        Tally::of(self.entries.iter().map(|(_, c)| c))
    }
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

/// The charges waiting for one Redis, and the batches whose answer never came.
#[derive(Debug)]
pub(super) struct Charges {
    state: Mutex<State>,
    /// Whether any charge waits (reads add what waits for their keys only then).
    waiting: AtomicBool,
    /// Whether the flusher runs (one per Redis).
    flushing: AtomicBool,
    /// `{prefix}charges:{random}`: the number of the last batch of this client's applied.
    marker: Arc<str>,
    /// Unix ms until which the marker is known to be in Redis (kept [`MARKER_TTL_MS`] from its
    /// last write Redis answered), unless evicted; 0 after the writer failed.
    marker_until_ms: AtomicU64,
    /// The `run_id` of the Redis that holds the marker, as [`MARKER_PRIME`] last answered.
    run_id: Mutex<Arc<str>>,
    /// Told when the flusher stops: nothing is left to write.
    idle: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    waiting: HashMap<String, Charge>,
    /// The number of the last batch made.
    seq: u64,
    /// Batches whose answer never came (this client's, and those of the client it took over
    /// from, each with its own marker): sent again, with their number, before any other.
    unanswered: VecDeque<Batch>,
    /// What the batch on its way holds (an unanswered batch once it is sent: [`Charges::sending`]).
    in_flight: Tally,
    /// Replaced by a new client of the same Redis: charges go to it.
    retired: bool,
    /// The count of budget windows (the token budget's, budget nodes') as last read, and what
    /// this client charged them since: the floor their checks use while Redis cannot be read.
    seen: SeenWindows,
}

/// A window's count as last read (with what waited for it then), and what was charged since.
#[derive(Debug, Clone, Copy)]
struct Seen {
    read: u64,
    since: i64,
    /// Unix ms from which the window weighs no more.
    until_ms: u64,
    /// When it was last read, in the table's order of reads ([`SeenWindows::reads`]).
    read_at: u64,
}

/// Budget windows as last read ([`Seen`]), at most [`MAX_SEEN`]. Past it a new window takes the
/// place of those that weigh no more, or else of the one read least recently: a window just
/// read is one a limit is being enforced on now, and it keeps its floor over one not read for
/// longest (whose floor, should Redis fail, is then only what this pod keeps for it). Kept in
/// order of their end and of their last read too, so that making room looks at a window or two,
/// not at the whole table (under the charges' lock, on a request's path).
#[derive(Debug, Default)]
struct SeenWindows {
    by_key: HashMap<Arc<str>, Seen>,
    /// The same windows by the time they weigh no more.
    by_end: BTreeSet<(u64, Arc<str>)>,
    /// The same windows by when they were last read.
    by_read: BTreeSet<(u64, Arc<str>)>,
    /// Reads noted: the clock of [`Seen::read_at`].
    reads: u64,
    /// Windows looked at to make room, in all: the work the tests bound.
    #[cfg(test)]
    looked_at: usize,
}

impl SeenWindows {
    fn get(&self, key: &str) -> Option<&Seen> {
        self.by_key.get(key)
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Adds `n` to what was charged to window `key` since its read, if it is noted.
    fn charged(&mut self, key: &str, n: i64) {
        if let Some(w) = self.by_key.get_mut(key) {
            w.since = w.since.saturating_add(n);
        }
    }

    /// Notes `seen` for window `key`, read now (`now_ms`, which says which windows weigh no
    /// more; `None`: look at the order of reads only), making room past [`MAX_SEEN`].
    fn note(&mut self, key: &str, seen: Seen, now_ms: Option<u64>) {
        let key = match self.by_key.get_key_value(key) {
            Some((held_key, held)) => {
                let (held_key, held) = (held_key.clone(), *held);
                self.remove(&held_key, &held);
                held_key
            }
            None => {
                if self.len() >= MAX_SEEN {
                    self.make_room(now_ms);
                }
                Arc::from(key)
            }
        };
        self.reads += 1;
        let seen = Seen {
            read_at: self.reads,
            ..seen
        };
        self.by_end.insert((seen.until_ms, key.clone()));
        self.by_read.insert((seen.read_at, key.clone()));
        self.by_key.insert(key, seen);
    }

    fn remove(&mut self, key: &Arc<str>, held: &Seen) {
        self.by_end.remove(&(held.until_ms, key.clone()));
        self.by_read.remove(&(held.read_at, key.clone()));
        self.by_key.remove(key);
    }

    /// Forgets the windows that weigh no more at `now_ms`, looking at those ending first only;
    /// with none, the window read least recently.
    fn make_room(&mut self, now_ms: Option<u64>) {
        let mut freed = false;
        while let Some((end, key)) = self.by_end.first().cloned() {
            #[cfg(test)]
            {
                self.looked_at += 1;
            }
            if now_ms.is_none_or(|now| end > now) {
                break;
            }
            if let Some(held) = self.by_key.get(&key).copied() {
                self.remove(&key, &held);
            }
            freed = true;
        }
        if !freed && let Some((_, key)) = self.by_read.first().cloned() {
            #[cfg(test)]
            {
                self.looked_at += 1;
            }
            if let Some(held) = self.by_key.get(&key).copied() {
                self.remove(&key, &held);
            }
        }
    }

    /// Takes the windows of `other` (a replaced client's), within [`MAX_SEEN`]: as if read
    /// before those noted here, which were read since.
    fn take(&mut self, other: SeenWindows) {
        let mine = std::mem::take(self);
        #[cfg(test)]
        {
            self.looked_at = mine.looked_at;
        }
        for mut table in [other, mine] {
            for (_, key) in std::mem::take(&mut table.by_read) {
                if let Some(seen) = table.by_key.get(&key).copied() {
                    self.note(&key, seen, None);
                }
            }
        }
    }
}

impl State {
    /// Keys held: waiting, on their way, unanswered.
    fn keys(&self) -> usize {
        let unanswered: usize = self.unanswered.iter().map(|b| b.entries.len()).sum();
        self.waiting.len() + self.in_flight.keys + unanswered
    }

    /// Adds `c` to what waits for `key` within [`MAX_KEYS`]; whether a charge was dropped for
    /// it (this one, or a route node's count it displaced).
    fn insert(&mut self, key: String, c: Charge) -> bool {
        if let Some(held) = self.waiting.get_mut(&key) {
            held.absorb(&c);
            return false;
        }
        if self.keys() < MAX_KEYS {
            self.waiting.insert(key, c);
            return false;
        }
        if c.kind != Kind::RouteNode
            && let Some(victim) = self
                .waiting
                .iter()
                .find(|(_, held)| held.kind == Kind::RouteNode)
                .map(|(k, _)| k.clone())
        {
            self.waiting.remove(&victim);
            self.waiting.insert(key, c);
        }
        true
    }
}

/// What some charges add up to: what a shutdown could not write is logged so.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Tally {
    /// Keys.
    pub keys: usize,
    /// The gateway's spend (USD; each day's once, not again for its week and month).
    pub spend_usd: f64,
    /// Tokens.
    pub tokens: i64,
    /// Requests and route nodes' counts (give-backs taken off).
    pub counts: i64,
    /// Batches whose answer never came among them (Redis may have applied them).
    pub unanswered_batches: usize,
}

impl Tally {
    fn add(&mut self, c: &Charge) {
        self.keys += 1;
        match (c.kind, c.amount) {
            (Kind::Spend, Amount::Usd(units)) => self.spend_usd += crate::budget::units_usd(units),
            (Kind::Tokens, Amount::Count(n)) => self.tokens = self.tokens.saturating_add(n),
            (Kind::Requests | Kind::RouteNode, Amount::Count(n)) => {
                self.counts = self.counts.saturating_add(n);
            }
            _ => {}
        }
    }

    fn of<'a>(charges: impl IntoIterator<Item = &'a Charge>) -> Self {
        let mut t = Self::default();
        for c in charges {
            t.add(c);
        }
        t
    }

    pub(super) fn merge(&mut self, other: &Tally) {
        self.keys += other.keys;
        self.spend_usd += other.spend_usd;
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.counts = self.counts.saturating_add(other.counts);
        self.unanswered_batches += other.unanswered_batches;
    }
}

/// What [`Charges::add`] did with a charge.
#[derive(Debug, PartialEq)]
pub(super) enum Added {
    /// Kept to be written.
    Kept,
    /// Kept, or not, and one charge dropped for the [`MAX_KEYS`] bound.
    OneDropped,
    /// This client was replaced: the charge is handed back, for the new one.
    Retired(String, Charge),
}

/// What a retired client hands to its successor.
#[derive(Debug, Default)]
pub(super) struct Handover {
    waiting: HashMap<String, Charge>,
    unanswered: VecDeque<Batch>,
    seen: SeenWindows,
}

impl Charges {
    /// No charges yet, for the client whose batches' numbers `marker` keeps.
    pub(super) fn new(marker: String) -> Self {
        Self {
            state: Mutex::default(),
            waiting: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
            marker: marker.into(),
            marker_until_ms: AtomicU64::new(0),
            run_id: Mutex::new(Arc::from("")),
            idle: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `c` to what waits for `key`, within [`MAX_KEYS`].
    pub(super) fn add(&self, key: String, c: Charge) -> Added {
        let mut s = self.state();
        if s.retired {
            return Added::Retired(key, c);
        }
        if !s.seen.is_empty()
            && let Amount::Count(n) = c.amount
        {
            s.seen.charged(&key, n);
        }
        let dropped = s.insert(key, c);
        self.waiting.store(!s.waiting.is_empty(), Ordering::Relaxed);
        if dropped {
            Added::OneDropped
        } else {
            Added::Kept
        }
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

    /// Notes `read`, the count of budget window `key` read from Redis with what waited for it,
    /// which weighs until `until_ms`: [`Self::floor`] starts from it. Past [`MAX_SEEN`] it takes
    /// the place of windows that weigh no more, or else of the one read least recently (whose
    /// floor is then what waits for it).
    pub(super) fn saw(&self, key: &str, read: u64, until_ms: u64, now_ms: u64) {
        let seen = Seen {
            read,
            since: 0,
            until_ms,
            read_at: 0,
        };
        self.state().seen.note(key, seen, Some(now_ms));
    }

    /// The least the count of budget window `key` can be, as far as this client knows while
    /// Redis cannot be read: as last read plus what this client charged it since, or, never
    /// read, what waits for it.
    pub(super) fn floor(&self, key: &str) -> u64 {
        let s = self.state();
        match s.seen.get(key) {
            Some(w) => {
                let since = u64::try_from(w.since).unwrap_or(0);
                let back = w.since.min(0).unsigned_abs();
                w.read.saturating_add(since).saturating_sub(back)
            }
            None => match s.waiting.get(key).map(|c| c.amount) {
                Some(Amount::Count(n)) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            },
        }
    }

    /// What waits for `key`: spend, in [`crate::budget::UNITS_PER_USD`].
    pub(super) fn waiting_spend(&self, key: &str) -> u64 {
        if !self.waiting.load(Ordering::Relaxed) {
            return 0;
        }
        match self.state().waiting.get(key).map(|c| c.amount) {
            Some(Amount::Usd(units)) => units,
            _ => 0,
        }
    }

    /// Whether the marker must be made ([`MARKER_PRIME`]) before `batch` is sent at `now_ms`: a
    /// batch first sent needs its marker in Redis for as long as it may be sent again.
    pub(super) fn needs_marker(&self, batch: &Batch, now_ms: u64) -> bool {
        !batch.maybe_applied
            && Arc::ptr_eq(&batch.marker, &self.marker)
            && self.marker_until_ms.load(Ordering::Relaxed)
                < now_ms.saturating_add(UNCONFIRMED_FOR_MS)
    }

    /// Redis answered a write of `marker` made at `now_ms` (a batch applied, the marker made):
    /// it holds it for [`MARKER_TTL_MS`].
    pub(super) fn marker_written(&self, marker: &Arc<str>, now_ms: u64) {
        if Arc::ptr_eq(marker, &self.marker) {
            self.marker_until_ms
                .fetch_max(now_ms.saturating_add(MARKER_TTL_MS), Ordering::Relaxed);
        }
    }

    /// [`MARKER_PRIME`] answered at `now_ms` with the `run_id` of the Redis holding the marker.
    pub(super) fn marker_made(&self, run_id: &str, now_ms: u64) {
        *self.run_id.lock().unwrap_or_else(|e| e.into_inner()) = Arc::from(run_id);
        self.marker_written(&self.marker.clone(), now_ms);
    }

    /// The writer's connection broke, or could not be made, or a batch first sent found
    /// another Redis ([`ELSEWHERE`]): Redis may have restarted, and the marker is made again
    /// (with its `run_id` asked again) before the next batch first sent.
    pub(super) fn marker_unsure(&self) {
        self.marker_until_ms.store(0, Ordering::Relaxed);
    }

    /// Notes on `batch`, about to be first sent, the Redis that made its marker: the only one
    /// that will apply it ([`SCRIPT`]).
    pub(super) fn stamp(&self, batch: &mut Batch) {
        if !batch.maybe_applied && Arc::ptr_eq(&batch.marker, &self.marker) {
            batch.run_id = self
                .run_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
        }
    }

    /// Whether a flusher should start now (`true` once, until [`Self::next_batch`] finds
    /// nothing to send).
    pub(super) fn start_flushing(&self) -> bool {
        !self.flushing.swap(true, Ordering::AcqRel)
    }

    /// Whether nothing is left to write and no flusher runs.
    fn idle_now(&self) -> bool {
        !self.flushing.load(Ordering::Acquire)
    }

    /// Waits until nothing is left to write (the flusher stopped), or `deadline`.
    pub(super) async fn idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let stopped = self.idle.notified();
            tokio::pin!(stopped);
            stopped.as_mut().enable();
            if self.idle_now() {
                return true;
            }
            if tokio::time::timeout_at(deadline, stopped).await.is_err() {
                return self.idle_now();
            }
        }
    }

    /// What is held and not written: waiting, unanswered, on its way.
    pub(super) fn unwritten(&self) -> Tally {
        let s = self.state();
        let mut t = Tally::of(s.waiting.values());
        for b in &s.unanswered {
            let mut of_batch = Tally::of(b.entries.iter().map(|(_, c)| c));
            of_batch.unanswered_batches = 1;
            t.merge(&of_batch);
        }
        t.merge(&s.in_flight);
        t
    }

    /// The batch on its way is sent: until it is settled Redis may have applied it, and what a
    /// stop leaves unwritten says so ([`Self::unwritten`]).
    pub(super) fn sending(&self) {
        let mut s = self.state();
        if s.in_flight.keys > 0 {
            s.in_flight.unanswered_batches = 1;
        }
    }

    /// The batch to send at `now_ms`: an unanswered one (its marker and number kept) or a new
    /// one of at most [`BATCH_KEYS`] keys of what waits. Charges of no use any more are dropped
    /// first; their number is the second value. `None`: nothing to send (or this client was
    /// replaced, its charges handed over), and the flusher stops.
    pub(super) fn next_batch(&self, now_ms: u64) -> (Option<Batch>, u64) {
        let mut s = self.state();
        let mut dropped = 0;
        while let Some(mut b) = s.unanswered.pop_front() {
            if now_ms.saturating_sub(b.first_sent_ms) >= UNCONFIRMED_FOR_MS {
                // Redis may have forgotten whether it applied it.
                dropped += b.entries.len() as u64;
                continue;
            }
            let before = b.entries.len();
            b.entries.retain(|(_, c)| c.useful_until_ms > now_ms);
            dropped += (before - b.entries.len()) as u64;
            if !b.entries.is_empty() {
                s.in_flight = Tally::of(b.entries.iter().map(|(_, c)| c));
                return (Some(b), dropped);
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
        if s.waiting.is_empty() || s.retired {
            self.waiting.store(false, Ordering::Relaxed);
            // Under the lock: a charge added after this starts a new flusher.
            self.flushing.store(false, Ordering::Release);
            self.idle.notify_waiters();
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
        s.in_flight = Tally::of(entries.iter().map(|(_, c)| c));
        let batch = Batch {
            marker: self.marker.clone(),
            seq: s.seq,
            entries,
            first_sent_ms: now_ms,
            maybe_applied: false,
            run_id: Arc::from(""),
        };
        (Some(batch), dropped)
    }

    /// Settles `batch`, the one [`Self::next_batch`] gave, by what became of it: the number of
    /// charges dropped for [`MAX_KEYS`] putting it back, or, when this client was replaced
    /// meanwhile, the batch handed back for the new one ([`Self::adopt`]).
    pub(super) fn settle(&self, batch: Batch, outcome: Outcome) -> Result<u64, (Batch, Outcome)> {
        let mut s = self.state();
        s.in_flight = Tally::default();
        self.place(&mut s, batch, outcome)
    }

    /// Takes `batch`, settled by the writer of the client this one replaced, as
    /// [`Self::settle`] does.
    pub(super) fn adopt(&self, batch: Batch, outcome: Outcome) -> Result<u64, (Batch, Outcome)> {
        let mut s = self.state();
        self.place(&mut s, batch, outcome)
    }

    fn place(
        &self,
        s: &mut State,
        mut batch: Batch,
        outcome: Outcome,
    ) -> Result<u64, (Batch, Outcome)> {
        if s.retired && outcome != Outcome::Applied {
            return Err((batch, outcome));
        }
        match outcome {
            Outcome::Applied => {}
            Outcome::Unanswered => {
                batch.maybe_applied = true;
                s.unanswered.push_front(batch);
            }
            // Not applied this time, but perhaps the time before.
            Outcome::NotApplied if batch.maybe_applied => s.unanswered.push_front(batch),
            Outcome::NotApplied => {
                let mut dropped = 0;
                for (key, c) in batch.entries {
                    dropped += u64::from(s.insert(key, c));
                }
                self.waiting.store(!s.waiting.is_empty(), Ordering::Relaxed);
                return Ok(dropped);
            }
        }
        Ok(0)
    }

    /// Retires this client: what waits and the unanswered batches, for the new client of the
    /// same Redis ([`Self::receive`]). Later charges are handed back ([`Added::Retired`]), as is
    /// the batch on its way once settled; the flusher stops at its next batch.
    pub(super) fn hand_over(&self) -> Handover {
        let mut s = self.state();
        s.retired = true;
        self.waiting.store(false, Ordering::Relaxed);
        Handover {
            waiting: std::mem::take(&mut s.waiting),
            unanswered: std::mem::take(&mut s.unanswered),
            seen: std::mem::take(&mut s.seen),
        }
    }

    /// Takes what a replaced client handed over: its unanswered batches keep their marker and
    /// number. Whether anything came, and the number of charges dropped for [`MAX_KEYS`].
    pub(super) fn receive(&self, h: Handover) -> (bool, u64) {
        let came = !h.waiting.is_empty() || !h.unanswered.is_empty();
        let mut s = self.state();
        s.unanswered.extend(h.unanswered);
        s.seen.take(h.seen);
        let mut dropped = 0;
        for (key, c) in h.waiting {
            dropped += u64::from(s.insert(key, c));
        }
        self.waiting.store(!s.waiting.is_empty(), Ordering::Relaxed);
        (came, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::usd_units;

    fn count(n: i64, until: u64) -> Charge {
        Charge {
            kind: Kind::RouteNode,
            amount: Amount::Count(n),
            useful_until_ms: until,
            expire_at_ms: until.saturating_add(1_000),
        }
    }

    fn usd(x: f64, until: u64) -> Charge {
        Charge {
            kind: Kind::Spend,
            amount: Amount::Usd(usd_units(x)),
            useful_until_ms: until,
            expire_at_ms: until.saturating_add(86_400_000),
        }
    }

    #[test]
    fn charges_are_summed_per_key_and_read_back_until_sent() {
        let c = Charges::new("m".into());
        assert_eq!(c.waiting_spend("spend"), 0);
        assert_eq!(Added::Kept, c.add("spend".into(), usd(0.25, 10_000)));
        assert_eq!(Added::Kept, c.add("spend".into(), usd(0.5, 10_000)));
        assert_eq!(Added::Kept, c.add("rl:7".into(), count(1, 10_000)));
        assert_eq!(Added::Kept, c.add("rl:7".into(), count(1, 10_000)));
        assert_eq!(c.waiting_spend("spend"), usd_units(0.75));
        assert_eq!(c.waiting_count("rl:7"), 2);
        assert_eq!(c.waiting_count("spend"), 0, "another kind");
        let (batch, dropped) = c.next_batch(5_000);
        let batch = batch.expect("something waits");
        assert_eq!((batch.seq, batch.entries.len(), dropped), (1, 2, 0));
        assert_eq!(c.waiting_spend("spend"), 0, "on its way, no longer waiting");
        c.settle(batch, Outcome::Applied).expect("not retired");
        assert!(c.next_batch(5_000).0.is_none());
    }

    #[test]
    fn a_count_and_its_give_back_cancel_out_before_they_are_sent() {
        let c = Charges::new("m".into());
        c.add("route:1".into(), count(1, 10_000));
        c.add("route:1".into(), count(-1, 10_000));
        let (batch, dropped) = c.next_batch(5_000);
        assert!(batch.is_none(), "nothing to write");
        assert_eq!(dropped, 0, "not counted as dropped: it changes nothing");
    }

    #[test]
    fn a_batch_whose_answer_never_came_is_sent_again_with_its_number_before_the_others() {
        let c = Charges::new("m".into());
        c.add("spend".into(), usd(1.0, 10_000));
        let (first, _) = c.next_batch(1_000);
        let first = first.expect("batch");
        c.add("spend".into(), usd(2.0, 10_000));
        c.settle(first, Outcome::Unanswered).expect("not retired");
        let (again, _) = c.next_batch(2_000);
        let again = again.expect("sent again");
        assert_eq!(again.seq, 1, "the same number: Redis applies it once");
        assert_eq!(
            again.entries[0].1.amount,
            Amount::Usd(usd_units(1.0)),
            "not merged"
        );
        assert_eq!(c.waiting_spend("spend"), usd_units(2.0));
        c.settle(again, Outcome::Applied).expect("not retired");
        let (next, _) = c.next_batch(3_000);
        let next = next.expect("the new charge");
        assert_eq!(
            (next.seq, next.entries[0].1.amount),
            (2, Amount::Usd(usd_units(2.0)))
        );
    }

    #[test]
    fn a_batch_that_may_have_been_applied_keeps_its_number_when_a_later_try_is_not_sent() {
        let c = Charges::new("m".into());
        c.add("spend".into(), usd(1.0, 10_000));
        let (b, _) = c.next_batch(1_000);
        c.settle(b.expect("batch"), Outcome::Unanswered)
            .expect("not retired");
        // Sent again, but Redis is skipped this time (a back-off, the connection refused).
        let (b, _) = c.next_batch(2_000);
        c.settle(b.expect("batch"), Outcome::NotApplied)
            .expect("not retired");
        c.add("spend".into(), usd(2.0, 10_000));
        let (b, _) = c.next_batch(3_000);
        let b = b.expect("batch");
        assert_eq!(b.seq, 1, "Redis may hold it: only its own number tells");
        assert_eq!(b.entries[0].1.amount, Amount::Usd(usd_units(1.0)));
        assert_eq!(c.waiting_spend("spend"), usd_units(2.0));
    }

    #[test]
    fn a_refused_batch_waits_again_with_the_new_charges() {
        let c = Charges::new("m".into());
        c.add("spend".into(), usd(1.0, 10_000));
        let (b, _) = c.next_batch(1_000);
        c.add("spend".into(), usd(2.0, 10_000));
        c.settle(b.expect("batch"), Outcome::NotApplied)
            .expect("not retired");
        assert_eq!(
            c.waiting_spend("spend"),
            usd_units(3.0),
            "read back by the spend check meanwhile"
        );
        let (b, _) = c.next_batch(2_000);
        let b = b.expect("batch");
        assert_eq!((b.seq, b.entries.len()), (2, 1));
        assert_eq!(b.entries[0].1.amount, Amount::Usd(usd_units(3.0)));
    }

    #[test]
    fn charges_of_a_window_that_ended_are_dropped_and_counted() {
        let c = Charges::new("m".into());
        c.add("rl:1".into(), count(1, 2_000));
        c.add("rl:2".into(), count(3, 4_000));
        let (b, dropped) = c.next_batch(3_000);
        assert_eq!(dropped, 1);
        let b = b.expect("the open window's");
        assert_eq!(b.entries[0].0, "rl:2");
        // Unanswered, then its window ends too.
        c.settle(b, Outcome::Unanswered).expect("not retired");
        let (b, dropped) = c.next_batch(4_000);
        assert!(b.is_none());
        assert_eq!(dropped, 1);
    }

    #[test]
    fn an_unanswered_batch_is_not_sent_again_once_redis_may_have_forgotten_it() {
        let c = Charges::new("m".into());
        c.add("spend".into(), usd(1.0, u64::MAX));
        let (b, _) = c.next_batch(0);
        c.settle(b.expect("batch"), Outcome::Unanswered)
            .expect("not retired");
        let (b, dropped) = c.next_batch(UNCONFIRMED_FOR_MS);
        assert!(b.is_none());
        assert_eq!(dropped, 1);
    }

    #[test]
    fn new_keys_past_the_bound_are_dropped_and_known_ones_still_summed() {
        let c = Charges::new("m".into());
        for i in 0..MAX_KEYS {
            assert_eq!(Added::Kept, c.add(format!("k{i}"), count(1, 10_000)));
        }
        assert_eq!(
            c.add("one more".into(), count(1, 10_000)),
            Added::OneDropped
        );
        assert_eq!(Added::Kept, c.add("k0".into(), count(1, 10_000)));
        assert_eq!(c.waiting_count("k0"), 2);
        let (b, _) = c.next_batch(0);
        assert_eq!(b.expect("batch").entries.len(), BATCH_KEYS);
        assert_eq!(c.state().waiting.len(), MAX_KEYS - BATCH_KEYS);
    }

    #[test]
    fn one_flusher_at_a_time_and_a_new_one_once_it_found_nothing() {
        let c = Charges::new("m".into());
        assert!(c.start_flushing());
        assert!(!c.start_flushing());
        assert!(c.next_batch(0).0.is_none());
        assert!(c.start_flushing(), "it stopped: the next charge starts one");
    }

    #[test]
    fn batches_on_their_way_or_unanswered_count_in_the_bound_and_a_refused_one_is_put_back_within_it()
     {
        let c = Charges::new("m".into());
        for i in 0..MAX_KEYS {
            c.add(format!("k{i}"), count(1, 10_000));
        }
        let (b, _) = c.next_batch(0);
        let b = b.expect("batch");
        assert_eq!(
            c.add("new".into(), count(1, 10_000)),
            Added::OneDropped,
            "the batch on its way still holds its keys"
        );
        c.settle(b, Outcome::Unanswered).expect("not retired");
        assert_eq!(c.add("new".into(), count(1, 10_000)), Added::OneDropped);
        let (b, _) = c.next_batch(0);
        let b = b.expect("the unanswered batch again");
        assert_eq!(b.seq, 1);
        c.settle(b, Outcome::Applied).expect("not retired");
        assert_eq!(c.add("new".into(), count(1, 10_000)), Added::Kept);
        // Refused: put back, and the keys added meanwhile leave no room for all of them.
        let (b, _) = c.next_batch(0);
        let b = b.expect("batch");
        let sent = b.entries.len() as u64;
        for i in 0..sent {
            c.add(format!("meanwhile{i}"), count(1, 10_000));
        }
        assert_eq!(
            c.settle(b, Outcome::NotApplied).expect("not retired"),
            0,
            "room was kept for it"
        );
        assert_eq!(c.state().keys(), MAX_KEYS);
    }

    #[test]
    fn past_the_bound_spend_and_tokens_displace_a_route_nodes_count() {
        let c = Charges::new("m".into());
        for i in 0..MAX_KEYS {
            c.add(format!("route:{i}"), count(1, 10_000));
        }
        assert_eq!(
            c.add("spend:day:1".into(), usd(0.5, 10_000)),
            Added::OneDropped
        );
        assert_eq!(
            c.waiting_spend("spend:day:1"),
            usd_units(0.5),
            "kept, a route count dropped"
        );
        assert_eq!(c.state().waiting.len(), MAX_KEYS);
        assert_eq!(
            c.add("route:new".into(), count(1, 10_000)),
            Added::OneDropped
        );
        assert_eq!(
            c.waiting_count("route:new"),
            0,
            "a route count displaces nothing"
        );
    }

    #[test]
    fn a_retired_client_hands_its_charges_and_unanswered_batch_to_the_new_one() {
        let old = Charges::new("old".into());
        old.add("spend".into(), usd(1.0, 10_000));
        let (b, _) = old.next_batch(1_000);
        old.settle(b.expect("batch"), Outcome::Unanswered)
            .expect("not retired");
        old.add("spend".into(), usd(2.0, 10_000));
        // Batch 1 on its way again when the reload comes.
        let (b, _) = old.next_batch(2_000);
        let on_its_way = b.expect("batch");
        let new = Charges::new("new".into());
        assert_eq!(new.receive(old.hand_over()), (true, 0));
        assert_eq!(new.waiting_spend("spend"), usd_units(2.0));
        assert_eq!(old.waiting_spend("spend"), 0);
        let (b, o) = old
            .settle(on_its_way, Outcome::Unanswered)
            .expect_err("handed to the new client");
        assert_eq!(new.adopt(b, o).expect("not retired"), 0);
        assert!(matches!(
            old.add("spend".into(), usd(4.0, 10_000)),
            Added::Retired(_, _)
        ));
        assert!(old.next_batch(3_000).0.is_none(), "the old writer stops");
        let (b, _) = new.next_batch(3_000);
        let b = b.expect("the old client's batch first");
        assert_eq!(
            (&*b.marker, b.seq),
            ("old", 1),
            "its marker and number kept"
        );
        assert_eq!(b.entries[0].1.amount, Amount::Usd(usd_units(1.0)));
        new.settle(b, Outcome::Applied).expect("not retired");
        let (b, _) = new.next_batch(3_000);
        let b = b.expect("then what waited");
        assert_eq!((&*b.marker, b.seq), ("new", 1));
        assert_eq!(b.entries[0].1.amount, Amount::Usd(usd_units(2.0)));
    }

    #[test]
    fn a_batch_first_sent_needs_its_marker_made_once_and_again_when_it_may_have_expired() {
        let c = Charges::new("m".into());
        c.add("spend".into(), usd(1.0, u64::MAX));
        let (b, _) = c.next_batch(1_000);
        let b = b.expect("batch");
        assert!(
            c.needs_marker(&b, 1_000),
            "a new client's marker is not in Redis yet"
        );
        c.marker_written(&b.marker, 1_000);
        assert!(!c.needs_marker(&b, 1_000));
        assert!(
            !c.needs_marker(&b, 1_000 + MARKER_TTL_MS - UNCONFIRMED_FOR_MS),
            "kept long enough for the batch to be sent again"
        );
        assert!(c.needs_marker(&b, 1_001 + MARKER_TTL_MS - UNCONFIRMED_FOR_MS));
        c.marker_unsure();
        assert!(
            c.needs_marker(&b, 1_000),
            "the connection broke: Redis may have restarted"
        );
        c.marker_made("r1", 1_000);
        assert!(!c.needs_marker(&b, 1_000));
        let mut b = b;
        c.stamp(&mut b);
        assert_eq!(
            &*b.run_id, "r1",
            "the Redis that held the marker when first sent"
        );
        c.settle(b, Outcome::Unanswered).expect("not retired");
        let (b, _) = c.next_batch(2_000);
        let mut b = b.expect("sent again");
        assert!(b.is_resent());
        c.marker_made("r2", 2_000);
        c.stamp(&mut b);
        assert_eq!(&*b.run_id, "r1", "kept when sent again");
        assert!(
            !c.needs_marker(&b, u64::MAX / 2),
            "a batch sent again is never preceded by a new marker: a missing one was lost"
        );
        let other = Charges::new("other".into());
        other.marker_written(&b.marker, 1_000);
        assert_eq!(
            other.marker_until_ms.load(Ordering::Relaxed),
            0,
            "another client's marker"
        );
    }

    #[test]
    fn a_budget_windows_floor_is_its_count_last_read_plus_what_was_charged_since() {
        let c = Charges::new("m".into());
        assert_eq!(c.floor("tpm:7"), 0);
        c.add("tpm:7".into(), count(5, 10_000));
        assert_eq!(c.floor("tpm:7"), 5, "never read: what waits for it");
        c.saw("tpm:7", 80, 10_000, 1_000);
        c.add("tpm:7".into(), count(7, 10_000));
        c.add("tpm:7".into(), count(7, 10_000));
        assert_eq!(c.floor("tpm:7"), 94, "80 read, 14 since");
        let (b, _) = c.next_batch(1_000);
        c.settle(b.expect("batch"), Outcome::Applied)
            .expect("not retired");
        assert_eq!(
            c.floor("tpm:7"),
            94,
            "written: still what was charged since the read"
        );
        c.add("tpm:7".into(), count(-20, 10_000));
        assert_eq!(c.floor("tpm:7"), 74, "a give-back");
        c.saw("tpm:7", 100, 10_000, 2_000);
        assert_eq!(c.floor("tpm:7"), 100, "a new read starts afresh");
        let new = Charges::new("n".into());
        new.receive(c.hand_over());
        assert_eq!(
            new.floor("tpm:7"),
            100,
            "a client of the same Redis takes it over"
        );
    }

    #[test]
    fn budget_windows_noted_are_bounded_and_a_new_one_takes_the_place_of_one_ended_or_else_read_least_recently()
     {
        let c = Charges::new("m".into());
        for i in 0..MAX_SEEN {
            c.saw(&format!("w{i}"), 1, if i == 5 { 500 } else { 10_000 }, 0);
        }
        c.saw("w0", 2, 10_000, 50);
        c.saw("new", 3, 10_000, 100);
        assert_eq!(
            c.floor("new"),
            3,
            "full of windows that all weigh: noted all the same"
        );
        assert_eq!(
            (c.floor("w0"), c.floor("w1"), c.floor("w2")),
            (2, 0, 1),
            "w1, read least recently, made room (w0 was read again)"
        );
        c.saw("newer", 4, 10_000, 600);
        assert_eq!(c.floor("newer"), 4);
        assert_eq!(
            (c.floor("w5"), c.floor("w2")),
            (0, 1),
            "w5 weighs no more: it makes room, not w2"
        );
        assert_eq!(c.state().seen.len(), MAX_SEEN);
        // A window read again keeps its place, and what was charged since its read.
        c.saw("w2", 5, 10_000, 700);
        c.add("w2".into(), count(4, 10_000));
        c.saw("newest", 1, 10_000, 800);
        assert_eq!((c.floor("w2"), c.floor("w3")), (9, 0));
        let s = c.state();
        assert_eq!(
            (s.seen.len(), s.seen.by_end.len(), s.seen.by_read.len()),
            (MAX_SEEN, MAX_SEEN, MAX_SEEN)
        );
    }

    #[test]
    fn a_full_table_of_budget_windows_that_all_still_weigh_is_not_rescanned_for_each_new_one() {
        let c = Charges::new("m".into());
        for i in 0..MAX_SEEN as u64 {
            c.saw(&format!("w{i}"), 1, 10_000 + i, 0);
        }
        // 10,000 new windows (a budget node's new values) while all of them still weigh.
        for i in 0..MAX_SEEN {
            c.saw(&format!("new{i}"), 2, 50_000, 100);
        }
        assert_eq!(
            c.state().seen.looked_at,
            2 * MAX_SEEN,
            "per new one, the first window to end and the one read least recently, not the whole table"
        );
        assert_eq!((c.floor("new0"), c.floor("w9999")), (2, 0));
        // Read again, w0..w2 take the places of new0..new2; once w0 and w1 weigh no more they
        // make room, all at once, in order of their end, and no window read since does.
        for i in 0..3 {
            c.saw(&format!("w{i}"), 1, 10_000 + i, 200);
        }
        assert_eq!((c.floor("new2"), c.floor("new3")), (0, 2));
        c.saw("later", 3, 50_000, 10_001);
        assert_eq!(c.floor("later"), 3);
        assert_eq!((c.floor("w0"), c.floor("w1"), c.floor("w2")), (0, 0, 1));
        assert_eq!(
            c.floor("new3"),
            2,
            "not read least recently: the ended ones made room"
        );
        assert_eq!(c.state().seen.len(), MAX_SEEN - 1);
    }

    #[test]
    fn a_client_of_the_same_redis_takes_the_windows_read_before_as_read_before_its_own() {
        let old = Charges::new("old".into());
        for i in 0..MAX_SEEN {
            old.saw(&format!("w{i}"), 1, 10_000, 0);
        }
        let new = Charges::new("new".into());
        new.saw("mine", 7, 10_000, 0);
        new.saw("w3", 9, 10_000, 0);
        new.receive(old.hand_over());
        assert_eq!(
            (new.floor("mine"), new.floor("w3"), new.floor("w9999")),
            (7, 9, 1),
            "its own reads, newer, kept"
        );
        assert_eq!(
            (new.floor("w0"), new.floor("w1"), new.floor("w2")),
            (0, 1, 1),
            "one of the old client's, read first, made room"
        );
        assert_eq!(new.state().seen.len(), MAX_SEEN);
    }

    #[test]
    fn spend_is_summed_in_whole_billionths_and_sent_as_an_exact_decimal() {
        let c = Charges::new("m".into());
        for _ in 0..10 {
            c.add("spend".into(), usd(0.1, 10_000));
        }
        assert_eq!(c.waiting_spend("spend"), 1_000_000_000);
        let (b, _) = c.next_batch(1_000);
        let b = b.expect("batch");
        assert_eq!(b.entries[0].1.args(1_000).1, "1.000000000");
        assert_eq!(usd(0.000_000_001, 10_000).args(0).1, "0.000000001");
        assert_eq!(usd(1234.5, 10_000).args(0).1, "1234.500000000");
    }

    #[test]
    fn a_batch_sent_and_not_answered_yet_is_left_unwritten_as_perhaps_applied() {
        let c = Charges::new("m".into());
        c.add("spend:day".into(), usd(0.25, 10_000));
        let (b, _) = c.next_batch(1_000);
        assert_eq!(
            c.unwritten().unanswered_batches,
            0,
            "not sent yet (its marker being made)"
        );
        c.sending();
        let t = c.unwritten();
        assert_eq!((t.keys, t.spend_usd, t.unanswered_batches), (1, 0.25, 1));
        c.settle(b.expect("batch"), Outcome::Applied)
            .expect("not retired");
        assert_eq!(c.unwritten(), Tally::default());
    }

    #[test]
    fn what_is_left_unwritten_counts_the_days_spend_once() {
        let c = Charges::new("m".into());
        c.add("spend:day".into(), usd(0.25, 10_000));
        let mut week = usd(0.25, 10_000);
        week.kind = Kind::SpendAlso;
        c.add("spend:week".into(), week);
        c.add("route:1".into(), count(3, 10_000));
        let t = c.unwritten();
        assert_eq!((t.keys, t.spend_usd, t.counts), (3, 0.25, 3));
    }
}
