//! The injection webhook behind a real kube-apiserver (`tests/cluster/`):
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test webhook_cluster
//! ```
//!
//! The webhook runs in this process on a loopback port with a self-managed certificate; the
//! MutatingWebhookConfiguration points at `https://127.0.0.1:PORT/mutate` and gets its `caBundle`
//! from the webhook at start-up, exactly as in a cluster (only the Service is replaced by a URL).
//! Each configuration selects only its test's namespace, so nothing else in the cluster is
//! touched. There is no node: pods stay Pending, and the stored spec is what is checked.

mod common;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::AIGateway;
use sidegate_operator::metrics::Metrics;
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::certs::{self, CertResolver, SelfManaged};
use sidegate_operator::webhook::inject::{
    ENV_KEPT_ANNOTATION, INJECTED_ANNOTATION, SDK_BASE_URL_VARIABLES, SIDECAR_CONTAINER,
};
use sidegate_operator::webhook::{self, WebhookArgs, WebhookState};

use common::{TestNamespace, cluster_client, create_test_namespace, eventually, unique_name};
use support::{
    WAIT, condition, create, free_port, gateway, wait_for_default_service_account, webhook_args,
};

/// The webhook configuration `name` → `https://127.0.0.1:port/mutate`, selecting only namespace
/// `ns`, without a caBundle (the webhook patches it in); otherwise as the operator defines it.
fn configuration(name: &str, port: u16, ns: &str) -> MutatingWebhookConfiguration {
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
            ..LabelSelector::default()
        });
    }
    config
}

/// Creates [`configuration`]`(name, port, ns)`.
async fn register(client: &Client, name: &str, port: u16, ns: &str) {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration(name, port, ns))
        .await
        .expect("create MutatingWebhookConfiguration");
}

async fn unregister(client: &Client, name: &str) {
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
    }))
    .expect("valid Pod")
}

fn is_injected(p: &Pod) -> bool {
    p.annotations().contains_key(INJECTED_ANNOTATION)
}

fn sidecar_of(p: &Pod) -> Option<(&'static str, &k8s_openapi::api::core::v1::Container)> {
    let spec = p.spec.as_ref()?;
    if let Some(c) = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_CONTAINER)
    {
        return Some(("init", c));
    }
    spec.containers
        .iter()
        .find(|c| c.name == SIDECAR_CONTAINER)
        .map(|c| ("container", c))
}

async fn namespaces(client: &Client) -> (TestNamespace, TestNamespace) {
    let apps = create_test_namespace(client, "sgwh-apps").await;
    let operator = create_test_namespace(client, "sgwh-operator").await;
    wait_for_default_service_account(client, &apps.name).await;
    (apps, operator)
}

/// The CRDs installed and the controllers started ([`support::operator`]; they report a
/// gateway's status), the test's [`namespaces`], and AIGateway `main` with the default spec in the
/// apps one; returns the namespaces and the apps namespace's AIGateways.
async fn namespaces_with_gateway_main(
    client: &Client,
) -> (TestNamespace, TestNamespace, Api<AIGateway>) {
    support::operator(client).await;
    let (apps, operator_ns) = namespaces(client).await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &apps.name);
    create(&gateways, &gateway("main", json!({}))).await;
    (apps, operator_ns, gateways)
}

/// The webhook served by this process and registered with the apiserver.
struct ServedWebhook {
    config_name: String,
    port: u16,
    bound: SocketAddr,
    metrics: Arc<Metrics>,
}

/// Registers a configuration `PREFIX-<unique>` for namespace `apps` at a free loopback port and
/// starts the webhook there (as [`args`] says, its certificate stored in `operator_ns`).
async fn serve_webhook(
    client: &Client,
    config_prefix: &str,
    apps: &TestNamespace,
    operator_ns: &TestNamespace,
) -> ServedWebhook {
    serve_webhook_with(client, config_prefix, apps, operator_ns, |_| {}).await
}

/// [`serve_webhook`] with the flags of [`args`] changed by `edit`.
async fn serve_webhook_with(
    client: &Client,
    config_prefix: &str,
    apps: &TestNamespace,
    operator_ns: &TestNamespace,
    edit: impl FnOnce(&mut WebhookArgs),
) -> ServedWebhook {
    let port = free_port();
    let config_name = unique_name(config_prefix);
    register(client, &config_name, port, &apps.name).await;
    let metrics = Arc::new(Metrics::default());
    let mut args = webhook_args(port, &config_name);
    edit(&mut args);
    let bound = webhook::start(
        client.clone(),
        &args,
        &operator_ns.name,
        &Scope::cluster(),
        metrics.clone(),
        None,
    )
    .await
    .expect("webhook starts");
    ServedWebhook {
        config_name,
        port,
        bound,
        metrics,
    }
}

