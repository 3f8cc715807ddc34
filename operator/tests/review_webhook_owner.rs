//! Review of 7b6fb00 and 2b4bead (the operator's Deployment owning its Lease and certificate
//! Secret; denied pods; the sidecar's image pull secrets).
//!
//! Unit-level (the webhook's injection, no cluster):
//!
//! ```text
//! cargo test -p sidegate-operator --test review_webhook_owner
//! ```
//!
//! Cluster-backed (a real apiserver, `tests/cluster/`; skipped without one):
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test review_webhook_owner
//! ```
//!
//! `the_chart_rbac_lets_the_operator_adopt_...` starts a second kube-apiserver of the test bed
//! (same etcd, same certificates, its own port) with the OwnerReferencesPermissionEnforcement
//! admission plugin on (on by default in OpenShift and hardened clusters, the plugin the commit
//! message says the design accounts for), and stops it at the end.

mod common;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::{AIGateway, SidecarSettings};
use sidegate_operator::lease::{LeaderElector, LeaseSettings};
use sidegate_operator::metrics::Metrics;
use sidegate_operator::owner;
use sidegate_operator::scope::Scope;
use sidegate_operator::webhook::certs::{self, CertResolver, SelfManaged};
use sidegate_operator::webhook::inject::{
    self, EnvFromKeys, INJECTED_ANNOTATION, InjectConfig, InjectError, InjectSettings, Injection,
};
use sidegate_operator::webhook::{self, WebhookArgs};

use common::{cluster_client, create_test_namespace, eventually, unique_name};
use support::chart::{self, flag};
use support::extra_apiserver::ExtraApiserver;
use support::{WAIT, create, free_port, gateway, wait_for_default_service_account};

// ---------------------------------------------------------------------------------------------
// Unit level: inject::inject on pods built here.

fn config() -> InjectConfig {
    InjectConfig::new(
        "ghcr.io/sidegate/sidegate:0.1.0",
        "0.1.0",
        "sidegate-system",
    )
}

fn pod(annotations: serde_json::Value, spec: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chat", "annotations": annotations},
        "spec": spec,
    }))
    .expect("valid Pod")
}

fn annotated() -> serde_json::Value {
    json!({"sidegate.dev/gateway": "main"})
}

/// A pod for gateway `main` whose app container "web" declares `ports`.
fn pod_with_ports(ports: serde_json::Value) -> Pod {
    pod(
        annotated(),
        json!({"containers": [
            {"name": "app", "image": "example.com/chat:1"},
            {"name": "web", "image": "example.com/web:1", "ports": ports},
        ]}),
    )
}

fn inject_with(
    config: &InjectConfig,
    pod: &Pod,
    sidecar: &SidecarSettings,
) -> Result<Option<Injection>, InjectError> {
    inject::inject(
        pod,
        &InjectSettings {
            config,
            namespace: "team-a",
            sidecar,
            env_from: &EnvFromKeys::default(),
        },
    )
}

fn classic() -> SidecarSettings {
    SidecarSettings {
        native_sidecar: false,
        ..SidecarSettings::default()
    }
}

fn apply(doc: &mut serde_json::Value, injection: &Injection) {
    json_patch::patch(doc, &injection.patch).expect("patch applies to the pod");
}

#[test]
fn only_a_tcp_container_port_clashes_a_host_port_or_an_sctp_port_of_that_number_does_not() {
    let config = config();
    for sidecar in [SidecarSettings::default(), classic()] {
        // hostPort is the node's port (forwarded into the pod's containerPort), not one the
        // pod's network namespace listens on: the sidecar's 8787/8788 stay free.
        let host_port =
            pod_with_ports(json!([{"containerPort": 8080, "hostPort": 8787, "protocol": "TCP"}]));
        assert!(
            matches!(inject_with(&config, &host_port, &sidecar), Ok(Some(_))),
            "hostPort 8787 with containerPort 8080 is no clash (native {})",
            sidecar.native_sidecar
        );
        // SCTP sockets do not take a TCP port.
        let sctp = pod_with_ports(json!([{"containerPort": 8788, "protocol": "SCTP"}]));
        assert!(
            matches!(inject_with(&config, &sctp, &sidecar), Ok(Some(_))),
            "SCTP 8788 is no clash"
        );
        // The containerPort is what counts, whatever the hostPort.
        let container_port =
            pod_with_ports(json!([{"containerPort": 8788, "hostPort": 30088, "protocol": "TCP"}]));
        match inject_with(&config, &container_port, &sidecar) {
            Err(e @ InjectError::PortTaken { .. }) => {
                assert!(e.is_in_the_pod());
                assert!(e.to_string().contains("containerPort 8788"), "{e}");
            }
            other => panic!("containerPort 8788 not refused: {other:?}"),
        }
    }
}

