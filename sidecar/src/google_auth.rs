//! Google service accounts for `google-vertex-ai`: a key file holding the service-account JSON
//! (as downloaded from Google Cloud) is exchanged for an OAuth access token — a JWT signed with
//! the account's RSA key (RS256), posted to its `token_uri` (grant type `jwt-bearer`, scope
//! `cloud-platform`) — which is cached and renewed five minutes before it expires. One exchange
//! at a time per account; concurrent requests wait for it and get its outcome, a failure too
//! (as google-auth-library shares one refresh between its callers). A key file that is not
//! JSON is used as a ready access token, as before.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::error::GatewayError;
use crate::keys::AuthValue;
use crate::proxy::Gateway;

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const LIFETIME: Duration = Duration::from_secs(3600);
/// Renew this long before the token expires.
const MARGIN: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a token is kept, whatever `expires_in` says.
const MAX_LIFETIME_SECS: u64 = 24 * 3600;

/// A service account able to mint access tokens; the key never leaves this struct.
pub struct ServiceAccount {
    email: String,
    /// The key's `project_id`: the project of `/compat` models named without one.
    project_id: Option<String>,
    /// The key's `region` (Cloudflare stores the region chosen with the key, or reads a `region`
    /// field of the JSON): the region of `/compat` models named without one.
    region: Option<String>,
    token_uri: http::Uri,
    key: RsaKeyPair,
    tokens: Arc<Tokens>,
}

/// An account's access token and the exchanges minting it; kept across a reload that leaves
/// the account's key as it was (see [`ServiceAccount::keep_tokens_of`]).
#[derive(Default)]
struct Tokens {
    /// Held through an exchange: the requests that need a token meanwhile wait for it.
    state: tokio::sync::Mutex<TokenState>,
    /// Exchanges finished (counted under `state`'s lock), read by a request before it waits:
    /// a count that moved meanwhile tells it an exchange ended while it waited.
    finished: AtomicU64,
}

#[derive(Default)]
struct TokenState {
    /// The token and when to renew it.
    token: Option<(AuthValue, Instant)>,
    /// Why the last exchange failed, for the requests that waited for it.
    failure: Option<String>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Whether `other` is the same account with the same private key (a key file rewritten with
    /// the same key is; a new key of the account is not).
    pub fn same_key(&self, other: &Self) -> bool {
        self.email == other.email && self.key.public().as_ref() == other.key.public().as_ref()
    }

    /// Takes over the token (and any exchange in flight) of `former`, the account as an earlier
    /// config held it, when it is the same account with the same key and token endpoint: a
    /// reload that leaves the key file as it was does not mint a new token.
    pub fn keep_tokens_of(&mut self, former: &Self) {
        if self.same_key(former) && self.token_uri == former.token_uri {
            self.tokens = former.tokens.clone();
        }
    }

    /// Parses a service-account JSON key file; `None` when the text is not JSON (then it is a
    /// token). The error never quotes the file.
    pub fn parse(text: &str) -> Option<Result<Self, String>> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        #[derive(Deserialize)]
        struct File {
            #[serde(rename = "type")]
            kind: Option<String>,
            client_email: String,
            private_key: String,
            #[serde(default)]
            token_uri: Option<String>,
            #[serde(default)]
            project_id: Option<String>,
            #[serde(default)]
            region: Option<String>,
        }
        let parsed = (|| {
            let f: File = serde_json::from_str(text).map_err(|_| {
                "not a service-account key (JSON with client_email and private_key)".to_owned()
            })?;
            if f.kind.as_deref().is_some_and(|k| k != "service_account") {
                return Err("the JSON key file is not of type service_account".to_owned());
            }
            let der = PrivatePkcs8KeyDer::from_pem_slice(f.private_key.as_bytes())
                .map_err(|_| "private_key is not a PKCS#8 PEM key".to_owned())?;
            let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                .map_err(|_| "private_key is not a usable RSA key".to_owned())?;
            let token_uri = f
                .token_uri
                .as_deref()
                .unwrap_or("https://oauth2.googleapis.com/token")
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
                .ok_or("token_uri is not an http(s) URL")?;
            let named = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
            Ok(Self {
                email: f.client_email,
                project_id: named(f.project_id),
                region: named(f.region),
                token_uri,
                key,
                tokens: Arc::default(),
            })
        })();
        Some(parsed)
    }

    /// The project the key belongs to (`project_id`), if the key names it.
    pub fn project_id(&self) -> Option<&str> {
        self.project_id.as_deref()
    }

    /// The region stored with the key (`region`), if any.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// A signed JWT asserting this account, valid from `now` for an hour.
    fn assertion(&self, now: SystemTime) -> Result<String, String> {
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri.to_string(),
            "iat": iat,
            "exp": iat + LIFETIME.as_secs(),
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the token request failed".to_owned())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    /// The `Authorization: Bearer` value for a fresh access token (cached until 5 minutes
    /// before it expires). A request that waited for another's exchange gets its outcome, a
    /// failure too, rather than trying again in turn; one that comes after a failure tries again.
    pub async fn token(&self, gw: &Gateway) -> Result<AuthValue, GatewayError> {
        let seen = self.tokens.finished.load(Ordering::Acquire);
        let mut state = self.tokens.state.lock().await;
        if let Some((value, renew_at)) = state.token.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(value.clone());
        }
        if self.tokens.finished.load(Ordering::Acquire) != seen
            && let Some(why) = &state.failure
        {
            return Err(GatewayError::UpstreamUnavailable(why.clone()));
        }
        let exchanged = self.exchange(gw).await;
        match &exchanged {
            Ok((value, renew_at)) => {
                state.token = Some((value.clone(), *renew_at));
                state.failure = None;
            }
            Err(why) => state.failure = Some(why.clone()),
        }
        self.tokens.finished.fetch_add(1, Ordering::Release);
        exchanged
            .map(|(value, _)| value)
            .map_err(GatewayError::UpstreamUnavailable)
    }

