//! State shared by every pod of a gateway, in the Redis of `spec.redis` (URL in the keys
//! directory's `redis.url`): cache entries (`spec.cache.backend: redis`), global rate limits and
//! token budgets (`spec.rateLimit.scope: global`), spend (`spec.spendLimit`) and the windows of
//! dynamic routes' rate and budget nodes with `scope: global` ([`Windows`]).
//!
//! Redis is a help, not a dependency of serving: when it cannot be used in time the request is
//! served anyway — a cache miss; a global limit counted by this pod alone, in the counter a
//! per-pod limit uses, with the same limit (a budget, tokens or a budget node's, also by its
//! count last read plus what this pod charged since, so that it does not start again from the
//! pod's share); charges (spend, tokens, the counts of windows) kept in memory and added to
//! Redis once it answers ([`charges`]), at most once each, also at a stop (for the Redis of a
//! config a reload replaced too, [`Former`]). Each failure is counted in
//! `sidegate_redis_errors_total{op}` and warned about at most every 10 s. A request waits for
//! Redis at most [`REQUEST_WAIT`] in all, however many calls it makes ([`Wait`]); the writer of
//! the charges, in the background, [`WRITE_WAIT`] for each. Keys are
//! prefixed `sidegate:{namespace/name}:`, so gateways can share one Redis.

mod charges;
mod lua;

use std::future::Future;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use secrecy::{ExposeSecret, SecretString};

use sidegate_crds::policy::SpendPeriod;

use crate::budget;
use crate::cache::Key;
use crate::ratelimit::{self, Limiter};
use crate::telemetry::{ChargeDropped, Metrics, RedisOp};
use charges::{Added, Amount, Batch, Charge, Charges, Kind, Outcome};

/// Time a request gives a connection being made, and after which an answer not come is Redis
/// timing out.
const TIMEOUT: Duration = Duration::from_millis(250);
/// How long the writer of the charges waits for a connection and for each answer: in the
/// background, it can wait for a Redis too far away (or too loaded) for requests, whose calls
/// give up after [`REQUEST_WAIT`]; otherwise such a Redis would never get a pod's charges, nor
/// its first batch (whose marker's making must be answered first). Within [`LATE_ANSWER`], the
/// connection's own bound.
const WRITE_WAIT: Duration = Duration::from_secs(5);
const _: () = assert!(WRITE_WAIT.as_millis() < LATE_ANSWER.as_millis());
/// How long a count's answer is still read in the background once its request stopped waiting
/// for it: what Redis did (counted or refused) then corrects what the request took for it.
const LATE_ANSWER: Duration = Duration::from_secs(10);
/// After a failure, how long requests go without Redis before it is tried again: a Redis that
/// is down costs each request nothing instead of a timeout. Charges waiting for Redis are sent
/// again at this pace too.
const BACKOFF: Duration = Duration::from_secs(1);
/// At most one warning about Redis failures per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Timeouts in a row (each starting a back-off: calls that fail together count once) after
/// which the connection is dropped and made anew (a connection whose peer vanished may
/// otherwise time out until the kernel gives up on it, many minutes).
const RESET_AFTER: u64 = 3;
/// Refused commands in a row (nothing answered in between) after which the connection is made
/// anew: the redis crate's `ConnectionManager` keeps a reconnect that failed other than by I/O
/// (a `SELECT` refused) and answers every command with that error for good. A Redis refusing
/// only some commands (writes when out of memory, a read-only replica) answers the others, so
/// its connection stays.
const REPLACE_AFTER: u64 = 16;
/// How long one request waits for Redis in all: its limits, its cache reads and its route
/// nodes together wait about one answer's bound, not one each. Past it, its other Redis calls
/// fail at once (and the request goes on without Redis).
pub const REQUEST_WAIT: Duration = TIMEOUT.saturating_mul(2);

/// Fixed or sliding window in one script: allowed when `prev × remaining + (cur + 1) × interval
/// <= limit × interval` (ARGV 3 and 4, in milliseconds; a fixed window passes remaining 0), as
/// [`ratelimit::admit`] decides; refused requests are not counted. Answers `{allowed, cur, prev}`
/// (1 or 0, then the counts it saw), from which a refusal's wait is computed.
const RATE_SCRIPT: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local interval = tonumber(ARGV[4])
if prev * tonumber(ARGV[3]) + (cur + 1) * interval > tonumber(ARGV[1]) * interval then
  return {0, cur, prev}
end
cur = redis.call('INCR', KEYS[1])
if cur == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, cur, prev}
";

/// The Redis windows of a global limit: `{base}:{window}`, numbered on the wall clock so that
/// every pod agrees. The gateway's rate limit: `{prefix}rl:{limit}:{interval ms}` (a changed
/// limit counts afresh). A rate or budget node of a dynamic route, for one value of its key (or
/// for the requests without one): `{prefix}route:{digest}:{interval ms}`, where the digest is a
/// SHA-256 over the node's kind, its route and id and the value, each length-prefixed. Whatever
/// the app puts in its metadata, the key holds only hex digits of it: no value can name another
/// node's, another value's or another gateway's key, nor anything else in the Redis. A node's
/// limit is not in the key (a reload raising it keeps the counts); the interval is (a new one
/// counts afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    base: String,
    interval_ms: u64,
    /// What its keys count.
    kind: Kind,
}

impl Windows {
    fn key(&self, index: u64) -> String {
        format!("{}:{index}", self.base)
    }

    /// The window holding `now_ms`, and how far into it that is.
    fn at(&self, now_ms: u64) -> (u64, u64) {
        (now_ms / self.interval_ms, now_ms % self.interval_ms)
    }

    /// Unix ms from which window `index` weighs on no limit: its end, or a sliding one's, the
    /// next one's.
    fn weighs_until(&self, index: u64, sliding: bool) -> u64 {
        index
            .saturating_add(1 + u64::from(sliding))
            .saturating_mul(self.interval_ms)
    }

    /// `n` added to window `index` (negative: given back), for [`Charges`]: of use while the
    /// window weighs on a limit (`sliding`: through the next window too), the key kept two
    /// windows (as [`RATE_SCRIPT`] keeps it).
    fn charge(&self, index: u64, n: i64, sliding: bool) -> Charge {
        let end = |i: u64| i.saturating_add(1).saturating_mul(self.interval_ms);
        Charge {
            kind: self.kind,
            amount: Amount::Count(n),
            useful_until_ms: end(index.saturating_add(u64::from(sliding))),
            expire_at_ms: end(index.saturating_add(1)),
        }
    }
}

