//! The sidecar injection webhook: a mutating admission webhook for Pod CREATE, served over TLS on
//! its own port by every operator replica.
//!
//! - [`inject`]: the pure mutation (Pod + settings → JSON patch).
//! - [`images`]: which sidecar images may be injected (`--allowed-sidecar-images`).
//! - [`certs`]: the serving certificate (self-managed with rcgen, or files from cert-manager).
//! - this module: the HTTP shell (AdmissionReview v1 in and out), the lookups (the gateway, the
//!   keys of the pod's `envFrom` objects), the MutatingWebhookConfiguration the operator
//!   expects, and the `run` flags.

pub mod certs;
pub mod images;
pub mod inject;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceRequirements, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, OwnerReference,
};
use kube::api::{Api, ObjectMeta};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use sidegate_crds::api::AIGateway;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use self::certs::{CertFiles, CertResolver, SelfManaged, SelfManagedCert};
use self::inject::{EnvFromKeys, EnvSource, EnvSourceKeys, InjectConfig, InjectSettings, Skip};
use crate::listener::Limits;
use crate::revision::Replica;

/// Path the apiserver posts AdmissionReviews to.
pub const MUTATE_PATH: &str = "/mutate";
/// Name of the webhook inside the MutatingWebhookConfiguration.
pub const WEBHOOK_NAME: &str = "inject.sidegate.dev";
/// Largest AdmissionReview accepted (a Pod is at most ~1.5 MiB in etcd).
const MAX_REVIEW_BYTES: usize = 8 << 20;
/// How long the lookups of one admission (the gateway and the pod's `envFrom` objects, all at
/// once) may take inside the apiserver's webhook timeout (5 s).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Most `envFrom` objects read for one pod, and at once: those beyond are left unread (their
/// containers keep all their base URLs to envFrom).
const MAX_ENV_FROM_LOOKUPS: usize = 32;
const CONCURRENT_ENV_FROM_LOOKUPS: usize = 8;

/// How the webhook gets its serving certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// Generate a CA and certificate, store them in a Secret, patch `caBundle`.
    SelfManaged,
    /// Read `--tls-cert-file`/`--tls-key-file` (a cert-manager Certificate's Secret);
    /// cert-manager's CA injector fills `caBundle`.
    CertManager,
    /// Read the files like cert-manager mode; add `--ca-file`, if given, to `caBundle`.
    Files,
}