#[test]
fn an_opted_out_pod_is_admitted_unchanged_whatever_in_its_spec_would_rule_the_sidecar_out() {
    let config = config();
    let opted_out = json!({"sidegate.dev/gateway": "main", "sidegate.dev/inject": "False"});
    let specs = [
        json!({"hostNetwork": true, "containers": [{"name": "app", "image": "example.com/a:1"}]}),
        json!({"containers": [{"name": "sidegate", "image": "example.com/a:1"}]}),
        json!({"containers": [{"name": "app", "image": "example.com/a:1",
            "ports": [{"containerPort": 8787}]}]}),
        json!({"containers": [{"name": "app", "image": "example.com/a:1"}],
            "volumes": [{"name": "sidegate-keys", "emptyDir": {}}]}),
    ];
    for spec in specs {
        let p = pod(opted_out.clone(), spec.clone());
        assert_eq!(
            inject_with(&config, &p, &SidecarSettings::default()),
            Ok(None),
            "{spec}"
        );
        // The same spec asking for the sidecar is denied (is_in_the_pod), so the opt-out the
        // denial message offers is what lets it run.
        let asking = pod(annotated(), spec.clone());
        let err = inject_with(&config, &asking, &SidecarSettings::default())
            .expect_err("denied without the opt-out");
        assert!(err.is_in_the_pod(), "{err:?}");
    }
}

#[test]
fn a_pod_injected_with_a_classic_sidecar_is_not_denied_for_the_sidecars_own_port_when_admitted_again()
 {
    // A classic sidecar is an app container declaring the admin port (8788): an injected pod
    // created again as it is stored (e.g. `kubectl get pod -o yaml | kubectl create -f -`,
    // `kubectl debug --copy-to`) must not be refused as clashing with its own sidecar.
    let config = config();
    let p = pod(
        annotated(),
        json!({"containers": [{"name": "app", "image": "example.com/chat:1"}]}),
    );
    for sidecar in [classic(), SidecarSettings::default()] {
        let injection = inject_with(&config, &p, &sidecar)
            .expect("no refusal")
            .expect("injected");
        let mut doc = serde_json::to_value(&p).expect("json");
        apply(&mut doc, &injection);
        let stored: Pod = serde_json::from_value(doc).expect("a Pod");
        assert!(
            stored
                .spec
                .as_ref()
                .expect("spec")
                .containers
                .iter()
                .chain(
                    stored
                        .spec
                        .as_ref()
                        .expect("spec")
                        .init_containers
                        .iter()
                        .flatten()
                )
                .any(|c| c.name == inject::SIDECAR_CONTAINER
                    && c.ports.iter().flatten().any(|p| p.container_port == 8788))
        );
        assert_eq!(inject_with(&config, &stored, &sidecar), Ok(None));
    }
}

