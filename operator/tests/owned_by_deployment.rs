//! What the operator makes for itself in its namespace — the leader Lease and the self-managed
//! webhook certificate Secret — goes with its Deployment (`helm uninstall` deletes the
//! Deployment), collected by kube-controller-manager's garbage collector:
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test owned_by_deployment
//! ```

mod common;
mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, PropagationPolicy};
use serde_json::json;
use sidegate_operator::lease::{LeaderElector, LeaseSettings};
use sidegate_operator::owner;
use sidegate_operator::webhook::certs::{self, CertAction, CertResolver, SelfManaged};

use common::{cluster_client, create_test_namespace, eventually};
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