/// A gateway's Redis.
pub struct Shared {
    client: ::redis::Client,
    /// SHA-256 of the URL: a reload with the same Redis keeps this client and its connection.
    target: [u8; 32],
    /// SHA-256 of the address and database: the same Redis under another URL (a rotated
    /// password) takes this client's charges over ([`Self::take_over`]).
    place: [u8; 32],
    /// The client of the same Redis that replaced this one: charges made through this one
    /// since (by requests begun before the reload) go to it.
    successor: OnceLock<Arc<Shared>>,
    /// The clients of the same Redis this one took over from (and those they had): a batch a
    /// writer of theirs still has on its way comes here once settled, so a stop waits for it
    /// and says what it held when it did not come ([`Self::write_waiting`]). Held weakly: that
    /// writer holds its client while it runs.
    predecessors: std::sync::Mutex<Vec<std::sync::Weak<Shared>>>,
    conn: std::sync::Mutex<Option<ConnectionManager>>,
    /// Held while connecting: the others wait for that connection (within what their requests
    /// have left of [`REQUEST_WAIT`]), rather than each making its own or going uncounted.
    connecting: tokio::sync::Mutex<()>,
    /// After a failure, Redis is not tried until this ends.
    backoff: Backoff,
    /// Timeouts in a row.
    timeouts: AtomicU64,
    /// Refused commands in a row.
    refusals: AtomicU64,
    /// Redis failed (or could not be reached) since it last answered: its next answer is logged.
    down: AtomicBool,
    prefix: String,
    /// [`RATE_SCRIPT`], shared with the calls whose late answers are read in the background.
    script: Arc<lua::Script>,
    /// Charges waiting to be written, and their writer's state; its marker,
    /// `{prefix}charges:{random}`, holds the number of the last batch of charges this client
    /// had applied ([`charges::SCRIPT`]).
    charges: Charges,
    charge_script: lua::Script,
    /// [`charges::MARKER_PRIME`].
    marker_script: lua::Script,
    /// Whether Redis's eviction policy was asked about (once per client).
    policy_asked: AtomicBool,
    warnings: WarnThrottle,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Shared {
    /// A client for `url` (not connected yet); the error never repeats the URL.
    pub fn new(url: &SecretString, gateway: &str) -> Result<Self, String> {
        let client = ::redis::Client::open(url.expose_secret()).map_err(|e| {
            format!(
                "redis.url in the keys directory is not a valid Redis URL ({})",
                e.category()
            )
        })?;
        use sha2::{Digest, Sha256};
        let prefix = format!("sidegate:{gateway}:");
        let info = client.get_connection_info();
        let place = format!("{}/{}", info.addr(), info.redis_settings().db());
        Ok(Self {
            target: Sha256::digest(url.expose_secret().as_bytes()).into(),
            place: Sha256::digest(place.as_bytes()).into(),
            successor: OnceLock::new(),
            predecessors: std::sync::Mutex::default(),
            client,
            conn: std::sync::Mutex::default(),
            connecting: tokio::sync::Mutex::default(),
            backoff: Backoff::default(),
            timeouts: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            down: AtomicBool::new(false),
            charges: Charges::new(format!("{prefix}charges:{}", client_id())),
            prefix,
            script: Arc::new(lua::Script::new(RATE_SCRIPT)),
            charge_script: lua::Script::new(charges::SCRIPT),
            marker_script: lua::Script::new(charges::MARKER_PRIME),
            policy_asked: AtomicBool::new(false),
            warnings: WarnThrottle::default(),
        })
    }

    /// Whether `other` is the same Redis for the same gateway (a reload may keep `self`).
    pub fn same_as(&self, other: &Shared) -> bool {
        self.target == other.target && self.prefix == other.prefix
    }

    /// On a reload that replaces `old` with `self`: when both are the same Redis (address and
    /// database; the URL differs, its password rotated, or the gateway's name), `self` takes
    /// over `old`'s charges — what waits, and the batches whose answer never came with their
    /// marker and number, so each is still applied at most once — and `old`'s writer stops;
    /// charges made through `old` from now on (requests begun before the reload) and the batch
    /// it has on its way go to `self`. Charges keep their keys: those of a gateway renamed
    /// are written under its old name, where Redis holds the rest of what it counted.
    /// Another Redis: `old` keeps writing its charges to its own.
    /// Whether `self` took over (or had taken over) `old`'s charges.
    pub fn take_over(self: &Arc<Self>, old: &Arc<Shared>, metrics: &Arc<Metrics>) -> bool {
        if self.place != old.place || Arc::ptr_eq(self, old) {
            return false;
        }
        if old.successor.set(self.clone()).is_err() {
            return true;
        }
        let mut before = old.predecessors();
        before.push(old.clone());
        self.lock_predecessors()
            .extend(before.iter().map(Arc::downgrade));
        let (came, dropped) = self.charges.receive(old.charges.hand_over());
        if dropped > 0 {
            metrics.count_charges_dropped(ChargeDropped::Full, dropped);
        }
        if came {
            self.start_writer(metrics);
        }
        true
    }

    fn lock_predecessors(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Weak<Shared>>> {
        self.predecessors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The clients this one took over from whose writer may still have a batch on its way.
    fn predecessors(&self) -> Vec<Arc<Shared>> {
        let mut list = self.lock_predecessors();
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    fn unavailable(why: &'static str) -> ::redis::RedisError {
        ::redis::RedisError::from((::redis::ErrorKind::Io, why))
    }

    fn mark_down(&self) {
        self.down.store(true, Ordering::Relaxed);
        self.backoff.start(monotonic_ms());
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ConnectionManager>> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached_conn(&self) -> Option<ConnectionManager> {
        self.slot().clone()
    }

    /// The connection, made on first use, by `deadline`. Requests that come while it is made
    /// wait for it (a burst at a pod's start would otherwise all go uncounted in Redis), as
    /// long as they would wait for their own try ([`TIMEOUT`]) and within their deadline; for
    /// [`BACKOFF`] after a failure (with a connection made already too: one that just failed
    /// would make each request wait for its timeout again) they are told Redis is unavailable
    /// at once. The writer of the charges (`writer`) uses the connection made whatever the
    /// back-off (a Redis too slow for requests answers it, [`WRITE_WAIT`]), makes one only when
    /// requests would, and gives it all its deadline: a Redis whose first answers (the client's
    /// `CLIENT SETINFO`) take longer than a request waits is connected to all the same, and
    /// requests use that connection too.
    async fn conn(
        &self,
        deadline: tokio::time::Instant,
        writer: bool,
    ) -> Result<ConnectionManager, Failure> {
        let skipped = || self.backoff.active(monotonic_ms());
        if !writer && skipped() {
            return Err(Failure::skipped("redis unavailable (retrying shortly)"));
        }
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        if skipped() {
            return Err(Failure::skipped("redis unavailable (retrying shortly)"));
        }
        let began = tokio::time::Instant::now();
        // A request waits for another's try (or the writer's, which may take longer) as long as
        // for its own.
        let patience = |from: tokio::time::Instant| {
            if writer {
                deadline
            } else {
                deadline.min(from + TIMEOUT)
            }
        };
        let Ok(_connecting) =
            tokio::time::timeout_at(patience(began), self.connecting.lock()).await
        else {
            return Err(self.not_connected(began, "redis connection being made"));
        };
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        if skipped() {
            // The connection just tried failed.
            return Err(Failure::skipped("redis unavailable (retrying shortly)"));
        }
        let config = ConnectionManagerConfig::new()
            // Each try is bounded as its caller allows, below; this bounds the connection's own
            // reconnects, which a call waits for within its deadline.
            .set_connection_timeout(Some(WRITE_WAIT))
            // Each call waits as its request allows ([`Self::call`]); a late answer is still read
            // for a while ([`Self::call_late`]).
            .set_response_timeout(Some(LATE_ANSWER))
            .set_number_of_retries(0);
        let began = tokio::time::Instant::now();
        let made = tokio::time::timeout_at(
            patience(began),
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        let failed = |error| Failure {
            error,
            stage: Stage::Connect,
        };
        match made {
            Ok(Ok(c)) => {
                *self.slot() = Some(c.clone());
                if !self.policy_asked.swap(true, Ordering::Relaxed) {
                    tokio::spawn(warn_if_evicting(c.clone()));
                }
                Ok(c)
            }
            Ok(Err(e)) => {
                self.mark_down();
                Err(failed(e))
            }
            Err(_) => Err(self.not_connected(began, WAIT_SPENT)),
        }
    }

    /// No connection was made (or found made) since `began`: after [`TIMEOUT`] or more, Redis
    /// timed out, and the next requests go without it at once for [`BACKOFF`]; else the wait
    /// was cut short by the request's own, `why`, and the next request tries again.
    fn not_connected(&self, began: tokio::time::Instant, why: &'static str) -> Failure {
        if timed_out(began.elapsed()) {
            self.mark_down();
            Failure {
                error: Self::unavailable("redis connection timed out"),
                stage: Stage::Connect,
            }
        } else {
            Failure::skipped(why)
        }
    }

    /// Runs one Redis operation within what `wait` has left, bounded in time whatever the
    /// connection does. What a failure says about Redis ([`Verdict`]) decides what follows:
    /// the next requests go without Redis for [`BACKOFF`], the connection is made anew; the
    /// [`Failure`] says whether Redis may have done it.
    async fn call<T>(
        &self,
        wait: &Wait,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> ::redis::RedisResult<T>,
    ) -> Result<T, Failure> {
        let Asking {
            waiting,
            deadline,
            mut conn,
        } = self.ask(wait).await?;
        let asked = tokio::time::Instant::now();
        let result = tokio::time::timeout_at(deadline, op(&mut conn)).await;
        drop(waiting);
        match result {
            Ok(result) => self.answer(result, asked),
            Err(_) => Err(self.unanswered(asked)),
        }
    }

    /// [`Self::call`] for an operation whose answer is still of use when it comes late: when
    /// the wait ends first, the operation is handed back with the failure, to be read on
    /// ([`LATE_ANSWER`]).
    async fn call_late<T, F>(
        &self,
        wait: &Wait,
        op: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, (Failure, Option<F>)>
    where
        F: Future<Output = ::redis::RedisResult<T>> + Unpin,
    {
        let Asking {
            waiting,
            deadline,
            conn,
        } = self.ask(wait).await.map_err(|f| (f, None))?;
        let asked = tokio::time::Instant::now();
        let mut asking = op(conn);
        let result = tokio::time::timeout_at(deadline, &mut asking).await;
        drop(waiting);
        match result {
            Ok(result) => self.answer(result, asked).map_err(|f| (f, None)),
            Err(_) => Err((self.unanswered(asked), Some(asking))),
        }
    }

    /// The connection for a call and until when the call may wait, within what `wait` has left.
    async fn ask<'w>(&self, wait: &'w Wait) -> Result<Asking<'w>, Failure> {
        let Some(waiting) = wait.begin(Instant::now()) else {
            return Err(Failure::skipped(WAIT_SPENT));
        };
        let deadline = tokio::time::Instant::now() + waiting.bound;
        let conn = self.conn(deadline, wait.writer).await?;
        Ok(Asking {
            waiting,
            deadline,
            conn,
        })
    }

    /// What an answer to a call asked at `asked` says about Redis.
    fn answer<T>(
        &self,
        result: ::redis::RedisResult<T>,
        asked: tokio::time::Instant,
    ) -> Result<T, Failure> {
        match result {
            Ok(v) => {
                self.answered(!timed_out(asked.elapsed()));
                Ok(v)
            }
            Err(e) => {
                self.judge(verdict(&e));
                let stage = stage_of(&e);
                Err(Failure { error: e, stage })
            }
        }
    }

    /// A call asked at `asked` got no answer by its deadline: Redis timed out, or the
    /// request's own wait was cut short, which says nothing about Redis.
    fn unanswered(&self, asked: tokio::time::Instant) -> Failure {
        let why = if timed_out(asked.elapsed()) {
            self.judge(Verdict::Down);
            "redis answer timed out"
        } else {
            WAIT_SPENT
        };
        Failure {
            error: Self::unavailable(why),
            stage: Stage::Unanswered,
        }
    }

    /// Redis answered: the failures in a row end (its connection works), and its return after
    /// any is logged once — only when it answered `in_time` for a request: an answer that only
    /// the writer of the charges waited for ([`WRITE_WAIT`]) leaves requests going without it.
    fn answered(&self, in_time: bool) {
        // Loads first: every pod's request answers here, and a store would take the cache line.
        for in_a_row in [&self.timeouts, &self.refusals] {
            if in_a_row.load(Ordering::Relaxed) != 0 {
                in_a_row.store(0, Ordering::Relaxed);
            }
        }
        if in_time && self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed)
        {
            tracing::info!("redis reachable again");
        }
    }

    /// Acts on what a failed call says about Redis and its connection.
    fn judge(&self, verdict: Verdict) {
        let replace = match verdict {
            Verdict::Down => {
                // Calls made at once (a request's limits) that fail together are one failure.
                let first = !self.backoff.active(monotonic_ms());
                self.mark_down();
                first && self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= RESET_AFTER
            }
            Verdict::Unusable => {
                self.mark_down();
                true
            }
            Verdict::Refused => self.refusals.fetch_add(1, Ordering::Relaxed) + 1 >= REPLACE_AFTER,
        };
        if replace {
            self.timeouts.store(0, Ordering::Relaxed);
            self.refusals.store(0, Ordering::Relaxed);
            *self.slot() = None;
        }
    }

    /// Counts a failed `op` (as `connect` when the connection could not be made) and warns,
    /// at most every [`WARN_EVERY`].
    fn failed(&self, metrics: &Metrics, op: RedisOp, f: &Failure) {
        let op = if f.stage == Stage::Connect {
            RedisOp::Connect
        } else {
            op
        };
        metrics.count_redis_error(op);
        if self.warnings.allow(monotonic_ms()) {
            tracing::warn!(
                op = op.as_str(),
                error = %f.error,
                "redis {} failed; serving without it (global limits counted by this pod, charges kept to add later, cache missed)",
                op.as_str()
            );
        }
    }

    /// The cached response of `key`, if any; `Err` when the cache could not be read (Redis
    /// failed, or is skipped after a failure): nothing read now is likely to be stored either.
    pub async fn cache_get(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        key: &Key,
    ) -> Result<Option<CachedResponse>, Unreadable> {
        let got: Result<Option<Vec<u8>>, Failure> = self
            .call(wait, async |c| {
                ::redis::cmd("GET")
                    .arg(self.cache_key(key))
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok(v) => Ok(v.and_then(|raw| decode(&raw))),
            Err(f) => {
                self.failed(metrics, RedisOp::CacheGet, &f);
                Err(Unreadable)
            }
        }
    }

    /// Stores a response in the background for `ttl`; `flight` (the requests waiting for
    /// this response) ends once it is written. The response is encoded first: the write holds
    /// its own copy, not the response's buffers (its header values may be slices of an
    /// upstream connection's read buffer).
    pub fn cache_put(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        key: Key,
        response: &CachedResponse,
        ttl: Duration,
        flight: Option<crate::cache::FlightGuard>,
    ) {
        let this = self.clone();
        let raw = encode(response);
        tokio::spawn(async move {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let done: Result<(), Failure> = this
                .call(&Wait::default(), async |c| {
                    ::redis::cmd("SET")
                        .arg(this.cache_key(&key))
                        .arg(raw)
                        .arg("PX")
                        .arg(ms)
                        .query_async(c)
                        .await
                })
                .await;
            if let Err(f) = done {
                this.failed(&metrics, RedisOp::CacheSet, &f);
            }
            drop(flight);
        });
    }

    fn cache_key(&self, key: &Key) -> String {
        format!("{}cache:{}", self.prefix, hex::encode(key))
    }

    /// The windows of the gateway's global rate limit `s`: the limit and interval are part of
    /// the key, so a changed limit counts afresh.
    pub fn rate_windows(&self, s: &ratelimit::Settings) -> Windows {
        let interval_ms = millis(s.interval);
        Windows {
            base: format!("{}rl:{}:{interval_ms}", self.prefix, s.limit),
            interval_ms,
            kind: Kind::Requests,
        }
    }

    /// Counts a request at `now` against the global limit `s` counted in `w`, and in `pod`
    /// (this pod's counter of the same limit) whatever Redis does: `Ok(window)` counted (in
    /// Redis, in that window), `Err(retry_after)` over the limit. While Redis cannot be asked,
    /// `pod` decides alone, and a request it lets through is counted for Redis ([`Charges`]).
    /// A count whose answer does not come in time is taken as Redis's when `pod` lets the
    /// request through (not counted again; given back as any other) and as not made when `pod`
    /// refuses it; its answer is read on for [`LATE_ANSWER`] and what Redis did corrects that
    /// (a count Redis refused is added, one it made for a refused request given back). `op`
    /// names the call in `sidegate_redis_errors_total`.
    ///
    /// Unlike a budget's ([`Self::budget_floor`]), a request rate limit has no floor of the
    /// fleet's count last read while Redis cannot be used: each pod admits up to the limit on
    /// its own count (generous by the number of pods, for the outage only). A rate limit guards
    /// a request rate, usually over short windows that an outage soon outlasts, and is counted
    /// here on every request's path, where the floor would add a table write under a lock to
    /// each; a budget bounds an amount (tokens, a budget node's spend, over windows up to a
    /// month) that starting again from one pod's share would mostly forgive.
    #[allow(clippy::too_many_arguments)]
    pub async fn count(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        wait: &Wait,
        w: &Windows,
        s: &ratelimit::Settings,
        pod: &Limiter,
        now: Instant,
        op: RedisOp,
    ) -> Result<u64, Duration> {
        let (index, into) = w.at(unix_ms());
        let remaining = if s.sliding { w.interval_ms - into } else { 0 };
        let keys = [w.key(index), w.key(index.saturating_sub(1))];
        let args = [
            s.limit,
            w.interval_ms.saturating_mul(2),
            remaining,
            w.interval_ms,
        ];
        let script = self.script.clone();
        let counted = self
            .call_late(wait, move |mut c| {
                Box::pin(async move {
                    script
                        .key(&keys[0])
                        .key(&keys[1])
                        .arg(&args[..])
                        .invoke_async::<(i64, u64, u64)>(&mut c)
                        .await
                })
            })
            .await;
        match counted {
            Ok((0, cur, prev)) => Err(refused_wait(s, cur, prev, into, w.interval_ms)),
            Ok(_) => {
                pod.count(s, now);
                Ok(index)
            }
            Err((f, late)) => {
                self.failed(metrics, op, &f);
                let passed = pod.check(s, now);
                match late {
                    Some(late) => self.read_late_count(metrics, late, w, s, index, passed.is_ok()),
                    None if passed.is_ok() => {
                        self.charge(metrics, w.key(index), w.charge(index, 1, s.sliding));
                    }
                    None => {}
                }
                passed.map(|()| index)
            }
        }
    }

    /// Reads on, in the background, the answer of a count in window `index` of `w` whose
    /// request stopped waiting for it, and makes Redis agree with what this pod decided
    /// (`passed`): a count Redis refused for a request let through is added, one it made for a
    /// refused request given back. No answer within [`LATE_ANSWER`] leaves it as taken; a call
    /// that ended without one (its connection broke: a Redis killed) or with an error is taken
    /// as not made, as when that happens within the request's wait ([`Self::count`]).
    fn read_late_count<F>(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        late: F,
        w: &Windows,
        s: &ratelimit::Settings,
        index: u64,
        passed: bool,
    ) where
        F: Future<Output = ::redis::RedisResult<(i64, u64, u64)>> + Send + Unpin + 'static,
    {
        let (this, metrics, w, sliding) = (self.clone(), metrics.clone(), w.clone(), s.sliding);
        tokio::spawn(async move {
            let counted = match tokio::time::timeout(LATE_ANSWER, late).await {
                Ok(Ok((counted, _, _))) => counted != 0,
                // The connection's own bound ([`LATE_ANSWER`] too): no answer.
                Ok(Err(e)) if e.is_timeout() => return,
                Ok(Err(_)) => false,
                Err(_) => return,
            };
            let fix = match (counted, passed) {
                (true, false) => -1,
                (false, true) => 1,
                _ => return,
            };
            this.charge(&metrics, w.key(index), w.charge(index, fix, sliding));
        });
    }

    /// Gives back, in the background, a request [`Self::count`] counted in `window` (a route's
    /// rate node whose request never went upstream; the gateway's rate limit, whose request the
    /// spend limit or the token budget refused): never below 0, and never bringing back a
    /// window that expired meanwhile. The caller gives it back to its pod's counter.
    pub fn uncount(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        w: &Windows,
        s: &ratelimit::Settings,
        window: u64,
    ) {
        self.charge(metrics, w.key(window), w.charge(window, -1, s.sliding));
    }

    /// Adds `n` to the current window of `w` in the background: a rate node's request counted
    /// again, a budget node's charge (in its units). The caller adds it to its pod's counter.
    pub fn add(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        w: &Windows,
        s: &ratelimit::Settings,
        n: u64,
    ) {
        let (index, _) = w.at(unix_ms());
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.charge(metrics, w.key(index), w.charge(index, n, s.sliding));
    }

    /// Whether the global limit `s` counted in `w` has any room left at `now` (a route's budget
    /// node), counting what this pod keeps for Redis. While Redis cannot be read it has room
    /// when `pod` (this pod's counter of it) has and so has the window's count as last read plus
    /// what this pod charged it since ([`Self::budget_floor`]): a budget of the fleet does not
    /// start again from this pod's own share.
    #[allow(clippy::too_many_arguments)]
    pub async fn room(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        w: &Windows,
        s: &ratelimit::Settings,
        pod: &Limiter,
        now: Instant,
        op: RedisOp,
    ) -> Result<(), Duration> {
        let (index, into) = w.at(unix_ms());
        let (cur_key, prev_key) = (w.key(index), w.key(index.saturating_sub(1)));
        let got: Result<(Option<u64>, Option<u64>), Failure> = self
            .call(wait, async |c| {
                ::redis::cmd("MGET")
                    .arg(&cur_key)
                    .arg(&prev_key)
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok((cur, prev)) => {
                let (cur, prev) =
                    self.saw_budget(w, index, (&cur_key, &prev_key), (cur, prev), s.sliding);
                ratelimit::admit(
                    s.limit,
                    cur,
                    prev,
                    Duration::from_millis(into),
                    Duration::from_millis(w.interval_ms),
                    s.sliding,
                    ratelimit::Need::Any,
                )
            }
            Err(f) => {
                self.failed(metrics, op, &f);
                stricter(pod.room(s, now), self.budget_floor(w, s.limit, s.sliding))
            }
        }
    }

    /// The counts of a budget's window `index` of `w` (key `keys.0`) and the one before
    /// (`keys.1`) as read (`read`), with what this pod keeps for them; noted for
    /// [`Self::budget_floor`], the one before only when it weighs (`sliding`): a fixed window's
    /// limit never looks at it, and noting it would take a place of [`charges::MAX_SEEN`].
    fn saw_budget(
        &self,
        w: &Windows,
        index: u64,
        keys: (&str, &str),
        read: (Option<u64>, Option<u64>),
        sliding: bool,
    ) -> (u64, u64) {
        let now = unix_ms();
        let total = |i: u64, key: &str, read: Option<u64>, weighs: bool| {
            let n = self.with_waiting(read, key);
            if weighs {
                self.charges.saw(key, n, w.weighs_until(i, sliding), now);
            }
            n
        };
        (
            total(index, keys.0, read.0, true),
            total(index.saturating_sub(1), keys.1, read.1, sliding),
        )
    }

    /// Whether a budget of `limit` counted in `w` has room by the least its count can be while
    /// Redis cannot be read: the counts of its windows as this pod last read them plus what it
    /// charged them since ([`Charges::floor`]), as the spend limit starts from the spend last
    /// read. Request rate limits have no such floor (see [`Self::count`]).
    fn budget_floor(&self, w: &Windows, limit: u64, sliding: bool) -> Result<(), Duration> {
        let (index, into) = w.at(unix_ms());
        ratelimit::admit(
            limit,
            self.charges.floor(&w.key(index)),
            self.charges.floor(&w.key(index.saturating_sub(1))),
            Duration::from_millis(into),
            Duration::from_millis(w.interval_ms),
            sliding,
            ratelimit::Need::Any,
        )
    }

    /// A count read from Redis for `key` with what this pod keeps for it.
    fn with_waiting(&self, read: Option<u64>, key: &str) -> u64 {
        read.unwrap_or(0)
            .saturating_add(self.charges.waiting_count(key))
    }

    /// The windows of node `node` of route `route` (a budget node's when `budget`) for requests
    /// with `value` of its key (`None`: without one, or a node without a key).
    pub fn route_windows(
        &self,
        budget: bool,
        route: &str,
        node: &str,
        value: Option<&serde_json::Value>,
        interval: Duration,
    ) -> Windows {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(if budget { b"budget" } else { b"rate\0\0" });
        for part in [route.as_bytes(), node.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        match value {
            None => h.update([0]),
            Some(v) => {
                h.update([1]);
                h.update(v.to_string().as_bytes());
            }
        }
        let interval_ms = millis(interval);
        Windows {
            base: format!(
                "{}route:{}:{interval_ms}",
                self.prefix,
                hex::encode(h.finalize())
            ),
            interval_ms,
            kind: Kind::RouteNode,
        }
    }

    fn spend_key(&self, period: SpendPeriod, start: u64) -> String {
        format!(
            "{}spend:{}:{start}",
            self.prefix,
            budget::period_name(period)
        )
    }

    /// The gateway's spend in the period holding `now` (Unix seconds), in
    /// [`budget::UNITS_PER_USD`], with what this pod keeps for Redis; `Err` when Redis cannot be
    /// read.
    ///
    /// The key is summed by `INCRBYFLOAT`, as sidegate always has (pods of older versions
    /// sharing the Redis during a rollout add to and read the same key): this pod adds whole
    /// billionths, as exact decimals, and reads the total rounded to the nearest billionth, which
    /// undoes the drift of Redis's floating-point sum (its `long double` carries some 18 digits:
    /// exact to the billionth far past any period's spend).
    pub async fn spend_get(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        period: SpendPeriod,
        now: u64,
    ) -> Result<u64, Unreadable> {
        let (start, _) = budget::period_bounds(period, now);
        let key = self.spend_key(period, start);
        let got: Result<Option<f64>, Failure> = self
            .call(wait, async |c| {
                ::redis::cmd("GET").arg(&key).query_async(c).await
            })
            .await;
        match got {
            Ok(v) => Ok(budget::usd_units(v.unwrap_or(0.0))
                .saturating_add(self.charges.waiting_spend(&key))),
            Err(f) => {
                self.failed(metrics, RedisOp::Limits, &f);
                Err(Unreadable)
            }
        }
    }

    /// Adds `units` ([`budget::UNITS_PER_USD`]) to the gateway's spend in the day, the week and
    /// the month holding `now` (as [`budget::Ledger::add_spend`] does per pod: a reload changing
    /// the period finds the new period's spend), in the background; each key expires a day
    /// after its period ends.
    pub fn spend_add(self: &Arc<Self>, metrics: &Arc<Metrics>, units: u64, now: u64) {
        for period in [SpendPeriod::Day, SpendPeriod::Week, SpendPeriod::Month] {
            let (start, end) = budget::period_bounds(period, now);
            let charge = Charge {
                kind: if period == SpendPeriod::Day {
                    Kind::Spend
                } else {
                    Kind::SpendAlso
                },
                amount: Amount::Usd(units),
                useful_until_ms: end.saturating_mul(1000),
                expire_at_ms: end.saturating_add(86_400).saturating_mul(1000),
            };
            self.charge(metrics, self.spend_key(period, start), charge);
        }
    }

    /// Keeps `c` for `key` and has it written as soon as Redis takes it.
    fn charge(self: &Arc<Self>, metrics: &Arc<Metrics>, key: String, c: Charge) {
        match self.charges.add(key, c) {
            Added::Kept => {}
            Added::OneDropped => metrics.count_charges_dropped(ChargeDropped::Full, 1),
            Added::Retired(key, c) => {
                if let Some(next) = self.successor.get() {
                    next.charge(metrics, key, c);
                }
                return;
            }
        }
        self.start_writer(metrics);
    }

    /// Starts the writer of the charges, unless it runs.
    fn start_writer(self: &Arc<Self>, metrics: &Arc<Metrics>) {
        if self.charges.start_flushing() {
            let this = self.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move { this.flush(&metrics).await });
        }
    }

    /// Settles a batch of this client's writer (or, `adopted`, of the client this one
    /// replaced): when this one was replaced meanwhile, its successor takes it.
    fn settle(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        batch: Batch,
        outcome: Outcome,
        adopted: bool,
    ) {
        let settled = if adopted {
            self.charges.adopt(batch, outcome)
        } else {
            self.charges.settle(batch, outcome)
        };
        match settled {
            Ok(dropped) => {
                if dropped > 0 {
                    metrics.count_charges_dropped(ChargeDropped::Full, dropped);
                }
                if adopted {
                    self.start_writer(metrics);
                }
            }
            Err((batch, outcome)) => {
                if let Some(next) = self.successor.get() {
                    next.settle(metrics, batch, outcome, true);
                }
            }
        }
    }

    /// At shutdown, once the last request ended: waits for the writer to write what is
    /// waiting (the batch whose answer never came first), and a batch the writer of a client
    /// this one took over from still has on its way, which comes to it once settled; at most
    /// `within`. What could not be written is logged, with its amounts, and lost. `former`: a
    /// Redis the config no longer names (a reload moved the gateway to another one, or to
    /// none).
    pub async fn write_waiting(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        within: Duration,
        former: bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        self.start_writer(metrics);
        let before = self.predecessors();
        let mut done = true;
        for old in &before {
            // Retired, its writer stops once it settled its batch (handed here: this writer
            // started), or holding nothing.
            done &= old.charges.idle(deadline).await || old.charges.unwritten().keys == 0;
        }
        if done && self.charges.idle(deadline).await {
            return;
        }
        let mut left = self.charges.unwritten();
        for old in &before {
            left.merge(&old.charges.unwritten());
        }
        tracing::warn!(
            keys = left.keys,
            spend_usd = left.spend_usd,
            tokens = left.tokens,
            window_counts = left.counts,
            unanswered_batches = left.unanswered_batches,
            within_secs = within.as_secs_f64(),
            redis = if former { "former" } else { "current" },
            "charges not written to redis at shutdown: lost (those of unanswered batches may have been applied)"
        );
    }

    /// Writes the charges waiting, a batch at a time, until none waits; after a failure, again
    /// every [`BACKOFF`]. Each call waits [`WRITE_WAIT`] for its answer, on the connection
    /// made even while requests go without Redis ([`Shared::conn`]), so a Redis slower than
    /// requests can wait for gets the charges all the same.
    async fn flush(self: &Arc<Self>, metrics: &Arc<Metrics>) {
        // The last batch first sent found another Redis than its marker's.
        let mut elsewhere = false;
        loop {
            let (batch, dropped) = self.charges.next_batch(unix_ms());
            if dropped > 0 {
                metrics.count_charges_dropped(ChargeDropped::WindowEnded, dropped);
            }
            let Some(mut batch) = batch else { return };
            let now = unix_ms();
            if self.charges.needs_marker(&batch, now) {
                let made: Result<String, Failure> = self
                    .call(&Wait::writer(), async |c| {
                        self.marker_script
                            .key(&*batch.marker)
                            .arg(charges::MARKER_TTL_MS)
                            .invoke_async(c)
                            .await
                    })
                    .await;
                match made {
                    Ok(run_id) => self.charges.marker_made(&run_id, now),
                    Err(f) => {
                        // Not made, as far as anyone knows (one whose answer came late may not
                        // have run: made again, answered, before a batch is first sent).
                        self.failed(metrics, RedisOp::Charge, &f);
                        // The batch was not sent: it waits again, as new.
                        self.settle(metrics, batch, Outcome::NotApplied, false);
                        self.pause().await;
                        continue;
                    }
                }
            }
            self.charges.stamp(&mut batch);
            self.charges.sending();
            let written: Result<i64, Failure> = self
                .call(&Wait::writer(), async |c| {
                    let mut call = self.charge_script.prepare_invoke();
                    call.key(&*batch.marker)
                        .arg(batch.seq)
                        .arg(charges::MARKER_TTL_MS)
                        .arg(u8::from(batch.is_resent()))
                        .arg(&*batch.run_id);
                    for (key, charge) in &batch.entries {
                        let (kind, amount, ttl) = charge.args(now);
                        call.key(key).arg(kind).arg(amount).arg(ttl);
                    }
                    call.invoke_async(c).await
                })
                .await;
            let was_elsewhere = std::mem::take(&mut elsewhere);
            match written {
                Ok(charges::MARKER_LOST) => {
                    self.marker_lost(metrics, &batch);
                    self.settle(metrics, batch, Outcome::Applied, false);
                }
                Ok(charges::ELSEWHERE) => {
                    // Another Redis than the one whose marker was made (it restarted, seen by
                    // requests only): nothing applied; the marker is made there, and the batch
                    // sent again as new. Twice in a row (a Redis whose run_id keeps changing,
                    // a proxy in front of several), at the pace of failures.
                    self.charges.marker_unsure();
                    self.settle(metrics, batch, Outcome::NotApplied, false);
                    elsewhere = true;
                    if was_elsewhere {
                        self.pause().await;
                    }
                    continue;
                }
                Ok(applied) => {
                    if applied == 1 {
                        self.charges.marker_written(&batch.marker, now);
                    }
                    self.settle(metrics, batch, Outcome::Applied, false);
                }
                Err(f) => {
                    self.failed(metrics, RedisOp::Charge, &f);
                    if matches!(f.stage, Stage::Broken | Stage::Connect) {
                        // Redis may be restarting: its marker (and run_id) are asked again.
                        self.charges.marker_unsure();
                    }
                    let outcome = if f.maybe_done() {
                        Outcome::Unanswered
                    } else {
                        Outcome::NotApplied
                    };
                    self.settle(metrics, batch, outcome, false);
                    self.pause().await;
                }
            }
        }
    }

    /// Waits [`BACKOFF`] before the writer tries again, unless this client was replaced: what
    /// it held went to its successor, and its writer stops at once (a stop waits for it).
    async fn pause(&self) {
        if self.successor.get().is_none() {
            tokio::time::sleep(BACKOFF).await;
        }
    }

    /// A batch sent again found its marker gone from Redis (evicted): it is dropped, counted,
    /// and said with its amounts, rather than perhaps counted twice.
    fn marker_lost(&self, metrics: &Metrics, batch: &Batch) {
        let lost = batch.tally();
        metrics.count_charges_dropped(ChargeDropped::Unconfirmed, lost.keys as u64);
        tracing::warn!(
            keys = lost.keys,
            spend_usd = lost.spend_usd,
            tokens = lost.tokens,
            window_counts = lost.counts,
            "charges not written to redis: their batch went unanswered and redis no longer holds its marker (evicted? see maxmemory-policy), so it may have been applied already; dropped rather than perhaps counted twice"
        );
    }

    /// The token budget's minutes: `{prefix}tpm:{minute}`.
    fn token_windows(&self) -> Windows {
        Windows {
            base: format!("{}tpm", self.prefix),
            interval_ms: budget::TOKEN_WINDOW.as_millis() as u64,
            kind: Kind::Tokens,
        }
    }

    /// Whether the gateway's token budget has room, counting what this pod keeps for Redis.
    /// While Redis cannot be read it has room when `pod` (this pod's own count) says so and so
    /// does the gateway's count as last read plus what this pod used since
    /// ([`Self::budget_floor`]).
    pub async fn tokens_left(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        s: &budget::TokenSettings,
        pod: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(), Duration> {
        let w = self.token_windows();
        let (index, into) = w.at(unix_ms());
        let (cur_key, prev_key) = (w.key(index), w.key(index.saturating_sub(1)));
        let got: Result<(Option<u64>, Option<u64>), Failure> = self
            .call(wait, async |c| {
                ::redis::cmd("MGET")
                    .arg(&cur_key)
                    .arg(&prev_key)
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok((cur, prev)) => {
                let (cur, prev) =
                    self.saw_budget(&w, index, (&cur_key, &prev_key), (cur, prev), s.sliding);
                budget::budget_left(
                    s.per_minute,
                    cur,
                    prev,
                    Duration::from_millis(into),
                    budget::TOKEN_WINDOW,
                    s.sliding,
                )
            }
            Err(f) => {
                self.failed(metrics, RedisOp::Limits, &f);
                stricter(pod(), self.budget_floor(&w, s.per_minute, s.sliding))
            }
        }
    }

    /// Adds `n` tokens to the gateway's current minute, in the background (`sliding`: of use
    /// through the next minute).
    pub fn tokens_add(self: &Arc<Self>, metrics: &Arc<Metrics>, n: u64, sliding: bool) {
        let w = self.token_windows();
        let (index, _) = w.at(unix_ms());
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.charge(metrics, w.key(index), w.charge(index, n, sliding));
    }
}

/// Room only when both `a` and `b` say so; else the longer wait.
fn stricter(a: Result<(), Duration>, b: Result<(), Duration>) -> Result<(), Duration> {
    match (a, b) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(x), Err(y)) => Err(x.max(y)),
        (Err(x), Ok(())) | (Ok(()), Err(x)) => Err(x),
    }
}

/// Warns when Redis may evict sidegate's keys (`maxmemory-policy` other than `noeviction`):
/// counts, spend and the markers that keep charges from being applied twice are all keys with a
/// time to live, so `allkeys-*` and `volatile-*` alike may drop them (a count lost; a charge
/// whose marker went is dropped, not counted twice, [`charges::MARKER_PRIME`]). Asked with
/// `INFO memory`, which managed Redis services answer where they refuse `CONFIG GET`; a Redis
/// refusing that too is not asked again, and nothing is said.
async fn warn_if_evicting(mut c: ConnectionManager) {
    let asked = tokio::time::timeout(
        WRITE_WAIT,
        ::redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(&mut c),
    )
    .await;
    let info = match asked {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "redis did not say its maxmemory-policy");
            return;
        }
        Err(_) => return,
    };
    if let Some(policy) = evicting_policy(&info) {
        tracing::warn!(
            maxmemory_policy = policy,
            "redis may evict keys (maxmemory-policy {policy}): global limits' counts and spend may be lost, and charges whose answer never came are dropped when their marker was evicted; give sidegate a redis with maxmemory-policy noeviction"
        );
    }
}

/// The `maxmemory_policy` an `INFO memory` answer names, unless it is `noeviction` (or absent).
fn evicting_policy(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix("maxmemory_policy:"))
        .filter(|p| !p.is_empty() && *p != "noeviction")
}

/// The clients of Redis servers a reload stopped using (the gateway moved to another one, or
/// to none): each writes what it keeps to its own Redis while the pod runs, and at shutdown
/// ([`Shared::write_waiting`]). Held weakly: a client that keeps charges has its writer running,
/// which holds it; once nothing is left to write it goes.
#[derive(Debug, Default)]
pub struct Former(std::sync::Mutex<Vec<std::sync::Weak<Shared>>>);

impl Former {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Weak<Shared>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes `old`, replaced by a reload with a client of another Redis (or none).
    pub fn keep(&self, old: &Arc<Shared>) {
        let mut list = self.list();
        list.retain(|w| w.strong_count() > 0);
        if !list
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(old)))
        {
            list.push(Arc::downgrade(old));
        }
    }

    /// Those that may still hold charges.
    pub fn holding(&self) -> Vec<Arc<Shared>> {
        self.list()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }
}

/// A random name for this client's charges marker: pods (and clients of one pod made on a
/// reload) never share one.
fn client_id() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(std::env::var("HOSTNAME").unwrap_or_default().as_bytes());
    h.update(std::process::id().to_be_bytes());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(nanos.to_be_bytes());
    static MADE: AtomicU64 = AtomicU64::new(0);
    h.update(MADE.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    hex::encode(&h.finalize()[..8])
}

/// A Redis call that failed, and how far it got.
#[derive(Debug)]
struct Failure {
    error: ::redis::RedisError,
    stage: Stage,
}

/// How far a failed call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not asked: Redis skipped after a failure, or the request's wait was spent.
    Skipped,
    /// The connection could not be made.
    Connect,
    /// Asked, and refused: not done.
    Refused,
    /// Asked, and no answer came by the deadline: Redis may do it yet (a Redis that is slow or
    /// stopped runs what it received once it goes on).
    Unanswered,
    /// Asked, and the call ended without an answer of Redis's (the connection broke, an answer
    /// could not be read): done or not, nobody knows (a Redis killed, most likely not).
    Broken,
}

