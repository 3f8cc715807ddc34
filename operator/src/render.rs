//! Pure rendering of an AIGateway, the ProviderKeys it selects and the Secrets they reference into
//! ConfigMap `sidegate-<gw>` (`gateway.yaml`) and Secret `sidegate-<gw>-keys` (key files).
//!
//! No I/O here: the reconciler fetches, this module decides. Problems with single keys (missing
//! Secret, missing key, duplicate alias) do not stop rendering: the other keys are served and the
//! problems are reported in status.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_crds::config::{CONFIG_FILE_NAME, TOKENS_FILE_NAME};
use sidegate_crds::{GatewayConfig, GatewayIdentity, GatewayPolicy, SCHEMA_VERSION};

use crate::validate;

/// File name, in the keys Secret, of the Redis URL.
pub const REDIS_URL_FILE_NAME: &str = "redis.url";

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "sidegate-operator";

/// Label naming the AIGateway a rendered object belongs to.
pub const GATEWAY_LABEL: &str = "sidegate.dev/gateway";

/// Label marking objects the operator manages (its owned-object watches select on it).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Annotation carrying the content hash on the rendered objects.
pub const CONFIG_HASH_ANNOTATION: &str = "sidegate.dev/config-hash";

/// Name of the ConfigMap rendered for gateway `gw`.
pub fn config_map_name(gw: &str) -> String {
    format!("sidegate-{gw}")
}

/// Name of the keys Secret rendered for gateway `gw`.
pub fn keys_secret_name(gw: &str) -> String {
    format!("sidegate-{gw}-keys")
}

/// Why the objects of a gateway could not be rendered at all.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The gateway lacks a field the apiserver always sets (name, namespace, uid).
    #[error("AIGateway has no metadata.{0}")]
    MissingMetadata(&'static str),
    /// `gateway.yaml` could not be written.
    #[error("gateway.yaml could not be serialized: {0}")]
    Yaml(String),
    /// The key digest input could not be serialized.
    #[error("hash input could not be serialized: {0}")]
    Hash(String),
}

/// A problem with one key reference, phrased so a person knows what to fix. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// Kind and name of the object with the reference, e.g. `ProviderKey openai-main`.
    pub source: String,
    /// Reason in PascalCase (`SecretNotFound`, `KeyNotFound`, `KeyEmpty`, `DuplicateAlias`, ...).
    pub reason: &'static str,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.detail)
    }
}

/// Everything the reconciler needs from one render.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// ConfigMap `sidegate-<gw>` with `gateway.yaml`.
    pub config_map: ConfigMap,
    /// Secret `sidegate-<gw>-keys` with `<provider>.<alias>`, `authentication.tokens`, `redis.url`.
    pub secret: Secret,
    /// `sha256:<hex>` over the policy, key index and key digests.
    pub hash: String,
    /// Provider id → aliases rendered.
    pub key_index: BTreeMap<String, Vec<String>>,
    /// Keys or Secrets that could not be resolved.
    pub problems: Vec<KeyProblem>,
}

impl Rendered {
    /// Number of provider keys rendered.
    pub fn key_count(&self) -> usize {
        self.key_index.values().map(Vec::len).sum()
    }
}

/// Whether a ProviderKey is selected by a gateway's `providerKeySelector` (absent or empty = all).
/// A selector that cannot be evaluated selects nothing (and is reported by [`validate`]).
pub fn selects(selector: Option<&LabelSelector>, key: &ProviderKey) -> bool {
    match selector {
        None => true,
        Some(sel) => match Selector::try_from(sel.clone()) {
            Ok(sel) => sel.matches(key.labels()),
            Err(_) => false,
        },
    }
}

/// Parses a selector for validation, naming the problem.
pub fn parse_selector(sel: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(sel.clone()).map_err(|e| e.to_string())
}

