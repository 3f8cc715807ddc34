//! Pure rendering of an AIGateway, the ProviderKeys it selects and the Secrets they reference into
//! ConfigMap `sidegate-<gw>` (`gateway.yaml`) and Secret `sidegate-<gw>-keys` (key files).
//!
//! No I/O here: the reconciler fetches, this module decides. Problems with single keys (missing
//! Secret, missing key, duplicate alias, conflicting baseURL) do not stop rendering: the other
//! keys are served and the problems are reported in status.
//!
//! Conflicts between ProviderKeys are settled as Kubernetes settles such conflicts, the oldest
//! object winning ([`claim_order`]), so that whoever may only create ProviderKeys cannot take an
//! alias or a provider's base URL from the keys already there.

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
use sidegate_crds::config::{
    CONFIG_FILE_NAME, MAX_KEY_FILE_SIZE, TOKENS_FILE_NAME, gateway_tokens,
};
use sidegate_crds::policy::ProviderSettings;
use sidegate_crds::{GatewayConfig, GatewayIdentity, GatewayPolicy, SCHEMA_VERSION};

use crate::validate;

/// File name, in the keys Secret, of the Redis URL.
pub use sidegate_crds::config::REDIS_URL_FILE_NAME;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "sidegate-operator";

/// Label naming the AIGateway a rendered object belongs to.
pub const GATEWAY_LABEL: &str = "sidegate.dev/gateway";

/// Label marking objects the operator manages (its owned-object watches select on it).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Annotation carrying the content hash on the rendered objects.
pub const CONFIG_HASH_ANNOTATION: &str = "sidegate.dev/config-hash";

/// Name, in the keys Secret, of the gateway's [`HashSalt`] (hex). The sidecar skips files whose
/// names start with '.'.
pub const HASH_SALT_FILE_NAME: &str = ".hash-salt";

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
    /// No salt for the content hash could be drawn from the system's random number generator.
    #[error("the system random number generator failed to supply a hash salt")]
    Random,
}

/// Per-gateway random key of the key file digests in the content hash.
///
/// The hash is public (ConfigMap, status, sidecar metrics) while the files are secret; with
/// plain digests, anyone who reads the hash could test guesses of a low-entropy secret offline
/// (a gateway token that is the only file: guess, recompute, compare). Keyed with a salt that
/// lives only in the keys Secret, the digests tell nothing without it. The salt is kept across
/// reconciles (a new one would change the hash and reload every sidecar). `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct HashSalt([u8; 32]);

impl fmt::Debug for HashSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashSalt(<redacted>)")
    }
}

impl From<[u8; 32]> for HashSalt {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl HashSalt {
    /// A new salt from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, RenderError> {
        let bytes: [u8; 32] = ring::rand::generate(&ring::rand::SystemRandom::new())
            .map_err(|_| RenderError::Random)?
            .expose();
        Ok(Self(bytes))
    }

    /// The salt stored in a keys Secret rendered before, if it holds a well-formed one.
    pub fn stored_in(keys_secret: &Secret) -> Option<Self> {
        let hex = secret_value(keys_secret, HASH_SALT_FILE_NAME)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// The salt of the keys Secret rendered before (`existing`), or a new one when there is none
    /// or it is malformed.
    pub fn kept_or_new(existing: Option<&Secret>) -> Result<Self, RenderError> {
        match existing.and_then(Self::stored_in) {
            Some(salt) => Ok(salt),
            None => Self::generate(),
        }
    }

    /// HMAC-SHA256 of `content` under this salt, in hex.
    fn digest(&self, content: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        hex::encode(ring::hmac::sign(&key, content))
    }
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
    /// Secret `sidegate-<gw>-keys` with `<provider>.<alias>`, `authentication.tokens`, `redis.url`
    /// and the hash salt.
    pub secret: Secret,
    /// `sha256:<hex>` over the policy, key index and salted key digests.
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
        if json.len() > MAX_KEY_FILE_SIZE {
            return Err(problem(
                "KeyInvalid",
                format!(
                    "the AWS credentials of Secret {secret_name} {}",
                    too_large()
                ),
            ));
        }
        return Ok(KeyMaterial(json));
    }
    let Some(k) = key.spec.secret_ref.key.as_deref() else {
        return Err(problem(
            "KeyNotFound",
            "secretRef.key is not set".to_owned(),
        ));
    };
    let value = get(k)?;
    if value.len() > MAX_KEY_FILE_SIZE {
        return Err(problem(
            "KeyInvalid",
            format!("Secret {secret_name} key '{k}' {}", too_large()),
        ));
    }
    // The sidecar reads every key file as UTF-8 (one that is not fails the whole keys
    // directory) and sends keys in a header; a Google service account is JSON over lines.
    if std::str::from_utf8(&value).is_err() {
        return Err(problem(
            "KeyInvalid",
            format!("Secret {secret_name} key '{k}' is not UTF-8"),
        ));
    }
    if key.spec.provider != "google-vertex-ai" && !is_header_safe(&value) {
        return Err(problem(
            "KeyInvalid",
            format!(
                "Secret {secret_name} key '{k}' has a line break, control or non-ASCII character, which an HTTP header cannot carry; the sidecar could not send it"
            ),
        ));
    }
    Ok(KeyMaterial(value))
}

/// Whether `value` can be sent in an HTTP header as it is (visible ASCII, spaces and tabs).
fn is_header_safe(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// The order in which ProviderKeys claim a provider/alias and the base URL of a provider, as
/// Kubernetes resolves such conflicts: the oldest first (`metadata.creationTimestamp`), then by
/// name. A newcomer never displaces a ProviderKey that was there before it. A key without a
/// creation time (never stored by an apiserver) comes after those with one.
pub fn claim_order(key: &ProviderKey) -> impl Ord + use<> {
    let created = key.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (created.is_none(), created, key.name_any())
}

/// Why a ProviderKey in `namespace` claims no key file at all (provider id, alias or baseURL
/// refused); `None` when it claims `<provider>.<alias>`, whether or not its key resolves.
pub fn claim_problem(key: &ProviderKey, namespace: &str) -> Option<KeyProblem> {
    let (provider, alias) = (&key.spec.provider, &key.spec.alias);
    let problem = |reason, detail: String| {
        Some(KeyProblem {
            source: format!("ProviderKey {}", key.name_any()),
            reason,
            detail,
        })
    };
    if !sidegate_crds::provider::is_valid_provider_id(provider) {
        return problem(
            "InvalidProvider",
            format!("provider '{provider}' is not a SPEC.md provider id or custom-<slug>"),
        );
    }
    if !sidegate_crds::provider::is_valid_alias(alias) {
        return problem(
            "InvalidAlias",
            format!("alias '{alias}' must be 1-63 letters, digits, '-' or '_'"),
        );
    }
    if let Some(why) = validate::provider_key_base_url(key, namespace) {
        return problem("InvalidBaseURL", format!("baseURL {why}"));
    }
    None
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

/// Reads a secret referenced by the gateway spec (tokens, Redis URL) for keys directory file
/// `file`, checked as the sidecar reads that file.
fn resolve_ref(
    what: &str,
    file: &str,
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
    // The sidecar reads the file as UTF-8; one that is not fails the whole keys directory.
    let Ok(text) = std::str::from_utf8(value) else {
        return Err(problem(
            "KeyInvalid",
            format!("Secret {} key '{}' is not UTF-8", r.name, r.key),
        ));
    };
    let why = if value.len() > MAX_KEY_FILE_SIZE {
        Some(too_large())
    } else if file == TOKENS_FILE_NAME && gateway_tokens(text).next().is_none() {
        Some(
            "holds no token (one per line; blank lines and lines starting with # are skipped)"
                .to_owned(),
        )
    } else if file == REDIS_URL_FILE_NAME {
        redis_url_refused(text)
    } else {
        None
    };
    match why {
        Some(why) => Err(problem(
            "KeyInvalid",
            format!("Secret {} key '{}' {why}", r.name, r.key),
        )),
        None => Ok(value.to_vec()),
    }
}

/// The problem of a Redis URL the gateway names that can be neither rendered now nor kept from
/// the keys rendered last (`existing_keys`): the sidecar refuses a config with `redis` and no
/// URL, so the spec is not rendered until it can be (the config in use stays, as for an
/// invalid spec).
pub fn unrenderable_redis_url(
    gateway: &AIGateway,
    secrets: &BTreeMap<String, Secret>,
    existing_keys: Option<&Secret>,
) -> Option<String> {
    let r = gateway
        .spec
        .policy
        .redis
        .as_ref()?
        .url_secret_ref
        .as_ref()?;
    let problem = resolve_ref("redis.urlSecretRef", REDIS_URL_FILE_NAME, r, secrets).err()?;
    kept_file(existing_keys, REDIS_URL_FILE_NAME)
        .is_none()
        .then(|| format!("{problem} (the sidecar cannot load spec.redis without a Redis URL)"))
}

/// File `file` of the keys Secret rendered last, if it has one.
fn kept_file(existing_keys: Option<&Secret>, file: &str) -> Option<Vec<u8>> {
    existing_keys
        .and_then(|s| secret_value(s, file))
        .map(<[u8]>::to_vec)
}

/// Why a key file is too large for the sidecar (which then refuses the whole keys directory).
fn too_large() -> String {
    format!(
        "is larger than {} KiB, the most the sidecar reads from a key file",
        MAX_KEY_FILE_SIZE / 1024
    )
}

/// Why the sidecar would refuse a Redis URL, if it would: [`redis_url_problem`], then the
/// sidecar's own client parses it (what it refuses fails the whole config there). Never quotes
/// the URL, which may carry a password.
fn redis_url_refused(url: &str) -> Option<String> {
    redis_url_problem(url).or_else(|| {
        redis::Client::open(url).err().map(|e| {
            format!(
                "is not a Redis URL the sidecar's client takes ({}: a port past 65535, a space, a parameter it does not know?)",
                e.category()
            )
        })
    })
}

/// What the sidecar's Redis client refuses in a Redis URL, if anything: it speaks
/// `redis://`/`valkey://` (TCP, `[user][:password@]host[:port][/db]`) and `unix://`/
/// `redis+unix://`/`valkey+unix://` sockets, not TLS (`rediss://`), which it was built without.
fn redis_url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("is not a Redis URL (redis://host[:port][/db])".to_owned());
    };
    match scheme {
        "redis" | "valkey" => {}
        "unix" | "redis+unix" | "valkey+unix" => {
            return (!rest.starts_with('/'))
                .then(|| "is a unix socket URL without an absolute path".to_owned());
        }
        "rediss" | "valkeys" => {
            return Some(format!(
                "is a {scheme}:// (TLS) URL, which the sidecar does not speak; use redis:// (e.g. to a TLS proxy in the pod or cluster)"
            ));
        }
        _ => return Some(format!("has scheme {scheme}://, not redis:// or unix://")),
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) if !host_port.ends_with(']') => h,
        _ => host_port,
    };
    if host.is_empty() {
        return Some("has no host".to_owned());
    }
    if matches!(host, "0.0.0.0" | "[::]") {
        return Some("names a wildcard address (0.0.0.0 or ::), not a Redis host".to_owned());
    }
    let db = path
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .trim_matches('/');
    (!db.is_empty() && db.parse::<i64>().is_err())
        .then(|| format!("has database {db:?}, which is not a number"))
}

