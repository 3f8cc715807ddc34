//! Running out of file descriptors: the limit the sidecar starts with (raised to the hard one,
//! refused below a floor), and what its listeners do while `accept` fails (EMFILE, ENFILE, no
//! memory): pause, 5 ms doubling to 1 s and back to 5 ms at the next connection taken, as the
//! operator's listeners do, and say so in the log at a bounded rate however long it lasts.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

/// The fewest open files the sidecar starts with: it holds about 15 descriptors itself (its
/// listeners, event loop, signal pipe, file watcher), and each request one for its client's
/// connection and one for the provider's.
pub const MIN_OPEN_FILES: u64 = 64;

/// The soft limit on open files (`RLIMIT_NOFILE`) now; `None` when unlimited.
pub fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the soft limit on open files to the hard one, as Go programs do at start: a
/// container's soft limit is often 1024 (containerd 2's), which a few hundred LLM streams use
/// up. Returns the limit then, or an error naming it when it is below [`MIN_OPEN_FILES`] (tokio
/// would otherwise panic setting up its signal handling, or a listener fail for want of one).
pub fn raise_open_files_limit() -> Result<Option<u64>, String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(soft, hard, error = %e, "cannot raise the open-file limit");
        }
    }
    let now = open_files_limit();
    match now {
        Some(n) if n < MIN_OPEN_FILES => Err(format!(
            "the open-file limit (RLIMIT_NOFILE) is {n}, below the {MIN_OPEN_FILES} the sidecar needs: it holds about 15 descriptors itself and each request takes one for its client and one for the provider; raise it (ulimit -n, or the container runtime's default)"
        )),
        _ => Ok(now),
    }
}

/// Shortest time between two log lines of one recurring event.
pub(super) const SAY_EVERY: Duration = Duration::from_secs(10);

/// A recurring event said in the log at a bounded rate: its first occurrence at once, then at
/// most one line per [`SAY_EVERY`], with how many there were since the last.
#[derive(Debug, Default)]
pub(super) struct Tally {
    said_at: Option<Instant>,
    unsaid: u64,
}

impl Tally {
    /// Counts one occurrence at `now`: `Some(n)` when a line is due, `n` the occurrences since
    /// the last line (this one included).
    pub(super) fn count(&mut self, now: Instant) -> Option<u64> {
        self.unsaid += 1;
        if self
            .said_at
            .is_some_and(|at| now.duration_since(at) < SAY_EVERY)
        {
            return None;
        }
        self.said_at = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// First pause after a failed `accept`; doubled on each failure in a row.
const PAUSE_MIN: Duration = Duration::from_millis(5);
/// Longest pause after failed `accept`s.
const PAUSE_MAX: Duration = Duration::from_secs(1);

/// The failed `accept`s of one listener: the pause before the next, and their log lines.
#[derive(Debug)]
pub(super) struct AcceptFailures {
    listener: &'static str,
    pause: Duration,
    tally: Tally,
    counted: Counter,
}

impl AcceptFailures {
    /// No failure yet on `listener` (its name in logs), counted into `counted`.
    pub(super) fn new(listener: &'static str, counted: Counter) -> Self {
        Self {
            listener,
            pause: PAUSE_MIN,
            tally: Tally::default(),
            counted,
        }
    }

    /// A connection was taken: the next failure pauses the least again.
    pub(super) fn accepted(&mut self) {
        self.pause = PAUSE_MIN;
    }

    /// Counts a failed `accept`, says it when a line is due, and returns the pause to take
    /// before the next.
    pub(super) fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.counted.inc();
        let pause = self.pause;
        self.pause = (pause * 2).min(PAUSE_MAX);
        if let Some(failures) = self.tally.count(Instant::now()) {
            const EMFILE: i32 = 24; // Linux
            // Out of the process's own descriptors: the limit tells whether it is too low for
            // the connections the pod's app holds.
            let limit = (error.raw_os_error() == Some(EMFILE))
                .then(open_files_limit)
                .flatten();
            tracing::warn!(
                listener = self.listener,
                error = %error,
                failures,
                open_files_limit = limit,
                retry_in_ms = pause.as_millis() as u64,
                "accept failed: new connections wait in the backlog (this line at most every {} s, failures since the last)",
                SAY_EVERY.as_secs()
            );
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recurring_event_is_said_at_once_then_at_most_every_ten_seconds_with_its_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut tally = Tally::default();
        assert_eq!(tally.count(at(0)), Some(1), "the first at once");
        let said: Vec<_> = (1..=400u64).map(|i| tally.count(at(i * 50))).collect();
        // 20 s of an event every 50 ms: a line at 10 s and one at 20 s.
        assert_eq!(
            said.iter().flatten().copied().collect::<Vec<_>>(),
            [200, 200]
        );
        // Quiet for a while, then once more: said at once, with the one left unsaid since.
        assert_eq!(tally.count(at(20_049)), None);
        assert_eq!(tally.count(at(60_000)), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_5_ms_doubling_to_1_s_until_one_succeeds() {
        let counted = Counter::default();
        let mut failures = AcceptFailures::new("test", counted.clone());
        let emfile = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<u128> = (0..10)
            .map(|_| failures.failed(&emfile).as_millis())
            .collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        failures.accepted();
        assert_eq!(failures.failed(&emfile), PAUSE_MIN);
        assert_eq!(counted.get(), 11);
    }
}
