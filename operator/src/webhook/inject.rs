//! Sidecar injection as a pure function: a Pod and the settings of its gateway in, a JSON patch
//! out. No I/O; the admission handler looks the gateway and the pod's `envFrom` objects up
//! ([`env_from_sources`], [`EnvFromKeys`]) and calls [`inject`].
//!
//! The patch is written operation by operation (not diffed), so it only ever adds: the apiserver
//! applies it to its own copy of the Pod, and fields this crate does not know survive.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvFromSource, EnvVar,
    HTTPGetAction, LocalObjectReference, Pod, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use sha2::Digest as _;
use sidegate_crds::api::SidecarSettings;
use sidegate_crds::config::CONFIG_FILE_NAME;

use super::images::AllowedImages;
use crate::render::{config_map_name, keys_secret_name};

/// Sidecar image injected when neither the operator's flags nor the AIGateway name one.
pub const DEFAULT_SIDECAR_IMAGE: &str =
    concat!("ghcr.io/sidegate/sidegate:", env!("CARGO_PKG_VERSION"));

/// Pod annotation naming the AIGateway (same namespace) whose sidecar the pod gets.
pub const GATEWAY_ANNOTATION: &str = "sidegate.dev/gateway";
/// Pod annotation that opts a pod out (`"false"`) even when it names a gateway.
pub const INJECT_ANNOTATION: &str = "sidegate.dev/inject";
/// Annotation the webhook sets on injected pods; the value is the operator version.
pub const INJECTED_ANNOTATION: &str = "sidegate.dev/injected";
/// Annotation the webhook sets on injected pods: the sidecar image injected.
pub const SIDECAR_IMAGE_ANNOTATION: &str = "sidegate.dev/sidecar-image";
/// Annotation the webhook sets on injected pods: [`InjectedWith::settings_hash`] of the sidecar
/// settings injected.
pub const SIDECAR_SETTINGS_ANNOTATION: &str = "sidegate.dev/sidecar-settings";
/// Pod annotation (`"true"`) that has the webhook set the SDK base URLs on containers with
/// `envFrom` too, overriding what envFrom gives them (see [`SDK_BASE_URL_VARIABLES`]).
pub const OVERRIDE_ENV_FROM_ANNOTATION: &str = "sidegate.dev/override-env-from";
/// Annotation the webhook sets on injected pods whose containers keep base URLs of their
/// `envFrom` (the sidecar's were not set there): `<container>: VAR,VAR; <container>: ...`, with
/// ` (envFrom not read)` after a container whose envFrom objects could not be read.
pub const ENV_KEPT_ANNOTATION: &str = "sidegate.dev/env-kept";

/// Name of the injected container.
pub const SIDECAR_CONTAINER: &str = "sidegate";
/// Volume holding ConfigMap `sidegate-<gw>` (gateway.yaml).
pub const CONFIG_VOLUME: &str = "sidegate-config";
/// Volume holding Secret `sidegate-<gw>-keys` (one file per provider key).
pub const KEYS_VOLUME: &str = "sidegate-keys";
/// Mount path of the config volume in the sidecar.
pub const CONFIG_DIR: &str = "/etc/sidegate/config";
/// Mount path of the keys volume in the sidecar.
pub const KEYS_DIR: &str = "/etc/sidegate/keys";
/// Name of the admin port (probes, metrics); at most 15 characters.
pub const ADMIN_PORT_NAME: &str = "sidegate-admin";
/// Uid and gid the sidecar runs as by default (the distroless `nonroot` user, also the image's
/// numeric `USER`).
pub const SIDECAR_UID: i64 = 65532;

/// Environment variables the SDKs read their base URL from, and the sidecar route each points
/// at. Only variables whose SDK appends paths the route serves as they are:
/// - `OPENAI_BASE_URL`: openai SDKs (Python, Node, Go, Java, .NET), base ending before
///   `/chat/completions`; `OPENAI_API_BASE`: LangChain and openai-python before 1.0.
/// - `ANTHROPIC_BASE_URL`: anthropic SDKs, which append `/v1/messages`.
/// - `GOOGLE_GEMINI_BASE_URL`: google-genai (Python, JS) and the Gemini CLI, which append
///   `/v1beta/models/...`.
/// - `CO_API_URL`: cohere-python's default `base_url`, which appends `/v2/chat`.
/// - `GROQ_BASE_URL`: groq SDKs, which append `/openai/v1/...`; the `/groq` route accepts that
///   prefix as Cloudflare's does.
pub const SDK_BASE_URL_VARIABLES: &[(&str, &str)] = &[
    ("OPENAI_BASE_URL", "openai"),
    ("OPENAI_API_BASE", "openai"),
    ("ANTHROPIC_BASE_URL", "anthropic"),
    ("GOOGLE_GEMINI_BASE_URL", "google-ai-studio"),
    ("CO_API_URL", "cohere"),
    ("GROQ_BASE_URL", "groq"),
];

/// API key variables set to [`PLACEHOLDER_API_KEY`] when absent: those SDKs refuse to start
/// without one, and the sidecar replaces it with the stored key.
pub const PLACEHOLDER_KEY_VARIABLES: &[&str] = &["OPENAI_API_KEY", "ANTHROPIC_API_KEY"];

/// Value of the placeholder API keys.
pub const PLACEHOLDER_API_KEY: &str = "sidegate-managed";

