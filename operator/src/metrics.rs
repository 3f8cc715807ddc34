//! The operator's Prometheus metrics: reconciles by controller and result, their durations,
//! errors by kind, the writes they made (a steady state makes none) and leadership.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a controller (`aigateway` or `providerkey`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// Controller name.
    pub controller: &'static str,
}

/// Labels of a finished reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Controller name.
    pub controller: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of a reconcile error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Controller name.
    pub controller: &'static str,
    /// Error kind (`kube`, `render`, ...).
    pub error: &'static str,
}

/// Labels of a write to the apiserver.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// Controller name.
    pub controller: &'static str,
    /// What was written: `configmap`, `secret`, `status`, `event`.
    pub object: &'static str,
}

/// Labels of an admission review answered by the webhook.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped` (opted out, excluded, unknown gateway) or `error` (admitted
    /// without the sidecar because something failed).
    pub result: &'static str,
}

/// All operator metrics and the registry that exposes them.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    writes: Family<WriteLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    admissions: Family<AdmissionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sidegate_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by controller and kind",
            errors.clone(),
        );
        registry.register(
            "writes",
            "Writes to the apiserver by controller and object (zero in a steady state)",
            writes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles by controller",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica runs the controllers",
            leader.clone(),
        );
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "webhook_admissions",
            "Pods with the gateway annotation seen by the injection webhook, by result",
            admissions.clone(),
        );
        Self {
            admissions,
            registry,
            reconciles,
            errors,
            writes,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// Starts timing a reconcile; call [`ReconcileTimer::finish`] with its outcome.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    /// Counts a pod the webhook answered for.
    pub fn admission(&self, result: &'static str) {
        self.admissions
            .get_or_create(&AdmissionLabels { result })
            .inc();
    }

    /// Pods the webhook answered for with `result`.
    pub fn admissions(&self, result: &'static str) -> u64 {
        self.admissions
            .get_or_create(&AdmissionLabels { result })
            .get()
    }

    /// Counts an error of `kind`.
    pub fn error(&self, controller: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                controller,
                error: kind,
            })
            .inc();
    }

    /// Counts a write of `object`.
    pub fn write(&self, controller: &'static str, object: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { controller, object })
            .inc();
    }

    /// Writes made so far by `controller` (all objects); tests use it to prove a steady state.
    pub fn writes_total(&self, controller: &'static str) -> u64 {
        ["configmap", "secret", "status", "event"]
            .into_iter()
            .map(|object| {
                self.writes
                    .get_or_create(&WriteLabels { controller, object })
                    .get()
            })
            .sum()
    }

    /// Reconciles finished so far by `controller` with `result`.
    pub fn reconciles_total(&self, controller: &'static str, result: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&ResultLabels { controller, result })
            .get()
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Times one reconcile.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl ReconcileTimer<'_> {
    /// Records the duration and the result.
    pub fn finish(self, ok: bool) {
        let controller = self.controller;
        self.metrics
            .duration
            .get_or_create(&ControllerLabels { controller })
            .observe(self.start.elapsed().as_secs_f64());
        let result = if ok { "ok" } else { "error" };
        self.metrics
            .reconciles
            .get_or_create(&ResultLabels { controller, result })
            .inc();
    }
}
