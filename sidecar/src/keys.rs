//! Provider keys and gateway tokens read from the keys directory.
//!
//! The directory holds one file per key, named `<provider>.<alias>` (as mounted from Secret
//! `sidegate-<gateway>-keys`), plus `authentication.tokens` (gateway tokens, one per line) and
//! `redis.url` (the Redis of `spec.redis`).
//! Entries starting with `.` are kubelet's bookkeeping (`..data`, `..2025_01_01...`) and are
//! skipped. Values live in [`SecretString`]s; the auth header built from each is marked
//! sensitive and never printed.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sidegate_crds::config::{REDIS_URL_FILE_NAME, TOKENS_FILE_NAME};
use sidegate_crds::provider::{is_valid_alias, is_valid_provider_id};
use subtle::ConstantTimeEq;

/// Largest key file accepted (a service-account JSON is a few KiB).
const MAX_KEY_FILE: u64 = 64 * 1024;

/// A keys directory that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    // The causes are in the messages, so they are not also `source()`: `{:#}` would print
    // them twice.
    #[error("cannot read keys directory {path}: {error}")]
    ReadDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read key file {path}: {error}")]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// One stored provider key.
pub struct ProviderKey {
    secret: SecretString,
}

impl ProviderKey {
    /// The key value, for building an auth header.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProviderKey([redacted])")
    }
}

/// A precomputed, sensitive auth header value for a stored key.
#[derive(Clone)]
pub struct AuthValue(HeaderValue);

impl AuthValue {
    /// `scheme key` (or just `key`) as a header value marked sensitive; `None` when the key has
    /// characters a header cannot carry.
    pub fn new(scheme: Option<&str>, key: &ProviderKey) -> Option<Self> {
        let text = match scheme {
            Some(s) => format!("{s} {}", key.expose()),
            None => key.expose().to_owned(),
        };
        let mut v = HeaderValue::from_str(&text).ok()?;
        v.set_sensitive(true);
        Some(Self(v))
    }

    /// `Bearer token` as a sensitive header value (a token minted at run time).
    pub fn bearer(token: &str) -> Option<Self> {
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        v.set_sensitive(true);
        Some(Self(v))
    }

    /// The header value.
    pub fn header(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for AuthValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthValue([redacted])")
    }
}

/// Everything read from the keys directory.
#[derive(Default)]
pub struct KeyStore {
    keys: HashMap<String, HashMap<String, ProviderKey>>,
    pub(crate) tokens: Vec<SecretString>,
    /// The Redis URL (`redis.url`; may carry a password).
    pub redis_url: Option<SecretString>,
    /// Names of files that were skipped, with the reason (for the load log).
    pub skipped: Vec<String>,
    /// sha256 over a salt of this process, file names and value digests: changes whenever any
    /// key changes, and (published within the config fingerprint when no operator renders the
    /// config) gives no way to test guesses of a weak key or token offline.
    pub digest: [u8; 32],
}

/// A random salt, the same for the life of the process (so the digest changes with content only).
fn process_salt() -> &'static [u8; 32] {
    static SALT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    SALT.get_or_init(|| {
        use ring::rand::SecureRandom as _;
        let mut salt = [0u8; 32];
        // Without the system's randomness the digest is still a digest, only unsalted.
        let _ = ring::rand::SystemRandom::new().fill(&mut salt);
        salt
    })
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.aliases().map(|(p, a)| format!("{p}.{a}")).collect();
        names.sort();
        f.debug_struct("KeyStore")
            .field("keys", &names)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// Why an entry of the keys directory that `e` was met following is no key, when `e` says it
/// leads to no file: a link left dangling while kubelet swaps the volume's files, or one that
/// loops (a stray self-referencing link). Such an entry is skipped; a key file that is there but
/// cannot be read (its permissions) fails the load, loudly, as a key that cannot be used should.
fn leads_nowhere(e: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    // `ErrorKind::FilesystemLoop` is not stable: ELOOP by its number.
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return Some("a link that loops");
    }
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
        .then_some("gone while loading")
}

