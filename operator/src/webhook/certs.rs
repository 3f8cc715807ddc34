//! The webhook's serving certificate, hot-swappable under a running TLS listener.
//!
//! - Self-managed: a CA and a serving certificate generated with rcgen, kept in a Secret that all
//!   replicas share, and the CA patched into the MutatingWebhookConfiguration's `caBundle`.
//!   The CA key is never stored: each rotation makes a new CA, and `caBundle` carries the new and
//!   the previous CA, patched *before* the new certificate is served, so the apiserver trusts
//!   every certificate a replica may present during the switch.
//! - Files (cert-manager or any other issuer): `tls.crt`/`tls.key` read from a mounted Secret
//!   and re-read when kubelet updates it; cert-manager's CA injector maintains `caBundle`.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::owner::{Adopter, write_adopting};

/// Secret key of the serving certificate (PEM).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM).
pub const TLS_KEY_KEY: &str = "tls.key";
/// Secret key of the CA that signed the serving certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the CAs the apiserver must trust (current and previous, PEM).
pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";
/// Annotation on the Secret: expiry of the serving certificate, Unix seconds.
pub const NOT_AFTER_ANNOTATION: &str = "sidegate.dev/not-after";
/// Annotation on the Secret: start of the serving certificate's validity, Unix seconds (so that
/// one made for a longer `--cert-validity-days` than today's is made again).
pub const NOT_BEFORE_ANNOTATION: &str = "sidegate.dev/not-before";
/// Annotation on the Secret: the names the serving certificate is valid for, comma-separated.
pub const NAMES_ANNOTATION: &str = "sidegate.dev/cert-names";

/// Certificate problems.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not make a certificate.
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM data did not hold a certificate and a private key rustls accepts.
    #[error("invalid webhook certificate or key: {0}")]
    Invalid(String),
    /// A certificate file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An apiserver request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// A serving certificate chain and key in PEM. The key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// Certificate chain, leaf first.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").finish_non_exhaustive()
    }
}

/// A fresh CA and the serving certificate it signed.
#[derive(Debug, Clone)]
pub struct GeneratedCert {
    /// The CA certificate (PEM), for `caBundle`.
    pub ca_pem: String,
    /// The serving certificate and key.
    pub serving: ServingCert,
    /// Start of both, Unix seconds: [`BACKDATED`] before they were made.
    pub not_before: u64,
    /// Expiry of both, Unix seconds.
    pub not_after: u64,
}

/// How long before it is made a certificate is valid from: clocks of other machines may be
/// behind.
pub const BACKDATED: Duration = Duration::from_secs(3600);

/// Generates a CA and a serving certificate for `names` (DNS names or IP addresses), valid from
/// [`BACKDATED`] ago (clock skew) until `validity` from now.
pub fn generate(names: &[String], validity: Duration) -> Result<GeneratedCert, CertError> {
    // rcgen's timestamps are `time::OffsetDateTime`; built from the epoch so that this crate
    // needs no direct `time` dependency.
    let at = |secs: u64| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs);
    let now = unix_now();
    let not_before_secs = now.saturating_sub(BACKDATED.as_secs());
    let not_before = at(not_before_secs);
    let not_after_secs = now + validity.as_secs();
    let not_after = at(not_after_secs);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sidegate webhook CA");
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(names.to_vec())?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(GeneratedCert {
        ca_pem: ca.pem(),
        serving: ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        not_before: not_before_secs,
        not_after: not_after_secs,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The certificate the TLS listener presents, replaceable while it runs.
pub struct CertResolver {
    current: RwLock<Option<(ServingCert, Arc<CertifiedKey>)>>,
    /// Where the expiry of a self-managed certificate is reported (Unix seconds).
    expiry: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl Default for CertResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl CertResolver {
    /// A resolver with no certificate yet (handshakes fail until [`CertResolver::set`]).
    pub fn new() -> Self {
        Self {
            current: RwLock::new(None),
            expiry: None,
        }
    }

    /// A resolver like [`CertResolver::new`] that sets `gauge` to the expiry (Unix seconds) of
    /// each self-managed certificate it serves.
    pub fn reporting_expiry(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            expiry: Some(gauge),
            ..Self::new()
        }
    }

    /// Serves `cert`, valid until `not_after` (Unix seconds), like [`CertResolver::set`].
    fn set_expiring(&self, cert: &ServingCert, not_after: u64) -> Result<bool, CertError> {
        let changed = self.set(cert)?;
        if let Some(gauge) = &self.expiry {
            gauge.set(i64::try_from(not_after).unwrap_or(i64::MAX));
        }
        Ok(changed)
    }

    /// Serves `cert` from the next handshake on. Returns whether it differs from the current one.
    pub fn set(&self, cert: &ServingCert) -> Result<bool, CertError> {
        if self.current_pem().as_ref() == Some(cert) {
            return Ok(false);
        }
        let key = certified_key(cert)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some((cert.clone(), key));
        Ok(true)
    }

    /// Whether a certificate is loaded.
    pub fn is_loaded(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn current_pem(&self) -> Option<ServingCert> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(pem, _)| pem.clone())
    }

    /// A rustls server config (HTTP/1.1) presenting this resolver's certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, key)| key.clone())
    }
}

