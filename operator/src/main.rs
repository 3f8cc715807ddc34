//! `sidegate-operator`: runs the AIGateway and ProviderKey controllers, or prints the CRDs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::api::ListParams;
use sidegate_crds::api::AIGateway;
use sidegate_operator::admin::{self, AdminState};
use sidegate_operator::controller::{self, Context};
use sidegate_operator::lease::{LeaderElector, LeaseSettings};
use sidegate_operator::metrics::Metrics;
use sidegate_operator::scope::Scope;
use sidegate_operator::shutdown::Shutdown;
use sidegate_operator::{crd, owner, providerkey, webhook};

/// The sidegate operator: reconciles AIGateway and ProviderKey resources into a ConfigMap
/// (`sidegate-<gateway>`, file gateway.yaml) and a Secret (`sidegate-<gateway>-keys`, one file per
/// provider key) per gateway, which the sidegate sidecar mounts and reloads live.
#[derive(Parser, Debug)]
#[command(name = "sidegate-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers (uses the in-cluster service account, or $KUBECONFIG / ~/.kube/config).
    Run(RunArgs),
    /// Print the AIGateway and ProviderKey CustomResourceDefinitions as YAML, or write them to a
    /// directory (the committed crds/manifests/ are generated this way).
    Crd {
        /// Write aigateway.yaml and providerkey.yaml into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Address of /healthz, /readyz and /metrics (`[::]` takes IPv4 and IPv6; IPv4 only where
    /// the kernel has no IPv6).
    #[arg(long, env = "SIDEGATE_ADMIN_ADDR", default_value = "[::]:8080")]
    admin_addr: SocketAddr,
    /// Take a coordination.k8s.io Lease before running the controllers, so that only one of
    /// several replicas reconciles; standby replicas stay ready and take over when it lapses, and
    /// a leader that loses it (taken over, or not renewed in time) stops its controllers and
    /// stands by again, its webhook serving throughout.
    #[arg(long, env = "SIDEGATE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The operator's own namespace (defaults to the pod's, $POD_NAMESPACE), not only the
    /// Lease's: the leader Lease is there, the webhook keeps its self-managed certificate Secret
    /// (--webhook-secret) there and names its Service (--webhook-service) in that namespace in
    /// the certificate, and the webhook never injects pods there (nor counts them as lacking the
    /// sidecar).
    #[arg(
        long,
        visible_alias = "operator-namespace",
        env = "POD_NAMESPACE",
        value_name = "NAMESPACE",
        default_value = "sidegate-system"
    )]
    lease_namespace: String,
    /// Name of the leader Lease (an object name: lowercase letters, digits, '-' and '.').
    #[arg(long, default_value = "sidegate-operator", value_parser = object_name)]
    lease_name: String,
    /// The operator's Deployment, in the operator's namespace: it is made the owner of the
    /// leader Lease and the self-managed webhook certificate Secret, so that deleting it (helm
    /// uninstall) has the garbage collector delete them too. Needs `get` on that Deployment (a
    /// lasting refusal stops the start, as for the other start-up reads), and where the
    /// OwnerReferencesPermissionEnforcement admission plugin runs, `delete` on the Lease and the
    /// Secret to give existing ones the owner (refused, they are written without it); unset, or
    /// if there is no such Deployment, they stay when the operator is removed.
    #[arg(long, env = "SIDEGATE_OWNER_DEPLOYMENT", value_name = "NAME", value_parser = object_name)]
    owner_deployment: Option<String>,
    /// Identity written into the Lease and Events (defaults to the pod name, $POD_NAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease stays valid without renewal (a standby takes over after at most this long;
    /// the leader renews every third of it). From 4 to 3600.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(4..=3600))]
    lease_duration_secs: u64,
    /// Serve only this namespace; repeat the flag for more (or list them, comma-separated, in
    /// $SIDEGATE_WATCH_NAMESPACES). The controllers then watch and reconcile only there and the
    /// webhook injects only there, so the operator's RBAC can be Roles in those namespaces
    /// (Helm value `watchNamespaces`). Without it: every namespace, with a ClusterRole.
    #[arg(
        long = "watch-namespace",
        env = "SIDEGATE_WATCH_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACE"
    )]
    watch_namespaces: Vec<String>,
    /// Gateways (and, apart, ProviderKeys) reconciled in parallel; with --watch-namespace, in
    /// each watched namespace.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Seconds between full re-reconciles of a healthy gateway (watches handle changes; this is
    /// the safety net). From 10 to 604800 (a week).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=604_800))]
    resync_secs: u64,
    /// Seconds the webhook keeps answering after SIGTERM (while /readyz reports unready, so the
    /// endpoint is removed first), in every role; then the process exits. At most 60.
    #[arg(long, env = "SIDEGATE_SHUTDOWN_DRAIN_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=60))]
    shutdown_drain_secs: u64,
    /// Log format.
    #[arg(long, env = "SIDEGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The sidecar injection webhook (served by every replica, leader or not).
    #[command(flatten)]
    webhook: Box<webhook::WebhookArgs>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { out_dir } => match print_crds(out_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidegate-operator: {}", error_text(&e));
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            init_tracing(&args.log_format);
            match run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // A log record like every other line (one JSON object with --log-format json).
                    tracing::error!(error = %error_text(&e), "sidegate-operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A flag value that must be a Kubernetes object name (a Lease's).
fn object_name(value: &str) -> Result<String, String> {
    if sidegate_operator::validate::is_dns_subdomain(value, 253) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ))
    }
}

