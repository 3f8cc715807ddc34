//! Usage-based limits: the spend limit (`spec.spendLimit`, 429 code 2041) and the token budget
//! (`spec.rateLimit.tokensPerMinute`, 429 code 2003).
//!
//! Both are checked before a request is sent and counted when its response reports usage, so a
//! request admitted under the limit may take the total past it; the requests after it are
//! refused. Spend is counted in whole billionths of a USD ([`usd_units`]), as a route's budget
//! node counts it, so that charges add up exactly to a limit (ten $0.10 answers are $1.00, not
//! the 0.9999999999999999 of floating point). It is summed over UTC calendar periods (day, week from Monday, month; each
//! charge counts in all three, so a reload changing the period finds the new period's spend),
//! per pod, or across pods in the gateway's Redis when `spec.redis` is set. Tokens (input + output) are
//! summed over minute windows, fixed or sliding as `rateLimit.technique` says, per pod or in
//! Redis for `rateLimit.scope: global`. This pod counts both in any case: while Redis cannot be
//! read the limits are checked against the gateway's total last read plus what this pod charged
//! since (or its own counts, when more), and what it charges meanwhile waits for Redis
//! ([`crate::shared`]).
//!
//! Gateways without either limit pay nothing: no [`Settings`], no check, no tally per request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sidegate_crds::policy::{GatewayPolicy, RateLimitScope, RateLimitTechnique, SpendPeriod};

use crate::error::GatewayError;
use crate::ratelimit::{self, Counts, window_at};
use crate::shared::{Shared, Unreadable, Wait};
use crate::telemetry::Metrics;

/// Length of a token budget window.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// Most models (and, apart, providers) named in "not charged" warnings; beyond them one last
/// warning says no more are named (a client that sends a new model name in every request must
/// not grow the sidecar's memory or its log).
const MAX_UNCHARGED_NOTED: usize = 256;

/// Billionths of a USD: spend is counted in whole units (the spend limit, a route's budget
/// node, the spend kept for Redis), so sums are exact.
pub const UNITS_PER_USD: f64 = 1e9;

/// `usd` in [`UNITS_PER_USD`], rounded; a negative amount (or NaN) is 0, and an absurd one
/// (a `cf-aig-custom-cost` of billions) stops at what Redis's `INCRBY` takes.
pub fn usd_units(usd: f64) -> u64 {
    // `as` saturates (and makes NaN 0).
    ((usd * UNITS_PER_USD).round() as u64).min(i64::MAX as u64)
}

/// `units` ([`UNITS_PER_USD`]) in USD, for logs and messages.
pub fn units_usd(units: u64) -> f64 {
    units as f64 / UNITS_PER_USD
}

/// The usage limits of a loaded config (present only when at least one is set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// `spec.spendLimit`.
    pub spend: Option<SpendSettings>,
    /// `spec.rateLimit.tokensPerMinute`.
    pub tokens: Option<TokenSettings>,
}

/// A spend limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpendSettings {
    /// USD per period, as configured (for messages).
    pub amount: f64,
    /// The same in [`UNITS_PER_USD`], at least one: what the spend is compared with.
    pub limit: u64,
    /// Calendar period (UTC).
    pub period: SpendPeriod,
}

/// A token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSettings {
    /// Tokens (input + output) per minute.
    pub per_minute: u64,
    /// Sliding (else fixed) minute.
    pub sliding: bool,
    /// Counted in Redis across pods.
    pub global: bool,
}

impl Settings {
    /// The limits of `policy`, `None` when it sets neither.
    pub fn from_policy(policy: &GatewayPolicy) -> Result<Option<Self>, String> {
        if let Some(why) = policy.cost_problem() {
            return Err(why);
        }
        let spend = policy.spend_limit.as_ref().map(|s| {
            let amount = s.usd().unwrap_or(0.0);
            SpendSettings {
                amount,
                limit: usd_units(amount).max(1),
                period: s.period,
            }
        });
        let tokens = match policy.rate_limit.as_ref() {
            Some(rl) => match rl.tokens_per_minute {
                Some(0) => {
                    return Err("spec.rateLimit.tokensPerMinute must be larger than 0".into());
                }
                Some(per_minute) => Some(TokenSettings {
                    per_minute,
                    sliding: rl.technique == RateLimitTechnique::Sliding,
                    global: rl.scope == RateLimitScope::Global,
                }),
                None => None,
            },
            None => None,
        };
        Ok((spend.is_some() || tokens.is_some()).then_some(Self { spend, tokens }))
    }
}

