//! Helpers shared by the operator's cluster tests: CRDs and RBAC applied once, the controllers
//! running in-process as the operator's ServiceAccount, object builders and waits;
//! [`operator_process`]: `sidegate-operator run` as a child process; [`chart`]: the chart as
//! `helm template` renders it.

#![allow(dead_code)]

pub mod chart;
pub mod extra_apiserver;
pub mod operator_process;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::controller::{self, Context};
use sidegate_operator::metrics::Metrics;
use sidegate_operator::providerkey;
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::inject::InjectConfig;
use tokio::sync::OnceCell;

use crate::common::eventually;

pub const OPERATOR_SA: &str = "system:serviceaccount:sidegate-system:sidegate-operator";
pub const WAIT: Duration = Duration::from_secs(30);

static OPERATOR: OnceCell<Arc<Metrics>> = OnceCell::const_new();

pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A free loopback port (bound and released; whoever needs it binds it again right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn kubectl(args: &[&str]) {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!("running kubectl {args:?} (is the test bed's bin dir on PATH?): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies the committed CRDs and waits until the apiserver serves them.
pub async fn install_crds(client: &Client) {
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "crds/manifests/",
    ]);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["aigateways.sidegate.dev", "providerkeys.sidegate.dev"] {
        eventually(&format!("CRD {name} established"), WAIT, || {
            let crds = crds.clone();
            async move {
                let crd = crds.get_opt(name).await.ok().flatten()?;
                let established = crd
                    .status?
                    .conditions?
                    .into_iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await;
    }
}

/// Starts the controllers of `scope` on their own runtime (the tests' runtimes end with each
/// test), as `user` (impersonated).
pub async fn start_controllers(user: &str, scope: Scope) -> Arc<Metrics> {
    start_controllers_excluding(user, scope, BTreeSet::from(["kube-system".to_owned()])).await
}

/// [`start_controllers`] for an operator whose webhook never injects `excluded`.
pub async fn start_controllers_excluding(
    user: &str,
    scope: Scope,
    excluded: BTreeSet<String>,
) -> Arc<Metrics> {
    start_controllers_injecting(user, scope, excluded, None).await
}

/// [`start_controllers_excluding`] for an operator whose webhook injects as `injection` says
/// (pods injected otherwise are outdated).
pub async fn start_controllers_injecting(
    user: &str,
    scope: Scope,
    excluded: BTreeSet<String>,
    injection: Option<InjectConfig>,
) -> Arc<Metrics> {
    start_controllers_observed(user, scope, excluded, injection, None).await
}

/// Sees each request the controllers send to the apiserver, before it is sent.
pub type RequestObserver = Arc<dyn Fn(&http::Request<kube::client::Body>) + Send + Sync>;

/// [`start_controllers`], with `observe` seeing each request the controllers send.
pub async fn start_controllers_observing(
    user: &str,
    scope: Scope,
    observe: RequestObserver,
) -> Arc<Metrics> {
    start_controllers_observed(
        user,
        scope,
        BTreeSet::from(["kube-system".to_owned()]),
        None,
        Some(observe),
    )
    .await
}

/// A client service that shows each request to an observer, then sends it with `client`.
#[derive(Clone)]
struct Observed {
    client: Client,
    observe: RequestObserver,
}

impl tower_service::Service<http::Request<kube::client::Body>> for Observed {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        (self.observe)(&request);
        let client = self.client.clone();
        Box::pin(async move { client.send(request).await })
    }
}

async fn start_controllers_observed(
    user: &str,
    scope: Scope,
    excluded: BTreeSet<String>,
    injection: Option<InjectConfig>,
    observe: Option<RequestObserver>,
) -> Arc<Metrics> {
    let mut config = kube::Config::infer().await.expect("kubeconfig");
    config.auth_info.impersonate = Some(user.into());
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("operator runtime");
        rt.block_on(async move {
            let default_ns = config.default_namespace.clone();
            let client = Client::try_from(config).expect("operator client");
            let client = match observe {
                Some(observe) => Client::new(Observed { client, observe }, default_ns),
                None => client,
            };
            let ctx = Arc::new(Context {
                resync: Duration::from_secs(60),
                excluded_namespaces: excluded,
                injection,
                ..Context::new(client.clone(), m, Some("cluster-test".into()))
            });
            tokio::join!(
                controller::run(client.clone(), ctx.clone(), 4, &scope),
                providerkey::run(client, ctx, 4, &scope),
            );
        });
    });
    metrics
}

/// Applies CRDs and RBAC once, then starts the controllers of the whole cluster as the
/// operator's ServiceAccount.
pub async fn operator(client: &Client) -> Arc<Metrics> {
    OPERATOR
        .get_or_init(|| async {
            install_crds_and_rbac(client).await;
            start_controllers(OPERATOR_SA, Scope::cluster()).await
        })
        .await
        .clone()
}

/// Applies the CRDs and operator/rbac.yaml (the operator's ServiceAccount [`OPERATOR_SA`] and
/// its ClusterRole), in namespace sidegate-system.
pub async fn install_crds_and_rbac(client: &Client) {
    install_crds(client).await;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("sidegate-system".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "operator/rbac.yaml",
    ]);
}

