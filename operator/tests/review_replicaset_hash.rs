//! Review of "each replica finds its ReplicaSet by name, <deployment>-<pod-template-hash>".
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test review_replicaset_hash
//! ```

mod common;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sidegate_operator::revision::REVISION_ANNOTATION;
use sidegate_operator::webhook::{self, certs};
use tokio::time::Instant;

use common::{cluster_client, create_test_namespace, eventually};
use support::chart::{self, flag};
use support::operator_process::{OperatorCommand, OperatorProcess, temp_dir};
use support::{WAIT, free_port, install_crds, kubectl, wait_for_default_service_account};

const CHECK_SECS: u64 = 2;
const SECRET: &str = "sg-sidegate-webhook-cert";

/// Webhook configuration `name` (one webhook per port, pods of `ns` only, which nothing
/// creates): the replicas patch its caBundle.
fn configuration(name: &str, ports: &[u16], ns: &str) -> MutatingWebhookConfiguration {
    let mut config = webhook::configuration(name, WebhookClientConfig::default(), &BTreeSet::new());
    let template = config.webhooks.as_ref().expect("webhooks")[0].clone();
    config.webhooks = Some(
        ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let mut hook = template.clone();
                hook.name = format!("replica-{i}.{}", template.name);
                hook.client_config.url =
                    Some(format!("https://127.0.0.1:{port}{}", webhook::MUTATE_PATH));
                hook.namespace_selector = Some(LabelSelector {
                    match_labels: Some(
                        [("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into(),
                    ),
                    ..LabelSelector::default()
                });
                hook
            })
            .collect(),
    );
    config
}

/// (revision number, validity in seconds) the Secret's record says.
fn made_for(secret: &Secret) -> (Option<u64>, u64) {
    let annotations = secret.annotations();
    let issued: serde_json::Value =
        serde_json::from_str(&annotations[certs::ISSUED_ANNOTATION]).expect("record");
    let at = |key: &str| -> u64 { annotations[key].parse().expect("a time") };
    (
        issued["revision"]["number"].as_u64(),
        at(certs::NOT_AFTER_ANNOTATION)
            - at(certs::NOT_BEFORE_ANNOTATION)
            - certs::BACKDATED.as_secs(),
    )
}

async fn wait_serving(replica: &mut OperatorProcess) {
    replica
        .wait_for("serving", Duration::from_secs(60), |r| r.serving())
        .await;
}