impl Failure {
    fn skipped(why: &'static str) -> Self {
        Self {
            error: Shared::unavailable(why),
            stage: Stage::Skipped,
        }
    }

    /// Whether Redis may have done what it was asked: a write must not be sent again as new.
    fn maybe_done(&self) -> bool {
        matches!(self.stage, Stage::Unanswered | Stage::Broken)
    }
}

/// How far a command that ended with `e` got: without an answer of Redis's (I/O: the
/// connection broke, or could not be made again; an answer that could not be read), or
/// refused, by Redis or before it was sent.
fn stage_of(e: &::redis::RedisError) -> Stage {
    use ::redis::ErrorKind as K;
    match e.kind() {
        K::Io | K::Parse | K::UnexpectedReturnType => Stage::Broken,
        _ => Stage::Refused,
    }
}

/// A call about to be asked: its connection, and until when it may wait.
struct Asking<'w> {
    waiting: Waiting<'w>,
    deadline: tokio::time::Instant,
    conn: ConnectionManager,
}

/// How long a request refused by [`RATE_SCRIPT`] waits, from the counts the script saw `into`
/// (milliseconds) the window: the same wait as a per-pod limit's. At least a millisecond, should
/// the script's floating-point comparison and [`ratelimit::admit`] ever disagree on the edge.
fn refused_wait(
    s: &ratelimit::Settings,
    cur: u64,
    prev: u64,
    into: u64,
    interval_ms: u64,
) -> Duration {
    ratelimit::admit(
        s.limit,
        cur,
        prev,
        Duration::from_millis(into),
        Duration::from_millis(interval_ms),
        s.sliding,
        ratelimit::Need::One,
    )
    .err()
    .unwrap_or(Duration::ZERO)
    .max(Duration::from_millis(1))
}