fn certified_key(cert: &ServingCert) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::Invalid(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Invalid("no certificate in the PEM data".into()));
    }
    // Only the parse error's kind is reported: it never includes key bytes.
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| CertError::Invalid(format!("private key PEM: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Invalid(format!("private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    // A pair caught mid-renewal (one file new, the other old) would fail every handshake.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(CertError::Invalid(format!(
            "the private key does not belong to the certificate: {e}"
        ))),
    }
}

/// Where the self-managed certificate lives and what it is for.
#[derive(Debug, Clone)]
pub struct SelfManaged {
    /// Namespace of the Secret (the operator's).
    pub namespace: String,
    /// Name of the Secret.
    pub secret_name: String,
    /// MutatingWebhookConfiguration whose webhooks get `caBundle`.
    pub webhook_config_name: String,
    /// DNS names (`<service>.<namespace>.svc`, ...) and IP addresses of the certificate.
    pub names: Vec<String>,
    /// Lifetime of a certificate.
    pub validity: Duration,
    /// Rotate when less than this is left.
    pub renew_before: Duration,
    /// Owner of the Secret (the operator's Deployment, [`crate::owner`]), set when it is
    /// created or found without it, so that deleting the owner deletes the Secret too.
    pub owner: Option<OwnerReference>,
}

impl SelfManaged {
    /// The usual names of Service `service` in `namespace`, plus `extra`.
    pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
        let mut names = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.to_owned(),
        ];
        names.extend(extra.iter().cloned());
        names
    }
}

/// What [`ensure_self_managed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAction {
    /// The stored certificate was valid and is served.
    Reused,
    /// A new CA and certificate were made, `caBundle` patched, and the Secret written.
    Rotated,
}

/// Makes sure a valid certificate is stored, trusted through `caBundle`, and served by
/// `resolver`, once ([`SelfManagedCert::ensure`]).
pub async fn ensure_self_managed(
    client: &Client,
    settings: &SelfManaged,
    resolver: &CertResolver,
) -> Result<CertAction, CertError> {
    SelfManagedCert::new(client.clone(), settings.clone())
        .ensure(resolver)
        .await
}

/// The self-managed certificate as one operator process keeps it: where it lives, and the
/// owner of its Secret (what the process learnt of it, such as a refused adoption, lasts from
/// one check to the next).
pub struct SelfManagedCert {
    client: Client,
    settings: SelfManaged,
    owner: Option<Adopter>,
}

impl SelfManagedCert {
    /// The certificate of `settings`.
    pub fn new(client: Client, settings: SelfManaged) -> Self {
        let owner = settings.owner.clone().map(|owner| {
            Adopter::new(
                client.clone(),
                &settings.namespace,
                owner,
                format!("Secret {}", settings.secret_name),
            )
        });
        Self {
            client,
            settings,
            owner,
        }
    }