/// `terminationGracePeriodSeconds` of a pod that sets none (the Kubernetes default).
pub const DEFAULT_TERMINATION_GRACE_SECS: i64 = 30;

/// Most of the pod's grace period the sidecar keeps for itself after its in-flight requests:
/// cutting the last ones, exporting their spans (up to 3 s), writing its last log lines.
pub const SHUTDOWN_MARGIN_SECS: u64 = 5;

/// Longest drain delay of a classic sidecar: the time its app has, after SIGTERM, to send its
/// last requests through it on new connections (as service-mesh sidecars give theirs).
pub const CLASSIC_DRAIN_DELAY_SECS: u64 = 5;

/// How the sidecar of a pod stops: `--shutdown-grace` and `--shutdown-delay` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownTiming {
    /// In-flight requests, LLM streams too, may run this long after SIGTERM: the pod's
    /// `terminationGracePeriodSeconds` minus a margin ([`SHUTDOWN_MARGIN_SECS`], at most half
    /// of it), at least 1.
    pub grace_secs: u64,
    /// New requests are still served this long after SIGTERM: 0 for a native sidecar, which
    /// kubelet stops only after the app containers exited; for a classic one, which gets
    /// SIGTERM together with its app, [`CLASSIC_DRAIN_DELAY_SECS`] at most half the grace.
    pub delay_secs: u64,
}

impl ShutdownTiming {
    /// The timing for a pod with `termination_grace_period_seconds` and a native or classic
    /// sidecar.
    pub fn for_pod(termination_grace_period_seconds: Option<i64>, native: bool) -> Self {
        let period = termination_grace_period_seconds
            .unwrap_or(DEFAULT_TERMINATION_GRACE_SECS)
            .max(0)
            .unsigned_abs();
        let grace_secs = period
            .saturating_sub(SHUTDOWN_MARGIN_SECS.min(period / 2))
            .max(1);
        let delay_secs = if native {
            0
        } else {
            CLASSIC_DRAIN_DELAY_SECS.min(grace_secs / 2)
        };
        Self {
            grace_secs,
            delay_secs,
        }
    }

    /// The sidecar's arguments for this timing (no `--shutdown-delay` when there is none).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--shutdown-grace".to_owned(), self.grace_secs.to_string()];
        if self.delay_secs > 0 {
            args.extend(["--shutdown-delay".to_owned(), self.delay_secs.to_string()]);
        }
        args
    }
}

/// Operator-wide injection settings (from flags).
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Sidecar image when the gateway names none.
    pub image: String,
    /// Pull policy of the sidecar image (`None`: the cluster default for the tag).
    pub image_pull_policy: Option<String>,
    /// Image pull secrets (Secret names in the pod's namespace) every injected pod gets, besides
    /// its own: for a sidecar image in a private registry.
    pub image_pull_secrets: Vec<String>,
    /// Version written into [`INJECTED_ANNOTATION`].
    pub version: String,
    /// Namespaces never injected (kube-system and the operator's own).
    pub excluded_namespaces: BTreeSet<String>,
    /// The namespaces the operator serves (`--watch-namespace`): pods elsewhere are left alone,
    /// as their gateways are not reconciled.
    pub scope: crate::scope::Scope,
    /// Resources when the gateway names none.
    pub default_resources: ResourceRequirements,
    /// Images a gateway's `spec.sidecar.image` may name.
    pub allowed_images: AllowedImages,
    /// `runAsUser` of the sidecar (`None`: not set; the platform assigns one, as OpenShift's
    /// restricted SCCs do, and `runAsNonRoot` with the image's numeric `USER` keeps it non-root).
    pub run_as_user: Option<i64>,
    /// `runAsGroup` of the sidecar (`None`: not set).
    pub run_as_group: Option<i64>,
}

impl InjectConfig {
    /// Settings with the usual defaults: excluded `kube-system` and `operator_namespace`,
    /// requests 50m CPU / 32Mi memory and a 256Mi memory limit, uid and gid [`SIDECAR_UID`],
    /// and gateways may name only other tags or digests of `image`'s repository.
    pub fn new(
        image: impl Into<String>,
        version: impl Into<String>,
        operator_namespace: &str,
    ) -> Self {
        let quantity = |s: &str| Quantity(s.to_owned());
        let image = image.into();
        Self {
            allowed_images: AllowedImages::repository_of(&image),
            image,
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            version: version.into(),
            excluded_namespaces: excluded_namespaces(operator_namespace, &[]),
            scope: crate::scope::Scope::cluster(),
            default_resources: ResourceRequirements {
                requests: Some(
                    [
                        ("cpu".to_owned(), quantity("50m")),
                        ("memory".to_owned(), quantity("32Mi")),
                    ]
                    .into(),
                ),
                limits: Some([("memory".to_owned(), quantity("256Mi"))].into()),
                ..ResourceRequirements::default()
            },
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
        }
    }
}

/// Namespaces the webhook never injects: kube-system (the control plane), the operator's own (it
/// must start while its webhook is down) and `extra` (`--exclude-namespace`). The controller
/// reads the same set, so pods there are not reported as waiting for a restart.
pub fn excluded_namespaces(operator_namespace: &str, extra: &[String]) -> BTreeSet<String> {
    ["kube-system", operator_namespace]
        .into_iter()
        .map(str::to_owned)
        .chain(extra.iter().map(|ns| ns.trim().to_owned()))
        .filter(|ns| !ns.is_empty())
        .collect()
}