/// Milliseconds since the process started, on a monotonic clock: a back-off or a warning
/// throttle timed on the wall clock would last as long as a step back of it (NTP, a resumed
/// VM), and Redis would be skipped (global limits counted by each pod alone) all that time.
fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Why a call failed without asking Redis, or without waiting for its answer: the request (or
/// the background write) had waited for Redis [`REQUEST_WAIT`] in all.
const WAIT_SPENT: &str = "redis not waited for: this request waited for it 500 ms in all";

/// Whether a wait of `waited` that ended without an answer was Redis's timeout: a wait cut
/// shorter than [`TIMEOUT`] by what the request had left of [`REQUEST_WAIT`] says nothing of
/// Redis (a Redis 400 ms away answers each request's first call in time, not its second).
fn timed_out(waited: Duration) -> bool {
    waited >= TIMEOUT
}

/// What a failed call says about Redis and its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No answer in time, the connection broke, or Redis cannot serve now (loading its data,
    /// its primary down): skipped for [`BACKOFF`]; [`RESET_AFTER`] in a row make the
    /// connection anew.
    Down,
    /// The connection can serve nothing: authentication refused (the `ConnectionManager`'s
    /// reconnect to a Redis restarted with another password, kept for good), no password
    /// given where one is needed, an answer that is no Redis reply. Skipped for [`BACKOFF`],
    /// then made anew.
    Unusable,
    /// This command was refused (a write out of memory, a read-only replica, a script error):
    /// the connection serves the others; [`REPLACE_AFTER`] in a row make it anew.
    Refused,
}