#[test]
fn pull_secrets_merge_into_a_null_list_and_next_to_entries_with_empty_names() {
    let mut config = config();
    config.image_pull_secrets = vec!["sidegate-registry".into(), "shared".into()];
    let names = |doc: &serde_json::Value| -> Vec<String> {
        doc["spec"]["imagePullSecrets"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|r| r["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    // `imagePullSecrets: null`, as some clients send: the webhook's patch replaces it.
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "chat", "annotations": annotated()},
        "spec": {"imagePullSecrets": null,
            "containers": [{"name": "app", "image": "example.com/chat:1"}]},
    });
    let p: Pod = serde_json::from_value(raw.clone()).expect("a Pod");
    let injection = inject_with(&config, &p, &SidecarSettings::default())
        .expect("no refusal")
        .expect("injected");
    let mut doc = raw;
    apply(&mut doc, &injection);
    assert_eq!(names(&doc), ["sidegate-registry", "shared"]);

    // An entry without a name (the apiserver only warns about it) is kept; the operator's come
    // after it, those the pod names already not again.
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "chat", "annotations": annotated()},
        "spec": {"imagePullSecrets": [{}, {"name": "shared"}],
            "containers": [{"name": "app", "image": "example.com/chat:1"}]},
    });
    let p: Pod = serde_json::from_value(raw.clone()).expect("a Pod");
    let injection = inject_with(&config, &p, &SidecarSettings::default())
        .expect("no refusal")
        .expect("injected");
    let mut doc = raw;
    apply(&mut doc, &injection);
    assert_eq!(names(&doc), ["", "shared", "sidegate-registry"]);

    // A pod that names all of them already: the patch leaves imagePullSecrets alone.
    let p = pod(
        annotated(),
        json!({"imagePullSecrets": [{"name": "shared"}, {"name": "sidegate-registry"}],
            "containers": [{"name": "app", "image": "example.com/chat:1"}]}),
    );
    let injection = inject_with(&config, &p, &SidecarSettings::default())
        .expect("no refusal")
        .expect("injected");
    assert!(
        !serde_json::to_string(&injection.patch)
            .expect("json")
            .contains("imagePullSecrets"),
        "{:?}",
        injection.patch
    );
}

// ---------------------------------------------------------------------------------------------
// Cluster level: the webhook served to the test bed's apiserver.

fn webhook_args(port: u16, config_name: &str, pull_secrets: &[&str]) -> WebhookArgs {
    WebhookArgs {
        cert_validity_days: 1,
        sidecar_image_pull_secrets: pull_secrets.iter().map(|s| (*s).to_owned()).collect(),
        ..support::webhook_args(port, config_name)
    }
}

/// The webhook for namespace `apps` only (certificate Secret in `operator_ns`), registered with
/// the apiserver and seen injecting a dry-run probe. Returns the configuration's name.
async fn serve_webhook(
    client: &Client,
    apps: &str,
    operator_ns: &str,
    pull_secrets: &[&str],
) -> String {
    let port = free_port();
    let config_name = unique_name("sidegate-review-owner");
    let mut config = webhook::configuration(
        &config_name,
        WebhookClientConfig {
            url: Some(format!("https://127.0.0.1:{port}{}", webhook::MUTATE_PATH)),
            ..WebhookClientConfig::default()
        },
        &BTreeSet::new(),
    );
    if let Some(hooks) = config.webhooks.as_mut() {
        hooks[0].namespace_selector = Some(LabelSelector {
            match_labels: Some(
                [("kubernetes.io/metadata.name".to_owned(), apps.to_owned())].into(),
            ),
            ..LabelSelector::default()
        });
    }
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("create MutatingWebhookConfiguration");
    webhook::start(
        client.clone(),
        &webhook_args(port, &config_name, pull_secrets),
        operator_ns,
        &Scope::cluster(),
        Arc::new(Metrics::default()),
        None,
    )
    .await
    .expect("webhook starts");
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps);
    eventually("the apiserver to call the webhook", WAIT, || {
        let pods = pods.clone();
        async move {
            let probe = pod(
                annotated(),
                json!({"containers": [{"name": "app", "image": "example.com/chat:1"}]}),
            );
            let created = pods.create(&dry_run(), &probe).await.ok()?;
            created
                .annotations()
                .contains_key(INJECTED_ANNOTATION)
                .then_some(())
        }
    })
    .await;
    config_name
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