/// Everything [`inject`] needs about one admission: operator settings, the namespace the pod is
/// created in (the Pod object may not carry it yet) and the gateway's sidecar settings.
#[derive(Debug, Clone, Copy)]
pub struct InjectSettings<'a> {
    /// Operator-wide settings.
    pub config: &'a InjectConfig,
    /// Namespace of the admission request.
    pub namespace: &'a str,
    /// `spec.sidecar` of the pod's AIGateway (defaults when absent).
    pub sidecar: &'a SidecarSettings,
    /// The keys of the objects the pod's `envFrom` names, as far as they were read: a
    /// container with an `envFrom` object not in here keeps all its base URLs to it.
    pub env_from: &'a EnvFromKeys,
}

/// An object a container's `envFrom` names, in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum EnvSource {
    /// `configMapRef`.
    ConfigMap(String),
    /// `secretRef`.
    Secret(String),
}

impl EnvSource {
    /// The object `entry` names (`None`: neither a ConfigMap nor a Secret, which the apiserver
    /// refuses after the webhook).
    pub fn of(entry: &EnvFromSource) -> Option<Self> {
        if let Some(r) = &entry.config_map_ref {
            Some(Self::ConfigMap(r.name.clone()))
        } else {
            entry
                .secret_ref
                .as_ref()
                .map(|r| Self::Secret(r.name.clone()))
        }
    }
}

impl std::fmt::Display for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConfigMap(name) => write!(f, "ConfigMap {name}"),
            Self::Secret(name) => write!(f, "Secret {name}"),
        }
    }
}

/// What reading one `envFrom` object found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSourceKeys {
    /// Its keys (ConfigMap `data`, Secret `data`: what kubelet turns into variables). Never
    /// the values.
    Found(BTreeSet<String>),
    /// It does not exist: it defines nothing where the reference is `optional: true`; otherwise
    /// the pod waits for it, which may be created with any keys.
    NotFound,
    /// It could not be read (forbidden, timed out, ...): why, without values.
    Unreadable(String),
}

/// The keys of the `envFrom` objects of one pod ([`env_from_sources`]), filled in by the
/// admission handler; empty (the default) when none were read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFromKeys(pub BTreeMap<EnvSource, EnvSourceKeys>);

/// The `envFrom` objects of the containers of `pod` that may get the SDK variables (app and
/// init containers), to be read into [`EnvFromKeys`]; none when the pod has the base URLs set
/// over envFrom anyway ([`OVERRIDE_ENV_FROM_ANNOTATION`]).
pub fn env_from_sources(pod: &Pod) -> BTreeSet<EnvSource> {
    if overrides_env_from(pod) {
        return BTreeSet::new();
    }
    let Some(spec) = pod.spec.as_ref() else {
        return BTreeSet::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.env_from.iter().flatten())
        .filter_map(EnvSource::of)
        .collect()
}

fn overrides_env_from(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OVERRIDE_ENV_FROM_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// What a pod injected now gets, as the webhook records it in the pod's annotations: the
/// operator compares it with what pods recorded to find those running an outdated sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InjectedWith {
    /// The sidecar image ([`SIDECAR_IMAGE_ANNOTATION`]).
    pub image: String,
    /// Short hash of the other settings that shape the sidecar container
    /// ([`SIDECAR_SETTINGS_ANNOTATION`]): pull policy, resources, native or not, ports, and the
    /// uid/gid when not the defaults.
    pub settings_hash: String,
}

/// The settings hashed into [`InjectedWith::settings_hash`], in a fixed order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HashedSettings<'a> {
    image_pull_policy: Option<&'a str>,
    resources: &'a ResourceRequirements,
    native_sidecar: bool,
    port: u16,
    admin_port: u16,
    // Left out at their defaults, so pods injected before these were settable stay current.
    #[serde(skip_serializing_if = "is_default_id")]
    run_as_user: Option<i64>,
    #[serde(skip_serializing_if = "is_default_id")]
    run_as_group: Option<i64>,
}

fn is_default_id(id: &Option<i64>) -> bool {
    *id == Some(SIDECAR_UID)
}

impl InjectedWith {
    /// What [`inject`] gives a pod of a gateway with `sidecar` settings under `config`: the
    /// gateway's values where it sets them, the operator's otherwise.
    pub fn new(config: &InjectConfig, sidecar: &SidecarSettings) -> Self {
        let hashed = HashedSettings {
            image_pull_policy: config.image_pull_policy.as_deref(),
            resources: sidecar
                .resources
                .as_ref()
                .unwrap_or(&config.default_resources),
            native_sidecar: sidecar.native_sidecar,
            port: sidecar.port,
            admin_port: sidecar.admin_port,
            run_as_user: config.run_as_user,
            run_as_group: config.run_as_group,
        };
        // Fields of plain types and BTreeMaps: the JSON, and so the hash, is deterministic.
        let json = serde_json::to_vec(&hashed).unwrap_or_default();
        let digest = sha2::Sha256::digest(&json);
        Self {
            image: sidecar
                .image
                .clone()
                .unwrap_or_else(|| config.image.clone()),
            settings_hash: hex::encode(&digest[..6]),
        }
    }
}