/// Creates pods `probe-N` naming gateway `main` until the apiserver has the webhook inject one;
/// returns that one as created.
async fn first_injected_probe(pods: &Api<Pod>) -> Pod {
    let mut n = 0u32;
    eventually("the apiserver to call the webhook", WAIT, || {
        n += 1;
        let pods = pods.clone();
        async move {
            let created = pods
                .create(
                    &PostParams::default(),
                    &pod(&format!("probe-{n}"), &[("sidegate.dev/gateway", "main")]),
                )
                .await
                .expect("create annotated pod");
            is_injected(&created).then_some(created)
        }
    })
    .await
}

#[tokio::test]
async fn annotated_pods_are_injected_through_the_apiserver_and_others_are_left_alone() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns, gateways) = namespaces_with_gateway_main(&client).await;
    create(
        &gateways,
        &gateway("plain", json!({"sidecar": {"nativeSidecar": false}})),
    )
    .await;
    // Sidecar images named by gateways: another tag of the operator's repository, and one the
    // operator does not allow (--allowed-sidecar-images defaults to its own repository).
    create(
        &gateways,
        &gateway(
            "retagged",
            json!({"sidecar": {"image": "registry.local/sidegate:other"}}),
        ),
    )
    .await;
    create(
        &gateways,
        &gateway(
            "foreign",
            json!({"sidecar": {"image": "attacker.example/sidegate:1"}}),
        ),
    )
    .await;

    let ServedWebhook {
        config_name,
        port,
        bound,
        metrics,
    } = serve_webhook(&client, "sidegate-webhook-test", &apps, &operator_ns).await;
    assert_eq!(bound.port(), port);

    // Start-up stored the certificate and patched caBundle.
    let secret = Api::<Secret>::namespaced(client.clone(), &operator_ns.name)
        .get("sidegate-webhook-tls")
        .await
        .expect("certificate Secret stored");
    // Its expiry is a gauge, for an alert before the apiserver stops trusting it.
    let not_after: i64 = secret.annotations()[certs::NOT_AFTER_ANNOTATION]
        .parse()
        .expect("Unix seconds");
    assert_eq!(metrics.webhook_certificate_expiry.get(), not_after);
    assert!(metrics.encode().expect("metrics").contains(&format!(
        "sidegate_operator_webhook_certificate_expiry_timestamp_seconds {not_after}\n"
    )));
    let ca =
        String::from_utf8(secret.data.expect("data")[certs::CA_CERT_KEY].0.clone()).expect("PEM");
    let registered = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(&config_name)
        .await
        .expect("config");
    let bundle = registered.webhooks.expect("webhooks")[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("caBundle patched in at start-up");
    assert!(String::from_utf8_lossy(&bundle.0).contains(ca.trim()));

    // The apiserver picks the configuration up within moments: create pods until one is injected.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    let first = first_injected_probe(&pods).await;

    // Read back what the apiserver stored, not what the create call returned.
    let stored = pods.get(&first.name_any()).await.expect("stored pod");
    let (kind, sidecar) = sidecar_of(&stored).expect("sidecar stored");
    assert_eq!(kind, "init");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some("registry.local/sidegate:test")
    );
    let spec = stored.spec.as_ref().expect("spec");
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(volumes.contains(&"sidegate-config") && volumes.contains(&"sidegate-keys"));
    let app_env: Vec<(String, Option<String>)> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(app_env.contains(&(
        "OPENAI_BASE_URL".into(),
        Some("http://127.0.0.1:8787/openai".into())
    )));

    // Plain container when the gateway says so.
    let plain = pods
        .create(
            &PostParams::default(),
            &pod("plain-sidecar", &[("sidegate.dev/gateway", "plain")]),
        )
        .await
        .expect("create");
    assert_eq!(sidecar_of(&plain).map(|(k, _)| k), Some("container"));

    let retagged = pods
        .create(
            &PostParams::default(),
            &pod("retagged-sidecar", &[("sidegate.dev/gateway", "retagged")]),
        )
        .await
        .expect("create");
    assert_eq!(
        sidecar_of(&retagged).and_then(|(_, c)| c.image.as_deref()),
        Some("registry.local/sidegate:other")
    );

    // A Windows pod: created without the sidecar, whose Linux securityContext (seccomp,
    // runAsGroup, readOnlyRootFilesystem, ...) the apiserver refuses on a pod for Windows.
    let mut windows = pod("windows", &[("sidegate.dev/gateway", "main")]);
    windows.spec.as_mut().expect("spec").os = Some(k8s_openapi::api::core::v1::PodOS {
        name: "windows".into(),
    });
    let windows = pods
        .create(&PostParams::default(), &windows)
        .await
        .expect("a Windows pod is created, without the sidecar");
    assert!(!is_injected(&windows) && sidecar_of(&windows).is_none());

    // Left alone: no annotation, opted out, unknown gateway, a gateway naming a sidecar image
    // the operator does not allow (created all the same).
    for (name, annotations) in [
        ("no-annotation", vec![]),
        (
            "opted-out",
            vec![
                ("sidegate.dev/gateway", "main"),
                ("sidegate.dev/inject", "false"),
            ],
        ),
        ("unknown-gateway", vec![("sidegate.dev/gateway", "nope")]),
        ("foreign-image", vec![("sidegate.dev/gateway", "foreign")]),
    ] {
        let created = pods
            .create(&PostParams::default(), &pod(name, &annotations))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        let stored = pods.get(name).await.expect("stored");
        assert!(!is_injected(&created) && !is_injected(&stored), "{name}");
        assert!(sidecar_of(&stored).is_none(), "{name}");
    }

    // The unknown gateway's pod is admitted with a warning for the user (checked on the
    // handler, since the client does not surface warnings).
    // Every injected pod was counted.
    assert!(metrics.admissions("injected") >= 1);
    let state = WebhookState {
        metrics: Arc::new(Metrics::default()),
        client: client.clone(),
        config: sidegate_operator::webhook::inject::InjectConfig::new(
            "img",
            "0.1.0",
            &operator_ns.name,
        ),
    };
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
            "object": serde_json::to_value(pod("x", &[("sidegate.dev/gateway", "nope")])).expect("json"),
        },
    });
    let answer = webhook::review(&state, review.to_string().as_bytes()).await;
    let response = answer.response.expect("response");
    assert!(response.allowed);
    assert!(response.patch.is_none());
    let warnings = response.warnings.unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("AIGateway nope does not exist")),
        "{warnings:?}"
    );
    assert_eq!(state.metrics.admissions("skipped"), 1);
    assert_eq!(state.metrics.admissions("injected"), 0);

    // So is the pod of the gateway naming a foreign image, with the reason.
    let mut review = review;
    review["request"]["object"] =
        serde_json::to_value(pod("y", &[("sidegate.dev/gateway", "foreign")])).expect("json");
    let answer = webhook::review(&state, review.to_string().as_bytes()).await;
    let response = answer.response.expect("response");
    assert!(response.allowed);
    assert!(response.patch.is_none());
    let warnings = response.warnings.unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w.contains(
            "AIGateway foreign asks for sidecar image \"attacker.example/sidegate:1\", which this operator does not inject"
        )),
        "{warnings:?}"
    );
    assert_eq!(state.metrics.admissions("error"), 1);

    unregister(&client, &config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

/// An annotated pod `name` for gateway `gateway` whose app container declares `port`, in an
/// init container (`init`) or an app container.
fn pod_declaring(name: &str, gateway: &str, port: i32, init: bool) -> Pod {
    let mut p = pod(name, &[("sidegate.dev/gateway", gateway)]);
    let spec = p.spec.as_mut().expect("spec");
    let web: k8s_openapi::api::core::v1::Container = serde_json::from_value(json!({
        "name": "web", "image": "example.com/web:1",
        "ports": [{"containerPort": 8080}, {"containerPort": port}],
    }))
    .expect("container");
    if init {
        spec.init_containers = Some(vec![web]);
    } else {
        spec.containers.push(web);
    }
    p
}

#[tokio::test]
async fn a_pod_declaring_a_port_of_its_sidecar_is_denied_naming_the_clash_also_to_its_deployment() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns, gateways) = namespaces_with_gateway_main(&client).await;
    create(
        &gateways,
        &gateway("classic", json!({"sidecar": {"nativeSidecar": false}})),
    )
    .await;
    let served = serve_webhook(&client, "sidegate-webhook-ports", &apps, &operator_ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    first_injected_probe(&pods).await;

    // Refused by the apiserver with the webhook's reason: which container, which port, what to
    // change. Not created without the sidecar, where the app would run around its gateway.
    let denied = pods
        .create(
            &PostParams::default(),
            &pod_declaring("web-admin-port", "main", 8788, false),
        )
        .await
        .expect_err("denied");
    let kube::Error::Api(status) = &denied else {
        panic!("not an apiserver refusal: {denied}");
    };
    assert!((400..500).contains(&status.code), "{status:?}");
    for part in [
        "denied the request",
        "sidegate: the pod asks for the sidecar of AIGateway main (sidegate.dev/gateway)",
        "container \"web\" declares containerPort 8788",
        "(adminPort)",
        "spec.sidecar.port and spec.sidecar.adminPort",
    ] {
        assert!(status.message.contains(part), "{part}: {}", status.message);
    }
    assert_eq!(served.metrics.admissions("denied"), 1);
    assert!(pods.get_opt("web-admin-port").await.expect("get").is_none());
    // A native sidecar runs beside the init containers too.
    assert!(
        pods.create(
            &PostParams::default(),
            &pod_declaring("init-port", "main", 8787, true)
        )
        .await
        .is_err()
    );
    // A classic sidecar starts after the init containers have ended: no clash there.
    let classic = pods
        .create(
            &PostParams::default(),
            &pod_declaring("classic-init-port", "classic", 8787, true),
        )
        .await
        .expect("created");
    assert_eq!(sidecar_of(&classic).map(|(k, _)| k), Some("container"));
    // Opted out, as the message offers: created, without the sidecar.
    let mut opted_out = pod_declaring("opted-out-port", "main", 8788, false);
    opted_out
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("sidegate.dev/inject".into(), "false".into());
    let created = pods
        .create(&PostParams::default(), &opted_out)
        .await
        .expect("an opted-out pod is created");
    assert!(sidecar_of(&created).is_none());

    // A Deployment's pods: the ReplicaSet controller's creations are denied, and the
    // Deployment says why (ReplicaFailure), where `kubectl rollout status` and `describe` show it.
    let template = pod_declaring("unused", "main", 8787, false);
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "chat"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "chat"}},
            "template": {
                "metadata": {"labels": {"app": "chat"}, "annotations": template.metadata.annotations},
                "spec": template.spec,
            },
        },
    }))
    .expect("deployment");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &apps.name);
    create(&deployments, &deployment).await;
    let message = eventually("the Deployment's ReplicaFailure condition", WAIT, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("chat").await.ok()?;
            d.status?
                .conditions?
                .into_iter()
                .find(|c| {
                    c.type_.as_deref() == Some("ReplicaFailure")
                        && c.status.as_deref() == Some("True")
                })
                .and_then(|c| c.message)
        }
    })
    .await;
    assert!(
        message.contains("containerPort 8787") && message.contains("AIGateway main"),
        "{message}"
    );

    unregister(&client, &served.config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

#[tokio::test]
async fn injected_pods_get_the_operators_image_pull_secrets_next_to_their_own() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns, _) = namespaces_with_gateway_main(&client).await;
    let served = serve_webhook_with(
        &client,
        "sidegate-webhook-pull",
        &apps,
        &operator_ns,
        |args| {
            args.sidecar_image_pull_secrets = vec!["sidegate-registry".into(), "shared".into()];
        },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    first_injected_probe(&pods).await;
    let mut own = pod("own-secrets", &[("sidegate.dev/gateway", "main")]);
    own.spec.as_mut().expect("spec").image_pull_secrets = Some(vec![
        k8s_openapi::api::core::v1::LocalObjectReference {
            name: "app-registry".into(),
        },
        k8s_openapi::api::core::v1::LocalObjectReference {
            name: "shared".into(),
        },
    ]);
    pods.create(&PostParams::default(), &own)
        .await
        .expect("created");
    pods.create(
        &PostParams::default(),
        &pod("no-secrets", &[("sidegate.dev/gateway", "main")]),
    )
    .await
    .expect("created");
    let names = |p: &Pod| -> Vec<String> {
        p.spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .map(|r| r.name.clone())
            .collect()
    };
    // As stored by the apiserver.
    let own = pods.get("own-secrets").await.expect("stored");
    assert!(sidecar_of(&own).is_some());
    assert_eq!(names(&own), ["app-registry", "shared", "sidegate-registry"]);
    let plain = pods.get("no-secrets").await.expect("stored");
    assert_eq!(names(&plain), ["sidegate-registry", "shared"]);

    unregister(&client, &served.config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

/// The names of the variables a container of `p` sets in `env`.
fn env_names(p: &Pod, container: &str) -> BTreeSet<String> {
    p.spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == container)
        .flat_map(|c| c.env.iter().flatten())
        .map(|e| e.name.clone())
        .collect()
}

#[tokio::test]
async fn env_from_objects_are_read_and_only_the_base_urls_they_set_are_left_to_them() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns, _) = namespaces_with_gateway_main(&client).await;
    // A ConfigMap without base URLs, one pointing OpenAI at an in-cluster server, a Secret
    // whose BASE_URL becomes ANTHROPIC_BASE_URL under its envFrom prefix.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &apps.name);
    for (name, data) in [
        ("db", json!({"DB_HOST": "postgres"})),
        (
            "llm-endpoints",
            json!({"OPENAI_BASE_URL": "http://vllm.models.svc:8000/v1"}),
        ),
    ] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": data}))
                .expect("ConfigMap");
        create(&config_maps, &cm).await;
    }
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "agent-env"},
        "stringData": {"BASE_URL": "http://claude-proxy.internal", "API_KEY": "sk-not-logged"},
    }))
    .expect("Secret");
    create(
        &Api::<Secret>::namespaced(client.clone(), &apps.name),
        &secret,
    )
    .await;

    let ServedWebhook { config_name, .. } =
        serve_webhook(&client, "sidegate-webhook-env-from", &apps, &operator_ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    first_injected_probe(&pods).await;

    let container = |name: &str, env_from: serde_json::Value| json!({"name": name, "image": "example.com/app:1", "envFrom": env_from});
    let llm: Pod = serde_json::from_value(json!({
        "metadata": {"name": "llm", "annotations": {"sidegate.dev/gateway": "main"}},
        "spec": {"containers": [
            container("app", json!([{"configMapRef": {"name": "db"}}])),
            container("chat", json!([
                {"configMapRef": {"name": "db"}},
                {"configMapRef": {"name": "llm-endpoints"}},
            ])),
            container("agent", json!([
                {"prefix": "ANTHROPIC_", "secretRef": {"name": "agent-env"}},
                {"configMapRef": {"name": "not-there", "optional": true}},
            ])),
        ]},
    }))
    .expect("Pod");
    let stderr = kubectl_create(&apps.name, &llm).await;
    assert!(!stderr.contains("sk-not-logged"), "{stderr}");
    let stored = pods.get("llm").await.expect("stored");
    assert!(sidecar_of(&stored).is_some());
    let all: BTreeSet<String> = SDK_BASE_URL_VARIABLES
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    // The base URLs and placeholder keys of the containers, but those left to envFrom (a
    // provider's key with its base URL).
    let all: BTreeSet<String> = all
        .into_iter()
        .chain(["OPENAI_API_KEY".to_owned(), "ANTHROPIC_API_KEY".to_owned()])
        .collect();
    let without = |left: &[&str]| -> BTreeSet<String> {
        all.iter()
            .filter(|n| !left.contains(&n.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(env_names(&stored, "app"), all);
    assert_eq!(
        env_names(&stored, "chat"),
        without(&["OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY"])
    );
    assert_eq!(
        env_names(&stored, "agent"),
        without(&["ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"])
    );
    assert_eq!(
        stored
            .annotations()
            .get(ENV_KEPT_ANNOTATION)
            .map(String::as_str),
        Some("chat: OPENAI_BASE_URL,OPENAI_API_BASE; agent: ANTHROPIC_BASE_URL")
    );
    assert!(
        stderr.contains("\"chat\" (OPENAI_BASE_URL, OPENAI_API_BASE)"),
        "{stderr}"
    );

    // A ConfigMap that does not exist (yet: the pod waits for it, which may set anything):
    // every base URL is left to envFrom, said in the annotation and the warning.
    let waiting: Pod = serde_json::from_value(json!({
        "metadata": {"name": "waiting", "annotations": {"sidegate.dev/gateway": "main"}},
        "spec": {"containers": [container("app", json!([{"configMapRef": {"name": "later"}}]))]},
    }))
    .expect("Pod");
    let stderr = kubectl_create(&apps.name, &waiting).await;
    assert!(stderr.contains("ConfigMap later: not found"), "{stderr}");
    let stored = pods.get("waiting").await.expect("stored");
    assert!(sidecar_of(&stored).is_some());
    assert!(env_names(&stored, "app").is_empty());
    assert!(
        stored.annotations()[ENV_KEPT_ANNOTATION].ends_with("(envFrom not read)"),
        "{:?}",
        stored.annotations()
    );

    // A webhook that may read the gateway but not ConfigMaps: the same, with the reason.
    let user = unique_name("sgwh-no-configmaps");
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "read-gateways"},
        "rules": [{"apiGroups": ["sidegate.dev"], "resources": ["aigateways"], "verbs": ["get"]}],
    }))
    .expect("Role");
    create(&Api::namespaced(client.clone(), &apps.name), &role).await;
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "read-gateways"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-gateways"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .expect("RoleBinding");
    create(&Api::namespaced(client.clone(), &apps.name), &binding).await;
    let mut config = kube::Config::infer().await.expect("kubeconfig");
    config.auth_info.impersonate = Some(user);
    let state = WebhookState {
        metrics: Arc::new(Metrics::default()),
        client: Client::try_from(config).expect("client"),
        config: sidegate_operator::webhook::inject::InjectConfig::new(
            "img",
            "0.1.0",
            &operator_ns.name,
        ),
    };
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0f5e1a9c-1111-2222-3333-444455556677",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": apps.name,
            "operation": "CREATE",
            "userInfo": {"username": "test"},
        },
    });
    review["request"]["object"] = serde_json::to_value(&llm).expect("json");
    let response = eventually("the Role to take effect", WAIT, || {
        let (state, review) = (&state, review.to_string());
        async move {
            let response = webhook::review(state, review.as_bytes())
                .await
                .response
                .expect("response");
            response.patch.is_some().then_some(response)
        }
    })
    .await;
    assert!(response.allowed);
    let warnings = response.warnings.unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ConfigMap db: 403 Forbidden")
                && w.contains("\"app\", \"chat\"")
                && w.contains("Secret agent-env: 403 Forbidden")),
        "{warnings:?}"
    );
    let patch = String::from_utf8_lossy(response.patch.as_deref().expect("patch")).into_owned();
    assert!(patch.contains("env-kept"), "{patch}");
    assert!(!patch.contains("OPENAI_BASE_URL\",\"value"), "{patch}");

    unregister(&client, &config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

/// Creates `pod` in `ns` with kubectl, which prints the admission warnings the client library
/// does not surface; returns kubectl's stderr, or panics with it if the apiserver refused. Runs
/// on a blocking thread: the webhook the apiserver calls meanwhile is served by this runtime.
async fn kubectl_create(ns: &str, pod: &Pod) -> String {
    let (ns, pod) = (ns.to_owned(), pod.clone());
    tokio::task::spawn_blocking(move || kubectl_create_blocking(&ns, &pod))
        .await
        .expect("kubectl create")
}

fn kubectl_create_blocking(ns: &str, pod: &Pod) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("kubectl")
        .args(["create", "--namespace", ns, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl (the test bed's bin dir on PATH)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(pod).expect("pod JSON"))
        .expect("write the pod to kubectl");
    let out = child.wait_with_output().expect("kubectl runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "kubectl create {}: {stderr}",
        pod.name_any()
    );
    stderr
}

#[tokio::test]
async fn pods_of_a_gateway_whose_sidecar_resources_the_apiserver_refuses_are_created_without_it() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns, gateways) = namespaces_with_gateway_main(&client).await;
    // Schema-valid, but a pod with this sidecar is refused by the apiserver ("must be less than
    // or equal to memory limit").
    create(
        &gateways,
        &gateway(
            "tight",
            json!({"sidecar": {"resources": {
                "requests": {"memory": "1Gi"},
                "limits": {"memory": "256Mi"},
            }}}),
        ),
    )
    .await;

    let ServedWebhook {
        config_name,
        metrics,
        ..
    } = serve_webhook(&client, "sidegate-webhook-resources", &apps, &operator_ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    first_injected_probe(&pods).await;

    // The pod is created, without the sidecar, and its creator is told why.
    let warnings = kubectl_create(
        &apps.name,
        &pod("tight-app", &[("sidegate.dev/gateway", "tight")]),
    )
    .await;
    assert!(
        warnings.contains(
            "sidegate: pod not injected: AIGateway tight sets sidecar resources the apiserver would refuse: spec.sidecar.resources.requests.memory 1Gi is more than limits.memory 256Mi"
        ),
        "{warnings}"
    );
    let stored = pods.get("tight-app").await.expect("stored pod");
    assert!(!is_injected(&stored) && sidecar_of(&stored).is_none());
    assert_eq!(metrics.admissions("error"), 1);

    // The gateway says so.
    let (reason, message) = eventually("AIGateway tight Ready=False", WAIT, || {
        let gateways = gateways.clone();
        async move {
            let gw = gateways.get("tight").await.ok()?;
            let (status, reason, message) = condition(&gw, "Ready")?;
            (status == "False" && reason != "NotRendered").then_some((reason, message))
        }
    })
    .await;
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains(
            "spec.sidecar.resources.requests.memory 1Gi is more than limits.memory 256Mi"
        ) && message.contains("pods naming this gateway are created without it"),
        "{message}"
    );

    unregister(&client, &config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

/// `apiserver_admission_webhook_fail_open_count{name=WEBHOOK,type="admit"}` from the apiserver's
/// `/metrics` (kube-apiserver v1.37: counted each time a mutating webhook call fails and
/// failurePolicy Ignore lets the request through; 0 before the first).
async fn fail_open_count(client: &Client, webhook: &str) -> u64 {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("metrics request");
    let text = client
        .request_text(request)
        .await
        .expect("GET /metrics of the apiserver");
    let name_label = format!("name=\"{webhook}\"");
    text.lines()
        .filter_map(|l| l.strip_prefix("apiserver_admission_webhook_fail_open_count{"))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| {
            labels.split(',').any(|l| l == name_label) && labels.contains("type=\"admit\"")
        })
        .map(|(_, v)| v.trim().parse::<f64>().expect("counter value") as u64)
        .sum()
}

/// The message of `e` if it is the apiserver's answer when it could not call webhook `webhook`
/// at `127.0.0.1:port` and that webhook's failurePolicy is Fail (500, "failed calling webhook").
fn call_failure<'e>(e: &'e kube::Error, webhook: &str, port: u16) -> Option<&'e str> {
    match e {
        kube::Error::Api(s)
            if s.code == 500
                && s.message
                    .contains(&format!("failed calling webhook \"{webhook}\""))
                && s.message.contains(&format!("127.0.0.1:{port}")) =>
        {
            Some(&s.message)
        }
        _ => None,
    }
}

