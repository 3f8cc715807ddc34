//! Which revision of the operator's Deployment this replica runs, so that replicas of two
//! revisions serving side by side — a rolling upgrade, or one that stalled — follow the newer
//! one's settings where they share them through the apiserver (the self-managed webhook
//! certificate, [`crate::webhook::certs`]) instead of each undoing the other's.
//!
//! The revision is the `deployment.kubernetes.io/revision` of the ReplicaSet that owns the
//! replica's pod. A rollback gives the ReplicaSet it returns to the highest number, so the newer
//! one is always the template the Deployment is heading for. Numbers start over in a Deployment
//! made again (deleted and reinstalled, or replaced), so a revision is ordered by when its
//! Deployment was made first ([`Revision`]).
//!
//! The replica finds its ReplicaSet by name: the Deployment controller names it
//! `<deployment>-<pod-template-hash>`, and the chart gives the pod's `pod-template-hash` label
//! through the downward API (`$POD_TEMPLATE_HASH`), so it needs `get` on ReplicaSets and on the
//! Deployment in the operator's namespace, not on pods ([`Replica::ReplicaSet`]). Without the
//! hash (run outside the chart) it reads its own pod for its ReplicaSet instead, which needs `get`
//! on pods too ([`Replica::Pod`]). The ReplicaSet and the Deployment's creation are read once;
//! the number again at each call (a rollback changes it), the last one read standing in while
//! it cannot be read.

use std::sync::{Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};

/// The ReplicaSet annotation the Deployment controller numbers its revisions with.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// A revision of a Deployment. Ordered by the Deployment's creation, then its uid (two made in
/// one second), then the number: a Deployment made again is newer than any revision of the one
/// before.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// When the Deployment was made, Unix seconds.
    pub created: i64,
    /// The Deployment's uid.
    pub deployment: String,
    /// The revision within it.
    pub number: u64,
}

/// How a replica finds the ReplicaSet that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replica {
    /// By name, `<deployment>-<pod-template-hash>`: no need to read the pod.
    ReplicaSet(String),
    /// Through its pod (this one), read for the ReplicaSet that controls it: needs `get` on pods.
    Pod(String),
}

impl Replica {
    /// The ReplicaSet of Deployment `deployment` whose pods bear `pod_template_hash`, when both
    /// are known; else pod `pod`, when known; else `None` (the revision is unknown).
    pub fn find(
        deployment: Option<&str>,
        pod_template_hash: Option<&str>,
        pod: Option<&str>,
    ) -> Option<Self> {
        match (deployment, pod_template_hash, pod) {
            (Some(deployment), Some(hash), _) if !deployment.is_empty() && !hash.is_empty() => {
                Some(Self::ReplicaSet(format!("{deployment}-{hash}")))
            }
            (_, _, Some(pod)) if !pod.is_empty() => Some(Self::Pod(pod.to_owned())),
            _ => None,
        }
    }

    /// What it is, for logs: `replicaset/NAME` or `pod/NAME`.
    fn describe(&self) -> String {
        match self {
            Self::ReplicaSet(name) => format!("replicaset/{name}"),
            Self::Pod(name) => format!("pod/{name}"),
        }
    }
}

/// The revision of the Deployment one replica (pod) runs.
#[derive(Debug)]
pub struct OwnRevision {
    pods: Api<Pod>,
    replicasets: Api<ReplicaSet>,
    deployments: Api<Deployment>,
    replica: Replica,
    /// `replicaset/NAME` or `pod/NAME`, for logs.
    described: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The ReplicaSet owning the pod, once read.
    replicaset: Option<String>,
    /// The Deployment owning that ReplicaSet (uid) and when it was made, once read.
    deployment: Option<(String, i64)>,
    /// Not run by a Deployment, or its Deployment is gone: no revision, nothing more to ask.
    none: bool,
    /// The revision last read.
    last: Option<Revision>,
    /// A failed read was logged as a warning (once per process).
    warned: bool,
    /// A missing ReplicaSet was logged as a warning (once per process).
    absent_said: bool,
}

/// Why the revision was not read now: tried again at the next check.
#[derive(Debug)]
enum Unread {
    /// The replica's ReplicaSet (named) is not there.
    Absent(String),
    /// The apiserver could not be asked, or refused.
    Failed(kube::Error),
}

impl From<kube::Error> for Unread {
    fn from(e: kube::Error) -> Self {
        Self::Failed(e)
    }
}

