//! Injection edge cases found in review, each reproduced against a real kube-apiserver
//! (`tests/cluster/`):
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test webhook_edges
//! ```
//!
//! The webhook runs in this process as in `webhook_cluster.rs` (self-managed certificate,
//! configuration pointing at `https://127.0.0.1:PORT/mutate`, selecting only the test's
//! namespace). There is no node: what is checked is what the apiserver admits and stores.

mod common;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::{AIGateway, SidecarSettings};
use sidegate_operator::metrics::Metrics;
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::inject::{
    self, EnvFromKeys, INJECTED_ANNOTATION, InjectConfig, InjectSettings,
};
use sidegate_operator::webhook::{self, WebhookState};

use common::{TestNamespace, cluster_client, create_test_namespace, eventually, unique_name};
use support::{WAIT, create, free_port, gateway, wait_for_default_service_account, webhook_args};

/// The operator's webhook configuration → `https://127.0.0.1:port/mutate`, for namespace `ns`
/// only, plus `extra` namespace label requirements (the chart's
/// `webhook.namespaceSelectorExpressions`).
fn configuration(
    name: &str,
    port: u16,
    ns: &str,
    extra: Vec<LabelSelectorRequirement>,
) -> MutatingWebhookConfiguration {
    let mut config = webhook::configuration(
        name,
        WebhookClientConfig {
            url: Some(format!("https://127.0.0.1:{port}{}", webhook::MUTATE_PATH)),
            ..WebhookClientConfig::default()
        },
        &BTreeSet::new(),
    );
    if let Some(hooks) = config.webhooks.as_mut() {
        hooks[0].namespace_selector = Some(LabelSelector {
            match_labels: Some([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into()),
            match_expressions: (!extra.is_empty()).then_some(extra),
        });
    }
    config
}

fn pod(name: &str, annotations: serde_json::Value, spec: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    }))
    .expect("valid Pod")
}

fn app_spec() -> serde_json::Value {
    json!({"containers": [{"name": "app", "image": "example.com/app:1"}]})
}

/// A test namespace for the pods (with gateway `main`) and one for the webhook's certificate,
/// the webhook served and registered for the first (with `extra` label requirements), and the
/// apiserver seen calling it.
struct Served {
    apps: TestNamespace,
    operator_ns: TestNamespace,
    config_name: String,
    client: Client,
}

impl Served {
    async fn start(client: &Client, prefix: &str, extra: Vec<LabelSelectorRequirement>) -> Served {
        support::install_crds(client).await;
        let apps = create_test_namespace(client, prefix).await;
        let operator_ns = create_test_namespace(client, "sgedge-operator").await;
        wait_for_default_service_account(client, &apps.name).await;
        create(
            &Api::<AIGateway>::namespaced(client.clone(), &apps.name),
            &gateway("main", json!({})),
        )
        .await;
        let port = free_port();
        let config_name = unique_name("sidegate-webhook-edges");
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(
                &PostParams::default(),
                &configuration(&config_name, port, &apps.name, extra),
            )
            .await
            .expect("create MutatingWebhookConfiguration");
        webhook::start(
            client.clone(),
            &webhook_args(port, &config_name),
            &operator_ns.name,
            &Scope::cluster(),
            Arc::new(Metrics::default()),
            None,
        )
        .await
        .expect("webhook starts");
        let served = Served {
            apps,
            operator_ns,
            config_name,
            client: client.clone(),
        };
        served.wait_until_called().await;
        served
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.apps.name)
    }

    /// Creates dry-run probe pods until the apiserver has the webhook inject one.
    async fn wait_until_called(&self) {
        let pods = self.pods();
        eventually("the apiserver to call the webhook", WAIT, || {
            let pods = pods.clone();
            async move {
                let created = pods
                    .create(
                        &PostParams {
                            dry_run: true,
                            ..PostParams::default()
                        },
                        &pod("probe", json!({"sidegate.dev/gateway": "main"}), app_spec()),
                    )
                    .await
                    .ok()?;
                created
                    .annotations()
                    .contains_key(INJECTED_ANNOTATION)
                    .then_some(())
            }
        })
        .await;
    }

    async fn stop(self) {
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.config_name, &DeleteParams::default())
            .await;
        self.apps.delete().await;
        self.operator_ns.delete().await;
    }
}

// FAILS at 4501507: `sidegate.dev/gateway: main/` (or `main/status`, `main?x`) reads gateway main through an unescaped URL and injects volumes of ConfigMap `sidegate-main/` that can never exist
#[tokio::test]
async fn a_gateway_annotation_that_is_no_object_name_gets_no_sidecar() {
    let Some(client) = cluster_client().await else {
        return;
    };
    support::install_crds(&client).await;
    let apps = create_test_namespace(&client, "sgedge-names").await;
    create(
        &Api::<AIGateway>::namespaced(client.clone(), &apps.name),
        &gateway("main", json!({})),
    )
    .await;
    let state = WebhookState {
        metrics: Arc::new(Metrics::default()),
        client: client.clone(),
        config: InjectConfig::new("registry.local/sidegate:test", "0.1.0", "sidegate-system"),
    };
    // None of these is the name of an AIGateway (nor of any object): a trailing slash typed by
    // hand, a subresource, a query, a fragment.
    let mut injected = Vec::new();
    for value in ["main/", "main/status", "main?x=1", "main#a"] {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0f5e1a9c-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": apps.name,
                "operation": "CREATE",
                "userInfo": {"username": "test"},
                "object": serde_json::to_value(pod("x", json!({"sidegate.dev/gateway": value}), app_spec())).expect("json"),
            },
        });
        let answer = webhook::review(&state, review.to_string().as_bytes()).await;
        let response = answer.response.expect("response");
        assert!(response.allowed, "{value}");
        if let Some(patch) = response.patch.as_ref() {
            injected.push(format!("{value:?}: {}", String::from_utf8_lossy(patch)));
        }
    }
    apps.delete().await;
    assert!(
        injected.is_empty(),
        "annotations naming no AIGateway, yet the pod was injected (volumes of objects that cannot exist):\n{}",
        injected.join("\n")
    );
}

