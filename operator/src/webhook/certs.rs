//! The webhook's serving certificate, hot-swappable under a running TLS listener.
//!
//! - Self-managed: a CA and a serving certificate generated with rcgen, kept in a Secret that all
//!   replicas share, and the CA patched into the MutatingWebhookConfiguration's `caBundle`.
//!   The CA key is never stored: each rotation makes a new CA, and `caBundle` gets the new one
//!   next to those it held (the previous one always, at most [`TRUSTED_CAS`]), patched *before*
//!   the new certificate is served, so the apiserver trusts every certificate a replica may
//!   present during the switch. Replicas of different settings (old and new ones of a rolling
//!   upgrade) replace a stored certificate only for reasons they all see alike ([`assess`]): the
//!   Secret records when it is renewed and which revision of the operator's Deployment it was
//!   made for ([`ISSUED_ANNOTATION`], [`crate::revision`]).
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
use crate::revision::{OwnRevision, Replica, Revision};

/// Secret key of the serving certificate (PEM).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM).
pub const TLS_KEY_KEY: &str = "tls.key";
/// Secret key of the CA that signed the serving certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the CAs the apiserver must trust (current and previous, PEM).
pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";
/// Annotation on the Secret: expiry of the serving certificate, Unix seconds (the certificate's
/// own expiry stands when it is earlier).
pub const NOT_AFTER_ANNOTATION: &str = "sidegate.dev/not-after";
/// Annotation on the Secret: start of the serving certificate's validity, Unix seconds (so that
/// one made for a longer `--cert-validity-days` than today's is made again).
pub const NOT_BEFORE_ANNOTATION: &str = "sidegate.dev/not-before";
/// Annotation on the Secret: the names the serving certificate is valid for, comma-separated.
pub const NAMES_ANNOTATION: &str = "sidegate.dev/cert-names";
/// Annotation on the Secret: what the serving certificate was made under, as JSON
/// (`{"notAfter":1767225600,"renewAfter":1761955200,"revision":{"created":1735689600,
/// "deployment":"<uid>","number":3}}`): its expiry (the record is the certificate's only while
/// it matches [`NOT_AFTER_ANNOTATION`] and the certificate's own expiry is not earlier), when
/// every replica renews it (at the latest [`RENEW_LEAD`] before the expiry), and the revision
/// of the operator's Deployment whose settings it was made with ([`Revision`]; absent when not
/// known; disregarded when made later than now by more than [`BACKDATED`]).
pub const ISSUED_ANNOTATION: &str = "sidegate.dev/issued";

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

impl GeneratedCert {
    /// When it was made, Unix seconds.
    pub fn made(&self) -> u64 {
        self.not_before + BACKDATED.as_secs()
    }
}

/// How long before it is made a certificate is valid from: clocks of other machines may be
/// behind.
pub const BACKDATED: Duration = Duration::from_secs(3600);

/// How long after a certificate is made (its CA added to `caBundle` just before it is stored) a
/// replica starts serving it: the apiserver — each of them, in a highly available control plane
/// — sees a webhook configuration through a watch, a moment after it is written, and until then
/// would refuse the new certificate.
pub const TRUST_SETTLE: Duration = Duration::from_secs(3);

/// Longest `--cert-check-secs`: a replica may look at the certificate this long after it last
/// did.
pub const MAX_CHECK_SECS: u64 = 3600;

