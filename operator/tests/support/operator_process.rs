//! `sidegate-operator run` as a child process of the test, as a pod runs it: its admin and webhook
//! listeners on free loopback ports, a certificate from files (or self-managed), its log (text)
//! in a file the test reads, killed when the test lets go of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};

use super::free_port;
use crate::common::{eventually, unique_name};

/// A new directory under the system's temp dir, named `PREFIX-<unique>`.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes a self-signed certificate for 127.0.0.1 to `dir/tls.crt` and `dir/tls.key`, where
/// [`OperatorCommand`] points the webhook.
pub fn write_certificate(dir: &Path) {
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("tls.key");
}

/// How to start one operator process; [`OperatorCommand::spawn`] starts it.
pub struct OperatorCommand {
    dir: PathBuf,
    identity: String,
    args: Vec<String>,
    kubeconfig: Option<PathBuf>,
    self_managed: bool,
    webhook_port: Option<u16>,
}

impl OperatorCommand {
    /// `sidegate-operator run` as `identity` (its leader-election identity), serving the
    /// certificate in `dir` ([`write_certificate`]) and logging to `dir/IDENTITY.log`.
    pub fn new(dir: &Path, identity: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            identity: identity.to_owned(),
            args: Vec::new(),
            kubeconfig: None,
            self_managed: false,
            webhook_port: None,
        }
    }

    /// The process acts as `user` (impersonated, as the test's `$KUBECONFIG` allows its admin):
    /// a copy of that kubeconfig saying so, written to the process's directory.
    pub fn impersonating(self, user: &str) -> Self {
        let from = std::env::var("KUBECONFIG").expect("KUBECONFIG (the test bed's)");
        let mut config = kube::config::Kubeconfig::read_from(&from).expect("the test's kubeconfig");
        for named in &mut config.auth_infos {
            if let Some(auth) = named.auth_info.as_mut() {
                auth.impersonate = Some(user.to_owned());
            }
        }
        let path = self.dir.join(format!("{}.kubeconfig", self.identity));
        // JSON is YAML: what kubeconfig readers take.
        std::fs::write(&path, serde_json::to_vec(&config).expect("kubeconfig JSON"))
            .expect("kubeconfig written");
        self.kubeconfig(&path)
    }

    /// A self-managed webhook certificate (`--cert-mode=self-managed`, the default) instead of
    /// the files in `dir`: the flags of its Secret and `caBundle` are the test's to give.
    pub fn self_managed_certificate(mut self) -> Self {
        self.self_managed = true;
        self
    }

    /// The webhook listens on `port` (a [`free_port`] the test registers beforehand).
    pub fn webhook_port(mut self, port: u16) -> Self {
        self.webhook_port = Some(port);
        self
    }

    /// One more flag of `sidegate-operator run`, e.g. `--lease-name=NAME`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The kubeconfig the process uses instead of the test's `$KUBECONFIG`.
    pub fn kubeconfig(mut self, path: &Path) -> Self {
        self.kubeconfig = Some(path.to_owned());
        self
    }

    /// Starts the process, its admin and webhook listeners on free loopback ports.
    pub fn spawn(self) -> OperatorProcess {
        let admin = free_port();
        let webhook = self.webhook_port.unwrap_or_else(free_port);
        let log = self.dir.join(format!("{}.log", self.identity));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidegate-operator"));
        command.args([
            "run".to_owned(),
            format!("--admin-addr=127.0.0.1:{admin}"),
            "--webhook-bind=127.0.0.1".to_owned(),
            format!("--webhook-port={webhook}"),
            format!("--identity={}", self.identity),
            "--log-format=text".to_owned(),
        ]);
        if !self.self_managed {
            command.args([
                "--cert-mode=files".to_owned(),
                format!("--tls-cert-file={}", self.dir.join("tls.crt").display()),
                format!("--tls-key-file={}", self.dir.join("tls.key").display()),
            ]);
        }
        command
            .args(&self.args)
            // The log at the operator's own level, whatever the test runner's RUST_LOG says.
            .env_remove("RUST_LOG")
            // Nor the runner's pod (--pod-name is the test's to give).
            .env_remove("POD_NAME")
            .env_remove("POD_TEMPLATE_HASH")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(kubeconfig) = &self.kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        let child = command.spawn().expect("starting sidegate-operator");
        OperatorProcess {
            identity: self.identity,
            child,
            admin,
            webhook,
            log,
        }
    }
}

/// One operator process, killed (by its pid) if the test ends before it exits.
pub struct OperatorProcess {
    pub identity: String,
    pub child: Child,
    pub admin: u16,
    pub webhook: u16,
    log: PathBuf,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl OperatorProcess {
    /// `GET path` on the admin listener: the status code and the body, or None when nothing
    /// answers.
    pub fn admin_get(&self, path: &str) -> Option<(String, String)> {
        let out = Command::new("curl")
            .args(["--max-time", "2", "-s", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}{path}", self.admin))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        out.status
            .success()
            .then(|| (code.to_owned(), body.to_owned()))
    }

    /// The status code of `GET path` on the admin listener.
    pub fn admin_status(&self, path: &str) -> Option<String> {
        self.admin_get(path).map(|(code, _)| code)
    }

    /// The value of the sample `name` (without labels) in `/metrics`.
    pub fn metric(&self, name: &str) -> Option<String> {
        let (_, body) = self.admin_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    /// `GET /healthz` on the webhook's TLS listener (the answer, or None when nothing answers).
    pub fn webhook_healthz(&self) -> Option<String> {
        let out = Command::new("curl")
            .args(["--max-time", "2", "-sk"])
            .arg(format!("https://127.0.0.1:{}/healthz", self.webhook))
            .output()
            .expect("curl runs");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/readyz` ready and the webhook answering.
    pub fn serving(&self) -> bool {
        self.admin_status("/readyz").as_deref() == Some("200")
            && self.webhook_healthz().as_deref() == Some("ok\n")
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM, as the kubelet does to stop a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM to {}", self.identity);
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the operator exited ({status}) {when}; its log:\n{}",
                self.log()
            );
        }
    }

    /// Waits until `check` holds (polled every 200 ms), panicking with the log if the process
    /// exits meanwhile or `timeout` passes.
    pub async fn wait_for(&mut self, what: &str, timeout: Duration, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_running(&format!("while waiting for {what}"));
            if check(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the operator's log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits up to `timeout` for the process to exit, and returns how it did.
    pub async fn exit_status(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} exits", self.identity);
        eventually(&what, timeout, || {
            let done = self.child.try_wait().expect("try_wait");
            async move { done }
        })
        .await
    }
}
