//! The operator's own Deployment as the owner of what the operator creates in its namespace for
//! itself: the leader Lease and the self-managed webhook certificate Secret. Deleting the
//! Deployment (`helm uninstall` does) then has the garbage collector delete them too, as it
//! deletes a gateway's rendered objects with the AIGateway. A Lease or Secret that a replica
//! still writes after the Deployment is gone names the gone uid, so it is collected as well.
//!
//! Not `controller` and not `blockOwnerDeletion`: the Deployment's deletion never waits for
//! them, and the operator needs no `deployments/finalizers` permission to set the reference
//! where the OwnerReferencesPermissionEnforcement admission plugin runs.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Api, Client};

/// The reference to Deployment `name` in `namespace` (the namespace of the objects it is to
/// own: the garbage collector deletes a dependent whose namespaced owner is not in its own
/// namespace); `None` if there is no such Deployment.
pub async fn deployment(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<OwnerReference>, kube::Error> {
    let found = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(found.and_then(|d| {
        Some(OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: d.metadata.name?,
            uid: d.metadata.uid?,
            ..OwnerReference::default()
        })
    }))
}

/// Makes `owner` an owner of the object of `meta`, in place of a reference to another object of
/// the same kind and name (a Deployment deleted and made again has a new uid). Returns whether
/// the references changed; other owners are kept.
pub fn adopt(meta: &mut ObjectMeta, owner: &OwnerReference) -> bool {
    let refs = meta.owner_references.get_or_insert_with(Vec::new);
    if refs.iter().any(|r| r.uid == owner.uid) {
        return false;
    }
    refs.retain(|r| !(r.kind == owner.kind && r.name == owner.name));
    refs.push(owner.clone());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            ..OwnerReference::default()
        }
    }

    #[test]
    fn an_object_without_owners_gets_the_deployment_as_its_owner() {
        let mut meta = ObjectMeta::default();
        let deployment = owner("Deployment", "sidegate-operator", "uid-1");
        assert!(adopt(&mut meta, &deployment));
        assert_eq!(meta.owner_references, Some(vec![deployment.clone()]));
        // Once is enough: nothing to write again.
        assert!(!adopt(&mut meta, &deployment));
        assert_eq!(meta.owner_references, Some(vec![deployment]));
    }

    #[test]
    fn a_re_created_deployment_replaces_the_reference_to_the_deleted_one_and_others_stay() {
        let other = owner("ConfigMap", "sidegate-operator", "uid-cm");
        let mut meta = ObjectMeta {
            owner_references: Some(vec![
                other.clone(),
                owner("Deployment", "sidegate-operator", "uid-old"),
            ]),
            ..ObjectMeta::default()
        };
        let now = owner("Deployment", "sidegate-operator", "uid-new");
        assert!(adopt(&mut meta, &now));
        assert_eq!(meta.owner_references, Some(vec![other, now]));
    }
}