/// Least time a recorded renewal leaves before the certificate expires: one check of the
/// slowest replica ([`MAX_CHECK_SECS`]) and as long again for a check that failed (apiserver
/// briefly unreachable). A record renewing later is renewed this long before the end instead;
/// certificates this operator makes record at least 4 h (a sixth of the shortest validity).
pub const RENEW_LEAD: Duration = Duration::from_secs(2 * MAX_CHECK_SECS);

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

    /// Serves `cert`, valid until `not_after`, made at `made` (Unix seconds; its CA trusted
    /// since), but not before [`TRUST_SETTLE`] after it was made (waiting at most that long,
    /// whatever another node's clock said).
    async fn switch_to(
        &self,
        cert: &ServingCert,
        not_after: u64,
        made: Option<u64>,
    ) -> Result<bool, CertError> {
        let new = self.current_pem().as_ref() != Some(cert);
        if let (true, Some(made)) = (new, made) {
            let settled = Duration::from_secs(made) + TRUST_SETTLE;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            if let Some(left) = settled.checked_sub(now) {
                tokio::time::sleep(left.min(TRUST_SETTLE)).await;
            }
        }
        self.set_expiring(cert, not_after)
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
    /// Rotate when less than this is left (of a certificate made with these settings: one made
    /// with others is renewed when it records).
    pub renew_before: Duration,
    /// Owner of the Secret (the operator's Deployment, [`crate::owner`]), set when it is
    /// created or found without it, so that deleting the owner deletes the Secret too.
    pub owner: Option<OwnerReference>,
    /// This replica (its ReplicaSet, or its pod), in `namespace`: the revision of the
    /// operator's Deployment it runs ([`crate::revision`]) decides whose settings win when the
    /// stored certificate was made with others. Unset: the revision is unknown.
    pub replica: Option<Replica>,
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

/// The self-managed certificate as one operator process keeps it: where it lives, the owner of
/// its Secret and the revision this replica runs (what the process learnt of them, such as a
/// refused adoption, lasts from one check to the next).
pub struct SelfManagedCert {
    client: Client,
    settings: SelfManaged,
    owner: Option<Adopter>,
    revision: Option<OwnRevision>,
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
        let revision = settings
            .replica
            .clone()
            .map(|replica| OwnRevision::new(client.clone(), &settings.namespace, replica));
        Self {
            client,
            settings,
            owner,
            revision,
        }
    }

    /// Makes sure a valid certificate is stored, trusted through `caBundle`, and served by
    /// `resolver`. Safe to run on every replica at once, also on replicas of different settings
    /// (a rolling upgrade): a stored certificate is replaced only for a reason every replica
    /// sees alike ([`assess`]), Secret writes are conditional on its resourceVersion, and a
    /// replica that loses the race serves the winner's certificate.
    pub async fn ensure(&self, resolver: &CertResolver) -> Result<CertAction, CertError> {
        let (client, settings) = (&self.client, &self.settings);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
        let revision = match &self.revision {
            Some(own) => own.current().await,
            None => None,
        };
        let wanted = Wanted { settings, revision };
        for _attempt in 0..3 {
            let existing = secrets
                .get_opt(&settings.secret_name)
                .await
                .map_err(kube_err("reading the webhook certificate Secret"))?;
            let (reason, issue, servable) = match assess(existing.as_ref(), &wanted, unix_now()) {
                Verdict::Keep(stored) => {
                    self.serve(resolver, &stored).await?;
                    if let Some(secret) = &existing {
                        self.adopt(&secrets, secret).await;
                    }
                    return Ok(CertAction::Reused);
                }
                Verdict::Replace {
                    reason,
                    issue,
                    servable,
                } => (reason, issue, servable),
            };

            let fresh = generate(&issue.names, issue.validity)?;
            let previous_ca = existing
                .as_ref()
                .and_then(|s| data_str(s, CA_CERT_KEY))
                .filter(|ca| !ca.trim().is_empty());
            let required: Vec<&str> = [Some(fresh.ca_pem.as_str()), previous_ca.as_deref()]
                .into_iter()
                .flatten()
                .collect();
            let bundle = ca_bundle(&required, &[]);
            // Trust first, serve second: the apiserver must accept the new certificate as soon
            // as any replica presents it, and the previous one while others still do.
            let written = match trust(client, &settings.webhook_config_name, &required).await {
                Err(e) => Err(e),
                Ok(()) => {
                    let write = match &existing {
                        None => self.create(&secrets, &fresh, &issue, &bundle).await,
                        Some(old) => self.rewrite(&secrets, old, &fresh, &issue, &bundle).await,
                    };
                    match write {
                        Ok(()) => Ok(()),
                        // Another replica stored one first: serve it on the next pass.
                        Err(kube::Error::Api(e)) if e.code == 409 => continue,
                        Err(e) => Err(kube_err("writing the webhook certificate Secret")(e)),
                    }
                }
            };
            if let Err(e) = written {
                // A replica that cannot write serves what the others serve.
                if let Some(stored) = servable
                    && let Err(e) = self.serve(resolver, &stored).await
                {
                    tracing::debug!(error = %e, "the stored webhook certificate is not served either");
                }
                return Err(e);
            }
            tracing::info!(
                secret = %settings.secret_name,
                reason = %reason,
                revision = ?issue.revision.as_ref().map(|r| r.number),
                validity_secs = issue.validity.as_secs(),
                not_after = fresh.not_after,
                "webhook certificate rotated"
            );
            resolver
                .switch_to(&fresh.serving, fresh.not_after, Some(fresh.made()))
                .await?;
            return Ok(CertAction::Rotated);
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

    /// Serves the stored certificate, its CA trusted first.
    async fn serve(&self, resolver: &CertResolver, stored: &Stored) -> Result<(), CertError> {
        let mut required = vec![stored.ca_pem.as_str()];
        required.extend(pem_certificates(&stored.bundle));
        trust(&self.client, &self.settings.webhook_config_name, &required).await?;
        let made = stored.not_before + BACKDATED.as_secs();
        resolver
            .switch_to(&stored.serving, stored.not_after, Some(made))
            .await?;
        Ok(())
    }

    /// Stores `fresh` (made as `issue` says, with CA bundle `bundle`) in a new Secret.
    async fn create(
        &self,
        secrets: &Api<Secret>,
        fresh: &GeneratedCert,
        issue: &Issue,
        bundle: &str,
    ) -> Result<(), kube::Error> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.settings.secret_name.clone()),
                annotations: Some(
                    annotations(fresh, issue)
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

    /// Replaces the certificate in Secret `old` with `fresh` (made as `issue` says, with CA
    /// bundle `bundle`).
    async fn rewrite(
        &self,
        secrets: &Api<Secret>,
        old: &Secret,
        fresh: &GeneratedCert,
        issue: &Issue,
        bundle: &str,
    ) -> Result<(), kube::Error> {
        // resourceVersion in a merge patch makes it conditional: 409 if another replica wrote
        // in between.
        let string_data: serde_json::Map<String, serde_json::Value> = secret_data(fresh, bundle)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect();
        let annotations: serde_json::Map<String, serde_json::Value> = annotations(fresh, issue)
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

/// The Secret's annotations for certificate `fresh`, made as `issue` says.
fn annotations(fresh: &GeneratedCert, issue: &Issue) -> [(&'static str, String); 4] {
    let issued = Issued {
        not_after: fresh.not_after,
        renew_after: fresh.not_after.saturating_sub(issue.renew_before.as_secs()),
        revision: issue.revision.clone(),
    };
    [
        (NOT_BEFORE_ANNOTATION, fresh.not_before.to_string()),
        (NOT_AFTER_ANNOTATION, fresh.not_after.to_string()),
        (NAMES_ANNOTATION, issue.names.join(",")),
        (
            ISSUED_ANNOTATION,
            serde_json::to_string(&issued).unwrap_or_default(),
        ),
    ]
}

/// What [`ISSUED_ANNOTATION`] records of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Issued {
    /// The certificate's expiry, Unix seconds: the record is the certificate's only if it
    /// matches [`NOT_AFTER_ANNOTATION`] (an older operator rotating leaves the record as it was).
    not_after: u64,
    /// When every replica renews it, Unix seconds: whatever each one's own `renew_before`.
    renew_after: u64,
    /// The revision of the operator's Deployment whose settings it was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revision: Option<Revision>,
}

/// The stored certificate, complete and loadable.
#[derive(Debug, Clone)]
struct Stored {
    serving: ServingCert,
    /// Start of its validity, Unix seconds: the later of the certificate's own and the one
    /// recorded next to it (older operators recorded none).
    not_before: u64,
    not_after: u64,
    names: Vec<String>,
    /// Its record, if it has one of its own.
    issued: Option<Issued>,
    ca_pem: String,
    bundle: String,
}

impl Stored {
    /// The certificate in `secret`, or why it cannot be served.
    fn read(secret: &Secret) -> Result<Self, &'static str> {
        let annotations = secret.annotations();
        let not_after: u64 = annotations
            .get(NOT_AFTER_ANNOTATION)
            .and_then(|v| v.parse().ok())
            .ok_or("no expiry recorded")?;
        let recorded_start: Option<u64> = match annotations.get(NOT_BEFORE_ANNOTATION) {
            Some(v) => Some(v.parse().map_err(|_| "an unreadable start recorded")?),
            None => None,
        };
        let names = annotations
            .get(NAMES_ANNOTATION)
            .ok_or("no names recorded")?
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let serving = ServingCert {
            cert_pem: data_str(secret, TLS_CERT_KEY).ok_or("no certificate")?,
            key_pem: data_str(secret, TLS_KEY_KEY).ok_or("no key")?,
        };
        certified_key(&serving).map_err(|_| "the certificate and key do not load as a pair")?;
        // The annotations are only what was written next to the certificate: it expires when
        // it says, if that is earlier (the record then is not its own), and starts when it
        // says, if that is later (an annotation claiming an earlier start would make it look
        // older and longer-lived than it is; one without the annotation, an older operator's,
        // has its start all the same).
        let (own_start, own_end) =
            leaf_validity(&serving.cert_pem).ok_or("the certificate has no readable validity")?;
        let not_after = not_after.min(own_end);
        let not_before = recorded_start.map_or(own_start, |start| start.max(own_start));
        // A renewal recorded later than RENEW_LEAD before the end would leave the certificate
        // to expire before a replica renews it.
        let latest_renewal = not_after.saturating_sub(RENEW_LEAD.as_secs());
        let issued = annotations
            .get(ISSUED_ANNOTATION)
            .and_then(|v| serde_json::from_str::<Issued>(v).ok())
            .filter(|i| i.not_after == not_after && i.renew_after <= not_after)
            .map(|i| Issued {
                renew_after: i.renew_after.min(latest_renewal),
                ..i
            });
        let ca_pem = data_str(secret, CA_CERT_KEY)
            .filter(|ca| der(ca).is_some())
            .ok_or("no CA")?;
        let bundle = data_str(secret, CA_BUNDLE_KEY).unwrap_or_else(|| ca_pem.clone());
        Ok(Self {
            serving,
            not_before,
            not_after,
            names,
            issued,
            ca_pem,
            bundle,
        })
    }

    /// How long it was made for (the validity it was made with plus [`BACKDATED`]).
    fn lifetime(&self) -> u64 {
        self.not_after.saturating_sub(self.not_before)
    }

    /// The validity it was made with.
    fn validity(&self) -> Duration {
        Duration::from_secs(self.lifetime().saturating_sub(BACKDATED.as_secs()))
    }

    /// The settings it was made with, to renew it alike: known for a certificate with its
    /// record.
    fn issue(&self) -> Option<Issue> {
        let issued = self.issued.as_ref()?;
        let validity = self.validity();
        let renew_before = Duration::from_secs(self.not_after - issued.renew_after);
        (!renew_before.is_zero() && renew_before < validity).then(|| Issue {
            validity,
            renew_before,
            names: self.names.clone(),
            revision: issued.revision.clone(),
        })
    }
}

/// One replica's wish: its settings, and the revision of the operator's Deployment it runs.
struct Wanted<'a> {
    settings: &'a SelfManaged,
    revision: Option<Revision>,
}

impl Wanted<'_> {
    /// A certificate made with this replica's own settings.
    fn own(&self) -> Issue {
        Issue {
            validity: self.settings.validity,
            renew_before: self.settings.renew_before,
            names: self.settings.names.clone(),
            revision: self.revision.clone(),
        }
    }
}

/// The settings a new certificate is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issue {
    validity: Duration,
    renew_before: Duration,
    names: Vec<String>,
    /// The revision whose settings these are (recorded with it).
    revision: Option<Revision>,
}