    /// Makes sure a valid certificate is stored, trusted through `caBundle`, and served by
    /// `resolver`. Safe to run on every replica at once: Secret writes are conditional on its
    /// resourceVersion, and a replica that loses the race adopts the winner's certificate.
    pub async fn ensure(&self, resolver: &CertResolver) -> Result<CertAction, CertError> {
        let (client, settings) = (&self.client, &self.settings);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
        for _attempt in 0..3 {
            let existing = secrets
                .get_opt(&settings.secret_name)
                .await
                .map_err(kube_err("reading the webhook certificate Secret"))?;
            if let Some((secret, stored)) = existing
                .as_ref()
                .and_then(|s| usable(s, settings, unix_now()).map(|stored| (s, stored)))
            {
                patch_ca_bundle(
                    client,
                    &settings.webhook_config_name,
                    &stored.ca_pem,
                    &stored.bundle,
                )
                .await?;
                resolver.set_expiring(&stored.serving, stored.not_after)?;
                self.adopt(&secrets, secret).await;
                return Ok(CertAction::Reused);
            }

            let fresh = generate(&settings.names, settings.validity)?;
            let previous_ca = existing
                .as_ref()
                .and_then(|s| data_str(s, CA_CERT_KEY))
                .filter(|ca| !ca.trim().is_empty());
            let bundle = match previous_ca {
                Some(old) => format!("{}{}", fresh.ca_pem, old),
                None => fresh.ca_pem.clone(),
            };
            // Trust first, serve second: the apiserver must accept the new certificate as soon
            // as any replica presents it.
            patch_ca_bundle(
                client,
                &settings.webhook_config_name,
                &fresh.ca_pem,
                &bundle,
            )
            .await?;
            let written = match existing {
                None => self.create(&secrets, &fresh, &bundle).await,
                Some(old) => self.rewrite(&secrets, &old, &fresh, &bundle).await,
            };
            match written {
                Ok(()) => {
                    resolver.set_expiring(&fresh.serving, fresh.not_after)?;
                    tracing::info!(
                        secret = %settings.secret_name,
                        not_after = fresh.not_after,
                        "webhook certificate rotated"
                    );
                    return Ok(CertAction::Rotated);
                }
                // Another replica stored one first: adopt it on the next pass.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(kube_err("writing the webhook certificate Secret")(e)),
            }
        }
        Err(CertError::Invalid(
            "the webhook certificate Secret kept changing under concurrent writers".into(),
        ))
    }