/// Flags of the webhook (flattened into `sidegate-operator run`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Serve the sidecar injection webhook.
    #[arg(long = "webhook", env = "SIDEGATE_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Port of the webhook's TLS listener.
    #[arg(long, env = "SIDEGATE_WEBHOOK_PORT", default_value_t = 9443)]
    pub webhook_port: u16,
    /// Address the webhook listens on (`::` takes IPv4 and IPv6; IPv4 only where the kernel
    /// has no IPv6).
    #[arg(long, env = "SIDEGATE_WEBHOOK_BIND", default_value = "::")]
    pub webhook_bind: std::net::IpAddr,
    /// Where the serving certificate comes from.
    #[arg(long, env = "SIDEGATE_CERT_MODE", value_enum, default_value_t = CertMode::SelfManaged)]
    pub cert_mode: CertMode,
    /// MutatingWebhookConfiguration whose `caBundle` the operator maintains.
    #[arg(
        long,
        env = "SIDEGATE_WEBHOOK_CONFIG_NAME",
        default_value = "sidegate-operator"
    )]
    pub webhook_config_name: String,
    /// Service in front of the webhook (the certificate's DNS names).
    #[arg(
        long,
        env = "SIDEGATE_WEBHOOK_SERVICE",
        default_value = "sidegate-webhook"
    )]
    pub webhook_service: String,
    /// Secret (in the operator's namespace, --lease-namespace) holding the self-managed certificate.
    #[arg(
        long,
        env = "SIDEGATE_WEBHOOK_SECRET",
        default_value = "sidegate-webhook-tls"
    )]
    pub webhook_secret: String,
    /// Extra DNS names or IP addresses for the self-managed certificate (repeatable).
    #[arg(long = "webhook-extra-name", value_name = "NAME")]
    pub extra_names: Vec<String>,
    /// Certificate file (cert-manager and files modes).
    #[arg(
        long,
        env = "SIDEGATE_TLS_CERT_FILE",
        default_value = "/etc/sidegate/webhook-tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,
    /// Private key file (cert-manager and files modes).
    #[arg(
        long,
        env = "SIDEGATE_TLS_KEY_FILE",
        default_value = "/etc/sidegate/webhook-tls/tls.key"
    )]
    pub tls_key_file: PathBuf,
    /// CA file whose certificate is added to `caBundle` at start, next to the CAs it held (at
    /// most four; files mode).
    #[arg(long, env = "SIDEGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Days a self-managed certificate is valid, from 1 to 3650 (it is renewed when a sixth of
    /// that is left: 4 hours before the end of a 1-day certificate).
    #[arg(
        long,
        default_value_t = 365,
        value_parser = clap::value_parser!(u64).range(CERT_VALIDITY_DAYS)
    )]
    pub cert_validity_days: u64,
    /// Seconds between checks of the self-managed certificate: each replica renews it when due,
    /// serves one another replica stored, and restores a `caBundle` that lost its CA. From 1 to
    /// 3600.
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=certs::MAX_CHECK_SECS)
    )]
    pub cert_check_secs: u64,
    /// This replica's pod (in the operator's namespace): the revision of the operator's
    /// Deployment its ReplicaSet has decides, while replicas of two revisions run (a rolling
    /// upgrade), whose self-managed certificate settings win. Read for its ReplicaSet only
    /// without --pod-template-hash, which needs `get` on pods there; unset or unreadable,
    /// replicas of different settings still never undo each other's certificate, but a newer
    /// one's are only taken up at the next renewal.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,
    /// This replica's pod's `pod-template-hash` label (the chart gives it by the downward API):
    /// with --owner-deployment it names the replica's ReplicaSet, `<deployment>-<hash>`, read
    /// with `get` on replicasets alone (no pods) for the revision --pod-name says.
    #[arg(long, env = "POD_TEMPLATE_HASH", value_name = "HASH")]
    pub pod_template_hash: Option<String>,
    /// Sidecar image injected when the AIGateway names none.
    #[arg(long, env = "SIDEGATE_SIDECAR_IMAGE", default_value = inject::DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,
    /// Images an AIGateway's spec.sidecar.image may name, comma-separated: a repository
    /// (ghcr.io/sidegate/sidegate: any tag or digest), a prefix ending in '/'
    /// (registry.example.com/platform/: every repository under it), an image with a tag or
    /// digest (only that one), or '*' (any image: whoever may write an AIGateway then chooses
    /// the code that runs, with its keys, in the pods that name it). Empty: the repository of
    /// --sidecar-image. Pods of a gateway naming another image are admitted without the sidecar
    /// and the gateway reports SidecarImageNotAllowed.
    #[arg(
        long,
        env = "SIDEGATE_ALLOWED_SIDECAR_IMAGES",
        value_name = "IMAGES",
        value_delimiter = ','
    )]
    pub allowed_sidecar_images: Vec<String>,
    /// Pull policy of the sidecar image: Always, IfNotPresent or Never (what the apiserver
    /// accepts on a container; unset: the apiserver's default for the image's tag).
    #[arg(
        long,
        env = "SIDEGATE_SIDECAR_IMAGE_PULL_POLICY",
        value_name = "POLICY",
        value_parser = clap::builder::PossibleValuesParser::new(PULL_POLICIES)
    )]
    pub sidecar_image_pull_policy: Option<String>,
    /// Image pull secrets added to every injected pod, comma-separated Secret names, for a
    /// sidecar image in a private registry. Kubelet reads them in the pod's namespace, so each
    /// must exist in every namespace whose pods are injected; those the pod already lists are
    /// not added twice.
    #[arg(
        long,
        env = "SIDEGATE_SIDECAR_IMAGE_PULL_SECRETS",
        value_name = "SECRETS",
        value_delimiter = ',',
        value_parser = pull_secret_name
    )]
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Default resources of injected sidecars, as JSON ResourceRequirements (e.g.
    /// '{"requests":{"cpu":"50m","memory":"32Mi"},"limits":{"memory":"256Mi"}}'); an AIGateway's
    /// spec.sidecar.resources overrides them. Built-in: requests 50m/32Mi, limit 256Mi memory.
    #[arg(long, env = "SIDEGATE_SIDECAR_RESOURCES", value_name = "JSON")]
    pub sidecar_resources: Option<String>,
    /// runAsUser of injected sidecars, or 'none' to leave it unset: where the platform assigns
    /// uids (OpenShift's restricted SCCs refuse a pod that names one outside its range), the
    /// sidecar then runs as the assigned uid, non-root either way (runAsNonRoot; the image's
    /// USER is numeric, 65532).
    #[arg(
        long,
        env = "SIDEGATE_SIDECAR_RUN_AS_USER",
        value_name = "UID|none",
        default_value = "65532",
        value_parser = parse_uid
    )]
    pub sidecar_run_as_user: IdFlag,
    /// runAsGroup of injected sidecars, or 'none' to leave it unset.
    #[arg(
        long,
        env = "SIDEGATE_SIDECAR_RUN_AS_GROUP",
        value_name = "GID|none",
        default_value = "65532",
        value_parser = parse_gid
    )]
    pub sidecar_run_as_group: IdFlag,
    /// Namespaces never injected besides kube-system and the operator's own (repeatable).
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
    pub exclude_namespaces: Vec<String>,
}

/// The image pull policies the apiserver accepts on a container (any other value would have
/// every injected pod refused).
pub const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];