/// Whose settings are newer: this replica's, or those a stored certificate was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The certificate's (a later revision, or a replica that knew its revision when this one
    /// does not).
    Older,
    /// Neither: the same revision, or both unknown.
    Same,
    /// This replica's (a later revision, or a certificate made without a known revision, such
    /// as an older operator's).
    Newer,
}

fn order(mine: Option<&Revision>, recorded: Option<&Revision>) -> Order {
    match (mine, recorded) {
        (Some(m), Some(r)) if m > r => Order::Newer,
        (Some(m), Some(r)) if m < r => Order::Older,
        (Some(_), None) => Order::Newer,
        (None, Some(_)) => Order::Older,
        _ => Order::Same,
    }
}

/// Why a stored certificate is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reason {
    Missing,
    Unusable(&'static str),
    Due,
    Longer,
    Names,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("no certificate stored"),
            Self::Unusable(why) => write!(f, "the stored one is unusable: {why}"),
            Self::Due => f.write_str("due for renewal"),
            Self::Longer => f.write_str("made for longer than this replica's validity"),
            Self::Names => f.write_str("not made for this replica's names"),
        }
    }
}

/// What to do with the stored certificate.
#[derive(Debug)]
enum Verdict {
    Keep(Stored),
    Replace {
        reason: Reason,
        issue: Issue,
        /// The stored certificate, if it can still be served (by a replica that cannot write).
        servable: Option<Stored>,
    },
}

