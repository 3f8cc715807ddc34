//! `sidegate`: the sidecar binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use rustls::pki_types::CertificateDer;
use sidegate::config::{self, Sources};
use sidegate::proxy::{Gateway, UpstreamClient};
use sidegate::telemetry::Metrics;
use sidegate::{reload, server};

/// The longest shutdown grace taken (100 years): longer ones end at it.
const MAX_GRACE_SECS: u64 = 100 * 365 * 24 * 3600;
/// How long the spans and the Redis charges left at shutdown may take to be written, once the
/// last request ended.
const SHUTDOWN_WRITES: Duration = Duration::from_secs(3);

/// sidegate: a local AI gateway for one pod (or one machine).
///
/// Gives applications one address for every LLM provider, with provider keys injected from a
/// keys directory and the Cloudflare AI Gateway contract (cf-aig-* headers, error codes).
/// Point an SDK at http://127.0.0.1:8787/openai (or /anthropic, /groq, ...).
#[derive(Debug, Parser)]
#[command(name = "sidegate", version, about, long_about)]
struct Args {
    /// Gateway config file (gateway.yaml: schemaVersion, gateway, spec, keys). Reloaded live
    /// when it changes; an invalid new version is rejected and the last good one keeps serving.
    #[arg(long, env = "SIDEGATE_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// Directory of provider keys: one file per key named <provider>.<alias> (e.g.
    /// openai.default), plus authentication.tokens with gateway tokens, one per line.
    /// Reloaded live, including kubelet's atomic ..data symlink swaps. Without it no key is
    /// stored: requests pass the application's own provider keys through.
    #[arg(long, env = "SIDEGATE_KEYS_DIR", value_name = "DIR")]
    keys_dir: Option<PathBuf>,

    /// Address of the gateway listener (HTTP/1.1 and h2c). Keep it on loopback: the gateway
    /// holds provider keys.
    #[arg(
        long,
        env = "SIDEGATE_LISTEN",
        default_value = "127.0.0.1:8787",
        value_name = "ADDR"
    )]
    listen: SocketAddr,

    /// Address of the admin listener: /healthz, /readyz, /metrics.
    #[arg(
        long,
        env = "SIDEGATE_ADMIN",
        default_value = "127.0.0.1:8788",
        value_name = "ADDR"
    )]
    admin: SocketAddr,

    /// Start even if the config file is missing or invalid, unready until a valid one appears
    /// (for pods whose ConfigMap is rendered after they start).
    #[arg(long, env = "SIDEGATE_WAIT_FOR_CONFIG", value_parser = clap::builder::BoolishValueParser::new())]
    wait_for_config: bool,

    /// PEM file of extra CA certificates to trust for upstream TLS (a private model server, an
    /// egress proxy); the public web PKI roots are always trusted. Upstreams are spoken to in
    /// HTTP/1.1 with keep-alive, over TLS 1.2 or 1.3 for https base URLs.
    #[arg(long, env = "SIDEGATE_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,

    /// Log format: text for people, json for log pipelines (one JSON object per line).
    #[arg(long, env = "SIDEGATE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Worker threads for the proxy. 1 (the default) runs everything on one thread: the least
    /// CPU per request and the least memory (a second thread costs about a quarter more CPU per
    /// request in bench/run); one core serves tens of thousands of requests per second, so more
    /// threads only help a pod whose LLM traffic outgrows that.
    #[arg(long, env = "SIDEGATE_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,

    /// Seconds a client may stay silent mid-request: before its first bytes, within a request
    /// head (the connection is closed), or between parts of a request body (answered 408); and
    /// may take none of its answer while the gateway has more to send (the connection and the
    /// provider's stream behind it are closed).
    #[arg(long, env = "SIDEGATE_CLIENT_TIMEOUT", default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    client_timeout: u64,

    /// Seconds after SIGTERM (the drain delay included) that in-flight requests, LLM streams
    /// too, have to finish; those still running then are cut. Keep it below the pod's
    /// terminationGracePeriodSeconds (the operator injects that minus a margin). Longer than
    /// 100 years is 100 years.
    #[arg(
        long,
        env = "SIDEGATE_SHUTDOWN_GRACE",
        default_value_t = 25,
        value_name = "SECS"
    )]
    shutdown_grace: u64,

    /// Seconds after SIGTERM during which the gateway still accepts and serves new connections
    /// and requests, before it refuses new ones and lets in-flight requests finish. A classic
    /// (non-native) sidecar gets SIGTERM together with its app, whose last requests arrive
    /// meanwhile: the operator injects a few seconds there; a native sidecar is stopped after
    /// its app has exited and needs none.
    #[arg(long, env = "SIDEGATE_SHUTDOWN_DELAY", default_value_t = 0, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_delay: u64,

    /// Most client connections open at once on the gateway port, WebSocket sessions included:
    /// more are answered 503 (code 2112) and closed, and counted in
    /// sidegate_connections_refused_total. Far above what an app opens; it bounds what a client
    /// leaking connections costs (an idle one about 33 KiB of the sidecar's memory).
    #[arg(long, env = "SIDEGATE_MAX_CONNECTIONS", default_value_t = sidegate::proxy::DEFAULT_MAX_CONNECTIONS as u32, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,

    /// Check the config file, the keys directory and the upstream CA file as a start would,
    /// print what is wrong (or what would be served) and exit: 0 when valid, 2 when not.
    /// Nothing listens; for CI checks of a gateway.yaml.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Level names people write that `tracing` does not know: a bare word is a target name to it, so
