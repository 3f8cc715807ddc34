//! The operator serving chosen namespaces only (`--watch-namespace`), against a real
//! kube-apiserver started by `tests/cluster/`:
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_namespaced
//! ```
//!
//! The controllers run impersonating a ServiceAccount that has the operator's rules as a Role in
//! the watched namespace and nothing anywhere else (no ClusterRole): a watch or read beyond the
//! namespace would be refused, and the gateway never reconciled (its own watch), a rotated key
//! never rendered (the Secret watch), a pod without the sidecar never counted (the pod watch and
//! list) or no Event written. Also: pods in a namespace the webhook never injects are not
//! counted as waiting for a restart. Its own test binary, so no cluster-wide operator runs
//! beside it.

mod common;
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::inject::GATEWAY_ANNOTATION;

use common::{cluster_client, create_test_namespace, eventually, unique_name};
use support::*;

/// The namespaced rules of operator/rbac.yaml's ClusterRole (all of them but the cluster-scoped
/// webhook configuration's), as a Role.
fn namespaced_rules() -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
    let text = std::fs::read_to_string(repo_root().join("operator/rbac.yaml")).expect("rbac.yaml");
    let role: ClusterRole = text
        .split("\n---\n")
        .find(|doc| doc.contains("kind: ClusterRole\n"))
        .map(|doc| serde_saphyr::from_str(doc).expect("ClusterRole parses"))
        .expect("a ClusterRole in rbac.yaml");
    role.rules
        .expect("rules")
        .into_iter()
        .filter(|r| {
            !r.resources
                .iter()
                .flatten()
                .any(|res| res == "mutatingwebhookconfigurations")
        })
        .collect()
}

#[tokio::test]
async fn a_namespaced_operator_serves_its_namespace_with_a_role_there_and_nothing_else() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let watched = create_test_namespace(&client, "watched").await;
    let other = create_test_namespace(&client, "unwatched").await;

    // A ServiceAccount whose only permissions are the Role in the watched namespace.
    let sa_name = unique_name("sidegate-ns-operator");
    create(
        &Api::<ServiceAccount>::namespaced(client.clone(), &watched.name),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some(sa_name.clone()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        },
    )
    .await;
    let meta = || ObjectMeta {
        name: Some("sidegate-operator".into()),
        ..ObjectMeta::default()
    };
    create(
        &Api::<Role>::namespaced(client.clone(), &watched.name),
        &Role {
            metadata: meta(),
            rules: Some(namespaced_rules()),
        },
    )
    .await;
    create(
        &Api::<RoleBinding>::namespaced(client.clone(), &watched.name),
        &RoleBinding {
            metadata: meta(),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: "sidegate-operator".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: sa_name.clone(),
                namespace: Some(watched.name.clone()),
                ..Subject::default()
            }]),
        },
    )
    .await;
    let user = format!("system:serviceaccount:{}:{sa_name}", watched.name);
    start_controllers(&user, Scope::namespaces([&watched.name]).expect("scope")).await;

    // The same gateway and key in both namespaces.
    for ns in [&watched.name, &other.name] {
        create(
            &Api::namespaced(client.clone(), ns),
            &secret("llm-keys", &[("openai", "sk-ns")]),
        )
        .await;
        create(
            &Api::<ProviderKey>::namespaced(client.clone(), ns),
            &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
        )
        .await;
        create(
            &Api::<AIGateway>::namespaced(client.clone(), ns),
            &gateway("main", json!({"requestTimeout": "30s"})),
        )
        .await;
    }

    let gw = wait_ready(&Api::namespaced(client.clone(), &watched.name), "main").await;
    assert_eq!(gw.status.as_ref().and_then(|s| s.key_count), Some(1));
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &watched.name);
    eventually("the watched ProviderKey's status", WAIT, || async {
        keys.get("openai-main").await.ok()?.status.map(|_| ())
    })
    .await;
    Api::<ConfigMap>::namespaced(client.clone(), &watched.name)
        .get("sidegate-main")
        .await
        .expect("the watched gateway's ConfigMap");

    // Every watch and read works within the namespace, not only the gateways': a rotated key
    // Secret reaches the rendered keys Secret, a pod without the sidecar is counted, and the
    // transitions were written as Events there.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &watched.name);
    secrets
        .patch(
            "llm-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"openai": "sk-ns-rotated"}})),
        )
        .await
        .expect("rotate the key");
    eventually("the rotated key in the rendered Secret", WAIT, || {
        let secrets = secrets.clone();
        async move {
            let rendered = secrets.get("sidegate-main-keys").await.ok()?;
            (secret_value(&rendered, "openai.default").as_deref() == Some("sk-ns-rotated"))
                .then_some(())
        }
    })
    .await;
    wait_for_default_service_account(&client, &watched.name).await;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "annotations": {GATEWAY_ANNOTATION: "main"}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
    }))
    .expect("pod");
    create(&Api::namespaced(client.clone(), &watched.name), &pod).await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &watched.name);
    eventually("status.uninjectedPods 1", WAIT, || {
        let gateways = gateways.clone();
        async move {
            let gw = gateways.get("main").await.ok()?;
            (gw.status?.uninjected_pods == Some(1)).then_some(())
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &watched.name);
    eventually("an UninjectedPods Event", WAIT, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("UninjectedPods"))
                .then_some(())
        }
    })
    .await;

    // The other namespace is not served: a few seconds after the watched one was done, its
    // gateway and key have no status and nothing was rendered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unserved = Api::<AIGateway>::namespaced(client.clone(), &other.name)
        .get("main")
        .await
        .expect("gateway");
    assert!(unserved.status.is_none(), "{:?}", unserved.status);
    let unserved_key = Api::<ProviderKey>::namespaced(client.clone(), &other.name)
        .get("openai-main")
        .await
        .expect("key");
    assert!(unserved_key.status.is_none(), "{:?}", unserved_key.status);
    let rendered = Api::<ConfigMap>::namespaced(client.clone(), &other.name)
        .get_opt("sidegate-main")
        .await
        .expect("get");
    assert!(rendered.is_none(), "{:?}", rendered.map(|c| c.name_any()));

    watched.delete().await;
    other.delete().await;
}

