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
use sidegate_operator::{crd, providerkey, webhook};

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
    /// several replicas reconciles; standby replicas stay ready and take over when it lapses.
    #[arg(long, env = "SIDEGATE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (defaults to the pod's namespace, $POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sidegate-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "sidegate-operator")]
    lease_name: String,
    /// Identity written into the Lease and Events (defaults to the pod name, $POD_NAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease stays valid without renewal (a standby takes over after at most this long).
    #[arg(long, default_value_t = 15)]
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
    /// the safety net).
    #[arg(long, default_value_t = 300)]
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
/// holds (kube's errors repeat their sources in their messages).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Checked before anything starts (the webhook reads the same flags).
    let sidecar_images = args.webhook.allowed_images()?;
    let scope = Scope::namespaces(&args.watch_namespaces)?;
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
    for ns in scope.watches() {
        Scope::api::<AIGateway>(&client, ns)
            .list(&ListParams::default().limit(1))
            .await
            .with_context(|| {
                format!(
                    "cannot list AIGateways in {}: are the CRDs installed (sidegate-operator crd | kubectl apply --server-side -f -) and is RBAC granted there?",
                    ns.map_or_else(|| "the cluster".to_owned(), |ns| format!("namespace {ns}"))
                )
            })?;
    }
    if args.webhook.enabled {
        // The webhook's namespace is the operator's own (excluded from injection, holds the
        // certificate Secret).
        webhook::start(
            client.clone(),
            &args.webhook,
            &args.lease_namespace,
            &scope,
            metrics.clone(),
        )
        .await
        .context("starting the sidecar injection webhook")?;
    }
    state.ready.store(true, Ordering::Relaxed);

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("sidegate-operator-{}", std::process::id()));
    let ctx = Arc::new(Context {
        resync: Duration::from_secs(args.resync_secs.max(10)),
        sidecar_images,
        // The webhook's exclusions: pods there are never injected, so not counted as uninjected.
        excluded_namespaces: args.webhook.excluded_namespaces(&args.lease_namespace),
        ..Context::new(client.clone(), metrics.clone(), Some(identity.clone()))
    });
    let controllers = async {
        metrics.leader.set(1);
        tokio::join!(
            controller::run(client.clone(), ctx.clone(), args.concurrency, &scope),
            providerkey::run(client.clone(), ctx.clone(), args.concurrency, &scope),
        );
    };

    if !args.leader_elect {
        tracing::info!("running controllers without leader election");
        // The controllers stop on the signal themselves (shutdown_on_signal).
        controllers.await;
        shutdown.drained_after_stop(drain).await;
        return Ok(());
    }
    let elector = LeaderElector::new(
        client.clone(),
        LeaseSettings {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration: Duration::from_secs(args.lease_duration_secs.max(4)),
            renew_every: Duration::from_secs((args.lease_duration_secs / 3).max(1)),
        },
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown.requested() => {
            shutdown.drained(drain).await;
            return Ok(());
        }
    }
    let outcome = tokio::select! {
        () = controllers => Ok(()),
        lost = elector.hold() => Err(lost),
    };
    metrics.leader.set(0);
    match outcome {
        Ok(()) => {
            // Released before the drain: the standby takes over while this replica still
            // answers admissions.
            elector.release().await;
            tracing::info!("controllers stopped; lease released");
            shutdown.drained_after_stop(drain).await;
            Ok(())
        }
        // Exit so the pod restarts with clean caches rather than racing the new leader.
        Err(lost) => Err(anyhow::Error::new(lost).context("leadership lost")),
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
