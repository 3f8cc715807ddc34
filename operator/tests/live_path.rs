//! End to end, the live path of a key rotation on a real kube-apiserver (`tests/cluster/`):
//!
//! `kubectl apply` (AIGateway, ProviderKey, key Secret) → the operator (in this process, as its
//! ServiceAccount) renders ConfigMap `sidegate-<gw>` and Secret `sidegate-<gw>-keys` → a test
//! "kubelet" copies them into two directories exactly as kubelet's atomic writer does → a real
//! `sidegate` process (started first, `--wait-for-config`, like a pod whose volumes are still
//! empty) serves requests to a real `mock-provider` with the key → `kubectl apply` of a new key
//! value under load → the sidecar uses the new key with zero failed requests.
//!
//! ```text
//! cargo build -p sidegate -p sidegate-mock-provider
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test live_path -- --nocapture
//! ```
//!
//! The test kubelet syncs as soon as the apiserver has the change (a 50 ms poll) instead of
//! kubelet's sync period (up to a minute plus its cache TTL), so the reported time is the
//! system's own latency: apiserver → operator → apiserver → files → sidecar.

mod common;
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;

use common::{cluster_client, create_test_namespace, eventually};
use support::repo_root;

/// Every key in this test carries the marker `tests/scan-logs` looks for in logs.
const OLD_KEY: &str = "sk-sgtestkey-live-old";
const NEW_KEY: &str = "sk-sgtestkey-live-rotated";
const GATEWAY: &str = "live";

type Http = HttpClient<HttpConnector, Full<Bytes>>;

/// A child process killed when dropped.
struct Process {
    name: &'static str,
    child: std::sync::Mutex<Child>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Process {
    fn new(name: &'static str, child: Child) -> Self {
        Self {
            name,
            child: std::sync::Mutex::new(child),
        }
    }

    fn assert_running(&self) {
        let status = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_wait();
        if let Ok(Some(status)) = status {
            panic!("{} exited early with {status}; see its log", self.name);
        }
    }
}

/// A workspace binary built by `cargo build` (the test can name only its own crate's binaries
/// with `CARGO_BIN_EXE_*`).
fn workspace_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first with `cargo build -p sidegate -p sidegate-mock-provider` \
         (./test.sh builds every binary before the tests)",
        path.display()
    );
    path
}

/// Log file for a child process: in $SIDEGATE_TEST_LOG_DIR when set (so `tests/scan-logs`
/// proves no key reached a log), else in `dir`.
fn log_file(dir: &Path, name: &str) -> (std::fs::File, PathBuf) {
    let base = std::env::var_os("SIDEGATE_TEST_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.to_path_buf());
    let _ = std::fs::create_dir_all(&base);
    let path = base.join(format!("live-path-{name}-{}.log", std::process::id()));
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("creating log {}: {e}", path.display()));
    (file, path)
}

