//! Leader election with a `coordination.k8s.io/v1` Lease, so that only one replica runs the
//! controllers. The lease is taken when free or lapsed (its renewal unchanged for its duration,
//! as this replica's own clock measures: clocks of different nodes may disagree), renewed well
//! within its duration (each renewal bounded in time), and released on shutdown so a standby
//! takes over at once. Optimistic concurrency (`resourceVersion`) settles races between replicas.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// Where the lease lives and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// Renewal period; give up leadership when no renewal succeeded for `duration - renew_every`.
    pub renew_every: Duration,
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another replica holds the lease now.
    #[error("lease {0} was taken over by {1}")]
    TakenOver(String, String),
    /// Renewals failed for too long.
    #[error("lease {name} could not be renewed for {secs}s: {reason}")]
    RenewFailed {
        /// Lease name.
        name: String,
        /// Seconds since the last successful renewal.
        secs: u64,
        /// The last attempt's error, or that it did not finish in time.
        reason: String,
    },
}

/// Takes and holds one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// What this replica last saw of the lease while another replica held it.
    observed: std::sync::Mutex<Option<Observed>>,
}

/// A lease another replica holds, as this replica saw it, and when (on its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: String,
    renewed: Option<Timestamp>,
    secs: Option<i32>,
    at: std::time::Instant,
}

/// Whether a lease held by `holder` has lapsed, judged as client-go does: by how long this
/// replica has seen the same renewal, on its own clock. Comparing the holder's `renewTime`
/// with this replica's clock would let a clock skew longer than the lease take a healthy one.
fn lapsed(
    observed: &mut Option<Observed>,
    holder: &str,
    renewed: Option<Timestamp>,
    secs: Option<i32>,
    now: std::time::Instant,
) -> bool {
    let (Some(_), Some(duration)) = (renewed, secs) else {
        return true;
    };
    match observed {
        Some(o) if o.holder == holder && o.renewed == renewed && o.secs == secs => {
            now.saturating_duration_since(o.at)
                >= Duration::from_secs(u64::try_from(duration).unwrap_or(0))
        }
        _ => {
            *observed = Some(Observed {
                holder: holder.to_owned(),
                renewed,
                secs,
                at: now,
            });
            false
        }
    }
}

enum Attempt {
    Leading,
    HeldBy(String),
}

impl LeaderElector {
    /// An elector for `settings`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: std::sync::Mutex::default(),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        let mut logged_holder = String::new();
        loop {
            let attempt = tokio::time::timeout(self.settings.renew_every, self.try_lead())
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
            match attempt {
                Ok(Attempt::Leading) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "acquired leadership");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if holder != logged_holder {
                        tracing::info!(lease = %self.settings.name, %holder, "standing by while another replica leads");
                        logged_holder = holder;
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.settings.name, error = %e, "lease not acquired; retrying")
                }
            }
            tokio::time::sleep(self.settings.renew_every).await;
        }
    }

    /// Renews the lease until leadership is lost; returns why.
    pub async fn hold(&self) -> LeaseError {
        let deadline = self
            .settings
            .duration
            .saturating_sub(self.settings.renew_every);
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.settings.renew_every).await;
            // Bounded: a renewal stuck on a half-dead connection must not keep this replica
            // leading past the lease's end while a standby takes over.
            let attempt = tokio::time::timeout(self.settings.renew_every, self.try_lead()).await;
            let reason = match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    last_ok = tokio::time::Instant::now();
                    continue;
                }
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    return LeaseError::TakenOver(self.settings.name.clone(), holder);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {}s", self.settings.renew_every.as_secs()),
            };
            let elapsed = last_ok.elapsed();
            tracing::warn!(lease = %self.settings.name, error = %reason, "lease renewal failed");
            if elapsed >= deadline {
                return LeaseError::RenewFailed {
                    name: self.settings.name.clone(),
                    secs: elapsed.as_secs(),
                    reason,
                };
            }
        }
    }

    /// Gives the lease up (if still held) so a standby replica takes over without waiting.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(lease = %self.settings.name, error = %e, "lease release failed");
        }
    }

    async fn try_lead(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let me = &self.settings.identity;
        let duration_secs = i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy("another replica".into())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != *me {
            let renewed = spec.renew_time.as_ref().map(|MicroTime(t)| *t);
            let mut observed = self
                .observed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = std::time::Instant::now();
            if !lapsed(
                &mut observed,
                &holder,
                renewed,
                spec.lease_duration_seconds,
                now,
            ) {
                return Ok(Attempt::HeldBy(holder));
            }
        }
        if holder != *me {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(me.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(MicroTime(now));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy(holder)),
            Err(e) => Err(e),
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    #[test]
    fn a_lease_lapses_after_its_duration_unrenewed_on_this_replicas_clock() {
        let t0 = std::time::Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        // The holder's renewTime is a day ahead of this replica (a skewed clock): no matter.
        let renewed = Some(Timestamp::now() + SignedDuration::from_hours(24));
        let mut seen = None;
        assert!(!lapsed(&mut seen, "a", renewed, Some(15), at(0)));
        assert!(!lapsed(&mut seen, "a", renewed, Some(15), at(14)));
        assert!(lapsed(&mut seen, "a", renewed, Some(15), at(15)));
        // A renewal seen starts the count again; so does another holder.
        let later = renewed.map(|t| t + SignedDuration::from_secs(5));
        assert!(!lapsed(&mut seen, "a", later, Some(15), at(16)));
        assert!(!lapsed(&mut seen, "a", later, Some(15), at(30)));
        assert!(!lapsed(&mut seen, "b", later, Some(15), at(31)));
        assert!(lapsed(&mut seen, "b", later, Some(15), at(46)));
        // A lease that was never renewed, or has no duration, is free.
        assert!(lapsed(&mut None, "a", None, Some(15), at(0)));
        assert!(lapsed(&mut None, "a", renewed, None, at(0)));
    }
}
