//! A gateway in a steady state causes no writes: a reconcile triggered by an unrelated change
//! (here, an annotation) reads and compares, and writes nothing. Its own test binary, so the
//! write counter belongs to this test alone — once the namespaces earlier test binaries deleted
//! are gone (their gateways' last reconciles write too).
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_steady_state
//! ```

mod common;
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::controller::CONTROLLER;

use common::{cluster_client, create_test_namespace, eventually};
use support::*;

#[tokio::test]
async fn a_steady_state_makes_no_writes_when_reconciled_again() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let metrics = operator(&client).await;
    let ns = create_test_namespace(&client, "steady").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-1")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(
        &gateways,
        &gateway("steady", json!({"requestTimeout": "30s"})),
    )
    .await;
    wait_ready(&gateways, "steady").await;

    // Namespaces that earlier test binaries on this cluster deleted must be gone first: the
    // operator reconciles their gateways while they terminate, and that writes.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    eventually(
        "namespaces of earlier tests deleted",
        Duration::from_secs(120),
        || {
            let namespaces = namespaces.clone();
            async move {
                let all = namespaces.list(&ListParams::default()).await.ok()?;
                all.items
                    .iter()
                    .all(|n| n.metadata.deletion_timestamp.is_none())
                    .then_some(())
            }
        },
    )
    .await;
    // Let every reconcile in flight (this gateway's and leftovers of earlier runs) settle.
    let mut last = metrics.writes_total(CONTROLLER);
    eventually("writes to settle", Duration::from_secs(30), || {
        let now = metrics.writes_total(CONTROLLER);
        let settled = now == last;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            settled.then_some(())
        }
    })
    .await;
    let writes = metrics.writes_total(CONTROLLER);
    assert!(
        writes >= 3,
        "the first render wrote the ConfigMap, the Secret and the status"
    );
    let reconciles = metrics.reconciles_total(CONTROLLER, "ok");
    let cm_version = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("sidegate-steady")
        .await
        .expect("cm")
        .resource_version();
    let secret_version = secrets
        .get("sidegate-steady-keys")
        .await
        .expect("secret")
        .resource_version();

    // Touch the gateway without changing its spec: the controller reconciles it again.
    gateways
        .patch(
            "steady",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touched": "yes"}}})),
        )
        .await
        .expect("annotating");
    let gw_version = gateways.get("steady").await.expect("gw").resource_version();
    eventually("another reconcile", Duration::from_secs(30), || async {
        (metrics.reconciles_total(CONTROLLER, "ok") > reconciles).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        metrics.writes_total(CONTROLLER),
        writes,
        "a steady reconcile wrote something"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        cms.get("sidegate-steady")
            .await
            .expect("cm")
            .resource_version(),
        cm_version
    );
    assert_eq!(
        secrets
            .get("sidegate-steady-keys")
            .await
            .expect("s")
            .resource_version(),
        secret_version
    );
    assert_eq!(
        gateways.get("steady").await.expect("gw").resource_version(),
        gw_version,
        "status unchanged"
    );
    ns.delete().await;
}