/// `RUST_LOG=warning` would show only the (nonexistent) target `warning`, that is nothing.
const NOT_LEVELS: [&str; 7] = [
    "warning",
    "err",
    "fatal",
    "critical",
    "verbose",
    "information",
    "notice",
];

/// The log filter of `RUST_LOG`'s value `spec` (`info` when unset or empty, or when none of its
/// directives is valid), and the directives left out, each with why.
fn log_filter(spec: Option<&str>) -> (tracing_subscriber::EnvFilter, Vec<String>) {
    use tracing_subscriber::filter::Directive;
    let mut ignored = Vec::new();
    let mut kept = Vec::new();
    for directive in spec.unwrap_or_default().split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            continue;
        }
        if NOT_LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            ignored.push(format!(
                "{directive:?}: not a level (off, error, warn, info, debug, trace)"
            ));
            continue;
        }
        match directive.parse::<Directive>() {
            Ok(_) => kept.push(directive),
            Err(e) => ignored.push(format!("{directive:?}: {e}")),
        }
    }
    let filter = if kept.is_empty() {
        None
    } else {
        tracing_subscriber::EnvFilter::builder()
            .parse(kept.join(","))
            .ok()
    };
    (
        filter.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info")),
        ignored,
    )
}

fn init_logging(format: LogFormat) {
    let spec = std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV).ok();
    let (filter, ignored) = log_filter(spec.as_deref());
    let effective = filter.to_string();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| sidegate::access_log::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .fmt_fields(sidegate::access_log::text_fields())
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    // Said once, where the log goes: a filter that silently became `info` hides what was asked.
    if !ignored.is_empty() {
        tracing::warn!(
            ignored = %ignored.join("; "),
            filter = %effective,
            "RUST_LOG: directives ignored"
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(why) = ports_overlap(args.listen, args.admin) {
        use clap::CommandFactory as _;
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, why)
            .exit();
    }
    init_logging(args.log_format);
    // Processes of the same user, such as an app in a pod that shares its process namespace,
    // must not read this process's memory or, through /proc/<pid>/root, the key files it
    // mounts: a process that is not dumpable is open to them only with CAP_SYS_PTRACE.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "cannot mark the process not dumpable");
    }
    sidegate::access_log::init(match args.log_format {
        LogFormat::Text => sidegate::access_log::Format::Text,
        LogFormat::Json => sidegate::access_log::Format::Json,
    });
    // Before the runtime, which takes descriptors of its own (and panics setting up its signal
    // handling when none is left).
    if !args.check
        && let Err(e) = server::raise_open_files_limit()
    {
        tracing::error!(error = %e, "sidegate stopped");
        sidegate::access_log::flush();
        return ExitCode::from(2);
    }
    // One thread: a current-thread runtime (no work-stealing machinery, fewer wake-ups).
    let mut builder = if args.threads == 1 && std::env::var_os("SIDEGATE_MULTI_THREAD").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads.into());
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            sidegate::access_log::flush();
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        let code = runtime.block_on(check(&args));
        sidegate::access_log::flush();
        return code;
    }
    if args.shutdown_delay > args.shutdown_grace {
        tracing::warn!(
            delay_secs = args.shutdown_delay,
            grace_secs = args.shutdown_grace,
            "--shutdown-delay is part of --shutdown-grace and longer than it: the drain delay will be the grace"
        );
    }
    let result = runtime.block_on(run(args));
    // Requests still running after the grace period ended in `run`; other tasks (a cache write,
    // the config watcher) end here, and may still write log lines: flush after that.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    sidegate::access_log::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "sidegate stopped");
            sidegate::access_log::flush();
            ExitCode::from(2)
        }
    }
}

