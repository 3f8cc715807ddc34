//! Loading `gateway.yaml` and the keys directory into a validated, immutable [`Snapshot`].
//!
//! Everything is checked here, once, with errors that name the bad field; the request path
//! then only reads. Settings of features this version does not implement are refused, not
//! silently ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sidegate_crds::{GatewayConfig, SCHEMA_VERSION};

use crate::keys::{KeyStore, KeysError};
use crate::providers::{ProviderError, ProviderTable};

/// Default largest request body (10 MiB).
pub const DEFAULT_MAX_BODY: u64 = sidegate_crds::validation::DEFAULT_MAX_REQUEST_BODY;
/// Default time to the first upstream byte when neither config nor header sets one.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest config file accepted.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Where the config comes from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The `gateway.yaml` file.
    pub config: PathBuf,
    /// The keys directory, if any.
    pub keys_dir: Option<PathBuf>,
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are in the messages, so they are not also `source()`: `{:#}` would print
    // them twice.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("cannot read config file {path}: a {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: schemaVersion {found} is not supported by sidegate {} (supports {SCHEMA_VERSION})", env!("CARGO_PKG_VERSION"))]
    SchemaVersion { path: PathBuf, found: u32 },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("config file {path}: {error}")]
    Provider { path: PathBuf, error: ProviderError },
}

impl ConfigError {
    /// Whether the sources could not be read for a passing reason (out of file descriptors, an
    /// I/O error), as opposed to being invalid or gone: read again, they may load as they are.
    pub fn is_passing(&self) -> bool {
        let io = match self {
            Self::Read { error, .. }
            | Self::Keys(KeysError::ReadDir { error, .. } | KeysError::ReadFile { error, .. }) => {
                error
            }
            _ => return false,
        };
        // A file that is not there comes back as a change the watch sees.
        io.kind() != std::io::ErrorKind::NotFound
    }
}

/// A loaded, validated configuration. Requests read it through an `Arc` and finish on the
/// snapshot they started with.
#[derive(Debug)]
pub struct Snapshot {
    /// The parsed file.
    pub config: GatewayConfig,
    /// Providers with their keys resolved.
    pub providers: ProviderTable,
    /// Keys and gateway tokens.
    pub keys: KeyStore,
    /// Whether `cf-aig-authorization` is required.
    pub auth_required: bool,
    /// Largest request body.
    pub max_body: u64,
    /// Most bytes held in buffered bodies at once, over all requests
    /// (`spec.limits.maxBufferedBytes`; see [`crate::buffers`]).
    pub max_buffered: u64,
    /// Default time to the first upstream byte.
    pub request_timeout: Duration,
    /// Whether to log one line per request.
    pub log_requests: bool,
    /// Whether log lines carry the request and response bodies (`spec.logging.payloads`).
    pub log_payloads: bool,
    /// Response cache settings.
    pub cache: crate::cache::Settings,
    /// Upstream retries (`spec.retries`; headers may change them per request).
    pub retries: crate::retry::Policy,
    /// DLP policies.
    pub dlp: crate::dlp::Settings,
    /// Guardrails (moderation of prompts and responses).
    pub guardrails: crate::guardrails::Settings,
    /// Dynamic routes and fallback chains of `/compat`.
    pub routing: crate::routing::Routing,
    /// The gateway's Redis (`spec.redis`), for state shared across pods.
    pub shared: Option<std::sync::Arc<crate::shared::Shared>>,
    /// Request rate limit, if any.
    pub rate_limit: Option<crate::ratelimit::Settings>,
    /// Its counts: a reload keeps them for windows of the same shape
    /// ([`crate::ratelimit::Limiter::carried_over`]).
    pub rate_limiter: std::sync::Arc<crate::ratelimit::Limiter>,
    /// Model prices: the built-in table and `spec.pricing`.
    pub pricing: crate::cost::Pricing,
    /// Spend limit and token budget, if either is set.
    pub budgets: Option<crate::budget::Settings>,
    /// Where request spans go (`spec.openTelemetry`), if anywhere.
    pub otel: Option<std::sync::Arc<crate::otel::Target>>,
    /// The gateway name accepted in long-form URLs (`None`: any).
    pub gateway_name: Option<String>,
    /// sha256 of the file and the keys: any change to either changes it.
    pub fingerprint: String,
    /// The config file as read: its keys are loaded again around it while a newer file is
    /// refused.
    pub raw: Vec<u8>,
    /// Warnings found while loading (unused keys, ...).
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The hash to publish: the operator's content hash when rendered, else the fingerprint.
    pub fn hash(&self) -> &str {
        self.config
            .gateway
            .hash
            .as_deref()
            .unwrap_or(&self.fingerprint)
    }

