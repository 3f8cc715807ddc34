//! Review 92: operator edge cases reproduced against a real kube-apiserver (`tests/cluster/`):
//!
//! ```text
//! cargo build -p sidegate          # the sidecar binary, for `sidegate --check`
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test review_edges
//! ```
//!
//! Each test runs its own controllers for its own namespace (as the operator's ServiceAccount),
//! with the tests' 60 s resync: every wait below is well under it, so what a test waits for must
//! come from a watch, not from the safety-net resync. Tests that check the rendered objects
//! against the sidecar run `sidegate --check` (the sidecar's own load) on them: `$SIDEGATE_BIN`,
//! or `target/debug/sidegate`.

mod common;
mod support;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::inject::{
    GATEWAY_ANNOTATION, INJECTED_ANNOTATION, InjectConfig, SIDECAR_CONTAINER,
};

use common::{cluster_client, create_test_namespace, eventually};
use support::*;

/// Starts the controllers of namespace `ns` only (no injection settings).
async fn controllers_for(ns: &str) {
    start_controllers(OPERATOR_SA, Scope::namespaces([ns]).expect("scope")).await;
}

fn key_condition(k: &ProviderKey, type_: &str) -> Option<(String, String, String)> {
    k.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The sidecar binary (`$SIDEGATE_BIN`, else the workspace's debug build).
fn sidecar_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SIDEGATE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join("sidegate");
    assert!(
        path.exists(),
        "{} missing: run `cargo build -p sidegate` first (or set SIDEGATE_BIN)",
        path.display()
    );
    path
}

/// Writes ConfigMap `sidegate-<gw>` and Secret `sidegate-<gw>-keys` as kubelet would mount them
/// and runs `sidegate --check` on them: `Ok(stdout)` when the sidecar would load them.
async fn sidecar_check(client: &kube::Client, ns: &str, gw: &str) -> Result<String, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&format!("sidegate-{gw}"))
        .await
        .expect("rendered ConfigMap");
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("sidegate-{gw}-keys"))
        .await
        .expect("rendered Secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("keys dir");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        cm.data
            .unwrap_or_default()
            .remove("gateway.yaml")
            .unwrap_or_default(),
    )
    .expect("write gateway.yaml");
    for (name, value) in secret.data.unwrap_or_default() {
        std::fs::write(keys.join(name), value.0).expect("write key file");
    }
    let out = std::process::Command::new(sidecar_binary())
        .arg("--config")
        .arg(&config)
        .arg("--keys-dir")
        .arg(&keys)
        .arg("--check")
        .output()
        .expect("run sidegate --check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

// FAILS at 1f8b2e4: when the older ProviderKey of an alias moves to another alias, the newer one stays DuplicateAlias (naming the older) until the resync, though gateways now serve its key.
#[tokio::test]
async fn a_provider_key_shadowed_by_an_older_one_is_ready_as_soon_as_that_one_changes_alias() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "pk-move").await;
    controllers_for(&ns.name).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("llm", &[("a", "sk-aaa"), ("b", "sk-bbb")]),
    )
    .await;
    // Same creation second or not, "pk-a" comes first by name: it holds openai/default.
    create(
        &keys,
        &provider_key("pk-a", "openai", "default", "llm", "a"),
    )
    .await;
    create(
        &keys,
        &provider_key("pk-b", "openai", "default", "llm", "b"),
    )
    .await;
    create(&gateways, &gateway("main", json!({}))).await;
    eventually("pk-b DuplicateAlias", WAIT, || async {
        let k = keys.get("pk-b").await.ok()?;
        let ready = key_condition(&k, "Ready")?;
        (ready.0 == "False" && ready.1 == "DuplicateAlias").then_some(())
    })
    .await;

    // Let the reconciles that pk-b's own status write triggers settle first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The older key moves to another alias: openai/default is pk-b's now.
    keys.patch(
        "pk-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"alias": "other"}})),
    )
    .await
    .expect("patch pk-a");
    // The gateway sees it at once (both keys are served)...
    eventually(
        "the gateway serving openai default and other",
        WAIT,
        || async {
            let gw = gateways.get("main").await.ok()?;
            let ready = condition(&gw, "Ready")?;
            (ready.0 == "True" && gw.status?.key_count == Some(2)).then_some(())
        },
    )
    .await;
    // ...and so should pk-b's own status, which still says gateways serve pk-a's key instead.
    eventually(
        "pk-b Ready within 20 s of pk-a leaving openai/default (resync is 60 s)",
        Duration::from_secs(20),
        || async {
            let k = keys.get("pk-b").await.ok()?;
            (key_condition(&k, "Ready")?.0 == "True").then_some(())
        },
    )
    .await;
    ns.delete().await;
}

