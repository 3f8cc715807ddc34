//! The `sidegate.dev/v1alpha1` custom resources: [`AIGateway`] and [`ProviderKey`].
//!
//! Validation that the apiserver can do lives in the schema (patterns, ranges, enums, CEL rules);
//! what needs other objects or annotations (Secrets, URL policy, route graphs) is checked by the
//! operator and reported in status conditions.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::GatewayPolicy;
use crate::provider::{ALIAS_PATTERN, PROVIDER_ID_PATTERN};

/// API group of the sidegate resources.
pub const GROUP: &str = "sidegate.dev";

/// API version of the sidegate resources.
pub const VERSION: &str = "v1alpha1";

/// Annotation (value `"true"`) on an AIGateway or ProviderKey that allows plain-http upstreams
/// outside the cluster and link-local/metadata addresses; off by default.
pub const ALLOW_INSECURE_UPSTREAM_ANNOTATION: &str = "sidegate.dev/allow-insecure-upstream";

/// A provider API key stored in a Secret, offered to the AIGateways that select it.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sidegate.dev",
    version = "v1alpha1",
    kind = "ProviderKey",
    namespaced,
    shortname = "pk",
    status = "ProviderKeyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Provider", "type":"string", "jsonPath":".spec.provider"}"#,
    printcolumn = r#"{"name":"Alias", "type":"string", "jsonPath":".spec.alias"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].reason", "description":"Why the resource is (not) ready"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.provider != 'aws-bedrock' || has(self.region)",
        "message": "aws-bedrock keys need spec.region (e.g. us-east-1)"
    },
    {
        "rule": "self.provider == 'aws-bedrock' || has(self.secretRef.key)",
        "message": "secretRef.key is required (only aws-bedrock keys read fixed keys accessKeyId, secretAccessKey, sessionToken)"
    },
    {
        "rule": "!has(self.region) || self.provider in ['aws-bedrock', 'google-vertex-ai']",
        "message": "region is only used by aws-bedrock and google-vertex-ai keys"
    }
]))]
pub struct ProviderKeySpec {
    /// Provider id from SPEC.md (openai, anthropic, aws-bedrock, ...) or `custom-<slug>`.
    #[schemars(regex(pattern = PROVIDER_ID_PATTERN))]
    pub provider: String,
    /// Name clients select the key by with `cf-aig-byok-alias`; `default` is used when they name none.
    #[serde(default = "default_alias")]
    #[schemars(regex(pattern = ALIAS_PATTERN))]
    pub alias: String,
    /// Where the key value lives. For aws-bedrock the Secret holds `accessKeyId`,
    /// `secretAccessKey` and optionally `sessionToken`, and `key` is not used.
    pub secret_ref: ProviderKeySecretRef,
    /// Upstream base URL this key is sent to, replacing SPEC.md's default. A gateway has one per
    /// provider: its own `providers.<id>.baseURL` if set (then this key is served only if it
    /// names none or the same), otherwise the one of the oldest ProviderKey of the provider it
    /// selects; keys of ProviderKeys that disagree are not served (`BaseURLConflict`). https;
    /// plain http only to in-cluster services unless the `sidegate.dev/allow-insecure-upstream`
    /// annotation is "true".
    #[serde(default, rename = "baseURL", skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 2048),
        extend("x-kubernetes-validations" = [{
            "rule": "isURL(self) && url(self).getScheme() in ['https', 'http'] && url(self).getHostname() != ''",
            "message": "baseURL must be an absolute http(s) URL, e.g. https://api.openai.com/v1"
        }])
    )]
    pub base_url: Option<String>,
    /// Cloud region: required for aws-bedrock (signing), optional for google-vertex-ai.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z]{2,}(-[a-z0-9]+)+$"), length(max = 32))]
    pub region: Option<String>,
}

fn default_alias() -> String {
    "default".to_owned()
}

/// A Secret in the ProviderKey's namespace and the key within it that holds the provider key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderKeySecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data (not used for aws-bedrock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = "^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