fn verdict(e: &::redis::RedisError) -> Verdict {
    use ::redis::{ErrorKind as K, ServerErrorKind as S};
    match e.kind() {
        K::Io | K::Server(S::BusyLoading | S::MasterDown | S::ClusterDown | S::TryAgain) => {
            Verdict::Down
        }
        K::AuthenticationFailed
        | K::InvalidClientConfig
        | K::Client
        | K::Parse
        | K::RESP3NotSupported => Verdict::Unusable,
        _ if e.code() == Some("NOAUTH") => Verdict::Unusable,
        _ => Verdict::Refused,
    }
}

/// How long one request (or one background write) has waited for Redis: the time any of its
/// calls was waiting (calls made at once count once). Once it reaches [`REQUEST_WAIT`] its
/// other calls go without Redis at once; a call of the writer of the charges has its own,
/// [`WRITE_WAIT`] ([`Wait::writer`]).
#[derive(Debug)]
pub struct Wait {
    waited: std::sync::Mutex<Waited>,
    /// How long its calls may wait in all.
    total: Duration,
    /// The writer of the charges' ([`Wait::writer`]).
    writer: bool,
}

impl Default for Wait {
    fn default() -> Self {
        Self {
            waited: std::sync::Mutex::default(),
            total: REQUEST_WAIT,
            writer: false,
        }
    }
}

