//! `gateway.yaml`: the file the operator renders into ConfigMap `sidegate-<gateway>` and the
//! file a user writes to run the sidecar on its own. Key values are never in it, only the index
//! of which `<provider>.<alias>` files the keys directory holds.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::GatewayPolicy;

/// The `schemaVersion` this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// File name of the config in the ConfigMap and in the mounted directory.
pub const CONFIG_FILE_NAME: &str = "gateway.yaml";

/// File name, in the keys directory, of the gateway tokens (one per line).
pub const TOKENS_FILE_NAME: &str = "authentication.tokens";
/// File name, in the keys directory, of the Redis URL of `spec.redis`.
pub const REDIS_URL_FILE_NAME: &str = "redis.url";

/// Largest file of the keys directory the sidecar reads; a larger one fails the whole directory.
pub const MAX_KEY_FILE_SIZE: usize = 64 * 1024;

/// The gateway tokens of an `authentication.tokens` file as the sidecar reads them: one per
/// line, trimmed; blank lines and lines starting with `#` are skipped.
pub fn gateway_tokens(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The rendered (or hand-written) sidecar configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Format version of this file; the sidecar refuses versions it does not know.
    pub schema_version: u32,
    /// Which gateway this is.
    #[serde(default, deserialize_with = "crate::policy::null_as_default")]
    pub gateway: GatewayIdentity,
    /// The gateway policy (a key with nothing under it, every line commented out, is none).
    #[serde(default, deserialize_with = "crate::policy::null_as_default")]
    pub spec: GatewayPolicy,
    /// Key index: provider id → aliases present in the keys directory (never values).
    #[serde(
        default,
        deserialize_with = "crate::policy::null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub keys: BTreeMap<String, Vec<String>>,
}

/// Identity of the gateway a config was rendered from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayIdentity {
    /// Namespace of the AIGateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the AIGateway; also the gateway id accepted in long-form URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `metadata.generation` of the AIGateway when this content was rendered (a later spec change
    /// that renders the same content keeps it, so the file and its sidecars stay as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Content hash (`sha256:<hex>`) of the policy, key names and key digests (keyed with a salt
    /// that only the keys Secret holds, so the hash does not confirm guesses of a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}
