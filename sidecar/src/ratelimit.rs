//! Request rate limiting: `limit` requests per `interval`, per pod here (global limits are
//! counted in Redis, [`crate::shared`], with the same windows, and here too: this pod's count
//! decides alone while Redis cannot be used), in a fixed window
//! (reset at each interval boundary) or a sliding one (the previous window's count weighted by
//! how much of it still overlaps the last `interval`), as Cloudflare's AI Gateway does.
//! Refused requests are not counted; their Retry-After is when a request would pass ([`admit`]).
//! One small lock per request, only when a limit is set. A dynamic route's rate or budget node
//! with a `key` has a window per value of that key ([`Keyed`]). A [`Limiter`] counts in one
//! shape of window (interval, fixed or sliding): a reload that changes the shape gives the limit
//! a new one ([`Limiter::carried_over`]), while requests admitted under the old config go on
//! with the old one, so that their late charges and give-backs never touch the new windows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use sidegate_crds::policy::{RateLimit, RateLimitTechnique};

/// The rate limit of a loaded config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Requests allowed per interval.
    pub limit: u64,
    /// Window length.
    pub interval: Duration,
    /// Sliding (else fixed) window.
    pub sliding: bool,
    /// Counted in the gateway's Redis across pods (else per pod).
    pub global: bool,
}

/// The shape of a limit's windows: a new one counts afresh, a new limit does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Window length.
    pub interval: Duration,
    /// Sliding (else fixed) window.
    pub sliding: bool,
}

impl Settings {
    /// The shape of the windows counted under these settings.
    pub fn shape(&self) -> Shape {
        Shape {
            interval: self.interval,
            sliding: self.sliding,
        }
    }

    /// Settings from `spec.rateLimit` (its token budget is [`crate::budget`]'s).
    pub fn from_policy(p: Option<&RateLimit>) -> Result<Option<Self>, String> {
        let Some(p) = p else { return Ok(None) };
        if p.limit == 0 || p.interval.get().is_zero() {
            return Err("spec.rateLimit: limit and interval must be larger than 0".into());
        }
        Ok(Some(Self {
            limit: p.limit,
            interval: p.interval.get(),
            sliding: p.technique == RateLimitTechnique::Sliding,
            global: p.scope == sidegate_crds::policy::RateLimitScope::Global,
        }))
    }
}

/// The counts of one limit in windows of one [`Shape`], aligned to an epoch. A reload keeps
/// them for a new `limit` (which applies to what the window already counted) and gives a new
/// shape (interval, technique) a new limiter, counting from zero ([`Self::carried_over`]).
#[derive(Debug)]
pub struct Limiter {
    epoch: Instant,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The shape counted in, from the first use (or the reload that carried it over) on.
    shape: Option<Shape>,
    counts: Counts,
}

/// What was counted in the current fixed window (number `index` since an epoch) and in the one
/// before it: what a fixed or sliding window needs. Also the token budget's ([`crate::budget`]).
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub index: u64,
    pub count: u64,
    pub previous: u64,
}

impl Counts {
    /// Whether one more request passes `into` the window with these counts ([`admit`]).
    fn admits(&self, s: &Settings, into: Duration) -> Result<(), Duration> {
        admit(
            s.limit,
            self.count,
            self.previous,
            into,
            s.interval,
            s.sliding,
            Need::One,
        )
    }

    /// Moves to window `index`: the current count becomes the previous one when `index` is the
    /// next window, and both restart after a gap.
    pub fn roll(&mut self, index: u64) {
        if index != self.index {
            self.previous = if index == self.index + 1 {
                self.count
            } else {
                0
            };
            self.count = 0;
            self.index = index;
        }
    }
}

/// `n` of `what`, as a message says it: "1 request", "3 requests".
pub fn counted(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// An interval as a limit's message names it: in whole seconds when it is some (`3600s`, as
/// the messages always said), else as configured, to the millisecond (`500ms`, `1.5s`), never
/// rounded to another interval.
pub fn interval_text(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        return format!("{secs}s");
    }
    if nanos % 1_000_000 != 0 {
        return format!("{d:?}");
    }
    let ms = nanos / 1_000_000;
    if secs == 0 {
        return format!("{ms}ms");
    }
    let fraction = format!("{ms:03}");
    format!("{secs}.{}s", fraction.trim_end_matches('0'))
}