/// The days `--cert-validity-days` may be (what `webhook.selfManaged.validityDays` of the chart
/// allows too).
pub const CERT_VALIDITY_DAYS: std::ops::RangeInclusive<u64> = 1..=3650;

/// `--sidecar-image-pull-secrets`: a Secret name (an empty entry, as a trailing comma leaves,
/// is dropped later).
fn pull_secret_name(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || crate::validate::is_dns_subdomain(value, 253) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a Secret name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ))
    }
}

/// A uid or gid flag: a number, or `none` (also empty) to leave it unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdFlag(pub Option<i64>);

fn parse_id(value: &str, what: &str) -> Result<IdFlag, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("none") {
        return Ok(IdFlag(None));
    }
    match value.parse::<i64>() {
        Ok(id) if (0..=i64::from(i32::MAX)).contains(&id) => Ok(IdFlag(Some(id))),
        _ => Err(format!(
            "{value:?} is not a {what} (0 to 2147483647) nor 'none'"
        )),
    }
}

/// `--sidecar-run-as-user`: a uid other than 0 (the sidecar runs with runAsNonRoot, which
/// kubelet enforces), or `none`.
fn parse_uid(value: &str) -> Result<IdFlag, String> {
    match parse_id(value, "uid")? {
        IdFlag(Some(0)) => Err(
            "0 is root; the sidecar runs non-root (runAsNonRoot): name another uid, or 'none'"
                .to_owned(),
        ),
        id => Ok(id),
    }
}

/// `--sidecar-run-as-group`: a gid, or `none`.
fn parse_gid(value: &str) -> Result<IdFlag, String> {
    parse_id(value, "gid")
}

impl WebhookArgs {
    /// The namespaces never injected by an operator in `operator_namespace`
    /// ([`inject::excluded_namespaces`] with `--exclude-namespace`).
    pub fn excluded_namespaces(&self, operator_namespace: &str) -> BTreeSet<String> {
        inject::excluded_namespaces(operator_namespace, &self.exclude_namespaces)
    }

    /// The lifetime of a self-managed certificate (`--cert-validity-days`) and how long before
    /// its end it is renewed: a sixth of it.
    pub fn cert_validity(&self) -> Result<(Duration, Duration), StartError> {
        let days = self.cert_validity_days;
        if !CERT_VALIDITY_DAYS.contains(&days) {
            return Err(StartError::CertValidity(days));
        }
        let validity = Duration::from_secs(days * 86400);
        Ok((validity, validity / 6))
    }

    /// The images gateways may name, from `--allowed-sidecar-images` and `--sidecar-image`.
    pub fn allowed_images(&self) -> Result<images::AllowedImages, images::InvalidRule> {
        images::AllowedImages::new(&self.allowed_sidecar_images, &self.sidecar_image)
    }

    /// How the webhook of an operator in `namespace` serving `scope` injects: the sidecar flags.
    /// The controller reads the same, to tell pods injected otherwise (outdated) apart.
    pub fn inject_config(
        &self,
        namespace: &str,
        scope: &crate::scope::Scope,
    ) -> Result<InjectConfig, StartError> {
        let mut config =
            InjectConfig::new(&self.sidecar_image, env!("CARGO_PKG_VERSION"), namespace);
        config.image_pull_policy = self.sidecar_image_pull_policy.clone();
        for name in &self.sidecar_image_pull_secrets {
            if !name.is_empty() && !config.image_pull_secrets.contains(name) {
                config.image_pull_secrets.push(name.clone());
            }
        }
        config.allowed_images = self.allowed_images()?;
        if let Some(json) = self
            .sidecar_resources
            .as_deref()
            .filter(|j| !j.trim().is_empty())
        {
            config.default_resources = default_resources(json)?;
        }
        config.excluded_namespaces = self.excluded_namespaces(namespace);
        config.scope = scope.clone();
        config.run_as_user = self.sidecar_run_as_user.0;
        config.run_as_group = self.sidecar_run_as_group.0;
        Ok(config)
    }
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No serving certificate.
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    /// The CA file of files mode could not be read.
    #[error("reading {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An entry of `--allowed-sidecar-images` is not an image, repository or prefix.
    #[error(transparent)]
    AllowedImages(#[from] images::InvalidRule),
    /// `--sidecar-resources` is not JSON ResourceRequirements.
    #[error(
        "--sidecar-resources (SIDEGATE_SIDECAR_RESOURCES) is not JSON ResourceRequirements: {0}"
    )]
    SidecarResources(#[source] serde_json::Error),
    /// `--sidecar-resources` holds resources the apiserver would refuse on a container.
    #[error(
        "--sidecar-resources (SIDEGATE_SIDECAR_RESOURCES) would make the apiserver refuse every injected pod: {0}"
    )]
    SidecarResourcesRefused(String),
    /// `--cert-validity-days` outside [`CERT_VALIDITY_DAYS`].
    #[error(
        "--cert-validity-days {0} is not from 1 to 3650 (days a self-managed webhook certificate is valid; the chart's webhook.selfManaged.validityDays)"
    )]
    CertValidity(u64),
    /// The listener could not be bound.
    #[error("binding the webhook listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The sidecar's default resources from `--sidecar-resources`: JSON ResourceRequirements that