/// Lower-case name of a period, for keys and messages.
pub fn period_name(p: SpendPeriod) -> &'static str {
    match p {
        SpendPeriod::Day => "day",
        SpendPeriod::Week => "week",
        SpendPeriod::Month => "month",
    }
}

/// Start and end, in Unix seconds, of the UTC calendar period that holds `now` (seconds).
pub fn period_bounds(period: SpendPeriod, now: u64) -> (u64, u64) {
    const DAY: u64 = 86_400;
    let day = now / DAY;
    match period {
        SpendPeriod::Day => (day * DAY, (day + 1) * DAY),
        SpendPeriod::Week => {
            // 1970-01-01 was a Thursday: Monday-based weekday is (days + 3) % 7.
            let monday = day.saturating_sub((day + 3) % 7);
            (monday * DAY, (monday + 7) * DAY)
        }
        SpendPeriod::Month => {
            let (y, m, _) = crate::access_log::civil_from_days(day as i64);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let start = days_from_civil(y, m, 1) as u64 * DAY;
            let end = days_from_civil(ny, nm, 1) as u64 * DAY;
            (start, end)
        }
    }
}

/// Days since 1970-01-01 of a (proleptic Gregorian) date, Howard Hinnant's algorithm.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whether a budget of `limit` per `window` has room, given the current window's count, the
/// previous window's, and how far into the current window `into` is: a request passes while the
/// count (a sliding window adding the previous one's for the part of it still within the last
/// `window`) is under the limit. `Err(retry_after)` when the budget is spent: until the earliest
/// time it has room again, which may be in the next window ([`ratelimit::admit`]).
pub fn budget_left(
    limit: u64,
    current: u64,
    previous: u64,
    into: Duration,
    window: Duration,
    sliding: bool,
) -> Result<(), Duration> {
    ratelimit::admit(
        limit,
        current,
        previous,
        into,
        window,
        sliding,
        ratelimit::Need::Any,
    )
}

/// This pod's counters, kept across config reloads.
#[derive(Debug)]
pub struct Ledger {
    epoch: Instant,
    spend: Mutex<PeriodSpend>,
    tokens: Mutex<Counts>,
    /// Models without a price whose answers went uncharged, each warned about once.
    unpriced: Mutex<Noted>,
    /// Providers whose answers reported no token counts, each warned about once.
    uncounted: Mutex<Noted>,
}

/// Names already warned about, at most [`MAX_UNCHARGED_NOTED`].
#[derive(Debug, Default)]
struct Noted {
    names: HashSet<Box<str>>,
    full: bool,
}

impl Noted {
    /// Whether `name` is new (and now noted). The first name past the bound gets a warning that
    /// no more `what` are named.
    fn first(&mut self, name: &str, what: &str) -> bool {
        if self.names.contains(name) {
            return false;
        }
        if self.names.len() >= MAX_UNCHARGED_NOTED {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "{MAX_UNCHARGED_NOTED} {what} named in warnings already: further ones are not named"
                );
            }
            return false;
        }
        self.names.insert(name.into());
        true
    }
}

/// The calendar periods a spend limit may name.
const PERIODS: [SpendPeriod; 3] = [SpendPeriod::Day, SpendPeriod::Week, SpendPeriod::Month];

/// This pod's spend in the current day, week and month (each with the start of its period, in
/// Unix seconds): every charge counts in all three, whatever period the config of the request
/// names, so that a reload changing the period (a week's limit become a month's) finds the
/// spend of the new period, charges still arriving under the old config included.
#[derive(Debug, Default)]
struct PeriodSpend {
    /// Start and spend ([`UNITS_PER_USD`]) of each period.
    sums: [Option<(u64, u64)>; 3],
    /// The gateway's spend per period as last read from Redis.
    seen: [Option<Seen>; 3],
}

/// The gateway's spend in a period as read from Redis, and this pod's own at that time (both
/// in [`UNITS_PER_USD`]).
#[derive(Debug, Clone, Copy)]
struct Seen {
    start: u64,
    total: u64,
    own: u64,
}