    /// `namespace/name` of the gateway, or empty.
    pub fn gateway_label(&self) -> String {
        match (&self.config.gateway.namespace, &self.config.gateway.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => String::new(),
        }
    }
}

/// Parses YAML with errors on one line (`... at line 3, column 5`), without the source snippet
/// serde-saphyr adds by default: the error goes into a log line.
fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_saphyr::from_str_with_options(text, serde_saphyr::options! { with_snippet: false })
        .map_err(|e| yaml_error_message(text, &e))
}

/// A YAML parse error as its operator reads it: serde-saphyr's own `Display` is meant for
/// developers (it advises options and API calls such as `DuplicateKeyPolicy`,
/// `from_str_multiple` or `Option<String>`); its user formatter, with plain words where that too
/// shows internals, and the field whose value is of the wrong type, with the line and column.
fn yaml_error_message(text: &str, err: &serde_saphyr::Error) -> String {
    let message = err.render_with_formatter(&PlainYaml);
    let field = err
        .location()
        .and_then(|at| field_at(text, at.line(), at.column()));
    let wrong_value = matches!(
        err,
        serde_saphyr::Error::InvalidScalar { .. }
            | serde_saphyr::Error::InvalidBooleanStrict { .. }
            | serde_saphyr::Error::SerdeInvalidType { .. }
            | serde_saphyr::Error::SerdeInvalidValue { .. }
            | serde_saphyr::Error::Message { .. }
            | serde_saphyr::Error::NullIntoString { .. }
            | serde_saphyr::Error::Unexpected { .. }
    );
    match field {
        Some(field) if wrong_value => format!("`{field}`: {message}"),
        _ => message,
    }
}

/// The key whose value starts at `line`, `column` (1-based), when it is written before it on
/// that line (`limit: -5`, `{maxAttempts: three}`) or ends the line above (a block value):
/// errors of a value name no field.
fn field_at(text: &str, line: u64, column: u64) -> Option<&str> {
    let index = usize::try_from(line.checked_sub(1)?).ok()?;
    let at = text.lines().nth(index)?;
    let before = at
        .char_indices()
        .nth(usize::try_from(column.checked_sub(1)?).ok()?)
        .map_or(at, |(i, _)| &at[..i]);
    let before = match before.trim() {
        "" | "-" => text.lines().nth(index.checked_sub(1)?)?,
        _ => before,
    };
    let key = before.trim_end().strip_suffix(':')?.trim_end();
    let start = key
        .rfind(|c: char| c.is_whitespace() || matches!(c, '{' | ',' | '-'))
        .map_or(0, |i| i + 1);
    let key = key[start..].trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty()).then_some(key)
}

/// serde-saphyr's [`serde_saphyr::UserMessageFormatter`], in plain words where that shows a
/// Rust type or a debug structure.
struct PlainYaml;

impl serde_saphyr::MessageFormatter for PlainYaml {
    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> std::borrow::Cow<'a, str> {
        use serde_saphyr::Error as E;
        match err {
            E::Budget { .. }
            | E::AliasReplayCounterOverflow { .. }
            | E::AliasReplayLimitExceeded { .. }
            | E::AliasExpansionLimitExceeded { .. }
            | E::AliasReplayStackDepthExceeded { .. } => {
                "the YAML is too large or too complex (its aliases expand to too many values, or it nests too deep)".into()
            }
            E::MultipleDocuments { .. } => {
                "the file holds more than one YAML document (a `---` line): it must hold one".into()
            }
            E::NullIntoString { .. } | E::InvalidCharNull { .. } => {
                "an empty (null) key or value where text is expected".into()
            }
            E::InvalidScalar { ty, .. } => match *ty {
                "bool" | "boolean" => "expected true or false".into(),
                "char" | "string" => "expected text".into(),
                "f32" | "f64" => "expected a number".into(),
                ty if ty.starts_with('u') => "expected a whole number, 0 or more".into(),
                ty if ty.starts_with('i') => "expected a whole number".into(),
                _ => "expected another kind of value".into(),
            },
            _ => serde_saphyr::UserMessageFormatter.format_message(err),
        }
    }
}

