//! The operator's Prometheus metrics: reconciles by controller and result, their durations,
//! errors by kind, the writes they made (a steady state makes none), leadership, and for alerts
//! the state of the AIGateways the last reconciles saw (not Ready by reason, pods without the
//! sidecar or with an outdated one), the expiry of the webhook's self-managed certificate, and
//! the failed `accept`s of its listeners (out of descriptors).
//! No label names a gateway or a pod: the reasons are a fixed set.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sidegate_crds::api::{AIGatewayStatus, conditions};

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
    /// `injected`, `skipped` (opted out, excluded, unknown gateway), `error` (admitted
    /// without the sidecar because something failed) or `denied` (the pod's own spec rules the
    /// sidecar out: a port or name it needs, hostNetwork).
    pub result: &'static str,
}

/// Labels naming one of the operator's listeners.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `admin` or `webhook`.
    pub listener: &'static str,
}

/// Labels of the AIGateways that are not Ready.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason of their `Ready` condition (`KeyMissing`, `InvalidSpec`, ...).
    pub reason: String,
}

/// What the metrics keep of one AIGateway's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayHealth {
    /// The reason of its `Ready` condition when that is not True.
    pub not_ready: Option<String>,
    /// `status.uninjectedPods`.
    pub uninjected_pods: u32,
    /// `status.outdatedPods`.
    pub outdated_pods: u32,
}

impl GatewayHealth {
    /// The health `status` reports.
    pub fn of(status: &AIGatewayStatus) -> Self {
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY);
        Self {
            not_ready: match ready {
                Some(c) if c.status == "True" => None,
                Some(c) => Some(c.reason.clone()),
                None => Some("Unknown".to_owned()),
            },
            uninjected_pods: status.uninjected_pods.unwrap_or(0),
            outdated_pods: status.outdated_pods.unwrap_or(0),
        }
    }
}

/// The health of each gateway, by namespace and name, and the reasons ever reported (their
/// series stay, at 0, when no gateway has them any more).
#[derive(Default)]
struct Gateways {
    health: BTreeMap<(String, String), GatewayHealth>,
    reasons: BTreeSet<String>,
    /// UIDs of gateways deleted in the last [`TOMBSTONE_TTL`]: a reconcile that was running when
    /// its gateway was deleted must not record it again after the deletion swept it.
    deleted: Vec<(String, Instant)>,
}