impl PeriodSpend {
    /// This pod's spend in `period` starting at `start`.
    fn own(&self, period: SpendPeriod, start: u64) -> u64 {
        match self.sums[period_slot(period)] {
            Some((from, units)) if from == start => units,
            _ => 0,
        }
    }
}

fn period_slot(p: SpendPeriod) -> usize {
    match p {
        SpendPeriod::Day => 0,
        SpendPeriod::Week => 1,
        SpendPeriod::Month => 2,
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Ledger {
    /// Counters whose token windows are aligned to `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            spend: Mutex::new(PeriodSpend::default()),
            tokens: Mutex::new(Counts::default()),
            unpriced: Mutex::default(),
            uncounted: Mutex::default(),
        }
    }

    /// Whether `model` of `provider` is new among the models without a price (and now noted).
    fn first_unpriced(&self, provider: &str, model: &str) -> bool {
        let mut noted = self.unpriced.lock().unwrap_or_else(|e| e.into_inner());
        noted.first(&format!("{provider}\0{model}"), "models without a price")
    }

    /// Whether `provider` is new among the providers whose answers had no token counts.
    fn first_uncounted(&self, provider: &str) -> bool {
        let mut noted = self.uncounted.lock().unwrap_or_else(|e| e.into_inner());
        noted.first(provider, "providers without token counts")
    }

    /// Spend of this pod in the period holding `now` (Unix seconds), in [`UNITS_PER_USD`].
    fn spent(&self, period: SpendPeriod, now: u64) -> u64 {
        let (start, _) = period_bounds(period, now);
        let s = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        s.own(period, start)
    }

    /// Notes the gateway's spend `total` read from Redis for the period holding `now`.
    fn saw_spend(&self, period: SpendPeriod, now: u64, total: u64) {
        let (start, _) = period_bounds(period, now);
        let mut s = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let own = s.own(period, start);
        s.seen[period_slot(period)] = Some(Seen { start, total, own });
    }

    /// The gateway's spend in the period holding `now` as best this pod knows it while Redis
    /// cannot be read: the total last read plus what this pod spent since, or this pod's own
    /// spend when that is more (or nothing was read in this period).
    fn spent_without_redis(&self, period: SpendPeriod, now: u64) -> u64 {
        let (start, _) = period_bounds(period, now);
        let s = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        let own = s.own(period, start);
        match s.seen[period_slot(period)] {
            Some(seen) if seen.start == start => {
                own.max(seen.total.saturating_add(own.saturating_sub(seen.own)))
            }
            _ => own,
        }
    }

    /// Adds `units` ([`UNITS_PER_USD`]) to this pod's spend in the day, the week and the month
    /// holding `now` (Unix seconds).
    pub fn add_spend(&self, units: u64, now: u64) {
        let mut s = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        for period in PERIODS {
            let (start, _) = period_bounds(period, now);
            let sum = &mut s.sums[period_slot(period)];
            match sum {
                Some((from, total)) if *from == start => *total = total.saturating_add(units),
                // A charge timed before the held period (the wall clock stepped back) is not
                // allowed to wipe it.
                Some((from, _)) if *from > start => {}
                _ => *sum = Some((start, units)),
            }
        }
    }

    fn window(&self, now: Instant) -> (u64, Duration) {
        window_at(self.epoch, now, TOKEN_WINDOW)
    }

    /// Whether this pod's token budget has room at `now`.
    pub fn tokens_left(&self, s: &TokenSettings, now: Instant) -> Result<(), Duration> {
        let (index, into) = self.window(now);
        let mut w = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        w.roll(index);
        budget_left(
            s.per_minute,
            w.count,
            w.previous,
            into,
            TOKEN_WINDOW,
            s.sliding,
        )
    }

    /// Adds `n` tokens to this pod's window at `now`.
    pub fn add_tokens(&self, n: u64, now: Instant) {
        let (index, _) = self.window(now);
        let mut w = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        w.roll(index);
        w.count = w.count.saturating_add(n);
    }

    /// Refuses a request when the spend limit or the token budget is used up; with the
    /// gateway's Redis (and the request's [`Wait`] for it), see [`Self::check_shared`].
    pub async fn check(
        &self,
        s: &Settings,
        shared: Option<(&Shared, &Wait)>,
        metrics: &Metrics,
    ) -> Result<(), GatewayError> {
        if let Some((r, wait)) = shared {
            return self.check_shared(s, r, wait, metrics).await;
        }
        if let Some(sp) = &s.spend {
            let now = unix_secs();
            refuse_overspent(sp, self.spent(sp.period, now), now)?;
        }
        if let Some(t) = &s.tokens {
            refuse_out_of_tokens(t, self.tokens_left(t, Instant::now()))?;
        }
        Ok(())
    }

    /// [`Self::check`] with the spend (and a global token budget) in Redis: both read at once,
    /// one round trip's wait rather than two; while Redis cannot be read, this pod's counts
    /// decide ([`Self::spent_without_redis`], [`Self::tokens_left`]).
    async fn check_shared(
        &self,
        s: &Settings,
        r: &Shared,
        wait: &Wait,
        metrics: &Metrics,
    ) -> Result<(), GatewayError> {
        let now = unix_secs();
        let spent = async {
            let sp = s.spend.as_ref()?;
            Some(match r.spend_get(metrics, wait, sp.period, now).await {
                Ok(total) => {
                    self.saw_spend(sp.period, now, total);
                    total
                }
                Err(Unreadable) => self.spent_without_redis(sp.period, now),
            })
        };
        let left = async {
            match &s.tokens {
                Some(t) if t.global => Some(
                    r.tokens_left(metrics, wait, t, || self.tokens_left(t, Instant::now()))
                        .await,
                ),
                Some(t) => Some(self.tokens_left(t, Instant::now())),
                None => None,
            }
        };
        let (spent, left) = tokio::join!(spent, left);
        if let (Some(sp), Some(spent)) = (&s.spend, spent) {
            refuse_overspent(sp, spent, now)?;
        }
        if let (Some(t), Some(left)) = (&s.tokens, left) {
            refuse_out_of_tokens(t, left)?;
        }
        Ok(())
    }
}