/// Observed state of a ProviderKey.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderKeyStatus {
    /// `Ready` and `SecretFound`, with reasons and messages naming what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A gateway: its policy (auth, cache, limits, routes, DLP, ...), which ProviderKeys it serves,
/// and how its sidecar runs. The operator renders it into ConfigMap `sidegate-<name>` and Secret
/// `sidegate-<name>-keys`; pods annotated `sidegate.dev/gateway: <name>` get the sidecar.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sidegate.dev",
    version = "v1alpha1",
    kind = "AIGateway",
    namespaced,
    shortname = "aigw",
    status = "AIGatewayStatus",
    derive = "PartialEq",
    derive = "Default",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63")
        .message("AIGateway names are at most 63 characters (the name is the sidegate.dev/gateway label value of the ConfigMap and Secret it owns)"),
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].reason", "description":"Why the resource is (not) ready"}"#,
    printcolumn = r#"{"name":"Keys", "type":"integer", "jsonPath":".status.keyCount", "description":"Provider keys rendered into the gateway"}"#,
    printcolumn = r#"{"name":"Hash", "type":"string", "jsonPath":".status.configHash", "description":"Content hash of the rendered config and keys"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AIGatewaySpec {
    /// Which ProviderKeys in this namespace the gateway serves; empty or absent selects all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_key_selector: Option<LabelSelector>,
    /// How the injected sidecar container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSettings>,
    /// The gateway policy, rendered into `gateway.yaml` for the sidecar.
    #[serde(flatten)]
    pub policy: GatewayPolicy,
}

/// Settings of the sidecar container the webhook injects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.port != self.adminPort",
    "message": "port and adminPort must differ"
}]))]
pub struct SidecarSettings {
    /// Sidecar image; defaults to the operator's configured image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// CPU and memory of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Inject as a native sidecar (init container with `restartPolicy: Always`, Kubernetes 1.29+),
    /// so it starts before and stops after the app; false injects a regular container.
    #[serde(default = "yes")]
    pub native_sidecar: bool,
    /// Port of the gateway on 127.0.0.1.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Port of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub admin_port: u16,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            image: None,
            resources: None,
            native_sidecar: true,
            port: default_port(),
            admin_port: default_admin_port(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_port() -> u16 {
    8787
}
fn default_admin_port() -> u16 {
    8788
}

/// Observed state of an AIGateway. Never holds key values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AIGatewayStatus {
    /// `Ready`, `KeysResolved` and `ConfigRendered`, with reasons and messages naming what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Content hash (`sha256:<hex>`) of the rendered config and keys; changes only when they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Number of provider keys rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_count: Option<u32>,
    /// Aliases rendered per provider (names only, never values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_keys: Vec<ProviderAliases>,
    /// Pods annotated `sidegate.dev/gateway: <this gateway>` that run without the sidecar
    /// (created before the AIGateway, or while the webhook could not inject them); restart them
    /// to get it. An `UninjectedPods` Event names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninjected_pods: Option<u32>,
    /// Pods naming this gateway whose sidecar was injected with another image or other sidecar
    /// settings (`spec.sidecar`, the operator's sidecar flags) than the webhook injects now;
    /// restart them to get the current sidecar. An `OutdatedSidecars` Event names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_pods: Option<u32>,
}

/// The key aliases a gateway holds for one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderAliases {
    /// Provider id.
    pub provider: String,
    /// Aliases, sorted.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// Condition types and reasons used in status.
pub mod conditions {
    /// Everything needed to serve is in place.
    pub const READY: &str = "Ready";
    /// Every selected ProviderKey (and token/redis Secret) was resolved to a value.
    pub const KEYS_RESOLVED: &str = "KeysResolved";
    /// The ConfigMap and Secret hold the current spec.
    pub const CONFIG_RENDERED: &str = "ConfigRendered";
    /// The ProviderKey's Secret and key exist.
    pub const SECRET_FOUND: &str = "SecretFound";
}
