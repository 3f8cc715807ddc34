//! Lifecycle edges of `sidegate-operator run` as real processes against a real apiserver:
//! leadership changing hands, and flags that must give an error, never a panic.
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test lifecycle_edges
//! ```

mod common;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sidegate_crds::api::AIGateway;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::{cluster_client, create_test_namespace, eventually};
use support::operator_process::{OperatorCommand, OperatorProcess, temp_dir, write_certificate};
use support::*;

/// The samples of `name` (with their labels) in the replica's `/metrics`, e.g.
/// `{reason="SecretNotFound"} 1`.
fn samples(r: &OperatorProcess, name: &str) -> Vec<String> {
    let Some((_, body)) = r.admin_get("/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .map(|rest| rest.trim().to_owned())
        .collect()
}

fn not_ready_count(r: &OperatorProcess, reason: &str) -> Option<String> {
    samples(r, "sidegate_operator_aigateways_not_ready")
        .into_iter()
        .find_map(|s| {
            s.strip_prefix(&format!("{{reason=\"{reason}\"}} "))
                .map(str::to_owned)
        })
}

// FAILS at 9f8bb62: a replica that lost the Lease keeps reporting the gateway gauges of its last term forever (sum by (reason) alerts never clear).
#[tokio::test]
async fn a_replica_that_lost_the_lease_stops_reporting_the_gateway_gauges_of_its_term() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "lease-gauges").await;
    let dir = temp_dir("sidegate-lease-gauges");
    write_certificate(&dir);
    let start = |identity: &str| {
        OperatorCommand::new(&dir, identity)
            .arg(format!("--lease-namespace={}", ns.name))
            .arg("--lease-name=gauges-test")
            .arg(format!("--watch-namespace={}", ns.name))
            .spawn()
    };

    // A gateway whose token Secret is missing: Ready=False, SecretNotFound.
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &gateways,
        &gateway(
            "broken",
            json!({
                "providerKeySelector": {"matchLabels": {"none": "x"}},
                "authentication": {"enabled": true,
                    "tokenSecretRef": {"name": "missing-tokens", "key": "token"}},
            }),
        ),
    )
    .await;

    let mut a = start("replica-a");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually("replica-a holds the Lease", WAIT, || async {
        let lease = leases.get_opt("gauges-test").await.ok()??;
        (lease.spec?.holder_identity?.as_str() == "replica-a").then_some(())
    })
    .await;
    a.wait_for("replica-a reports the not-ready gateway", WAIT, |a| {
        not_ready_count(a, "SecretNotFound").as_deref() == Some("1")
    })
    .await;
    let mut b = start("replica-b");
    b.wait_for("replica-b serving", WAIT, OperatorProcess::serving)
        .await;

    // replica-b takes the Lease over (as after replica-a failed to renew it).
    // A MicroTime as the apiserver takes it (six fractional digits).
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .expect("MicroTime");
    leases
        .patch(
            "gauges-test",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "replica-b", "renewTime": now}})),
        )
        .await
        .expect("patching the Lease");
    a.wait_for("replica-a stands by", WAIT, |a| {
        a.metric("sidegate_operator_leader").as_deref() == Some("0")
    })
    .await;
    b.wait_for("replica-b leads", WAIT, |b| {
        b.metric("sidegate_operator_leader").as_deref() == Some("1")
    })
    .await;

    // The gateway is fixed; the new leader says so.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("missing-tokens", &[("token", "abc")])).await;
    wait_ready(&gateways, "broken").await;
    b.wait_for("replica-b reports no not-ready gateway", WAIT, |b| {
        not_ready_count(b, "SecretNotFound").as_deref() != Some("1")
    })
    .await;

    // The standby must not keep its last term's picture: the chart README says standby replicas
    // report none of these gauges, and its alert `sum by (reason)
    // (sidegate_operator_aigateways_not_ready) > 0` would otherwise fire forever.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.assert_running("after losing the Lease");
    let stale = not_ready_count(&a, "SecretNotFound");
    assert!(
        stale.as_deref().is_none_or(|v| v == "0"),
        "replica-a (standby) still reports sidegate_operator_aigateways_not_ready{{reason=\"SecretNotFound\"}} {stale:?} \
         after the gateway became Ready under replica-b"
    );
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

// FAILS at 9f8bb62: --lease-duration-secs=18446744073709551615 panics (Instant overflow in lease.rs) once the Lease is taken, instead of a clear flag error.
#[tokio::test]
async fn a_huge_lease_duration_is_a_clear_error_not_a_panic() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "lease-huge").await;
    let dir = temp_dir("sidegate-lease-huge");
    write_certificate(&dir);
    let mut r = OperatorCommand::new(&dir, "replica-huge")
        .arg(format!("--lease-namespace={}", ns.name))
        .arg("--lease-name=huge-test")
        .arg(format!("--watch-namespace={}", ns.name))
        .arg("--lease-duration-secs=18446744073709551615")
        .spawn();
    // Either refused at start with a message, or running and leading; never a panic.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let _ = tokio::time::timeout(
        WAIT,
        eventually("the process exits or holds the Lease", WAIT, || {
            let exited = matches!(r.child.try_wait(), Ok(Some(_)));
            let leases = leases.clone();
            async move {
                if exited {
                    return Some(());
                }
                let lease = leases.get_opt("huge-test").await.ok()??;
                (lease.spec?.holder_identity?.as_str() == "replica-huge").then_some(())
            }
        }),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = r.log();
    assert!(!log.contains("panicked"), "the operator panicked:\n{log}");
    if let Some(status) = r.child.try_wait().expect("try_wait") {
        assert_ne!(status.code(), Some(101), "exit code of a panic:\n{log}");
    }
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