// FAILS at 1f8b2e4: a Redis URL the sidecar's client refuses (port 99999) passed the operator's check: Ready=True, and the rendered config failed `sidegate --check`.
#[tokio::test]
async fn a_redis_url_the_sidecar_refuses_is_a_key_problem_and_never_rendered() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "redis-url").await;
    controllers_for(&ns.name).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("redis", &[("url", "redis://redis.cache:99999/0")]),
    )
    .await;
    create(
        &gateways,
        &gateway(
            "main",
            json!({"redis": {"urlSecretRef": {"name": "redis", "key": "url"}}}),
        ),
    )
    .await;
    // Not rendered (a config with `redis` and no URL fails in the sidecar too): the gateway
    // says why, without the URL (it may carry a password).
    let gw = eventually("status of generation 1", WAIT, || async {
        let gw = gateways.get("main").await.ok()?;
        (gw.status.as_ref()?.observed_generation == Some(1)).then_some(gw)
    })
    .await;
    let (status, _, message) = condition(&gw, "ConfigRendered").expect("ConfigRendered");
    assert_eq!(status, "False", "{message}");
    assert!(
        message.contains("redis.urlSecretRef") && message.contains("the sidecar's client"),
        "{message}"
    );
    assert!(!message.contains("99999"), "{message}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert!(cms.get_opt("sidegate-main").await.expect("get").is_none());

    // A URL the sidecar takes: rendered, and it loads.
    secrets
        .replace(
            "redis",
            &Default::default(),
            &secret("redis", &[("url", "redis://redis.cache:6379/0")]),
        )
        .await
        .expect("replace the Redis Secret");
    wait_ready(&gateways, "main").await;
    sidecar_check(&client, &ns.name, "main")
        .await
        .expect("the render loads in the sidecar");
    // Broken again: the URL rendered last stays, the problem is reported.
    secrets
        .replace(
            "redis",
            &Default::default(),
            &secret("redis", &[("url", "redis://redis.cache:99999/0")]),
        )
        .await
        .expect("replace the Redis Secret");
    eventually("KeysResolved KeyInvalid", WAIT, || async {
        let gw = gateways.get("main").await.ok()?;
        (condition(&gw, "KeysResolved")?.1 == "KeyInvalid").then_some(())
    })
    .await;
    let loaded = sidecar_check(&client, &ns.name, "main").await;
    assert!(loaded.is_ok(), "{loaded:?}");
    ns.delete().await;
}

// FAILS at 1f8b2e4: once a working gateway's Redis URL Secret is deleted, the operator renders spec.redis without redis.url, which the sidecar refuses at load (every sidecar keeps its old config, new pods never get ready).
#[tokio::test]
async fn a_deleted_redis_url_secret_never_leaves_a_config_the_sidecar_refuses() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "redis-gone").await;
    controllers_for(&ns.name).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("redis", &[("url", "redis://redis.cache:6379/0")]),
    )
    .await;
    create(
        &gateways,
        &gateway(
            "main",
            json!({"redis": {"urlSecretRef": {"name": "redis", "key": "url"}}}),
        ),
    )
    .await;
    wait_ready(&gateways, "main").await;
    sidecar_check(&client, &ns.name, "main")
        .await
        .expect("the first render loads in the sidecar");

    secrets
        .delete("redis", &DeleteParams::default())
        .await
        .expect("delete the Redis Secret");
    eventually("KeysResolved SecretNotFound", WAIT, || async {
        let gw = gateways.get("main").await.ok()?;
        let keys = condition(&gw, "KeysResolved")?;
        (keys.1 == "SecretNotFound").then_some(())
    })
    .await;
    let check = sidecar_check(&client, &ns.name, "main").await;
    assert!(
        check.is_ok(),
        "after the Redis Secret was deleted the rendered config no longer loads: {check:?}"
    );
    ns.delete().await;
}

// FAILS at 1f8b2e4: deleting a foreign ConfigMap `sidegate-<gw>` (ObjectNotOwned) triggers nothing; the gateway renders only at its next backoff retry (up to 5 min later).
#[tokio::test]
async fn deleting_a_foreign_config_map_of_the_rendered_name_lets_the_gateway_render_at_once() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "foreign-cm").await;
    controllers_for(&ns.name).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let foreign: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "sidegate-main"},
        "data": {"someone": "else's"},
    }))
    .expect("ConfigMap");
    create(&cms, &foreign).await;
    create(&gateways, &gateway("main", json!({}))).await;
    eventually("ObjectNotOwned", WAIT, || async {
        let gw = gateways.get("main").await.ok()?;
        let rendered = condition(&gw, "ConfigRendered")?;
        (rendered.1 == "ObjectNotOwned").then_some(())
    })
    .await;
    // The retries back off (1 s, 2 s, 4 s, ... 32 s): the owner takes a while to see the message.
    tokio::time::sleep(Duration::from_secs(45)).await;
    cms.delete("sidegate-main", &DeleteParams::default())
        .await
        .expect("delete the foreign ConfigMap");
    // A foreign Secret of the rendered name is watched for this (controller.rs: "its deletion
    // should trigger a reconcile"); the ConfigMap is not.
    eventually(
        "the gateway Ready within 8 s of the ConfigMap's deletion",
        Duration::from_secs(8),
        || async {
            let gw = gateways.get("main").await.ok()?;
            (condition(&gw, "Ready")?.0 == "True").then_some(())
        },
    )
    .await;
    ns.delete().await;
}