#[tokio::test]
async fn with_the_webhook_down_pods_are_still_created_because_failure_policy_is_ignore() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let (apps, operator_ns) = namespaces(&client).await;
    // Down: the port is held bound but never listens, so every connection to it is refused and
    // nothing else can take it during the test.
    let down = tokio::net::TcpSocket::new_v4().expect("socket");
    down.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let port = down.local_addr().expect("bound address").port();
    let config_name = unique_name("sidegate-webhook-down");
    let mut config = configuration(&config_name, port, &apps.name);
    let hook = &mut config.webhooks.as_mut().expect("webhooks")[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"), "as shipped");
    // A webhook name of its own, so the apiserver's per-webhook metric counts only this test's
    // calls (the other tests here use the operator's name).
    let webhook_name = format!("{}.inject.sidegate.dev", unique_name("down"));
    hook.name = webhook_name.clone();
    // First failurePolicy Fail: a pod creation rejected with the failed call proves that the
    // apiserver has the configuration, selects this namespace and finds the webhook down.
    hook.failure_policy = Some("Fail".into());
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .expect("create MutatingWebhookConfiguration");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    let annotated = [("sidegate.dev/gateway", "main")];
    let mut n = 0u32;
    let rejection = eventually(
        "the apiserver to reject a pod for the down webhook (failurePolicy Fail)",
        WAIT,
        || {
            n += 1;
            let (pods, webhook_name) = (pods.clone(), webhook_name.clone());
            async move {
                // Admitted (and retried) while the apiserver has not seen the configuration.
                let e = pods
                    .create(
                        &PostParams::default(),
                        &pod(&format!("probe-{n}"), &annotated),
                    )
                    .await
                    .err()?;
                let message = call_failure(&e, &webhook_name, port)
                    .unwrap_or_else(|| panic!("unexpected error: {e}"));
                Some(message.to_owned())
            }
        },
    )
    .await;
    eprintln!("failurePolicy Fail, webhook down: {rejection}");

    // Then failurePolicy Ignore, as shipped: creations are rejected until the apiserver sees the
    // change, then admitted without injection, each after a failed call (counted as fail-open).
    let before = fail_open_count(&client, &webhook_name).await;
    let patched = configs
        .patch(
            &config_name,
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/webhooks/0/name", "value": webhook_name},
                    {"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"},
                ]))
                .expect("JSON patch"),
            ),
        )
        .await
        .expect("patch failurePolicy Ignore");
    assert_eq!(
        patched.webhooks.expect("webhooks")[0]
            .failure_policy
            .as_deref(),
        Some("Ignore")
    );
    let started = std::time::Instant::now();
    let mut n = 0u32;
    let created = eventually(
        "a pod created with the webhook down (failurePolicy Ignore)",
        WAIT,
        || {
            n += 1;
            let (pods, webhook_name) = (pods.clone(), webhook_name.clone());
            async move {
                match pods
                    .create(
                        &PostParams::default(),
                        &pod(&format!("while-down-{n}"), &annotated),
                    )
                    .await
                {
                    Ok(created) => Some(created),
                    Err(e) if call_failure(&e, &webhook_name, port).is_some() => None,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        },
    )
    .await;
    let after = fail_open_count(&client, &webhook_name).await;
    assert!(
        after > before,
        "the apiserver admitted {} without failing open on {webhook_name} \
         (apiserver_admission_webhook_fail_open_count {before} -> {after})",
        created.name_any()
    );
    let stored = pods.get(&created.name_any()).await.expect("stored pod");
    assert!(!is_injected(&created) && !is_injected(&stored));
    assert!(sidecar_of(&stored).is_none());
    eprintln!(
        "pod {} created with the webhook down ({} ms after the switch to Ignore); \
         fail-open calls {before} -> {after}",
        created.name_any(),
        started.elapsed().as_millis()
    );
    drop(down);

    unregister(&client, &config_name).await;
    apps.delete().await;
    operator_ns.delete().await;
}

#[tokio::test]
async fn rotation_patches_the_new_ca_into_ca_bundle_before_serving_and_keeps_the_old_one() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgwh-rotate").await;
    let config_name = unique_name("sidegate-webhook-rotate");
    register(&client, &config_name, free_port(), &ns.name).await;
    let settings = SelfManaged {
        namespace: ns.name.clone(),
        secret_name: "tls".into(),
        webhook_config_name: config_name.clone(),
        names: vec!["127.0.0.1".into()],
        validity: Duration::from_secs(86400),
        renew_before: Duration::from_secs(3600),
        owner: None,
        replica: None,
    };
    let resolver = CertResolver::new();
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("first"),
        certs::CertAction::Rotated
    );
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("second"),
        certs::CertAction::Reused,
        "a valid stored certificate is reused"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ca_of = |s: &Secret| {
        String::from_utf8(s.data.as_ref().expect("data")[certs::CA_CERT_KEY].0.clone())
            .expect("pem")
    };
    let old_ca = ca_of(&secrets.get("tls").await.expect("secret"));

    // Due for renewal (the time recorded in the Secret, whatever the checker's own
    // renew_before, has come): a new CA and certificate; caBundle trusts both CAs.
    let stored = secrets.get("tls").await.expect("secret");
    let mut issued: serde_json::Value =
        serde_json::from_str(&stored.annotations()[certs::ISSUED_ANNOTATION]).expect("record");
    issued["renewAfter"] =
        serde_json::json!(issued["notAfter"].as_u64().expect("notAfter") - 2 * 86400);
    secrets
        .patch(
            "tls",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                certs::ISSUED_ANNOTATION: issued.to_string()}}})),
        )
        .await
        .expect("renewal time moved");
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("rotation"),
        certs::CertAction::Rotated
    );
    let new_ca = ca_of(&secrets.get("tls").await.expect("secret"));
    assert_ne!(old_ca, new_ca);
    let bundle = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(&config_name)
        .await
        .expect("config")
        .webhooks
        .expect("webhooks")[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("caBundle");
    let bundle = String::from_utf8_lossy(&bundle.0).into_owned();
    assert!(bundle.contains(new_ca.trim()) && bundle.contains(old_ca.trim()));

    unregister(&client, &config_name).await;
    ns.delete().await;
}