/// What replica `wanted` does with certificate Secret `secret` at `now` (Unix seconds). Only
/// for a reason any replica of any settings sees alike, so that no two replicas undo each
/// other's certificate: none stored, or unusable; its recorded renewal time reached
/// ([`Issued::renew_after`], not each replica's own `renew_before`); or settings that are
/// newer than those it was made with (a later revision of the operator's Deployment) and which
/// it does not fit: longer than their validity, or for other names. A replica of an older
/// revision keeps a newer one's certificate whatever its own settings, and renews it with the
/// settings it was made with. Of the same revision (or both unknown: the revision cannot be
/// read), a replica replaces only a certificate longer than its validity or missing one of its
/// names, and makes the new one for the shorter validity and all the names, so that two such
/// replicas with different settings agree after one rotation.
fn assess(secret: Option<&Secret>, wanted: &Wanted<'_>, now: u64) -> Verdict {
    let own = wanted.own();
    let Some(secret) = secret else {
        return Verdict::Replace {
            reason: Reason::Missing,
            issue: own,
            servable: None,
        };
    };
    let stored = match Stored::read(secret) {
        Ok(stored) => stored,
        Err(why) => {
            return Verdict::Replace {
                reason: Reason::Unusable(why),
                issue: own,
                servable: None,
            };
        }
    };
    // A revision made later than now (by more than clocks differ) is no revision that exists:
    // trusted, it would make every replica older than the certificate for ever.
    let latest_created = i64::try_from(now.saturating_add(BACKDATED.as_secs())).unwrap_or(i64::MAX);
    let order = order(
        wanted.revision.as_ref(),
        stored
            .issued
            .as_ref()
            .and_then(|i| i.revision.as_ref())
            .filter(|r| r.created <= latest_created),
    );
    let renew_after = match &stored.issued {
        Some(issued) => issued.renew_after,
        // Made by an older operator: when this replica's settings say.
        None => stored
            .not_after
            .saturating_sub(wanted.settings.renew_before.as_secs()),
    };
    if now >= renew_after {
        let issue = match order {
            Order::Older => stored.issue().unwrap_or(own),
            Order::Same | Order::Newer => own,
        };
        let servable = (now < stored.not_after).then(|| stored.clone());
        return Verdict::Replace {
            reason: Reason::Due,
            issue,
            servable,
        };
    }
    let longer = stored.lifetime() > wanted.settings.validity.as_secs() + BACKDATED.as_secs();
    let reason = match order {
        Order::Older => None,
        Order::Newer if longer => Some((Reason::Longer, own)),
        Order::Newer if stored.names != own.names => Some((Reason::Names, own)),
        Order::Newer => None,
        Order::Same => {
            let missing = own.names.iter().any(|n| !stored.names.contains(n));
            match (longer, missing) {
                (false, false) => None,
                (longer, _) => {
                    let reason = if longer {
                        Reason::Longer
                    } else {
                        Reason::Names
                    };
                    Some((reason, agreed(own, &stored)))
                }
            }
        }
    };
    match reason {
        None => Verdict::Keep(stored),
        Some((reason, issue)) => Verdict::Replace {
            reason,
            issue,
            servable: Some(stored),
        },
    }
}

/// Settings `own` met with certificate `stored` made by a replica of the same revision: the
/// shorter validity (renewed as early in proportion) and the names of both.
fn agreed(own: Issue, stored: &Stored) -> Issue {
    let mut issue = own;
    let theirs = stored.validity();
    if !theirs.is_zero() && theirs < issue.validity {
        let share = theirs.as_secs_f64() / issue.validity.as_secs_f64();
        issue.renew_before = issue.renew_before.mul_f64(share);
        issue.validity = theirs;
    }
    for name in &stored.names {
        if !issue.names.contains(name) {
            issue.names.push(name.clone());
        }
    }
    issue
}

fn data_str(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Most CAs `caBundle` holds: the new one, the previous one, and two before them, for replicas
/// that have not yet loaded a rotation (or two rotations made at once).
pub const TRUSTED_CAS: usize = 4;

/// The DER of PEM certificate `pem`, if it is one.
fn der(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|d| d.to_vec())
}

/// The start and expiry (notBefore, notAfter; Unix seconds) the leaf (first) certificate of PEM
/// chain `pem` bears, if it can be read; a start before 1970 reads as 0.
fn leaf_validity(pem: &str) -> Option<(u64, u64)> {
    let leaf = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let validity = cert.validity();
    let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
    let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
    Some((not_before, not_after))
}

/// The PEM certificates of `bundle`, in order.
fn pem_certificates(bundle: &str) -> Vec<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        certs.push(&rest[start..end]);
        rest = &rest[end..];
    }
    certs
}

/// A CA bundle of `first` followed by `then`, each certificate once, at most [`TRUSTED_CAS`].
fn ca_bundle(first: &[&str], then: &[&str]) -> String {
    let mut seen = Vec::new();
    let mut bundle = String::new();
    for pem in first.iter().chain(then).flat_map(|p| pem_certificates(p)) {
        let Some(der) = der(pem) else {
            continue;
        };
        if seen.len() == TRUSTED_CAS || seen.contains(&der) {
            continue;
        }
        seen.push(der);
        bundle.push_str(pem.trim());
        bundle.push('\n');
    }
    bundle
}