/// Why a pod gets no sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No `sidegate.dev/gateway` annotation (or an empty one).
    NotRequested,
    /// `sidegate.dev/inject: "false"`.
    OptedOut,
    /// `sidegate.dev/injected` is already set (re-invocation, or a pod copied from another).
    AlreadyInjected,
    /// The pod's namespace is excluded.
    ExcludedNamespace(String),
    /// The pod's namespace is not one the operator serves (`--watch-namespace`).
    UnwatchedNamespace(String),
    /// The pod runs on Windows nodes (`spec.os.name` or its `kubernetes.io/os` node selector):
    /// the sidecar is a Linux image, and its Linux-only securityContext would make the
    /// apiserver refuse the pod.
    WindowsPod,
    /// The annotation names no object an AIGateway could be (a DNS-1123 subdomain of at most
    /// 63 characters, as AIGateway names are): never looked up, never injected.
    InvalidGatewayName(String),
    /// A static pod's mirror (`kubernetes.io/config.mirror`): the apiserver refuses mirror pods
    /// that reference Secrets or ConfigMaps, and kubelet runs the static pod as its file says.
    MirrorPod,
}

impl Skip {
    /// Short reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotRequested => "not-requested",
            Self::OptedOut => "opted-out",
            Self::AlreadyInjected => "already-injected",
            Self::ExcludedNamespace(_) => "excluded-namespace",
            Self::UnwatchedNamespace(_) => "unwatched-namespace",
            Self::WindowsPod => "windows-pod",
            Self::InvalidGatewayName(_) => "invalid-gateway-name",
            Self::MirrorPod => "mirror-pod",
        }
    }
}

/// Why a pod that asks for a sidecar cannot get one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The pod already has a container or volume with a name the sidecar needs.
    #[error(
        "the pod already has a {kind} named {name:?}, which the sidegate sidecar needs; rename it, or remove the annotation sidegate.dev/gateway"
    )]
    NameTaken {
        /// `container` or `volume`.
        kind: &'static str,
        /// The clashing name.
        name: String,
    },
    /// A container of the pod that runs beside the sidecar declares a TCP port the sidecar
    /// listens on: one of the two would fail to listen (EADDRINUSE) and crash-loop, and with a
    /// native sidecar the pod would never leave its init phase.
    #[error(
        "container {container:?} declares containerPort {port}, which the sidegate sidecar of AIGateway {gateway} listens on ({role}), and both run at once: one of them could not listen. Set the AIGateway's spec.sidecar.port and spec.sidecar.adminPort to ports no container of the pod uses (or move the container's port), or annotate the pod sidegate.dev/inject: \"false\""
    )]
    PortTaken {
        /// The gateway whose sidecar would listen there.
        gateway: String,
        /// The container (or init container) declaring the port.
        container: String,
        /// The port.
        port: u16,
        /// `port` or `adminPort`.
        role: &'static str,
    },
    /// The gateway names a sidecar image the operator does not allow: whoever writes an
    /// AIGateway would choose the code that runs, with the keys, in other people's pods.
    #[error(
        "AIGateway {gateway} asks for sidecar image {image:?}, which this operator does not inject (allowed: {allowed}; operator flag --allowed-sidecar-images)"
    )]
    ImageNotAllowed {
        /// The gateway.
        gateway: String,
        /// `spec.sidecar.image`.
        image: String,
        /// What is allowed, for people.
        allowed: String,
    },
    /// The gateway's `spec.sidecar.resources` would make the apiserver refuse the pod: admitted
    /// without the sidecar, the pod at least runs (the gateway reports the same problems).
    #[error("AIGateway {gateway} sets sidecar resources the apiserver would refuse: {problems}")]
    InvalidResources {
        /// The gateway.
        gateway: String,
        /// What is wrong, field by field ([`crate::resources::problems`]).
        problems: String,
    },
    /// The pod uses the node's network: the sidecar's ports would be the node's, and its admin
    /// listener (all addresses) would be reachable from outside the cluster.
    #[error(
        "the pod uses hostNetwork, where the sidegate sidecar would listen on the node's ports (its admin port reachable from outside the cluster); remove hostNetwork, or the annotation sidegate.dev/gateway"
    )]
    HostNetwork,
    /// A patch value could not be serialized (not expected for valid Pods).
    #[error("patch value could not be serialized: {0}")]
    Serialize(String),
}

impl InjectError {
    /// Whether the pod's own spec rules the sidecar out (a name or port the sidecar needs,
    /// hostNetwork): however often it is re-created, the pod never gets the sidecar, so the
    /// webhook denies it, saying what to change, rather than let it run without the gateway it
    /// asked for. The other errors are the gateway's (its image or resources): its pods are
    /// admitted without the sidecar and the gateway's status says what to fix.
    pub fn is_in_the_pod(&self) -> bool {
        matches!(
            self,
            Self::NameTaken { .. } | Self::PortTaken { .. } | Self::HostNetwork
        )
    }
}

/// A patch that injects the sidecar, and warnings for the pod's creator.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// Gateway the sidecar serves.
    pub gateway: String,
    /// JSON patch (RFC 6902) against the admitted Pod.
    pub patch: Patch,
    /// Warnings returned in the AdmissionReview (shown by kubectl).
    pub warnings: Vec<String>,
}