#[derive(Debug, Default)]
struct Waited {
    /// Before the calls waiting now.
    before: Duration,
    /// Calls waiting now.
    calls: u32,
    /// Since when they have been waiting (while `calls > 0`).
    since: Option<Instant>,
}

impl Wait {
    /// One call of the writer of the charges: [`WRITE_WAIT`] for its answer, connection
    /// included, on the connection made even during requests' back-off ([`Shared::conn`]).
    fn writer() -> Self {
        Self {
            total: WRITE_WAIT,
            writer: true,
            ..Self::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Waited> {
        self.waited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A call begins at `now`: how long it may wait, `None` when the wait is spent.
    fn begin(&self, now: Instant) -> Option<Waiting<'_>> {
        let mut w = self.state();
        let waited = w.before
            + w.since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let bound = self.total.saturating_sub(waited);
        if bound.is_zero() {
            return None;
        }
        if w.calls == 0 {
            w.since = Some(now);
        }
        w.calls += 1;
        Some(Waiting { wait: self, bound })
    }

    /// A call ends at `now`.
    fn end(&self, now: Instant) {
        let mut w = self.state();
        w.calls = w.calls.saturating_sub(1);
        if w.calls == 0
            && let Some(since) = w.since.take()
        {
            w.before += now.saturating_duration_since(since);
        }
    }
}

/// A call waiting for Redis: its wait ends when it is dropped, however the call ends.
struct Waiting<'a> {
    wait: &'a Wait,
    /// How long it may wait.
    bound: Duration,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.wait.end(Instant::now());
    }
}

/// The period after a failure during which Redis is not tried, on the [`monotonic_ms`] clock.
#[derive(Debug, Default)]
struct Backoff {
    /// When it ends; 0 (the clock's start) when Redis never failed.
    until: AtomicU64,
}

