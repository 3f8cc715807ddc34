//! A second kube-apiserver of the test bed (same etcd, same certificates, its own port) with
//! extra admission plugins, for behaviour only those plugins show.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::Client;

use crate::common::{self, unique_name};
use crate::support::free_port;

/// A kube-apiserver started from `$SIDEGATE_CLUSTER_DIR/kube-apiserver.cmd` on its own port
/// with extra admission plugins; killed when dropped.
pub struct ExtraApiserver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ExtraApiserver {
    /// Starts one with `plugins` (comma-separated) enabled besides the test bed's; `None`
    /// outside `tests/cluster/with-cluster`.
    pub fn start(plugins: &str) -> Option<ExtraApiserver> {
        let Ok(dir) = std::env::var("SIDEGATE_CLUSTER_DIR") else {
            assert!(
                !common::in_ci(),
                "SIDEGATE_CLUSTER_DIR not set: run under tests/cluster/with-cluster"
            );
            eprintln!(
                "SKIPPED: SIDEGATE_CLUSTER_DIR not set (run under tests/cluster/with-cluster)"
            );
            return None;
        };
        let cmd = std::fs::read(PathBuf::from(&dir).join("kube-apiserver.cmd"))
            .expect("the test bed's kube-apiserver.cmd");
        let mut words: Vec<String> = cmd
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let bin = words.remove(0);
        let port = free_port();
        let mut plugins_set = false;
        for w in &mut words {
            if w.starts_with("--secure-port=") {
                *w = format!("--secure-port={port}");
            } else if let Some(enabled) = w.strip_prefix("--enable-admission-plugins=") {
                *w = format!("--enable-admission-plugins={enabled},{plugins}");
                plugins_set = true;
            }
        }
        if !plugins_set {
            words.push(format!("--enable-admission-plugins={plugins}"));
        }
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("sg-apiserver")));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .args(&words)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("a second kube-apiserver starts");
        Some(ExtraApiserver { child, port, log })
    }

    /// A client of this apiserver, as `impersonate` if given, once it answers that user (within
    /// 120 s: it starts in seconds, but the test bed's machines are small).
    pub async fn client(&self, impersonate: Option<&str>) -> Client {
        let mut config = kube::Config::infer().await.expect("kubeconfig");
        config.cluster_url = format!("https://127.0.0.1:{}", self.port)
            .parse()
            .expect("url");
        config.auth_info.impersonate = impersonate.map(str::to_owned);
        let client = Client::try_from(config).expect("client");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while client.apiserver_version().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second kube-apiserver did not answer within 120 s; its log ends:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        client
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ExtraApiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