/// Names of the Secrets (in the gateway's namespace) a gateway reads: token, Redis URL and the
/// selected ProviderKeys' Secrets.
pub fn referenced_secrets<'a>(
    gateway: &'a AIGateway,
    keys: impl IntoIterator<Item = &'a ProviderKey>,
) -> Vec<String> {
    let policy = &gateway.spec.policy;
    let mut names: Vec<String> = keys
        .into_iter()
        .map(|k| k.spec.secret_ref.name.clone())
        .collect();
    if let Some(r) = policy
        .authentication
        .as_ref()
        .and_then(|a| a.token_secret_ref.as_ref())
    {
        names.push(r.name.clone());
    }
    if let Some(r) = policy
        .redis
        .as_ref()
        .and_then(|r| r.url_secret_ref.as_ref())
    {
        names.push(r.name.clone());
    }
    names.sort();
    names.dedup();
    names
}

/// One resolved key file. `Debug` does not print the value.
#[derive(Clone)]
pub struct KeyMaterial(Vec<u8>);

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial(<{} bytes>)", self.0.len())
    }
}

/// Reads the key a ProviderKey points at from its Secret (`None` = the Secret does not exist).
///
/// Values are trimmed of surrounding whitespace: Secrets made with `--from-file` end in a newline
/// that no provider key contains. aws-bedrock keys are assembled from `accessKeyId`,
/// `secretAccessKey`, optional `sessionToken` and `spec.region` into one JSON object.
pub fn resolve_key(key: &ProviderKey, secret: Option<&Secret>) -> Result<KeyMaterial, KeyProblem> {
    let source = format!("ProviderKey {}", key.name_any());
    let secret_name = &key.spec.secret_ref.name;
    let problem = |reason, detail: String| KeyProblem {
        source: source.clone(),
        reason,
        detail,
    };
    let Some(secret) = secret else {
        return Err(problem(
            "SecretNotFound",
            format!("Secret {secret_name} not found"),
        ));
    };
    let get = |k: &str| -> Result<Vec<u8>, KeyProblem> {
        let raw = secret_value(secret, k).ok_or_else(|| {
            problem(
                "KeyNotFound",
                format!("Secret {secret_name} has no key '{k}'"),
            )
        })?;
        let value = raw.trim_ascii().to_vec();
        if value.is_empty() {
            return Err(problem(
                "KeyEmpty",
                format!("Secret {secret_name} key '{k}' is empty"),
            ));
        }
        Ok(value)
    };
    if key.spec.provider == "aws-bedrock" {
        let text = |k: &str| -> Result<String, KeyProblem> {
            String::from_utf8(get(k)?).map_err(|_| {
                problem(
                    "KeyInvalid",
                    format!("Secret {secret_name} key '{k}' is not UTF-8"),
                )
            })
        };
        let creds = AwsCredentials {
            access_key_id: text("accessKeyId")?,
            secret_access_key: text("secretAccessKey")?,
            session_token: match secret_value(secret, "sessionToken") {
                Some(_) => Some(text("sessionToken")?),
                None => None,
            },
            region: key.spec.region.clone(),
        };
        let json = serde_json::to_vec(&creds).map_err(|_| {
            problem(
                "KeyInvalid",
                "AWS credentials could not be encoded".to_owned(),
            )
        })?;
        return Ok(KeyMaterial(json));
    }
    let Some(k) = key.spec.secret_ref.key.as_deref() else {
        return Err(problem(
            "KeyNotFound",
            "secretRef.key is not set".to_owned(),
        ));
    };
    get(k).map(KeyMaterial)
}

/// The `aws-bedrock.<alias>` key file: JSON credentials the sidecar signs requests with.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AwsCredentials {
    access_key_id: String,
    secret_access_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

fn secret_value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(&v.0);
    }
    // Only set on objects not yet round-tripped through the apiserver (tests, dry runs).
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(String::as_bytes)
}

/// Reads a secret referenced by the gateway spec (tokens, Redis URL).
fn resolve_ref(
    what: &str,
    r: &sidegate_crds::policy::SecretKeyRef,
    secrets: &BTreeMap<String, Secret>,
) -> Result<Vec<u8>, KeyProblem> {
    let problem = |reason, detail: String| KeyProblem {
        source: format!("AIGateway {what}"),
        reason,
        detail,
    };
    let secret = secrets
        .get(&r.name)
        .ok_or_else(|| problem("SecretNotFound", format!("Secret {} not found", r.name)))?;
    let raw = secret_value(secret, &r.key).ok_or_else(|| {
        problem(
            "KeyNotFound",
            format!("Secret {} has no key '{}'", r.name, r.key),
        )
    })?;
    let value = raw.trim_ascii();
    if value.is_empty() {
        return Err(problem(
            "KeyEmpty",
            format!("Secret {} key '{}' is empty", r.name, r.key),
        ));
    }
    Ok(value.to_vec())
}