/// Decides whether `pod`, created in `namespace`, gets a sidecar: the gateway name, or why not.
pub fn requested_gateway(
    pod: &Pod,
    namespace: &str,
    config: &InjectConfig,
) -> Result<String, Skip> {
    let gateway = requested_gateway_by_annotations(pod.metadata.annotations.as_ref())?;
    if config.excluded_namespaces.contains(namespace) {
        return Err(Skip::ExcludedNamespace(namespace.to_owned()));
    }
    if !config.scope.includes(namespace) {
        return Err(Skip::UnwatchedNamespace(namespace.to_owned()));
    }
    if is_windows_pod(pod) {
        return Err(Skip::WindowsPod);
    }
    Ok(gateway)
}

/// Whether `pod` runs on Windows nodes: `spec.os.name: windows` (which the apiserver checks the
/// securityContext against), or a `kubernetes.io/os: windows` node selector.
pub fn is_windows_pod(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let windows = |v: &str| v.trim().eq_ignore_ascii_case("windows");
    spec.os.as_ref().is_some_and(|os| windows(&os.name))
        || spec
            .node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .is_some_and(|os| windows(os))
}

/// The gateway pod annotations ask for a sidecar of, or why they ask for none (the namespace
/// aside): what [`requested_gateway`] reads, and the operator reads of pods it watches.
pub fn requested_gateway_by_annotations(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<String, Skip> {
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
    let gateway = match get(GATEWAY_ANNOTATION) {
        Some(gw) if !gw.is_empty() => gw.to_owned(),
        _ => return Err(Skip::NotRequested),
    };
    if get(INJECT_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Err(Skip::OptedOut);
    }
    if get(INJECTED_ANNOTATION).is_some() {
        return Err(Skip::AlreadyInjected);
    }
    if get(MIRROR_ANNOTATION).is_some() {
        return Err(Skip::MirrorPod);
    }
    if !crate::validate::is_dns_subdomain(&gateway, 63) {
        return Err(Skip::InvalidGatewayName(gateway));
    }
    Ok(gateway)
}

/// Kubelet's mark on the mirror pod of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The patch that adds the sidecar to `pod`; `None` when the pod gets none (see
/// [`requested_gateway`] for why).
pub fn inject(pod: &Pod, settings: &InjectSettings<'_>) -> Result<Option<Injection>, InjectError> {
    let Ok(gateway) = requested_gateway(pod, settings.namespace, settings.config) else {
        return Ok(None);
    };
    if let Some(image) = settings.sidecar.image.as_deref()
        && !settings.config.allowed_images.allows(image)
    {
        return Err(InjectError::ImageNotAllowed {
            gateway,
            image: image.to_owned(),
            allowed: settings.config.allowed_images.to_string(),
        });
    }
    if let Some(resources) = settings.sidecar.resources.as_ref() {
        let problems = crate::resources::problems(resources, "spec.sidecar.resources");
        if !problems.is_empty() {
            return Err(InjectError::InvalidResources {
                gateway,
                problems: problems.join("; "),
            });
        }
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let init_containers = spec.init_containers.unwrap_or_default();
    let volumes = spec.volumes.unwrap_or_default();
    let taken = |name: &str| {
        spec.containers
            .iter()
            .chain(&init_containers)
            .any(|c| c.name == name)
    };
    if taken(SIDECAR_CONTAINER) {
        return Err(InjectError::NameTaken {
            kind: "container",
            name: SIDECAR_CONTAINER.into(),
        });
    }
    if let Some(v) = volumes
        .iter()
        .find(|v| v.name == CONFIG_VOLUME || v.name == KEYS_VOLUME)
    {
        return Err(InjectError::NameTaken {
            kind: "volume",
            name: v.name.clone(),
        });
    }

    if spec.host_network == Some(true) {
        return Err(InjectError::HostNetwork);
    }
    let native = settings.sidecar.native_sidecar;
    if let Some((container, port, role)) =
        port_taken(&spec.containers, &init_containers, settings.sidecar)
    {
        return Err(InjectError::PortTaken {
            gateway,
            container: container.to_owned(),
            port,
            role,
        });
    }

    let mut ops = Ops::default();

    // The gateway annotation guarantees metadata.annotations exists.
    ops.add(
        &["metadata", "annotations", INJECTED_ANNOTATION],
        &settings.config.version,
    )?;
    let injected_with = InjectedWith::new(settings.config, settings.sidecar);
    ops.add(
        &["metadata", "annotations", SIDECAR_IMAGE_ANNOTATION],
        &injected_with.image,
    )?;
    ops.add(
        &["metadata", "annotations", SIDECAR_SETTINGS_ANNOTATION],
        &injected_with.settings_hash,
    )?;

    // Volumes: whole-object mounts (no subPath), so kubelet's updates reach the sidecar;
    // optional, so the pod starts before the operator has rendered them.
    let new_volumes = sidecar_volumes(&gateway);
    if pod.spec.as_ref().is_some_and(|s| s.volumes.is_some()) {
        for v in new_volumes {
            ops.add(&["spec", "volumes", "-"], v)?;
        }
    } else {
        ops.add(&["spec", "volumes"], new_volumes)?;
    }

    // The sidecar: first init container when native (so later init containers can use it),
    // last app container otherwise.
    let shutdown = ShutdownTiming::for_pod(spec.termination_grace_period_seconds, native);
    let mut sidecar = sidecar_container(settings, shutdown);
    // Pod-level resources: the sidecar's limits within the pod's, and the pod's requests
    // (sized for the app) grown to hold the sidecar's.
    if let Some(resources) = sidecar.resources.as_mut()
        && let Some(pod_spec) = pod.spec.as_ref()
    {
        crate::resources::cap_to_pod_limits(pod_spec, resources);
        if let Some(grown) = crate::resources::pod_level_with_sidecar(pod_spec, resources) {
            ops.add(&["spec", "resources"], grown)?;
        }
    }
    if native {
        if pod
            .spec
            .as_ref()
            .is_some_and(|s| s.init_containers.is_some())
        {
            ops.add(&["spec", "initContainers", "0"], sidecar)?;
        } else {
            ops.add(&["spec", "initContainers"], vec![sidecar])?;
        }
    } else {
        ops.add(&["spec", "containers", "-"], sidecar)?;
    }

    // The sidecar image's pull secrets next to the pod's own (kubelet tries each for every
    // image of the pod), none twice.
    let own_pull_secrets: BTreeSet<&str> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.as_str())
        .collect();
    let pull_secrets: Vec<LocalObjectReference> = settings
        .config
        .image_pull_secrets
        .iter()
        .filter(|name| !own_pull_secrets.contains(name.as_str()))
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();
    if !pull_secrets.is_empty() {
        if spec.image_pull_secrets.is_some() {
            for secret in pull_secrets {
                ops.add(&["spec", "imagePullSecrets", "-"], secret)?;
            }
        } else {
            ops.add(&["spec", "imagePullSecrets"], pull_secrets)?;
        }
    }

    // SDK environment on app containers; on init containers too when the sidecar runs before
    // them. Indices shift by one after the native sidecar is inserted at 0.
    let env = sdk_env(settings.sidecar.port);
    let env_from = EnvFromView {
        keys: settings.env_from,
        overridden: overrides_env_from(pod),
    };
    let mut kept = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        kept.extend(add_env(
            &mut ops,
            &["spec", "containers"],
            i,
            c,
            &env,
            env_from,
        )?);
    }
    if native {
        for (i, c) in init_containers.iter().enumerate() {
            kept.extend(add_env(
                &mut ops,
                &["spec", "initContainers"],
                i + 1,
                c,
                &env,
                env_from,
            )?);
        }
    }

    let mut warnings = Vec::new();
    if !kept.is_empty() {
        ops.add(
            &["metadata", "annotations", ENV_KEPT_ANNOTATION],
            env_kept_annotation(&kept),
        )?;
        warnings.extend(env_from_warnings(&kept, settings.sidecar.port));
    }
    if !native && is_job_pod(pod) {
        warnings.push(format!(
            "sidegate: AIGateway {gateway} injects a plain (non-native) sidecar, which keeps this Job's pod running after the app exits; set spec.sidecar.nativeSidecar: true"
        ));
    }
    Ok(Some(Injection {
        gateway,
        patch: Patch(ops.0),
        warnings,
    }))
}