/// the apiserver accepts on a container (else every pod injected with them would be refused).
pub fn default_resources(json: &str) -> Result<ResourceRequirements, StartError> {
    let resources = serde_json::from_str(json).map_err(StartError::SidecarResources)?;
    let problems = crate::resources::problems(&resources, "resources");
    if problems.is_empty() {
        Ok(resources)
    } else {
        Err(StartError::SidecarResourcesRefused(problems.join("; ")))
    }
}

/// What the admission handler needs.
pub struct WebhookState {
    /// Client for AIGateway lookups.
    pub client: kube::Client,
    /// Injection settings.
    pub config: InjectConfig,
    /// Where admissions are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Starts the webhook described by `args` for an operator in `namespace`: gets a certificate
/// (failing if none can be had), binds the listener and spawns the server and the certificate
/// upkeep. A self-managed certificate's Secret is owned by `owner` (the operator's Deployment,
/// [`crate::owner`]). Returns the bound address.
pub async fn start(
    client: kube::Client,
    args: &WebhookArgs,
    namespace: &str,
    scope: &crate::scope::Scope,
    metrics: Arc<crate::metrics::Metrics>,
    owner: Option<&OwnerReference>,
) -> Result<SocketAddr, StartError> {
    let resolver = Arc::new(CertResolver::reporting_expiry(
        metrics.webhook_certificate_expiry.clone(),
    ));
    match args.cert_mode {
        CertMode::SelfManaged => {
            let (validity, renew_before) = args.cert_validity()?;
            let settings = SelfManaged {
                namespace: namespace.to_owned(),
                secret_name: args.webhook_secret.clone(),
                webhook_config_name: args.webhook_config_name.clone(),
                names: SelfManaged::service_names(
                    &args.webhook_service,
                    namespace,
                    &args.extra_names,
                ),
                validity,
                renew_before,
                owner: owner.cloned(),
                replica: Replica::find(
                    owner.map(|o| o.name.as_str()),
                    args.pod_template_hash.as_deref(),
                    args.pod_name.as_deref(),
                ),
            };
            let cert = SelfManagedCert::new(client.clone(), settings);
            cert.ensure(&resolver).await?;
            tokio::spawn(cert.keep(resolver.clone(), Duration::from_secs(args.cert_check_secs)));
        }
        CertMode::CertManager | CertMode::Files => {
            let files = CertFiles {
                cert: args.tls_cert_file.clone(),
                key: args.tls_key_file.clone(),
            };
            files.load(&resolver)?;
            if let (CertMode::Files, Some(ca_file)) = (args.cert_mode, &args.ca_file) {
                let ca = std::fs::read_to_string(ca_file).map_err(|source| StartError::CaFile {
                    path: ca_file.clone(),
                    source,
                })?;
                certs::trust(&client, &args.webhook_config_name, &[&ca]).await?;
            }
            tokio::spawn(files.keep_loaded(resolver.clone(), CertFiles::RELOAD_EVERY));
        }
    }
    let config = args.inject_config(namespace, scope)?;
    let addr = SocketAddr::new(args.webhook_bind, args.webhook_port);
    let listener = crate::admin::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let tls = resolver.server_config()?;
    tracing::info!(%bound, mode = ?args.cert_mode, "sidecar injection webhook listening");
    tokio::spawn(serve(
        listener,
        tls,
        Arc::new(WebhookState {
            client,
            config,
            metrics,
        }),
    ));
    Ok(bound)
}

/// Serves `POST /mutate` (and `GET /healthz`) over TLS on `listener` until the task is dropped,
/// within [`Limits::WEBHOOK`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<WebhookState>,
) {
    serve_within(listener, tls, state, Limits::WEBHOOK).await;
}

async fn serve_within(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<WebhookState>,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(tls);
    let failures = state.metrics.accept_failures("webhook");
    crate::listener::accept_loop(listener, limits, "webhook", failures, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let state = state.clone();
        async move {
            // A client that never finishes the handshake has the time it would have for its
            // headers.
            let tls =
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(handle(req, &state, limits.body_read_timeout).await)
                }
            });
            if let Err(e) = crate::listener::http1(&limits)
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        }
    })
    .await;
}

