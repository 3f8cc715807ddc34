//! What the operator makes for itself in its namespace — the leader Lease and the self-managed
//! webhook certificate Secret — goes with its Deployment (`helm uninstall` deletes the
//! Deployment), collected by kube-controller-manager's garbage collector:
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test owned_by_deployment
//! ```
//!
//! The Deployment's uid is read again before a reference is written (one deleted with
//! `--cascade=orphan` and made again); where OwnerReferencesPermissionEnforcement refuses an
//! adoption (no `delete`; a second kube-apiserver of the test bed with that plugin), the Lease
//! and the certificate are written without it.

mod common;
mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, PropagationPolicy};
use serde_json::json;
use sidegate_operator::lease::{LeaderElector, LeaseSettings};
use sidegate_operator::owner;
use sidegate_operator::webhook::certs::{self, CertAction, CertResolver, SelfManaged};

use common::{cluster_client, create_test_namespace, eventually};
use support::extra_apiserver::ExtraApiserver;
use support::{WAIT, create};

fn operator_deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "operator", "image": "example.com/operator:1"}]},
            },
        },
    }))
    .expect("deployment")
}

fn lease_settings(ns: &str, name: &str, owner: Option<&OwnerReference>) -> LeaseSettings {
    LeaseSettings {
        namespace: ns.into(),
        name: name.into(),
        identity: "replica-a".into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(1),
        owner: owner.cloned(),
    }
}

fn cert_settings(ns: &str, secret: &str, owner: Option<&OwnerReference>) -> SelfManaged {
    SelfManaged {
        namespace: ns.into(),
        secret_name: secret.into(),
        // No such configuration: its caBundle is not the point here.
        webhook_config_name: "sidegate-no-such-webhook".into(),
        names: vec!["sidegate-webhook.test.svc".into()],
        validity: Duration::from_secs(86400),
        renew_before: Duration::from_secs(4 * 3600),
        owner: owner.cloned(),
        replica: None,
    }
}

async fn lead(client: &Client, settings: LeaseSettings) {
    let elector = LeaderElector::new(client.clone(), settings);
    tokio::time::timeout(Duration::from_secs(10), elector.acquire())
        .await
        .expect("the lease is taken");
}

fn owned_by(meta_owners: Option<&Vec<OwnerReference>>, deployment: &Deployment) -> bool {
    meta_owners.is_some_and(|refs| {
        refs.iter().any(|r| {
            r.kind == "Deployment"
                && r.api_version == "apps/v1"
                && Some(&r.uid) == deployment.metadata.uid.as_ref()
                && r.block_owner_deletion.is_none()
        })
    })
}

