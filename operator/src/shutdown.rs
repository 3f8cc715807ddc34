//! Graceful shutdown of every role (leader, standby, controllers without election): on SIGTERM
//! or SIGINT `/readyz` turns unready at once, the webhook keeps answering for a bounded drain
//! period (admissions in flight, and those the apiserver sends before the endpoint is gone, are
//! answered; with `failurePolicy: Ignore` a refused one would create a pod without the sidecar),
//! and only then does the process exit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin::AdminState;

/// Longest drain accepted: the pod's termination grace period (30 s in the chart) must cover
/// it and the controllers' own shutdown.
pub const MAX_DRAIN: Duration = Duration::from_secs(60);

/// When the shutdown signal came, once it has.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<Option<Instant>>);

impl Shutdown {
    /// Watches for SIGTERM and SIGINT; on the first, marks `state` unready.
    pub fn on_signal(state: Arc<AdminState>) -> Self {
        Self::on(signal(), state)
    }

    /// Like [`Shutdown::on_signal`] with any trigger (tests).
    pub fn on(
        trigger: impl std::future::Future<Output = ()> + Send + 'static,
        state: Arc<AdminState>,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            trigger.await;
            // Unready first, so the endpoint goes away while the webhook still answers.
            state.ready.store(false, Ordering::Relaxed);
            tracing::info!("shutting down: /readyz unready, the webhook drains");
            let _ = tx.send(Some(Instant::now()));
        });
        Self(rx)
    }

    /// Resolves once the signal has come.
    pub async fn requested(&self) {
        let mut rx = self.0.clone();
        // The sender lives in a task that only ends after sending (or at runtime shutdown).
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// After the controllers stopped, which they do on the same signal: waits for it to be
    /// recorded here too (both listeners wake on one delivery, in either order), then drains.
    pub async fn drained_after_stop(&self, drain: Duration) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.requested()).await;
        self.drained(drain).await;
    }

    /// After a signal, waits until `drain` has passed since it came (nothing to wait for
    /// without one).
    pub async fn drained(&self, drain: Duration) {
        let since = *self.0.borrow();
        if let Some(since) = since {
            tokio::time::sleep_until(since + drain.min(MAX_DRAIN)).await;
        }
    }
}

/// SIGTERM (what kubelet sends) or SIGINT.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "SIGTERM handler not installed; SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_signal_turns_readyz_unready_at_once_and_the_drain_lasts_its_period() {
        let state = Arc::new(AdminState::default());
        state.ready.store(true, Ordering::Relaxed);
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(
            async {
                let _ = fired.await;
            },
            state.clone(),
        );
        // No signal: no drain.
        let start = Instant::now();
        shutdown.drained(Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::ZERO);

        fire.send(()).expect("trigger");
        shutdown.requested().await;
        assert!(!state.ready.load(Ordering::Relaxed));
        let signalled = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.drained(Duration::from_secs(5)).await;
        assert_eq!(
            signalled.elapsed(),
            Duration::from_secs(5),
            "from the signal"
        );
        shutdown.drained(Duration::from_secs(600)).await;
        assert_eq!(signalled.elapsed(), MAX_DRAIN, "bounded");
    }
}