// FAILS at 1f8b2e4: an outdated injected pod that ends (a Job's pod) leaves the pod watch without a reconcile: status.outdatedPods (and the metric) stay at 1 until the resync.
#[tokio::test]
async fn an_outdated_pod_that_ends_is_no_longer_counted_at_once() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "ended").await;
    wait_for_default_service_account(&client, &ns.name).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let config = InjectConfig::new(
        "ghcr.io/sidegate/sidegate:0.2.0",
        "0.2.0",
        "sidegate-system",
    );
    // Injected by an older operator (its image in the sidecar container), as a Job's pod.
    let job_pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "job-1", "annotations": {
            GATEWAY_ANNOTATION: "main", INJECTED_ANNOTATION: "0.1.0"}},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [{"name": SIDECAR_CONTAINER,
                "image": "ghcr.io/sidegate/sidegate:0.1.0", "restartPolicy": "Always"}],
            "containers": [{"name": "app", "image": "example.com/app:1"}],
        },
    }))
    .expect("pod");
    create(&pods, &job_pod).await;
    create(&gateways, &gateway("main", json!({}))).await;
    start_controllers_injecting(
        OPERATOR_SA,
        Scope::namespaces([&ns.name]).expect("scope"),
        ["kube-system".to_owned()].into(),
        Some(config),
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
    eventually("status.outdatedPods 1", WAIT, outdated(1)).await;
    // Let the reconciles that the gateway's own status write triggers settle first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The Job's pod ends: nobody will restart it, and ended pods are not counted.
    pods.patch_status(
        "job-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("pod status");
    eventually(
        "status.outdatedPods 0 within 15 s of the pod ending (resync is 60 s)",
        Duration::from_secs(15),
        outdated(0),
    )
    .await;
    ns.delete().await;
}

// FAILS at 1f8b2e4: two gateways selecting disjoint ProviderKeys (by label) with the same provider/alias: the newer key is Ready=False DuplicateAlias (with a Warning) though no gateway selects both and its gateway serves it.
#[tokio::test]
async fn the_same_alias_in_two_gateways_that_select_disjoint_keys_is_no_duplicate() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "two-teams").await;
    controllers_for(&ns.name).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("llm", &[("a", "sk-aaa"), ("b", "sk-bbb")]),
    )
    .await;
    for (name, team, k) in [("team-a-openai", "a", "a"), ("team-b-openai", "b", "b")] {
        let mut pk = provider_key(name, "openai", "default", "llm", k);
        pk.metadata.labels = Some([("team".to_owned(), team.to_owned())].into());
        create(&keys, &pk).await;
        let gw = gateway(
            &format!("gw-{team}"),
            json!({"providerKeySelector": {"matchLabels": {"team": team}}}),
        );
        create(&gateways, &gw).await;
    }
    // Each gateway serves its own team's key...
    for (gw, want) in [("gw-a", "sk-aaa"), ("gw-b", "sk-bbb")] {
        wait_ready(&gateways, gw).await;
        let s = secrets
            .get(&format!("sidegate-{gw}-keys"))
            .await
            .expect("keys Secret");
        assert_eq!(secret_value(&s, "openai.default").as_deref(), Some(want));
    }
    // ...so neither ProviderKey is a duplicate of the other.
    for name in ["team-a-openai", "team-b-openai"] {
        let ready = eventually(&format!("{name} status"), WAIT, || async {
            let k = keys.get(name).await.ok()?;
            key_condition(&k, "Ready")
        })
        .await;
        assert_eq!(
            ready.0, "True",
            "{name}: no gateway selects both keys, yet: {ready:?}"
        );
    }
    ns.delete().await;
}

// FAILS at 1f8b2e4: a deleted gateway that never rendered (InvalidSpec) stays in sidegate_operator_aigateways_not_ready until some Secret of the namespace changes (the only place gone gateways are swept).
#[tokio::test]
async fn a_deleted_gateway_leaves_the_not_ready_gauge() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds_and_rbac(&client).await;
    let ns = create_test_namespace(&client, "gone-gauge").await;
    let metrics =
        start_controllers(OPERATOR_SA, Scope::namespaces([&ns.name]).expect("scope")).await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let invalid_spec = || {
        metrics
            .encode()
            .expect("metrics encode")
            .lines()
            .find(|l| {
                l.starts_with("sidegate_operator_aigateways_not_ready{reason=\"InvalidSpec\"}")
            })
            .map(str::to_owned)
    };
    // Plain http to a public host: InvalidSpec from the start, so nothing is rendered.
    create(
        &gateways,
        &gateway(
            "bad",
            json!({"providers": {"openai": {"baseURL": "http://api.example.com/v1"}}}),
        ),
    )
    .await;
    eventually("the gauge counting the invalid gateway", WAIT, || async {
        (invalid_spec()?.ends_with(" 1")).then_some(())
    })
    .await;
    gateways
        .delete("bad", &DeleteParams::default())
        .await
        .expect("delete the gateway");
    eventually(
        "the deleted gateway no longer counted as not ready",
        Duration::from_secs(15),
        || async { (invalid_spec()?.ends_with(" 0")).then_some(()) },
    )
    .await;
    ns.delete().await;
}
