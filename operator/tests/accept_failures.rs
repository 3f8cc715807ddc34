//! An operator process out of file descriptors: its listeners pause between failed `accept`s,
//! say so in the log at most every 10 s with a count, count them in `/metrics`, and serve again
//! once descriptors are free. No cluster: the admin listener serves while the process waits for
//! an apiserver that is away.
//!
//! ```text
//! cargo test -p sidegate-operator --test accept_failures
//! ```

mod common;
mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::free_port;
use support::operator_process::{OperatorCommand, OperatorProcess, temp_dir, write_certificate};

/// A kubeconfig naming an apiserver nobody serves: the process keeps waiting for it.
fn kubeconfig_of_an_absent_apiserver(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("away.kubeconfig");
    let config = format!(
        r#"{{"apiVersion": "v1", "kind": "Config",
  "clusters": [{{"name": "away", "cluster": {{"server": "https://127.0.0.1:{}", "insecure-skip-tls-verify": true}}}}],
  "users": [{{"name": "away", "user": {{"token": "none"}}}}],
  "contexts": [{{"name": "away", "context": {{"cluster": "away", "user": "away", "namespace": "default"}}}}],
  "current-context": "away"}}"#,
        free_port()
    );
    std::fs::write(&path, config).expect("kubeconfig written");
    path
}

/// The descriptors `pid` has open now.
fn open_descriptors(pid: u32) -> u64 {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd (Linux)");
    u64::try_from(fds.count()).expect("count")
}

/// The soft open-file limit of `pid`.
fn open_files_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/PID/limits");
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the open-file limit")
        .to_owned()
}

/// Sets the soft open-file limit of running process `pid` (the hard one stays, so that it can
/// be raised again).
fn limit_open_files(pid: u32, limit: impl std::fmt::Display) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit --nofile={limit}");
}

/// The value of `sidegate_operator_accept_failures_total{listener="admin"}`.
fn admin_accept_failures(r: &OperatorProcess) -> Option<u64> {
    r.metric("sidegate_operator_accept_failures_total{listener=\"admin\"}")?
        .parse()
        .ok()
}

#[tokio::test]
async fn an_operator_out_of_descriptors_pauses_logs_at_a_bounded_rate_counts_and_recovers() {
    let dir = temp_dir("sidegate-accept-failures");
    write_certificate(&dir);
    let kubeconfig = kubeconfig_of_an_absent_apiserver(&dir);
    let mut r = OperatorCommand::new(&dir, "fd-starved")
        .kubeconfig(&kubeconfig)
        .spawn();
    r.wait_for("the admin listener", Duration::from_secs(30), |r| {
        r.admin_status("/healthz").as_deref() == Some("200")
    })
    .await;
    assert_eq!(admin_accept_failures(&r), Some(0), "{}", r.log());

    // A few descriptors to spare, then connections held open until `accept` fails: the kernel
    // queues the rest in the listener's backlog.
    let pid = r.child.id();
    let unstarved = open_files_limit(pid);
    limit_open_files(pid, open_descriptors(pid) + 4);
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(("127.0.0.1", r.admin)).expect("connect (backlog)"));
    }
    let starved = Instant::now();
    // ~5 s of failures: 5 ms doubling to 1 s between retries is about ten of them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    r.assert_running("out of descriptors");
    let lines = r.log().matches("accept failed").count();
    let elapsed = starved.elapsed().as_secs();
    assert!(
        (1..=1 + elapsed / 10).contains(&(lines as u64)),
        "{lines} lines in {elapsed} s; the log:\n{}",
        r.log()
    );

    // Descriptors free again: served, and the failures were counted, more than were said.
    drop(held);
    limit_open_files(pid, &unstarved);
    r.wait_for("the admin listener again", Duration::from_secs(10), |r| {
        r.admin_status("/healthz").as_deref() == Some("200")
    })
    .await;
    let counted = admin_accept_failures(&r).expect("the counter in /metrics");
    assert!(
        counted >= 5 && counted > lines as u64,
        "{counted} failures counted, {lines} said"
    );
    let log = r.log();
    let said = log
        .lines()
        .find(|l| l.contains("accept failed"))
        .expect("said");
    assert!(
        said.contains("listener=\"admin\"") || said.contains("listener=admin"),
        "{said}"
    );
    assert!(said.contains("failures=1"), "{said}");
}
