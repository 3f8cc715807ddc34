//! State shared by every pod of a gateway, in the Redis of `spec.redis` (URL in the keys
//! directory's `redis.url`): cache entries (`spec.cache.backend: redis`), global rate limits and
//! token budgets (`spec.rateLimit.scope: global`), spend (`spec.spendLimit`) and the windows of
//! dynamic routes' rate and budget nodes with `scope: global` ([`RouteWindows`]).
//!
//! Redis is a help, not a dependency of serving: when it cannot be reached in time the gateway
//! fails open (a cache miss, a request allowed), counts the error in
//! `sidegate_redis_errors_total` and warns at most every 10 s. A request waits for Redis at most
//! [`REQUEST_WAIT`] in all, however many calls it makes ([`Wait`]). Keys are prefixed
//! `sidegate:{namespace/name}:`, so gateways can share one Redis.

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
use crate::ratelimit;
use crate::telemetry::Metrics;

/// Time to connect, and to wait for each answer.
const TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, how long requests go without Redis before it is tried again: a Redis that
/// is down costs each request nothing instead of a timeout.
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
/// fail open at once.
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

/// Takes back a request a route's rate node counted and then gave back (it never went
/// upstream): never below 0, and never bringing back a window that expired meanwhile.
const RELEASE_SCRIPT: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
";

/// The Redis windows of one rate or budget node of a dynamic route for one value of its key
/// (or for the requests without one): `{prefix}route:{digest}:{interval ms}:{window}`, where
/// the digest is a SHA-256 over the node's kind, its route and id and the value, each
/// length-prefixed. Whatever the app puts in its metadata, the key holds only hex digits of it:
/// no value can name another node's, another value's or another gateway's key, nor anything
/// else in the Redis. The limit is not in the key (a reload raising it keeps the counts); the
/// interval is (a new one counts afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteWindows {
    base: String,
    interval_ms: u64,
}

impl RouteWindows {
    fn key(&self, index: u64) -> String {
        format!("{}:{index}", self.base)
    }

    /// The window holding `now_ms`, and how far into it that is.
    fn at(&self, now_ms: u64) -> (u64, u64) {
        (now_ms / self.interval_ms, now_ms % self.interval_ms)
    }
}