#[tokio::test]
async fn pods_in_a_namespace_the_webhook_never_injects_are_not_counted_as_uninjected() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    // Both served; the webhook never injects in the first (as kube-system, the release
    // namespace or an --exclude-namespace), so restarting its pods would not help.
    let excluded = create_test_namespace(&client, "excluded").await;
    let injected = create_test_namespace(&client, "injected").await;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "annotations": {GATEWAY_ANNOTATION: "main"}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
    }))
    .expect("pod");
    for ns in [&excluded.name, &injected.name] {
        wait_for_default_service_account(&client, ns).await;
        create(&Api::namespaced(client.clone(), ns), &pod).await;
        create(
            &Api::<AIGateway>::namespaced(client.clone(), ns),
            &gateway("main", json!({})),
        )
        .await;
    }
    start_controllers_excluding(
        OPERATOR_SA,
        Scope::namespaces([&excluded.name, &injected.name]).expect("scope"),
        [excluded.name.clone()].into(),
    )
    .await;

    let uninjected = |ns: &str, want: u32| {
        let gateways = Api::<AIGateway>::namespaced(client.clone(), ns);
        move || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("main").await.ok()?;
                (gw.status?.uninjected_pods == Some(want)).then_some(())
            }
        }
    };
    // Counted where the webhook injects: the same pod in the excluded namespace would be too
    // without the exclusion.
    eventually(
        "status.uninjectedPods 1 where the webhook injects",
        WAIT,
        uninjected(&injected.name, 1),
    )
    .await;
    eventually(
        "status.uninjectedPods 0 where it never does",
        WAIT,
        uninjected(&excluded.name, 0),
    )
    .await;
    wait_ready(&Api::namespaced(client.clone(), &excluded.name), "main").await;
    let events = Api::<Event>::namespaced(client.clone(), &excluded.name)
        .list(&Default::default())
        .await
        .expect("events");
    assert!(
        !events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("UninjectedPods")),
        "{:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
    excluded.delete().await;
    injected.delete().await;
}