impl Backoff {
    /// A failure at `now`: no Redis for [`BACKOFF`] (never shortening one already running).
    fn start(&self, now: u64) {
        let until = now.saturating_add(BACKOFF.as_millis() as u64);
        self.until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether Redis is still skipped at `now`.
    fn active(&self, now: u64) -> bool {
        now < self.until.load(Ordering::Relaxed)
    }
}

/// Lets one warning through per [`WARN_EVERY`], on the [`monotonic_ms`] clock.
#[derive(Debug, Default)]
struct WarnThrottle {
    /// 1 + the time of the last warning; 0 before the first (the clock starts at 0 too).
    last: AtomicU64,
}

impl WarnThrottle {
    /// Whether a warning at `now` is logged (then the next ones wait [`WARN_EVERY`]).
    fn allow(&self, now: u64) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now >= (last - 1).saturating_add(WARN_EVERY.as_millis() as u64);
        due && self
            .last
            .compare_exchange(
                last,
                now.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

/// `d` in whole milliseconds, at least 1.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Wall-clock milliseconds: the windows of global limits, which every pod must agree on.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The shared cache could not be read: Redis failed, or is skipped after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// A response as stored in Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

const MAGIC: &[u8] = b"SG1";

/// `SG1`, status (u16), header count (u16), each header as name length (u16), name, value
/// length (u32), value; then the body.
fn encode(r: &CachedResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.body.len() + 64 * r.headers.len() + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&r.status.as_u16().to_be_bytes());
    let n = u16::try_from(r.headers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for (name, value) in r.headers.iter().take(usize::from(n)) {
        let name = name.as_str().as_bytes();
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&r.body);
    out
}

/// The inverse of [`encode`]; `None` for anything else (another version, a foreign value).
fn decode(raw: &[u8]) -> Option<CachedResponse> {
    let mut rest = raw.strip_prefix(MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    let u16_of = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let status = StatusCode::from_u16(u16_of(take(2)?)).ok()?;
    let count = u16_of(take(2)?);
    // A foreign value may claim any count: `with_capacity` panics past 24576 (and a response
    // carries tens of headers); the loop below stops at the first header that is not there.
    let mut headers = HeaderMap::with_capacity(usize::from(count.min(128)));
    for _ in 0..count {
        let n = usize::from(u16_of(take(2)?));
        let name = HeaderName::from_bytes(take(n)?).ok()?;
        let len = take(4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let value = HeaderValue::from_bytes(take(len)?).ok()?;
        headers.append(name, value);
    }
    Some(CachedResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_responses_round_trip_and_foreign_values_are_misses() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        let r = CachedResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
        };
        assert_eq!(decode(&encode(&r)), Some(r.clone()));
        assert_eq!(decode(b"hello"), None);
        let raw = encode(&r);
        assert_eq!(decode(&raw[..10]), None, "truncated");
        // Anyone who can write to the Redis may plant a value claiming 65535 headers.
        let mut planted = MAGIC.to_vec();
        planted.extend_from_slice(&200u16.to_be_bytes());
        planted.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(decode(&planted), None, "no panic, a miss");
    }

    #[test]
    fn a_back_off_skips_redis_for_one_second_and_a_new_failure_extends_it() {
        let b = Backoff::default();
        assert!(!b.active(0), "Redis is tried until it fails");
        b.start(5_000);
        assert!(b.active(5_000) && b.active(5_999));
        assert!(!b.active(6_000));
        b.start(5_500);
        assert!(b.active(6_499) && !b.active(6_500));
        b.start(5_200);
        assert!(
            b.active(6_499),
            "an older failure does not shorten the back-off"
        );
    }

    #[test]
    fn redis_failures_warn_at_once_even_at_process_start_then_at_most_every_10_s() {
        let w = WarnThrottle::default();
        assert!(
            w.allow(0),
            "the first failure warns, at the clock's start too"
        );
        assert!(!w.allow(0) && !w.allow(9_999));
        assert!(w.allow(10_000));
        assert!(!w.allow(10_001));
        assert!(w.allow(25_000));
    }

    #[test]
    fn a_back_off_is_timed_on_the_process_clock_so_a_wall_clock_step_cannot_stretch_it() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        let before = monotonic_ms();
        shared.mark_down();
        let until = shared.backoff.until.load(Ordering::Relaxed);
        let after = monotonic_ms();
        let backoff = BACKOFF.as_millis() as u64;
        assert!(
            (before + backoff..=after + backoff).contains(&until),
            "back-off ends at {until}, not {backoff} ms after now ({before}..{after}) on the monotonic clock"
        );
        assert!(shared.backoff.active(after));
    }

    /// The error Redis answers with `reply` (`-CODE detail`).
    fn answered_error(reply: &str) -> ::redis::RedisError {
        match ::redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()) {
            Ok(::redis::Value::ServerError(e)) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn errors_that_leave_the_connection_unusable_replace_it_and_refused_commands_do_not() {
        let kind = |k: ::redis::ErrorKind| ::redis::RedisError::from((k, "x"));
        // A reconnect refused for its password is kept by the ConnectionManager for good: only
        // a new one uses the Redis again once the password works.
        assert_eq!(
            verdict(&kind(::redis::ErrorKind::AuthenticationFailed)),
            Verdict::Unusable
        );
        assert_eq!(
            verdict(&answered_error("NOAUTH Authentication required.")),
            Verdict::Unusable
        );
        assert_eq!(verdict(&kind(::redis::ErrorKind::Parse)), Verdict::Unusable);
        assert_eq!(verdict(&kind(::redis::ErrorKind::Io)), Verdict::Down);
        assert_eq!(
            verdict(&Shared::unavailable("redis answer timed out")),
            Verdict::Down
        );
        assert_eq!(
            verdict(&answered_error(
                "LOADING Redis is loading the dataset in memory"
            )),
            Verdict::Down
        );
        // One command refused: the connection answers the others.
        for reply in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "NOPERM User default has no permissions to run the 'evalsha' command",
            "ERR Error running script",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert_eq!(verdict(&answered_error(reply)), Verdict::Refused, "{reply}");
        }
    }

    #[test]
    fn a_command_that_ended_without_an_answer_may_be_done_and_one_refused_is_not() {
        let io = |k: std::io::ErrorKind| ::redis::RedisError::from(std::io::Error::from(k));
        // A connection reset: a Redis killed, most likely not done; a write is still sent
        // again with its batch number, not as new.
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
        ] {
            let broken = Failure {
                error: io(kind),
                stage: stage_of(&io(kind)),
            };
            assert_eq!(broken.stage, Stage::Broken);
            assert!(broken.maybe_done());
        }
        for reply in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "NOAUTH Authentication required.",
        ] {
            let refused = Failure {
                error: answered_error(reply),
                stage: stage_of(&answered_error(reply)),
            };
            assert_eq!(refused.stage, Stage::Refused, "{reply}");
            assert!(!refused.maybe_done(), "{reply}");
        }
        assert!(!Failure::skipped("back-off").maybe_done());
    }

    #[test]
    fn refused_commands_replace_the_connection_only_when_nothing_is_answered_in_between() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        let refused = || {
            for _ in 0..REPLACE_AFTER - 1 {
                shared.judge(Verdict::Refused);
            }
        };
        refused();
        shared.answered(true);
        refused();
        assert_eq!(shared.refusals.load(Ordering::Relaxed), REPLACE_AFTER - 1);
        shared.judge(Verdict::Refused);
        assert_eq!(shared.refusals.load(Ordering::Relaxed), 0, "replaced");
        assert!(
            !shared.backoff.active(monotonic_ms()),
            "a refused command is no reason to skip Redis"
        );
        shared.judge(Verdict::Unusable);
        assert!(shared.backoff.active(monotonic_ms()));
        assert!(shared.down.load(Ordering::Relaxed));
        shared.answered(true);
        assert!(!shared.down.load(Ordering::Relaxed), "back, said once");
    }