/// A gateway's Redis.
pub struct Shared {
    client: ::redis::Client,
    /// SHA-256 of the URL: a reload with the same Redis keeps this client and its connection.
    target: [u8; 32],
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
    script: ::redis::Script,
    release: ::redis::Script,
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
        Ok(Self {
            client,
            target: Sha256::digest(url.expose_secret().as_bytes()).into(),
            conn: std::sync::Mutex::default(),
            connecting: tokio::sync::Mutex::default(),
            backoff: Backoff::default(),
            timeouts: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            down: AtomicBool::new(false),
            prefix: format!("sidegate:{gateway}:"),
            script: ::redis::Script::new(RATE_SCRIPT),
            release: ::redis::Script::new(RELEASE_SCRIPT),
            warnings: WarnThrottle::default(),
        })
    }

    /// Whether `other` is the same Redis for the same gateway (a reload may keep `self`).
    pub fn same_as(&self, other: &Shared) -> bool {
        self.target == other.target && self.prefix == other.prefix
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
    /// wait for it (a burst at a pod's start would otherwise all go uncounted by the limits,
    /// failing open); for [`BACKOFF`] after a failure (with a connection made already too: one
    /// that just failed would make each request wait for its timeout again) they are told Redis
    /// is unavailable at once.
    async fn conn(
        &self,
        deadline: tokio::time::Instant,
    ) -> ::redis::RedisResult<ConnectionManager> {
        if self.backoff.active(monotonic_ms()) {
            return Err(Self::unavailable("redis unavailable (retrying shortly)"));
        }
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        let Ok(_connecting) = tokio::time::timeout_at(deadline, self.connecting.lock()).await
        else {
            return Err(Self::unavailable("redis connection being made"));
        };
        if let Some(c) = self.cached_conn() {
            return Ok(c);
        }
        if self.backoff.active(monotonic_ms()) {
            // The connection just tried failed.
            return Err(Self::unavailable("redis unavailable (retrying shortly)"));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            // An answer may take twice as long as connecting (as a request's wait allows).
            .set_response_timeout(Some(TIMEOUT * 2))
            .set_number_of_retries(0);
        let began = tokio::time::Instant::now();
        let made = tokio::time::timeout_at(
            deadline,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                *self.slot() = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                self.mark_down();
                Err(e)
            }
            Err(_) if timed_out(began.elapsed()) => {
                self.mark_down();
                Err(Self::unavailable("redis connection timed out"))
            }
            // Cut short by the request's own wait: the next request tries again.
            Err(_) => Err(Self::unavailable(WAIT_SPENT)),
        }
    }

    /// Runs one Redis operation within what `wait` has left, bounded in time whatever the
    /// connection does. What a failure says about Redis ([`Verdict`]) decides what follows:
    /// the next requests go without Redis for [`BACKOFF`], the connection is made anew.
    async fn call<T>(
        &self,
        wait: &Wait,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> ::redis::RedisResult<T>,
    ) -> ::redis::RedisResult<T> {
        let Some(waiting) = wait.begin(Instant::now()) else {
            return Err(Self::unavailable(WAIT_SPENT));
        };
        let deadline = tokio::time::Instant::now() + waiting.bound;
        let mut c = self.conn(deadline).await?;
        let asked = tokio::time::Instant::now();
        let result = match tokio::time::timeout_at(deadline, op(&mut c)).await {
            Ok(result) => result,
            Err(_) if timed_out(asked.elapsed()) => {
                Err(Self::unavailable("redis answer timed out"))
            }
            // Cut short by the request's own wait: that says nothing about Redis.
            Err(_) => return Err(Self::unavailable(WAIT_SPENT)),
        };
        drop(waiting);
        match &result {
            Ok(_) => self.answered(),
            Err(e) => self.judge(verdict(e)),
        }
        result
    }

    /// Redis answered: the failures in a row end, and its return after any is logged once.
    fn answered(&self) {
        // Loads first: every pod's request answers here, and a store would take the cache line.
        for in_a_row in [&self.timeouts, &self.refusals] {
            if in_a_row.load(Ordering::Relaxed) != 0 {
                in_a_row.store(0, Ordering::Relaxed);
            }
        }
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
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

    fn failed(&self, metrics: &Metrics, what: &str, e: &::redis::RedisError) {
        metrics.count_redis_error();
        if self.warnings.allow(monotonic_ms()) {
            tracing::warn!(error = %e, "redis {what} failed; serving without it (fail open)");
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
        let got: ::redis::RedisResult<Option<Vec<u8>>> = self
            .call(wait, async |c| {
                ::redis::cmd("GET")
                    .arg(self.cache_key(key))
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok(v) => Ok(v.and_then(|raw| decode(&raw))),
            Err(e) => {
                self.failed(metrics, "cache read", &e);
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
            let done: ::redis::RedisResult<()> = this
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
            if let Err(e) = done {
                this.failed(&metrics, "cache write", &e);
            }
            drop(flight);
        });
    }

    fn cache_key(&self, key: &Key) -> String {
        format!("{}cache:{}", self.prefix, hex::encode(key))
    }

    /// Counts a request against a global limit: `Err(retry_after)` when over it.
    pub async fn rate_check(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        s: &ratelimit::Settings,
    ) -> Result<(), Duration> {
        let interval_ms = millis(s.interval);
        // The limit and interval are part of the key: a changed limit counts afresh.
        let key = |i: u64| format!("{}rl:{}:{}:{i}", self.prefix, s.limit, interval_ms);
        self.count_in(metrics, wait, s, key, "rate limit")
            .await
            .map(drop)
    }

    /// Counts a request in the windows `key` names (by window number) under `s`, as
    /// [`RATE_SCRIPT`] decides: `Ok(Some(window))` counted in that window, `Ok(None)` allowed
    /// uncounted because Redis failed (`what` says which limit), `Err(retry_after)` over it.
    async fn count_in(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        s: &ratelimit::Settings,
        key: impl Fn(u64) -> String,
        what: &str,
    ) -> Result<Option<u64>, Duration> {
        let interval_ms = millis(s.interval);
        let now = unix_ms();
        let index = now / interval_ms;
        let into = now % interval_ms;
        let remaining = if s.sliding { interval_ms - into } else { 0 };
        let counted: ::redis::RedisResult<(i64, u64, u64)> = self
            .call(wait, async |c| {
                self.script
                    .key(key(index))
                    .key(key(index.saturating_sub(1)))
                    .arg(s.limit)
                    .arg(interval_ms.saturating_mul(2))
                    .arg(remaining)
                    .arg(interval_ms)
                    .invoke_async(c)
                    .await
            })
            .await;
        match counted {
            Ok((0, cur, prev)) => Err(refused_wait(s, cur, prev, into, interval_ms)),
            Ok(_) => Ok(Some(index)),
            Err(e) => {
                self.failed(metrics, what, &e);
                Ok(None)
            }
        }
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
    ) -> RouteWindows {
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
        RouteWindows {
            base: format!(
                "{}route:{}:{interval_ms}",
                self.prefix,
                hex::encode(h.finalize())
            ),
            interval_ms,
        }
    }

    /// Counts a request of a route's rate node: as [`Self::count_in`] answers.
    pub async fn route_rate_check(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        w: &RouteWindows,
        s: &ratelimit::Settings,
    ) -> Result<Option<u64>, Duration> {
        self.count_in(metrics, wait, s, |i| w.key(i), "route rate node")
            .await
    }

    /// Takes back, in the background, a request a route's rate node counted in `window`.
    pub fn route_release(self: &Arc<Self>, metrics: Arc<Metrics>, w: &RouteWindows, window: u64) {
        let this = self.clone();
        let key = w.key(window);
        tokio::spawn(async move {
            let done: ::redis::RedisResult<i64> = this
                .call(&Wait::default(), async |c| {
                    this.release.key(&key).invoke_async(c).await
                })
                .await;
            if let Err(e) = done {
                this.failed(&metrics, "route rate node release", &e);
            }
        });
    }

    /// Adds `n` to the current window of `w` in the background: a rate node's request counted
    /// again, a budget node's charge (in its units).
    pub fn route_add(self: &Arc<Self>, metrics: Arc<Metrics>, w: &RouteWindows, n: u64) {
        let (index, _) = w.at(unix_ms());
        self.add_in_background(
            metrics,
            vec![(w.key(index), w.interval_ms.saturating_mul(2))],
            "INCRBY",
            n.to_string(),
            "route node write",
        );
    }

    /// Whether a route's budget node has room left under `s` (yes when Redis fails).
    pub async fn route_room(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        w: &RouteWindows,
        s: &ratelimit::Settings,
    ) -> Result<(), Duration> {
        let (index, into) = w.at(unix_ms());
        let got: ::redis::RedisResult<(Option<u64>, Option<u64>)> = self
            .call(wait, async |c| {
                ::redis::cmd("MGET")
                    .arg(w.key(index))
                    .arg(w.key(index.saturating_sub(1)))
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok((cur, prev)) => ratelimit::admit(
                s.limit,
                cur.unwrap_or(0),
                prev.unwrap_or(0),
                Duration::from_millis(into),
                Duration::from_millis(w.interval_ms),
                s.sliding,
                ratelimit::Need::Any,
            ),
            Err(e) => {
                self.failed(metrics, "route budget node read", &e);
                Ok(())
            }
        }
    }

    fn spend_key(&self, period: SpendPeriod, start: u64) -> String {
        format!(
            "{}spend:{}:{start}",
            self.prefix,
            budget::period_name(period)
        )
    }

    /// The gateway's spend in the period holding `now` (Unix seconds); 0 when Redis fails.
    pub async fn spend_get(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        period: SpendPeriod,
        now: u64,
    ) -> f64 {
        let (start, _) = budget::period_bounds(period, now);
        let got: ::redis::RedisResult<Option<f64>> = self
            .call(wait, async |c| {
                ::redis::cmd("GET")
                    .arg(self.spend_key(period, start))
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok(v) => v.unwrap_or(0.0),
            Err(e) => {
                self.failed(metrics, "spend read", &e);
                0.0
            }
        }
    }

    /// Adds `usd` to the gateway's spend in the day, the week and the month holding `now`
    /// (as [`budget::Ledger::add_spend`] does per pod: a reload changing the period finds the
    /// new period's spend), in one round trip in the background; each key expires a day after
    /// its period ends.
    pub fn spend_add(self: &Arc<Self>, metrics: Arc<Metrics>, usd: f64, now: u64) {
        let adds = [SpendPeriod::Day, SpendPeriod::Week, SpendPeriod::Month].map(|period| {
            let (start, end) = budget::period_bounds(period, now);
            let ttl_ms = (end.saturating_sub(now) + 86_400) * 1000;
            (self.spend_key(period, start), ttl_ms)
        });
        self.add_in_background(
            metrics,
            adds.to_vec(),
            "INCRBYFLOAT",
            format!("{usd:.12}"),
            "spend write",
        );
    }

    /// Adds `amount` to each key of `keys` with `incr` (`INCRBY`, `INCRBYFLOAT`) and (re)sets
    /// its expiry to its milliseconds, in one round trip in the background; a failure is
    /// counted as `what`.
    fn add_in_background(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        keys: Vec<(String, u64)>,
        incr: &'static str,
        amount: String,
        what: &'static str,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let done: ::redis::RedisResult<()> = this
                .call(&Wait::default(), async |c| {
                    let mut pipe = ::redis::pipe();
                    for (key, ttl_ms) in &keys {
                        pipe.cmd(incr)
                            .arg(key)
                            .arg(&amount)
                            .ignore()
                            .cmd("PEXPIRE")
                            .arg(key)
                            .arg(*ttl_ms)
                            .ignore();
                    }
                    pipe.query_async(c).await
                })
                .await;
            if let Err(e) = done {
                this.failed(&metrics, what, &e);
            }
        });
    }

    fn tokens_key(&self, index: u64) -> String {
        format!("{}tpm:{index}", self.prefix)
    }

    fn token_window() -> (u64, Duration) {
        let window_ms = budget::TOKEN_WINDOW.as_millis() as u64;
        let now = unix_ms();
        (now / window_ms, Duration::from_millis(now % window_ms))
    }

    /// Whether the gateway's token budget has room (yes when Redis fails).
    pub async fn tokens_left(
        &self,
        metrics: &Metrics,
        wait: &Wait,
        s: &budget::TokenSettings,
    ) -> Result<(), Duration> {
        let (index, into) = Self::token_window();
        let got: ::redis::RedisResult<(Option<u64>, Option<u64>)> = self
            .call(wait, async |c| {
                ::redis::cmd("MGET")
                    .arg(self.tokens_key(index))
                    .arg(self.tokens_key(index.saturating_sub(1)))
                    .query_async(c)
                    .await
            })
            .await;
        match got {
            Ok((cur, prev)) => budget::budget_left(
                s.per_minute,
                cur.unwrap_or(0),
                prev.unwrap_or(0),
                into,
                budget::TOKEN_WINDOW,
                s.sliding,
            ),
            Err(e) => {
                self.failed(metrics, "token budget read", &e);
                Ok(())
            }
        }
    }

    /// Adds `n` tokens to the gateway's current minute, in the background.
    pub fn tokens_add(self: &Arc<Self>, metrics: Arc<Metrics>, n: u64) {
        let (index, _) = Self::token_window();
        self.add_in_background(
            metrics,
            vec![(
                self.tokens_key(index),
                budget::TOKEN_WINDOW.as_millis() as u64 * 2,
            )],
            "INCRBY",
            n.to_string(),
            "token budget write",
        );
    }
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
/// VM), and Redis would be skipped (global limits failing open) all that time.
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
/// other calls fail open at once.
#[derive(Debug, Default)]
pub struct Wait(std::sync::Mutex<Waited>);

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
    fn state(&self) -> std::sync::MutexGuard<'_, Waited> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A call begins at `now`: how long it may wait, `None` when the wait is spent.
    fn begin(&self, now: Instant) -> Option<Waiting<'_>> {
        let mut w = self.state();
        let waited = w.before
            + w.since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let bound = REQUEST_WAIT.saturating_sub(waited);
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
    fn refused_commands_replace_the_connection_only_when_nothing_is_answered_in_between() {
        let shared =
            Shared::new(&SecretString::from("redis://127.0.0.1:1"), "ns/gw").expect("valid url");
        let refused = || {
            for _ in 0..REPLACE_AFTER - 1 {
                shared.judge(Verdict::Refused);
            }
        };
        refused();
        shared.answered();
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
        shared.answered();
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
        assert!(wait.begin(ms(1_000)).is_none(), "spent: fail open at once");
        assert!(wait.begin(ms(60_000)).is_none(), "for good");
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
    fn urls_are_checked_without_repeating_them() {
        let err = Shared::new(&SecretString::from("http://user:hunter2@x"), "ns/gw")
            .expect_err("not redis");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Shared::new(&SecretString::from("redis://:pw@127.0.0.1:6379/0"), "ns/gw").is_ok());
    }
}