/// Which window of `interval` (numbered from `epoch`) holds `now`, and how far into it `now` is.
pub(crate) fn window_at(epoch: Instant, now: Instant, interval: Duration) -> (u64, Duration) {
    let interval_ns = interval.as_nanos().max(1);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let index = u64::try_from(since / interval_ns).unwrap_or(u64::MAX);
    let into = Duration::from_nanos(u64::try_from(since % interval_ns).unwrap_or(u64::MAX));
    (index, into)
}

/// What a request needs of a limit to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Room for one more (a request against a request limit): `estimate + 1 <= limit`.
    One,
    /// Any room at all (a token budget, whose request's tokens are known only once it is
    /// answered): `estimate < limit`.
    Any,
}

/// Whether a limit of `limit` per `window` lets a request pass `into` the current window, given
/// the counts of the current window and of the previous one, and if not, how long until it
/// would: the rate limits (per pod and in Redis) and the token budgets all answer with this.
///
/// A fixed window counts the current window alone; a sliding one adds the previous window's
/// count weighted by how much of it is still within the last `window` (`remaining / window`).
/// The estimate only falls while no more is counted, so the wait is the earliest time at which
/// `previous × remaining / window + current` leaves what `need` asks: later in this window, or
/// in the next one, where the current count becomes the previous one (and weighs fully at its
/// start). Exact: compared in integers, scaled by the window in nanoseconds.
pub(crate) fn admit(
    limit: u64,
    current: u64,
    previous: u64,
    into: Duration,
    window: Duration,
    sliding: bool,
    need: Need,
) -> Result<(), Duration> {
    let w = window.as_nanos().max(1);
    let x = into.as_nanos().min(w);
    let weighted = |previous: u64| if sliding { u128::from(previous) } else { 0 };
    // The first point of a window (nanoseconds into it) from which a request passes with these
    // counts; `None` when it passes nowhere in that window.
    let earliest = |current: u64, previous: u128| -> Option<u128> {
        let need = match need {
            Need::One => w,
            Need::Any => 1,
        };
        let used = u128::from(current).saturating_mul(w).saturating_add(need);
        // previous × (w − t) ≤ limit × w − current × w − need
        let room = u128::from(limit).saturating_mul(w).checked_sub(used)?;
        if previous == 0 {
            return Some(0);
        }
        Some(w.saturating_sub(room / previous))
    };
    let nanos = |n: u128| Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX));
    match earliest(current, weighted(previous)) {
        Some(t) if t <= x => Ok(()),
        Some(t) if t < w => Err(nanos(t - x)),
        // Not in this window: in the next, where nothing is counted yet (refused requests are
        // not) and this window's count is the previous one.
        _ => {
            let next = earliest(0, weighted(current)).unwrap_or(w);
            Err(nanos(w - x + next))
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Limiter {
    /// A limiter whose windows are aligned to `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            state: Mutex::new(Window::default()),
        }
    }

    /// Counts a request at `now`; `Err(retry_after)` when it is over the limit.
    pub fn check(&self, s: &Settings, now: Instant) -> Result<(), Duration> {
        self.at(s, now, |w, into| {
            w.admits(s, into)?;
            w.count += 1;
            Ok(())
        })
    }

    /// Counts a request at `now` whatever the limit (a route's rate node counting again one it
    /// gave back while the request waited for an identical one's answer, which failed).
    pub fn count(&self, s: &Settings, now: Instant) {
        self.add(s, now, 1);
    }

    /// Adds `n` to the window at `now` whatever the limit (a route's budget node charged the
    /// cost of a request once its response ended).
    pub fn add(&self, s: &Settings, now: Instant, n: u64) {
        self.at(s, now, |w, _| w.count = w.count.saturating_add(n));
    }

    /// Whether a request at `now` would pass, counting nothing: `Err` is the wait until one
    /// would (the rate limit's answer for a request the spend limit or token budget refuses,
    /// which it must not count).
    pub fn would_admit(&self, s: &Settings, now: Instant) -> Result<(), Duration> {
        self.at(s, now, |w, into| w.admits(s, into))
    }

    /// Whether the window at `now` has any room left, counting nothing (a route's budget node,
    /// whose request's cost is known only once it is answered); `Err` is the wait until it has.
    pub fn room(&self, s: &Settings, now: Instant) -> Result<(), Duration> {
        self.at(s, now, |w, into| {
            admit(
                s.limit,
                w.count,
                w.previous,
                into,
                s.interval,
                s.sliding,
                Need::Any,
            )
        })
    }

    /// Whether nothing this limiter counted still weighs at `now` under `s` (neither the
    /// current window nor, for a sliding one, the previous): forgetting it changes nothing.
    fn idle(&self, s: &Settings, now: Instant) -> bool {
        let (index, _) = window_at(self.epoch, now, s.interval);
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let c = &state.counts;
        if state.shape != Some(s.shape()) {
            // Never counted anything (or in another shape, which `s`'s windows do not read).
            return true;
        }
        if !s.sliding {
            // A fixed window weighs nothing once the next one began.
            return index > c.index || c.count == 0;
        }
        (index > c.index.saturating_add(1))
            || (index == c.index + 1 && c.count == 0)
            || (index == c.index && c.count == 0 && c.previous == 0)
    }

    /// Takes back a request [`Self::check`] counted at `counted_at` that never went anywhere
    /// (a route's rate node, whose request was then refused or answered from the cache; the
    /// gateway's rate limit, whose request the spend limit or the token budget refused), from
    /// the window that counted it if that is still the current or the previous one.
    pub fn release(&self, s: &Settings, counted_at: Instant) {
        let (index, _) = window_at(self.epoch, counted_at, s.interval);
        self.at(s, Instant::now(), |w, _| {
            if w.index == index {
                w.count = w.count.saturating_sub(1);
            } else if w.index == index + 1 {
                w.previous = w.previous.saturating_sub(1);
            }
        });
    }

    /// Runs `f` on the counts of the window at `now` (and how far into it `now` is). A new
    /// limit (a reload raising or lowering it) applies to what the window already counted; a
    /// limiter is asked in one shape only ([`Self::carried_over`]), so `s`'s shape is the one
    /// it counts in.
    fn at<R>(&self, s: &Settings, now: Instant, f: impl FnOnce(&mut Counts, Duration) -> R) -> R {
        let (index, into) = window_at(self.epoch, now, s.interval);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.shape.get_or_insert(s.shape());
        state.counts.roll(index);
        f(&mut state.counts, into)
    }

    /// The limiter a reload to `next` counts with: this one, when its windows have the shape
    /// of `next` (a new limit applies to what they counted) or counted nothing yet, or when the
    /// limit is gone (kept for its return); else a new one, counting from zero in windows on
    /// the same epoch. Requests admitted before the reload keep this one: what they charge or
    /// give back late never reaches the new windows.
    pub fn carried_over(self: &Arc<Self>, next: Option<&Settings>) -> Arc<Self> {
        let Some(next) = next else {
            return self.clone();
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.shape {
            Some(shape) if shape != next.shape() => Arc::new(Self::new(self.epoch)),
            _ => {
                state.shape = Some(next.shape());
                self.clone()
            }
        }
    }
}

/// Most values of its key a [`Keyed`] limit keeps a window for: some 200 bytes each with the
/// map, so a node holds at most about 800 KB however many values clients send.
pub const MAX_KEYS: usize = 4096;

/// The windows of a limit counted per value of a key (a route node's `key: metadata.user`): one
/// [`Limiter`] per value, one shared by the requests without a value, and, while [`MAX_KEYS`]
/// values hold windows that still count, one shared by the values that found no room. Values
/// are kept as SHA-256 digests of their JSON text (`"42"` and `42` are two values), so a long
/// one costs no more than a short one. Windows whose counts no longer weigh are dropped when a
/// new value comes in a new window of the interval (so at most once per interval), and the map
/// shrinks once most of it is gone.
#[derive(Debug)]
pub struct Keyed {
    epoch: Instant,
    state: Mutex<KeyedState>,
}

#[derive(Debug)]
struct KeyedState {
    /// Requests without a value (every request, when the node has no key).
    none: Arc<Limiter>,
    /// Values that came while the map was full of windows still counting.
    overflow: Arc<Limiter>,
    by_value: HashMap<[u8; 32], Arc<Limiter>>,
    /// The window (index of the interval) in which the map was last swept.
    swept: Option<u64>,
    /// Whether the map being full was logged in that window.
    warned: bool,
}

impl Default for Keyed {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Keyed {
    /// Windows aligned to `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            state: Mutex::new(KeyedState {
                none: Arc::new(Limiter::new(epoch)),
                overflow: Arc::new(Limiter::new(epoch)),
                by_value: HashMap::new(),
                swept: None,
                warned: false,
            }),
        }
    }

    /// New windows, counting from zero, on the same epoch (a reload that changed the shape of
    /// the node's windows: see [`Limiter::carried_over`]).
    pub fn afresh(&self) -> Self {
        Self::new(self.epoch)
    }

    /// The window of `value` (`None`: a request without one) under `s` at `now`.
    pub fn window(
        &self,
        value: Option<&serde_json::Value>,
        s: &Settings,
        now: Instant,
    ) -> Arc<Limiter> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(value) = value else {
            return state.none.clone();
        };
        let digest: [u8; 32] = Sha256::digest(value.to_string().as_bytes()).into();
        if let Some(l) = state.by_value.get(&digest) {
            return l.clone();
        }
        let (index, _) = window_at(self.epoch, now, s.interval);
        if state.swept != Some(index) {
            state.swept = Some(index);
            state.warned = false;
            // A window a request in flight still holds stays: its budget charge or its rate
            // give-back goes to it when the request ends, and must be read again.
            state
                .by_value
                .retain(|_, l| Arc::strong_count(l) > 1 || !l.idle(s, now));
            let len = state.by_value.len();
            if len < state.by_value.capacity() / 4 {
                state.by_value.shrink_to(len * 2);
            }
        }
        if state.by_value.len() >= MAX_KEYS {
            if !std::mem::replace(&mut state.warned, true) {
                tracing::warn!(
                    max = MAX_KEYS,
                    "a route node's key has {MAX_KEYS} values counting in this window; \
                     new values share one window until old ones expire"
                );
            }
            return state.overflow.clone();
        }
        let l = Arc::new(Limiter::new(self.epoch));
        state.by_value.insert(digest, l.clone());
        l
    }

    /// How many values hold a window.
    pub fn values(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_value
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(limit: u64, secs: u64, sliding: bool) -> Settings {
        Settings {
            limit,
            interval: Duration::from_secs(secs),
            sliding,
            global: false,
        }
    }

    #[test]
    fn fixed_windows_allow_limit_then_refuse_until_the_boundary() {
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        let s = settings(3, 10, false);
        for _ in 0..3 {
            assert_eq!(l.check(&s, t0 + Duration::from_secs(1)), Ok(()));
        }
        assert_eq!(
            l.check(&s, t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        // Refusals are not counted; the next window starts afresh.
        assert_eq!(l.check(&s, t0 + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn a_new_limit_applies_to_what_the_window_counted_a_new_window_starts_afresh() {
        let t0 = Instant::now();
        let l = Arc::new(Limiter::new(t0));
        let at = t0 + Duration::from_secs(1);
        let two = settings(2, 3600, false);
        for _ in 0..2 {
            assert_eq!(l.check(&two, at), Ok(()));
        }
        // Raised to 3 (a reload): the same windows, one more, not three.
        let raised = settings(3, 3600, false);
        let kept = l.carried_over(Some(&raised));
        assert!(Arc::ptr_eq(&kept, &l));
        assert_eq!(kept.check(&raised, at), Ok(()));
        assert!(kept.check(&raised, at).is_err());
        // Lowered below the count: refused at once.
        let lowered = settings(1, 3600, false);
        assert!(l.carried_over(Some(&lowered)).check(&lowered, at).is_err());
        // No limit for a while, then the same one: still the same windows.
        assert!(Arc::ptr_eq(&l.carried_over(None), &l));
        // Another interval, or a sliding window, is another window: counted from zero.
        let minute = settings(1, 60, false);
        let fresh = l.carried_over(Some(&minute));
        assert!(!Arc::ptr_eq(&fresh, &l));
        assert_eq!(fresh.check(&minute, at), Ok(()));
        assert!(fresh.check(&minute, at).is_err());
        let sliding = settings(1, 60, true);
        let slid = fresh.carried_over(Some(&sliding));
        assert!(!Arc::ptr_eq(&slid, &fresh));
        assert_eq!(slid.check(&sliding, at), Ok(()));
        // Aligned alike: the new windows start where the old ones do.
        assert_eq!(slid.epoch, t0);
    }

    #[test]
    fn a_late_charge_or_give_back_under_the_old_shape_leaves_the_new_windows_alone() {
        // A budget of 100 per hour becomes 100 per two hours while a request admitted under the
        // hour is answered: its charge (and a rate node's give-back) goes to the hour's
        // windows, and the new ones keep what they counted since the reload.
        let t0 = Instant::now();
        let (hour, two_hours) = (settings(100, 3600, false), settings(100, 7200, false));
        let old = Arc::new(Limiter::new(t0));
        assert_eq!(old.room(&hour, t0), Ok(()));
        assert_eq!(old.check(&hour, t0), Ok(()));
        let new = old.carried_over(Some(&two_hours));
        new.add(&two_hours, t0 + Duration::from_secs(1), 60);
        old.add(&hour, t0 + Duration::from_secs(2), 10);
        old.release(&hour, t0);
        new.add(&two_hours, t0 + Duration::from_secs(3), 30);
        assert_eq!(
            new.room(&two_hours, t0 + Duration::from_secs(4)),
            Ok(()),
            "90"
        );
        new.add(&two_hours, t0 + Duration::from_secs(5), 10);
        assert!(
            new.room(&two_hours, t0 + Duration::from_secs(6)).is_err(),
            "100 spent since the reload"
        );
    }

    #[test]
    fn sliding_windows_weigh_the_previous_one() {
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        let s = settings(10, 10, true);
        for _ in 0..10 {
            assert_eq!(l.check(&s, t0 + Duration::from_secs(9)), Ok(()));
        }
        // 2 s into the next window 80% of the previous still counts: 8 + 0 → 2 more allowed.
        let at = t0 + Duration::from_secs(12);
        assert_eq!(l.check(&s, at), Ok(()));
        assert_eq!(l.check(&s, at), Ok(()));
        let retry = l.check(&s, at).expect_err("over the limit");
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(8),
            "{retry:?}"
        );
        // A fixed window would have allowed 10 here.
        let f = Limiter::new(t0);
        let fixed = settings(10, 10, false);
        for _ in 0..10 {
            assert_eq!(f.check(&fixed, t0 + Duration::from_secs(9)), Ok(()));
        }
        for _ in 0..10 {
            assert_eq!(f.check(&fixed, at), Ok(()));
        }
        // After a quiet window nothing of the old count remains.
        assert_eq!(l.check(&s, t0 + Duration::from_secs(35)), Ok(()));
    }

    #[test]
    fn a_full_sliding_window_waits_until_the_next_one_has_room() {
        // 3 per 10 s, sliding, 3 at the window's start: the 4th waits 10 s and then a third of
        // the next window, until 3 × 2/3 + 1 ≤ 3, not just to the window's end (where the 3
        // still weigh fully, and a retry was refused again).
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        let s = settings(3, 10, true);
        for _ in 0..3 {
            assert_eq!(l.check(&s, t0), Ok(()));
        }
        let wait = l.check(&s, t0).expect_err("full");
        assert_eq!(wait, Duration::from_nanos(13_333_333_334), "{wait:?}");
        assert!(l.check(&s, t0 + Duration::from_secs(10)).is_err());
        assert!(l.check(&s, t0 + wait - Duration::from_nanos(1)).is_err());
        assert_eq!(
            l.check(&s, t0 + wait),
            Ok(()),
            "a retry after the wait passes"
        );
        // Fixed: the rest of the window.
        let f = Limiter::new(t0);
        let fixed = settings(3, 10, false);
        for _ in 0..3 {
            assert_eq!(f.check(&fixed, t0 + Duration::from_secs(4)), Ok(()));
        }
        assert_eq!(
            f.check(&fixed, t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
    }

    /// Whether a request passes `dt` after `into`, with no other request counted meanwhile
    /// (the windows roll as [`Counts::roll`] does).
    fn passes_after(
        (limit, current, previous): (u64, u64, u64),
        into: Duration,
        w: Duration,
        sliding: bool,
        need: Need,
        dt: Duration,
    ) -> bool {
        let t = into + dt;
        let (current, previous, t) = if t < w {
            (current, previous, t)
        } else if t < w * 2 {
            (0, current, t - w)
        } else {
            (0, 0, t - w * 2)
        };
        admit(limit, current, previous, t, w, sliding, need).is_ok()
    }

    #[test]
    fn every_refusal_waits_exactly_until_a_request_would_pass() {
        let w = Duration::from_secs(10);
        let mut refused = 0;
        for limit in [1, 2, 3, 7, 100] {
            for current in [0, 1, limit - 1, limit, limit + 5] {
                for previous in [0, 1, limit / 2, limit, limit * 3] {
                    for into_ms in [0, 1, 2_500, 5_000, 9_999] {
                        for sliding in [false, true] {
                            for need in [Need::One, Need::Any] {
                                let into = Duration::from_millis(into_ms);
                                let counts = (limit, current, previous);
                                let got = admit(limit, current, previous, into, w, sliding, need);
                                // The decision, by floating point away from the edge.
                                let weight = if sliding { previous as f64 } else { 0.0 };
                                let estimate =
                                    weight * (10_000 - into_ms) as f64 / 10_000.0 + current as f64;
                                let room = limit as f64 - estimate;
                                if need == Need::One && (room - 1.0).abs() > 1e-6 {
                                    assert_eq!(got.is_ok(), room >= 1.0, "{counts:?} {into:?}");
                                }
                                let Err(wait) = got else { continue };
                                refused += 1;
                                let case = format!("{counts:?} into {into:?} {sliding} {need:?}");
                                assert!(wait > Duration::ZERO, "{case}");
                                assert!(
                                    passes_after(counts, into, w, sliding, need, wait),
                                    "{case}: refused after the wait {wait:?}"
                                );
                                assert!(
                                    !passes_after(
                                        counts,
                                        into,
                                        w,
                                        sliding,
                                        need,
                                        wait - Duration::from_nanos(1)
                                    ),
                                    "{case}: passes before the wait {wait:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(refused > 500, "{refused}");
    }

    #[test]
    fn keyed_windows_count_each_value_apart_and_requests_without_one_together() {
        let t0 = Instant::now();
        let k = Keyed::new(t0);
        let s = settings(1, 60, false);
        let (alice, bob) = (serde_json::json!("alice"), serde_json::json!("bob"));
        assert_eq!(k.window(Some(&alice), &s, t0).check(&s, t0), Ok(()));
        assert!(k.window(Some(&alice), &s, t0).check(&s, t0).is_err());
        assert_eq!(k.window(Some(&bob), &s, t0).check(&s, t0), Ok(()));
        // The string "42" and the number 42 are two values.
        assert_eq!(
            k.window(Some(&serde_json::json!(42)), &s, t0).check(&s, t0),
            Ok(())
        );
        assert_eq!(
            k.window(Some(&serde_json::json!("42")), &s, t0)
                .check(&s, t0),
            Ok(())
        );
        // Without a value: one window for all such requests.
        assert_eq!(k.window(None, &s, t0).check(&s, t0), Ok(()));
        assert!(k.window(None, &s, t0).check(&s, t0).is_err());
        assert_eq!(k.values(), 4);
    }

    #[test]
    fn a_full_keyed_limit_shares_one_window_for_new_values_until_old_windows_expire() {
        let t0 = Instant::now();
        let k = Keyed::new(t0);
        let s = settings(1, 10, true);
        for i in 0..MAX_KEYS {
            let v = serde_json::json!(format!("user-{i}"));
            assert_eq!(k.window(Some(&v), &s, t0).check(&s, t0), Ok(()));
        }
        // Every window still counts: the newcomers share one, the first passes, the next not.
        let late = |i: usize| serde_json::json!(format!("late-{i}"));
        assert_eq!(k.window(Some(&late(0)), &s, t0).check(&s, t0), Ok(()));
        assert!(k.window(Some(&late(1)), &s, t0).check(&s, t0).is_err());
        assert_eq!(k.values(), MAX_KEYS, "bounded");
        // A long value costs a digest like any other.
        let long = serde_json::json!("x".repeat(64 * 1024));
        assert!(k.window(Some(&long), &s, t0).check(&s, t0).is_err());
        // The next window: the sliding windows' previous counts still weigh, nothing dropped.
        let t1 = t0 + Duration::from_secs(15);
        assert!(k.window(Some(&late(2)), &s, t1).check(&s, t1).is_err());
        assert_eq!(k.values(), MAX_KEYS);
        // Two windows on, none of them weighs any more: dropped, and the newcomer has its own.
        let t2 = t0 + Duration::from_secs(25);
        assert_eq!(k.window(Some(&late(3)), &s, t2).check(&s, t2), Ok(()));
        assert!(k.window(Some(&late(3)), &s, t2).check(&s, t2).is_err());
        assert_eq!(k.values(), 1);
        let capacity = k.state.lock().expect("lock").by_value.capacity();
        assert!(capacity < 64, "the map shrank: {capacity}");
    }

    #[test]
    fn a_full_fixed_keyed_limit_gives_newcomers_their_own_windows_in_the_next_interval() {
        let t0 = Instant::now();
        let k = Keyed::new(t0);
        let s = settings(1, 10, false);
        for i in 0..MAX_KEYS {
            let v = serde_json::json!(format!("user-{i}"));
            assert_eq!(k.window(Some(&v), &s, t0).check(&s, t0), Ok(()));
        }
        // A fixed window's count weighs nothing in the next one: the old windows go at once.
        let t1 = t0 + Duration::from_secs(15);
        let late = |i: usize| serde_json::json!(format!("late-{i}"));
        assert_eq!(k.window(Some(&late(0)), &s, t1).check(&s, t1), Ok(()));
        assert_eq!(k.window(Some(&late(1)), &s, t1).check(&s, t1), Ok(()));
        assert_eq!(k.values(), 2);
    }

    #[test]
    fn a_window_a_request_in_flight_holds_is_not_swept() {
        let t0 = Instant::now();
        let k = Keyed::new(t0);
        let s = settings(1, 10, false);
        let red = serde_json::json!("red");
        // A budget node's request holds its window, counting nothing until its answer ends.
        let held = k.window(Some(&red), &s, t0);
        assert_eq!(held.room(&s, t0), Ok(()));
        // Another value's first request in a later window sweeps the map.
        let t1 = t0 + Duration::from_secs(25);
        let _ = k.window(Some(&serde_json::json!("blue")), &s, t1);
        held.add(&s, t1, 5);
        // The charge is read again by red's next request.
        assert!(k.window(Some(&red), &s, t1).room(&s, t1).is_err());
    }

    #[test]
    fn a_raised_limit_admits_what_it_adds_and_no_more() {
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        assert_eq!(l.check(&settings(1, 60, false), t0), Ok(()));
        assert!(l.check(&settings(1, 60, false), t0).is_err());
        assert_eq!(l.check(&settings(2, 60, false), t0), Ok(()));
        assert!(l.check(&settings(2, 60, false), t0).is_err());
    }

    #[test]
    fn would_admit_counts_nothing() {
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        let s = settings(1, 60, false);
        for _ in 0..3 {
            assert_eq!(l.would_admit(&s, t0), Ok(()));
        }
        assert_eq!(l.check(&s, t0), Ok(()));
        assert_eq!(
            l.would_admit(&s, t0 + Duration::from_secs(20)),
            Err(Duration::from_secs(40))
        );
    }

    #[test]
    fn messages_name_counts_and_intervals_as_configured() {
        assert_eq!(counted(1, "request"), "1 request");
        assert_eq!(counted(0, "request"), "0 requests");
        assert_eq!(counted(3, "token"), "3 tokens");
        let ms = Duration::from_millis;
        assert_eq!(interval_text(ms(3_600_000)), "3600s");
        assert_eq!(interval_text(ms(1_500)), "1.5s");
        assert_eq!(interval_text(ms(1_250)), "1.25s");
        assert_eq!(interval_text(ms(60_001)), "60.001s");
        assert_eq!(interval_text(ms(500)), "500ms");
        assert_eq!(interval_text(ms(1)), "1ms");
        assert_eq!(interval_text(Duration::from_nanos(1_500)), "1.5µs");
    }

    #[test]
    fn settings_come_from_the_policy() {
        use sidegate_crds::policy::RateLimitScope;
        use sidegate_crds::units::Duration as D;
        let mut p = RateLimit {
            limit: 5,
            interval: D::from_secs(60),
            technique: RateLimitTechnique::Sliding,
            scope: RateLimitScope::Pod,
            tokens_per_minute: None,
        };
        assert_eq!(
            Settings::from_policy(Some(&p)),
            Ok(Some(settings(5, 60, true)))
        );
        p.limit = 0;
        assert!(Settings::from_policy(Some(&p)).is_err());
        assert_eq!(Settings::from_policy(None), Ok(None));
    }
}