fn start_mock(dir: &Path) -> (Process, String) {
    let (log, _) = log_file(dir, "mock-provider");
    let mut child = Command::new(workspace_binary("mock-provider"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start mock-provider");
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("mock-provider did not start: {line:?}"))
        .to_owned();
    (Process::new("mock-provider", child), addr)
}

/// Runs the built `kubectl` (first on PATH under with-cluster) with `stdin` as input.
fn kubectl_apply(namespace: &str, yaml: &str) {
    let mut child = Command::new("kubectl")
        .args(["apply", "--server-side", "-n", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl (is the test bed's bin dir on PATH?)");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(yaml.as_bytes())
            .expect("write kubectl stdin");
    }
    let out = child.wait_with_output().expect("kubectl finished");
    assert!(
        out.status.success(),
        "kubectl apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key_secret_yaml(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: llm-keys\nstringData:\n  openai: {value}\n"
    )
}

/// Kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go), step for step: the payload goes
/// into a new hidden timestamped directory; `..data_tmp` is pointed at it and renamed over
/// `..data` (the one atomic step); each visible file is a symlink `<name> → ..data/<name>`,
/// created when new; visible names no longer in the payload are removed; the old timestamped
/// directory is deleted last.
mod kubelet {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;
    use std::path::Path;
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn write(dir: &Path, payload: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join("..data");
        let old = std::fs::read_link(&data).ok();

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Kubelet: os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05.")).
        let stamp = format!("..{}.{:09}", now.as_secs(), now.subsec_nanos());
        let ts_dir = dir.join(&stamp);
        std::fs::create_dir(&ts_dir)?;
        for (name, bytes) in payload {
            std::fs::write(ts_dir.join(name), bytes)?;
        }

        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&stamp, &tmp)?;
        std::fs::rename(&tmp, &data)?;

        for name in payload.keys() {
            let visible = dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible)?;
            }
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !payload.contains_key(&name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(dir.join(old))?;
        }
        Ok(())
    }
}

/// When the test kubelet wrote each version of the keys Secret.
#[derive(Default)]
struct SyncLog {
    /// resourceVersion of the keys Secret → when its files were swapped in.
    keys_written: std::sync::Mutex<BTreeMap<String, Instant>>,
}

/// Polls the apiserver every 50 ms and writes changed ConfigMap/Secret payloads to the dirs.
async fn run_kubelet(
    client: kube::Client,
    namespace: String,
    config_dir: PathBuf,
    keys_dir: PathBuf,
    log: Arc<SyncLog>,
    stop: Arc<AtomicBool>,
) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let (mut cm_version, mut secret_version) = (String::new(), String::new());
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(cm)) = cms.get_opt(&format!("sidegate-{GATEWAY}")).await {
            let rv = cm.metadata.resource_version.clone().unwrap_or_default();
            if rv != cm_version {
                let payload = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                kubelet::write(&config_dir, &payload).expect("kubelet writes the config volume");
                cm_version = rv;
            }
        }
        if let Ok(Some(s)) = secrets.get_opt(&format!("sidegate-{GATEWAY}-keys")).await {
            let rv = s.metadata.resource_version.clone().unwrap_or_default();
            if rv != secret_version {
                let payload = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                kubelet::write(&keys_dir, &payload).expect("kubelet writes the keys volume");
                log.keys_written
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(rv.clone(), Instant::now());
                secret_version = rv;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_json(http: &Http, url: &str) -> Option<serde_json::Value> {
    let resp = http.get(url.parse().ok()?).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

async fn status_of(http: &Http, url: &str) -> Option<u16> {
    Some(http.get(url.parse().ok()?).await.ok()?.status().as_u16())
}

/// The authorization header of the mock's most recent request.
async fn last_auth(http: &Http, mock: &str) -> Option<String> {
    let records = get_json(http, &format!("http://{mock}/__mock/requests")).await?;
    records
        .as_array()?
        .last()?
        .get("headers")?
        .get("authorization")?
        .as_str()
        .map(str::to_owned)
}

async fn chat(http: &Http, gateway: &str) -> Result<(), String> {
    let req = hyper::Request::post(format!("http://{gateway}/openai/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sidegate-managed")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}]}"#,
        )))
        .map_err(|e| e.to_string())?;
    let resp = http.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotated_with_kubectl_reaches_the_running_sidecar_without_a_failed_request() {
    let Some(client) = cluster_client().await else {
        return;
    };
    support::operator(&client).await;
    let ns = create_test_namespace(&client, "live-path").await;
    let work = std::env::temp_dir().join(format!("sidegate-live-path-{}", ns.name));
    let config_dir = work.join("config");
    let keys_dir = work.join("keys");
    // Kubelet creates the (still empty) volume directories before the containers start.
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::create_dir_all(&keys_dir).expect("keys dir");

    let (mock, mock_addr) = start_mock(&work);
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();

    // The sidecar starts first, on empty volumes, as in a pod scheduled before the render.
    let port = free_port();
    let admin_port = free_port();
    let gateway_addr = format!("127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let (log, sidecar_log) = log_file(&work, "sidegate");
    let sidecar = Process::new(
        "sidegate",
        Command::new(workspace_binary("sidegate"))
            .arg("--config")
            .arg(config_dir.join("gateway.yaml"))
            .arg("--keys-dir")
            .arg(&keys_dir)
            .args(["--listen", &gateway_addr])
            .args(["--admin", &format!("127.0.0.1:{admin_port}")])
            .arg("--wait-for-config")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start sidegate"),
    );
    let readyz = format!("{admin}/readyz");
    eventually(
        "sidegate to listen (unready)",
        Duration::from_secs(15),
        || async {
            sidecar.assert_running();
            status_of(&http, &readyz).await
        },
    )
    .await;
    assert_ne!(
        status_of(&http, &readyz).await,
        Some(200),
        "no config yet: not ready"
    );

    // The test kubelet, syncing as soon as the apiserver changes.
    let stop = Arc::new(AtomicBool::new(false));
    let sync_log = Arc::new(SyncLog::default());
    let kubelet_task = tokio::spawn(run_kubelet(
        client.clone(),
        ns.name.clone(),
        config_dir.clone(),
        keys_dir.clone(),
        sync_log.clone(),
        stop.clone(),
    ));

    // kubectl apply: the key Secret, a ProviderKey, the AIGateway pointing OpenAI at the mock.
    let applied_at = Instant::now();
    kubectl_apply(
        &ns.name,
        &format!(
            "{}---\n\
             apiVersion: sidegate.dev/v1alpha1\nkind: ProviderKey\nmetadata:\n  name: openai\n\
             spec:\n  provider: openai\n  secretRef: {{name: llm-keys, key: openai}}\n---\n\
             apiVersion: sidegate.dev/v1alpha1\nkind: AIGateway\nmetadata:\n  name: {GATEWAY}\n\
             spec:\n  providers:\n    openai: {{baseURL: 'http://{mock_addr}/v1'}}\n",
            key_secret_yaml(OLD_KEY)
        ),
    );
    eventually(
        "the rendered config to reach the sidecar (/readyz 200)",
        Duration::from_secs(30),
        || async {
            sidecar.assert_running();
            (status_of(&http, &readyz).await == Some(200)).then_some(())
        },
    )
    .await;
    let first_ready = applied_at.elapsed();
    chat(&http, &gateway_addr)
        .await
        .expect("a request through the sidecar");
    assert_eq!(
        last_auth(&http, &mock_addr).await.as_deref(),
        Some(format!("Bearer {OLD_KEY}").as_str()),
        "the stored key replaces the app's placeholder"
    );

    // Load: 4 clients in a loop for the whole rotation.
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load_stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, gateway_addr) = (http.clone(), gateway_addr.clone());
        let (sent, failures, load_stop) = (sent.clone(), failures.clone(), load_stop.clone());
        load.push(tokio::spawn(async move {
            while !load_stop.load(Ordering::Relaxed) {
                if let Err(e) = chat(&http, &gateway_addr).await {
                    failures
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(e);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Rotate with kubectl, under load.
    let keys_secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let rendered_before = keys_secrets
        .get(&format!("sidegate-{GATEWAY}-keys"))
        .await
        .expect("keys Secret")
        .metadata
        .resource_version
        .unwrap_or_default();
    let rotated_at = Instant::now();
    kubectl_apply(&ns.name, &key_secret_yaml(NEW_KEY));
    let kubectl_done = rotated_at.elapsed();
    let new_auth = format!("Bearer {NEW_KEY}");
    let new_key_in_use = eventually(
        "the sidecar to send the new key",
        Duration::from_secs(30),
        || {
            let (http, mock_addr, new_auth) = (http.clone(), mock_addr.clone(), new_auth.clone());
            async move {
                (last_auth(&http, &mock_addr).await.as_deref() == Some(new_auth.as_str()))
                    .then(|| rotated_at.elapsed())
            }
        },
    )
    .await;
    let files_swapped = sync_log
        .keys_written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|(rv, _)| **rv != rendered_before)
        .map(|(_, at)| at.saturating_duration_since(rotated_at))
        .min();

    // Keep the load on a little longer: no request may fail and none may go back to the old key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    load_stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let recent = get_json(&http, &format!("http://{mock_addr}/__mock/requests"))
        .await
        .expect("mock records");
    let tail: Vec<&str> = recent
        .as_array()
        .expect("array")
        .iter()
        .rev()
        .take(20)
        .filter_map(|r| r.get("headers")?.get("authorization")?.as_str())
        .collect();
    assert!(
        tail.iter().all(|a| *a == new_auth),
        "requests after the rotation used the old key: {} of the last {}",
        tail.iter().filter(|a| **a != new_auth).count(),
        tail.len()
    );

    stop.store(true, Ordering::Relaxed);
    let _ = kubelet_task.await;
    sidecar.assert_running();
    mock.assert_running();
    drop(sidecar);
    drop(mock);

    let failures = failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let sent = sent.load(Ordering::Relaxed);
    let logs = std::fs::read_to_string(&sidecar_log).unwrap_or_default();
    assert!(
        !logs.contains(OLD_KEY) && !logs.contains(NEW_KEY),
        "a key reached the sidecar's log"
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during the rotation: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent > 20, "the load did not run ({sent} requests)");
    let _ = writeln!(
        std::io::stderr(),
        "live path: kubectl apply → sidecar ready {} ms; key rotation: kubectl apply returned after {} ms, \
         files swapped by the test kubelet after {} ms, new key in use after {} ms \
         (kubelet sync period excluded); {sent} requests, 0 failed",
        first_ready.as_millis(),
        kubectl_done.as_millis(),
        files_swapped.map_or_else(|| "?".to_owned(), |d| d.as_millis().to_string()),
        new_key_in_use.as_millis(),
    );

    let _ = std::fs::remove_dir_all(&work);
    ns.delete().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