/// Why `--listen` and `--admin` cannot both be bound, if they cannot: one port of addresses
/// that overlap (the same one, or either all of the host's). Said as such, rather than as the
/// second bind's "address in use", which blames another process.
fn ports_overlap(listen: SocketAddr, admin: SocketAddr) -> Option<String> {
    let overlap = listen.port() == admin.port()
        && (listen.ip() == admin.ip()
            || listen.ip().is_unspecified()
            || admin.ip().is_unspecified());
    overlap.then(|| {
        format!(
            "--listen {listen} and --admin {admin} are one address (port {}): the gateway and admin ports must differ",
            listen.port()
        )
    })
}

/// The config file and keys directory of `args`, as absolute paths: the file watcher reports
/// changed paths that way (relative ones would never match).
fn sources(args: &Args) -> Sources {
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    Sources {
        config: absolute(&args.config),
        keys_dir: args.keys_dir.as_deref().map(absolute),
    }
}

/// `--check`: what a start would load, said on stdout (the problems on stderr), without
/// listening.
async fn check(args: &Args) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Built as a start builds it: a PEM block that parses may still be refused as a root.
    if let Err(e) = upstream_client(args.upstream_ca.as_deref()) {
        eprintln!("invalid upstream TLS setup: {e:#}");
        return ExitCode::from(2);
    }
    match config::load(&sources(args)) {
        Ok(snap) => {
            for w in &snap.warnings {
                println!("warning: {w}");
            }
            println!(
                "{}: valid (gateway {}, {} stored key(s), {} gateway token(s), authentication {})",
                args.config.display(),
                Some(snap.gateway_label())
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| "unnamed".into()),
                snap.keys.len(),
                snap.keys.token_count(),
                if snap.auth_required { "on" } else { "off" },
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // SIGHUP asks for a reload of the config and keys (its default action ends the process).
    let (hangup_tx, hangup_rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    if let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hangup.recv().await.is_some() && hangup_tx.send(()).is_ok() {}
        });
    }
    let sources = sources(&args);
    let metrics = Arc::new(Metrics::new());
    let client = upstream_client(args.upstream_ca.as_deref())?;
    let mut gateway = Gateway::new(metrics, client);
    gateway.client_timeout = Duration::from_secs(args.client_timeout);
    gateway.loopback_listener = args.listen.ip().is_loopback();
    gateway.max_connections = args.max_connections as usize;
    let gateway = Arc::new(gateway);
    match config::load(&sources) {
        Ok(snap) => {
            gateway.metrics.set_load_outcome(true);
            reload::install(&gateway, snap);
        }
        Err(e) if args.wait_for_config => {
            tracing::warn!(error = %e, "no valid config yet; serving 503 until one appears");
        }
        Err(e) => return Err(anyhow::Error::new(e).context("invalid configuration")),
    }
    let listener = server::bind(args.listen, "gateway", server::GATEWAY_BACKLOG).await?;
    let admin = server::bind(args.admin, "admin", server::ADMIN_BACKLOG).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        version = env!("CARGO_PKG_VERSION"),
        max_connections = args.max_connections,
        open_files_limit = server::open_files_limit(),
        shutdown_delay_secs = args.shutdown_delay,
        shutdown_grace_secs = args.shutdown_grace,
        "sidegate listening"
    );
    tokio::spawn(server::serve_admin(admin, gateway.clone()));
    tokio::spawn(reload::watch(gateway.clone(), sources, hangup_rx));
    server::serve_gateway(
        listener,
        gateway.clone(),
        shutdown_signal(),
        server::Drain {
            delay: Duration::from_secs(args.shutdown_delay),
            // A pod's grace may be any int64: a deadline that far would overflow the clock.
            grace: Duration::from_secs(args.shutdown_grace.min(MAX_GRACE_SECS)),
        },
    )
    .await;
    // Spans of the last requests, those cut at the grace deadline included (serve_gateway
    // returns once their connections are gone), and the charges still waiting for Redis (the
    // runtime's end would drop them): together, best effort and bounded, as kubelet's grace
    // period is running (the operator leaves the sidecar 5 s past --shutdown-grace).
    tokio::join!(
        gateway.flush_spans(SHUTDOWN_WRITES),
        gateway.write_charges(SHUTDOWN_WRITES)
    );
    Ok(())
}

/// The client to the providers, trusting the certificates of `--upstream-ca` (`ca`) too. A start
/// and `--check` both build it, so `--check` refuses what a start would.
fn upstream_client(ca: Option<&Path>) -> anyhow::Result<UpstreamClient> {
    let extra_roots = match ca {
        Some(path) => read_certs(path)?,
        None => Vec::new(),
    };
    sidegate::proxy::upstream_client(extra_roots).context("upstream TLS setup")
}

/// Largest `--upstream-ca` file.
const MAX_CA_FILE: u64 = 4 << 20;