async fn handle(
    req: Request<Incoming>,
    state: &WebhookState,
    body_read_timeout: Duration,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
        }
        (&Method::POST, MUTATE_PATH) => {
            let body = Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect();
            let body = match tokio::time::timeout(body_read_timeout, body).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => {
                    return respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        Bytes::from(format!("body: {e}\n")),
                    );
                }
                Err(_) => {
                    return respond(
                        StatusCode::REQUEST_TIMEOUT,
                        "text/plain",
                        Bytes::from(format!(
                            "body: not received within {}s\n",
                            body_read_timeout.as_secs_f32()
                        )),
                    );
                }
            };
            let review = review(state, &body).await;
            match serde_json::to_vec(&review) {
                Ok(json) => respond(StatusCode::OK, "application/json", Bytes::from(json)),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    Bytes::from(format!("response: {e}\n")),
                ),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Answers one AdmissionReview (JSON bytes). Denies only a pod whose own spec rules the sidecar
/// out ([`inject::InjectError::is_in_the_pod`]); another pod the webhook cannot handle is
/// admitted unchanged with a warning, like `failurePolicy: Ignore` would.
pub async fn review(state: &WebhookState, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> =
        match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                r.try_into()
                    .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
            }) {
            Ok(r) => r,
            Err(e) => {
                return AdmissionResponse::invalid(format!("not an AdmissionReview v1: {e}"))
                    .into_review();
            }
        };
    admit(state, &request).await.into_review()
}

/// Answers for one pod and counts the outcome (pods without the annotation are not counted).
async fn admit(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let (response, result) = decide(state, request).await;
    if let Some(result) = result {
        state.metrics.admission(result);
    }
    response
}

/// The answer for one pod and how to count it (`None`: not a pod asking for a sidecar).
async fn decide(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, Option<&'static str>) {
    let allow = AdmissionResponse::from(request);
    if request.operation != Operation::Create
        || request.kind.kind != "Pod"
        || !request.kind.group.is_empty()
    {
        return (allow, None);
    }
    let Some(object) = request.object.as_ref() else {
        return (allow, None);
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => {
            return (
                with_warning(
                    allow,
                    format!("sidegate: pod not injected: unreadable pod: {e}"),
                ),
                Some("error"),
            );
        }
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
        .unwrap_or_default();

    let gateway = match inject::requested_gateway(&pod, &namespace, &state.config) {
        Ok(gw) => gw,
        Err(Skip::NotRequested) => return (allow, None),
        Err(skip) => {
            tracing::info!(
                namespace,
                pod = pod_name,
                reason = skip.reason(),
                "sidecar injection skipped"
            );
            // The pod asked for a gateway this operator does not serve: say so to whoever
            // created it (kubectl prints admission warnings).
            let allow = match &skip {
                Skip::UnwatchedNamespace(ns) => with_warning(
                    allow,
                    format!(
                        "sidegate: this operator does not serve namespace {ns} (--watch-namespace); pod created without the sidegate sidecar"
                    ),
                ),
                Skip::WindowsPod => with_warning(
                    allow,
                    "sidegate: the pod runs on Windows nodes (spec.os.name or its kubernetes.io/os node selector), where the sidegate sidecar (a Linux image) cannot run; pod created without the sidegate sidecar".to_owned(),
                ),
                Skip::InvalidGatewayName(name) => with_warning(
                    allow,
                    format!(
                        "sidegate: annotation sidegate.dev/gateway {:?} is not an AIGateway name (lowercase letters, digits, '-' and '.', at most 63 characters); pod created without the sidegate sidecar",
                        name.chars().take(80).collect::<String>()
                    ),
                ),
                Skip::MirrorPod => with_warning(
                    allow,
                    "sidegate: the mirror pod of a static pod cannot mount the sidecar's config and keys (the apiserver refuses mirror pods that reference Secrets); pod created without the sidegate sidecar".to_owned(),
                ),
                _ => allow,
            };
            return (allow, Some("skipped"));
        }
    };
    let gateways: Api<AIGateway> = Api::namespaced(state.client.clone(), &namespace);
    // The envFrom objects are read alongside the gateway, so the two take no longer than one.
    let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
    let (found, env_from) = tokio::join!(
        tokio::time::timeout_at(deadline, gateways.get_opt(&gateway)),
        read_env_from_keys(
            &state.client,
            &namespace,
            inject::env_from_sources(&pod),
            deadline
        ),
    );
    let found = match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(namespace, pod = pod_name, gateway, error = %e, "AIGateway lookup failed; pod admitted without sidecar");
            return (
                with_warning(
                    allow,
                    format!("sidegate: pod not injected: reading AIGateway {gateway} failed: {e}"),
                ),
                Some("error"),
            );
        }
        Err(_) => {
            tracing::warn!(
                namespace,
                pod = pod_name,
                gateway,
                "AIGateway lookup timed out; pod admitted without sidecar"
            );
            return (
                with_warning(
                    allow,
                    format!("sidegate: pod not injected: reading AIGateway {gateway} timed out"),
                ),
                Some("error"),
            );
        }
    };
    let Some(gw) = found else {
        tracing::info!(
            namespace,
            pod = pod_name,
            gateway,
            reason = "gateway-not-found",
            "sidecar injection skipped"
        );
        return (
            with_warning(
                allow,
                format!(
                    "sidegate: AIGateway {gateway} does not exist in namespace {namespace}; pod created without the sidegate sidecar"
                ),
            ),
            Some("skipped"),
        );
    };
    let sidecar = gw.spec.sidecar.clone().unwrap_or_default();
    let settings = InjectSettings {
        config: &state.config,
        namespace: &namespace,
        sidecar: &sidecar,
        env_from: &env_from,
    };
    match inject::inject(&pod, &settings) {
        Ok(Some(injection)) => {
            tracing::info!(
                namespace,
                pod = pod_name,
                gateway,
                native = sidecar.native_sidecar,
                "sidecar injected"
            );
            let mut response = match allow.clone().with_patch(injection.patch) {
                Ok(r) => r,
                Err(e) => {
                    return (
                        with_warning(allow, format!("sidegate: pod not injected: {e}")),
                        Some("error"),
                    );
                }
            };
            if !injection.warnings.is_empty() {
                response.warnings = Some(injection.warnings);
            }
            (response, Some("injected"))
        }
        // Already injected (a retried admission).
        Ok(None) => (allow, Some("skipped")),
        // The pod's own spec rules the sidecar out: refused with what to change (a Deployment's
        // pods show it as the ReplicaSet's FailedCreate events and ReplicaFailure condition)
        // rather than left to run without the gateway it asked for.
        Err(e) if e.is_in_the_pod() => {
            tracing::info!(namespace, pod = pod_name, gateway, error = %e, "pod denied: its spec rules the sidecar out");
            (
                allow.deny(format!(
                    "sidegate: the pod asks for the sidecar of AIGateway {gateway} ({}), but {e}",
                    inject::GATEWAY_ANNOTATION
                )),
                Some("denied"),
            )
        }
        Err(e) => {
            tracing::warn!(namespace, pod = pod_name, gateway, error = %e, "sidecar injection refused");
            (
                with_warning(allow, format!("sidegate: pod not injected: {e}")),
                Some("error"),
            )
        }
    }
}