/// Refuses a field of `spec` the gateway does not know (`authentification:`), which would
/// otherwise be dropped silently, turning the feature it meant off. Every other level of the file
/// refuses unknown fields in its type; `spec` cannot
/// (see [`sidegate_crds::policy::GatewayPolicy::field_names`]).
fn refuse_unknown_spec_fields(text: &str) -> Result<(), String> {
    /// The keys of `spec`, each with where it is written.
    struct Keys(Vec<serde_saphyr::Spanned<String>>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a mapping")
                }
                fn visit_unit<E>(self) -> Result<Keys, E> {
                    Ok(Keys(Vec::new()))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(key) = map.next_key::<serde_saphyr::Spanned<String>>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_any(Visit)
        }
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        spec: Option<Keys>,
    }
    let Doc { spec: Some(spec) } = parse_yaml(text)? else {
        return Ok(());
    };
    let known = sidegate_crds::policy::GatewayPolicy::field_names();
    match spec.0.iter().find(|k| !known.contains(&k.value)) {
        None => Ok(()),
        Some(unknown) => Err(format!(
            "spec: unknown field `{}`, expected one of {} at line {}, column {}",
            unknown.value,
            known.join(", "),
            unknown.referenced.line(),
            unknown.referenced.column()
        )),
    }
}