/// A TCP relay to the apiserver that the test can freeze: frozen, it keeps every connection open
/// but forwards nothing more, and accepts new ones without forwarding them (an apiserver or a
/// network path that hangs: a half-open connection answers nothing).
struct FreezableRelay {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
}

impl FreezableRelay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut frozen = rx.clone();
                tokio::spawn(async move {
                    if *frozen.borrow() {
                        // Held open, never answered.
                        std::future::pending::<()>().await;
                    }
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let froze = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        r = frozen.wait_for(|f| *f) => r.is_ok(),
                    };
                    if froze {
                        // Both ends stay open; nothing moves any more.
                        let _keep = (client, server);
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Self { addr, frozen: tx }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// A copy of `$KUBECONFIG` whose server is `relay`.
async fn kubeconfig_through(relay: &FreezableRelay, dir: &Path) -> PathBuf {
    let config = kube::Config::infer().await.expect("kubeconfig");
    let server = config.cluster_url.to_string();
    let server = server.trim_end_matches('/');
    let original =
        std::fs::read_to_string(std::env::var("KUBECONFIG").expect("KUBECONFIG")).expect("read");
    assert!(original.contains(server), "{server} not in the kubeconfig");
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        original.replace(server, &format!("https://{}", relay.addr)),
    )
    .expect("write kubeconfig");
    path
}

async fn apiserver_addr() -> SocketAddr {
    let config = kube::Config::infer().await.expect("kubeconfig");
    let host = config.cluster_url.host().expect("host").to_owned();
    let port = config.cluster_url.port_u16().expect("port");
    tokio::net::lookup_host((host, port))
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

// FAILS at 9f8bb62: a leader SIGTERMed while the apiserver hangs never exits within the chart's grace period (drain + 25 s): release() waits on the apiserver unbounded.
#[tokio::test]
async fn a_leader_stopped_while_the_apiserver_hangs_exits_within_the_grace_period() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "stop-hung").await;
    let dir = temp_dir("sidegate-stop-hung");
    write_certificate(&dir);
    let relay = FreezableRelay::start(apiserver_addr().await).await;
    let kubeconfig = kubeconfig_through(&relay, &dir).await;
    const DRAIN: u64 = 3;
    let mut leader = OperatorCommand::new(&dir, "hung-leader")
        .kubeconfig(&kubeconfig)
        .arg(format!("--lease-namespace={}", ns.name))
        .arg("--lease-name=hung-test")
        .arg(format!("--watch-namespace={}", ns.name))
        .arg(format!("--shutdown-drain-secs={DRAIN}"))
        .spawn();
    leader
        .wait_for("leading and serving", WAIT, |r| {
            r.serving() && r.metric("sidegate_operator_leader").as_deref() == Some("1")
        })
        .await;

    relay.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    leader.terminate();
    // The chart's terminationGracePeriodSeconds is shutdownDrainSeconds + 25; past it the
    // kubelet kills the process.
    let grace = Duration::from_secs(DRAIN + 25);
    let exited = tokio::time::timeout(grace, async {
        loop {
            if let Some(status) = leader.child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let log = leader.log();
    assert!(
        exited.is_ok(),
        "still running {:?} after SIGTERM (the kubelet would SIGKILL it now); its log:\n{log}",
        signalled.elapsed()
    );
    drop(leader);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

// FAILS at 9f8bb62: an invalid --lease-name (422 from the apiserver) is retried forever with /readyz ready and no replica ever leading, instead of one clear line and an exit.
#[tokio::test]
async fn an_invalid_lease_name_is_refused_at_start_not_retried_forever() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "lease-name").await;
    let dir = temp_dir("sidegate-lease-name");
    write_certificate(&dir);
    let mut r = OperatorCommand::new(&dir, "bad-lease-name")
        .arg(format!("--lease-namespace={}", ns.name))
        .arg("--lease-name=Bad_Name")
        .arg(format!("--watch-namespace={}", ns.name))
        .spawn();
    // README: the operator exits with one line saying why when waiting cannot help (bad flags,
    // a request the apiserver rejects as invalid).
    let exited = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(status) = r.child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let log = r.log();
    let status = exited.unwrap_or_else(|_| {
        panic!(
            "still running after {WAIT:?} (readyz {:?}, leader {:?}) with a Lease name the apiserver \
             refuses; its log:\n{log}",
            r.admin_status("/readyz"),
            r.metric("sidegate_operator_leader"),
        )
    });
    assert!(!status.success(), "exited with {status}:\n{log}");
    assert!(
        log.contains("Bad_Name"),
        "the error names the Lease:\n{log}"
    );
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}