// Failed at fa59283 (mended since): a ReplicaSet named from the hash that is absent once (get_opt -> None)
// makes OwnRevision set `none` for good, so the replica never reads its revision again, even
// once the Deployment has made the ReplicaSet again under the same name (and at e4bd67f a
// 404 on the ReplicaSet was an error, retried, with the last revision standing in). Here the
// upgraded replica (revision 2, 1 day) then never replaces revision 1's year-long certificate.
#[tokio::test]
async fn a_replica_whose_replicaset_was_briefly_absent_reads_its_revision_once_it_is_back() {
    let Some(admin) = cluster_client().await else {
        return;
    };
    install_crds(&admin).await;
    let ns = create_test_namespace(&admin, "sgrv-absent").await;
    let apps = create_test_namespace(&admin, "sgrv-absent-apps").await;
    wait_for_default_service_account(&admin, &apps.name).await;
    let dir = temp_dir("sgrv-absent");
    let rendered = chart::operator_manifest(&ns.name, &apps.name, 365);
    chart::kubectl_apply(&dir, &rendered);
    let revision_of = |rs: &ReplicaSet| -> Option<u64> {
        rs.annotations().get(REVISION_ANNOTATION)?.parse().ok()
    };
    let replicasets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns.name);
    let (old_rs, _, old_hash) = eventually("revision 1", WAIT, || {
        chart::revision_made(&admin, &ns.name, 1)
    })
    .await;
    chart::kubectl_apply(&dir, &chart::operator_manifest(&ns.name, &apps.name, 1));
    let (new_rs, _, new_hash) = eventually("revision 2", WAIT, || {
        chart::revision_made(&admin, &ns.name, 2)
    })
    .await;
    let deployment = new_rs.owner_references()[0].name.clone();
    assert_eq!(new_rs.name_any(), format!("{deployment}-{new_hash}"));
    let (old_args, new_args) = (chart::args_of(&old_rs), chart::args_of(&new_rs));
    let config_name = flag(&new_args, "webhook-config-name");
    let sa = format!(
        "system:serviceaccount:{}:{}",
        ns.name,
        new_rs
            .spec
            .template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.service_account_name.clone())
            .expect("serviceAccountName")
    );
    let ports = [free_port(), free_port()];
    let configs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    configs
        .create(
            &PostParams::default(),
            &configuration(&config_name, &ports, &apps.name),
        )
        .await
        .expect("webhook configuration");

    // The Deployment paused, revision 2's ReplicaSet deleted leaving its pods (orphan): it is
    // not made again until the Deployment is resumed.
    deployments
        .patch(
            &deployment,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("paused");
    eventually("the pause observed", WAIT, || {
        let deployments = deployments.clone();
        let deployment = deployment.clone();
        async move {
            let d = deployments.get(&deployment).await.ok()?;
            (d.status?.observed_generation == d.metadata.generation).then_some(())
        }
    })
    .await;
    kubectl(&[
        "-n",
        &ns.name,
        "delete",
        "replicaset",
        &new_rs.name_any(),
        "--cascade=orphan",
        "--wait=true",
    ]);
    assert!(
        replicasets
            .get_opt(&new_rs.name_any())
            .await
            .expect("read")
            .is_none(),
        "revision 2's ReplicaSet deleted"
    );

    let replica = |identity: &str, port: u16, args: &[String], hash: &str| {
        let mut command = OperatorCommand::new(&dir, identity)
            .self_managed_certificate()
            .webhook_port(port)
            .impersonating(&sa)
            .arg(format!("--lease-namespace={}", ns.name))
            .arg(format!("--pod-template-hash={hash}"))
            .arg(format!("--cert-check-secs={CHECK_SECS}"))
            .arg("--webhook-extra-name=127.0.0.1");
        for a in args {
            command = command.arg(a.clone());
        }
        command.spawn()
    };
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns.name);

    // Revision 1 makes a certificate of a year.
    let mut old = replica("old-replica", ports[0], &old_args, &old_hash);
    wait_serving(&mut old).await;
    let secret = secrets.get(SECRET).await.expect("the certificate Secret");
    assert_eq!(made_for(&secret), (Some(1), 365 * 86400));

    // Revision 2's replica starts while its ReplicaSet is absent, then the Deployment is
    // resumed and makes it again, under the same name, revision 2.
    let mut new = replica("new-replica", ports[1], &new_args, &new_hash);
    wait_serving(&mut new).await;
    tokio::time::sleep(Duration::from_secs(2 * CHECK_SECS)).await;
    deployments
        .patch(
            &deployment,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("resumed");
    let back = eventually("revision 2's ReplicaSet made again", WAIT, || {
        let replicasets = replicasets.clone();
        let name = new_rs.name_any();
        async move { replicasets.get_opt(&name).await.ok().flatten() }
    })
    .await;
    assert_eq!(revision_of(&back), Some(2), "made again as revision 2");

    // Within a dozen of its checks, revision 2's replica knows its revision again and
    // replaces revision 1's year-long certificate with its day, as it does when its
    // ReplicaSet was never absent (webhook_cert_replicas).
    let end = Instant::now() + Duration::from_secs(12 * CHECK_SECS);
    let mut last = made_for(&secret);
    while Instant::now() < end && last != (Some(2), 86400) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        old.assert_running("watching");
        new.assert_running("watching");
        last = made_for(&secrets.get(SECRET).await.expect("the certificate Secret"));
    }
    assert_eq!(
        last,
        (Some(2), 86400),
        "revision 2's replica never took up its revision once its ReplicaSet was back; its \
         log:\n{}",
        new.log()
    );

    drop((old, new));
    let _ = configs.delete(&config_name, &DeleteParams::default()).await;
    chart::delete_cluster_roles(&admin, &rendered).await;
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
    apps.delete().await;
}

// Failed at fa59283 (mended since): the chart README says each replica reads its ReplicaSet
// `<fullname>-<pod-template-hash>`, but the Deployment is `sidegate.operatorName`,
// `<fullname>-operator`, so the ReplicaSet is `<fullname>-operator-<pod-template-hash>`
// (what the operator reads: --owner-deployment plus the hash).
#[test]
fn the_chart_readme_names_the_replicaset_the_operator_reads() {
    let readme = std::fs::read_to_string(support::repo_root().join("charts/sidegate/README.md"))
        .expect("chart README");
    let helpers = std::fs::read_to_string(
        support::repo_root().join("charts/sidegate/templates/_helpers.tpl"),
    )
    .expect("helpers");
    assert!(
        helpers.contains(r#"printf "%s-operator" (include "sidegate.fullname" .)"#),
        "the Deployment is <fullname>-operator"
    );
    assert!(
        readme.contains("`<fullname>-operator-<pod-template-hash>`")
            && !readme.contains("`<fullname>-<pod-template-hash>`"),
        "the chart README names the ReplicaSet <fullname>-<pod-template-hash>; the Deployment \
         is <fullname>-operator, so its ReplicaSets are <fullname>-operator-<pod-template-hash>"
    );
}