    /// Re-checks the certificate every `every` until the task is dropped: rotates it before
    /// expiry, adopts rotations by other replicas, and restores a `caBundle` someone reset.
    pub async fn keep(self, resolver: Arc<CertResolver>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.ensure(&resolver).await {
                tracing::warn!(error = %e, "webhook certificate check failed; retrying");
            }
        }
    }

    /// Stores `fresh` (with CA bundle `bundle`) in a new Secret.
    async fn create(
        &self,
        secrets: &Api<Secret>,
        fresh: &GeneratedCert,
        bundle: &str,
    ) -> Result<(), kube::Error> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.settings.secret_name.clone()),
                annotations: Some(
                    annotations(fresh, &self.settings.names)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                ),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "sidegate-operator".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                secret_data(fresh, bundle)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        write_adopting(self.owner.as_ref(), &secret.metadata, |owners| {
            let mut secret = secret.clone();
            secret.metadata.owner_references = owners;
            async move { secrets.create(&PostParams::default(), &secret).await }
        })
        .await
        .map(|_| ())
    }

    /// Replaces the certificate in Secret `old` with `fresh` (with CA bundle `bundle`).
    async fn rewrite(
        &self,
        secrets: &Api<Secret>,
        old: &Secret,
        fresh: &GeneratedCert,
        bundle: &str,
    ) -> Result<(), kube::Error> {
        // resourceVersion in a merge patch makes it conditional: 409 if another replica wrote
        // in between.
        let string_data: serde_json::Map<String, serde_json::Value> = secret_data(fresh, bundle)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect();
        let annotations: serde_json::Map<String, serde_json::Value> =
            annotations(fresh, &self.settings.names)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect();
        let patch = json!({
            "metadata": {
                "resourceVersion": old.resource_version(),
                "annotations": annotations,
            },
            "stringData": string_data,
        });
        // An unowned Secret (an older operator's) is adopted with its rotation; refused, the
        // rotation goes through without it.
        write_adopting(self.owner.as_ref(), &old.metadata, |owners| {
            let mut patch = patch.clone();
            if let Some(owners) = owners {
                patch["metadata"]["ownerReferences"] = json!(owners);
            }
            async move { self.merge_patch(secrets, &patch).await }
        })
        .await
        .map(|_| ())
    }

    /// Merges `patch` into the certificate Secret.
    async fn merge_patch(
        &self,
        secrets: &Api<Secret>,
        patch: &serde_json::Value,
    ) -> kube::Result<Secret> {
        secrets
            .patch(
                &self.settings.secret_name,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
    }

    /// Gives the stored certificate's `secret` its owner if it lacks it (a Secret of an older
    /// operator). A failure is only logged: the certificate serves either way.
    async fn adopt(&self, secrets: &Api<Secret>, secret: &Secret) {
        let Some(owner) = &self.owner else {
            return;
        };
        // resourceVersion makes it conditional: a rotation by another replica in between wins.
        let adopted = write_adopting(Some(owner), &secret.metadata, |owners| async move {
            let Some(owners) = owners else {
                return Ok(());
            };
            let patch = json!({
                "metadata": {
                    "resourceVersion": secret.resource_version(),
                    "ownerReferences": owners,
                },
            });
            self.merge_patch(secrets, &patch).await.map(|_| ())
        })
        .await;
        if let Err(e) = adopted {
            tracing::debug!(secret = %self.settings.secret_name, error = %e, "webhook certificate Secret not adopted this time");
        }
    }
}

/// The Secret's data for certificate `fresh` and CA bundle `bundle`.
fn secret_data<'a>(fresh: &'a GeneratedCert, bundle: &'a str) -> [(&'static str, &'a str); 4] {
    [
        (TLS_CERT_KEY, fresh.serving.cert_pem.as_str()),
        (TLS_KEY_KEY, fresh.serving.key_pem.as_str()),
        (CA_CERT_KEY, fresh.ca_pem.as_str()),
        (CA_BUNDLE_KEY, bundle),
    ]
}