    /// Exchanges a signed assertion for an access token at the token endpoint: the token and
    /// when to renew it, or why there is none (naming the account, never the key or assertion).
    async fn exchange(&self, gw: &Gateway) -> Result<(AuthValue, Instant), String> {
        let unavailable = |why: String| {
            format!(
                "google-vertex-ai: no access token for {}: {why}",
                self.email
            )
        };
        let assertion = self.assertion(SystemTime::now()).map_err(unavailable)?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let mut req = Request::new(Full::new(Bytes::from(form)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.token_uri.clone();
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        // Bounded as a whole, the body too: every Vertex request of this key waits on it.
        let (status, raw) = gw
            .fetch(req, TIMEOUT, 64 << 10)
            .await
            .map_err(unavailable)?;
        if !status.is_success() {
            // Google's error body names the problem (invalid_grant, ...) without secrets.
            let detail = String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
            return Err(unavailable(format!(
                "token endpoint answered {status}: {detail}"
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let t: Token =
            serde_json::from_slice(&raw).map_err(|e| unavailable(format!("token answer: {e}")))?;
        let value = AuthValue::bearer(&t.access_token)
            .ok_or_else(|| unavailable("the access token cannot be a header value".into()))?;
        // Google's tokens live an hour; a larger claim is held to a day (and cannot overflow).
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3600).min(MAX_LIFETIME_SECS));
        Ok((value, Instant::now() + lifetime.saturating_sub(MARGIN)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    /// A 2048-bit test key (PKCS#8), generated for this test only.
    fn test_key_pem() -> String {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl runs");
        String::from_utf8(out.stdout).expect("pem")
    }

    #[test]
    fn the_project_and_region_stored_with_the_key_are_kept() {
        let pem = test_key_pem();
        let mut file = serde_json::json!({
            "type": "service_account",
            "project_id": "my-proj",
            "client_email": "sidegate@my-proj.iam.gserviceaccount.com",
            "private_key": pem,
            "region": "europe-west4",
        });
        let sa = ServiceAccount::parse(&file.to_string())
            .expect("json")
            .expect("valid");
        assert_eq!(
            (sa.project_id(), sa.region()),
            (Some("my-proj"), Some("europe-west4"))
        );
        file["region"] = serde_json::json!("");
        if let Some(o) = file.as_object_mut() {
            o.remove("project_id");
        }
        let sa = ServiceAccount::parse(&file.to_string())
            .expect("json")
            .expect("valid");
        assert_eq!((sa.project_id(), sa.region()), (None, None));
    }

    #[test]
    fn a_key_file_rewritten_is_the_same_key_a_new_key_is_not() {
        let file = |email: &str, pem: &str| {
            let json = serde_json::json!({"client_email": email, "private_key": pem});
            ServiceAccount::parse(&json.to_string())
                .expect("json")
                .expect("valid")
        };
        let (pem, other_pem) = (test_key_pem(), test_key_pem());
        let sa = file("a@p.iam.gserviceaccount.com", &pem);
        assert!(sa.same_key(&file("a@p.iam.gserviceaccount.com", &pem)));
        assert!(!sa.same_key(&file("a@p.iam.gserviceaccount.com", &other_pem)));
        assert!(!sa.same_key(&file("b@p.iam.gserviceaccount.com", &pem)));
    }

    #[test]
    fn assertions_are_rs256_jwts_google_accepts() {
        let pem = test_key_pem();
        let file = serde_json::json!({
            "type": "service_account",
            "client_email": "sidegate@project.iam.gserviceaccount.com",
            "private_key": pem,
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        let sa = ServiceAccount::parse(&file).expect("json").expect("valid");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let jwt = sa.assertion(now).expect("signed");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["iss"], "sidegate@project.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["exp"].as_u64(), Some(1_800_003_600));
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, sa.key.public().as_ref());
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("the signature verifies with the account's public key");
    }

    #[test]
    fn tokens_and_bad_files_are_told_apart() {
        assert!(ServiceAccount::parse("ya29.a-token").is_none());
        let err = ServiceAccount::parse(r#"{"client_email":"a","private_key":"nope"}"#)
            .expect("json")
            .expect_err("bad key");
        assert!(err.contains("PKCS#8"), "{err}");
        assert!(!err.contains("nope"));
        let err = ServiceAccount::parse(
            r#"{"type":"authorized_user","client_email":"a","private_key":"x"}"#,
        )
        .expect("json")
        .expect_err("type");
        assert!(err.contains("service_account"), "{err}");
    }
}
