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
//! never rendered (the Secret watch), a pod without the sidecar never counted (the pod watch) or
//! no Event written. Also: pods in a namespace the webhook never injects are not counted as
//! waiting for a restart, and a reconcile counts pods from the pod watch's cache, listing none.
//! Its own test binary, so no cluster-wide operator runs beside it.

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

#[tokio::test]
async fn reconciles_count_pods_from_the_pod_watch_and_list_none() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "pod-cache").await;
    wait_for_default_service_account(&client, &ns.name).await;
    // Every pod LIST the controllers send (not the watches, not the reads of single pods).
    let lists = Arc::new(AtomicUsize::new(0));
    let counted = lists.clone();
    let collection = format!("/api/v1/namespaces/{}/pods", ns.name);
    start_controllers_observing(
        OPERATOR_SA,
        Scope::namespaces([&ns.name]).expect("scope"),
        Arc::new(move |request| {
            let watch = request
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
            if request.method() == http::Method::GET && request.uri().path() == collection && !watch
            {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }),
    )
    .await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&gateways, &gateway("main", json!({}))).await;
    let uninjected = |want: u32| {
        let gateways = gateways.clone();
        move || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("main").await.ok()?;
                (gw.status?.uninjected_pods == Some(want)).then_some(())
            }
        }
    };
    eventually("status.uninjectedPods 0", WAIT, uninjected(0)).await;
    // The pod watch's first list (the one there is): what is counted is what is sent.
    let listed = lists.load(Ordering::SeqCst);
    assert!(listed >= 1, "the pod watch's own list was not seen");

    // Each new pod is a reconcile that counts it, from the cache.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for i in 1..=3u32 {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{i}"), "annotations": {GATEWAY_ANNOTATION: "main"}},
            "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
        }))
        .expect("pod");
        create(&pods, &pod).await;
        eventually(&format!("status.uninjectedPods {i}"), WAIT, uninjected(i)).await;
    }
    for i in 1..=3u32 {
        pods.delete(&format!("app-{i}"), &Default::default())
            .await
            .expect("delete pod");
    }
    eventually("status.uninjectedPods 0 again", WAIT, uninjected(0)).await;
    assert_eq!(
        lists.load(Ordering::SeqCst),
        listed,
        "pods were listed by reconciles"
    );
    ns.delete().await;
}