/// What the hash covers: everything the sidecar sees, with key values replaced by their digests
/// keyed with the gateway's [`HashSalt`].
#[derive(Serialize)]
struct HashInput<'a> {
    schema_version: u32,
    spec: &'a GatewayPolicy,
    keys: &'a BTreeMap<String, Vec<String>>,
    files: BTreeMap<&'a str, String>,
}

/// The provider key files of a gateway, resolved from the ProviderKeys it selects.
struct ProviderKeyFiles {
    /// `<provider>.<alias>` → key.
    files: BTreeMap<String, Vec<u8>>,
    /// Provider → aliases, sorted.
    key_index: BTreeMap<String, Vec<String>>,
    /// `<provider>.<alias>` → the ProviderKey that supplied it.
    file_source: BTreeMap<String, String>,
    /// `<provider>.<alias>` → the ProviderKey's own `baseURL`.
    file_base_url: BTreeMap<String, Option<String>>,
    /// Provider → the base URL its ProviderKeys set (when [`BaseUrls::Settle`] found one).
    base_urls: BTreeMap<String, String>,
    problems: Vec<KeyProblem>,
}

/// How [`resolve_provider_keys`] treats the `baseURL`s of ProviderKeys.
enum BaseUrls<'a> {
    /// A full render: settled against the gateway's own `spec.providers`.
    ///
    /// A key goes only to the base URL its ProviderKey names, or, naming none, to the provider's
    /// default: a ProviderKey never redirects the keys of another. The gateway's
    /// `providers.<id>.baseURL` wins and takes the keys that name no baseURL (whoever writes the
    /// gateway chooses where its keys go); without one, the oldest ProviderKey of the provider
    /// sets its base URL (none: the default) and the keys of those that disagree are withheld
    /// (`BaseURLConflict`).
    Settle(&'a BTreeMap<String, ProviderSettings>),
    /// A keys-only render: the caller checks each key against the config in use.
    AsRequested,
}

/// `url`, or what its absence means, for messages.
fn describe_base_url(url: Option<&str>) -> String {
    url.map_or_else(
        || "no baseURL (the provider's default)".to_owned(),
        |u| format!("baseURL {u}"),
    )
}