/// The keys of `sources` in `namespace`, read until `deadline` ([`MAX_ENV_FROM_LOOKUPS`] at
/// most). A Secret's values are dropped as soon as its keys are taken, and never logged.
async fn read_env_from_keys(
    client: &kube::Client,
    namespace: &str,
    sources: BTreeSet<EnvSource>,
    deadline: tokio::time::Instant,
) -> EnvFromKeys {
    let mut keys = EnvFromKeys::default();
    let mut sources = sources.into_iter();
    let read: Vec<_> = sources.by_ref().take(MAX_ENV_FROM_LOOKUPS).collect();
    keys.0.extend(sources.map(|source| {
        (
            source,
            EnvSourceKeys::Unreadable(format!("more than {MAX_ENV_FROM_LOOKUPS} envFrom objects")),
        )
    }));
    let found: Vec<(EnvSource, EnvSourceKeys)> = futures_util::stream::iter(read)
        .map(|source| async move {
            let found = tokio::time::timeout_at(
                deadline,
                read_env_source_keys(client, namespace, &source),
            )
            .await;
            let found = match found {
                Ok(Ok(Some(keys))) => EnvSourceKeys::Found(keys),
                Ok(Ok(None)) => EnvSourceKeys::NotFound,
                Ok(Err(e)) => {
                    tracing::warn!(namespace, object = %source, error = %e, "reading an envFrom object failed; its containers keep their base URLs to envFrom");
                    EnvSourceKeys::Unreadable(match &e {
                        kube::Error::Api(status) if !status.reason.is_empty() => {
                            format!("{} {}", status.code, status.reason)
                        }
                        _ => "read failed".to_owned(),
                    })
                }
                Err(_) => {
                    tracing::warn!(namespace, object = %source, "reading an envFrom object timed out; its containers keep their base URLs to envFrom");
                    EnvSourceKeys::Unreadable("timed out".to_owned())
                }
            };
            (source, found)
        })
        .buffer_unordered(CONCURRENT_ENV_FROM_LOOKUPS)
        .collect()
        .await;
    keys.0.extend(found);
    keys
}

/// The keys kubelet makes variables of (`data`) of `source` in `namespace`; `None` if it does
/// not exist.
async fn read_env_source_keys(
    client: &kube::Client,
    namespace: &str,
    source: &EnvSource,
) -> Result<Option<BTreeSet<String>>, kube::Error> {
    Ok(match source {
        EnvSource::ConfigMap(name) => Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|cm| cm.data.unwrap_or_default().into_keys().collect()),
        EnvSource::Secret(name) => Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|secret| secret.data.unwrap_or_default().into_keys().collect()),
    })
}

fn with_warning(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(warning);
    response
}