/// The lines of the operator's `/metrics` text that start with `prefix`.
fn metric_lines(metrics: &sidegate_operator::metrics::Metrics, prefix: &str) -> Vec<String> {
    metrics
        .encode()
        .expect("metrics encode")
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// The notes of the Events of `reason` in `ns`.
async fn event_notes(client: &kube::Client, ns: &str, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_injected_with_another_sidecar_than_the_gateway_gives_now_are_counted_until_restarted()
{
    use sidegate_crds::api::SidecarSettings;
    use sidegate_operator::webhook::inject::{
        self, EnvFromKeys, INJECTED_ANNOTATION, InjectConfig, InjectSettings, SIDECAR_CONTAINER,
    };
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "outdated").await;
    wait_for_default_service_account(&client, &ns.name).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let config = InjectConfig::new(
        "ghcr.io/sidegate/sidegate:0.2.0",
        "0.2.0",
        "sidegate-system",
    );

    let app = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {GATEWAY_ANNOTATION: "main"}},
            "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
        }))
        .expect("pod")
    };
    // Injected as the webhook does now (its patch applied here: no webhook in this test).
    let injected_now = |name: &str| -> Pod {
        let pod = app(name);
        let injection = inject::inject(
            &pod,
            &InjectSettings {
                config: &config,
                namespace: &ns.name,
                sidecar: &SidecarSettings::default(),
                env_from: &EnvFromKeys::default(),
            },
        )
        .expect("injects")
        .expect("a patch");
        let mut doc = serde_json::to_value(&pod).expect("pod");
        json_patch::patch(&mut doc, &injection.patch).expect("patch applies");
        serde_json::from_value(doc).expect("patched pod")
    };
    // Injected by an operator that recorded nothing but its version.
    let injected_before = |name: &str, image: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {
                GATEWAY_ANNOTATION: "main", INJECTED_ANNOTATION: "0.1.0"}},
            "spec": {
                "initContainers": [{"name": SIDECAR_CONTAINER, "image": image, "restartPolicy": "Always"}],
                "containers": [{"name": "app", "image": "example.com/app:1"}],
            },
        }))
        .expect("pod")
    };
    create(&pods, &injected_now("current")).await;
    create(
        &pods,
        &injected_before("before-same-image", "ghcr.io/sidegate/sidegate:0.2.0"),
    )
    .await;
    create(
        &pods,
        &injected_before("before-old-image", "ghcr.io/sidegate/sidegate:0.1.0"),
    )
    .await;
    // A Job's pod that has ended is not restarted by anyone: not counted.
    create(
        &pods,
        &injected_before("ended", "ghcr.io/sidegate/sidegate:0.1.0"),
    )
    .await;
    pods.patch_status(
        "ended",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("pod status");
    create(&gateways, &gateway("main", json!({}))).await;
    let metrics = start_controllers_injecting(
        OPERATOR_SA,
        Scope::namespaces([&ns.name]).expect("scope"),
        ["kube-system".to_owned()].into(),
        Some(config.clone()),
    )
    .await;

    let outdated = |want: u32| {
        let gateways = gateways.clone();
        move || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("main").await.ok()?;
                (gw.status?.outdated_pods == Some(want)).then_some(())
            }
        }
    };
    // The image of a pod injected before anything was recorded is in its sidecar container.
    eventually("status.outdatedPods 1", WAIT, outdated(1)).await;
    let notes = eventually("an OutdatedSidecars Warning", WAIT, || async {
        let notes = event_notes(&client, &ns.name, "OutdatedSidecars").await;
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(
        notes[0].contains("1 pod(s)")
            && notes[0].contains("before-old-image")
            && notes[0].contains("image ghcr.io/sidegate/sidegate:0.2.0")
            && notes[0].contains("restart them"),
        "{notes:?}"
    );
    assert_eq!(
        metric_lines(&metrics, "sidegate_operator_outdated_pods "),
        ["sidegate_operator_outdated_pods 1"]
    );

    // The gateway's sidecar settings change: the pod injected with the old ones is outdated too
    // (one injected before they were recorded is judged by its image alone).
    gateways
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"sidecar": {"resources": {"limits": {"memory": "512Mi"}}}}}),
            ),
        )
        .await
        .expect("patch gateway");
    eventually("status.outdatedPods 2", WAIT, outdated(2)).await;
    // Its Warning names both, in an Event of its own (not a count on the first one's text).
    let notes = eventually(
        "an OutdatedSidecars Warning naming 2 pods",
        WAIT,
        || async {
            let notes = event_notes(&client, &ns.name, "OutdatedSidecars").await;
            notes
                .iter()
                .any(|n| n.contains("2 pod(s)"))
                .then_some(notes)
        },
    )
    .await;
    assert!(
        notes.iter().any(|n| n.contains("1 pod(s)")),
        "the first Warning keeps its own text: {notes:?}"
    );

    // Restarted (here: deleted), they count no more; the pod watch brings it, not the resync
    // (60 s here).
    for (name, left) in [("current", 1), ("before-old-image", 0)] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        pods.delete(name, &Default::default())
            .await
            .expect("delete pod");
        eventually(
            &format!("status.outdatedPods {left} without {name}"),
            WAIT,
            outdated(left),
        )
        .await;
    }
    eventually("an AllSidecarsCurrent Event", WAIT, || async {
        let notes = event_notes(&client, &ns.name, "AllSidecarsCurrent").await;
        (!notes.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        metric_lines(&metrics, "sidegate_operator_outdated_pods "),
        ["sidegate_operator_outdated_pods 0"]
    );
    ns.delete().await;
}

#[tokio::test]
async fn a_gateway_that_is_not_ready_is_counted_in_the_operators_metrics_by_its_reason() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "not-ready-metrics").await;
    wait_for_default_service_account(&client, &ns.name).await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    // Not Ready: the operator does not inject the image it names.
    create(
        &gateways,
        &gateway(
            "main",
            json!({"sidecar": {"image": "attacker.example/sidegate:1"}}),
        ),
    )
    .await;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "annotations": {GATEWAY_ANNOTATION: "main"}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
    }))
    .expect("pod");
    create(&Api::namespaced(client.clone(), &ns.name), &pod).await;
    let metrics =
        start_controllers(OPERATOR_SA, Scope::namespaces([&ns.name]).expect("scope")).await;

    eventually("a not-Ready gateway in /metrics", WAIT, || async {
        let lines = metric_lines(&metrics, "sidegate_operator_aigateways_not_ready");
        (lines == ["sidegate_operator_aigateways_not_ready{reason=\"SidecarImageNotAllowed\"} 1"])
            .then_some(())
    })
    .await;
    assert_eq!(
        metric_lines(&metrics, "sidegate_operator_uninjected_pods "),
        ["sidegate_operator_uninjected_pods 1"]
    );

    // Fixed: Ready, and the series of the reason stays at 0.
    gateways
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sidecar": null}})),
        )
        .await
        .expect("patch gateway");
    wait_ready(&gateways, "main").await;
    eventually("no not-Ready gateway in /metrics", WAIT, || async {
        let lines = metric_lines(&metrics, "sidegate_operator_aigateways_not_ready");
        (lines == ["sidegate_operator_aigateways_not_ready{reason=\"SidecarImageNotAllowed\"} 0"])
            .then_some(())
    })
    .await;
    ns.delete().await;
}