fn resolve_provider_keys(
    namespace: &str,
    keys: &[ProviderKey],
    secrets: &BTreeMap<String, Secret>,
    base_urls: BaseUrls<'_>,
) -> ProviderKeyFiles {
    let mut problems = Vec::new();
    let problem = |key: &ProviderKey, reason, detail: String| KeyProblem {
        source: format!("ProviderKey {}", key.name_any()),
        reason,
        detail,
    };
    let mut sorted: Vec<&ProviderKey> = keys.iter().collect();
    sorted.sort_by_key(|k| claim_order(k));

    // Claims: each valid ProviderKey takes its provider/alias unless an older one has it.
    let mut claims: Vec<&ProviderKey> = Vec::new();
    let mut claimed_by: BTreeMap<String, String> = BTreeMap::new();
    for key in sorted {
        if let Some(p) = claim_problem(key, namespace) {
            problems.push(p);
            continue;
        }
        let (provider, alias) = (&key.spec.provider, &key.spec.alias);
        let file = format!("{provider}.{alias}");
        if let Some(first) = claimed_by.get(&file) {
            problems.push(problem(
                key,
                "DuplicateAlias",
                format!(
                    "{provider}/{alias} is also provided by ProviderKey {first}, which is older (or as old and first by name) and is used"
                ),
            ));
            continue;
        }
        claimed_by.insert(file, key.name_any());
        claims.push(key);
    }

    // Base URLs: see [`BaseUrls::Settle`]. Claims are in age order, so the first of a provider
    // is its oldest.
    let mut provider_urls: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    if let BaseUrls::Settle(gateway) = base_urls {
        claims.retain(|key| {
            let provider = &key.spec.provider;
            let wanted = key.spec.base_url.as_deref();
            if let Some(set) = gateway.get(provider).and_then(|s| s.base_url.as_deref()) {
                if wanted.is_none_or(|w| w == set) {
                    return true;
                }
                problems.push(problem(
                    key,
                    "BaseURLConflict",
                    format!(
                        "{} is not {set}, which the AIGateway sets for {provider} (spec.providers.{provider}.baseURL); the key is not served",
                        describe_base_url(wanted)
                    ),
                ));
                return false;
            }
            let (oldest, url) = provider_urls
                .entry(provider.clone())
                .or_insert_with(|| (key.name_any(), key.spec.base_url.clone()));
            if url.as_deref() == wanted {
                return true;
            }
            problems.push(problem(
                key,
                "BaseURLConflict",
                format!(
                    "{} differs from {} of ProviderKey {oldest}, which is older and decides where this gateway sends {provider} keys; the key is not served (ProviderKeys of one provider must agree on baseURL)",
                    describe_base_url(wanted),
                    describe_base_url(url.as_deref()),
                ),
            ));
            false
        });
    }
    let base_urls = provider_urls
        .into_iter()
        .filter_map(|(provider, (_, url))| Some((provider, url?)))
        .collect();

    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut key_index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut file_source: BTreeMap<String, String> = BTreeMap::new();
    let mut file_base_url: BTreeMap<String, Option<String>> = BTreeMap::new();
    for key in claims {
        let material = match resolve_key(key, secrets.get(&key.spec.secret_ref.name)) {
            Ok(m) => m,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let (provider, alias) = (&key.spec.provider, &key.spec.alias);
        let file = format!("{provider}.{alias}");
        files.insert(file.clone(), material.0);
        file_source.insert(file.clone(), key.name_any());
        file_base_url.insert(file, key.spec.base_url.clone());
        key_index
            .entry(provider.clone())
            .or_default()
            .push(alias.clone());
    }
    for aliases in key_index.values_mut() {
        aliases.sort();
    }
    ProviderKeyFiles {
        files,
        key_index,
        file_source,
        file_base_url,
        base_urls,
        problems,
    }
}

/// Name, namespace and uid of a gateway, which every rendered object needs.
fn gateway_meta(gateway: &AIGateway) -> Result<(String, String, String), RenderError> {
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
    Ok((name, namespace, uid))
}

/// Renders the owned objects of `gateway` from the ProviderKeys it selects (`keys`, any order)
/// and the Secrets of its namespace by name (`secrets`); `salt` keys the file digests of the
/// content hash and is stored in the keys Secret. A Redis URL that cannot be read now (its
/// Secret gone, refused) is reported, and the one rendered last (in `existing_keys`, the keys
/// Secret the apiserver holds) stays: a config with `redis` and no URL fails in the sidecar.
pub fn render(
    gateway: &AIGateway,
    keys: &[ProviderKey],
    secrets: &BTreeMap<String, Secret>,
    existing_keys: Option<&Secret>,
    salt: &HashSalt,
) -> Result<Rendered, RenderError> {
    let (name, namespace, uid) = gateway_meta(gateway)?;
    let ProviderKeyFiles {
        mut files,
        key_index,
        file_source,
        base_urls,
        mut problems,
        ..
    } = resolve_provider_keys(
        &namespace,
        keys,
        secrets,
        BaseUrls::Settle(&gateway.spec.policy.providers),
    );

    // The policy as the sidecar sees it: Kubernetes references resolved into key files.
    let mut policy = gateway.spec.policy.clone();
    if let Some(auth) = policy.authentication.as_mut()
        && let Some(r) = auth.token_secret_ref.take()
    {
        match resolve_ref(
            "authentication.tokenSecretRef",
            TOKENS_FILE_NAME,
            &r,
            secrets,
        ) {
            Ok(v) => {
                files.insert(TOKENS_FILE_NAME.to_owned(), v);
            }
            Err(p) => problems.push(p),
        }
    }
    if let Some(redis) = policy.redis.as_mut()
        && let Some(r) = redis.url_secret_ref.take()
    {
        let url = resolve_ref("redis.urlSecretRef", REDIS_URL_FILE_NAME, &r, secrets)
            .map_err(|p| problems.push(p))
            .ok()
            .or_else(|| kept_file(existing_keys, REDIS_URL_FILE_NAME));
        if let Some(url) = url {
            files.insert(REDIS_URL_FILE_NAME.to_owned(), url);
        }
    }
    // Only providers the gateway sets no base URL for have one from their ProviderKeys.
    for (provider, url) in base_urls {
        policy.providers.entry(provider).or_default().base_url = Some(url);
    }
    let mut key_index = key_index;
    drop_unconfigured_providers(
        &policy,
        &file_source,
        &mut key_index,
        &mut files,
        &mut problems,
    );
    let identity = OwnedIdentity {
        name,
        namespace,
        uid,
        generation: gateway.metadata.generation,
    };
    assemble(identity, policy, key_index, files, problems, salt)
}

/// Drops the keys of custom providers that `policy` does not configure (no
/// `spec.providers.<id>`, no ProviderKey `baseURL`): the sidecar has nowhere to send them and
/// leaves them unused, so they are reported, not counted as served.
fn drop_unconfigured_providers(
    policy: &GatewayPolicy,
    file_source: &BTreeMap<String, String>,
    key_index: &mut BTreeMap<String, Vec<String>>,
    files: &mut BTreeMap<String, Vec<u8>>,
    problems: &mut Vec<KeyProblem>,
) {
    key_index.retain(|provider, aliases| {
        let builtin = sidegate_crds::provider::BUILTIN_PROVIDERS.contains(&provider.as_str());
        if builtin || policy.providers.contains_key(provider) {
            return true;
        }
        for alias in aliases.iter() {
            let file = format!("{provider}.{alias}");
            files.remove(&file);
            let source = file_source.get(&file).unwrap_or(&file);
            problems.push(KeyProblem {
                source: format!("ProviderKey {source}"),
                reason: "ProviderNotConfigured",
                detail: format!(
                    "custom provider {provider} has no baseURL (set spec.providers.{provider}.baseURL on the AIGateway or baseURL on the ProviderKey); the key is not served"
                ),
            });
        }
        false
    });
}

/// The config [`render`] wrote into a ConfigMap, when it holds one of this schema version.
pub fn rendered_config(config_map: &ConfigMap) -> Option<GatewayConfig> {
    let yaml = config_map.data.as_ref()?.get(CONFIG_FILE_NAME)?;
    let config: GatewayConfig = serde_saphyr::from_str(yaml).ok()?;
    (config.schema_version == SCHEMA_VERSION).then_some(config)
}

/// Renders the keys of a gateway whose spec is invalid around the config it rendered last
/// (`kept`, read back from its ConfigMap): the policy stays as it is, the keys follow the
/// ProviderKeys and Secrets, so a rotated key is replaced and a deleted ProviderKey, Secret or
/// Secret key is no longer served.
///
/// Keys the kept config does not serve wait for a valid spec, reported as `KeyPending`: a
/// provider/alias it has no key for (a new ProviderKey may come with a baseURL that belongs to
/// the spec still to be rendered; until then the key would go where the old config sends that
/// provider), and a key whose ProviderKey asks for a baseURL that the kept config does not use.
/// The token and Redis URL files follow the Secrets the current spec names; where it names none,
/// the files of `existing_keys` (the Secret rendered last) stay. `salt` as in [`render`].
pub fn render_keys_only(
    gateway: &AIGateway,
    kept: &GatewayConfig,
    keys: &[ProviderKey],
    secrets: &BTreeMap<String, Secret>,
    existing_keys: Option<&Secret>,
    salt: &HashSalt,
) -> Result<Rendered, RenderError> {
    let (name, namespace, uid) = gateway_meta(gateway)?;
    let resolved = resolve_provider_keys(&namespace, keys, secrets, BaseUrls::AsRequested);
    let mut problems = resolved.problems;
    let mut files = BTreeMap::new();
    let mut key_index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (provider, aliases) in resolved.key_index {
        for alias in aliases {
            let file = format!("{provider}.{alias}");
            let served = kept.keys.get(&provider).is_some_and(|a| a.contains(&alias));
            let wanted_url = resolved.file_base_url.get(&file).cloned().flatten();
            let kept_url = kept
                .spec
                .providers
                .get(&provider)
                .and_then(|s| s.base_url.as_ref());
            let pending = if !served {
                Some(format!(
                    "{provider}/{alias} is not in the config in use; it is served once the spec is valid"
                ))
            } else {
                wanted_url.filter(|u| Some(u) != kept_url).map(|url| format!(
                    "baseURL {url} is not the one the config in use has for {provider}; the key is served once the spec is valid"
                ))
            };
            if let Some(detail) = pending {
                let source = resolved.file_source.get(&file).unwrap_or(&file);
                problems.push(KeyProblem {
                    source: format!("ProviderKey {source}"),
                    reason: "KeyPending",
                    detail,
                });
                continue;
            }
            if let Some(v) = resolved.files.get(&file) {
                files.insert(file, v.clone());
                key_index.entry(provider.clone()).or_default().push(alias);
            }
        }
    }
    // Tokens and the Redis URL follow the Secrets the current spec names; a spec that names
    // none keeps the kept config's file.
    let policy = &gateway.spec.policy;
    let mut secret_file = |needed: bool,
                           field: &str,
                           current: Option<&sidegate_crds::policy::SecretKeyRef>,
                           file: &str| {
        if !needed {
            return;
        }
        let value = match current {
            Some(r) => resolve_ref(field, file, r, secrets)
                .map_err(|p| problems.push(p))
                .ok()
                // A Redis URL unreadable now keeps the last (see `render`); tokens never do:
                // a token Secret gone revokes them.
                .or_else(|| {
                    (file == REDIS_URL_FILE_NAME)
                        .then(|| kept_file(existing_keys, file))
                        .flatten()
                }),
            None => kept_file(existing_keys, file),
        };
        if let Some(v) = value {
            files.insert(file.to_owned(), v);
        }
    };
    secret_file(
        kept.spec.authentication.is_some(),
        "authentication.tokenSecretRef",
        policy
            .authentication
            .as_ref()
            .and_then(|a| a.token_secret_ref.as_ref()),
        TOKENS_FILE_NAME,
    );
    secret_file(
        kept.spec.redis.is_some(),
        "redis.urlSecretRef",
        policy
            .redis
            .as_ref()
            .and_then(|r| r.url_secret_ref.as_ref()),
        REDIS_URL_FILE_NAME,
    );
    drop_unconfigured_providers(
        &kept.spec,
        &resolved.file_source,
        &mut key_index,
        &mut files,
        &mut problems,
    );
    let identity = OwnedIdentity {
        name,
        namespace,
        uid,
        // The config is still the one of that generation.
        generation: kept.gateway.generation,
    };
    assemble(
        identity,
        kept.spec.clone(),
        key_index,
        files,
        problems,
        salt,
    )
}

/// Whose objects are being rendered.
struct OwnedIdentity {
    name: String,
    namespace: String,
    uid: String,
    generation: Option<i64>,
}

/// The ConfigMap and Secret of a resolved policy and key files, with their content hash.
fn assemble(
    id: OwnedIdentity,
    policy: GatewayPolicy,
    key_index: BTreeMap<String, Vec<String>>,
    mut files: BTreeMap<String, Vec<u8>>,
    problems: Vec<KeyProblem>,
    salt: &HashSalt,
) -> Result<Rendered, RenderError> {
    let OwnedIdentity {
        name,
        namespace,
        uid,
        generation,
    } = id;
    let hash_input = HashInput {
        schema_version: SCHEMA_VERSION,
        spec: &policy,
        keys: &key_index,
        files: files
            .iter()
            .map(|(k, v)| (k.as_str(), salt.digest(v)))
            .collect(),
    };
    let canonical =
        serde_json::to_vec(&hash_input).map_err(|e| RenderError::Hash(e.to_string()))?;
    let hash = format!("sha256:{}", hex::encode(Sha256::digest(&canonical)));
    // Stored beside the files it keys (and not among them: it is no key file).
    files.insert(
        HASH_SALT_FILE_NAME.to_owned(),
        hex::encode(salt.0).into_bytes(),
    );

    let config = GatewayConfig {
        schema_version: SCHEMA_VERSION,
        gateway: GatewayIdentity {
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
            generation,
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

/// Whether an existing object with the name of one of `gateway`'s rendered objects is the
/// operator's to update: labelled as made by it for this gateway, and controlled by nothing
/// but an AIGateway of this name (this one, or an earlier one of the same name whose objects
/// the garbage collector has not removed yet). Anything else was made by someone else, and a
/// forced apply would take it over: add the owner reference (so deleting the gateway deletes
/// it) and replace its data.
pub fn is_managed_for(existing: &ObjectMeta, gateway: &AIGateway) -> bool {
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    let uid = gateway.metadata.uid.as_deref().unwrap_or_default();
    let label = |key: &str| existing.labels.as_ref().and_then(|l| l.get(key));
    let labelled = label(MANAGED_BY_LABEL).map(String::as_str) == Some(FIELD_MANAGER)
        && label(GATEWAY_LABEL).map(String::as_str) == Some(name);
    let controlled_by_this_gateway = existing
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .all(|o| {
            o.uid == uid
                || (o.kind == "AIGateway"
                    && o.name == name
                    && o.api_version.starts_with("sidegate.dev/"))
        });
    labelled && controlled_by_this_gateway
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
///
/// `gateway.generation` in `gateway.yaml` does not count: a spec change that leaves the config
/// as it was (e.g. `spec.sidecar.image`) must not rewrite the ConfigMap, since every sidecar
/// reloads on any change of the file and the sidecar does not use the generation. The file
/// keeps the generation of the last change of its content.
pub fn config_map_up_to_date(existing: &ConfigMap, desired: &ConfigMap) -> bool {
    same_config_data(existing.data.as_ref(), desired.data.as_ref())
        && meta_up_to_date(&existing.metadata, &desired.metadata)
}

fn same_config_data(
    existing: Option<&BTreeMap<String, String>>,
    desired: Option<&BTreeMap<String, String>>,
) -> bool {
    if existing == desired {
        return true;
    }
    let (Some(existing), Some(desired)) = (existing, desired) else {
        return false;
    };
    if existing.len() != desired.len() {
        return false;
    }
    existing.iter().all(|(file, have)| {
        let Some(want) = desired.get(file) else {
            return false;
        };
        if have == want {
            return true;
        }
        if file != CONFIG_FILE_NAME {
            return false;
        }
        let parse = |yaml: &str| serde_saphyr::from_str::<GatewayConfig>(yaml).ok();
        match (parse(have), parse(want)) {
            (Some(mut have), Some(mut want)) => {
                have.gateway.generation = None;
                want.gateway.generation = None;
                have == want
            }
            _ => false,
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use sidegate_crds::api::{AIGatewaySpec, ProviderKeySecretRef, ProviderKeySpec};
    use sidegate_crds::policy::{Authentication, Cache, SecretKeyRef};

    fn gateway(policy: GatewayPolicy) -> AIGateway {
        let mut gw = AIGateway::new(
            "main",
            AIGatewaySpec {
                policy,
                ..AIGatewaySpec::default()
            },
        );
        gw.metadata.namespace = Some("team-a".into());
        gw.metadata.uid = Some("uid-1".into());
        gw.metadata.generation = Some(1);
        gw
    }

    fn key(name: &str, provider: &str, alias: &str, secret: &str, k: &str) -> ProviderKey {
        let mut pk = ProviderKey::new(
            name,
            ProviderKeySpec {
                provider: provider.into(),
                alias: alias.into(),
                secret_ref: ProviderKeySecretRef {
                    name: secret.into(),
                    key: Some(k.into()),
                },
                base_url: None,
                region: None,
            },
        );
        pk.metadata.namespace = Some("team-a".into());
        pk
    }

    fn secret(name: &str, entries: &[(&str, &str)]) -> (String, Secret) {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        (name.to_owned(), s)
    }

    /// The salt of every render in these tests but those about salts.
    fn salt() -> HashSalt {
        HashSalt::from([7; 32])
    }

    fn file<'a>(r: &'a Rendered, name: &str) -> Option<&'a [u8]> {
        r.secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|v| v.0.as_slice())
    }

    #[test]
    fn redis_urls_are_checked_as_the_sidecar_reads_them() {
        for good in [
            "redis://redis.cache:6379/0",
            "redis://:s3cret@redis.cache/2",
            "valkey://user:pw@[::1]:6380",
            "redis+unix:///run/redis.sock?db=1",
        ] {
            assert_eq!(redis_url_refused(good), None, "{good}");
        }
        for bad in [
            "redis://redis.cache:99999/0",
            "redis://host:notaport/0",
            "redis://ho st/",
            "redis://h/0?protocol=resp9",
            "redis+unix:///x.sock?db=abc",
            "rediss://h",
            "redis://:pw@0.0.0.0",
            "http://h",
        ] {
            let why = redis_url_refused(bad).unwrap_or_else(|| panic!("{bad} passed"));
            assert!(!why.contains("pw") && !why.contains(bad), "{why}");
        }
    }

    #[test]
    fn keys_become_provider_alias_files_and_an_index_without_values() {
        let secrets = BTreeMap::from([secret(
            "llm",
            &[("openai", "sk-1\n"), ("anthropic", "sk-2")],
        )]);
        let keys = [
            key("a", "openai", "default", "llm", "openai"),
            key("b", "anthropic", "team-b", "llm", "anthropic"),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert!(r.problems.is_empty());
        assert_eq!(
            file(&r, "openai.default"),
            Some(&b"sk-1"[..]),
            "trailing newline trimmed"
        );
        assert_eq!(file(&r, "anthropic.team-b"), Some(&b"sk-2"[..]));
        assert_eq!(r.key_count(), 2);
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(
            yaml.contains("openai:\n  - default") || yaml.contains("openai:\n- default"),
            "{yaml}"
        );
        assert!(!yaml.contains("sk-1") && !yaml.contains("sk-2"));
        assert_eq!(r.config_map.metadata.name.as_deref(), Some("sidegate-main"));
        assert_eq!(
            r.secret.metadata.name.as_deref(),
            Some("sidegate-main-keys")
        );
        let owner = &r.secret.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("AIGateway", Some(true))
        );
    }

    #[test]
    fn missing_secret_and_missing_key_are_reported_by_name_and_other_keys_still_render() {
        let secrets = BTreeMap::from([secret("llm-keys", &[("openai", "sk-1")])]);
        let keys = [
            key("openai-main", "openai", "default", "llm-keys", "openai"),
            key(
                "anthropic-main",
                "anthropic",
                "default",
                "llm-keys",
                "api-key",
            ),
            key("groq-main", "groq", "default", "gone", "k"),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        let messages: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "ProviderKey anthropic-main: Secret llm-keys has no key 'api-key'",
                "ProviderKey groq-main: Secret gone not found",
            ]
        );
        assert_eq!(r.problems[0].reason, "KeyNotFound");
        assert_eq!(r.problems[1].reason, "SecretNotFound");
        assert_eq!(r.key_count(), 1);
        assert!(file(&r, "openai.default").is_some());
    }

    /// `k` as created by the apiserver `secs` seconds after the epoch.
    fn created(mut k: ProviderKey, secs: i64) -> ProviderKey {
        let at = k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid time");
        k.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        k
    }

    fn with_base_url(mut k: ProviderKey, url: &str) -> ProviderKey {
        k.spec.base_url = Some(url.into());
        k
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct FileFixture {
        refused_files: Vec<FileCase>,
        accepted_files: Vec<FileCase>,
    }

    #[derive(serde::Deserialize)]
    struct FileCase {
        file: String,
        value: String,
        repeat: Option<usize>,
        why: Option<String>,
    }

    /// Renders a gateway whose Secret `s` holds `case.value` under `v` for `case.file`.
    fn render_file(case: &FileCase) -> Rendered {
        let value = case.value.repeat(case.repeat.unwrap_or(1));
        let reference = Some(SecretKeyRef {
            name: "s".into(),
            key: "v".into(),
        });
        let mut policy = GatewayPolicy::default();
        let mut keys = Vec::new();
        match case.file.as_str() {
            REDIS_URL_FILE_NAME => {
                policy.redis = Some(sidegate_crds::policy::Redis {
                    url_secret_ref: reference,
                })
            }
            TOKENS_FILE_NAME => {
                policy.authentication = Some(Authentication {
                    enabled: true,
                    token_secret_ref: reference,
                })
            }
            key_file => {
                let (provider, alias) = key_file.split_once('.').expect("<provider>.<alias>");
                keys.push(key("k", provider, alias, "s", "v"));
            }
        }
        let secrets = BTreeMap::from([secret("s", &[("v", value.as_str())])]);
        render(&gateway(policy), &keys, &secrets, None, &salt()).expect("render")
    }

    #[test]
    fn secret_values_the_sidecar_would_refuse_are_key_problems_not_files() {
        // The same list is loaded by the sidecar's tests (sidecar/src/config.rs), which refuse
        // each file at load: a value it cannot read would stop it loading the whole config.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/fixtures/refused-specs.yaml"
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        let f: FileFixture = serde_saphyr::from_str(&text).expect("fixture parses");
        for case in &f.refused_files {
            let r = render_file(case);
            let why = case.why.as_deref().unwrap_or_default();
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.reason == "KeyInvalid" && p.to_string().contains(why)),
                "{} {:.40}: expected {why:?} in {:?}",
                case.file,
                case.value,
                r.problems
            );
            assert_eq!(file(&r, &case.file), None, "{} not rendered", case.file);
        }
        for case in &f.accepted_files {
            let r = render_file(case);
            assert_eq!(r.problems, [], "{} {:.40}", case.file, case.value);
            assert!(file(&r, &case.file).is_some(), "{}", case.file);
        }
    }

    fn problems_of(r: &Rendered) -> Vec<(&str, &str)> {
        r.problems
            .iter()
            .map(|p| (p.source.as_str(), p.reason))
            .collect()
    }

    fn provider_base_url(r: &Rendered, provider: &str) -> Option<String> {
        kept(r).spec.providers.get(provider)?.base_url.clone()
    }

    #[test]
    fn the_oldest_provider_key_keeps_its_alias_and_a_newer_one_is_a_duplicate() {
        let secrets = BTreeMap::from([
            secret("llm", &[("openai", "sk-real")]),
            secret("db", &[("password", "hunter2")]),
        ]);
        // A newcomer whose name sorts first points the team's default alias at another Secret.
        let keys = [
            created(
                key("openai-main", "openai", "default", "llm", "openai"),
                100,
            ),
            created(
                key("00-evil-default", "openai", "default", "db", "password"),
                200,
            ),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(file(&r, "openai.default"), Some(&b"sk-real"[..]));
        assert_eq!(
            problems_of(&r),
            [("ProviderKey 00-evil-default", "DuplicateAlias")]
        );
        assert!(
            r.problems[0]
                .detail
                .contains("ProviderKey openai-main, which is older"),
            "{}",
            r.problems[0]
        );

        // The older one keeps the alias while its own Secret is missing: nothing is served for
        // it then, rather than the newcomer's key.
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &BTreeMap::from([secret("db", &[("password", "hunter2")])]),
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(file(&r, "openai.default"), None);
        assert_eq!(
            problems_of(&r),
            [
                ("ProviderKey 00-evil-default", "DuplicateAlias"),
                ("ProviderKey openai-main", "SecretNotFound"),
            ]
        );

        // As old as each other (creation times have whole seconds), the first by name wins.
        let secrets = BTreeMap::from([secret("s", &[("a", "one"), ("b", "two")])]);
        let keys = [
            created(key("zeta", "openai", "default", "s", "b"), 100),
            created(key("alpha", "openai", "default", "s", "a"), 100),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(file(&r, "openai.default"), Some(&b"one"[..]));
        assert_eq!(problems_of(&r), [("ProviderKey zeta", "DuplicateAlias")]);
    }

    #[test]
    fn a_provider_key_base_url_never_redirects_the_keys_of_other_provider_keys() {
        let secrets = BTreeMap::from([secret("s", &[("real", "sk-real"), ("own", "sk-own")])]);
        // A newcomer with an alias of its own asks for a base URL for the whole provider.
        let keys = [
            created(key("openai-main", "openai", "default", "s", "real"), 100),
            created(
                with_base_url(
                    key("0-evil", "openai", "evil", "s", "own"),
                    "https://attacker.example/v1",
                ),
                200,
            ),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(provider_base_url(&r, "openai"), None, "the default stays");
        assert_eq!(file(&r, "openai.default"), Some(&b"sk-real"[..]));
        assert_eq!(file(&r, "openai.evil"), None);
        assert_eq!(problems_of(&r), [("ProviderKey 0-evil", "BaseURLConflict")]);
        assert_eq!(
            r.problems[0].detail,
            "baseURL https://attacker.example/v1 differs from no baseURL (the provider's default) of ProviderKey openai-main, which is older and decides where this gateway sends openai keys; the key is not served (ProviderKeys of one provider must agree on baseURL)"
        );

        // The other way round: the oldest asks for a proxy, which holds; a newer key naming no
        // baseURL is not sent there, one naming the same proxy is.
        let proxy = "https://proxy.example.com/v1";
        let keys = [
            created(
                with_base_url(key("a-proxy", "openai", "default", "s", "real"), proxy),
                100,
            ),
            created(key("b-plain", "openai", "b", "s", "own"), 200),
            created(
                with_base_url(key("c-same", "openai", "c", "s", "own"), proxy),
                300,
            ),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(provider_base_url(&r, "openai").as_deref(), Some(proxy));
        assert_eq!(r.key_index["openai"], ["c", "default"]);
        assert_eq!(
            problems_of(&r),
            [("ProviderKey b-plain", "BaseURLConflict")]
        );

        // Only claims count: the baseURL of a duplicate decides nothing and conflicts with
        // nothing (it is reported as the duplicate it is).
        let keys = [
            created(key("openai-main", "openai", "default", "s", "real"), 100),
            created(key("b", "openai", "b", "s", "own"), 200),
            created(
                with_base_url(
                    key("0-dup", "openai", "default", "s", "own"),
                    "https://attacker.example/v1",
                ),
                300,
            ),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(provider_base_url(&r, "openai"), None);
        assert_eq!(r.key_index["openai"], ["b", "default"]);
        assert_eq!(problems_of(&r), [("ProviderKey 0-dup", "DuplicateAlias")]);
    }

    #[test]
    fn the_gateway_base_url_wins_and_takes_only_keys_that_name_none_or_the_same() {
        let secrets = BTreeMap::from([secret("s", &[("k", "v")])]);
        let set = "https://gateway.example.com/v1";
        let mut gw = gateway(GatewayPolicy::default());
        gw.spec.policy.providers.insert(
            "openai".into(),
            ProviderSettings {
                base_url: Some(set.into()),
                ..ProviderSettings::default()
            },
        );
        let keys = [
            created(
                with_base_url(
                    key("a-other", "openai", "a", "s", "k"),
                    "https://other.example/v1",
                ),
                100,
            ),
            created(key("b-none", "openai", "b", "s", "k"), 200),
            created(
                with_base_url(key("c-same", "openai", "c", "s", "k"), set),
                300,
            ),
        ];
        let r = render(&gw, &keys, &secrets, None, &salt()).expect("renders");
        assert_eq!(provider_base_url(&r, "openai").as_deref(), Some(set));
        assert_eq!(r.key_index["openai"], ["b", "c"]);
        assert_eq!(
            problems_of(&r),
            [("ProviderKey a-other", "BaseURLConflict")]
        );
        assert!(
            r.problems[0]
                .detail
                .contains("spec.providers.openai.baseURL"),
            "{}",
            r.problems[0]
        );
    }

    #[test]
    fn the_hash_changes_with_content_only() {
        let keys = [key("a", "openai", "default", "s", "k")];
        let v1 = BTreeMap::from([secret("s", &[("k", "sk-1")])]);
        let v2 = BTreeMap::from([secret("s", &[("k", "sk-2")])]);
        let gw = gateway(GatewayPolicy::default());
        let first = render(&gw, &keys, &v1, None, &salt()).expect("renders");
        assert_eq!(
            first.hash,
            render(&gw, &keys, &v1, None, &salt())
                .expect("renders")
                .hash
        );
        // A new generation with the same content keeps the hash (no churn in the sidecar).
        let mut bumped = gw.clone();
        bumped.metadata.generation = Some(7);
        assert_eq!(
            first.hash,
            render(&bumped, &keys, &v1, None, &salt())
                .expect("renders")
                .hash
        );
        // A rotated key or a policy change gives a new one.
        assert_ne!(
            first.hash,
            render(&gw, &keys, &v2, None, &salt())
                .expect("renders")
                .hash
        );
        let cached = gateway(GatewayPolicy {
            cache: Some(Cache {
                enabled: true,
                ..Cache::default()
            }),
            ..GatewayPolicy::default()
        });
        assert_ne!(
            first.hash,
            render(&cached, &keys, &v1, None, &salt())
                .expect("renders")
                .hash
        );
        assert!(first.hash.starts_with("sha256:") && first.hash.len() == 7 + 64);
    }

    /// Gateway authentication with the tokens of Secret `tokens`, key `t`.
    fn token_auth() -> Option<Authentication> {
        Some(Authentication {
            enabled: true,
            token_secret_ref: Some(SecretKeyRef {
                name: "tokens".into(),
                key: "t".into(),
            }),
        })
    }

    /// A gateway whose only secret file is its token file (no provider keys).
    fn token_only_gateway() -> (AIGateway, BTreeMap<String, Secret>) {
        let gw = gateway(GatewayPolicy {
            authentication: token_auth(),
            ..GatewayPolicy::default()
        });
        (gw, BTreeMap::from([secret("tokens", &[("t", "hunter2")])]))
    }

    #[test]
    fn the_same_content_and_salt_give_the_same_hash_and_another_salt_another() {
        let (gw, secrets) = token_only_gateway();
        let first = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        let again = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        assert_eq!(first.hash, again.hash);
        let other = HashSalt::from([8; 32]);
        let resalted = render(&gw, &[], &secrets, None, &other).expect("renders");
        assert_ne!(first.hash, resalted.hash);
        // Rotated content under the same salt still changes it.
        let rotated = BTreeMap::from([secret("tokens", &[("t", "hunter3")])]);
        assert_ne!(
            first.hash,
            render(&gw, &[], &rotated, None, &salt())
                .expect("renders")
                .hash
        );
    }

    #[test]
    fn the_hash_cannot_be_recomputed_from_the_config_map_and_a_right_guess_of_the_secret() {
        let (gw, secrets) = token_only_gateway();
        let r = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        // What a reader of the ConfigMap has, plus a guess of the token that happens to be right.
        let config = kept(&r);
        let recompute = |digest: &dyn Fn(&[u8]) -> String| {
            let input = HashInput {
                schema_version: config.schema_version,
                spec: &config.spec,
                keys: &config.keys,
                files: BTreeMap::from([(TOKENS_FILE_NAME, digest(b"hunter2"))]),
            };
            let canonical = serde_json::to_vec(&input).expect("serializes");
            format!("sha256:{}", hex::encode(Sha256::digest(&canonical)))
        };
        assert_ne!(
            recompute(&|v| hex::encode(Sha256::digest(v))),
            r.hash,
            "with plain digests the guess would be confirmed offline"
        );
        // Only the salt, which lives in the keys Secret alone, is missing from that recomputation.
        assert_eq!(recompute(&|v| salt().digest(v)), r.hash);
    }

    #[test]
    fn the_salt_is_kept_in_the_keys_secret_only_under_a_name_the_sidecar_skips() {
        let (gw, secrets) = token_only_gateway();
        let r = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        let stored = file(&r, HASH_SALT_FILE_NAME).expect("salt in the keys Secret");
        assert!(HASH_SALT_FILE_NAME.starts_with('.'), "the sidecar skips it");
        let hex = std::str::from_utf8(stored).expect("hex");
        assert_eq!(hex, "07".repeat(32));
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(!yaml.contains(hex) && !r.hash.contains(hex));
        let annotations = format!("{:?}", r.config_map.metadata);
        assert!(!annotations.contains(hex));
        assert!(
            !r.key_index.contains_key(".hash-salt") && r.key_count() == 0,
            "no key file"
        );
        assert_eq!(format!("{:?}", salt()), "HashSalt(<redacted>)");
    }

    #[test]
    fn a_stored_salt_is_kept_and_a_missing_or_malformed_one_replaced() {
        let (gw, secrets) = token_only_gateway();
        let r = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        let kept_salt = HashSalt::kept_or_new(Some(&r.secret)).expect("salt");
        assert_eq!(kept_salt, salt());
        assert_eq!(
            render(&gw, &[], &secrets, None, &kept_salt)
                .expect("renders")
                .secret,
            r.secret,
            "a second reconcile writes nothing"
        );

        let new = HashSalt::kept_or_new(None).expect("salt");
        assert_ne!(new, salt());
        assert_ne!(
            new,
            HashSalt::kept_or_new(None).expect("salt"),
            "random per gateway"
        );
        for bad in ["", "not hex", &"07".repeat(31), &"07".repeat(33)] {
            let (_, broken) = secret("sidegate-main-keys", &[(HASH_SALT_FILE_NAME, bad)]);
            assert_eq!(HashSalt::stored_in(&broken), None, "{bad:?}");
            let replaced = HashSalt::kept_or_new(Some(&broken)).expect("salt");
            assert_ne!(replaced, salt());
            let rendered = render(&gw, &[], &secrets, None, &replaced).expect("renders");
            assert_ne!(rendered.hash, r.hash);
        }
        let (_, without) = secret("sidegate-main-keys", &[(TOKENS_FILE_NAME, "hunter2")]);
        assert_eq!(HashSalt::stored_in(&without), None);
    }

    #[test]
    fn tokens_and_redis_url_become_files_and_leave_the_config() {
        let secrets = BTreeMap::from([
            secret("tokens", &[("t", "tok-a\ntok-b\n")]),
            secret("redis", &[("url", "redis://r:6379")]),
        ]);
        let gw = gateway(GatewayPolicy {
            authentication: token_auth(),
            redis: Some(sidegate_crds::policy::Redis {
                url_secret_ref: Some(SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                }),
            }),
            ..GatewayPolicy::default()
        });
        let r = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        assert_eq!(file(&r, TOKENS_FILE_NAME), Some(&b"tok-a\ntok-b"[..]));
        assert_eq!(file(&r, REDIS_URL_FILE_NAME), Some(&b"redis://r:6379"[..]));
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(
            !yaml.contains("tokenSecretRef") && !yaml.contains("urlSecretRef"),
            "{yaml}"
        );
        assert!(
            yaml.contains("redis: {}"),
            "the redis block stays, so the sidecar uses redis.url: {yaml}"
        );

        let r = render(&gw, &[], &BTreeMap::new(), None, &salt()).expect("renders");
        let messages: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "AIGateway authentication.tokenSecretRef: Secret tokens not found",
                "AIGateway redis.urlSecretRef: Secret redis not found",
            ]
        );
        // With the keys Secret rendered before: its Redis URL stays (a config with `redis`
        // and no URL fails in the sidecar); its tokens do not (a token Secret gone revokes).
        let before = render(&gw, &[], &secrets, None, &salt()).expect("renders");
        let r = render(&gw, &[], &BTreeMap::new(), Some(&before.secret), &salt()).expect("renders");
        assert_eq!(file(&r, REDIS_URL_FILE_NAME), Some(&b"redis://r:6379"[..]));
        assert_eq!(file(&r, TOKENS_FILE_NAME), None);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    }

    #[test]
    fn spend_limits_prices_and_token_budgets_reach_the_sidecar_config() {
        use sidegate_crds::policy::{ModelPrice, RateLimit, SpendLimit, SpendPeriod};
        let gw = gateway(GatewayPolicy {
            spend_limit: Some(SpendLimit {
                amount: "250.00".into(),
                period: SpendPeriod::Month,
            }),
            pricing: vec![ModelPrice {
                model: "house-llm".into(),
                input_per_million: "0.50".into(),
                output_per_million: "1.50".into(),
                ..ModelPrice::default()
            }],
            rate_limit: Some(RateLimit {
                limit: 100,
                interval: sidegate_crds::units::Duration::from_secs(60),
                technique: Default::default(),
                scope: Default::default(),
                tokens_per_minute: Some(200_000),
            }),
            ..GatewayPolicy::default()
        });
        let r = render(&gw, &[], &BTreeMap::new(), None, &salt()).expect("renders");
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        let config: sidegate_crds::GatewayConfig = serde_saphyr::from_str(yaml).expect("parses");
        assert_eq!(config.spec.spend_limit, gw.spec.policy.spend_limit);
        assert_eq!(config.spec.pricing, gw.spec.policy.pricing);
        assert_eq!(
            config.spec.rate_limit.and_then(|r| r.tokens_per_minute),
            Some(200_000)
        );
    }

    #[test]
    fn open_telemetry_reaches_the_sidecar_config() {
        use sidegate_crds::policy::OpenTelemetry;
        let gw = gateway(GatewayPolicy {
            open_telemetry: Some(OpenTelemetry {
                endpoint: "http://otel-collector.observability:4318".into(),
                service_name: Some("checkout".into()),
            }),
            ..GatewayPolicy::default()
        });
        let r = render(&gw, &[], &BTreeMap::new(), None, &salt()).expect("renders");
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(yaml.contains("openTelemetry:"), "{yaml}");
        let config: sidegate_crds::GatewayConfig = serde_saphyr::from_str(yaml).expect("parses");
        assert_eq!(config.spec.open_telemetry, gw.spec.policy.open_telemetry);
    }

    #[test]
    fn provider_key_base_urls_apply_unless_the_gateway_overrides_them() {
        let secrets = BTreeMap::from([secret("s", &[("k", "v")])]);
        let mut pk = key("a", "openai", "default", "s", "k");
        pk.spec.base_url = Some("https://proxy.example.com/v1".into());
        let r = render(
            &gateway(GatewayPolicy::default()),
            std::slice::from_ref(&pk),
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(
            yaml.contains("baseURL: https://proxy.example.com/v1"),
            "{yaml}"
        );

        let mut http = pk.clone();
        http.spec.base_url = Some("http://proxy.example.com/v1".into());
        let r = render(
            &gateway(GatewayPolicy::default()),
            &[http],
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert_eq!(r.problems[0].reason, "InvalidBaseURL");
        assert_eq!(
            r.key_count(),
            0,
            "a key is never sent over plain http to the internet"
        );
    }

    #[test]
    fn a_key_annotated_allow_insecure_upstream_is_rendered_with_its_http_base_url_whatever_the_gateway_says()
     {
        let secrets = BTreeMap::from([secret("s", &[("k", "v")])]);
        let mut pk = key("a", "custom-local", "default", "s", "k");
        pk.spec.base_url = Some("http://169.254.169.254:8080/v1".into());
        // The gateway's annotation lifts the policy for the gateway's own URLs only.
        let gw = {
            let mut gw = gateway(GatewayPolicy::default());
            gw.metadata.annotations = Some(
                [(
                    sidegate_crds::api::ALLOW_INSECURE_UPSTREAM_ANNOTATION.to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            );
            gw
        };
        let r = render(&gw, std::slice::from_ref(&pk), &secrets, None, &salt()).expect("renders");
        assert_eq!(r.problems[0].reason, "InvalidBaseURL");
        assert_eq!(r.key_count(), 0);

        pk.metadata.annotations = gw.metadata.annotations.clone();
        let r = render(&gw, &[pk], &secrets, None, &salt()).expect("renders");
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.key_count(), 1);
        let yaml = &r.config_map.data.as_ref().expect("data")["gateway.yaml"];
        assert!(
            yaml.contains("baseURL: http://169.254.169.254:8080/v1"),
            "{yaml}"
        );
    }

    #[test]
    fn bedrock_keys_are_json_credentials_with_the_region() {
        let secrets = BTreeMap::from([secret(
            "aws",
            &[("accessKeyId", "AKIA1"), ("secretAccessKey", "s3cr3t")],
        )]);
        let mut pk = key("b", "aws-bedrock", "default", "aws", "unused");
        pk.spec.secret_ref.key = None;
        pk.spec.region = Some("eu-west-1".into());
        let r = render(
            &gateway(GatewayPolicy::default()),
            &[pk],
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        let json: serde_json::Value =
            serde_json::from_slice(file(&r, "aws-bedrock.default").expect("file")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"accessKeyId": "AKIA1", "secretAccessKey": "s3cr3t", "region": "eu-west-1"})
        );
    }

    #[test]
    fn up_to_date_objects_are_not_applied_again() {
        let secrets = BTreeMap::from([secret("s", &[("k", "v")])]);
        let keys = [key("a", "openai", "default", "s", "k")];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        // What the apiserver returns has more metadata than we set.
        let mut live_cm = r.config_map.clone();
        live_cm.metadata.resource_version = Some("42".into());
        live_cm
            .metadata
            .labels
            .get_or_insert_default()
            .insert("team".into(), "a".into());
        assert!(config_map_up_to_date(&live_cm, &r.config_map));
        assert!(secret_up_to_date(&r.secret, &r.secret));

        let rotated = BTreeMap::from([secret("s", &[("k", "v2")])]);
        let r2 = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &rotated,
            None,
            &salt(),
        )
        .expect("renders");
        assert!(!secret_up_to_date(&r.secret, &r2.secret));
        assert!(
            !config_map_up_to_date(&live_cm, &r2.config_map),
            "the hash is in the config"
        );
    }

    #[test]
    fn a_new_generation_with_the_same_config_does_not_rewrite_the_config_map() {
        let secrets = BTreeMap::from([secret("s", &[("k", "v")])]);
        let keys = [key("a", "openai", "default", "s", "k")];
        let gw = gateway(GatewayPolicy::default());
        let first = render(&gw, &keys, &secrets, None, &salt()).expect("renders");
        // e.g. spec.sidecar.image changed: a new generation, the same config.
        let mut bumped = gw.clone();
        bumped.metadata.generation = Some(2);
        let second = render(&bumped, &keys, &secrets, None, &salt()).expect("renders");
        assert!(
            config_map_up_to_date(&first.config_map, &second.config_map),
            "only the generation differs: no write, no reload in every sidecar"
        );
        // A change of content is still written.
        let mut cached = bumped.clone();
        cached.spec.policy.cache = Some(Cache {
            enabled: true,
            ..Cache::default()
        });
        let third = render(&cached, &keys, &secrets, None, &salt()).expect("renders");
        assert!(!config_map_up_to_date(&first.config_map, &third.config_map));
    }

    fn kept(r: &Rendered) -> GatewayConfig {
        rendered_config(&r.config_map).expect("a rendered config")
    }

    #[test]
    fn a_keys_only_render_of_unchanged_objects_is_the_last_render() {
        let secrets = BTreeMap::from([
            secret("s", &[("k", "v")]),
            secret("tokens", &[("t", "tok-1")]),
        ]);
        let keys = [key("a", "openai", "default", "s", "k")];
        let gw = gateway(GatewayPolicy {
            authentication: token_auth(),
            ..GatewayPolicy::default()
        });
        let last = render(&gw, &keys, &secrets, None, &salt()).expect("renders");
        let again = render_keys_only(
            &gw,
            &kept(&last),
            &keys,
            &secrets,
            Some(&last.secret),
            &salt(),
        )
        .expect("renders");
        assert_eq!(again, last, "nothing changed, nothing to write");
    }

    #[test]
    fn while_the_spec_is_invalid_keys_follow_their_secrets_and_the_policy_stays() {
        let secrets = BTreeMap::from([
            secret("s", &[("openai", "sk-old"), ("anthropic", "sk-ant")]),
            secret("tokens", &[("t", "tok-1\ntok-2")]),
        ]);
        let keys = [
            key("a", "openai", "default", "s", "openai"),
            key("b", "anthropic", "default", "s", "anthropic"),
        ];
        let good = gateway(GatewayPolicy {
            authentication: token_auth(),
            ..GatewayPolicy::default()
        });
        let last = render(&good, &keys, &secrets, None, &salt()).expect("renders");

        // The spec turns invalid (here: a cache the validator would refuse; the content does
        // not matter to this function), then: the OpenAI key is rotated, ProviderKey b is
        // deleted, a token is revoked, and two keys the last config does not serve appear.
        let mut invalid = good.clone();
        invalid.spec.policy.cache = Some(Cache {
            enabled: true,
            ..Cache::default()
        });
        invalid.metadata.generation = Some(2);
        let rotated = BTreeMap::from([
            secret("s", &[("openai", "sk-new"), ("groq", "gsk")]),
            secret("tokens", &[("t", "tok-2")]),
        ]);
        let mut proxied = key("d", "openai", "team-b", "s", "openai");
        proxied.spec.base_url = Some("https://proxy.example.com/v1".into());
        let now = [
            key("a", "openai", "default", "s", "openai"),
            key("c", "groq", "default", "s", "groq"),
            proxied,
        ];
        let r = render_keys_only(
            &invalid,
            &kept(&last),
            &now,
            &rotated,
            Some(&last.secret),
            &salt(),
        )
        .expect("renders");
        assert_eq!(file(&r, "openai.default"), Some(&b"sk-new"[..]), "rotated");
        assert_eq!(file(&r, "anthropic.default"), None, "deleted ProviderKey");
        assert_eq!(file(&r, TOKENS_FILE_NAME), Some(&b"tok-2"[..]), "revoked");
        assert_eq!(file(&r, "groq.default"), None, "new keys wait");
        assert_eq!(file(&r, "openai.team-b"), None, "new keys wait");
        let pending: Vec<String> = r
            .problems
            .iter()
            .filter(|p| p.reason == "KeyPending")
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            pending,
            [
                "ProviderKey c: groq/default is not in the config in use; it is served once the spec is valid",
                "ProviderKey d: openai/team-b is not in the config in use; it is served once the spec is valid",
            ]
        );
        let config = kept(&r);
        assert_eq!(config.spec, kept(&last).spec, "the policy stays");
        assert_eq!(
            config.gateway.generation,
            Some(1),
            "still generation 1's config"
        );
        assert_eq!(
            config.keys,
            BTreeMap::from([("openai".to_owned(), vec!["default".to_owned()])])
        );
        assert_eq!(config.gateway.hash.as_deref(), Some(r.hash.as_str()));
        assert_ne!(r.hash, last.hash);

        // A served key whose ProviderKey now asks for another baseURL is not sent to the old one.
        let mut moved = key("a", "openai", "default", "s", "openai");
        moved.spec.base_url = Some("https://elsewhere.example.com/v1".into());
        let r = render_keys_only(
            &invalid,
            &kept(&last),
            &[moved],
            &rotated,
            Some(&last.secret),
            &salt(),
        )
        .expect("renders");
        assert_eq!(file(&r, "openai.default"), None);
        assert_eq!(r.problems[0].reason, "KeyPending");
    }

    #[test]
    fn only_objects_made_for_this_gateway_are_taken_over() {
        let gw = gateway(GatewayPolicy::default());
        let r = render(&gw, &[], &BTreeMap::new(), None, &salt()).expect("renders");
        assert!(is_managed_for(&r.config_map.metadata, &gw));
        assert!(is_managed_for(&r.secret.metadata, &gw));

        // A user's own Secret of that name: no label, no owner.
        let users = ObjectMeta {
            name: Some("sidegate-main-keys".into()),
            ..ObjectMeta::default()
        };
        assert!(!is_managed_for(&users, &gw));
        // Labelled by someone else, or for another gateway.
        let mut other = r.secret.metadata.clone();
        other
            .labels
            .get_or_insert_default()
            .insert(MANAGED_BY_LABEL.into(), "Helm".into());
        assert!(!is_managed_for(&other, &gw));
        let mut other = r.secret.metadata.clone();
        other
            .labels
            .get_or_insert_default()
            .insert(GATEWAY_LABEL.into(), "other".into());
        assert!(!is_managed_for(&other, &gw));
        // Labelled as ours but controlled by something else.
        let mut controlled = r.secret.metadata.clone();
        controlled.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "app".into(),
            uid: "uid-9".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        assert!(!is_managed_for(&controlled, &gw));
        // Made for an earlier gateway of the same name (not collected yet): still ours.
        let mut earlier = r.secret.metadata.clone();
        if let Some(o) = earlier.owner_references.as_mut() {
            o[0].uid = "uid-0".into();
        }
        assert!(is_managed_for(&earlier, &gw));
    }

    #[test]
    fn keys_the_sidecar_could_not_use_are_key_problems_not_served_keys() {
        let secrets = BTreeMap::from([secret(
            "s",
            &[
                ("custom", "ck"),
                ("newline", "sk-a\nsk-b"),
                ("accent", "sk-caf\u{e9}"),
                ("ok", "sk-ok\n"),
                (
                    "sa",
                    "{\n  \"type\": \"service_account\",\n  \"private_key\": \"k\"\n}",
                ),
            ],
        )]);
        let keys = [
            key("a-custom", "custom-house", "default", "s", "custom"),
            key("b-newline", "openai", "default", "s", "newline"),
            key("c-accent", "anthropic", "default", "s", "accent"),
            key("d-ok", "groq", "default", "s", "ok"),
            key("e-vertex", "google-vertex-ai", "default", "s", "sa"),
        ];
        let r = render(
            &gateway(GatewayPolicy::default()),
            &keys,
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        let reasons: Vec<(&str, &str)> = r
            .problems
            .iter()
            .map(|p| (p.source.as_str(), p.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("ProviderKey b-newline", "KeyInvalid"),
                ("ProviderKey c-accent", "KeyInvalid"),
                ("ProviderKey a-custom", "ProviderNotConfigured"),
            ]
        );
        assert!(r.problems[0].to_string().contains("HTTP header"));
        assert!(!r.problems.iter().any(|p| p.to_string().contains("sk-")));
        assert_eq!(
            r.key_index.keys().collect::<Vec<_>>(),
            ["google-vertex-ai", "groq"],
            "a service account is JSON over lines"
        );
        for f in [
            "custom-house.default",
            "openai.default",
            "anthropic.default",
        ] {
            assert_eq!(file(&r, f), None, "{f}");
        }

        // Configured, by the gateway or by the ProviderKey's baseURL, the custom key is served.
        let mut gw = gateway(GatewayPolicy::default());
        gw.spec.policy.providers.insert(
            "custom-house".into(),
            sidegate_crds::policy::ProviderSettings {
                base_url: Some("https://llm.example.com/v1".into()),
                ..Default::default()
            },
        );
        let r = render(&gw, &keys[..1], &secrets, None, &salt()).expect("renders");
        assert!(r.problems.is_empty() && file(&r, "custom-house.default").is_some());
        let mut pk = keys[0].clone();
        pk.spec.base_url = Some("https://llm.example.com/v1".into());
        let r = render(
            &gateway(GatewayPolicy::default()),
            &[pk],
            &secrets,
            None,
            &salt(),
        )
        .expect("renders");
        assert!(r.problems.is_empty() && file(&r, "custom-house.default").is_some());
    }

    #[test]
    fn key_material_debug_never_shows_the_value() {
        assert_eq!(
            format!("{:?}", KeyMaterial(b"sk-live".to_vec())),
            "KeyMaterial(<7 bytes>)"
        );
    }
}