/// The first container of a pod with `containers` and `init_containers` that declares a TCP
/// port the sidecar of `sidecar` listens on while both run (every container of a pod shares
/// one network namespace), with the port and its role (`port` or `adminPort`). A native sidecar
/// runs from the first init container on, so every container counts; a classic one starts with
/// the app containers, when the pod's init containers have ended, except its own native
/// sidecars (`restartPolicy: Always`), which keep running. Undeclared ports cannot be seen here:
/// the sidecar then says at start that its port is in use.
pub fn port_taken<'c>(
    containers: &'c [Container],
    init_containers: &'c [Container],
    sidecar: &SidecarSettings,
) -> Option<(&'c str, u16, &'static str)> {
    let sidecar_ports = [(sidecar.port, "port"), (sidecar.admin_port, "adminPort")];
    let beside = init_containers
        .iter()
        .filter(|c| sidecar.native_sidecar || c.restart_policy.as_deref() == Some("Always"));
    containers.iter().chain(beside).find_map(|c| {
        c.ports
            .iter()
            .flatten()
            .filter(|declared| declared.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .find_map(|declared| {
                sidecar_ports
                    .iter()
                    .find(|(p, _)| i32::from(*p) == declared.container_port)
            })
            .map(|(port, role)| (c.name.as_str(), *port, *role))
    })
}

/// The two volumes of gateway `gateway`.
pub fn sidecar_volumes(gateway: &str) -> Vec<Volume> {
    vec![
        Volume {
            name: CONFIG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(gateway),
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: KEYS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(keys_secret_name(gateway)),
                optional: Some(true),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

/// The sidecar container for `settings`, stopping as `shutdown` says.
pub fn sidecar_container(settings: &InjectSettings<'_>, shutdown: ShutdownTiming) -> Container {
    let sidecar = settings.sidecar;
    let config = settings.config;
    let admin_port = i32::from(sidecar.admin_port);
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(admin_port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(
            sidecar
                .image
                .clone()
                .unwrap_or_else(|| config.image.clone()),
        ),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(
            [
                "--config".into(),
                format!("{CONFIG_DIR}/{CONFIG_FILE_NAME}"),
                "--keys-dir".into(),
                KEYS_DIR.into(),
                "--listen".into(),
                format!("127.0.0.1:{}", sidecar.port),
                // Kubelet probes come from the node, so the admin listener cannot stay on loopback;
                // it serves only health and metrics, never keys. `[::]` is dual stack: the pod IP
                // may be IPv4 or IPv6 (the sidecar falls back to 0.0.0.0 on a kernel without IPv6).
                "--admin".into(),
                format!("[::]:{}", sidecar.admin_port),
                "--wait-for-config".into(),
                "--log-format".into(),
                "json".into(),
            ]
            .into_iter()
            .chain(shutdown.args())
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: admin_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Started = listening: the app's first request finds the gateway up.
        startup_probe: Some(probe("/healthz", 1, 60)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        // Ready = a valid config is loaded.
        readiness_probe: Some(probe("/readyz", 2, 3)),
        resources: Some(
            sidecar
                .resources
                .clone()
                .unwrap_or_else(|| config.default_resources.clone()),
        ),
        restart_policy: sidecar.native_sidecar.then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: config.run_as_user,
            run_as_group: config.run_as_group,
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CONFIG_VOLUME.into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: KEYS_VOLUME.into(),
                mount_path: KEYS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// SDK variables pointing at the sidecar on `port`, then the placeholder keys.
fn sdk_env(port: u16) -> Vec<EnvVar> {
    let urls = SDK_BASE_URL_VARIABLES.iter().map(|(name, route)| EnvVar {
        name: (*name).into(),
        value: Some(format!("http://127.0.0.1:{port}/{route}")),
        ..EnvVar::default()
    });
    let keys = PLACEHOLDER_KEY_VARIABLES.iter().map(|name| EnvVar {
        name: (*name).into(),
        value: Some(PLACEHOLDER_API_KEY.into()),
        ..EnvVar::default()
    });
    urls.chain(keys).collect()
}

/// Base URLs a container was not given because its `envFrom` sets them, or may.
#[derive(Debug)]
struct KeptToEnvFrom<'c> {
    container: &'c str,
    /// The variables left out, in [`SDK_BASE_URL_VARIABLES`] order.
    variables: Vec<&'static str>,
    /// The envFrom objects that could not be read, and why: all base URLs were left out.
    unread: Vec<String>,
}

/// The value of [`ENV_KEPT_ANNOTATION`].
fn env_kept_annotation(kept: &[KeptToEnvFrom<'_>]) -> String {
    kept.iter()
        .map(|k| {
            let unread = if k.unread.is_empty() {
                ""
            } else {
                " (envFrom not read)"
            };
            format!("{}: {}{unread}", k.container, k.variables.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Warnings for containers whose base URLs were left to their `envFrom`: those whose envFrom
/// sets them (their SDKs go where it points), and those whose envFrom could not be read.
fn env_from_warnings(kept: &[KeptToEnvFrom<'_>], port: u16) -> Vec<String> {
    let mut warnings = Vec::new();
    let (unread, read): (Vec<_>, Vec<_>) = kept.iter().partition(|k| !k.unread.is_empty());
    if !read.is_empty() {
        let list = read
            .iter()
            .map(|k| format!("{:?} ({})", k.container, k.variables.join(", ")))
            .collect::<Vec<_>>()
            .join(", ");
        warnings.push(format!(
            "sidegate: envFrom sets a provider's base URL in container(s) {list}, so the webhook did not set these variables there (an env entry would override envFrom's): those SDKs go where envFrom points, not through the sidecar; annotate the pod {OVERRIDE_ENV_FROM_ANNOTATION}: \"true\" to have the webhook set them over envFrom's values"
        ));
    }
    if !unread.is_empty() {
        let names = unread
            .iter()
            .map(|k| format!("{:?}", k.container))
            .collect::<Vec<_>>()
            .join(", ");
        let why: BTreeSet<&str> = unread
            .iter()
            .flat_map(|k| k.unread.iter().map(String::as_str))
            .collect();
        let why = why.into_iter().collect::<Vec<_>>().join("; ");
        let variables = SDK_BASE_URL_VARIABLES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ");
        warnings.push(format!(
            "sidegate: container(s) {names} take variables from envFrom that the webhook could not read ({why}), which an env entry would override, so the sidecar's base URLs ({variables}) were not set there: their SDKs go straight to the providers unless envFrom or env points them at http://127.0.0.1:{port}/<provider>; annotate the pod {OVERRIDE_ENV_FROM_ANNOTATION}: \"true\" to have the webhook set them over envFrom's values"
        ));
    }
    warnings
}

/// How [`add_env`] treats `envFrom`: the keys read, and whether the pod has the base URLs set
/// over it anyway.
#[derive(Clone, Copy)]
struct EnvFromView<'a> {
    keys: &'a EnvFromKeys,
    overridden: bool,
}

impl EnvFromView<'_> {
    /// The variables the webhook sets (base URLs, placeholder keys) that `c`'s envFrom defines
    /// (prefix + key), or why that is not known: the objects that could not be read (a missing
    /// one is unknown unless `optional`).
    fn defined_of(&self, c: &Container) -> Result<BTreeSet<&'static str>, Vec<String>> {
        let mut defined = BTreeSet::new();
        let mut unread = Vec::new();
        for entry in c.env_from.iter().flatten() {
            let Some(source) = EnvSource::of(entry) else {
                continue;
            };
            let optional = entry
                .config_map_ref
                .as_ref()
                .map(|r| r.optional)
                .or_else(|| entry.secret_ref.as_ref().map(|r| r.optional))
                .flatten()
                .unwrap_or(false);
            let prefix = entry.prefix.as_deref().unwrap_or("");
            match self.keys.0.get(&source) {
                Some(EnvSourceKeys::Found(keys)) => defined.extend(
                    SDK_BASE_URL_VARIABLES
                        .iter()
                        .map(|(name, _)| *name)
                        .chain(PLACEHOLDER_KEY_VARIABLES.iter().copied())
                        .filter(|name| {
                            name.strip_prefix(prefix)
                                .is_some_and(|key| keys.contains(key))
                        }),
                ),
                Some(EnvSourceKeys::NotFound) if optional => {}
                Some(EnvSourceKeys::NotFound) => unread.push(format!("{source}: not found")),
                Some(EnvSourceKeys::Unreadable(why)) => unread.push(format!("{source}: {why}")),
                None => unread.push(format!("{source}: not read")),
            }
        }
        if unread.is_empty() {
            Ok(defined)
        } else {
            Err(unread)
        }
    }
}

/// The provider a placeholder key variable is for.
fn key_route(name: &str) -> &'static str {
    if name.starts_with("ANTHROPIC_") {
        "anthropic"
    } else {
        "openai"
    }
}

fn route_of(name: &str) -> Option<&'static str> {
    SDK_BASE_URL_VARIABLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, route)| *route)
}

/// Adds the variables of `env` that container `c` (at `index` after injection) does not set.
/// A provider the container points somewhere under any of its variable names, in `env` or in
/// its `envFrom` objects, is left alone: an `env` entry would override envFrom's (a ConfigMap
/// pointing the SDK at an in-cluster model server), and e.g. LangChain prefers
/// `OPENAI_API_BASE` over the app's own `OPENAI_BASE_URL`. Where the envFrom objects could not
/// be read, all base URLs are left out. Unless the pod overrides envFrom, returns the base URLs
/// left out for envFrom's sake. A container with `envFrom` gets no placeholder keys: the app's
/// own key may come from there.
fn add_env<'c>(
    ops: &mut Ops,
    list: &[&str],
    index: usize,
    c: &'c Container,
    env: &[EnvVar],
    env_from: EnvFromView<'_>,
) -> Result<Option<KeptToEnvFrom<'c>>, InjectError> {
    let set: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let configured_routes: BTreeSet<&str> = set.iter().filter_map(|name| route_of(name)).collect();
    let has_env_from = c.env_from.as_ref().is_some_and(|e| !e.is_empty());
    // What envFrom defines: `None` without envFrom or with the override (not read).
    let lookup = (has_env_from && !env_from.overridden).then(|| env_from.defined_of(c));
    // Routes left to envFrom: `None` for all of them (its objects could not be read).
    let (env_from_routes, unread) = match &lookup {
        Some(Ok(defined)) => (
            Some(defined.iter().filter_map(|n| route_of(n)).collect()),
            Vec::new(),
        ),
        Some(Err(unread)) => (None, unread.clone()),
        None => (Some(BTreeSet::new()), Vec::new()),
    };
    // A placeholder key is left to envFrom when its objects define it, or may (not read, or
    // the override: the app's own key may come from there), and when its provider's base URL
    // is (the key then goes to the app's own endpoint, not the sidecar).
    let key_left_to_env_from = |name: &str| {
        has_env_from
            && match &lookup {
                Some(Ok(defined)) => {
                    defined.contains(name)
                        || env_from_routes
                            .as_ref()
                            .is_some_and(|routes: &BTreeSet<&str>| routes.contains(key_route(name)))
                }
                _ => true,
            }
    };
    let unset: Vec<&EnvVar> = env
        .iter()
        .filter(|e| !set.contains(e.name.as_str()))
        .filter(|e| route_of(&e.name).is_none_or(|r| !configured_routes.contains(r)))
        .filter(|e| {
            !(PLACEHOLDER_KEY_VARIABLES.contains(&e.name.as_str()) && key_left_to_env_from(&e.name))
        })
        .collect();
    let left_to_env_from = |e: &EnvVar| {
        route_of(&e.name).is_some_and(|r| {
            env_from_routes
                .as_ref()
                .is_none_or(|routes: &BTreeSet<&str>| routes.contains(r))
        })
    };
    let (kept, missing): (Vec<&EnvVar>, Vec<&EnvVar>) =
        unset.into_iter().partition(|e| left_to_env_from(e));
    let kept = (!kept.is_empty()).then(|| KeptToEnvFrom {
        container: c.name.as_str(),
        variables: SDK_BASE_URL_VARIABLES
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| kept.iter().any(|e| e.name == *name))
            .collect(),
        unread,
    });
    if missing.is_empty() {
        return Ok(kept);
    }
    let index = index.to_string();
    let path = [list[0], list[1], index.as_str(), "env"];
    if c.env.is_some() {
        for e in missing {
            ops.add(&[path[0], path[1], path[2], path[3], "-"], e)?;
        }
    } else {
        ops.add(&path, missing)?;
    }
    Ok(kept)
}

fn is_job_pod(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job" && o.api_version.starts_with("batch/"))
}

#[derive(Default)]
struct Ops(Vec<PatchOperation>);

impl Ops {
    fn add(&mut self, path: &[&str], value: impl Serialize) -> Result<(), InjectError> {
        let value =
            serde_json::to_value(value).map_err(|e| InjectError::Serialize(e.to_string()))?;
        self.0.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(path.iter().copied()),
            value,
        }));
        Ok(())
    }
}