fn print_crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(dir) = out_dir else {
        print!("{}", crd::all_yaml()?);
        return Ok(());
    };
    for (file, def) in crd::definitions() {
        let path = dir.join(file);
        std::fs::write(&path, crd::to_yaml(&def)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An error and its causes on one line, leaving out a cause whose text an earlier one already
/// holds (kube's errors repeat their sources in their messages), and an apiserver's answer as
/// its message and code (kube prints the whole Status struct after them).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        // The answer's Status, the last cause, says the same again.
        let (part, last) = match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => (
                format!("{} ({} {})", status.message, status.code, status.reason),
                true,
            ),
            _ => (cause.to_string(), false),
        };
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        if last {
            break;
        }
    }
    text
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Checked before anything starts (the webhook reads the same flags).
    let sidecar_images = args.webhook.allowed_images()?;
    let scope = Scope::namespaces(&args.watch_namespaces)?;
    // How the webhook injects, so that pods injected otherwise are counted as outdated.
    let injection = if args.webhook.enabled {
        Some(
            args.webhook
                .inject_config(&args.lease_namespace, &scope)
                .context("sidecar injection settings")?,
        )
    } else {
        None
    };
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AdminState {
        ready: Default::default(),
        metrics: metrics.clone(),
    });
    let listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", args.admin_addr))?;
    tokio::spawn(admin::serve(listener, state.clone()));
    let shutdown = Shutdown::on_signal(state.clone());
    let drain = if args.webhook.enabled {
        Duration::from_secs(args.shutdown_drain_secs)
    } else {
        Duration::ZERO
    };

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    tracing::info!(serving = %scope.describe(), "sidegate-operator starting");
    // /healthz answers and /readyz stays unready meanwhile: an apiserver down for a while (a
    // control-plane upgrade) is waited for here, not by a restart loop whose backoff outlasts it.
    let started = async {
        for ns in scope.watches() {
            startup_step(&format!("listing AIGateways in {}", described(ns)), || {
                list_aigateways(&client, ns)
            })
            .await?;
        }
        let owner = match &args.owner_deployment {
            Some(name) => {
                let step = format!(
                    "reading the operator's Deployment {}/{name} (--owner-deployment)",
                    args.lease_namespace
                );
                let owner = startup_step(&step, || async {
                    Ok(owner::deployment(&client, &args.lease_namespace, name).await?)
                })
                .await?;
                if owner.is_none() {
                    tracing::warn!(
                        deployment = %name,
                        namespace = %args.lease_namespace,
                        "--owner-deployment: no such Deployment (or it is being deleted); the Lease and the webhook certificate Secret will stay when the operator is removed"
                    );
                }
                owner
            }
            None => None,
        };
        if args.webhook.enabled {
            // The webhook's namespace is the operator's own (excluded from injection, holds the
            // certificate Secret).
            startup_step("starting the sidecar injection webhook", || async {
                Ok(webhook::start(
                    client.clone(),
                    &args.webhook,
                    &args.lease_namespace,
                    &scope,
                    metrics.clone(),
                    owner.as_ref(),
                )
                .await?)
            })
            .await?;
        }
        anyhow::Ok(owner)
    };
    let owner = tokio::select! {
        started = started => started?,
        () = shutdown.requested() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    // Ready from here on in every role, also while the apiserver is away later: the webhook
    // serves on every replica, and all of them unready at once would remove every endpoint
    // (with failurePolicy Ignore, pods would then start without the sidecar).
    state.ready.store(true, Ordering::Relaxed);

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("sidegate-operator-{}", std::process::id()));
    // A new Context (and new watches, so new caches) for every term as leader: nothing learned
    // in an earlier term, when another replica may have written since, is trusted.
    let controllers = || async {
        let ctx = Arc::new(Context {
            resync: Duration::from_secs(args.resync_secs),
            sidecar_images: sidecar_images.clone(),
            // The webhook's exclusions: pods there are never injected, so not counted as
            // uninjected.
            excluded_namespaces: args.webhook.excluded_namespaces(&args.lease_namespace),
            injection: injection.clone(),
            ..Context::new(client.clone(), metrics.clone(), Some(identity.clone()))
        });
        metrics.leader.set(1);
        tokio::join!(
            controller::run(client.clone(), ctx.clone(), args.concurrency, &scope),
            providerkey::run(client.clone(), ctx.clone(), args.concurrency, &scope),
        );
    };

    if !args.leader_elect {
        tracing::info!("running controllers without leader election");
        // The controllers stop on the signal themselves (shutdown_on_signal).
        controllers().await;
        shutdown.drained_after_stop(drain).await;
        return Ok(());
    }
    let elector = LeaderElector::new(
        client.clone(),
        LeaseSettings {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: Duration::from_secs(args.lease_duration_secs),
            renew_every: Duration::from_secs((args.lease_duration_secs / 3).max(1)),
            owner,
        },
    );
    // Leadership lost (taken over, or not renewed while the apiserver was away) stops the
    // controllers and makes this replica a standby again; the process, its webhook and its
    // readiness carry on. Exiting instead would cut admissions in flight and, after an apiserver
    // outage, restart every replica into a growing CrashLoopBackOff.
    loop {
        let acquired = tokio::select! {
            acquired = elector.acquire() => acquired,
            () = shutdown.requested() => {
                shutdown.drained(drain).await;
                return Ok(());
            }
        };
        let lost = tokio::select! {
            () = controllers() => None,
            lost = elector.hold(acquired) => Some(lost),
        };
        metrics.leader.set(0);
        // The gateway gauges are the leader's: a standby reports none (the new leader does).
        metrics.retain_gateways(|_, _| false);
        let Some(lost) = lost else {
            // Released before the drain: the standby takes over while this replica still
            // answers admissions.
            elector.release().await;
            tracing::info!("controllers stopped; lease released");
            shutdown.drained_after_stop(drain).await;
            return Ok(());
        };
        tracing::warn!(
            error = %lost,
            "leadership lost: controllers stopped; standing by for the lease again (the webhook keeps serving)"
        );
    }
}