/// Waits for the namespace's `default` ServiceAccount (pods cannot be created before it exists).
pub async fn wait_for_default_service_account(client: &Client, ns: &str) {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    eventually("the default ServiceAccount", WAIT, || {
        let sas = sas.clone();
        async move { sas.get_opt("default").await.ok().flatten().map(|_| ()) }
    })
    .await;
}

pub fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

pub fn provider_key(
    name: &str,
    provider: &str,
    alias: &str,
    secret: &str,
    key: &str,
) -> ProviderKey {
    serde_json::from_value(json!({
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "ProviderKey",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {"provider": provider, "alias": alias, "secretRef": {"name": secret, "key": key}},
    }))
    .expect("valid ProviderKey")
}

pub fn gateway(name: &str, spec: serde_json::Value) -> AIGateway {
    serde_json::from_value(json!({
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "AIGateway",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid AIGateway")
}

pub async fn create<K>(api: &Api<K>, obj: &K) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), obj)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", obj.name_any()))
}

pub fn condition(gw: &AIGateway, type_: &str) -> Option<(String, String, String)> {
    gw.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn wait_ready(api: &Api<AIGateway>, name: &str) -> AIGateway {
    eventually(&format!("AIGateway {name} Ready"), WAIT, || async {
        let gw = api.get(name).await.ok()?;
        let ready = condition(&gw, "Ready")?;
        let current = gw.status.as_ref()?.observed_generation == gw.metadata.generation;
        (ready.0 == "True" && current).then_some(gw)
    })
    .await
}

pub fn secret_value(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

/// The webhook's settings for a test: served on 127.0.0.1:`port` with a self-managed
/// certificate, registered as `config_name`, injecting the test sidecar image.
pub fn webhook_args(port: u16, config_name: &str) -> sidegate_operator::webhook::WebhookArgs {
    sidegate_operator::webhook::WebhookArgs {
        enabled: true,
        webhook_port: port,
        webhook_bind: [127, 0, 0, 1].into(),
        cert_mode: sidegate_operator::webhook::CertMode::SelfManaged,
        webhook_config_name: config_name.into(),
        webhook_service: "sidegate-webhook".into(),
        webhook_secret: "sidegate-webhook-tls".into(),
        extra_names: vec!["127.0.0.1".into()],
        tls_cert_file: "/nonexistent".into(),
        tls_key_file: "/nonexistent".into(),
        ca_file: None,
        cert_validity_days: 365,
        cert_check_secs: 60,
        pod_name: None,
        pod_template_hash: None,
        sidecar_image: "registry.local/sidegate:test".into(),
        sidecar_image_pull_policy: Some("Never".into()),
        sidecar_image_pull_secrets: vec![],
        allowed_sidecar_images: vec![],
        sidecar_resources: None,
        sidecar_run_as_user: sidegate_operator::webhook::IdFlag(Some(65532)),
        sidecar_run_as_group: sidegate_operator::webhook::IdFlag(Some(65532)),
        exclude_namespaces: vec![],
    }
}