/// Why `gateway.namespace` or `gateway.name` cannot be a Kubernetes namespace or AIGateway
/// name, as the operator renders them (a DNS label; a DNS subdomain). Anything else could make
/// two gateways one in Redis: `sidegate:{namespace/name}:` would be the prefix of a standalone
/// gateway named `namespace/name` too.
fn identity_problem(gateway: &sidegate_crds::GatewayIdentity) -> Option<String> {
    if let Some(ns) = &gateway.namespace
        && !is_dns_label(ns)
    {
        return Some(format!(
            "gateway.namespace {ns:?} is not a Kubernetes namespace name (at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    if let Some(name) = &gateway.name
        && !is_dns_subdomain(name)
    {
        return Some(format!(
            "gateway.name {name:?} is not a Kubernetes object name (at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit): it names the gateway in its URLs and its keys in Redis"
        ));
    }
    None
}

/// RFC 1123 label, as Kubernetes names namespaces.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain, as Kubernetes names most objects (AIGateways among them).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Reads and validates the config file and keys directory.
pub fn load(src: &Sources) -> Result<Snapshot, ConfigError> {
    load_with(src, read_config(&src.config)?)
}

/// Validates `raw` as the config file and reads the keys directory.
pub fn load_with(src: &Sources, raw: Vec<u8>) -> Result<Snapshot, ConfigError> {
    let path = &src.config;
    let text = std::str::from_utf8(&raw).map_err(|_| ConfigError::Parse {
        path: path.clone(),
        message: "not UTF-8".into(),
    })?;
    // The version first: a newer version's fields and values are not this one's, and the file
    // is refused for its version, not for the first of them.
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    if let Ok(Version {
        schema_version: Some(found),
    }) = parse_yaml::<Version>(text)
        && found != SCHEMA_VERSION
    {
        return Err(ConfigError::SchemaVersion {
            path: path.clone(),
            found,
        });
    }
    let config: GatewayConfig = parse_yaml(text).map_err(|message| ConfigError::Parse {
        path: path.clone(),
        message,
    })?;
    if config.schema_version != SCHEMA_VERSION {
        return Err(ConfigError::SchemaVersion {
            path: path.clone(),
            found: config.schema_version,
        });
    }
    refuse_unknown_spec_fields(text).map_err(|message| ConfigError::Parse {
        path: path.clone(),
        message,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    // The operator makes the same checks (`InvalidSpec`), so it never renders a config that
    // fails here; what is left below needs the keys directory.
    let problems = sidegate_crds::validation::policy_problems(
        &config.spec,
        sidegate_crds::validation::Origin::File,
    );
    if !problems.is_empty() {
        return Err(invalid(problems.join("; ")));
    }
    identity_problem(&config.gateway).map_or(Ok(()), |p| Err(invalid(p)))?;
    let keys = match &src.keys_dir {
        Some(dir) => KeyStore::load(dir)?,
        None => KeyStore::default(),
    };
    let auth_required = config
        .spec
        .authentication
        .as_ref()
        .is_some_and(|a| a.enabled);
    let (providers, mut warnings) =
        ProviderTable::build(&config.spec.providers, &keys).map_err(|error| {
            ConfigError::Provider {
                path: path.clone(),
                error,
            }
        })?;
    warnings.extend(
        keys.skipped
            .iter()
            .map(|s| format!("keys directory entry skipped: {s}")),
    );
    if auth_required && keys.token_count() == 0 {
        // Fail closed: all tokens revoked (the operator leaves the file out when the token
        // Secret is gone) is no token accepted, not the last ones kept.
        warnings.push(format!(
            "spec.authentication.enabled is true but the keys directory has no tokens in {}: every request is refused (401) until one comes",
            sidegate_crds::config::TOKENS_FILE_NAME
        ));
    }
    for (provider, aliases) in &config.keys {
        if providers.get(provider).is_none() && provider != "authentication" {
            warnings.push(format!(
                "keys index names {provider:?}, which is no provider of this gateway (built in or in spec.providers): its keys are never used"
            ));
            continue;
        }
        for alias in aliases {
            if keys.get(provider, alias).is_none() {
                warnings.push(format!("keys index lists {provider}.{alias} but the keys directory has no such file (yet)"));
            }
        }
    }
    let max_body = config
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.max_request_body)
        .map_or(DEFAULT_MAX_BODY, |b| b.get());
    // Unset, the budget is the default, or one largest request body if that is more: raising
    // `maxRequestBody` alone must not make its largest requests unservable.
    let max_buffered = config
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.max_buffered_bytes)
        .map_or(crate::buffers::DEFAULT_MAX_BUFFERED.max(max_body), |b| {
            b.get()
        });
    let request_timeout = config
        .spec
        .request_timeout
        .map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.get());
    let log_requests = config.spec.logging.as_ref().is_none_or(|l| l.enabled);
    let log_payloads = config.spec.logging.as_ref().is_some_and(|l| l.payloads);
    let cache = crate::cache::Settings::from_policy(config.spec.cache.as_ref()).map_err(invalid)?;
    let retries =
        crate::retry::Policy::from_config(config.spec.retries.as_ref()).map_err(invalid)?;
    let dlp = crate::dlp::Settings::from_policy(config.spec.dlp.as_ref()).map_err(invalid)?;
    let guardrails = crate::guardrails::Settings::from_policy(config.spec.guardrails.as_ref())
        .map_err(invalid)?;
    let routing =
        crate::routing::Routing::from_policy(&config.spec.routes, &config.spec.fallbacks, |id| {
            providers.get(id).is_some()
        })
        .map_err(invalid)?;
    let shared = match &config.spec.redis {
        None => None,
        Some(_) => {
            let url = keys.redis_url.as_ref().ok_or_else(|| {
                invalid(format!(
                    "spec.redis is set but the keys directory has no {} file",
                    sidegate_crds::config::REDIS_URL_FILE_NAME
                ))
            })?;
            // The key prefix in Redis: unnamed gateways would share each other's entries,
            // limits and spend.
            let label = match (&config.gateway.namespace, &config.gateway.name) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                (None, Some(n)) => n.clone(),
                _ => {
                    return Err(invalid(
                        "spec.redis needs the gateway's name (gateway: {name: ...}): it names the gateway's keys in Redis (sidegate:{name}:), which another gateway sharing that Redis must not use".to_owned(),
                    ));
                }
            };
            Some(std::sync::Arc::new(
                crate::shared::Shared::new(url, &label).map_err(invalid)?,
            ))
        }
    };
    let rate_limit = crate::ratelimit::Settings::from_policy(config.spec.rate_limit.as_ref())
        .map_err(invalid)?;
    let budgets = crate::budget::Settings::from_policy(&config.spec).map_err(invalid)?;
    let pricing = crate::cost::Pricing::with(&config.spec.pricing).map_err(invalid)?;
    let otel_gateway = match (&config.gateway.namespace, &config.gateway.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.clone(),
        _ => String::new(),
    };
    let otel = crate::otel::Target::from_policy(&config.spec, otel_gateway).map_err(invalid)?;
    let mut h = Sha256::new();
    h.update(&raw);
    h.update(keys.digest);
    let fingerprint = format!("sha256:{}", hex::encode(h.finalize()));
    let mut snap = Snapshot {
        gateway_name: config.gateway.name.clone(),
        otel,
        config,
        providers,
        keys,
        auth_required,
        max_body,
        max_buffered,
        request_timeout,
        log_requests,
        log_payloads,
        cache,
        rate_limit,
        rate_limiter: std::sync::Arc::default(),
        pricing,
        budgets,
        retries,
        dlp,
        guardrails,
        routing,
        shared,
        fingerprint,
        raw,
        warnings,
    };
    let routes = crate::compat::client_key_warnings(&snap);
    snap.warnings.extend(routes);
    Ok(snap)
}

fn read_config(path: &Path) -> Result<Vec<u8>, ConfigError> {
    read_regular_file(path, MAX_CONFIG_FILE).map_err(|e| match e {
        FileError::Io(error) => ConfigError::Read {
            path: path.to_owned(),
            error,
        },
        FileError::NotAFile(kind) => ConfigError::NotAFile {
            path: path.to_owned(),
            kind,
        },
        FileError::TooLarge => ConfigError::TooLarge {
            path: path.to_owned(),
        },
    })
}

/// Why [`read_regular_file`] read no file.
#[derive(Debug)]
pub enum FileError {
    /// It could not be opened or read.
    Io(std::io::Error),
    /// It is no regular file: a directory, FIFO, socket, device (see [`file_kind`]).
    NotAFile(&'static str),
    /// It holds more than the bound.
    TooLarge,
}

/// The bytes of the regular file at `path` (through symlinks, as kubelet mounts a ConfigMap's
/// or Secret's files), at most `max` of them. Opening a FIFO waits for a writer, forever if none
/// comes, and a device such as `/dev/zero` never ends: only regular files are opened, and read
/// up to the bound, not by the length the metadata gives (the file may grow meanwhile).
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read as _;
    let meta = std::fs::metadata(path).map_err(FileError::Io)?;
    if !meta.is_file() {
        return Err(FileError::NotAFile(file_kind(&meta.file_type())));
    }
    let file = std::fs::File::open(path).map_err(FileError::Io)?;
    let mut raw = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(FileError::Io)?;
    if raw.len() as u64 > max {
        return Err(FileError::TooLarge);
    }
    Ok(raw)
}

/// What a file that is not a regular one is, for an error message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_is_no_regular_file_is_refused_without_opening_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("gateway.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // Opening it would wait for a writer that never comes.
        let err = read_config(&fifo).expect_err("a FIFO");
        assert!(
            matches!(err, ConfigError::NotAFile { kind: "FIFO", .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&fifo.display().to_string()),
            "{err}"
        );
        let err = read_config(dir.path()).expect_err("a directory");
        assert!(
            matches!(
                err,
                ConfigError::NotAFile {
                    kind: "directory",
                    ..
                }
            ),
            "{err}"
        );
        // Through a symlink (kubelet's ConfigMap volume) a regular file is read.
        let real = dir.path().join("real.yaml");
        std::fs::write(&real, "schemaVersion: 1\n").expect("write");
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert_eq!(read_config(&link).expect("link"), b"schemaVersion: 1\n");
    }

    #[test]
    fn only_sources_that_could_not_be_read_are_worth_reading_again_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let io = |errno| std::io::Error::from_raw_os_error(errno);
        let read = |error| ConfigError::Read {
            path: dir.path().join("gateway.yaml"),
            error,
        };
        // EMFILE, EIO, EACCES: the same files may read another time.
        for errno in [24, 5, 13] {
            assert!(read(io(errno)).is_passing(), "{}", read(io(errno)));
        }
        let key = |error| {
            ConfigError::Keys(KeysError::ReadFile {
                path: dir.path().join("openai.default"),
                error,
            })
        };
        assert!(key(io(24)).is_passing());
        // Gone (its return is a change), or invalid as written: not until they change.
        assert!(!read(io(2)).is_passing());
        assert!(!key(io(2)).is_passing());
        let invalid = write_config(dir.path(), "schemaVersion: 1\nspec: {bogus: 1}\n");
        let err = load(&invalid).expect_err("invalid");
        assert!(!err.is_passing(), "{err}");
    }

    fn write_config(dir: &Path, text: &str) -> Sources {
        let path = dir.join("gateway.yaml");
        std::fs::write(&path, text).expect("write config");
        Sources {
            config: path,
            keys_dir: None,
        }
    }

    #[test]
    fn the_example_standalone_config_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  requestTimeout: 30s\n  providers:\n    openai: {baseURL: 'http://127.0.0.1:9/v1'}\n",
        );
        let snap = load(&src).expect("load");
        assert_eq!(snap.request_timeout, Duration::from_secs(30));
        assert_eq!(snap.max_body, DEFAULT_MAX_BODY);
        assert_eq!(snap.max_buffered, crate::buffers::DEFAULT_MAX_BUFFERED);
        assert!(snap.fingerprint.starts_with("sha256:"));
    }

    #[test]
    fn a_config_saved_with_a_byte_order_mark_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = write_config(
            dir.path(),
            "\u{feff}schemaVersion: 1\r\nspec:\r\n  requestTimeout: 30s\r\n",
        );
        let snap = load(&src).expect("load");
        assert_eq!(snap.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_examples_in_the_repository_load() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        std::fs::write(keys.join("authentication.tokens"), "t0ken\n").expect("tokens");
        for name in ["gateway.yaml", "demo-gateway.yaml"] {
            let text = std::fs::read_to_string(examples.join(name)).expect("example");
            // demo.sh puts the mock's address in place of MOCK_URL.
            let mut src = write_config(dir.path(), &text.replace("MOCK_URL", "http://127.0.0.1:9"));
            src.keys_dir = Some(keys.clone());
            load(&src).unwrap_or_else(|e| panic!("examples/{name}: {e}"));
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_its_key_in_plain_words() {
        assert_eq!(field_at("a:\n  b: {c: x}\n", 2, 10), Some("c"));
        assert_eq!(field_at("a:\n  b:\n    - x\n", 3, 7), Some("b"));
        assert_eq!(field_at("a: [x]\n", 1, 5), None);
        assert_eq!(field_at("", 9, 9), None);
        let err = parse_yaml::<GatewayConfig>(
            "schemaVersion: 1\nspec:\n  retries: {maxAttempts: three}\n",
        )
        .expect_err("not a number");
        assert!(
            err.starts_with("`maxAttempts`: expected a whole number"),
            "{err}"
        );
        assert!(err.contains("line 3"), "{err}");
        let err =
            parse_yaml::<GatewayConfig>("schemaVersion: 1\nschemaVersion: 1\n").expect_err("twice");
        assert!(
            !err.contains("DuplicateKeyPolicy") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_and_versions_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for v2 in [
            "schemaVersion: 2\n",
            "schemaVersion: 2\nsecrets: {}\n",
            "spec:\n  requestTimeout: 1.5s\nschemaVersion: 2\n",
        ] {
            let err = load(&write_config(dir.path(), v2)).expect_err("v2");
            assert!(
                err.to_string().contains("schemaVersion 2 is not supported"),
                "{err}"
            );
        }
        let err = load(&write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  cache: {enabeld: true}\n",
        ))
        .expect_err("typo");
        assert!(err.to_string().contains("enabeld"), "{err}");
        let err = load(&write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  requestTimeout: soon\n",
        ))
        .expect_err("bad duration");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        // A misspelt feature under spec would be dropped, turning it off: authentication here.
        for typo in ["authentification", "requestTimout", "cahce"] {
            let text = format!("schemaVersion: 1\nspec:\n  {typo}: {{enabled: true}}\n");
            let err = load(&write_config(dir.path(), &text)).expect_err(typo);
            assert!(
                err.to_string()
                    .contains(&format!("spec: unknown field `{typo}`, expected one of")),
                "{err}"
            );
            assert!(err.to_string().ends_with("at line 3, column 3"), "{err}");
        }
        let known = sidegate_crds::policy::GatewayPolicy::field_names();
        for field in [
            "authentication",
            "requestTimeout",
            "rateLimit",
            "spendLimit",
            "providers",
        ] {
            assert!(known.iter().any(|k| k == field), "{field} in {known:?}");
        }
    }

    #[test]
    fn features_not_implemented_yet_are_refused_not_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load(&write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  rateLimit: {limit: 5, interval: 60s, scope: global}\n",
        ))
        .expect_err("global without redis");
        assert!(
            err.to_string()
                .contains("spec.rateLimit.scope: global needs spec.redis"),
            "{err}"
        );
        let err = load(&write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  redis: {}\n",
        ))
        .expect_err("redis without url");
        assert!(err.to_string().contains("no redis.url file"), "{err}");
    }

    #[test]
    fn redis_needs_a_gateway_name_to_keep_its_keys_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        std::fs::write(
            keys.join(sidegate_crds::config::REDIS_URL_FILE_NAME),
            "redis://127.0.0.1:6379/0",
        )
        .expect("url");
        let load_with = |gateway: &str| {
            let text = format!("schemaVersion: 1\n{gateway}spec:\n  redis: {{}}\n");
            let mut src = write_config(dir.path(), &text);
            src.keys_dir = Some(keys.clone());
            load(&src)
        };
        for unnamed in ["", "gateway: {namespace: team-a}\n"] {
            let err = load_with(unnamed).expect_err("unnamed");
            assert!(
                err.to_string()
                    .contains("spec.redis needs the gateway's name (gateway: {name: ...})"),
                "{err}"
            );
        }
        for named in [
            "gateway: {name: gw}\n",
            "gateway: {namespace: team-a, name: gw}\n",
        ] {
            let snap = load_with(named).unwrap_or_else(|e| panic!("{named}: {e}"));
            assert!(snap.shared.is_some());
        }
    }

    #[test]
    fn gateway_names_that_are_no_kubernetes_names_are_refused_by_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load_with = |gateway: &str| {
            load(&write_config(
                dir.path(),
                &format!("schemaVersion: 1\ngateway: {gateway}\nspec: {{}}\n"),
            ))
        };
        // A standalone `team-a/main` would have the Redis prefix of `main` in `team-a`.
        for (gateway, field) in [
            ("{name: team-a/main}", "gateway.name \"team-a/main\""),
            ("{name: 'a:b'}", "gateway.name"),
            ("{name: Main}", "gateway.name"),
            ("{name: main.}", "gateway.name"),
            ("{name: a..b}", "gateway.name"),
            ("{name: ''}", "gateway.name"),
            (
                "{namespace: team.a, name: main}",
                "gateway.namespace \"team.a\"",
            ),
            ("{namespace: 'team-a/x', name: main}", "gateway.namespace"),
            ("{namespace: -a, name: main}", "gateway.namespace"),
        ] {
            let err = load_with(gateway).expect_err(gateway).to_string();
            assert!(err.contains(field), "{gateway}: {err}");
        }
        // What the operator renders: a namespace (DNS label) and an AIGateway name (DNS
        // subdomain, dots allowed).
        let long = "a".repeat(63);
        for gateway in [
            "{namespace: team-a, name: main}".to_owned(),
            "{namespace: t1, name: gw.v2-eu}".to_owned(),
            "{name: demo}".to_owned(),
            format!("{{namespace: {long}, name: {long}.{long}}}"),
        ] {
            load_with(&gateway).unwrap_or_else(|e| panic!("{gateway}: {e}"));
        }
    }

    #[test]
    fn usage_limits_and_prices_load_and_bad_ones_are_refused_by_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snap = load(&write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  rateLimit: {limit: 5, interval: 60s, tokensPerMinute: 100, technique: sliding}\n  spendLimit: {amount: '2.50', period: week}\n  pricing:\n    - {model: house-llm, inputPerMillion: '1', outputPerMillion: '2'}\n",
        ))
        .expect("load");
        let b = snap.budgets.expect("limits");
        assert_eq!(b.spend.map(|s| s.amount), Some(2.5));
        assert_eq!(
            b.tokens.map(|t| (t.per_minute, t.sliding)),
            Some((100, true))
        );
        assert!(snap.pricing.lookup("house-llm-7b").is_some());
        let plain = load(&write_config(dir.path(), "schemaVersion: 1\n")).expect("load");
        assert!(
            plain.budgets.is_none(),
            "no limits, nothing to check per request"
        );
        for (spec, message) in [
            (
                "  spendLimit: {amount: 'ten', period: day}\n",
                "spec.spendLimit.amount \"ten\"",
            ),
            (
                "  rateLimit: {limit: 5, interval: 60s, tokensPerMinute: 0}\n",
                "spec.rateLimit.tokensPerMinute must be larger than 0",
            ),
            (
                "  rateLimit: {limit: 5, interval: 60s, tokensPerMinute: 10, scope: global}\n",
                "needs spec.redis",
            ),
            (
                "  pricing:\n    - {model: m, inputPerMillion: '1', outputPerMillion: free}\n",
                "spec.pricing[0].outputPerMillion",
            ),
        ] {
            let err = load(&write_config(
                dir.path(),
                &format!("schemaVersion: 1\nspec:\n{spec}"),
            ))
            .expect_err(spec);
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fixture {
        refused: Vec<Refused>,
        accepted: Vec<serde_json::Value>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Refused {
        spec: serde_json::Value,
        why: String,
        sidecar_why: Option<String>,
        #[serde(default)]
        sidecar_warns: bool,
    }

    #[test]
    fn every_spec_the_operator_must_refuse_is_refused_at_load() {
        // The same list is checked by the operator's tests (operator/src/validate.rs), which
        // report each as a spec problem: what it renders, the sidecar loads.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/fixtures/refused-specs.yaml");
        let text = std::fs::read_to_string(path).expect("fixture");
        let f: Fixture = parse_yaml(&text).expect("fixture parses");
        assert!(f.refused.len() > 30);
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        let with_spec = |spec: &serde_json::Value| {
            let mut src = write_config(dir.path(), &format!("schemaVersion: 1\nspec: {spec}\n"));
            src.keys_dir = Some(keys.clone());
            load(&src)
        };
        for case in f.refused {
            let why = case.sidecar_why.as_ref().unwrap_or(&case.why);
            match with_spec(&case.spec) {
                Ok(snap) if case.sidecar_warns => assert!(
                    snap.warnings.iter().any(|w| w.contains(why.as_str())),
                    "{}: {:?}",
                    case.spec,
                    snap.warnings
                ),
                Ok(_) => panic!("{} loaded", case.spec),
                Err(e) => assert!(
                    !case.sidecar_warns && e.to_string().contains(why.as_str()),
                    "{}: {e}",
                    case.spec
                ),
            }
        }
        for spec in f.accepted {
            if let Err(e) = with_spec(&spec) {
                panic!("{spec}: {e}");
            }
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct FileFixture {
        refused_files: Vec<FileCase>,
        accepted_files: Vec<FileCase>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct FileCase {
        file: String,
        value: String,
        repeat: Option<usize>,
        sidecar_why: Option<String>,
        #[serde(default)]
        sidecar_warns: bool,
    }

    #[test]
    fn every_keys_file_the_operator_must_not_render_is_refused_at_load() {
        // The same list is checked by the operator's tests (operator/src/render.rs), which
        // report each Secret value as a key problem instead of rendering it.
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/fixtures/refused-specs.yaml");
        let text = std::fs::read_to_string(path).expect("fixture");
        let f: FileFixture = parse_yaml(&text).expect("fixture parses");
        let load_with = |case: &FileCase| {
            let dir = tempfile::tempdir().expect("tempdir");
            let keys = dir.path().join("keys");
            std::fs::create_dir(&keys).expect("keys dir");
            // The operator renders the value trimmed.
            let value = case.value.repeat(case.repeat.unwrap_or(1));
            std::fs::write(keys.join(&case.file), value.trim()).expect("key file");
            let spec = match case.file.as_str() {
                sidegate_crds::config::REDIS_URL_FILE_NAME => "{redis: {}}\ngateway: {name: gw}",
                sidegate_crds::config::TOKENS_FILE_NAME => "{authentication: {enabled: true}}",
                _ => "{}",
            };
            let mut src = write_config(dir.path(), &format!("schemaVersion: 1\nspec: {spec}\n"));
            src.keys_dir = Some(keys);
            load(&src)
        };
        for case in &f.refused_files {
            let why = case.sidecar_why.as_deref().unwrap_or_default();
            match load_with(case) {
                // Loaded, but none of it served (no token: every request refused).
                Ok(snap) if case.sidecar_warns => {
                    assert!(
                        snap.warnings.iter().any(|w| w.contains(why)),
                        "{}: {:?}",
                        case.file,
                        snap.warnings
                    );
                    assert!(snap.keys.is_empty() && snap.keys.token_count() == 0);
                }
                Ok(_) => panic!("{} {:.40} loaded", case.file, case.value),
                Err(e) => assert!(
                    !case.sidecar_warns && e.to_string().contains(why),
                    "{}: {e}",
                    case.file
                ),
            }
        }
        for case in &f.accepted_files {
            if let Err(e) = load_with(case) {
                panic!("{} {:.40}: {e}", case.file, case.value);
            }
        }
    }

    #[test]
    fn authentication_without_tokens_accepts_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut src = write_config(
            dir.path(),
            "schemaVersion: 1\nspec:\n  authentication: {enabled: true}\n",
        );
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("mkdir");
        src.keys_dir = Some(keys);
        let snap = load(&src).expect("loads, accepting no token");
        assert!(snap.auth_required && snap.keys.token_count() == 0);
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.contains("authentication.tokens") && w.contains("401")),
            "{:?}",
            snap.warnings
        );
    }
}
