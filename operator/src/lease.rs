//! Leader election with a `coordination.k8s.io/v1` Lease, so that only one replica runs the
//! controllers. The lease is taken when free or lapsed (its renewal unchanged for its duration,
//! as this replica's own clock measures: clocks of different nodes may disagree), renewed well
//! within its duration, and released on shutdown so a standby takes over at once. Optimistic
//! concurrency (`resourceVersion`) settles races between replicas.
//!
//! Like client-go's `RenewDeadline`, a leader gives up once no renewal succeeded for
//! `duration - renewEvery` counted from the start of the last one that did; every wait and every
//! attempt is cut to the time left, so it stops leading before a standby may take the Lease.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use crate::owner::{Adopter, write_adopting};

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
    /// Renewal period; give up leadership when no renewal succeeded for `duration - renew_every`
    /// (retrying failed renewals every half of it meanwhile).
    pub renew_every: Duration,
    /// Owner of the Lease (the operator's Deployment, [`crate::owner`]), set when it is created
    /// or next written, so that deleting the owner deletes the Lease too (the Deployment is read
    /// again each time: the uid may have changed).
    pub owner: Option<OwnerReference>,
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
    /// Keeps the Lease owned by `settings.owner`.
    owner: Option<Adopter>,
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
        let owner = settings.owner.clone().map(|owner| {
            Adopter::new(
                client.clone(),
                &settings.namespace,
                owner,
                format!("Lease {}", settings.name),
            )
        });
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            owner,
            observed: std::sync::Mutex::default(),
        }
    }

    /// Waits until this replica holds the lease; returns when the attempt that took it started
    /// (what [`Self::hold`] counts from).
    pub async fn acquire(&self) -> Instant {
        let mut logged_holder = String::new();
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout(self.settings.renew_every, self.try_lead())
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
            match attempt {
                Ok(Attempt::Leading) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "acquired leadership");
                    return started;
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

    /// Renews the lease, taken by an attempt that started at `acquired`, until leadership is lost;
    /// returns why. It returns no later than `duration - renew_every` after the start of the
    /// last successful renewal.
    pub async fn hold(&self, acquired: Instant) -> LeaseError {
        keep_renewing(&self.settings, acquired, || self.try_lead()).await
    }

    /// Gives the lease up (if still held) so a standby replica takes over without waiting;
    /// within one renewal period, so that an apiserver that does not answer cannot hold the
    /// shutdown past its grace (the standby then takes over when the lease runs out).
    pub async fn release(&self) {
        let released = tokio::time::timeout(self.settings.renew_every, self.try_release()).await;
        if released.is_err() {
            tracing::warn!(lease = %self.settings.name, "lease release got no answer in time; it runs out instead");
        }
    }

    async fn try_release(&self) {
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
        let (api, name) = (&self.api, &self.settings.name);
        let Some(mut lease) = api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
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
            let created = write_adopting(self.owner.as_ref(), &lease.metadata, |owners| {
                let mut lease = lease.clone();
                lease.metadata.owner_references = owners;
                async move { api.create(&PostParams::default(), &lease).await }
            })
            .await;
            return match created {
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
        // A Lease from before the owner was known (an older operator), or owned by a Deployment
        // since made again, is adopted when taken or renewed, never at the cost of the take or
        // renewal: refused, it is written as it was.
        let written = write_adopting(self.owner.as_ref(), &lease.metadata, |owners| {
            let mut lease = lease.clone();
            if let Some(owners) = owners {
                lease.metadata.owner_references = Some(owners);
            }
            async move { api.replace(name, &PostParams::default(), &lease).await }
        })
        .await;
        match written {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy(holder)),
            Err(e) => Err(e),
        }
    }
}

