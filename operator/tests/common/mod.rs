//! Shared helpers for the operator's integration tests that need a real Kubernetes API server.
//!
//! The cluster comes from `tests/cluster/` (etcd + kube-apiserver + kube-controller-manager on
//! loopback). Run the tests under it:
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_smoke
//! ```
//!
//! Without a cluster, [`cluster_client`] skips (returns `None`) outside CI and panics in CI
//! (`CI=true`), so a CI run can never pass by silently testing nothing.

// Each integration test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

/// Label put on every namespace these tests create, so leftovers are easy to find.
pub const TEST_NAMESPACE_LABEL: &str = "sidegate.test/e2e";

const HOW_TO_RUN: &str = "run under tests/cluster/with-cluster, e.g. \
     `tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_smoke`";

/// True when running in CI (`CI=true` or `CI=1`), where a missing cluster is an error.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// No usable cluster: panic in CI, otherwise print why the test is skipped.
fn no_cluster(reason: &str) -> Option<kube::Client> {
    if in_ci() {
        panic!("{reason}: {HOW_TO_RUN} (CI=true, so this is a failure, not a skip)");
    }
    // Straight to stderr, past the test harness's output capture, so the skip is always seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no test cluster): {reason}: {HOW_TO_RUN}"
    );
    None
}

/// A client for the test cluster named by `KUBECONFIG`, or `None` (skip) when there is none.
///
/// `KUBECONFIG` must be set explicitly: these tests create namespaces and webhook
/// configurations, so they never fall back to `~/.kube/config` or an in-cluster config.
/// In CI (`CI=true`) a missing or unreachable cluster panics with the reason.
pub async fn cluster_client() -> Option<kube::Client> {
    let path = match std::env::var("KUBECONFIG") {
        Ok(p) if !p.trim().is_empty() => p,
        _ => return no_cluster("KUBECONFIG not set"),
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => return no_cluster(&format!("KUBECONFIG={path} is not usable: {e}")),
    };
    match tokio::time::timeout(Duration::from_secs(15), client.apiserver_version()).await {
        Ok(Ok(_)) => Some(client),
        Ok(Err(e)) => no_cluster(&format!(
            "the API server in KUBECONFIG={path} is unreachable: {e}"
        )),
        Err(_) => no_cluster(&format!(
            "the API server in KUBECONFIG={path} did not answer /version within 15 s"
        )),
    }
}

/// A name unique to this process and call: `PREFIX-<pid>-<time>-<n>`, valid as a DNS label
/// (prefix is truncated so the whole stays within 63 characters).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or_default();
    let suffix = format!("{:x}-{nanos:x}-{n}", std::process::id());
    let keep = 62usize.saturating_sub(suffix.len());
    let prefix: String = prefix.chars().take(keep).collect();
    format!("{}-{suffix}", prefix.trim_end_matches('-'))
}

/// A namespace created for one test; delete it with [`TestNamespace::delete`] at the end.
pub struct TestNamespace {
    pub name: String,
    client: kube::Client,
}

impl TestNamespace {
    /// Deletes the namespace (its contents go with it, via kube-controller-manager).
    pub async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client);
        if let Err(e) = api.delete(&self.name, &DeleteParams::default()).await {
            eprintln!(
                "warning: could not delete test namespace {}: {e}",
                self.name
            );
        }
    }
}

/// Creates a uniquely named namespace `PREFIX-...`, labelled [`TEST_NAMESPACE_LABEL`]=`true`.
pub async fn create_test_namespace(client: &kube::Client, prefix: &str) -> TestNamespace {
    let name = unique_name(prefix);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating test namespace {name}: {e}"));
    TestNamespace {
        name,
        client: client.clone(),
    }
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
