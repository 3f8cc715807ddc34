//! Request rate limiting: `limit` requests per `interval`, per pod here (global limits are
//! counted in Redis, [`crate::shared`], with the same windows), in a fixed window
//! (reset at each interval boundary) or a sliding one (the previous window's count weighted by
//! how much of it still overlaps the last `interval`), as Cloudflare's AI Gateway does.
//! Refused requests are not counted. One small lock per request, only when a limit is set.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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

impl Settings {
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

/// The counters, kept across config reloads (reset when the limit or interval changes).
#[derive(Debug)]
pub struct Limiter {
    epoch: Instant,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    settings: Option<Settings>,
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

/// Which window of `interval` (numbered from `epoch`) holds `now`, and how far into it `now` is.
pub(crate) fn window_at(epoch: Instant, now: Instant, interval: Duration) -> (u64, Duration) {
    let interval_ns = interval.as_nanos().max(1);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let index = u64::try_from(since / interval_ns).unwrap_or(u64::MAX);
    let into = Duration::from_nanos(u64::try_from(since % interval_ns).unwrap_or(u64::MAX));
    (index, into)
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
        let interval_ns = s.interval.as_nanos().max(1);
        let (index, into) = window_at(self.epoch, now, s.interval);
        let into = into.as_nanos(); // nanoseconds into the current window
        let left = Duration::from_nanos(u64::try_from(interval_ns - into).unwrap_or(u64::MAX));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.settings != Some(*s) {
            *state = Window {
                settings: Some(*s),
                counts: Counts {
                    index,
                    ..Counts::default()
                },
            };
        }
        let w = &mut state.counts;
        w.roll(index);
        if !s.sliding {
            if w.count >= s.limit {
                return Err(left);
            }
            w.count += 1;
            return Ok(());
        }
        // Sliding: the previous window counts for the part of it still within `interval`.
        let overlap = (interval_ns - into) as f64 / interval_ns as f64;
        let estimate = w.previous as f64 * overlap + w.count as f64;
        if estimate + 1.0 > s.limit as f64 {
            // Wait until enough of the previous window has slid out (or the next window).
            let retry = if w.previous == 0 || w.count >= s.limit {
                left
            } else {
                let excess = estimate + 1.0 - s.limit as f64;
                let fraction = (excess / w.previous as f64).min(1.0);
                Duration::from_secs_f64(s.interval.as_secs_f64() * fraction).min(left)
            };
            return Err(retry);
        }
        w.count += 1;
        Ok(())
    }

    /// Takes back a request counted at `at` by [`Self::check`] that was not sent after all (a
    /// route's rate node whose request the gateway refused, or answered from its cache); one
    /// counted in a window that has passed stays there.
    pub fn uncount(&self, s: &Settings, at: Instant) {
        let (index, _) = window_at(self.epoch, at, s.interval);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.settings == Some(*s) && state.counts.index == index {
            state.counts.count = state.counts.count.saturating_sub(1);
        }
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
    fn a_changed_limit_starts_counting_afresh() {
        let t0 = Instant::now();
        let l = Limiter::new(t0);
        assert_eq!(l.check(&settings(1, 60, false), t0), Ok(()));
        assert!(l.check(&settings(1, 60, false), t0).is_err());
        assert_eq!(l.check(&settings(2, 60, false), t0), Ok(()));
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