#[tokio::test]
async fn the_lease_and_certificate_secret_go_with_the_operators_deployment() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgowner").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let deployment = create(&deployments, &operator_deployment("sidegate-operator")).await;

    let found = owner::deployment(&client, &ns.name, "sidegate-operator")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(Some(&found.uid), deployment.metadata.uid.as_ref());
    assert_eq!(
        owner::deployment(&client, &ns.name, "no-such-deployment")
            .await
            .expect("read"),
        None
    );

    // Made with the owner: a new Lease, a new certificate Secret.
    lead(&client, lease_settings(&ns.name, "fresh", Some(&found))).await;
    let resolver = CertResolver::new();
    let made = certs::ensure_self_managed(
        &client,
        &cert_settings(&ns.name, "fresh-tls", Some(&found)),
        &resolver,
    )
    .await
    .expect("certificate");
    assert_eq!(made, CertAction::Rotated);
    // Made by an operator that had no owner (an older version): adopted when next written.
    lead(&client, lease_settings(&ns.name, "older", None)).await;
    certs::ensure_self_managed(
        &client,
        &cert_settings(&ns.name, "older-tls", None),
        &resolver,
    )
    .await
    .expect("certificate");
    assert!(!owned_by(
        leases
            .get("older")
            .await
            .expect("lease")
            .metadata
            .owner_references
            .as_ref(),
        &deployment
    ));
    lead(&client, lease_settings(&ns.name, "older", Some(&found))).await;
    let reused = certs::ensure_self_managed(
        &client,
        &cert_settings(&ns.name, "older-tls", Some(&found)),
        &resolver,
    )
    .await
    .expect("certificate");
    assert_eq!(reused, CertAction::Reused, "the stored certificate is kept");
    for lease in ["fresh", "older"] {
        let lease = leases.get(lease).await.expect("lease");
        assert!(
            owned_by(lease.metadata.owner_references.as_ref(), &deployment),
            "{lease:?}"
        );
    }
    for secret in ["fresh-tls", "older-tls"] {
        let secret = secrets.get(secret).await.expect("secret");
        assert!(
            owned_by(secret.metadata.owner_references.as_ref(), &deployment),
            "{:?}",
            secret.metadata
        );
    }
    // Something the operator does not own stays.
    lead(&client, lease_settings(&ns.name, "unowned", None)).await;

    // helm uninstall deletes the Deployment (background propagation): the garbage collector
    // deletes what it owns.
    deployments
        .delete(
            "sidegate-operator",
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("delete the Deployment");
    eventually(
        "the garbage collector to delete the Leases and Secrets the Deployment owned",
        WAIT,
        || {
            let (leases, secrets) = (leases.clone(), secrets.clone());
            async move {
                for lease in ["fresh", "older"] {
                    if leases.get_opt(lease).await.ok()?.is_some() {
                        return None;
                    }
                }
                for secret in ["fresh-tls", "older-tls"] {
                    if secrets.get_opt(secret).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    assert!(leases.get_opt("unowned").await.expect("get").is_some());

    // A replica still running after the Deployment is gone (its drain) writes with the gone
    // uid: what it makes again is collected as well.
    lead(&client, lease_settings(&ns.name, "late", Some(&found))).await;
    eventually("the late Lease to be collected", WAIT, || {
        let leases = leases.clone();
        async move { leases.get_opt("late").await.ok()?.is_none().then_some(()) }
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_deployment_deleted_with_orphan_and_made_again_owns_the_lease_its_surviving_leader_renews()
 {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgowner-orphan").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let first = create(&deployments, &operator_deployment("sidegate-operator")).await;
    let found = owner::deployment(&client, &ns.name, "sidegate-operator")
        .await
        .expect("read")
        .expect("found");
    let elector = LeaderElector::new(
        client.clone(),
        lease_settings(&ns.name, "leader", Some(&found)),
    );
    let acquired = tokio::time::timeout(Duration::from_secs(10), elector.acquire())
        .await
        .expect("the lease is taken");
    let holding = tokio::spawn(async move { elector.hold(acquired).await });

    // `kubectl delete deployment --cascade=orphan` (the pods keep running), then the same
    // Deployment applied again: a new uid. The leader read the old one at start.
    deployments
        .delete(
            "sidegate-operator",
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("delete the Deployment, orphaning");
    eventually("the Deployment to be gone", WAIT, || {
        let deployments = deployments.clone();
        async move {
            deployments
                .get_opt("sidegate-operator")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let second = create(&deployments, &operator_deployment("sidegate-operator")).await;
    assert_ne!(second.metadata.uid, first.metadata.uid);

    // The renewals give the Lease the new Deployment as owner (while there was none, they left
    // it as the garbage collector's orphaning made it, without owner)...
    eventually(
        "the Lease to be owned by the Deployment made again",
        WAIT,
        || {
            let (leases, second) = (leases.clone(), second.clone());
            async move {
                let lease = leases.get_opt("leader").await.ok()??;
                owned_by(lease.metadata.owner_references.as_ref(), &second).then_some(())
            }
        },
    )
    .await;
    // ...and from then on the garbage collector leaves it to its leader: 8 renewals, each seen.
    let mut renewals = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while renewals.len() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "8 renewals within 60 s"
        );
        assert!(!holding.is_finished(), "leadership lost");
        let lease = leases
            .get_opt("leader")
            .await
            .expect("get")
            .expect("the Lease stays while its leader renews it");
        assert!(owned_by(lease.metadata.owner_references.as_ref(), &second));
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
        renewals.insert(format!("{:?}", spec.renew_time));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    holding.abort();
    ns.delete().await;
}

#[tokio::test]
async fn without_delete_where_owner_references_are_enforced_the_lease_is_taken_and_the_certificate_rotated_unowned()
 {
    let Some(admin) = cluster_client().await else {
        return;
    };
    let Some(enforcing) = ExtraApiserver::start("OwnerReferencesPermissionEnforcement") else {
        return;
    };
    let ns = create_test_namespace(&admin, "sgowner-nodelete").await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns.name);
    create(&deployments, &operator_deployment("sidegate-operator")).await;
    // The operator's RBAC as it was before `delete` was granted: what the Lease and the
    // certificate need, by name, and no more.
    let webhook_config = format!("sidegate-no-such-webhook-{}", ns.name);
    let rbac: Vec<serde_json::Value> = vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "operator", "namespace": ns.name}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "operator", "namespace": ns.name},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": ["older"], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["apps"], "resources": ["deployments"],
             "resourceNames": ["sidegate-operator"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"],
             "resourceNames": ["older-tls"], "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "operator", "namespace": ns.name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns.name}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": ns.name},
            "rules": [{"apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations"],
                "resourceNames": [webhook_config], "verbs": ["get", "patch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": ns.name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ns.name},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns.name}]}),
    ];
    let manifest = std::env::temp_dir().join(format!("{}.json", ns.name));
    std::fs::write(
        &manifest,
        json!({"apiVersion": "v1", "kind": "List", "items": rbac}).to_string(),
    )
    .expect("write manifest");
    support::kubectl(&["apply", "-f", manifest.to_str().expect("path")]);
    let _ = std::fs::remove_file(&manifest);

    let operator = enforcing
        .client(Some(&format!("system:serviceaccount:{}:operator", ns.name)))
        .await;
    // A just-started apiserver refuses until its RBAC caches are loaded.
    let found = eventually("the operator to read its Deployment", WAIT, || {
        let (operator, ns) = (operator.clone(), ns.name.clone());
        async move {
            owner::deployment(&operator, &ns, "sidegate-operator")
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    let cert = |owner: Option<&OwnerReference>, names: &[&str]| SelfManaged {
        webhook_config_name: webhook_config.clone(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..cert_settings(&ns.name, "older-tls", owner)
    };

    // What an older operator (no owner) left: the Lease, released, and the certificate Secret.
    let older = LeaderElector::new(operator.clone(), lease_settings(&ns.name, "older", None));
    tokio::time::timeout(Duration::from_secs(10), older.acquire())
        .await
        .expect("the older operator takes the Lease");
    older.release().await;
    let resolver = CertResolver::new();
    certs::ensure_self_managed(&operator, &cert(None, &["a.test.svc"]), &resolver)
        .await
        .expect("the older operator makes its certificate");

    // This version cannot adopt them (no delete), and leads and renews all the same...
    let elector = LeaderElector::new(
        operator.clone(),
        lease_settings(&ns.name, "older", Some(&found)),
    );
    let acquired = tokio::time::timeout(Duration::from_secs(10), elector.acquire())
        .await
        .expect("the Lease is taken, unowned, though its adoption is refused");
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns.name);
    let renewed = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.renew_time.clone());
    let taken = leases.get("older").await.expect("lease");
    let still = tokio::time::timeout(Duration::from_secs(3), elector.hold(acquired)).await;
    assert!(still.is_err(), "leadership lost: {:?}", still.err());
    let lease = leases.get("older").await.expect("lease");
    assert_eq!(
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("replica-a")
    );
    assert_ne!(renewed(&lease), renewed(&taken), "renewed since taken");
    assert!(
        lease
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    // ...keeps serving the stored certificate, and rotates it when due (here: other names).
    let mut checks = Vec::new();
    for names in [&["a.test.svc"][..], &["a.test.svc", "b.test.svc"]] {
        checks.push(
            certs::ensure_self_managed(&operator, &cert(Some(&found), names), &resolver)
                .await
                .expect("the certificate check succeeds though the adoption is refused"),
        );
    }
    assert_eq!(checks, [CertAction::Reused, CertAction::Rotated]);
    let secret = Api::<Secret>::namespaced(admin.clone(), &ns.name)
        .get("older-tls")
        .await
        .expect("secret");
    assert_eq!(
        secret.metadata.annotations.expect("annotations")[certs::NAMES_ANNOTATION],
        "a.test.svc,b.test.svc"
    );
    assert!(
        secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    for cluster_scoped in [
        Api::<ClusterRoleBinding>::all(admin.clone())
            .delete(&ns.name, &DeleteParams::default())
            .await
            .map(|_| ()),
        Api::<ClusterRole>::all(admin.clone())
            .delete(&ns.name, &DeleteParams::default())
            .await
            .map(|_| ()),
    ] {
        cluster_scoped.expect("cleanup");
    }
    ns.delete().await;
    drop(enforcing);
}
