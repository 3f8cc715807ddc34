//! Pods that name a gateway but run without its sidecar.
//!
//! The webhook admits a pod it cannot inject (its AIGateway does not exist yet, the webhook was
//! down under `failurePolicy: Ignore`, ...) unchanged, so the app runs without the gateway. The
//! AIGateway reconcile counts those pods into `status.uninjectedPods` and says which in an
//! Event. Pods are watched metadata-only: the webhook marks every pod it injects with
//! `sidegate.dev/injected`, so the annotations find the candidates, and only those are read
//! whole to look at their containers.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, ObjectMeta};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use sidegate_crds::api::AIGateway;

use crate::webhook::inject::{self, SIDECAR_CONTAINER};

/// Candidates read whole per reconcile; more are counted from their annotations alone.
pub const MAX_PODS_READ: usize = 32;
/// Pods named in the Event.
pub const MAX_PODS_NAMED: usize = 5;

/// The pods of one gateway that run without its sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UninjectedPods {
    /// How many.
    pub count: u32,
    /// The first few names, sorted.
    pub names: Vec<String>,
}

impl UninjectedPods {
    /// The Event note: how many, which, and what to do.
    pub fn note(&self, gateway: &str) -> String {
        let mut names = self.names.join(", ");
        let more = (self.count as usize).saturating_sub(self.names.len());
        if more > 0 {
            names.push_str(&format!(" and {more} more"));
        }
        format!(
            "{} pod(s) annotated {}: {gateway} run without the sidecar (created before the AIGateway, or while the webhook could not inject them): {names}; restart them (kubectl rollout restart, or delete the pods) to get the sidecar",
            self.count,
            inject::GATEWAY_ANNOTATION
        )
    }
}

/// The gateway a pod asks for, if by its metadata it may run without the sidecar: annotated
/// `sidegate.dev/gateway`, not opted out, not marked injected by the webhook, not being deleted.
pub fn requested_gateway_without_sidecar(meta: &ObjectMeta) -> Option<String> {
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    inject::requested_gateway_by_annotations(meta.annotations.as_ref()).ok()
}

/// The gateway to reconcile when a pod changes: the one it names, if it may lack the sidecar.
/// A pod being deleted counts no more, so its gateway is reconciled too (the watch's last word
/// on a deleted pod carries its deletion timestamp).
pub fn gateway_for_pod(meta: &ObjectMeta) -> Option<ObjectRef<AIGateway>> {
    let gateway = inject::requested_gateway_by_annotations(meta.annotations.as_ref()).ok()?;
    Some(ObjectRef::new(&gateway).within(meta.namespace.as_deref()?))
}

/// Whether `pod` runs the sidecar (as a native sidecar or a regular container).
pub fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    })
}

/// Whether `pod` has ended (a Job's pod): restarting it is not what anyone wants.
fn has_ended(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pods in `ns` that name gateway `name` and run without the sidecar: a metadata list
/// (from the apiserver's cache), then a read of at most [`MAX_PODS_READ`] candidates. None in a
/// namespace of `excluded` (the webhook's exclusions): a restart would not inject them either.
pub async fn uninjected(
    client: &Client,
    ns: &str,
    name: &str,
    excluded: &BTreeSet<String>,
) -> Result<UninjectedPods, kube::Error> {
    if excluded.contains(ns) {
        return Ok(UninjectedPods::default());
    }
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let listed = api
        .list_metadata(&ListParams::default().match_any())
        .await?;
    let mut candidates: Vec<String> = listed
        .items
        .iter()
        .filter(|p| requested_gateway_without_sidecar(&p.metadata).as_deref() == Some(name))
        .map(ResourceExt::name_any)
        .collect();
    candidates.sort();
    let unread = candidates.len().saturating_sub(MAX_PODS_READ);
    let mut without = BTreeSet::new();
    for pod_name in candidates.into_iter().take(MAX_PODS_READ) {
        // Gone since the list: nothing to count.
        if let Some(pod) = api.get_opt(&pod_name).await?
            && !has_sidecar(&pod)
            && !has_ended(&pod)
        {
            without.insert(pod_name);
        }
    }
    Ok(UninjectedPods {
        count: u32::try_from(without.len() + unread).unwrap_or(u32::MAX),
        names: without.into_iter().take(MAX_PODS_NAMED).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("app-1".into()),
            namespace: Some("team-a".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_pod_naming_a_gateway_without_the_injected_mark_maps_to_that_gateway() {
        let gw = ObjectRef::<AIGateway>::new("main").within("team-a");
        assert_eq!(
            gateway_for_pod(&meta(&[(inject::GATEWAY_ANNOTATION, " main ")])),
            Some(gw)
        );
        for skipped in [
            meta(&[]),
            meta(&[(inject::GATEWAY_ANNOTATION, "")]),
            meta(&[
                (inject::GATEWAY_ANNOTATION, "main"),
                (inject::INJECTED_ANNOTATION, "v1"),
            ]),
            meta(&[
                (inject::GATEWAY_ANNOTATION, "main"),
                (inject::INJECT_ANNOTATION, "false"),
            ]),
        ] {
            assert_eq!(gateway_for_pod(&skipped), None, "{skipped:?}");
        }
        // A pod being deleted is not counted, and its gateway reconciled to count it out.
        let mut deleting = meta(&[(inject::GATEWAY_ANNOTATION, "main")]);
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(requested_gateway_without_sidecar(&deleting), None);
        assert_eq!(
            gateway_for_pod(&deleting),
            Some(ObjectRef::new("main").within("team-a"))
        );
    }

    #[test]
    fn the_sidecar_is_found_as_a_native_sidecar_or_a_container() {
        let pod = |json: serde_json::Value| -> Pod { serde_json::from_value(json).expect("pod") };
        let app = serde_json::json!({"name": "app", "image": "app:1"});
        let sidecar = serde_json::json!({"name": SIDECAR_CONTAINER, "image": "sidegate:1"});
        assert!(!has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app]}})
        )));
        assert!(has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app], "initContainers": [sidecar]}})
        )));
        assert!(has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app, sidecar]}})
        )));
    }

    #[test]
    fn the_note_names_a_few_pods_and_says_to_restart_them() {
        let pods = UninjectedPods {
            count: 7,
            names: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
        };
        assert_eq!(
            pods.note("main"),
            "7 pod(s) annotated sidegate.dev/gateway: main run without the sidecar (created before the AIGateway, or while the webhook could not inject them): a, b, c, d, e and 2 more; restart them (kubectl rollout restart, or delete the pods) to get the sidecar"
        );
    }
}
