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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use rcgen::{CertificateParams, KeyPair};

use common::{cluster_client, create_test_namespace, eventually, unique_name};
use support::*;

const DRAIN: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One operator process, killed (by its pid) if the test ends before it exits.
struct Replica {
    name: &'static str,
    child: Child,
    admin: u16,
    webhook: u16,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Replica {
    fn start(name: &'static str, dir: &Path, lease_namespace: &str) -> Self {
        let (admin, webhook) = (free_port(), free_port());
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sidegate-operator"))
            .args([
                "run",
                &format!("--admin-addr=127.0.0.1:{admin}"),
                "--webhook-bind=127.0.0.1",
                &format!("--webhook-port={webhook}"),
                "--cert-mode=files",
                &format!("--tls-cert-file={}", dir.join("tls.crt").display()),
                &format!("--tls-key-file={}", dir.join("tls.key").display()),
                &format!("--lease-namespace={lease_namespace}"),
                "--lease-name=shutdown-test",
                &format!("--identity={name}"),
                &format!("--shutdown-drain-secs={}", DRAIN.as_secs()),
                "--log-format=text",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting sidegate-operator");
        Self {
            name,
            child,
            admin,
            webhook,
            log,
        }
    }

    fn readyz(&self) -> Option<String> {
        curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/readyz", self.admin),
        ])
    }

    /// `GET /healthz` on the webhook's TLS listener (the answer, or None when nothing answers).
    fn webhook_healthz(&self) -> Option<String> {
        curl(&[
            "-sk",
            &format!("https://127.0.0.1:{}/healthz", self.webhook),
        ])
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM to {}", self.name);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn curl(args: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["--max-time", "2"])
        .args(args)
        .output()
        .expect("curl runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_certificate(dir: &Path) {
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("tls.key");
}

#[tokio::test]
async fn on_sigterm_leader_and_standby_turn_unready_keep_serving_the_webhook_for_the_drain_then_exit()
 {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await; // the CRDs the operator lists at start
    let ns = create_test_namespace(&client, "shutdown").await;
    let dir = std::env::temp_dir().join(unique_name("sidegate-shutdown-test"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_certificate(&dir);

    let leader = Replica::start("replica-a", &dir, &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually("replica-a holds the Lease", WAIT, || async {
        let lease = leases.get_opt("shutdown-test").await.ok()??;
        (lease.spec?.holder_identity?.as_str() == "replica-a").then_some(())
    })
    .await;
    let standby = Replica::start("replica-b", &dir, &ns.name);
    let replicas = [leader, standby];
    for r in &replicas {
        eventually(&format!("{} ready", r.name), WAIT, || async {
            (r.readyz().as_deref() == Some("200") && r.webhook_healthz().as_deref() == Some("ok\n"))
                .then_some(())
        })
        .await;
    }

    let signalled = Instant::now();
    for r in &replicas {
        r.terminate();
    }
    for r in &replicas {
        eventually(
            &format!("{} unready", r.name),
            Duration::from_secs(2),
            || async { (r.readyz().as_deref() == Some("503")).then_some(()) },
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
            r.name,
            signalled.elapsed(),
            r.log()
        );
    }
    for mut r in replicas {
        let status = eventually(&format!("{} exits", r.name), DRAIN + WAIT, || {
            let done = r.child.try_wait().expect("try_wait");
            async move { done }
        })
        .await;
        let after = signalled.elapsed();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            r.name,
            r.log()
        );
        assert!(
            after >= DRAIN - Duration::from_millis(300),
            "{} exited {after:?} after SIGTERM, before the {DRAIN:?} drain",
            r.name
        );
        assert!(r.webhook_healthz().is_none(), "{} still answers", r.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
    ns.delete().await;
}
