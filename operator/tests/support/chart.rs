//! The chart as `helm template` renders it, for tests that apply parts of it to the test bed
//! (its ServiceAccount, RBAC and Deployment, whose pods stay Pending: the test bed has no node).

use std::process::Command;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

use super::repo_root;

/// `helm template` of the chart for release `sg` in `ns`, only `templates`, with `sets`
/// (`key=value`, as `--set` takes them).
pub fn helm_template(ns: &str, templates: &[&str], sets: &[&str]) -> String {
    let mut args = vec!["template", "sg", "charts/sidegate", "--namespace", ns];
    for t in templates {
        args.extend(["--show-only", t]);
    }
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = Command::new("helm")
        .args(&args)
        .current_dir(repo_root())
        .output()
        .expect("helm (the test bed's bin dir on PATH)");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The value of `--NAME=VALUE` in the chart's Deployment `args`.
pub fn flag(args: &[String], name: &str) -> String {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
        .unwrap_or_else(|| panic!("--{name} in the chart's Deployment args {args:?}"))
        .to_owned()
}

/// Deletes the ClusterRoles (and their bindings, of the same names) `rendered` holds: the
/// chart's cluster-scoped objects, which the test namespace's deletion leaves.
pub async fn delete_cluster_roles(admin: &Client, rendered: &str) {
    for name in rendered
        .split("\n---")
        .filter(|d| d.contains("kind: ClusterRole"))
        .filter_map(|d| {
            d.lines()
                .skip_while(|l| !l.starts_with("metadata:"))
                .find_map(|l| l.trim().strip_prefix("name: ").map(str::to_owned))
        })
    {
        let _ = Api::<ClusterRole>::all(admin.clone())
            .delete(&name, &DeleteParams::default())
            .await;
        let _ = Api::<ClusterRoleBinding>::all(admin.clone())
            .delete(&name, &DeleteParams::default())
            .await;
    }
}

/// The chart's operator (service account, RBAC, Deployment) in `ns`, serving `apps` only (its
/// least-privilege RBAC), its self-managed webhook certificates valid `days`.
pub fn operator_manifest(ns: &str, apps: &str, days: u32) -> String {
    helm_template(
        ns,
        &[
            "templates/serviceaccount.yaml",
            "templates/rbac.yaml",
            "templates/deployment.yaml",
        ],
        &[
            &format!("watchNamespaces={{{apps}}}"),
            &format!("webhook.selfManaged.validityDays={days}"),
        ],
    )
}

/// Applies `manifest` with kubectl, from a file written in `dir`.
pub fn kubectl_apply(dir: &std::path::Path, manifest: &str) {
    let path = dir.join(format!("{}.yaml", crate::common::unique_name("chart")));
    std::fs::write(&path, manifest).expect("manifest written");
    super::kubectl(&["apply", "-f", path.to_str().expect("path")]);
}

/// The operator container's args of `rs`'s pod template, as `sidegate-operator run` of a
/// test process takes them (its own admin and webhook listeners, and log format).
pub fn args_of(rs: &ReplicaSet) -> Vec<String> {
    let spec = rs
        .spec
        .template
        .as_ref()
        .and_then(|t| t.spec.as_ref())
        .expect("pod template");
    spec.containers[0]
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            a != "run"
                && !["--admin-addr=", "--webhook-port=", "--log-format="]
                    .iter()
                    .any(|p| a.starts_with(p))
        })
        .collect()
}

/// The ReplicaSet of the Deployment `revision` in `ns`, the name of one of its pods and that
/// pod's `pod-template-hash` label, once the controllers made them.
pub async fn revision_made(
    client: &Client,
    ns: &str,
    revision: u64,
) -> Option<(ReplicaSet, String, String)> {
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let rs = replicasets
        .list(&Default::default())
        .await
        .ok()?
        .items
        .into_iter()
        .find(|rs| {
            rs.annotations()
                .get(sidegate_operator::revision::REVISION_ANNOTATION)
                .and_then(|r| r.parse::<u64>().ok())
                == Some(revision)
        })?;
    let pod = pods
        .list(&Default::default())
        .await
        .ok()?
        .items
        .into_iter()
        .find(|p| p.owner_references().iter().any(|o| o.name == rs.name_any()))?;
    let hash = pod.labels().get("pod-template-hash")?.clone();
    Some((rs, pod.name_any(), hash))
}