/// `the cluster` or `namespace NS`, for an entry of [`Scope::watches`].
fn described(ns: Option<&str>) -> String {
    ns.map_or_else(|| "the cluster".to_owned(), |ns| format!("namespace {ns}"))
}

/// Lists one AIGateway: the CRDs are installed and this identity may read them there.
async fn list_aigateways(client: &kube::Client, ns: Option<&str>) -> anyhow::Result<()> {
    match Scope::api::<AIGateway>(client, ns)
        .list(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let hint = match StartupFailure::of_kube(&e) {
                StartupFailure::NotInstalled => Some(
                    "the CRDs are not installed (sidegate-operator crd | kubectl apply --server-side -f -)",
                ),
                StartupFailure::Refused => Some("RBAC does not grant it to this operator"),
                _ => None,
            };
            let e = anyhow::Error::new(e);
            Err(match hint {
                Some(hint) => e.context(hint),
                None => e,
            })
        }
    }
}

/// First wait between attempts of a start-up step; it doubles up to [`STARTUP_RETRY_MAX`].
const STARTUP_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between attempts of a start-up step.
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest one attempt may take (a half-open connection answers nothing, and says nothing).
const STARTUP_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Refusals (401, 403) in a row believed: an apiserver that has just started refuses until its
/// RBAC caches are loaded (kubernetes/kubernetes#121635), which 5 attempts (~15 s) outlast.
const STARTUP_REFUSALS_BELIEVED: u32 = 5;