#[tokio::test]
async fn ca_bundle_gains_a_ca_next_to_those_it_held_also_when_two_replicas_add_theirs_at_once() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgwh-trust").await;
    let config_name = unique_name("sidegate-webhook-trust");
    register(&client, &config_name, free_port(), &ns.name).await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let ca = || {
        certs::generate(&["127.0.0.1".into()], Duration::from_secs(86400))
            .expect("generate")
            .ca_pem
    };
    let cas: Vec<String> = (0..6).map(|_| ca()).collect();
    // The first webhook's caBundle, and the configuration's resourceVersion.
    let held = || {
        let configs = configs.clone();
        let config_name = config_name.clone();
        async move {
            let config = configs.get(&config_name).await.expect("config");
            let bundle = config.webhooks.expect("webhooks")[0]
                .client_config
                .ca_bundle
                .clone()
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default();
            (bundle, config.metadata.resource_version)
        }
    };
    let holds = |bundle: &str, ca: &str| bundle.contains(ca.trim());

    certs::trust(&client, &config_name, &[&cas[0]])
        .await
        .expect("trusted");
    certs::trust(&client, &config_name, &[&cas[1]])
        .await
        .expect("trusted");
    let (bundle, version) = held().await;
    assert!(
        holds(&bundle, &cas[0]) && holds(&bundle, &cas[1]),
        "{bundle}"
    );
    // Trusted already: nothing written.
    certs::trust(&client, &config_name, &[&cas[1], &cas[0]])
        .await
        .expect("trusted");
    assert_eq!(held().await.1, version);

    // Two replicas rotating at once (each adding its new CA from the same read): neither CA
    // is lost, whichever writes first.
    let (two, three) = ([cas[2].as_str()], [cas[3].as_str()]);
    let (a, b) = tokio::join!(
        certs::trust(&client, &config_name, &two),
        certs::trust(&client, &config_name, &three),
    );
    a.expect("a trusted");
    b.expect("b trusted");
    let (bundle, _) = held().await;
    for (i, ca) in cas[..4].iter().enumerate() {
        assert!(holds(&bundle, ca), "CA {i} lost: {bundle}");
    }
    // At most four: the oldest goes first.
    certs::trust(&client, &config_name, &[&cas[4]])
        .await
        .expect("trusted");
    let (bundle, _) = held().await;
    assert!(
        holds(&bundle, &cas[4]) && !holds(&bundle, &cas[0]),
        "{bundle}"
    );
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        certs::TRUSTED_CAS
    );

    unregister(&client, &config_name).await;
    ns.delete().await;
}

