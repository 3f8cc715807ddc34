//! `sidegate-operator run` as a real process on SIGTERM, in both roles of leader election: the
//! pod turns unready at once, its webhook keeps answering for the drain period, then it exits
//! (a replica that vanished at once, or dropped its webhook with the controllers, would fail the
//! admissions still routed to it; with `failurePolicy: Ignore` those pods start without the
//! sidecar).
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_shutdown
//! ```

mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

use common::{cluster_client, create_test_namespace, eventually};
use support::operator_process::{OperatorCommand, OperatorProcess, temp_dir, write_certificate};
use support::*;

const DRAIN: Duration = Duration::from_secs(3);

/// A replica as `identity`, in leader election for the Lease `shutdown-test` in
/// `lease_namespace`, draining for [`DRAIN`] on SIGTERM.
fn start_replica(identity: &str, dir: &Path, lease_namespace: &str) -> OperatorProcess {
    OperatorCommand::new(dir, identity)
        .arg(format!("--lease-namespace={lease_namespace}"))
        .arg("--lease-name=shutdown-test")
        .arg(format!("--shutdown-drain-secs={}", DRAIN.as_secs()))
        .spawn()
}

#[tokio::test]
async fn on_sigterm_leader_and_standby_turn_unready_keep_serving_the_webhook_for_the_drain_then_exit()
 {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await; // the CRDs the operator lists at start
    let ns = create_test_namespace(&client, "shutdown").await;
    let dir = temp_dir("sidegate-shutdown-test");
    write_certificate(&dir);

    let leader = start_replica("replica-a", &dir, &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually("replica-a holds the Lease", WAIT, || async {
        let lease = leases.get_opt("shutdown-test").await.ok()??;
        (lease.spec?.holder_identity?.as_str() == "replica-a").then_some(())
    })
    .await;
    let standby = start_replica("replica-b", &dir, &ns.name);
    let replicas = [leader, standby];
    for r in &replicas {
        eventually(&format!("{} ready", r.identity), WAIT, || async {
            r.serving().then_some(())
        })
        .await;
    }

    let signalled = Instant::now();
    for r in &replicas {
        r.terminate();
    }
    for r in &replicas {
        eventually(
            &format!("{} unready", r.identity),
            Duration::from_secs(2),
            || async { (r.admin_status("/readyz").as_deref() == Some("503")).then_some(()) },
        )
        .await;
    }
    // Well into the drain, and after the leader's controllers stopped: admissions are answered.
    tokio::time::sleep_until((signalled + DRAIN / 2).into()).await;
    for r in &replicas {
        assert_eq!(
            r.webhook_healthz().as_deref(),
            Some("ok\n"),
            "{} stopped answering admissions {:?} after SIGTERM:\n{}",
            r.identity,
            signalled.elapsed(),
            r.log()
        );
    }
    for mut r in replicas {
        let status = r.exit_status(DRAIN + WAIT).await;
        let after = signalled.elapsed();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            r.identity,
            r.log()
        );
        assert!(
            after >= DRAIN - Duration::from_millis(300),
            "{} exited {after:?} after SIGTERM, before the {DRAIN:?} drain",
            r.identity
        );
        assert!(
            r.webhook_healthz().is_none(),
            "{} still answers",
            r.identity
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}