impl OwnRevision {
    /// The revision `replica`, in `namespace`, runs.
    pub fn new(client: Client, namespace: &str, replica: Replica) -> Self {
        let state = State {
            replicaset: match &replica {
                Replica::ReplicaSet(name) => Some(name.clone()),
                Replica::Pod(_) => None,
            },
            ..State::default()
        };
        Self {
            pods: Api::namespaced(client.clone(), namespace),
            replicasets: Api::namespaced(client.clone(), namespace),
            deployments: Api::namespaced(client, namespace),
            described: replica.describe(),
            replica,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The revision, its number read again; the last one read when that fails; `None` if none
    /// was ever read (the pod has no ReplicaSet of a Deployment, the Deployment was deleted, or
    /// they cannot be read).
    pub async fn current(&self) -> Option<Revision> {
        if self.state().none {
            return None;
        }
        match self.read().await {
            Ok(Some(revision)) => {
                let mut state = self.state();
                if state.last.as_ref() != Some(&revision) {
                    tracing::info!(
                        replica = %self.described,
                        revision = revision.number,
                        deployment = %revision.deployment,
                        "this replica runs this revision of the operator's Deployment"
                    );
                    state.last = Some(revision);
                }
                state.last.clone()
            }
            Ok(None) => {
                let mut state = self.state();
                state.none = true;
                tracing::info!(
                    replica = %self.described,
                    "this replica belongs to no ReplicaSet of a Deployment (or no longer to one that exists): its webhook certificate settings are not ordered against other replicas'"
                );
                None
            }
            Err(Unread::Absent(replicaset)) => {
                let mut state = self.state();
                if !std::mem::replace(&mut state.absent_said, true) {
                    tracing::warn!(
                        replica = %self.described,
                        replicaset = %replicaset,
                        "this replica's ReplicaSet is not there (deleted, or $POD_TEMPLATE_HASH is not its Deployment's): read again at each check, the revision read last standing meanwhile"
                    );
                }
                state.last.clone()
            }
            Err(Unread::Failed(e)) => {
                let mut state = self.state();
                if std::mem::replace(&mut state.warned, true) {
                    tracing::debug!(replica = %self.described, error = %e, "revision not read again");
                } else {
                    let reads = match self.replica {
                        Replica::ReplicaSet(_) => {
                            "its ReplicaSet or the Deployment (it needs `get` on replicasets and on the Deployment in the operator's namespace)"
                        }
                        Replica::Pod(_) => {
                            "its pod, ReplicaSet or Deployment (without $POD_TEMPLATE_HASH and --owner-deployment it reads its pod, $POD_NAME, for its ReplicaSet: it needs `get` on pods, replicasets and the Deployment in the operator's namespace; the chart gives the hash and grants no pods)"
                        }
                    };
                    tracing::warn!(
                        replica = %self.described,
                        error = %e,
                        "cannot read this replica's {reads}: until it can, it keeps a webhook certificate made for a known revision until it is due (renewing it with the settings it was made with), and replaces one made for no known revision only if it is longer than its validity or lacks one of its names"
                    );
                }
                state.last.clone()
            }
        }
    }

    /// The revision as the apiserver has it now; `None` if the pod has no Deployment.
    async fn read(&self) -> Result<Option<Revision>, Unread> {
        let known = self.state().replicaset.clone();
        let replicaset = match known {
            Some(name) => name,
            None => {
                let Replica::Pod(pod) = &self.replica else {
                    return Ok(None);
                };
                let pod = self.pods.get(pod).await?;
                let Some(name) = controller(&pod, "ReplicaSet") else {
                    return Ok(None);
                };
                self.state().replicaset = Some(name.clone());
                name
            }
        };
        // A ReplicaSet that is not there now may be again (deleted orphaning its pods, the
        // Deployment makes it anew under the same name): read again at the next check, the
        // last revision read standing meanwhile, as for any failed read.
        let Some(rs) = self.replicasets.get_opt(&replicaset).await? else {
            return Err(Unread::Absent(replicaset));
        };
        let Some(number) = rs
            .annotations()
            .get(REVISION_ANNOTATION)
            .and_then(|r| r.parse::<u64>().ok())
        else {
            return Ok(None);
        };
        let known = self.state().deployment.clone();
        let (deployment, created) = match known {
            Some(known) => known,
            None => {
                let Some(owner) = rs
                    .owner_references()
                    .iter()
                    .find(|r| r.controller == Some(true) && r.kind == "Deployment")
                else {
                    return Ok(None);
                };
                // Read by name; one of another uid is a Deployment made in place of ours.
                let Some(created) = self
                    .deployments
                    .get_opt(&owner.name)
                    .await?
                    .filter(|d| d.metadata.uid.as_deref() == Some(owner.uid.as_str()))
                    .and_then(|d| d.metadata.creation_timestamp)
                    .map(|t| t.0.as_second())
                else {
                    return Ok(None);
                };
                let known = (owner.uid.clone(), created);
                self.state().deployment = Some(known.clone());
                known
            }
        };
        Ok(Some(Revision {
            created,
            deployment,
            number,
        }))
    }
}

/// The name of the object of `kind` that controls `pod`.
fn controller(pod: &Pod, kind: &str) -> Option<String> {
    pod.owner_references()
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == kind)
        .map(|r| r.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_finds_its_replicaset_by_name_from_the_hash_else_through_its_pod() {
        assert_eq!(
            Replica::find(
                Some("sidegate"),
                Some("5d9f7c6b8"),
                Some("sidegate-5d9f7c6b8-x2v4q")
            ),
            Some(Replica::ReplicaSet("sidegate-5d9f7c6b8".into()))
        );
        // Outside the chart: no hash, or no Deployment name (--owner-deployment).
        for (deployment, hash) in [
            (Some("sidegate"), None),
            (None, Some("5d9f7c6b8")),
            (Some("sidegate"), Some("")),
        ] {
            assert_eq!(
                Replica::find(deployment, hash, Some("op-0")),
                Some(Replica::Pod("op-0".into())),
                "{deployment:?} {hash:?}"
            );
        }
        assert_eq!(Replica::find(None, None, None), None);
        assert_eq!(Replica::find(Some("sidegate"), None, Some("")), None);
    }

    #[test]
    fn a_deployment_made_again_is_newer_than_every_revision_of_the_one_before() {
        let of = |created: i64, deployment: &str, number: u64| Revision {
            created,
            deployment: deployment.into(),
            number,
        };
        assert!(of(100, "a", 3) > of(100, "a", 2));
        // Deleted and reinstalled (or replaced): its revisions start over at 1.
        assert!(of(200, "b", 1) > of(100, "a", 7));
        // Made in the same second: the uid decides, the same way for every replica.
        assert!(of(100, "b", 1) > of(100, "a", 7));
        let json = serde_json::to_string(&of(100, "a", 3)).expect("json");
        assert_eq!(json, r#"{"created":100,"deployment":"a","number":3}"#);
    }
}