#[tokio::test]
async fn a_pod_relying_on_its_service_accounts_pull_secrets_keeps_them_next_to_the_sidecars() {
    let Some(client) = cluster_client().await else {
        return;
    };
    support::install_crds(&client).await;
    let apps = create_test_namespace(&client, "sgrev-pull").await;
    let operator_ns = create_test_namespace(&client, "sgrev-pull-operator").await;
    wait_for_default_service_account(&client, &apps.name).await;
    create(
        &Api::<AIGateway>::namespaced(client.clone(), &apps.name),
        &gateway("main", json!({})),
    )
    .await;
    let sa: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": "puller"},
        "imagePullSecrets": [{"name": "team-registry"}],
    }))
    .expect("sa");
    create(&Api::namespaced(client.clone(), &apps.name), &sa).await;
    let config_name = serve_webhook(
        &client,
        &apps.name,
        &operator_ns.name,
        &["sidegate-registry"],
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);

    // The ServiceAccount admission plugin gives a pod without pull secrets its ServiceAccount's
    // only when the pod has none: it runs before the webhooks, so the sidecar's added by the
    // webhook do not take the pod's own registry access away.
    let p = pod(
        annotated(),
        json!({"serviceAccountName": "puller",
            "containers": [{"name": "app", "image": "example.com/chat:1"}]}),
    );
    let stored = pods.create(&dry_run(), &p).await.expect("created");
    assert!(stored.annotations().contains_key(INJECTED_ANNOTATION));
    let names: Vec<String> = stored
        .spec
        .expect("spec")
        .image_pull_secrets
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["team-registry", "sidegate-registry"]);

    // A pod asking for a gateway that does not exist here is admitted as before (with a
    // warning), even with a spec the sidecar could not run in: no gateway, nothing to deny.
    let host = pod(
        json!({"sidegate.dev/gateway": "no-such-gateway"}),
        json!({"hostNetwork": true, "containers": [{"name": "app", "image": "example.com/a:1",
            "ports": [{"containerPort": 8787}]}]}),
    );
    let stored = pods
        .create(&dry_run(), &host)
        .await
        .expect("admitted: the gateway does not exist");
    assert!(!stored.annotations().contains_key(INJECTED_ANNOTATION));

    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&config_name, &DeleteParams::default())
        .await;
    apps.delete().await;
    operator_ns.delete().await;
}

#[tokio::test]
async fn a_one_day_certificate_lasts_a_day_and_is_renewed_once_less_than_four_hours_are_left() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "sgrev-validity").await;
    let (validity, renew_before) = webhook_args(0, "unused", &[])
        .cert_validity()
        .expect("1 day is valid");
    assert_eq!(
        (validity, renew_before),
        (Duration::from_secs(86400), Duration::from_secs(4 * 3600))
    );
    let settings = SelfManaged {
        namespace: ns.name.clone(),
        secret_name: "webhook-tls".into(),
        webhook_config_name: "sidegate-review-no-such-webhook".into(),
        names: vec!["sidegate-webhook.test.svc".into()],
        validity,
        renew_before,
        owner: None,
        replica: None,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let not_after = |s: &Secret| -> u64 {
        s.annotations()
            .get(certs::NOT_AFTER_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .expect("not-after annotation")
    };
    let set_not_after = |at: u64| {
        let secrets = secrets.clone();
        async move {
            secrets
                .patch(
                    "webhook-tls",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                        certs::NOT_AFTER_ANNOTATION: at.to_string()}}})),
                )
                .await
                .expect("patch");
        }
    };
    let resolver = CertResolver::new();
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("made"),
        certs::CertAction::Rotated
    );
    let made = not_after(&secrets.get("webhook-tls").await.expect("secret"));
    assert!(
        made.abs_diff(now() + 86400) < 120,
        "not after {made}, now {}",
        now()
    );

    // 20 h in, a little more than 4 h left: kept.
    set_not_after(now() + 4 * 3600 + 300).await;
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("checked"),
        certs::CertAction::Reused
    );
    // A little less than 4 h left: renewed, for another day.
    set_not_after(now() + 4 * 3600 - 300).await;
    assert_eq!(
        certs::ensure_self_managed(&client, &settings, &resolver)
            .await
            .expect("checked"),
        certs::CertAction::Rotated
    );
    let renewed = not_after(&secrets.get("webhook-tls").await.expect("secret"));
    assert!(renewed.abs_diff(now() + 86400) < 120, "not after {renewed}");
    ns.delete().await;
}