impl KeyStore {
    /// Reads every key file of `dir`.
    pub fn load(dir: &Path) -> Result<Self, KeysError> {
        let entries = std::fs::read_dir(dir).map_err(|error| KeysError::ReadDir {
            path: dir.to_owned(),
            error,
        })?;
        let mut names = Vec::new();
        let mut store = Self::default();
        for entry in entries {
            let entry = entry.map_err(|error| KeysError::ReadDir {
                path: dir.to_owned(),
                error,
            })?;
            let file_name = entry.file_name();
            match file_name.to_str() {
                Some(name) if !name.starts_with('.') => names.push(name.to_owned()),
                Some(_) => {}
                // Not UTF-8 (no key's name is).
                None => store.skipped.push(format!(
                    "{}: not <provider>.<alias>",
                    file_name.to_string_lossy()
                )),
            }
        }
        names.sort();
        let mut hasher = Sha256::new();
        hasher.update(process_salt());
        for name in names {
            let path = dir.join(&name);
            let is_tokens = name == TOKENS_FILE_NAME;
            let is_redis = name == REDIS_URL_FILE_NAME;
            let parsed = name
                .split_once('.')
                .filter(|(p, a)| is_valid_provider_id(p) && is_valid_alias(a));
            // Named first: an odd entry that is no key (a stray or looping link) is not followed.
            if !is_tokens && !is_redis && parsed.is_none() {
                let why = match name.split_once('.') {
                    Some((p, a)) if !is_valid_provider_id(p) && is_valid_alias(a) => {
                        format!("unknown provider `{p}`")
                    }
                    _ => "not <provider>.<alias>".to_owned(),
                };
                store.skipped.push(format!("{name}: {why}"));
                continue;
            }
            // Follow kubelet's symlinks.
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => {
                    store.skipped.push(format!("{name}: not a file"));
                    continue;
                }
                Err(error) => match leads_nowhere(&error) {
                    Some(why) => {
                        store.skipped.push(format!("{name}: {why}"));
                        continue;
                    }
                    None => return Err(KeysError::ReadFile { path, error }),
                },
            };
            // A file that cannot be a key is no key (its alias is not served; an unusable tokens
            // file leaves no token, so every request is refused), and holds back no other.
            if meta.len() > MAX_KEY_FILE {
                store
                    .skipped
                    .push(format!("{name}: larger than {MAX_KEY_FILE} bytes"));
                continue;
            }
            let raw = match std::fs::read(&path) {
                Ok(raw) => raw,
                Err(error) => match leads_nowhere(&error) {
                    Some(why) => {
                        store.skipped.push(format!("{name}: {why}"));
                        continue;
                    }
                    None => return Err(KeysError::ReadFile { path, error }),
                },
            };
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(Sha256::digest(&raw));
            // A byte order mark (PowerShell 5's `Out-File -Encoding utf8`, Notepad) is no part
            // of a key or of the first token.
            let Ok(text) = std::str::from_utf8(crate::text::without_bom(&raw)) else {
                store.skipped.push(format!("{name}: not valid UTF-8"));
                continue;
            };
            if is_tokens {
                store.tokens = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| SecretString::from(l.to_owned()))
                    .collect();
                continue;
            }
            let value = text.trim();
            if value.is_empty() {
                store.skipped.push(format!("{name}: empty"));
                continue;
            }
            if is_redis {
                store.redis_url = Some(SecretString::from(value.to_owned()));
                continue;
            }
            if let Some((provider, alias)) = parsed {
                store.keys.entry(provider.to_owned()).or_default().insert(
                    alias.to_owned(),
                    ProviderKey {
                        secret: SecretString::from(value.to_owned()),
                    },
                );
            }
        }
        store.digest = hasher.finalize().into();
        Ok(store)
    }

    /// The key of `provider` named `alias`.
    pub fn get(&self, provider: &str, alias: &str) -> Option<&ProviderKey> {
        self.keys.get(provider)?.get(alias)
    }

    /// Every `(provider, alias)` pair held.
    pub fn aliases(&self) -> impl Iterator<Item = (&str, &str)> {
        self.keys
            .iter()
            .flat_map(|(p, aliases)| aliases.keys().map(move |a| (p.as_str(), a.as_str())))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.values().map(HashMap::len).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of gateway tokens held.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Whether `header` (the `cf-aig-authorization` value) is `Bearer <t>` (any case of `Bearer`) for a held token.
    /// Compares in constant time against every token.
    pub fn token_matches(&self, header: &[u8]) -> bool {
        crate::headers::bearer_token(header).is_some_and(|t| self.is_token(t))
    }

    /// Whether `presented` (a bare token, as in a provider's `x-api-key`) is a held gateway
    /// token. Compares in constant time against every token.
    pub fn is_token(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0);
        for t in &self.tokens {
            ok |= t.expose_secret().as_bytes().ct_eq(presented);
        }
        ok.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, value: &str) {
        std::fs::write(dir.join(name), value).expect("write key file");
    }

    #[test]
    fn loads_provider_alias_files_and_skips_kubelet_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "sk-one\n");
        write(dir.path(), "anthropic.team-b", "sk-ant");
        write(dir.path(), "..data_tmp", "ignored");
        write(dir.path(), "notes.txt", "ignored");
        write(dir.path(), "opnai.default", "sk-typo");
        write(dir.path(), "README", "ignored");
        write(dir.path(), TOKENS_FILE_NAME, "tok-1\n# comment\n\ntok-2\n");
        let store = KeyStore::load(dir.path()).expect("load");
        assert_eq!(
            store.get("openai", "default").map(ProviderKey::expose),
            Some("sk-one")
        );
        assert_eq!(
            store.get("anthropic", "team-b").map(ProviderKey::expose),
            Some("sk-ant")
        );
        assert!(store.get("openai", "team-b").is_none());
        assert_eq!(store.token_count(), 2);
        assert_eq!(
            store.skipped,
            [
                "README: not <provider>.<alias>",
                "notes.txt: unknown provider `notes`",
                "opnai.default: unknown provider `opnai`",
            ]
        );
    }

    #[test]
    fn looping_and_dangling_links_are_skipped_and_hold_back_no_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "sk-one\n");
        let link = |name: &str, to: &str| {
            std::os::unix::fs::symlink(to, dir.path().join(name)).expect("symlink");
        };
        link("stray", "stray");
        link("openai.loop", "openai.loop");
        link("openai.gone", "nowhere");
        std::fs::create_dir(dir.path().join("openai.adir")).expect("dir");
        let store = KeyStore::load(dir.path()).expect("load");
        assert_eq!(
            store.get("openai", "default").map(ProviderKey::expose),
            Some("sk-one")
        );
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.skipped,
            [
                "openai.adir: not a file",
                "openai.gone: gone while loading",
                "openai.loop: a link that loops",
                "stray: not <provider>.<alias>",
            ]
        );
    }

    #[test]
    fn tokens_match_only_with_the_bearer_scheme() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), TOKENS_FILE_NAME, "secret-token\n");
        let store = KeyStore::load(dir.path()).expect("load");
        assert!(store.token_matches(b"Bearer secret-token"));
        assert!(!store.token_matches(b"secret-token"));
        assert!(!store.token_matches(b"Bearer secret-toke"));
        assert!(!store.token_matches(b"Bearer "));
        // The scheme in any case (RFC 9110), but not run into the token.
        assert!(store.token_matches(b"bearer secret-token"));
        assert!(store.token_matches(b"BEARER  secret-token"));
        assert!(!store.token_matches(b"Bearersecret-token"));
        assert!(!store.token_matches(b"Basic secret-token"));
        assert!(store.is_token(b"secret-token"));
        assert!(!store.is_token(b"Bearer secret-token"));
        assert!(!store.is_token(b""));
    }

    #[test]
    fn a_byte_order_mark_is_no_part_of_a_key_or_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "\u{feff}sk-after-bom\r\n");
        write(dir.path(), TOKENS_FILE_NAME, "\u{feff}tok-1\r\ntok-2\r\n");
        write(dir.path(), REDIS_URL_FILE_NAME, "\u{feff}redis://r:6379\n");
        let store = KeyStore::load(dir.path()).expect("load");
        assert_eq!(
            store.get("openai", "default").map(ProviderKey::expose),
            Some("sk-after-bom")
        );
        assert!(store.is_token(b"tok-1") && store.is_token(b"tok-2"));
        assert_eq!(
            store
                .redis_url
                .as_ref()
                .map(|u| u.expose_secret().to_owned()),
            Some("redis://r:6379".to_owned())
        );
        // Only a leading one: a key is not rewritten further in.
        write(dir.path(), "openai.default", "sk-a\u{feff}b");
        let store = KeyStore::load(dir.path()).expect("load");
        assert_eq!(
            store.get("openai", "default").map(ProviderKey::expose),
            Some("sk-a\u{feff}b")
        );
    }

    #[test]
    fn debug_output_never_shows_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "sk-very-secret");
        let store = KeyStore::load(dir.path()).expect("load");
        let shown = format!("{store:?} {:?}", store.get("openai", "default"));
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("openai.default"));
    }

    #[test]
    fn the_digest_is_salted() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), TOKENS_FILE_NAME, "weak\n");
        let store = KeyStore::load(dir.path()).expect("load");
        // The unsalted digest of the same files, which a reader of the fingerprint could
        // recompute for guessed tokens.
        let mut plain = Sha256::new();
        plain.update(TOKENS_FILE_NAME.as_bytes());
        plain.update([0]);
        plain.update(Sha256::digest(b"weak\n"));
        let plain: [u8; 32] = plain.finalize().into();
        assert_ne!(store.digest, plain);
        assert_eq!(
            KeyStore::load(dir.path()).expect("again").digest,
            store.digest
        );
    }

    #[test]
    fn digest_changes_when_a_key_rotates() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "sk-old");
        let before = KeyStore::load(dir.path()).expect("load").digest;
        write(dir.path(), "openai.default", "sk-new");
        assert_ne!(before, KeyStore::load(dir.path()).expect("load").digest);
    }

    #[test]
    fn key_files_that_cannot_be_keys_are_skipped_naming_the_file_and_hold_back_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "openai.default", "\n");
        write(
            dir.path(),
            "openai.big",
            &"k".repeat(MAX_KEY_FILE as usize + 1),
        );
        std::fs::write(dir.path().join("openai.bytes"), b"sk-\xff").expect("write");
        write(dir.path(), "openai.good", "sk-good\n");
        let store = KeyStore::load(dir.path()).expect("load");
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.get("openai", "good").map(ProviderKey::expose),
            Some("sk-good")
        );
        let mut skipped = store.skipped.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                format!("openai.big: larger than {MAX_KEY_FILE} bytes"),
                "openai.bytes: not valid UTF-8".to_owned(),
                "openai.default: empty".to_owned(),
            ]
        );
    }
}
