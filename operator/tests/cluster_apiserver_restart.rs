//! The operator survives the apiserver restarting: its watches come back and a key rotated after
//! the restart is rendered. Its own test binary, because the restart would disturb other tests.

mod common;
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};

use common::{cluster_client, create_test_namespace, eventually, in_ci};
use support::*;

#[tokio::test]
async fn the_operator_keeps_reconciling_after_the_apiserver_restarts() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let Some(cluster_dir) = std::env::var_os("SIDEGATE_CLUSTER_DIR") else {
        assert!(
            !in_ci(),
            "SIDEGATE_CLUSTER_DIR not set: run under tests/cluster/with-cluster"
        );
        eprintln!("SKIPPED: SIDEGATE_CLUSTER_DIR not set (run under tests/cluster/with-cluster)");
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "restart").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-before")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(&gateways, &gateway("rs", json!({}))).await;
    wait_ready(&gateways, "rs").await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/cluster/restart-apiserver"
    );
    let out = std::process::Command::new(script)
        .arg(&cluster_dir)
        .output()
        .expect("run tests/cluster/restart-apiserver");
    assert!(
        out.status.success(),
        "restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Writes may fail for a moment while the apiserver warms up its caches.
    let started = Instant::now();
    eventually(
        "the key Secret updated after the restart",
        Duration::from_secs(60),
        || async {
            let mut s = secrets.get("llm-keys").await.ok()?;
            s.data = secret("x", &[("openai", "sk-after")]).data;
            secrets
                .replace("llm-keys", &PostParams::default(), &s)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    eventually(
        "the rotated key rendered by the operator",
        Duration::from_secs(120),
        || async {
            let s = secrets.get("sidegate-rs-keys").await.ok()?;
            (secret_value(&s, "openai.default").as_deref() == Some("sk-after")).then_some(())
        },
    )
    .await;
    eprintln!(
        "rotated key rendered {:?} after the apiserver came back",
        started.elapsed()
    );
    ns.delete().await;
}