#[tokio::test]
async fn a_certificate_made_for_a_year_is_made_again_at_the_next_check_once_validity_is_a_day() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgwh-validity").await;
    let day = Duration::from_secs(86400);
    let valid_for = |validity: Duration| SelfManaged {
        namespace: ns.name.clone(),
        secret_name: "tls".into(),
        // No such configuration: its caBundle is not the point here.
        webhook_config_name: "sidegate-no-such-webhook".into(),
        names: vec!["sidegate-webhook.test.svc".into()],
        validity,
        renew_before: validity / 6,
        owner: None,
        replica: None,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let not_after = |s: &Secret| -> u64 {
        s.annotations()[certs::NOT_AFTER_ANNOTATION]
            .parse()
            .expect("not-after")
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let resolver = CertResolver::new();
    let check = |validity| {
        let (client, resolver, settings) = (&client, &resolver, valid_for(validity));
        async move {
            certs::ensure_self_managed(client, &settings, resolver)
                .await
                .expect("checked")
        }
    };
    assert_eq!(check(365 * day).await, certs::CertAction::Rotated);
    assert_eq!(check(365 * day).await, certs::CertAction::Reused);
    // --cert-validity-days 365 -> 1: a certificate of a day at once, then kept.
    assert_eq!(check(day).await, certs::CertAction::Rotated);
    let made = not_after(&secrets.get("tls").await.expect("secret"));
    assert!(made.abs_diff(now() + 86400) < 120, "not after {made}");
    assert_eq!(check(day).await, certs::CertAction::Reused);
    ns.delete().await;
}