// FAILS at 4501507: a pod with pod-level resources (spec.resources) sized for its containers is refused by the apiserver once the sidecar's requests are added
#[tokio::test]
async fn a_pod_with_pod_level_resources_is_still_created() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let served = Served::start(&client, "sgedge-podres", vec![]).await;
    let pods = served.pods();
    let spec = json!({
        "resources": {
            "requests": {"cpu": "500m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "containers": [{
            "name": "app",
            "image": "example.com/app:1",
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
        }],
    });
    // Valid as it is: opted out, it is created.
    pods.create(
        &PostParams::default(),
        &pod(
            "opted-out",
            json!({"sidegate.dev/gateway": "main", "sidegate.dev/inject": "false"}),
            spec.clone(),
        ),
    )
    .await
    .expect("the pod without the sidecar is valid");
    // Annotated: the webhook must not turn it into a pod the apiserver refuses (inject it with
    // the pod-level resources grown by the sidecar's, or admit it without the sidecar).
    let created = pods
        .create(
            &PostParams::default(),
            &pod("sized", json!({"sidegate.dev/gateway": "main"}), spec),
        )
        .await;
    served.stop().await;
    created.expect("an annotated pod with pod-level resources is created");
}

// FAILS at 4501507: a pod with pod-level limits only (Guaranteed, requests defaulted to the limits) is stored with pod-level requests of just the sidecar's 50m/32Mi (Burstable)
#[tokio::test]
async fn a_pod_with_pod_level_limits_only_keeps_its_requests_and_qos() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let served = Served::start(&client, "sgedge-podlim", vec![]).await;
    let pods = served.pods();
    let spec = json!({
        "resources": {"limits": {"cpu": "1", "memory": "128Mi"}},
        "containers": [{"name": "app", "image": "example.com/app:1"}],
    });
    let plain = pods
        .create(
            &PostParams::default(),
            &pod(
                "opted-out",
                json!({"sidegate.dev/gateway": "main", "sidegate.dev/inject": "false"}),
                spec.clone(),
            ),
        )
        .await
        .expect("create");
    let injected = pods
        .create(
            &PostParams::default(),
            &pod("limited", json!({"sidegate.dev/gateway": "main"}), spec),
        )
        .await
        .expect("create");
    served.stop().await;
    let requests = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.clone())
    };
    let qos = |p: &Pod| p.status.as_ref().and_then(|s| s.qos_class.clone());
    assert!(
        injected.annotations().contains_key(INJECTED_ANNOTATION),
        "injected"
    );
    // Without the sidecar: requests = limits (1 CPU, 128Mi), Guaranteed.
    assert_eq!(qos(&plain).as_deref(), Some("Guaranteed"));
    let cpu = |p: &Pod| requests(p).and_then(|r| r.get("cpu").map(|q| q.0.clone()));
    assert_eq!(cpu(&plain).as_deref(), Some("1"));
    // With it the pod should still reserve at least what it asked for.
    assert_eq!(
        (cpu(&injected), qos(&injected)),
        (cpu(&plain), qos(&plain)),
        "the injected pod's pod-level requests and QoS class: {:?}",
        requests(&injected)
    );
}

// FAILS at 4501507: the mirror pod of a static pod naming a gateway is refused ("a mirror pod may not reference secrets"), so kubelet can never publish it
#[tokio::test]
async fn a_mirror_pod_naming_a_gateway_is_still_created() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let served = Served::start(&client, "sgedge-mirror", vec![]).await;
    let pods = served.pods();
    // What kubelet posts for a static pod (no ServiceAccount token, bound to its node).
    let spec = json!({
        "nodeName": "node-1",
        "automountServiceAccountToken": false,
        "containers": [{"name": "app", "image": "example.com/app:1"}],
    });
    pods.create(
        &PostParams::default(),
        &pod(
            "mirror-opted-out",
            json!({"kubernetes.io/config.mirror": "abc", "sidegate.dev/gateway": "main", "sidegate.dev/inject": "false"}),
            spec.clone(),
        ),
    )
    .await
    .expect("the mirror pod without the sidecar is valid");
    let created = pods
        .create(
            &PostParams::default(),
            &pod(
                "mirror",
                json!({"kubernetes.io/config.mirror": "abc", "sidegate.dev/gateway": "main"}),
                spec,
            ),
        )
        .await;
    served.stop().await;
    created.expect("a mirror pod naming a gateway is created");
}

// FAILS at 4501507: inject() patches a mirror pod with a Secret volume, which the apiserver refuses for mirror pods
#[test]
fn a_mirror_pod_gets_no_patch() {
    let config = InjectConfig::new("registry.local/sidegate:test", "0.1.0", "sidegate-system");
    let sidecar = SidecarSettings::default();
    let env_from = EnvFromKeys::default();
    let settings = InjectSettings {
        config: &config,
        namespace: "apps",
        sidecar: &sidecar,
        env_from: &env_from,
    };
    let mirror = pod(
        "static-web-node-1",
        json!({"kubernetes.io/config.mirror": "abc", "sidegate.dev/gateway": "main"}),
        json!({"nodeName": "node-1", "containers": [{"name": "app", "image": "example.com/app:1"}]}),
    );
    let injection = inject::inject(&mirror, &settings).expect("no error");
    assert!(
        injection.is_none(),
        "a mirror pod was patched: {:?}",
        injection.map(|i| i.patch)
    );
}