/// The MutatingWebhookConfiguration the operator expects (the chart ships the same): Pod
/// CREATE only, `failurePolicy: Ignore`, never in `excluded_namespaces`, and only pods that carry
/// the gateway annotation are sent at all (a CEL match condition), so an outage of the webhook
/// cannot slow down unrelated pods.
pub fn configuration(
    name: &str,
    client_config: WebhookClientConfig,
    excluded_namespaces: &BTreeSet<String>,
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([("app.kubernetes.io/name".to_owned(), "sidegate".to_owned())].into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            failure_policy: Some("Ignore".into()),
            timeout_seconds: Some(5),
            reinvocation_policy: Some("Never".into()),
            match_policy: Some("Equivalent".into()),
            client_config,
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "NotIn".into(),
                    values: Some(excluded_namespaces.iter().cloned().collect()),
                }]),
                ..LabelSelector::default()
            }),
            match_conditions: Some(vec![MatchCondition {
                name: "has-gateway-annotation".into(),
                expression: format!(
                    "has(object.metadata.annotations) && '{}' in object.metadata.annotations",
                    inject::GATEWAY_ANNOTATION
                ),
            }]),
            ..MutatingWebhook::default()
        }]),
    }
}

/// Client config pointing at Service `service` in `namespace`, port 443 → the webhook port.
pub fn service_client_config(
    service: &str,
    namespace: &str,
    ca_bundle: Option<&str>,
) -> WebhookClientConfig {
    WebhookClientConfig {
        service: Some(ServiceReference {
            name: service.into(),
            namespace: namespace.into(),
            path: Some(MUTATE_PATH.into()),
            port: Some(443),
        }),
        ca_bundle: ca_bundle.map(|b| ByteString(b.as_bytes().to_vec())),
        url: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Limits = Limits {
        max_connections: 8,
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
    };

    /// The webhook under `limits` on a loopback port (its client never reached: these requests
    /// never look a gateway up), and a TLS client config trusting its CA.
    async fn webhook(limits: Limits) -> (SocketAddr, Arc<rustls::ClientConfig>) {
        let cert = certs::generate(&["127.0.0.1".to_owned()], Duration::from_secs(86400))
            .expect("certificate");
        let resolver = Arc::new(CertResolver::new());
        resolver.set(&cert.serving).expect("loaded");
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("url"),
        ))
        .expect("client");
        let state = Arc::new(WebhookState {
            client,
            config: InjectConfig::new("img", "0.1.0", "sidegate-system"),
            metrics: Arc::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tls = resolver.server_config().expect("server config");
        tokio::spawn(serve_within(listener, tls, state, limits));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert.ca_pem.as_bytes()).expect("CA PEM"))
            .expect("CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
        (addr, Arc::new(config))
    }

    async fn tls_connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .expect("handshake")
    }

    /// What the server sends until it closes the connection; `None` if it is still open after
    /// 5 s.
    async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await {
            // A TLS peer that drops the connection without close_notify is an error here.
            Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
            Err(_) => None,
        }
    }

    #[test]
    fn the_sidecar_uid_and_gid_flags_take_a_number_or_none_and_never_root_as_the_uid() {
        assert_eq!(parse_uid("65532"), Ok(IdFlag(Some(65532))));
        assert_eq!(parse_uid("none"), Ok(IdFlag(None)));
        assert_eq!(parse_uid(""), Ok(IdFlag(None)));
        assert_eq!(parse_gid("0"), Ok(IdFlag(Some(0))));
        let root = parse_uid("0").expect_err("root refused");
        assert!(root.contains("non-root"), "{root}");
        for bad in ["-1", "nobody", "4294967296"] {
            let e = parse_uid(bad).expect_err(bad);
            assert!(e.contains(bad) && e.contains("'none'"), "{e}");
        }
        // The defaults, through clap: what the chart's values map to.
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        let cli = Cli::try_parse_from(["x"]).expect("defaults");
        let config = cli
            .webhook
            .inject_config("sidegate-system", &crate::scope::Scope::cluster())
            .expect("config");
        assert_eq!(
            (config.run_as_user, config.run_as_group),
            (Some(65532), Some(65532))
        );
        let cli = Cli::try_parse_from([
            "x",
            "--sidecar-run-as-user=none",
            "--sidecar-run-as-group=none",
        ])
        .expect("none");
        assert_eq!(
            (
                cli.webhook.sidecar_run_as_user,
                cli.webhook.sidecar_run_as_group
            ),
            (IdFlag(None), IdFlag(None))
        );
        assert!(Cli::try_parse_from(["x", "--sidecar-run-as-user=0"]).is_err());
    }

    #[test]
    fn the_sidecar_pull_policy_is_one_the_apiserver_accepts() {
        use clap::{CommandFactory as _, Parser as _};
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        for policy in PULL_POLICIES {
            let cli =
                Cli::try_parse_from(["x", "--sidecar-image-pull-policy", policy]).expect(policy);
            let config = cli
                .webhook
                .inject_config("sidegate-system", &crate::scope::Scope::cluster())
                .expect("config");
            assert_eq!(config.image_pull_policy.as_deref(), Some(policy));
        }
        assert_eq!(
            Cli::try_parse_from(["x"])
                .expect("unset")
                .webhook
                .sidecar_image_pull_policy,
            None
        );
        // Anything else (the apiserver is case-sensitive too) is refused at start, naming them.
        for bad in ["Sometimes", "always", "", "IfNotPresent "] {
            let e = Cli::try_parse_from(["x", "--sidecar-image-pull-policy", bad])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            let text = e.to_string();
            assert!(
                PULL_POLICIES.iter().all(|p| text.contains(p)),
                "{bad:?}: {text}"
            );
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("Always") && help.contains("IfNotPresent") && help.contains("Never"),
            "{help}"
        );
    }

    #[derive(clap::Parser)]
    struct WebhookCli {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    fn webhook_flags(flags: &[&str]) -> Result<WebhookArgs, clap::Error> {
        use clap::Parser as _;
        WebhookCli::try_parse_from(std::iter::once("x").chain(flags.iter().copied()))
            .map(|cli| cli.webhook)
    }

    #[test]
    fn a_one_day_certificate_is_valid_one_day_and_renewed_four_hours_before_its_end() {
        let one = webhook_flags(&["--cert-validity-days=1"]).expect("1 day");
        assert_eq!(
            one.cert_validity().expect("valid"),
            (Duration::from_secs(86400), Duration::from_secs(4 * 3600))
        );
        let default = webhook_flags(&[]).expect("defaults");
        assert_eq!(
            default.cert_validity().expect("valid").0,
            Duration::from_secs(365 * 86400)
        );
        assert!(webhook_flags(&["--cert-validity-days=3650"]).is_ok());
        // Outside 1-3650 (the chart's schema range) the operator refuses to start, saying so,
        // rather than serving some other lifetime.
        for bad in ["0", "3651"] {
            let e = webhook_flags(&["--cert-validity-days", bad])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            let text = e.to_string();
            assert!(
                text.contains("--cert-validity-days") && text.contains("1..=3650"),
                "{text}"
            );
        }
        let mut zero = default;
        zero.cert_validity_days = 0;
        let e = zero.cert_validity().expect_err("0 days");
        assert!(
            e.to_string()
                .contains("--cert-validity-days 0 is not from 1 to 3650"),
            "{e}"
        );
    }

    #[test]
    fn sidecar_image_pull_secrets_are_secret_names_given_once() {
        let args = webhook_flags(&[
            "--sidecar-image-pull-secrets",
            "registry-a, registry-b,registry-a,",
        ])
        .expect("names");
        let config = args
            .inject_config("sidegate-system", &crate::scope::Scope::cluster())
            .expect("config");
        assert_eq!(config.image_pull_secrets, ["registry-a", "registry-b"]);
        assert!(
            webhook_flags(&[])
                .expect("unset")
                .inject_config("sidegate-system", &crate::scope::Scope::cluster())
                .expect("config")
                .image_pull_secrets
                .is_empty()
        );
        let e = webhook_flags(&["--sidecar-image-pull-secrets", "Registry_A"])
            .expect_err("not a Secret name");
        assert!(e.to_string().contains("is not a Secret name"), "{e}");
    }

    #[tokio::test]
    async fn a_webhook_client_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (addr, client) = webhook(SHORT).await;
        // No TLS handshake at all.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert_eq!(until_closed(&mut tcp).await.as_deref(), Some(""));
        // A handshake, then no request.
        let mut tls = tls_connect(addr, &client).await;
        assert_eq!(until_closed(&mut tls).await.as_deref(), Some(""));
        // Headers, then not the body they announce: answered 408 after the body timeout.
        let mut tls = tls_connect(addr, &client).await;
        tls.write_all(
            b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .expect("write");
        let answer = until_closed(&mut tls).await.expect("answered and closed");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        // Served as before otherwise.
        let mut tls = tls_connect(addr, &client).await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut tls).await.expect("answered");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[test]
    fn default_sidecar_resources_the_apiserver_would_refuse_stop_the_start() {
        let accepted = default_resources(
            r#"{"requests":{"cpu":"50m","memory":"32Mi"},"limits":{"memory":"256Mi"}}"#,
        )
        .expect("accepted");
        assert_eq!(
            accepted,
            InjectConfig::new("img", "0.1.0", "sidegate-system").default_resources
        );
        let refused =
            default_resources(r#"{"requests":{"memory":"1Gi"},"limits":{"memory":"256Mi"}}"#)
                .expect_err("a request above its limit");
        assert_eq!(
            refused.to_string(),
            "--sidecar-resources (SIDEGATE_SIDECAR_RESOURCES) would make the apiserver refuse every injected pod: resources.requests.memory 1Gi is more than limits.memory 256Mi (a request may not exceed its limit)"
        );
        assert!(matches!(
            default_resources("{not json"),
            Err(StartError::SidecarResources(_))
        ));
    }
}