/// What the hash covers: everything the sidecar sees, with key values replaced by digests.
#[derive(Serialize)]
struct HashInput<'a> {
    schema_version: u32,
    spec: &'a GatewayPolicy,
    keys: &'a BTreeMap<String, Vec<String>>,
    files: BTreeMap<&'a str, String>,
}

/// Renders the owned objects of `gateway` from the ProviderKeys it selects (`keys`, any order)
/// and the Secrets of its namespace by name (`secrets`).
pub fn render(
    gateway: &AIGateway,
    keys: &[ProviderKey],
    secrets: &BTreeMap<String, Secret>,
) -> Result<Rendered, RenderError> {
    let name = gateway
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingMetadata("name"))?;
    let namespace = gateway
        .metadata
        .namespace
        .clone()
        .ok_or(RenderError::MissingMetadata("namespace"))?;
    let uid = gateway
        .metadata
        .uid
        .clone()
        .ok_or(RenderError::MissingMetadata("uid"))?;

    let mut problems = Vec::new();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut key_index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Which ProviderKey supplied each file, and the base URLs ProviderKeys ask for.
    let mut file_source: BTreeMap<String, String> = BTreeMap::new();
    let mut base_urls: BTreeMap<String, (String, String)> = BTreeMap::new();

    let mut sorted: Vec<&ProviderKey> = keys.iter().collect();
    sorted.sort_by_key(|k| k.name_any());
    for key in sorted {
        let pk_name = key.name_any();
        let provider = &key.spec.provider;
        let alias = &key.spec.alias;
        let problem = |reason, detail: String| KeyProblem {
            source: format!("ProviderKey {pk_name}"),
            reason,
            detail,
        };
        if !sidegate_crds::provider::is_valid_provider_id(provider) {
            problems.push(problem(
                "InvalidProvider",
                format!("provider '{provider}' is not a SPEC.md provider id or custom-<slug>"),
            ));
            continue;
        }
        if !sidegate_crds::provider::is_valid_alias(alias) {
            problems.push(problem(
                "InvalidAlias",
                format!("alias '{alias}' must be 1-63 letters, digits, '-' or '_'"),
            ));
            continue;
        }
        if let Some(url) = &key.spec.base_url
            && let Err(why) =
                validate::upstream_url(url, &namespace, validate::allows_insecure(key))
        {
            problems.push(problem("InvalidBaseURL", format!("baseURL {why}")));
            continue;
        }
        let file = format!("{provider}.{alias}");
        if let Some(first) = file_source.get(&file) {
            problems.push(problem(
                "DuplicateAlias",
                format!(
                    "{provider}/{alias} is also provided by ProviderKey {first}, which is used"
                ),
            ));
            continue;
        }
        let material = match resolve_key(key, secrets.get(&key.spec.secret_ref.name)) {
            Ok(m) => m,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        if let Some(url) = &key.spec.base_url {
            match base_urls.get(provider) {
                Some((other_pk, other)) if other != url => problems.push(problem(
                    "ConflictingBaseURL",
                    format!(
                        "baseURL {url} differs from {other} of ProviderKey {other_pk} for provider {provider}; {other} is used"
                    ),
                )),
                Some(_) => {}
                None => {
                    base_urls.insert(provider.clone(), (pk_name.clone(), url.clone()));
                }
            }
        }
        files.insert(file.clone(), material.0);
        file_source.insert(file, pk_name.clone());
        key_index
            .entry(provider.clone())
            .or_default()
            .push(alias.clone());
    }
    for aliases in key_index.values_mut() {
        aliases.sort();
    }

    // The policy as the sidecar sees it: Kubernetes references resolved into key files.
    let mut policy = gateway.spec.policy.clone();
    if let Some(auth) = policy.authentication.as_mut()
        && let Some(r) = auth.token_secret_ref.take()
    {
        match resolve_ref("authentication.tokenSecretRef", &r, secrets) {
            Ok(v) => {
                files.insert(TOKENS_FILE_NAME.to_owned(), v);
            }
            Err(p) => problems.push(p),
        }
    }
    if let Some(redis) = policy.redis.as_mut()
        && let Some(r) = redis.url_secret_ref.take()
    {
        match resolve_ref("redis.urlSecretRef", &r, secrets) {
            Ok(v) => {
                files.insert(REDIS_URL_FILE_NAME.to_owned(), v);
            }
            Err(p) => problems.push(p),
        }
    }
    for (provider, (_, url)) in base_urls {
        let settings = policy.providers.entry(provider).or_default();
        // The gateway's own override wins over a ProviderKey's.
        if settings.base_url.is_none() {
            settings.base_url = Some(url);
        }
    }

    let hash_input = HashInput {
        schema_version: SCHEMA_VERSION,
        spec: &policy,
        keys: &key_index,
        files: files
            .iter()
            .map(|(k, v)| (k.as_str(), hex::encode(Sha256::digest(v))))
            .collect(),
    };
    let canonical =
        serde_json::to_vec(&hash_input).map_err(|e| RenderError::Hash(e.to_string()))?;
    let hash = format!("sha256:{}", hex::encode(Sha256::digest(&canonical)));

    let config = GatewayConfig {
        schema_version: SCHEMA_VERSION,
        gateway: GatewayIdentity {
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
            generation: gateway.metadata.generation,
            hash: Some(hash.clone()),
        },
        spec: policy,
        keys: key_index.clone(),
    };
    let yaml = serde_saphyr::to_string(&config).map_err(|e| RenderError::Yaml(e.to_string()))?;

    let owner = OwnerReference {
        api_version: "sidegate.dev/v1alpha1".to_owned(),
        kind: "AIGateway".to_owned(),
        name: name.clone(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let meta = |object_name: String| ObjectMeta {
        name: Some(object_name),
        namespace: Some(namespace.clone()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "sidegate".to_owned()),
            (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
            (GATEWAY_LABEL.to_owned(), name.clone()),
        ])),
        annotations: Some(BTreeMap::from([(
            CONFIG_HASH_ANNOTATION.to_owned(),
            hash.clone(),
        )])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let config_map = ConfigMap {
        metadata: meta(config_map_name(&name)),
        data: Some(BTreeMap::from([(CONFIG_FILE_NAME.to_owned(), yaml)])),
        ..ConfigMap::default()
    };
    let secret = Secret {
        metadata: meta(keys_secret_name(&name)),
        type_: Some("Opaque".to_owned()),
        data: Some(files.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    };
    Ok(Rendered {
        config_map,
        secret,
        hash,
        key_index,
        problems,
    })
}

/// Label selector (for watches) of the objects the operator renders.
pub fn managed_selector() -> String {
    Selector::from(Expression::Equal(
        MANAGED_BY_LABEL.to_owned(),
        FIELD_MANAGER.to_owned(),
    ))
    .to_string()
}

/// Whether `existing` already carries everything `desired` sets (data, labels, annotations,
/// owner), so applying it would change nothing and is skipped.
pub fn config_map_up_to_date(existing: &ConfigMap, desired: &ConfigMap) -> bool {
    existing.data == desired.data && meta_up_to_date(&existing.metadata, &desired.metadata)
}

/// Same as [`config_map_up_to_date`] for the keys Secret.
pub fn secret_up_to_date(existing: &Secret, desired: &Secret) -> bool {
    existing.data.clone().unwrap_or_default() == desired.data.clone().unwrap_or_default()
        && existing.type_ == desired.type_
        && meta_up_to_date(&existing.metadata, &desired.metadata)
}

fn meta_up_to_date(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>,
                    want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    contains(&existing.labels, &desired.labels)
        && contains(&existing.annotations, &desired.annotations)
        && desired.owner_references.iter().flatten().all(|want| {
            existing
                .owner_references
                .iter()
                .flatten()
                .any(|have| have == want)
        })
}