/// Makes every webhook of configuration `name` trust each CA of `required` (PEM): where one is
/// missing, its `caBundle` becomes `required` followed by the CAs it held (newest first, at most
/// [`TRUSTED_CAS`] in all), so that certificates other replicas still serve stay trusted, such
/// as one another replica made in the same moment. Conditional on the configuration's
/// resourceVersion, so that neither of two replicas patching at once drops the other's CA. A
/// missing configuration is not an error (the chart may not have created it yet; the next check
/// patches it).
pub async fn trust(client: &Client, name: &str, required: &[&str]) -> Result<(), CertError> {
    let needed: Vec<Vec<u8>> = required
        .iter()
        .flat_map(|pem| pem_certificates(pem))
        .filter_map(der)
        .collect();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    for _attempt in 0..3 {
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
        // `webhooks` merges by name in a strategic merge patch: only caBundle changes.
        let stale: Vec<serde_json::Value> = config
            .webhooks
            .iter()
            .flatten()
            .filter_map(|w| {
                let held = w
                    .client_config
                    .ca_bundle
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default();
                let trusted: Vec<Vec<u8>> = pem_certificates(&held)
                    .into_iter()
                    .filter_map(der)
                    .collect();
                if needed.iter().all(|n| trusted.contains(n)) {
                    return None;
                }
                let bundle = ByteString(ca_bundle(required, &[&held]).into_bytes());
                Some(json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
            })
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": config.resource_version()},
            "webhooks": stale,
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(config = name, webhooks = stale.len(), "caBundle updated");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                return Err(kube_err(
                    "patching caBundle into the MutatingWebhookConfiguration",
                )(e));
            }
        }
    }
    Err(CertError::Invalid(
        "the MutatingWebhookConfiguration kept changing under concurrent writers".into(),
    ))
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

    const DAY: u64 = 86400;

    /// Settings of `--cert-validity-days` `days` (renewed when a sixth is left) for `names`.
    fn valid_for(days: u64, names: &[&str]) -> SelfManaged {
        let validity = Duration::from_secs(days * DAY);
        SelfManaged {
            namespace: "sidegate-system".into(),
            secret_name: "sidegate-webhook-tls".into(),
            webhook_config_name: "sidegate-operator".into(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            validity,
            renew_before: validity / 6,
            owner: None,
            replica: None,
        }
    }

    /// A replica of `settings` running `revision` of the operator's Deployment.
    fn replica(settings: &SelfManaged, revision: Option<u64>) -> Wanted<'_> {
        Wanted {
            settings,
            revision: revision.map(|number| Revision {
                created: 1_750_000_000,
                deployment: "uid-1".into(),
                number,
            }),
        }
    }

    /// The Secret [`SelfManagedCert::ensure`] stores for a certificate made as `issue` says.
    fn stored_as(issue: &Issue) -> Secret {
        let cert = generate(&issue.names, issue.validity).expect("generate");
        Secret {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations(&cert, issue)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            data: Some(
                secret_data(&cert, &cert.ca_pem)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    /// The Secret replica `wanted` stores when it replaces `secret` at `now`, or None if it keeps
    /// it; panics if its reason is not `reason`.
    fn replaced(
        secret: Option<&Secret>,
        wanted: &Wanted<'_>,
        now: u64,
        reason: Reason,
    ) -> Option<(Issue, Secret)> {
        match assess(secret, wanted, now) {
            Verdict::Keep(_) => None,
            Verdict::Replace {
                reason: why, issue, ..
            } => {
                assert_eq!(why, reason, "why it is replaced");
                let secret = stored_as(&issue);
                Some((issue, secret))
            }
        }
    }

    fn kept(secret: &Secret, wanted: &Wanted<'_>, now: u64) -> bool {
        matches!(assess(Some(secret), wanted, now), Verdict::Keep(_))
    }

    fn without(secret: &Secret, annotation: &str) -> Secret {
        let mut secret = secret.clone();
        if let Some(a) = secret.metadata.annotations.as_mut() {
            a.remove(annotation);
        }
        secret
    }

    const NAMES: [&str; 2] = ["sidegate-webhook.sidegate-system.svc", "127.0.0.1"];

    #[test]
    fn lowered_validity_in_a_new_revision_replaces_the_certificate_once_and_the_old_replicas_keep_it()
     {
        let now = unix_now();
        let (old, new) = (valid_for(365, &NAMES), valid_for(1, &NAMES));
        let (old, new) = (replica(&old, Some(3)), replica(&new, Some(4)));
        let (_, year) = replaced(None, &old, now, Reason::Missing).expect("made");
        // The new revision replaces it at its first check, not 4 h before the end of the year.
        let (issue, day) = replaced(Some(&year), &new, now, Reason::Longer).expect("replaced");
        assert_eq!(
            (issue.validity, issue.revision.map(|r| r.number)),
            (Duration::from_secs(DAY), Some(4))
        );
        // The old revision keeps it all day, though a sixth of its own year (61 days) is more
        // than is left of it, and it is shorter than the old revision's validity.
        for hours_in in [0, 10, 19] {
            assert!(kept(&day, &old, now + hours_in * 3600), "{hours_in} h in");
            assert!(kept(&day, &new, now + hours_in * 3600), "{hours_in} h in");
        }
        // 4 h before its end both renew it, alike: with the new revision's settings.
        let at = now + 21 * 3600;
        let (by_new, _) = replaced(Some(&day), &new, at, Reason::Due).expect("due");
        let (by_old, renewed) = replaced(Some(&day), &old, at, Reason::Due).expect("due");
        assert_eq!(by_old, by_new);
        // (Made now: what follows the renewal, seen at the time it was made.)
        assert!(kept(&renewed, &new, now) && kept(&renewed, &old, now));
    }

    #[test]
    fn raised_validity_in_a_new_revision_waits_for_the_renewal_and_is_kept_by_the_old_replicas() {
        let now = unix_now();
        let (old, new) = (valid_for(1, &NAMES), valid_for(365, &NAMES));
        let (old, new) = (replica(&old, Some(3)), replica(&new, Some(4)));
        let (_, day) = replaced(None, &old, now, Reason::Missing).expect("made");
        // A sixth of a year is more than a day: by its own settings the new revision would
        // renew it at once. It renews when recorded, 4 h before the end.
        assert!(kept(&day, &new, now) && kept(&day, &new, now + 19 * 3600));
        let at = now + 21 * 3600;
        // Whichever renews it first, the other keeps what it made.
        let (issue, year) = replaced(Some(&day), &new, at, Reason::Due).expect("due");
        assert_eq!(issue.validity, Duration::from_secs(365 * DAY));
        // (Made now: what follows the renewal, seen at the time it was made.)
        assert!(kept(&year, &old, now) && kept(&year, &new, now));
        let (issue, renewed) = replaced(Some(&day), &old, at, Reason::Due).expect("due");
        assert_eq!(issue.validity, Duration::from_secs(DAY));
        assert!(kept(&renewed, &old, now) && kept(&renewed, &new, now));
    }

    #[test]
    fn other_names_are_taken_from_a_newer_revision_only() {
        let now = unix_now();
        let renamed = ["sg-sidegate-webhook.sidegate-system.svc", "127.0.0.1"];
        let (old, new) = (valid_for(1, &NAMES), valid_for(1, &renamed));
        let (old, new) = (replica(&old, Some(1)), replica(&new, Some(2)));
        let (_, first) = replaced(None, &old, now, Reason::Missing).expect("made");
        let (issue, second) = replaced(Some(&first), &new, now, Reason::Names).expect("renamed");
        assert_eq!(issue.names, renamed);
        assert!(kept(&second, &old, now) && kept(&second, &new, now));
        // A rollback: the ReplicaSet of the old names gets the highest revision.
        let back = replica(old.settings, Some(3));
        let (issue, _) = replaced(Some(&second), &back, now, Reason::Names).expect("back");
        assert_eq!(issue.names, NAMES);
        // Deleted and installed again (the Secret left behind, unowned): revision 1 of a
        // Deployment made later is newer than revision 2 of the one before.
        let reinstalled = Wanted {
            settings: old.settings,
            revision: Some(Revision {
                created: 1_760_000_000,
                deployment: "uid-2".into(),
                number: 1,
            }),
        };
        let (issue, third) =
            replaced(Some(&second), &reinstalled, now, Reason::Names).expect("reinstalled");
        assert_eq!(issue.names, NAMES);
        assert!(kept(&third, &reinstalled, now) && kept(&third, &new, now));
    }

    #[test]
    fn replicas_that_cannot_tell_their_revision_agree_after_one_rotation() {
        let now = unix_now();
        let a = valid_for(365, &["a.test.svc", "127.0.0.1"]);
        let b = valid_for(1, &["b.test.svc", "127.0.0.1"]);
        let (a, b) = (replica(&a, None), replica(&b, None));
        for (first, second) in [(&a, &b), (&b, &a)] {
            let (_, made) = replaced(None, first, now, Reason::Missing).expect("made");
            let reason = if first.settings.validity > second.settings.validity {
                Reason::Longer
            } else {
                Reason::Names
            };
            let (issue, agreed) = replaced(Some(&made), second, now, reason).expect("replaced");
            // The shorter validity, renewed as early in proportion, and every name.
            assert_eq!(issue.validity, Duration::from_secs(DAY));
            assert_eq!(issue.renew_before, Duration::from_secs(DAY / 6));
            let mut names = issue.names.clone();
            names.sort();
            assert_eq!(names, ["127.0.0.1", "a.test.svc", "b.test.svc"]);
            for hours_in in [0, 19] {
                let at = now + hours_in * 3600;
                assert!(
                    kept(&agreed, &a, at) && kept(&agreed, &b, at),
                    "{hours_in} h in"
                );
            }
        }
        // A replica that cannot tell its revision keeps what a replica that could made.
        let (_, newer) =
            replaced(None, &replica(b.settings, Some(7)), now, Reason::Missing).expect("made");
        assert!(kept(&newer, &a, now));
    }

    #[test]
    fn a_certificate_without_its_own_record_is_judged_by_each_replicas_settings() {
        let now = unix_now();
        let names = [NAMES[0]];
        let (_, year) = replaced(
            None,
            &replica(&valid_for(365, &names), None),
            now,
            Reason::Missing,
        )
        .expect("made");
        // As an older operator stored it: no record, or one an older operator's rotation left
        // (its notAfter another certificate's); without the start too, for the oldest.
        let mut overwritten = year.clone();
        overwritten
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(
                ISSUED_ANNOTATION.into(),
                json!({"notAfter": now + 5 * DAY, "renewAfter": now + 4 * DAY, "revision": 9})
                    .to_string(),
            );
        for secret in [
            without(&year, ISSUED_ANNOTATION),
            overwritten,
            without(&without(&year, ISSUED_ANNOTATION), NOT_BEFORE_ANNOTATION),
        ] {
            for revision in [None, Some(1)] {
                let year_long = valid_for(365, &names);
                assert!(kept(&secret, &replica(&year_long, revision), now));
                // --cert-validity-days 365 -> 1: replaced at the next check.
                let day = valid_for(1, &names);
                assert!(
                    replaced(Some(&secret), &replica(&day, revision), now, Reason::Longer)
                        .is_some()
                );
                // Renewed when a sixth of the replica's own validity is left.
                let at = now + 310 * DAY;
                assert!(
                    replaced(
                        Some(&secret),
                        &replica(&year_long, revision),
                        at,
                        Reason::Due
                    )
                    .is_some()
                );
            }
        }
        // 365 -> 300, 100 days in: 265 days left, but a certificate of 365 days.
        assert!(
            replaced(
                Some(&year),
                &replica(&valid_for(300, &names), None),
                now + 100 * DAY,
                Reason::Longer
            )
            .is_some()
        );
    }

    #[test]
    fn broken_missing_or_expired_certificates_are_replaced_by_every_replica_with_its_own_settings()
    {
        let now = unix_now();
        let (old, new) = (valid_for(365, &NAMES), valid_for(1, &NAMES));
        let (_, made) =
            replaced(None, &replica(&new, Some(5)), now, Reason::Missing).expect("made");
        let other = stored_as(&replica(&new, Some(5)).own());
        let mut mismatched = made.clone();
        mismatched.data.as_mut().expect("data").insert(
            TLS_KEY_KEY.into(),
            other.data.as_ref().expect("data")[TLS_KEY_KEY].clone(),
        );
        let mut garbage = made.clone();
        garbage.data.as_mut().expect("data").insert(
            TLS_CERT_KEY.into(),
            ByteString(b"not a certificate".to_vec()),
        );
        let broken = [
            (mismatched, "the certificate and key do not load as a pair"),
            (garbage, "the certificate and key do not load as a pair"),
            (without(&made, NAMES_ANNOTATION), "no names recorded"),
            (without(&made, NOT_AFTER_ANNOTATION), "no expiry recorded"),
        ];
        let older = replica(&old, Some(1));
        for (secret, why) in &broken {
            let Verdict::Replace {
                reason,
                issue,
                servable,
            } = assess(Some(secret), &older, now)
            else {
                panic!("{why}: kept");
            };
            assert_eq!(reason, Reason::Unusable(why));
            assert_eq!(issue, older.own(), "{why}");
            assert!(servable.is_none(), "{why}");
        }
        // Expired (a replica that could not write for a day): replaced, never served again.
        let Verdict::Replace {
            reason, servable, ..
        } = assess(Some(&made), &older, now + 2 * DAY)
        else {
            panic!("an expired certificate kept");
        };
        assert_eq!(reason, Reason::Due);
        assert!(servable.is_none());
        // Due but not expired: a replica that cannot write it serves it meanwhile.
        let Verdict::Replace { servable, .. } = assess(Some(&made), &older, now + 21 * 3600) else {
            panic!("a due certificate kept");
        };
        assert!(servable.is_some());
    }

    /// `secret` with annotation `key` set to `value`.
    fn annotated(secret: &Secret, key: &str, value: String) -> Secret {
        let mut secret = secret.clone();
        secret
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(key.into(), value);
        secret
    }

    fn recorded(secret: &Secret) -> Issued {
        serde_json::from_str(&secret.annotations()[ISSUED_ANNOTATION]).expect("record")
    }

    #[test]
    fn a_certificate_starts_when_it_says_unless_its_annotation_says_later() {
        let now = unix_now();
        let day = valid_for(1, &NAMES);
        let replica = replica(&day, Some(2));
        let (_, made) = replaced(None, &replica, now, Reason::Missing).expect("made");
        let start: u64 = made.annotations()[NOT_BEFORE_ANNOTATION]
            .parse()
            .expect("start recorded");
        assert_eq!(Stored::read(&made).expect("readable").not_before, start);
        // Annotated as started 300 days earlier: it starts when it says, so it is no
        // certificate of 301 days that a replica of one day must replace.
        let early = annotated(
            &made,
            NOT_BEFORE_ANNOTATION,
            (start - 300 * DAY).to_string(),
        );
        assert_eq!(Stored::read(&early).expect("readable").not_before, start);
        assert!(kept(&early, &replica, now));
        // Annotated as started later than it did: the annotation, later, stands.
        let late = annotated(&made, NOT_BEFORE_ANNOTATION, (start + 3600).to_string());
        assert_eq!(
            Stored::read(&late).expect("readable").not_before,
            start + 3600
        );
        // No start recorded (an older operator's): the certificate's own.
        let unrecorded = without(&made, NOT_BEFORE_ANNOTATION);
        assert_eq!(
            Stored::read(&unrecorded).expect("readable").not_before,
            start
        );
    }

    #[test]
    fn a_recorded_renewal_leaves_time_to_renew_before_the_certificate_expires() {
        let now = unix_now();
        let day = valid_for(1, &NAMES);
        let (_, made) =
            replaced(None, &replica(&day, Some(2)), now, Reason::Missing).expect("made");
        let end = recorded(&made).not_after;
        let at_end = json!({"notAfter": end, "renewAfter": end, "revision": {
            "created": 1_750_000_000, "deployment": "uid-1", "number": 2}});
        let at_end = annotated(&made, ISSUED_ANNOTATION, at_end.to_string());
        for revision in [None, Some(1), Some(2), Some(3)] {
            let replica = replica(&day, revision);
            let lead = end - RENEW_LEAD.as_secs();
            assert!(kept(&at_end, &replica, lead - 60), "{revision:?}");
            let Verdict::Replace { reason, issue, .. } = assess(Some(&at_end), &replica, lead)
            else {
                panic!(
                    "{revision:?}: kept {} s before it expires",
                    RENEW_LEAD.as_secs()
                );
            };
            assert_eq!(reason, Reason::Due);
            // Renewed alike: never again at the end.
            assert!(issue.renew_before >= RENEW_LEAD, "{revision:?}");
        }
    }

    #[test]
    fn a_certificate_expires_when_it_says_whatever_its_annotations_claim() {
        let now = unix_now();
        let day = valid_for(1, &NAMES);
        let (_, made) =
            replaced(None, &replica(&day, Some(2)), now, Reason::Missing).expect("made");
        let mut record = recorded(&made);
        let real = record.not_after;
        // Annotated, record included, as valid 20 h more than it is.
        record.not_after += 20 * 3600;
        record.renew_after += 20 * 3600;
        let lying = annotated(
            &annotated(&made, NOT_AFTER_ANNOTATION, record.not_after.to_string()),
            ISSUED_ANNOTATION,
            serde_json::to_string(&record).expect("json"),
        );
        let stored = Stored::read(&lying).expect("readable");
        assert_eq!(stored.not_after, real, "the expiry served and reported");
        assert!(
            stored.issued.is_none(),
            "the record is not this certificate's"
        );
        let replica = replica(&day, Some(2));
        assert!(kept(&lying, &replica, now + 19 * 3600));
        // Due when a sixth of its real validity is left; never served past its real end.
        let Verdict::Replace {
            reason, servable, ..
        } = assess(Some(&lying), &replica, real - 3 * 3600)
        else {
            panic!("kept 3 h before it expires");
        };
        assert_eq!((reason, servable.is_some()), (Reason::Due, true));
        let Verdict::Replace { servable, .. } = assess(Some(&lying), &replica, real) else {
            panic!("kept once expired");
        };
        assert!(servable.is_none(), "served expired");
        // Annotated as expiring earlier than it does: the annotation, earlier, stands.
        let early = annotated(&made, NOT_AFTER_ANNOTATION, (real - 3600).to_string());
        assert_eq!(
            Stored::read(&early).expect("readable").not_after,
            real - 3600
        );
    }

    #[test]
    fn a_revision_recorded_from_the_future_does_not_outrank_every_replica() {
        let now = unix_now();
        let (old, renamed) = (
            valid_for(1, &NAMES),
            valid_for(1, &["other.sidegate-system.svc", "127.0.0.1"]),
        );
        let future = Wanted {
            settings: &old,
            revision: Some(Revision {
                created: i64::try_from(now + 30 * DAY).expect("time"),
                deployment: "uid-9".into(),
                number: 1,
            }),
        };
        let (_, made) = replaced(None, &future, now, Reason::Missing).expect("made");
        // Trusted, it would be newer than revision 4 for ever; a replica of other names renames.
        let (issue, _) = replaced(Some(&made), &replica(&renamed, Some(4)), now, Reason::Names)
            .expect("renamed");
        assert_eq!(issue.names, renamed.names);
        // Within the clock skew, it is trusted.
        let ahead = Wanted {
            revision: Some(Revision {
                created: i64::try_from(now + 600).expect("time"),
                deployment: "uid-9".into(),
                number: 1,
            }),
            ..future
        };
        let (_, made) = replaced(None, &ahead, now, Reason::Missing).expect("made");
        assert!(kept(&made, &replica(&renamed, Some(4)), now));
    }

    #[test]
    fn a_ca_bundle_holds_each_ca_once_the_newest_first_and_at_most_four() {
        let cas: Vec<String> = (0..6)
            .map(|_| {
                generate(&["127.0.0.1".into()], Duration::from_secs(DAY))
                    .expect("generate")
                    .ca_pem
            })
            .collect();
        let held = format!("{}\n{}{}", cas[1], cas[2].trim(), cas[3]);
        assert_eq!(pem_certificates(&held).len(), 3);
        let bundle = ca_bundle(&[&cas[0], &cas[1]], &[&held, "garbage", &cas[4], &cas[5]]);
        let ders: Vec<Vec<u8>> = pem_certificates(&bundle)
            .into_iter()
            .filter_map(der)
            .collect();
        let want: Vec<Vec<u8>> = cas[..TRUSTED_CAS].iter().filter_map(|c| der(c)).collect();
        assert_eq!(ders, want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_is_served_only_once_its_ca_had_time_to_reach_every_apiserver() {
        let names = ["127.0.0.1".to_owned()];
        let (first, second) = (
            generate(&names, Duration::from_secs(DAY)).expect("first"),
            generate(&names, Duration::from_secs(DAY)).expect("second"),
        );
        let resolver = CertResolver::new();
        let waited = |made: u64, cert: &GeneratedCert| {
            let (resolver, cert) = (&resolver, cert.clone());
            async move {
                let start = tokio::time::Instant::now();
                resolver
                    .switch_to(&cert.serving, cert.not_after, Some(made))
                    .await
                    .expect("served");
                start.elapsed()
            }
        };
        // Made a minute ago (another replica's): at once.
        assert!(waited(first.made() - 60, &first).await.is_zero());
        // Made now: once it is TRUST_SETTLE old (made is in whole seconds).
        let wait = waited(second.made(), &second).await;
        assert!(
            wait > TRUST_SETTLE - Duration::from_secs(1) && wait <= TRUST_SETTLE,
            "{wait:?}"
        );
        // Served already, or made by a clock an hour ahead: no (longer) wait.
        assert!(waited(second.made(), &second).await.is_zero());
        assert!(waited(first.made() + 3600, &first).await <= TRUST_SETTLE);
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