/// How long a deleted gateway's UID is remembered: longer than any reconcile runs (each of its
/// API calls is bounded by the client's timeouts).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

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
    gateways: Mutex<Gateways>,
    not_ready: Family<ReasonLabels, Gauge>,
    uninjected_pods: Gauge,
    outdated_pods: Gauge,
    /// Expiry of the webhook's self-managed serving certificate, Unix seconds (0: none yet, or
    /// certificates from files).
    pub webhook_certificate_expiry: Gauge,
    accept_failures: Family<ListenerLabels, Counter>,
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
        let not_ready = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "aigateways_not_ready",
            "AIGateways whose Ready condition is not True, by its reason",
            not_ready.clone(),
        );
        let uninjected_pods = Gauge::default();
        registry.register(
            "uninjected_pods",
            "Pods naming an AIGateway that run without its sidecar (sum of status.uninjectedPods)",
            uninjected_pods.clone(),
        );
        let outdated_pods = Gauge::default();
        registry.register(
            "outdated_pods",
            "Pods running a sidecar injected with another image or settings than now (sum of status.outdatedPods)",
            outdated_pods.clone(),
        );
        let webhook_certificate_expiry = Gauge::default();
        registry.register(
            "webhook_certificate_expiry_timestamp_seconds",
            "Expiry of the webhook's self-managed serving certificate, Unix seconds",
            webhook_certificate_expiry.clone(),
        );
        let accept_failures = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_failures",
            "Failed accepts of new connections by listener (out of file descriptors: EMFILE, ENFILE)",
            accept_failures.clone(),
        );
        // Both series from the start, at 0, so that an alert on their increase sees the first.
        for listener in ["admin", "webhook"] {
            accept_failures.get_or_create_owned(&ListenerLabels { listener });
        }
        Self {
            accept_failures,
            admissions,
            gateways: Mutex::default(),
            not_ready,
            uninjected_pods,
            outdated_pods,
            webhook_certificate_expiry,
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

    /// Records the health of gateway `ns`/`name` (`uid`) seen by its reconcile, and the totals;
    /// nothing when that gateway has been deleted meanwhile.
    pub fn gateway_observed(&self, ns: &str, name: &str, uid: Option<&str>, health: GatewayHealth) {
        let mut gateways = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        if uid.is_some_and(|uid| gateways.deleted.iter().any(|(gone, _)| gone == uid)) {
            return;
        }
        if let Some(reason) = &health.not_ready {
            gateways.reasons.insert(reason.clone());
        }
        gateways
            .health
            .insert((ns.to_owned(), name.to_owned()), health);
        self.set_totals(&gateways);
    }

    /// Forgets deleted gateway `ns`/`name` (`uid`), now and when a reconcile that was running
    /// at its deletion reports it afterwards.
    pub fn gateway_deleted(&self, ns: &str, name: &str, uid: Option<&str>) {
        let mut gateways = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        gateways
            .deleted
            .retain(|(_, at)| now.duration_since(*at) < TOMBSTONE_TTL);
        if let Some(uid) = uid {
            gateways.deleted.push((uid.to_owned(), now));
        }
        if gateways
            .health
            .remove(&(ns.to_owned(), name.to_owned()))
            .is_some()
        {
            self.set_totals(&gateways);
        }
    }

    /// Forgets the gateways `exists(namespace, name)` says are gone.
    pub fn retain_gateways(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut gateways = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let before = gateways.health.len();
        gateways.health.retain(|(ns, name), _| exists(ns, name));
        if gateways.health.len() != before {
            self.set_totals(&gateways);
        }
    }

    fn set_totals(&self, gateways: &Gateways) {
        let mut not_ready: BTreeMap<&str, i64> =
            gateways.reasons.iter().map(|r| (r.as_str(), 0)).collect();
        let (mut uninjected, mut outdated) = (0i64, 0i64);
        for health in gateways.health.values() {
            if let Some(reason) = &health.not_ready {
                *not_ready.entry(reason.as_str()).or_default() += 1;
            }
            uninjected += i64::from(health.uninjected_pods);
            outdated += i64::from(health.outdated_pods);
        }
        for (reason, count) in not_ready {
            self.not_ready
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .set(count);
        }
        self.uninjected_pods.set(uninjected);
        self.outdated_pods.set(outdated);
    }

    /// The counter of failed `accept`s on `listener` (`admin`, `webhook`).
    pub fn accept_failures(&self, listener: &'static str) -> Counter {
        self.accept_failures
            .get_or_create_owned(&ListenerLabels { listener })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn health(not_ready: Option<&str>, uninjected_pods: u32, outdated_pods: u32) -> GatewayHealth {
        GatewayHealth {
            not_ready: not_ready.map(str::to_owned),
            uninjected_pods,
            outdated_pods,
        }
    }

    /// The sample lines starting with `prefix`, sorted: the order of a family's label sets in
    /// the exposition is not defined.
    fn lines(metrics: &Metrics, prefix: &str) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode()
            .expect("encodes")
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn gateway_gauges_total_the_last_health_of_each_gateway_and_forget_deleted_ones() {
        let metrics = Metrics::default();
        metrics.gateway_observed("a", "main", None, health(Some("KeyMissing"), 2, 1));
        metrics.gateway_observed("b", "main", None, health(Some("KeyMissing"), 0, 3));
        metrics.gateway_observed("c", "main", None, health(None, 1, 0));
        assert_eq!(
            lines(&metrics, "sidegate_operator_aigateways_not_ready"),
            ["sidegate_operator_aigateways_not_ready{reason=\"KeyMissing\"} 2"]
        );
        assert_eq!(
            lines(&metrics, "sidegate_operator_uninjected_pods "),
            ["sidegate_operator_uninjected_pods 3"]
        );
        assert_eq!(
            lines(&metrics, "sidegate_operator_outdated_pods "),
            ["sidegate_operator_outdated_pods 4"]
        );

        // A gateway reconciled again replaces its last health; a reason no gateway has any more
        // stays at 0.
        metrics.gateway_observed("a", "main", None, health(Some("InvalidSpec"), 0, 0));
        metrics.gateway_observed("b", "main", None, health(None, 0, 0));
        assert_eq!(
            lines(&metrics, "sidegate_operator_aigateways_not_ready"),
            [
                "sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"} 1",
                "sidegate_operator_aigateways_not_ready{reason=\"KeyMissing\"} 0",
            ]
        );
        metrics.retain_gateways(|ns, _| ns != "a");
        assert_eq!(
            lines(&metrics, "sidegate_operator_aigateways_not_ready"),
            [
                "sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"} 0",
                "sidegate_operator_aigateways_not_ready{reason=\"KeyMissing\"} 0",
            ]
        );
        assert_eq!(
            lines(&metrics, "sidegate_operator_uninjected_pods "),
            ["sidegate_operator_uninjected_pods 1"]
        );
    }

    #[test]
    fn a_reconcile_finishing_after_its_gateway_was_deleted_records_nothing() {
        let metrics = Metrics::default();
        let not_ready = |m: &Metrics| lines(m, "sidegate_operator_aigateways_not_ready");
        metrics.gateway_observed("a", "gw", Some("uid-1"), health(Some("InvalidSpec"), 0, 0));
        metrics.gateway_deleted("a", "gw", Some("uid-1"));
        assert_eq!(
            not_ready(&metrics),
            ["sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"} 0"]
        );
        // The reconcile that was running at the deletion reports late: ignored.
        metrics.gateway_observed("a", "gw", Some("uid-1"), health(Some("InvalidSpec"), 0, 0));
        assert_eq!(
            not_ready(&metrics),
            ["sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"} 0"]
        );
        // A gateway made again under the same name is a new object: counted.
        metrics.gateway_observed("a", "gw", Some("uid-2"), health(Some("InvalidSpec"), 0, 0));
        assert_eq!(
            not_ready(&metrics),
            ["sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"} 1"]
        );
    }

    #[test]
    fn failed_accepts_are_counted_by_listener_from_zero() {
        let metrics = Metrics::default();
        let webhook = metrics.accept_failures("webhook");
        webhook.inc();
        webhook.inc();
        assert_eq!(
            lines(&metrics, "sidegate_operator_accept_failures_total"),
            [
                "sidegate_operator_accept_failures_total{listener=\"admin\"} 0",
                "sidegate_operator_accept_failures_total{listener=\"webhook\"} 2",
            ]
        );
    }

    #[test]
    fn a_status_without_a_true_ready_condition_is_not_ready_by_its_reason() {
        let status: AIGatewayStatus = serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Ready", "status": "False", "reason": "KeyMissing",
                "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
            "uninjectedPods": 2,
            "outdatedPods": 1,
        }))
        .expect("status");
        assert_eq!(GatewayHealth::of(&status), health(Some("KeyMissing"), 2, 1));
        assert_eq!(
            GatewayHealth::of(&AIGatewayStatus::default())
                .not_ready
                .as_deref(),
            Some("Unknown")
        );
    }
}