/// The spend limit's refusal when `spent` ([`UNITS_PER_USD`], at `now`, Unix seconds) reached
/// it.
fn refuse_overspent(sp: &SpendSettings, spent: u64, now: u64) -> Result<(), GatewayError> {
    if spent < sp.limit {
        return Ok(());
    }
    let (_, end) = period_bounds(sp.period, now);
    Err(GatewayError::SpendLimited {
        amount: sp.amount,
        period: period_name(sp.period),
        retry_after: until_unix(end),
    })
}

/// The token budget's refusal when `left` says it is spent.
fn refuse_out_of_tokens(t: &TokenSettings, left: Result<(), Duration>) -> Result<(), GatewayError> {
    left.map_err(|retry_after| GatewayError::TokenBudgetSpent {
        per_minute: t.per_minute,
        retry_after,
    })
}

/// What a finished request adds to the limits: kept by its record while the response streams.
#[derive(Debug, Clone)]
pub struct Tally {
    /// This pod's counters.
    pub ledger: Arc<Ledger>,
    /// The limits of the request's config.
    pub settings: Settings,
    /// The gateway's Redis, when shared.
    pub shared: Option<Arc<Shared>>,
}

impl Tally {
    /// Counts a response's cost and tokens.
    pub fn add(&self, metrics: &Arc<Metrics>, cost: Option<f64>, tokens: [Option<u64>; 2]) {
        // Charged to every period (see [`PeriodSpend`]): a request admitted before a reload
        // that changed the period counts against the new one.
        if let (Some(_), Some(usd)) = (&self.settings.spend, cost) {
            let units = usd_units(usd);
            if units > 0 {
                let now = unix_secs();
                // This pod's own count, which decides while Redis cannot be read.
                self.ledger.add_spend(units, now);
                if let Some(r) = &self.shared {
                    r.spend_add(metrics, units, now);
                }
            }
        }
        let n = tokens[0]
            .unwrap_or(0)
            .saturating_add(tokens[1].unwrap_or(0));
        if let Some(t) = &self.settings.tokens
            && n > 0
        {
            self.ledger.add_tokens(n, Instant::now());
            if let Some(r) = &self.shared
                && t.global
            {
                r.tokens_add(metrics, n, t.sliding);
            }
        }
    }

    /// Whether the limits still have room (as [`Ledger::check`]), for a long answer charged in
    /// parts (a WebSocket session) that must stop when they run out.
    pub async fn check(&self, metrics: &Metrics) -> Result<(), GatewayError> {
        // Each check is the session's own wait for Redis, as a request's would be.
        let wait = Wait::default();
        self.ledger
            .check(
                &self.settings,
                self.shared.as_deref().map(|r| (r, &wait)),
                metrics,
            )
            .await
    }

