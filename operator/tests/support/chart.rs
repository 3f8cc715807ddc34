//! The chart as `helm template` renders it, for tests that apply parts of it to the test bed
//! (its ServiceAccount, RBAC and Deployment, whose pods stay Pending: the test bed has no node).

use std::process::Command;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
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