/// The Secret's annotations for certificate `fresh`, made for `names`.
fn annotations(fresh: &GeneratedCert, names: &[String]) -> [(&'static str, String); 3] {
    [
        (NOT_BEFORE_ANNOTATION, fresh.not_before.to_string()),
        (NOT_AFTER_ANNOTATION, fresh.not_after.to_string()),
        (NAMES_ANNOTATION, names.join(",")),
    ]
}

struct Stored {
    serving: ServingCert,
    not_after: u64,
    ca_pem: String,
    bundle: String,
}

/// The stored certificate, if it is complete, for the right names, not due for renewal at `now`
/// (Unix seconds), and made for no longer than `settings.validity`: after `--cert-validity-days`
/// was lowered, the certificate made for the longer one is replaced, not kept to its end.
fn usable(secret: &Secret, settings: &SelfManaged, now: u64) -> Option<Stored> {
    let annotations = secret.annotations();
    let not_after: u64 = annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?;
    if not_after < now + settings.renew_before.as_secs() {
        return None;
    }
    let validity = settings.validity.as_secs();
    let lifetime = match annotations.get(NOT_BEFORE_ANNOTATION) {
        Some(not_before) => not_after.saturating_sub(not_before.parse().ok()?),
        // Stored by an operator that did not record it: too long if more is left of it than of
        // one made now (give or take the backdating, for clocks that disagree).
        None => not_after.saturating_sub(now),
    };
    if lifetime > validity + BACKDATED.as_secs() {
        return None;
    }
    if annotations.get(NAMES_ANNOTATION)? != &settings.names.join(",") {
        return None;
    }
    let serving = ServingCert {
        cert_pem: data_str(secret, TLS_CERT_KEY)?,
        key_pem: data_str(secret, TLS_KEY_KEY)?,
    };
    certified_key(&serving).ok()?;
    let ca_pem = data_str(secret, CA_CERT_KEY)?;
    let bundle = data_str(secret, CA_BUNDLE_KEY).unwrap_or_else(|| ca_pem.clone());
    Some(Stored {
        serving,
        not_after,
        ca_pem,
        bundle,
    })
}

fn data_str(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Sets `caBundle` of every webhook in configuration `name` to `bundle`, unless each already
/// trusts `ca_pem`. A missing configuration is not an error (the chart may not have created it
/// yet; the next pass patches it).
pub async fn patch_ca_bundle(
    client: &Client,
    name: &str,
    ca_pem: &str,
    bundle: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = api
        .get_opt(name)
        .await
        .map_err(kube_err("reading the MutatingWebhookConfiguration"))?
    else {
        tracing::warn!(
            config = name,
            "MutatingWebhookConfiguration not found; caBundle not set yet"
        );
        return Ok(());
    };
    let webhooks = config.webhooks.unwrap_or_default();
    let stale: Vec<&str> = webhooks
        .iter()
        .filter(|w| {
            let trusted = w
                .client_config
                .ca_bundle
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.0).contains(ca_pem.trim()))
                .unwrap_or(false);
            !trusted
        })
        .map(|w| w.name.as_str())
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    // `webhooks` merges by name in a strategic merge patch: only caBundle changes.
    let encoded = ByteString(bundle.as_bytes().to_vec());
    let patch = json!({
        "webhooks": stale
            .iter()
            .map(|n| json!({"name": n, "clientConfig": {"caBundle": encoded}}))
            .collect::<Vec<_>>(),
    });
    api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map_err(kube_err(
            "patching caBundle into the MutatingWebhookConfiguration",
        ))?;
    tracing::info!(config = name, webhooks = stale.len(), "caBundle updated");
    Ok(())
}

/// A certificate and key read from files (a mounted `kubernetes.io/tls` Secret).
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

impl CertFiles {
    /// How often the files are re-read: a renewed certificate is served within this time after
    /// kubelet updates the mounted Secret.
    pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