/// What a failed start-up step says about trying it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartupFailure {
    /// The apiserver was not reached, did not answer in time, or said it cannot serve now
    /// (408, 429, 5xx): it comes back.
    Unreachable,
    /// 404: a CRD not installed yet (helm's crds/ or a `kubectl apply` may land a moment later).
    NotInstalled,
    /// 401 or 403: lasts until the credentials or RBAC change, once it has lasted a while.
    Refused,
    /// Anything else (flags, files, a request the apiserver calls invalid): waiting changes
    /// nothing, so the process exits saying why.
    Permanent,
}

impl StartupFailure {
    /// The failure of an error whose causes hold a client error (none: [`Self::Permanent`]).
    fn of(e: &anyhow::Error) -> Self {
        e.chain()
            .find_map(|c| c.downcast_ref::<kube::Error>())
            .map_or(Self::Permanent, Self::of_kube)
    }

    /// The failure of a client error.
    fn of_kube(e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => match status.code {
                401 | 403 => Self::Refused,
                404 => Self::NotInstalled,
                408 | 429 | 500.. => Self::Unreachable,
                _ => Self::Permanent,
            },
            // Connection refused or reset, TLS handshake cut, no answer, a credential plugin
            // that could not run: the transport, not the request.
            kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::ReadEvents(_)
            | kube::Error::Auth(_) => Self::Unreachable,
            _ => Self::Permanent,
        }
    }
}