// ---------------------------------------------------------------------------------------------
// Cluster level: the chart's RBAC under OwnerReferencesPermissionEnforcement.

// Failed at 3f7d83f (mended since): under OwnerReferencesPermissionEnforcement, adopting an older operator's Lease/Secret (an update that adds ownerReferences) needs `delete` on them, which the chart's RBAC lacks: the Lease is never acquired again and the Secret never owned nor rotated
#[tokio::test]
async fn the_chart_rbac_lets_the_operator_adopt_its_lease_and_certificate_secret_where_owner_references_are_enforced()
 {
    let Some(admin) = cluster_client().await else {
        return;
    };
    let Some(enforcing) = ExtraApiserver::start("OwnerReferencesPermissionEnforcement") else {
        return;
    };
    let ns = create_test_namespace(&admin, "sgrev-owner").await;

    // The chart as installed in `ns` (release `sg`): its ServiceAccount, RBAC and Deployment
    // (whose pods stay Pending: no node; the Deployment is the owner either way).
    let rendered = chart::helm_template(
        &ns.name,
        &[
            "templates/serviceaccount.yaml",
            "templates/rbac.yaml",
            "templates/deployment.yaml",
        ],
        &[],
    );
    let manifest = std::env::temp_dir().join(format!("{}.yaml", unique_name("sgrev-chart")));
    std::fs::write(&manifest, &rendered).expect("write manifest");
    support::kubectl(&["apply", "-f", manifest.to_str().expect("path")]);
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &ns.name)
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .pop()
        .expect("the chart's Deployment");
    let pod_spec = deployment.spec.template.spec.clone().expect("pod spec");
    let args = pod_spec.containers[0].args.clone().unwrap_or_default();
    let deployment_name = flag(&args, "owner-deployment");
    let lease_name = flag(&args, "lease-name");
    let secret_name = flag(&args, "webhook-secret");
    let config_name = flag(&args, "webhook-config-name");
    let sa = format!(
        "system:serviceaccount:{}:{}",
        ns.name,
        pod_spec
            .service_account_name
            .clone()
            .expect("serviceAccountName")
    );

    // The operator, through the enforcing apiserver, with the chart's RBAC.
    let operator = enforcing.client(Some(&sa)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let found = loop {
        if let Ok(Some(found)) = owner::deployment(&operator, &ns.name, &deployment_name).await {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the enforcing apiserver did not come up, or the operator's Role did not let it \
             read its Deployment, within 120 s; its log ends:\n{}",
            enforcing.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(Some(&found.uid), deployment.metadata.uid.as_ref());

    let lease_settings = |identity: &str, owner: Option<&OwnerReference>| LeaseSettings {
        namespace: ns.name.clone(),
        name: lease_name.clone(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(1),
        owner: owner.cloned(),
    };
    let cert_settings = |names: Vec<String>, owner: Option<&OwnerReference>| SelfManaged {
        namespace: ns.name.clone(),
        secret_name: secret_name.clone(),
        webhook_config_name: config_name.clone(),
        names,
        validity: Duration::from_secs(86400),
        renew_before: Duration::from_secs(4 * 3600),
        owner: owner.cloned(),
        replica: None,
    };
    let names = vec![format!("sg-sidegate-webhook.{}.svc", ns.name)];

    // What an older operator (no --owner-deployment) left: a Lease it released on shutdown and
    // the certificate Secret, neither owned. Made by the same ServiceAccount through the same
    // apiserver: the chart's RBAC is enough for that.
    let older = LeaderElector::new(operator.clone(), lease_settings("older-replica", None));
    tokio::time::timeout(Duration::from_secs(20), older.acquire())
        .await
        .expect("an operator without an owner takes the Lease with the chart's RBAC");
    older.release().await;
    let resolver = CertResolver::new();
    certs::ensure_self_managed(&operator, &cert_settings(names.clone(), None), &resolver)
        .await
        .expect("an operator without an owner makes the Secret with the chart's RBAC");

    let mut problems = Vec::new();
    // This version: the Lease is adopted when taken.
    let newer = LeaderElector::new(
        operator.clone(),
        lease_settings("newer-replica", Some(&found)),
    );
    if tokio::time::timeout(Duration::from_secs(20), newer.acquire())
        .await
        .is_err()
    {
        // What each attempt gets (acquire only logs it): the same write, made here.
        let leases: Api<Lease> = Api::namespaced(operator.clone(), &ns.name);
        let mut lease = leases.get(&lease_name).await.expect("get lease");
        owner::adopt(&mut lease.metadata, &found);
        let refused = leases
            .replace(&lease_name, &PostParams::default(), &lease)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        problems.push(format!(
            "the Lease an older operator released was not acquired within 20 s: each take \
             (a replace adding ownerReferences) is refused: {refused}"
        ));
    }
    // The Secret is adopted at the certificate check...
    certs::ensure_self_managed(
        &operator,
        &cert_settings(names.clone(), Some(&found)),
        &resolver,
    )
    .await
    .expect("the stored certificate is reused");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns.name);
    let secret = secrets.get(&secret_name).await.expect("secret");
    let owned = secret
        .owner_references()
        .iter()
        .any(|r| r.uid == found.uid && r.kind == "Deployment");
    if !owned {
        problems.push(
            "the certificate Secret of an older operator is not adopted (a patch adding \
             ownerReferences is refused; the operator only logs it each minute)"
                .to_owned(),
        );
    }
    // ...and a rotation of a Secret still unowned (its end near, or other names) carries the
    // adoption in the same write.
    let mut renamed = names.clone();
    renamed.push("127.0.0.1".into());
    if let Err(e) =
        certs::ensure_self_managed(&operator, &cert_settings(renamed, Some(&found)), &resolver)
            .await
    {
        problems.push(format!(
            "rotating the unowned certificate Secret fails, so it is never renewed (and at \
             start the operator gives up after five refusals in a row): {e}"
        ));
    }

    // With `delete` on those two names (what the plugin asks for an ownerReferences change),
    // the same operator adopts both: the missing permission is the cause.
    let with_delete = if problems.is_empty() {
        String::new()
    } else {
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "review-delete"},
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "resourceNames": [lease_name], "verbs": ["delete"]},
                {"apiGroups": [""], "resources": ["secrets"],
                 "resourceNames": [secret_name], "verbs": ["delete"]},
            ],
        }))
        .expect("role");
        let (sa_ns, sa_name) = (
            ns.name.clone(),
            pod_spec.service_account_name.clone().expect("sa"),
        );
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "review-delete"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "review-delete"},
            "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_ns}],
        }))
        .expect("binding");
        create(&Api::namespaced(admin.clone(), &ns.name), &role).await;
        create(&Api::namespaced(admin.clone(), &ns.name), &binding).await;
        let taken = tokio::time::timeout(Duration::from_secs(30), newer.acquire())
            .await
            .is_ok();
        let mut renamed = names.clone();
        renamed.push("127.0.0.1".into());
        let rotated =
            certs::ensure_self_managed(&operator, &cert_settings(renamed, Some(&found)), &resolver)
                .await
                .map(|a| format!("{a:?}"))
                .unwrap_or_else(|e| e.to_string());
        format!(
            "\nwith delete granted on the Lease and the Secret by name: Lease acquired: {taken}; \
             rotation: {rotated}"
        )
    };

    // Cleanup: the chart's cluster-scoped objects, the namespace.
    chart::delete_cluster_roles(&admin, &rendered).await;
    let _ = std::fs::remove_file(&manifest);
    ns.delete().await;
    drop(enforcing);
    assert!(
        problems.is_empty(),
        "under OwnerReferencesPermissionEnforcement, with the chart's RBAC:\n- {}{with_delete}",
        problems.join("\n- ")
    );
}