    #[test]
    fn a_request_waits_for_redis_500_ms_in_all_and_calls_made_at_once_count_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let wait = Wait::default();
        // Three calls at once (the limits), answered after 400 ms: 400 ms waited, not 1.2 s.
        let calls: Vec<_> = (0..3).map(|_| wait.begin(t0).expect("left")).collect();
        assert!(calls.iter().all(|c| c.bound == REQUEST_WAIT));
        for c in calls {
            std::mem::forget(c);
            wait.end(ms(400));
        }
        // Time between calls (reading the body, guardrails) is not waiting for Redis.
        let cache = wait.begin(ms(900)).expect("100 ms left");
        assert_eq!(cache.bound, Duration::from_millis(100));
        // Another begins 60 ms into it: 40 ms left.
        let other = wait.begin(ms(960)).expect("40 ms left");
        assert_eq!(other.bound, Duration::from_millis(40));
        std::mem::forget((cache, other));
        wait.end(ms(1_000));
        wait.end(ms(1_000));
        assert!(
            wait.begin(ms(1_000)).is_none(),
            "spent: without Redis at once"
        );
        assert!(wait.begin(ms(60_000)).is_none(), "for good");
    }

    #[test]
    fn the_writer_of_the_charges_waits_5_s_for_each_answer_where_a_request_waits_500_ms_in_all() {
        let t0 = Instant::now();
        let writer = Wait::writer();
        let call = writer.begin(t0).expect("a first call");
        assert_eq!(call.bound, WRITE_WAIT);
        assert!(
            WRITE_WAIT > Duration::from_millis(3 * 1_400),
            "a Redis 1.4 s a round trip away: the connection the writer makes, then a script it \
             does not hold yet (EVALSHA, then EVAL: lua::Script)"
        );
        assert_eq!(Wait::default().begin(t0).expect("left").bound, REQUEST_WAIT);
    }

    #[test]
    fn an_answer_only_the_writer_waited_for_keeps_the_connection_but_does_not_say_redis_is_back() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        shared.judge(Verdict::Down);
        assert_eq!(shared.timeouts.load(Ordering::Relaxed), 1);
        shared.answered(false);
        assert_eq!(
            shared.timeouts.load(Ordering::Relaxed),
            0,
            "the connection answers: no timeout in a row to replace it for"
        );
        assert!(
            shared.down.load(Ordering::Relaxed),
            "requests still cannot wait for it: not logged as back"
        );
        shared.answered(true);
        assert!(!shared.down.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_a_connection_being_made_as_long_as_for_their_own_then_go_without_redis()
     {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        // The writer makes the connection to a Redis whose first answers take 1.4 s.
        let making = shared.connecting.lock().await;
        let began = tokio::time::Instant::now();
        let f = shared
            .conn(began + REQUEST_WAIT, false)
            .await
            .expect_err("not made");
        assert_eq!(began.elapsed(), TIMEOUT, "not the whole 500 ms");
        assert_eq!(f.stage, Stage::Connect, "Redis timed out");
        // The next ones go without Redis at once, as after their own try.
        let began = tokio::time::Instant::now();
        let f = shared
            .conn(began + REQUEST_WAIT, false)
            .await
            .expect_err("skipped");
        assert_eq!((f.stage, began.elapsed()), (Stage::Skipped, Duration::ZERO));
        // A request whose own wait ends first says nothing of Redis.
        shared.backoff.until.store(0, Ordering::Relaxed);
        let began = tokio::time::Instant::now();
        let f = shared
            .conn(began + Duration::from_millis(100), false)
            .await
            .expect_err("its wait spent");
        assert_eq!(f.stage, Stage::Skipped);
        assert!(!shared.backoff.active(monotonic_ms()));
        drop(making);
    }

    #[tokio::test]
    async fn a_late_count_whose_connection_broke_is_taken_as_not_made_and_one_never_answered_as_made()
     {
        let metrics = Arc::new(Metrics::new());
        let s = ratelimit::Settings {
            limit: 10,
            interval: Duration::from_secs(3600),
            sliding: false,
            global: true,
        };
        let counted_for_redis = async |late: ::redis::RedisResult<(i64, u64, u64)>, passed| {
            let shared = Arc::new(
                Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw")
                    .expect("valid url"),
            );
            let w = shared.rate_windows(&s);
            let (index, _) = w.at(unix_ms());
            shared.read_late_count(&metrics, std::future::ready(late), &w, &s, index, passed);
            // The late answer is read in a task of its own.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            shared.charges.unwritten().counts
        };
        let io = |k: std::io::ErrorKind| ::redis::RedisError::from(std::io::Error::from(k));
        for broken in [
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::BrokenPipe),
        ] {
            assert_eq!(
                counted_for_redis(Err(broken), true).await,
                1,
                "let through, and not made in Redis: counted there"
            );
        }
        assert_eq!(
            counted_for_redis(Err(answered_error("OOM command not allowed")), true).await,
            1,
            "refused: not made"
        );
        assert_eq!(
            counted_for_redis(Err(io(std::io::ErrorKind::BrokenPipe)), false).await,
            0,
            "refused by the pod, and not made: nothing to give back"
        );
        assert_eq!(
            counted_for_redis(Err(io(std::io::ErrorKind::TimedOut)), true).await,
            0,
            "no answer within 10 s: left as made"
        );
        assert_eq!(counted_for_redis(Ok((0, 10, 0)), true).await, 1);
        assert_eq!(counted_for_redis(Ok((1, 3, 0)), false).await, -1);
        assert_eq!(counted_for_redis(Ok((1, 3, 0)), true).await, 0);
    }

    #[test]
    fn a_fixed_budgets_previous_window_is_read_but_not_noted_for_its_floor() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        let w = shared.route_windows(true, "r", "b", None, Duration::from_secs(86_400));
        let (index, _) = w.at(unix_ms());
        let (cur, prev) = (w.key(index), w.key(index - 1));
        for sliding in [false, true] {
            let read = shared.saw_budget(&w, index, (&cur, &prev), (Some(3), Some(5)), sliding);
            assert_eq!(read, (3, 5));
            assert_eq!(shared.charges.floor(&cur), 3);
            assert_eq!(
                shared.charges.floor(&prev),
                if sliding { 5 } else { 0 },
                "sliding {sliding}: a fixed limit never weighs the previous window"
            );
        }
    }

    #[test]
    fn only_a_wait_of_a_connection_attempts_length_is_redis_timing_out() {
        assert!(timed_out(TIMEOUT) && timed_out(REQUEST_WAIT));
        assert!(
            !timed_out(Duration::from_millis(100)),
            "cut short by the request's own wait"
        );
    }

    #[test]
    fn a_global_limit_refused_waits_as_a_pods_would() {
        let s = |sliding| ratelimit::Settings {
            limit: 3,
            interval: Duration::from_secs(10),
            sliding,
            global: true,
        };
        // Full at the window's start: 10 s, and a third of the next window while the 3 weigh.
        assert_eq!(
            refused_wait(&s(true), 3, 0, 0, 10_000),
            Duration::from_nanos(13_333_333_334)
        );
        // 3 in the previous window, 1 s into this one: 3 × 0.9 + 1 > 3 until a third in.
        assert_eq!(
            refused_wait(&s(true), 0, 3, 1_000, 10_000),
            Duration::from_nanos(2_333_333_334)
        );
        // Fixed: the rest of the window.
        assert_eq!(
            refused_wait(&s(false), 3, 9, 4_000, 10_000),
            Duration::from_secs(6)
        );
        // Refused by the script on an edge the exact comparison lets through: soon.
        assert_eq!(
            refused_wait(&s(true), 0, 0, 0, 10_000),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn a_route_nodes_redis_keys_hold_no_metadata_value_and_never_collide() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        let hour = Duration::from_secs(3600);
        let key = |budget, route: &str, node: &str, value: Option<serde_json::Value>| {
            shared
                .route_windows(budget, route, node, value.as_ref(), hour)
                .key(7)
        };
        let planted = serde_json::json!("x:*\r\nFLUSHALL\r\nsidegate:{other/gw}:rl:1:1");
        let k = key(false, "r", "cap", Some(planted.clone()));
        let digest = k
            .strip_prefix("sidegate:ns/gw:route:")
            .and_then(|rest| rest.strip_suffix(":3600000:7"))
            .expect("the gateway's prefix, the interval and the window around a digest");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k}"
        );
        let mut all = vec![
            k,
            key(false, "r", "cap", None),
            key(false, "r", "cap", Some(serde_json::json!(""))),
            key(false, "r", "cap", Some(serde_json::json!(42))),
            key(false, "r", "cap", Some(serde_json::json!("42"))),
            key(true, "r", "cap", Some(planted.clone())),
            // Names that run together differently.
            key(false, "r:c", "ap", Some(planted.clone())),
            key(false, "r", "cap2", Some(planted)),
        ];
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "{all:?}");
        // Another interval, another set of windows; the same node and value, the same key.
        assert_ne!(
            shared
                .route_windows(false, "r", "cap", None, Duration::from_secs(60))
                .key(7),
            key(false, "r", "cap", None)
        );
        assert_eq!(key(false, "r", "cap", None), key(false, "r", "cap", None));
    }

    #[test]
    fn a_rotated_password_is_the_same_redis_and_another_host_or_database_is_not() {
        let client = |url: &str| Shared::new(&SecretString::from(url), "ns/gw").expect("valid url");
        let before = client("redis://:one@10.0.0.1:6379/0");
        let rotated = client("redis://:two@10.0.0.1:6379/0");
        assert!(
            !rotated.same_as(&before),
            "a new client for the new password"
        );
        assert_eq!(
            rotated.place, before.place,
            "which takes the old one's charges"
        );
        for other in [
            "redis://:one@10.0.0.1:6379/1",
            "redis://:one@10.0.0.2:6379/0",
        ] {
            assert_ne!(client(other).place, before.place, "{other}");
        }
    }

    #[test]
    fn only_a_policy_that_evicts_keys_is_warned_about() {
        let info = |policy: &str| {
            format!("# Memory\r\nused_memory:1\r\nmaxmemory:0\r\nmaxmemory_policy:{policy}\r\n")
        };
        assert_eq!(evicting_policy(&info("allkeys-lru")), Some("allkeys-lru"));
        assert_eq!(evicting_policy(&info("volatile-ttl")), Some("volatile-ttl"));
        assert_eq!(evicting_policy(&info("noeviction")), None);
        assert_eq!(evicting_policy("# Memory\r\nused_memory:1\r\n"), None);
    }

    #[test]
    fn urls_are_checked_without_repeating_them() {
        let err = Shared::new(&SecretString::from("http://user:hunter2@x"), "ns/gw")
            .expect_err("not redis");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Shared::new(&SecretString::from("redis://:pw@127.0.0.1:6379/0"), "ns/gw").is_ok());
    }
}