/// Runs `attempt` until it succeeds, waiting between attempts (1 s doubling to 30 s) while the
/// failure may heal, with one log line per failed attempt; returns the error of one that will
/// not (see [`StartupFailure`]).
async fn startup_step<T, F, Fut>(step: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut wait = STARTUP_RETRY_FIRST;
    let mut refusals = 0;
    let mut n = 0u32;
    loop {
        n += 1;
        let (failure, e) = match tokio::time::timeout(STARTUP_ATTEMPT_TIMEOUT, attempt()).await {
            Ok(Ok(done)) => {
                if n > 1 {
                    tracing::info!("{step}: done at attempt {n}");
                }
                return Ok(done);
            }
            Ok(Err(e)) => (StartupFailure::of(&e), e),
            Err(_) => (
                StartupFailure::Unreachable,
                anyhow::anyhow!("no answer within {}s", STARTUP_ATTEMPT_TIMEOUT.as_secs()),
            ),
        };
        match failure {
            StartupFailure::Permanent => return Err(e.context(step.to_owned())),
            StartupFailure::Refused => {
                refusals += 1;
                if refusals >= STARTUP_REFUSALS_BELIEVED {
                    return Err(e.context(format!("{step} (refused {refusals} times in a row)")));
                }
            }
            StartupFailure::Unreachable | StartupFailure::NotInstalled => refusals = 0,
        }
        tracing::warn!(
            "{step}: attempt {n} failed, retrying in {}s: {}",
            wait.as_secs(),
            error_text(&e)
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(STARTUP_RETRY_MAX);
    }
}

fn init_tracing(format: &str) {
    // kube_client's builder logs every failed request again, which its caller already does in
    // one line of its own (a start-up attempt, a lease renewal, a reconcile).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_client::client::builder=off")
    });
    // Colours only on a terminal: kubectl logs shows escape codes as they are.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn api_error(code: u16) -> anyhow::Error {
        let status = kube::core::Status::failure("refused", "Test").with_code(code);
        anyhow::Error::new(kube::Error::Api(status.boxed())).context("reading something")
    }

    fn unreachable() -> anyhow::Error {
        anyhow::Error::new(kube::Error::Service("connection refused".into()))
    }

    #[test]
    fn the_lease_namespace_flag_says_it_is_the_operators_namespace_for_the_webhook_too() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("run")
            .expect("run")
            .render_long_help()
            .to_string();
        let flag = help
            .split("--lease-namespace")
            .nth(1)
            .and_then(|h| h.split("\n      --").next())
            .expect("--lease-namespace in the help");
        for what in [
            "operator-namespace",
            "Lease",
            "certificate Secret",
            "never injects",
        ] {
            assert!(flag.contains(what), "{what}: {flag}");
        }
        for flag in ["--lease-namespace", "--operator-namespace"] {
            let Command::Run(args) = Cli::try_parse_from(["x", "run", flag, "ops"])
                .expect(flag)
                .command
            else {
                panic!("run");
            };
            assert_eq!(args.lease_namespace, "ops");
        }
    }

    #[test]
    fn start_up_failures_are_sorted_by_whether_waiting_heals_them() {
        use StartupFailure::*;
        assert_eq!(StartupFailure::of(&unreachable()), Unreachable);
        for code in [408, 429, 500, 503, 504] {
            assert_eq!(StartupFailure::of(&api_error(code)), Unreachable, "{code}");
        }
        assert_eq!(StartupFailure::of(&api_error(404)), NotInstalled);
        assert_eq!(StartupFailure::of(&api_error(403)), Refused);
        assert_eq!(StartupFailure::of(&api_error(401)), Refused);
        assert_eq!(StartupFailure::of(&api_error(422)), Permanent);
        assert_eq!(
            StartupFailure::of(&anyhow::anyhow!("--tls-cert-file: no such file")),
            Permanent
        );
    }

    /// Runs `startup_step` over `failures` (then success), returning its result, the attempts
    /// made and the time it took (paused time).
    async fn step_over(
        failures: Vec<fn() -> anyhow::Error>,
    ) -> (anyhow::Result<()>, u32, Duration) {
        let attempts = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result = startup_step("a step", || {
            let n = attempts.fetch_add(1, Ordering::Relaxed) as usize;
            let failure = failures.get(n).map(|f| f());
            async move { failure.map_or(Ok(()), Err) }
        })
        .await;
        (result, attempts.into_inner(), start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_up_step_is_retried_with_a_doubling_wait_while_the_apiserver_is_away() {
        let away: Vec<fn() -> anyhow::Error> = vec![
            unreachable,
            || api_error(503),
            || api_error(404),
            unreachable,
            unreachable,
            unreachable,
            unreachable,
        ];
        let (result, attempts, took) = step_over(away).await;
        result.expect("done once the apiserver answers");
        assert_eq!(attempts, 8);
        // 1 + 2 + 4 + 8 + 16 + 30 + 30: the wait stops doubling at 30 s.
        assert_eq!(took, Duration::from_secs(91));
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_up_step_gives_up_at_once_on_what_waiting_cannot_heal() {
        let (result, attempts, took) = step_over(vec![unreachable, || api_error(422)]).await;
        let e = result.expect_err("422 is permanent");
        assert_eq!(attempts, 2);
        assert_eq!(took, Duration::from_secs(1));
        assert!(
            error_text(&e).starts_with("a step: reading something"),
            "{e:#}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_believed_once_it_lasts_five_attempts_in_a_row() {
        // A refusal between other failures starts the count again (a restarting apiserver
        // refuses until its RBAC caches are loaded).
        let forbidden = || api_error(403);
        let (result, attempts, _) = step_over(vec![
            forbidden,
            forbidden,
            forbidden,
            forbidden,
            unreachable,
            forbidden,
            forbidden,
        ])
        .await;
        result.expect("refusals that stopped");
        assert_eq!(attempts, 8);

        let (result, attempts, took) = step_over(vec![forbidden; 6]).await;
        let e = result.expect_err("a refusal that lasts");
        assert_eq!(attempts, 5);
        assert_eq!(took, Duration::from_secs(1 + 2 + 4 + 8));
        assert!(
            error_text(&e).starts_with("a step (refused 5 times in a row): reading something"),
            "{e:#}"
        );
    }

    #[test]
    fn an_error_and_its_causes_make_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file (os error 2)");
        let e = anyhow::Error::new(io)
            .context("failed to read kubeconfig: No such file (os error 2)")
            .context("no Kubernetes client configuration");
        assert_eq!(
            error_text(&e),
            "no Kubernetes client configuration: failed to read kubeconfig: No such file (os error 2)"
        );
        let forbidden = kube::core::Status::failure(
            "aigateways.sidegate.dev is forbidden: User \"x\" cannot list resource \"aigateways\"",
            "Forbidden",
        )
        .with_code(403);
        let e = anyhow::Error::new(kube::Error::Api(forbidden.boxed())).context("listing");
        assert_eq!(
            error_text(&e),
            "listing: aigateways.sidegate.dev is forbidden: User \"x\" cannot list resource \"aigateways\" (403 Forbidden)"
        );
    }
}