    /// Reads both files.
    pub fn read(&self) -> Result<ServingCert, CertError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| CertError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok(ServingCert {
            cert_pem: read(&self.cert)?,
            key_pem: read(&self.key)?,
        })
    }

    /// Loads the files into `resolver`; returns whether the certificate changed.
    pub fn load(&self, resolver: &CertResolver) -> Result<bool, CertError> {
        resolver.set(&self.read()?)
    }

    /// Re-reads the files every `every` (kubelet updates a mounted Secret in place), keeping
    /// the last good certificate when a read fails or the pair is invalid or mismatched.
    pub async fn keep_loaded(self, resolver: Arc<CertResolver>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.load(&resolver) {
                Ok(true) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate reload failed; keeping the current one")
                }
            }
        }
    }
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> CertError {
    move |source| CertError::Kube {
        action: action.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_loads_into_the_resolver_and_the_key_never_prints() {
        let cert = generate(
            &["127.0.0.1".into(), "svc.ns.svc".into()],
            Duration::from_secs(86400),
        )
        .expect("generate");
        let resolver = CertResolver::new();
        assert!(!resolver.is_loaded());
        assert!(resolver.set(&cert.serving).expect("loads"));
        assert!(
            !resolver.set(&cert.serving).expect("same again"),
            "unchanged cert is not a change"
        );
        assert!(resolver.is_loaded());
        assert!(!format!("{:?}", cert).contains("PRIVATE KEY"));
        assert!(cert.not_after > unix_now() + 86000);
    }

    /// A mounted Secret's directory as kubelet's atomic writer keeps it: the files in a
    /// timestamped directory, `..data` pointing at it, and `tls.crt` -> `..data/tls.crt`.
    struct MountedSecret {
        dir: tempfile::TempDir,
        version: u32,
    }

    impl MountedSecret {
        fn new(cert: &ServingCert) -> Self {
            let mut mount = Self {
                dir: tempfile::tempdir().expect("temp dir"),
                version: 0,
            };
            mount.update(cert);
            for name in [TLS_CERT_KEY, TLS_KEY_KEY] {
                std::os::unix::fs::symlink(format!("..data/{name}"), mount.dir.path().join(name))
                    .expect("symlink");
            }
            mount
        }

        fn files(&self) -> CertFiles {
            CertFiles {
                cert: self.dir.path().join(TLS_CERT_KEY),
                key: self.dir.path().join(TLS_KEY_KEY),
            }
        }

        /// Writes a new version and swaps `..data` to it with one rename, as kubelet does.
        fn update(&mut self, cert: &ServingCert) {
            let root = self.dir.path();
            let old = root.join(format!("..v{}", self.version));
            self.version += 1;
            let new = format!("..v{}", self.version);
            std::fs::create_dir(root.join(&new)).expect("version dir");
            std::fs::write(root.join(&new).join(TLS_CERT_KEY), &cert.cert_pem).expect("write");
            std::fs::write(root.join(&new).join(TLS_KEY_KEY), &cert.key_pem).expect("write");
            std::os::unix::fs::symlink(&new, root.join("..data_tmp")).expect("symlink");
            std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
            let _ = std::fs::remove_dir_all(old);
        }
    }

    /// Serves TLS from `resolver` on a loopback port, as the webhook's listener does.
    async fn serve_tls(resolver: &Arc<CertResolver>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(resolver.server_config().expect("server config"));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                    }
                });
            }
        });
        addr
    }

    /// The leaf certificate a new handshake with `addr` sees, trusting `cas`; None if it fails.
    async fn served_leaf(addr: std::net::SocketAddr, cas: &[&str]) -> Option<Vec<u8>> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots
                .add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("CA PEM"))
                .expect("CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
    }

    fn leaf(cert: &GeneratedCert) -> Vec<u8> {
        CertificateDer::from_pem_slice(cert.serving.cert_pem.as_bytes())
            .expect("leaf PEM")
            .to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_certificate_file_is_served_within_the_reload_interval_and_a_bad_pair_never_is()
     {
        let names = ["127.0.0.1".to_owned()];
        let day = Duration::from_secs(86400);
        let first = generate(&names, day).expect("first");
        let renewed = generate(&names, day).expect("renewed");
        let mut mount = MountedSecret::new(&first.serving);
        let resolver = Arc::new(CertResolver::new());
        mount.files().load(&resolver).expect("first pair loads");
        tokio::spawn(
            mount
                .files()
                .keep_loaded(resolver.clone(), CertFiles::RELOAD_EVERY),
        );
        let addr = serve_tls(&resolver).await;
        let cas = [first.ca_pem.as_str(), renewed.ca_pem.as_str()];
        assert_eq!(served_leaf(addr, &cas).await, Some(leaf(&first)));

        // Kubelet swaps in the renewed Secret.
        mount.update(&renewed.serving);
        tokio::time::sleep(CertFiles::RELOAD_EVERY + Duration::from_millis(1)).await;
        assert_eq!(
            served_leaf(addr, &cas).await,
            Some(leaf(&renewed)),
            "the renewed certificate is served within {:?}",
            CertFiles::RELOAD_EVERY
        );

        // Files written one after the other, caught in between: the certificate is new, the key
        // still the previous one. Then a truncated certificate. Neither replaces the good pair.
        let next = generate(&names, day).expect("next");
        let half_written = ServingCert {
            cert_pem: next.serving.cert_pem.clone(),
            key_pem: renewed.serving.key_pem.clone(),
        };
        let truncated = ServingCert {
            cert_pem: next.serving.cert_pem[..next.serving.cert_pem.len() / 2].to_owned(),
            key_pem: next.serving.key_pem.clone(),
        };
        for bad in [&half_written, &truncated] {
            std::fs::write(mount.files().cert, &bad.cert_pem).expect("write cert");
            std::fs::write(mount.files().key, &bad.key_pem).expect("write key");
            tokio::time::sleep(CertFiles::RELOAD_EVERY * 2).await;
            assert_eq!(
                served_leaf(addr, &[cas[0], cas[1], next.ca_pem.as_str()]).await,
                Some(leaf(&renewed)),
                "the last good certificate is still served"
            );
        }
        // The second file lands: the complete pair is served.
        mount.update(&next.serving);
        tokio::time::sleep(CertFiles::RELOAD_EVERY + Duration::from_millis(1)).await;
        assert_eq!(
            served_leaf(addr, &[cas[0], cas[1], next.ca_pem.as_str()]).await,
            Some(leaf(&next))
        );
    }

    /// The Secret [`SelfManagedCert::ensure`] stores for `cert`; without the not-before
    /// annotation as an older operator stored it.
    fn stored(cert: &GeneratedCert, names: &[String], with_not_before: bool) -> Secret {
        let mut annotations: std::collections::BTreeMap<String, String> = annotations(cert, names)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        if !with_not_before {
            annotations.remove(NOT_BEFORE_ANNOTATION);
        }
        Secret {
            metadata: ObjectMeta {
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            data: Some(
                secret_data(cert, &cert.ca_pem)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    /// Settings of `--cert-validity-days` `days` (renewed when a sixth is left).
    fn valid_for(days: u64, names: &[String]) -> SelfManaged {
        let validity = Duration::from_secs(days * 86400);
        SelfManaged {
            namespace: "sidegate-system".into(),
            secret_name: "sidegate-webhook-tls".into(),
            webhook_config_name: "sidegate-operator".into(),
            names: names.to_vec(),
            validity,
            renew_before: validity / 6,
            owner: None,
        }
    }

    #[test]
    fn a_certificate_made_for_longer_than_the_validity_now_configured_is_made_again() {
        let names = vec!["sidegate-webhook.sidegate-system.svc".to_owned()];
        let day = 86400;
        let year = generate(&names, Duration::from_secs(365 * day)).expect("a year");
        let now = unix_now();
        for recorded in [true, false] {
            let secret = stored(&year, &names, recorded);
            assert!(usable(&secret, &valid_for(365, &names), now).is_some());
            // --cert-validity-days 365 -> 1: replaced at the next check, not 4 h before the
            // end of the year.
            assert!(
                usable(&secret, &valid_for(1, &names), now).is_none(),
                "not-before recorded: {recorded}"
            );
            // 365 -> 300, 100 days in: 265 days left, but a certificate of 365 days.
            if recorded {
                assert!(usable(&secret, &valid_for(300, &names), now + 100 * day).is_none());
            }
        }
        // A certificate of the configured validity is kept to its renewal, all through.
        let one_day = generate(&names, Duration::from_secs(day)).expect("a day");
        let secret = stored(&one_day, &names, true);
        for hours_in in [0, 10, 19] {
            assert!(
                usable(&secret, &valid_for(1, &names), now + hours_in * 3600).is_some(),
                "{hours_in} h in"
            );
        }
        assert!(usable(&secret, &valid_for(1, &names), now + 21 * 3600).is_none());
    }

    #[test]
    fn garbage_pem_is_rejected_without_echoing_it() {
        let bad = ServingCert {
            cert_pem: "not a cert".into(),
            key_pem: "secret-material".into(),
        };
        let err = CertResolver::new().set(&bad).expect_err("rejected");
        assert!(!err.to_string().contains("secret-material"));
    }
}