/// The renewal loop of [`LeaderElector::hold`], over any `attempt` (tests give it a fake one and
/// paused time).
async fn keep_renewing<F, Fut>(
    settings: &LeaseSettings,
    acquired: Instant,
    mut attempt: F,
) -> LeaseError
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Attempt, kube::Error>>,
{
    let renew_deadline = settings.duration.saturating_sub(settings.renew_every);
    let retry_every = settings.renew_every / 2;
    // When the last successful renewal (or the acquiring attempt) started: the Lease's
    // renewTime is at least that late, so standbys wait at least `duration` from there.
    let mut last_ok = acquired;
    let mut next = acquired + settings.renew_every;
    let mut last_error = String::from("no renewal attempted in time");
    loop {
        let deadline = last_ok + renew_deadline;
        tokio::time::sleep_until(next.min(deadline)).await;
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        if remaining.is_zero() {
            return LeaseError::RenewFailed {
                name: settings.name.clone(),
                secs: started.duration_since(last_ok).as_secs(),
                reason: last_error,
            };
        }
        // Bounded: a renewal stuck on a half-dead connection must not keep this replica
        // leading past the renew deadline while a standby takes over.
        let bound = settings.renew_every.min(remaining);
        last_error = match tokio::time::timeout(bound, attempt()).await {
            Ok(Ok(Attempt::Leading)) => {
                last_ok = started;
                next = started + settings.renew_every;
                continue;
            }
            Ok(Ok(Attempt::HeldBy(holder))) => {
                return LeaseError::TakenOver(settings.name.clone(), holder);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:.1}s", bound.as_secs_f32()),
        };
        tracing::warn!(lease = %settings.name, error = %last_error, "lease renewal failed");
        next = Instant::now() + retry_every;
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;
    use std::sync::{Arc, Mutex};

    /// The chart's defaults: a 15 s lease renewed every 5 s, given up 10 s after the last
    /// renewal that succeeded.
    fn settings() -> LeaseSettings {
        LeaseSettings {
            namespace: "sidegate-system".into(),
            name: "sidegate-operator".into(),
            identity: "replica-a".into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            owner: None,
        }
    }

    enum Step {
        /// Renewed, after this long.
        Ok(Duration),
        /// Failed, after this long.
        Fail(Duration),
        /// Never answers.
        Hang,
    }

    /// Holds the lease with renewals that go as `steps` say (then fail at once); returns when
    /// each attempt started, and when and why leadership ended, in seconds after acquiring.
    async fn hold_with(steps: Vec<Step>) -> (Vec<f64>, f64, LeaseError) {
        let t0 = Instant::now();
        let steps = Arc::new(Mutex::new(steps.into_iter()));
        let starts = Arc::new(Mutex::new(Vec::new()));
        let since = move |t: Instant| t.duration_since(t0).as_secs_f64();
        let lost = keep_renewing(&settings(), t0, || {
            let step = steps.lock().expect("steps").next();
            starts.lock().expect("starts").push(since(Instant::now()));
            async move {
                match step {
                    Some(Step::Ok(after)) => {
                        tokio::time::sleep(after).await;
                        Ok(Attempt::Leading)
                    }
                    Some(Step::Hang) => std::future::pending().await,
                    Some(Step::Fail(after)) => {
                        tokio::time::sleep(after).await;
                        Err(kube::Error::Service("refused".into()))
                    }
                    None => Err(kube::Error::Service("refused".into())),
                }
            }
        })
        .await;
        let starts = starts.lock().expect("starts").clone();
        (starts, since(Instant::now()), lost)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_failing_renewal_then_a_hanging_one_end_leadership_at_the_renew_deadline() {
        // The first renewal (at 5 s) fails only after 4.9 s, the next one would hang: the
        // leader must stop by 10 s, well before a standby may take the Lease (15 s after the
        // renewal it last saw), not wait out a full renewal period and timeout again.
        let (starts, ended, lost) =
            hold_with(vec![Step::Fail(Duration::from_millis(4900)), Step::Hang]).await;
        assert_eq!(starts, [5.0]);
        assert!(ended <= 10.0, "leadership ended at {ended} s");
        assert!(
            matches!(lost, LeaseError::RenewFailed { ref reason, .. } if reason.contains("refused")),
            "{lost}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_renew_deadline_counts_from_the_start_of_the_last_successful_renewal() {
        // Renewals that take 4 s each, then failures from 20 s on: the last success started at
        // 15 s, so leadership ends at 25 s (not 10 s after that renewal's answer came).
        let slow = || Step::Ok(Duration::from_secs(4));
        let (starts, ended, lost) = hold_with(vec![slow(), slow(), slow()]).await;
        assert_eq!(starts, [5.0, 10.0, 15.0, 20.0, 22.5]);
        assert_eq!(ended, 25.0);
        assert!(
            matches!(lost, LeaseError::RenewFailed { secs: 10, .. }),
            "{lost}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_is_cut_at_the_renew_deadline() {
        let (starts, ended, lost) = hold_with(vec![
            Step::Ok(Duration::ZERO),
            Step::Fail(Duration::ZERO),
            Step::Hang,
        ])
        .await;
        // Renewed at 5 s; failed at 10 s; retried at 12.5 s and cut at 15 s.
        assert_eq!(starts, [5.0, 10.0, 12.5]);
        assert_eq!(ended, 15.0);
        assert!(
            matches!(lost, LeaseError::RenewFailed { ref reason, .. } if reason.contains("no answer within 2.5s")),
            "{lost}"
        );
    }

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