    /// A successful answer of `provider` for `model` cost nothing against the spend limit: its
    /// tokens are unknown (`tokens_known` false) or the model has no price. Warned once per
    /// model (per provider, for unknown tokens), as an operator who set a limit would want to
    /// hear it does not see these answers. Answers of requests that named no model (a model
    /// list, a file upload) are no model's work and cost nothing anyway.
    /// `log_id` is the answer's request's, which the line names.
    pub fn uncharged(&self, provider: &str, model: &str, tokens_known: bool, log_id: Option<&str>) {
        if self.settings.spend.is_none() {
            return;
        }
        if !tokens_known {
            if self.ledger.first_uncounted(provider) {
                tracing::warn!(
                    provider,
                    model,
                    log_id,
                    "an answer reported no token counts, so it was not charged to the spend limit (said once per provider)"
                );
            }
        } else if self.ledger.first_unpriced(provider, model) {
            tracing::warn!(
                provider,
                model,
                log_id,
                "the model has no price, so its answers are not charged to the spend limit: give it one in spec.pricing (said once per model)"
            );
        }
    }
}

/// How long until the Unix time `end` (in seconds), from now to the nanosecond (the whole
/// seconds of `unix_secs` would overstate it by up to a second), at least a second.
fn until_unix(end: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(end)
        .saturating_sub(now)
        .max(Duration::from_secs(1))
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, m: u32, d: u32, hh: u64, mm: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * 86_400 + hh * 3600 + mm * 60
    }

    #[test]
    fn each_uncharged_reason_is_noted_once_and_the_notes_are_bounded() {
        let ledger = Ledger::default();
        assert!(ledger.first_unpriced("openai", "house-llm"));
        assert!(!ledger.first_unpriced("openai", "house-llm"));
        assert!(ledger.first_unpriced("groq", "house-llm"));
        for i in 2..MAX_UNCHARGED_NOTED {
            assert!(ledger.first_unpriced("openai", &format!("m{i}")));
        }
        assert!(
            !ledger.first_unpriced("openai", "one-more"),
            "past the bound nothing more is noted"
        );
        assert!(ledger.unpriced.lock().expect("lock").full);
        // Providers without token counts are noted apart: the full list of models does not
        // silence them.
        assert!(ledger.first_uncounted("mistral"));
        assert!(!ledger.first_uncounted("mistral"));
    }

    #[test]
    fn days_from_civil_inverts_civil_from_days() {
        for days in [0i64, 59, 60, 11_016, 19_782, 20_513, 36_524, 50_000] {
            let (y, m, d) = crate::access_log::civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn periods_are_utc_calendar_days_weeks_and_months() {
        let now = at(2026, 11, 26, 4, 30); // a Thursday
        assert_eq!(
            period_bounds(SpendPeriod::Day, now),
            (at(2026, 11, 26, 0, 0), at(2026, 11, 27, 0, 0))
        );
        assert_eq!(
            period_bounds(SpendPeriod::Week, now),
            (at(2026, 11, 23, 0, 0), at(2026, 11, 30, 0, 0)),
            "Monday to Monday"
        );
        // A week across a month and a year end.
        assert_eq!(
            period_bounds(SpendPeriod::Week, at(2027, 1, 1, 12, 0)),
            (at(2026, 12, 28, 0, 0), at(2027, 1, 4, 0, 0))
        );
        assert_eq!(
            period_bounds(SpendPeriod::Month, now),
            (at(2026, 11, 1, 0, 0), at(2026, 12, 1, 0, 0))
        );
        assert_eq!(
            period_bounds(SpendPeriod::Month, at(2026, 12, 31, 23, 59)),
            (at(2026, 12, 1, 0, 0), at(2027, 1, 1, 0, 0))
        );
        // February of a leap year, and its last second.
        let (start, end) = period_bounds(SpendPeriod::Month, at(2028, 2, 29, 23, 59) + 59);
        assert_eq!((start, end), (at(2028, 2, 1, 0, 0), at(2028, 3, 1, 0, 0)));
        assert_eq!(end - start, 29 * 86_400);
        // The first second of a period belongs to it.
        assert_eq!(
            period_bounds(SpendPeriod::Month, at(2027, 3, 1, 0, 0)).0,
            at(2027, 3, 1, 0, 0)
        );
    }

    #[test]
    fn spend_sums_within_a_period_and_restarts_in_the_next() {
        let l = Ledger::default();
        let jan = at(2027, 1, 31, 23, 0); // a Sunday
        l.add_spend(usd_units(1.5), jan);
        l.add_spend(usd_units(2.0), jan + 60);
        assert_eq!(l.spent(SpendPeriod::Month, jan + 120), usd_units(3.5));
        let feb = at(2027, 2, 1, 0, 0); // a Monday
        assert_eq!(l.spent(SpendPeriod::Month, feb), 0);
        assert_eq!(l.spent(SpendPeriod::Week, feb), 0);
        l.add_spend(usd_units(0.25), feb);
        assert_eq!(l.spent(SpendPeriod::Month, feb), usd_units(0.25));
        assert_eq!(l.spent(SpendPeriod::Day, feb + 3600), usd_units(0.25));
        assert_eq!(l.spent(SpendPeriod::Day, feb + 86_400), 0, "the next day");
        assert_eq!(
            l.spent(SpendPeriod::Week, feb + 86_400),
            usd_units(0.25),
            "the same week"
        );
    }

    #[test]
    fn charges_add_up_exactly_to_the_limit() {
        // Ten $0.10 answers are $1.00 (in f64 they sum to 0.9999999999999999).
        assert_ne!((0..10).map(|_| 0.1).sum::<f64>(), 1.0);
        let l = Ledger::default();
        let sp = SpendSettings {
            amount: 1.0,
            limit: usd_units(1.0),
            period: SpendPeriod::Day,
        };
        let now = at(2027, 3, 10, 12, 0);
        for i in 0..9 {
            l.add_spend(usd_units(0.1), now + i);
        }
        assert!(refuse_overspent(&sp, l.spent(SpendPeriod::Day, now + 9), now + 9).is_ok());
        l.add_spend(usd_units(0.1), now + 9);
        assert_eq!(l.spent(SpendPeriod::Day, now + 10), usd_units(1.0));
        assert!(refuse_overspent(&sp, l.spent(SpendPeriod::Day, now + 10), now + 10).is_err());
        // A negative, NaN or absurd cost charges nothing or what Redis's INCRBY takes.
        assert_eq!(usd_units(-1.0), 0);
        assert_eq!(usd_units(f64::NAN), 0);
        assert_eq!(usd_units(1e300), i64::MAX as u64);
        assert_eq!(units_usd(usd_units(0.25)), 0.25);
    }

    #[test]
    fn a_reload_changing_the_period_keeps_the_spend_of_the_new_one() {
        // Charges of a week's limit still arriving after a reload made it a month's count for
        // the month, and the month's own charges do not make the pod forget them.
        let l = Ledger::default();
        // Spend earlier in the month, in another week, counts for the month alone.
        l.add_spend(usd_units(1.0), at(2027, 3, 1, 9, 0));
        let now = at(2027, 3, 10, 12, 0); // a Wednesday
        for i in 0..4 {
            l.add_spend(usd_units(3.0), now + i);
        }
        assert_eq!(l.spent(SpendPeriod::Month, now + 10), usd_units(13.0));
        assert_eq!(l.spent(SpendPeriod::Week, now + 10), usd_units(12.0));
        assert_eq!(l.spent(SpendPeriod::Day, now + 10), usd_units(12.0));
        // A charge timed in an earlier period (the wall clock stepped back) wipes nothing.
        l.add_spend(usd_units(1.0), at(2027, 2, 28, 9, 0));
        assert_eq!(l.spent(SpendPeriod::Month, now + 10), usd_units(13.0));
        assert_eq!(l.spent(SpendPeriod::Day, now + 10), usd_units(12.0));
    }

    #[tokio::test]
    async fn a_tally_of_an_old_period_counts_against_the_new_one() {
        let limit = |period| Settings {
            spend: Some(SpendSettings {
                amount: 5.0,
                limit: usd_units(5.0),
                period,
            }),
            tokens: None,
        };
        let ledger = Arc::new(Ledger::default());
        let tally = |settings| Tally {
            ledger: ledger.clone(),
            settings,
            shared: None,
        };
        let (week, month) = (
            tally(limit(SpendPeriod::Week)),
            tally(limit(SpendPeriod::Month)),
        );
        let metrics = Arc::new(Metrics::new());
        // A $3 answer of the month's config, then a $3 one admitted under the week's.
        month.add(&metrics, Some(3.0), [None, None]);
        week.add(&metrics, Some(3.0), [None, None]);
        assert!(
            matches!(
                month.check(&metrics).await,
                Err(GatewayError::SpendLimited { .. })
            ),
            "$6 spent this month over a $5 limit"
        );
        assert!(week.check(&metrics).await.is_err(), "and this week");
    }

    #[test]
    fn token_budgets_refuse_once_spent_until_the_window_moves() {
        let t0 = Instant::now();
        let l = Ledger::new(t0);
        let fixed = TokenSettings {
            per_minute: 100,
            sliding: false,
            global: false,
        };
        let s = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(l.tokens_left(&fixed, s(1)), Ok(()));
        l.add_tokens(60, s(1));
        assert_eq!(l.tokens_left(&fixed, s(2)), Ok(()), "60 of 100");
        l.add_tokens(60, s(2));
        assert_eq!(l.tokens_left(&fixed, s(20)), Err(Duration::from_secs(40)));
        assert_eq!(l.tokens_left(&fixed, s(60)), Ok(()), "a new minute");
        // Sliding: 140 tokens of the last minute weigh 75% 15 s into the next (105 ≥ 100), half
        // 30 s in (70); a fixed window would have let the request through at once.
        let sliding = TokenSettings {
            sliding: true,
            ..fixed
        };
        let l = Ledger::new(t0);
        l.add_tokens(140, s(10));
        assert!(l.tokens_left(&sliding, s(75)).is_err());
        assert_eq!(l.tokens_left(&fixed, s(75)), Ok(()));
        assert_eq!(l.tokens_left(&sliding, s(90)), Ok(()));
    }

    #[test]
    fn sliding_budgets_wait_until_enough_of_the_last_window_slid_out() {
        let w = TOKEN_WINDOW;
        // 200 last minute, 0 now, 15 s in: 200 × 0.75 = 150 ≥ 100; under 100 once the overlap
        // is under 0.5, i.e. just past 30 s in: wait 15 s.
        let wait = budget_left(100, 0, 200, Duration::from_secs(15), w, true).expect_err("spent");
        assert!((wait.as_secs_f64() - 15.0).abs() < 0.01, "{wait:?}");
        assert_eq!(
            budget_left(100, 0, 200, Duration::from_secs(15) + wait, w, true),
            Ok(())
        );
        assert!(budget_left(100, 0, 200, Duration::from_secs(30), w, true).is_err());
        // Spent in this window alone, fixed: until its end.
        assert_eq!(
            budget_left(100, 100, 0, Duration::from_secs(15), w, false),
            Err(Duration::from_secs(45))
        );
        // A fixed window ignores the previous one.
        assert_eq!(
            budget_left(100, 0, 500, Duration::from_secs(1), w, false),
            Ok(())
        );
    }

    #[test]
    fn a_sliding_budget_spent_in_this_window_waits_into_the_next() {
        // 150 tokens this minute (the answer that took it past 100): at its end they still
        // weigh 150, under 100 only a third into the next minute: 40 s + 20 s, not 40 s.
        let t0 = Instant::now();
        let l = Ledger::new(t0);
        let sliding = TokenSettings {
            per_minute: 100,
            sliding: true,
            global: false,
        };
        l.add_tokens(150, t0 + Duration::from_secs(10));
        let now = t0 + Duration::from_secs(20);
        let wait = l.tokens_left(&sliding, now).expect_err("spent");
        assert!((wait.as_secs_f64() - 60.0).abs() < 0.01, "{wait:?}");
        assert!(
            l.tokens_left(&sliding, now + Duration::from_secs(40))
                .is_err(),
            "the next minute's start is too early"
        );
        assert!(
            l.tokens_left(&sliding, now + wait - Duration::from_millis(1))
                .is_err()
        );
        assert_eq!(l.tokens_left(&sliding, now + wait), Ok(()));
        // Spent within this window, over a previous one: until enough of both slid out.
        let wait = budget_left(100, 60, 80, Duration::from_secs(30), TOKEN_WINDOW, true)
            .expect_err("40 + 60 = 100");
        // 80 × (60 − t)/60 + 60 < 100 ⇔ t > 30: at once, in this window.
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
    }
}