/// The certificates of the `--upstream-ca` file at `path`, each one a root store takes: rustls
/// would refuse a bad one later as an "invalid peer certificate", naming neither flag nor file.
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    use sidegate::config::FileError;
    let shown = path.display();
    // A regular file of at most 4 MiB (a system's whole CA bundle is a few hundred KiB): a FIFO
    // would block the start, before it listens, and `/dev/zero` fill its memory.
    let raw = sidegate::config::read_regular_file(path, MAX_CA_FILE).map_err(|e| match e {
        FileError::Io(e) => anyhow::anyhow!("--upstream-ca {shown}: cannot read it: {e}"),
        FileError::NotAFile(kind) => {
            anyhow::anyhow!("--upstream-ca {shown}: a {kind}, not a regular file")
        }
        FileError::TooLarge => anyhow::anyhow!("--upstream-ca {shown}: larger than 4 MiB"),
    })?;
    let certs = CertificateDer::pem_slice_iter(&raw)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--upstream-ca {shown}: cannot read PEM certificates"))?;
    if certs.is_empty() {
        anyhow::bail!("--upstream-ca {shown}: holds no PEM certificate");
    }
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = rustls::RootCertStore::empty().add(cert.clone()) {
            let why = match e {
                rustls::Error::InvalidCertificate(why) => why.to_string(),
                other => other.to_string(),
            };
            anyhow::bail!(
                "--upstream-ca {shown}: PEM block {} of {} is not a certificate ({why})",
                i + 1,
                certs.len()
            );
        }
    }
    Ok(certs)
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C), which starts the drain; a second one
/// during it ends the process at once (exit status 128 + its number, as a death by it), as
/// kubelet's and a terminal's users expect of a second signal.
async fn shutdown_signal() {
    let mut signals = match ShutdownSignals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM and SIGINT: the sidecar stops only when killed");
            return std::future::pending().await;
        }
    };
    let first = signals.next().await;
    tracing::info!(
        signal = first.name(),
        "signal received (a second SIGTERM or SIGINT exits at once)"
    );
    tokio::spawn(async move {
        let second = signals.next().await;
        tracing::warn!(
            signal = second.name(),
            "second signal during the shutdown: exiting now, in-flight requests cut"
        );
        sidegate::access_log::flush();
        std::process::exit(128 + second.number());
    });
}

/// A signal that stops the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    Terminate,
    Interrupt,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Interrupt => "SIGINT",
        }
    }

    /// Its number (as `kill -l` lists it).
    fn number(self) -> i32 {
        match self {
            StopSignal::Terminate => 15,
            StopSignal::Interrupt => 2,
        }
    }
}

/// The listeners of SIGTERM and SIGINT, made once: a signal arriving between the first and the
/// second wait is not missed.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal received.
    async fn next(&mut self) -> StopSignal {
        tokio::select! {
            Some(()) = self.terminate.recv() => StopSignal::Terminate,
            Some(()) = self.interrupt.recv() => StopSignal::Interrupt,
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_admin_on_one_port_of_overlapping_addresses_are_refused() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("address");
        for (listen, admin) in [
            ("127.0.0.1:8787", "127.0.0.1:8787"),
            ("0.0.0.0:8787", "127.0.0.1:8787"),
            ("127.0.0.1:8787", "[::]:8787"),
        ] {
            assert!(
                ports_overlap(a(listen), a(admin)).is_some(),
                "{listen} {admin}"
            );
        }
        for (listen, admin) in [
            ("127.0.0.1:8787", "127.0.0.1:8788"),
            ("127.0.0.1:8787", "127.0.0.2:8787"),
        ] {
            assert_eq!(ports_overlap(a(listen), a(admin)), None, "{listen} {admin}");
        }
    }

    #[test]
    fn a_bad_rust_log_directive_is_named_and_the_good_ones_kept() {
        let (filter, ignored) = log_filter(Some("debug,hyper=lots"));
        assert_eq!(filter.to_string(), "debug");
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert!(ignored[0].starts_with("\"hyper=lots\": "), "{ignored:?}");
    }

    #[test]
    fn a_rust_log_with_no_valid_directive_is_info_and_says_why() {
        let (filter, ignored) = log_filter(Some("warning"));
        assert_eq!(filter.to_string(), "info");
        assert_eq!(
            ignored,
            ["\"warning\": not a level (off, error, warn, info, debug, trace)"]
        );
    }

    #[test]
    fn an_unset_or_valid_rust_log_ignores_nothing() {
        for (spec, shown) in [
            (None, "info"),
            (Some(""), "info"),
            (Some("warn,sidegate=debug"), "sidegate=debug,warn"),
        ] {
            let (filter, ignored) = log_filter(spec);
            assert!(ignored.is_empty(), "{spec:?}: {ignored:?}");
            assert_eq!(filter.to_string(), shown, "{spec:?}");
        }
    }
}
