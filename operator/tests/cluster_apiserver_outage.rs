//! `sidegate-operator run` as a real process whose way to the apiserver goes through a gate the
//! test opens and closes (a TCP relay: closed, it cuts every connection and answers new ones with
//! a close, as a load balancer without a backend does). The operator waits for an apiserver that
//! is away at start instead of exiting into a growing CrashLoopBackOff, and a leader that loses
//! its Lease (taken over, or not renewed while the apiserver is away) stops its controllers,
//! stands by, and leads again, while its webhook keeps answering and `/readyz` stays ready.
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_apiserver_outage
//! ```

mod common;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::{cluster_client, create_test_namespace, eventually};
use support::operator_process::{OperatorCommand, OperatorProcess, temp_dir, write_certificate};
use support::*;

/// The operator's Lease duration: renewals every second, given up after 3 s without one.
const LEASE_SECS: u64 = 4;

/// A TCP relay to the apiserver that the test opens and closes.
struct ApiserverGate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl ApiserverGate {
    /// A relay to `upstream`, open or closed.
    async fn start(upstream: SocketAddr, open: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (tx, rx) = watch::channel(open);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !*rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut closed = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = closed.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Self { addr, open: tx }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// Cuts every relayed connection and refuses new ones until [`Self::open`].
    fn close(&self) {
        self.open.send_replace(false);
    }
}

/// A copy of `$KUBECONFIG` whose server is `gate`.
async fn kubeconfig_through(gate: &ApiserverGate, dir: &Path) -> PathBuf {
    kubeconfig_as(gate, dir, None).await
}

/// A copy of `$KUBECONFIG` whose server is `gate`, impersonating `user` if given.
async fn kubeconfig_as(gate: &ApiserverGate, dir: &Path, user: Option<&str>) -> PathBuf {
    let config = kube::Config::infer().await.expect("kubeconfig");
    let server = config.cluster_url.to_string();
    let server = server.trim_end_matches('/');
    let original =
        std::fs::read_to_string(std::env::var("KUBECONFIG").expect("KUBECONFIG")).expect("read");
    assert!(original.contains(server), "{server} not in the kubeconfig");
    let mut config = original.replace(server, &format!("https://{}", gate.addr));
    if let Some(user) = user {
        // kubectl writes one user, as `  user:` followed by its fields.
        assert_eq!(config.matches("\n  user:\n").count(), 1, "{config}");
        config = config.replace("\n  user:\n", &format!("\n  user:\n    as: {user}\n"));
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, config).expect("write kubeconfig");
    path
}

/// The apiserver's address in `$KUBECONFIG`.
async fn apiserver_addr() -> SocketAddr {
    let config = kube::Config::infer().await.expect("kubeconfig");
    let host = config.cluster_url.host().expect("host");
    let port = config.cluster_url.port_u16().expect("port");
    tokio::net::lookup_host((host, port))
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

/// `sidegate-operator run` with `kubeconfig` as `LEASE-replica`, serving namespace `ns` only
/// and taking the Lease `lease` there.
fn start_operator(dir: &Path, kubeconfig: &Path, ns: &str, lease: &str) -> OperatorProcess {
    write_certificate(dir);
    OperatorCommand::new(dir, &format!("{lease}-replica"))
        .kubeconfig(kubeconfig)
        .arg(format!("--watch-namespace={ns}"))
        .arg(format!("--lease-namespace={ns}"))
        .arg(format!("--lease-name={lease}"))
        .arg(format!("--lease-duration-secs={LEASE_SECS}"))
        .spawn()
}

/// Ready and answering admissions, and leading or standing by as its
/// `sidegate_operator_leader` gauge says.
fn serving_and_leading(operator: &OperatorProcess, leading: bool) -> bool {
    let gauge = if leading { "1" } else { "0" };
    operator.serving() && operator.metric("sidegate_operator_leader").as_deref() == Some(gauge)
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_started_while_the_apiserver_is_away_waits_for_it_and_becomes_ready_without_exiting()
 {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "outage-start").await;
    let dir = temp_dir("sidegate-outage-start");
    let gate = ApiserverGate::start(apiserver_addr().await, false).await;
    let kubeconfig = kubeconfig_through(&gate, &dir).await;
    let mut operator = start_operator(&dir, &kubeconfig, &ns.name, "outage-start");

    // Attempts at about 0, 1 and 3 s: the third failure is logged before 5 s.
    operator
        .wait_for(
            "the third failed start-up attempt in the log",
            Duration::from_secs(15),
            |o| o.log().contains("attempt 3 failed"),
        )
        .await;
    assert_eq!(operator.admin_status("/healthz").as_deref(), Some("200"));
    assert_eq!(
        operator.admin_status("/readyz").as_deref(),
        Some("503"),
        "ready before the apiserver was reached"
    );
    let log = operator.log();
    let line = log
        .lines()
        .find(|l| l.contains("attempt 1 failed"))
        .expect("the first attempt's line");
    assert!(
        line.contains("listing AIGateways in namespace") && line.contains("retrying in 1s"),
        "{line}"
    );

    gate.open();
    operator
        .wait_for(
            "ready, leading and answering admissions",
            Duration::from_secs(30),
            |o| serving_and_leading(o, true),
        )
        .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        holder(&leases, "outage-start").await.as_deref(),
        Some(operator.identity.as_str())
    );
    operator.assert_running("after becoming ready");
    drop(operator);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_lease_stops_its_controllers_stands_by_and_leads_again_without_exiting()
 {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "outage-lease").await;
    let dir = temp_dir("sidegate-outage-lease");
    let gate = ApiserverGate::start(apiserver_addr().await, true).await;
    let kubeconfig = kubeconfig_through(&gate, &dir).await;
    let lease = "outage-lease";
    let mut operator = start_operator(&dir, &kubeconfig, &ns.name, lease);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    operator
        .wait_for("ready and leading", WAIT, |o| serving_and_leading(o, true))
        .await;
    assert_eq!(
        holder(&leases, lease).await.as_deref(),
        Some(operator.identity.as_str())
    );

    // Another holder takes the Lease (and never renews it).
    eventually("the Lease taken by another holder", WAIT, || async {
        let mut taken = leases.get(lease).await.ok()?;
        let spec = taken.spec.as_mut()?;
        spec.holder_identity = Some("intruder".into());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(i32::try_from(LEASE_SECS).ok()?);
        leases
            .replace(lease, &PostParams::default(), &taken)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    operator
        .wait_for(
            "the controllers stopped, standing by, still serving the webhook",
            Duration::from_secs(10),
            |o| serving_and_leading(o, false),
        )
        .await;
    assert!(
        operator.log().contains("leadership lost"),
        "{}",
        operator.log()
    );
    // The intruder's Lease lapses (its duration unrenewed, on the operator's clock).
    operator
        .wait_for(
            "leading again once the taken Lease lapsed",
            Duration::from_secs(LEASE_SECS * 4),
            |o| serving_and_leading(o, true),
        )
        .await;
    assert_eq!(
        holder(&leases, lease).await.as_deref(),
        Some(operator.identity.as_str())
    );
    // The controllers of the new term reconcile.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-test")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(&gateways, &gateway("after-takeover", json!({}))).await;
    wait_ready(&gateways, "after-takeover").await;

    // The apiserver away for longer than the Lease: renewals fail, leadership is given up.
    let losses = operator.log().matches("leadership lost").count();
    gate.close();
    operator
        .wait_for(
            "leadership given up while the apiserver is away, the webhook still serving",
            Duration::from_secs(LEASE_SECS * 3),
            |o| {
                o.log().matches("leadership lost").count() > losses && serving_and_leading(o, false)
            },
        )
        .await;
    gate.open();
    let renewed_before = leases
        .get(lease)
        .await
        .ok()
        .and_then(|l| l.spec?.renew_time);
    operator
        .wait_for(
            "leading again once the apiserver is back",
            Duration::from_secs(30),
            |o| serving_and_leading(o, true),
        )
        .await;
    eventually("the Lease renewed by the operator", WAIT, || async {
        let spec = leases.get(lease).await.ok()?.spec?;
        (spec.holder_identity.as_deref() == Some(operator.identity.as_str())
            && spec.renew_time != renewed_before)
            .then_some(())
    })
    .await;
    operator.assert_running("after leading again");
    drop(operator);
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_refused_by_rbac_exits_with_one_clear_line_once_the_refusal_lasts() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let ns = create_test_namespace(&client, "outage-refused").await;
    let dir = temp_dir("sidegate-outage-refused");
    let gate = ApiserverGate::start(apiserver_addr().await, true).await;
    let nobody = format!("system:serviceaccount:{}:nobody", ns.name);
    let kubeconfig = kubeconfig_as(&gate, &dir, Some(&nobody)).await;
    let mut operator = start_operator(&dir, &kubeconfig, &ns.name, "outage-refused");

    // Refusals at about 0, 1, 3, 7 and 15 s: believed at the fifth.
    let status = operator.exit_status(Duration::from_secs(40)).await;
    assert!(!status.success(), "{status}");
    let log = operator.log();
    assert_eq!(
        log.matches("attempt").count(),
        4,
        "four retried refusals:\n{log}"
    );
    let last = log.lines().last().expect("a last line");
    assert!(
        last.contains("sidegate-operator stopped")
            && last.contains("refused 5 times in a row")
            && last.contains("RBAC does not grant it to this operator")
            && last.contains("forbidden"),
        "{last}"
    );
    eprintln!("the operator's last line: {last}");
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}
