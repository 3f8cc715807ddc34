//! The providers of SPEC.md and the further ones Cloudflare's gateway documents (`cerebras`,
//! `baseten`, `parallel`): where each one's upstream is, how its URL is shaped, and which
//! header carries its key. OpenAI-compatible providers share one shape (`base + rest`);
//! azure-openai, aws-bedrock, google-vertex-ai and workers-ai take parts of the path into the
//! upstream host or path.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{self, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use sidegate_crds::policy::{ApiFormat, ProviderSettings};
use sidegate_crds::provider::BUILTIN_PROVIDERS;
use sidegate_crds::validation::provider_problem;

use crate::error::{GatewayError, truncate};
use crate::keys::{AuthValue, KeyStore};
use crate::route::ProviderRoute;

/// How the upstream URL is made from the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlShape {
    /// `base + "/" + rest`.
    Plain,
    /// `/{resource}/{deployment}/rest` into `{resource}` and `{deployment}` of the base.
    Azure,
    /// `/bedrock-runtime/{region}/rest` into `{region}` of the base.
    Bedrock,
    /// `{region}` of the base taken from the `locations/{region}` segment; the whole rest kept.
    Vertex,
    /// `{account}` of the base from config or the long-form account id; `run/` added unless the
    /// path is OpenAI-style `v1/...`.
    WorkersAi,
}

/// Where a provider's key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStyle {
    /// `name: [scheme ]key`.
    Header {
        name: HeaderName,
        scheme: Option<String>,
    },
    /// Requests are signed by the client (aws-bedrock until the gateway signs); forwarded as is.
    ClientSigned,
}

/// Static facts about one built-in provider.
struct Builtin {
    id: &'static str,
    base: &'static str,
    shape: UrlShape,
    auth_header: &'static str,
    scheme: Option<&'static str>,
    format: ApiFormat,
}

const BUILTINS: &[Builtin] = &[
    b(
        "openai",
        "https://api.openai.com/v1",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    Builtin {
        id: "anthropic",
        base: "https://api.anthropic.com",
        shape: UrlShape::Plain,
        auth_header: "x-api-key",
        scheme: None,
        format: ApiFormat::Anthropic,
    },
    b(
        "azure-openai",
        "https://{resource}.openai.azure.com/openai/deployments/{deployment}",
        UrlShape::Azure,
        "api-key",
        None,
    ),
    b(
        "aws-bedrock",
        "https://bedrock-runtime.{region}.amazonaws.com",
        UrlShape::Bedrock,
        "",
        None,
    ),
    b(
        "google-ai-studio",
        "https://generativelanguage.googleapis.com",
        UrlShape::Plain,
        "x-goog-api-key",
        None,
    ),
    b(
        "google-vertex-ai",
        "https://{region}-aiplatform.googleapis.com",
        UrlShape::Vertex,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "groq",
        "https://api.groq.com/openai/v1",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "mistral",
        "https://api.mistral.ai",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "cohere",
        "https://api.cohere.ai",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "deepseek",
        "https://api.deepseek.com",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "grok",
        "https://api.x.ai",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "perplexity-ai",
        "https://api.perplexity.ai",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "openrouter",
        "https://openrouter.ai/api",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "huggingface",
        "https://api-inference.huggingface.co",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    b(
        "workers-ai",
        "https://api.cloudflare.com/client/v4/accounts/{account}/ai",
        UrlShape::WorkersAi,
        "authorization",
        Some("Bearer"),
    ),
    // Cloudflare: developers.cloudflare.com/ai-gateway/usage/providers/cerebras/;
    // upstream: inference-docs.cerebras.ai/api-reference.
    b(
        "cerebras",
        "https://api.cerebras.ai/v1",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    // Cloudflare: developers.cloudflare.com/ai-gateway/usage/providers/baseten/ (the Model
    // APIs' OpenAI-compatible chat completions); upstream:
    // docs.baseten.co/reference/inference-api/chat-completions.
    b(
        "baseten",
        "https://inference.baseten.co/v1",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    // Cloudflare: developers.cloudflare.com/ai-gateway/usage/providers/parallel/ (any path
    // after /parallel, key in `x-api-key`); upstream: docs.parallel.ai/api-reference.
    b(
        "parallel",
        "https://api.parallel.ai",
        UrlShape::Plain,
        "x-api-key",
        None,
    ),
    // Cloudflare: developers.cloudflare.com/ai-gateway/usage/providers/replicate/ ("replace
    // https://api.replicate.com/v1"); upstream: replicate.com/docs/reference/http.
    b(
        "replicate",
        "https://api.replicate.com/v1",
        UrlShape::Plain,
        "authorization",
        Some("Bearer"),
    ),
    // Cloudflare: .../providers/elevenlabs/ (`/elevenlabs/v1/text-to-speech/{voice}`);
    // upstream: elevenlabs.io/docs/api-reference (key in `xi-api-key`).
    b(
        "elevenlabs",
        "https://api.elevenlabs.io",
        UrlShape::Plain,
        "xi-api-key",
        None,
    ),
    // Cloudflare: .../providers/cartesia/ (`/cartesia/tts/bytes`, `Cartesia-Version` passed
    // through); upstream: docs.cartesia.ai/api-reference, whose paths have no /v1.
    b(
        "cartesia",
        "https://api.cartesia.ai",
        UrlShape::Plain,
        "x-api-key",
        None,
    ),
    // Cloudflare: .../providers/fal/ (`/fal/fal-ai/fast-sdxl` → the synchronous API at
    // https://fal.run); upstream: docs.fal.ai (`Authorization: Key ...`).
    b(
        "fal",
        "https://fal.run",
        UrlShape::Plain,
        "authorization",
        Some("Key"),
    ),
    // Cloudflare: .../providers/ideogram/ (`/ideogram/v1/ideogram-v3/generate`); upstream:
    // developer.ideogram.ai (key in `Api-Key`).
    b(
        "ideogram",
        "https://api.ideogram.ai",
        UrlShape::Plain,
        "api-key",
        None,
    ),
];

const fn b(
    id: &'static str,
    base: &'static str,
    shape: UrlShape,
    auth_header: &'static str,
    scheme: Option<&'static str>,
) -> Builtin {
    Builtin {
        id,
        base,
        shape,
        auth_header,
        scheme,
        format: ApiFormat::Openai,
    }
}

/// A provider's config that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.providers.{provider}: {message}")]
pub struct ProviderError {
    provider: String,
    message: String,
}

fn perr(provider: &str, message: impl Into<String>) -> ProviderError {
    ProviderError {
        provider: provider.to_owned(),
        message: message.into(),
    }
}

/// What an Azure OpenAI route's path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AzurePath<'r> {
    /// A deployment's API (`.../openai/deployments/{deployment}/{rest}`): the resource, the
    /// deployment and the rest (empty when missing). Cloudflare's `{resource}/{deployment}/...`,
    /// or `{resource}/openai/deployments/{deployment}/...`, the path Azure's own SDK clients
    /// append to an `azure_endpoint` (the gateway's `/azure-openai/{resource}`).
    Deployment(&'r str, &'r str, &'r str),
    /// The v1 API (`.../openai/v1/{rest}`, the model in the body): `{resource}/openai/v1/...`,
    /// what OpenAI's own SDK clients send with the base URL `/azure-openai/{resource}/openai/v1`.
    V1(&'r str, &'r str),
}

impl<'r> AzurePath<'r> {
    fn of(rest: &'r str) -> Self {
        let (resource, after) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(v1) = after.strip_prefix("openai/v1").and_then(|r| {
            if r.is_empty() {
                Some(r)
            } else {
                r.strip_prefix('/')
            }
        }) {
            return Self::V1(resource, v1);
        }
        let after = after.strip_prefix("openai/deployments/").unwrap_or(after);
        let (deployment, rest) = after.split_once('/').unwrap_or((after, ""));
        Self::Deployment(resource, deployment, rest)
    }

    /// The path under the deployment or `v1`: the API's own path (`chat/completions`).
    fn api_path(self) -> &'r str {
        match self {
            Self::Deployment(_, _, rest) | Self::V1(_, rest) => rest,
        }
    }
}

/// Whether `rest`, an `azure-openai` route's path, is one of Azure's v1 API
/// (`{resource}/openai/v1/...`), whose model is the body's, as on OpenAI.
pub fn is_azure_v1(rest: &str) -> bool {
    matches!(AzurePath::of(rest), AzurePath::V1(..))
}

/// The base of Azure's v1 API for an `azure-openai` base URL: the base with its
/// `/deployments/{deployment}` replaced by `/v1` (`https://{resource}.openai.azure.com/openai/v1`).
/// `None` when the base names no such segment, or names the deployment elsewhere too.
fn azure_v1_base(base: &str) -> Option<String> {
    let head = base
        .trim_end_matches('/')
        .strip_suffix("/deployments/{deployment}")?;
    (!head.contains("{deployment}")).then(|| format!("{head}/v1"))
}

/// A base URL: parsed once when it has no placeholders, filled in per request otherwise.
#[derive(Debug, Clone)]
enum Base {
    Fixed {
        scheme: Scheme,
        authority: Authority,
        path: String,
    },
    Template(String),
}

/// One provider, ready to route to.
#[derive(Debug)]
pub struct Provider {
    /// Provider id.
    pub id: Arc<str>,
    /// Wire format (for `/compat`).
    pub format: ApiFormat,
    shape: UrlShape,
    base: Base,
    /// Azure OpenAI's v1 API base (see [`azure_v1_base`]), when the base has one.
    v1_base: Option<Base>,
    auth: AuthStyle,
    /// Headers removed from the client's request when the gateway injects a key.
    auth_headers: Vec<HeaderName>,
    /// Other providers' own key headers (custom providers' `authHeader`s that are not one of
    /// [`CLIENT_KEY_HEADERS`]): never sent here, whoever's key goes.
    foreign_key_headers: Vec<HeaderName>,
    /// [`Self::auth_headers`] and [`Self::foreign_key_headers`]: removed when a key is injected.
    stored_drop: Vec<HeaderName>,
    account_id: Option<String>,
    /// Where its requests go, as the config says it (see [`Self::upstream`]).
    upstream: String,
    /// Precomputed auth header value per key alias.
    keys: HashMap<String, AuthValue>,
    /// Google service accounts per key alias (`google-vertex-ai`), minting tokens on demand.
    service_accounts: HashMap<String, Arc<crate::google_auth::ServiceAccount>>,
}

/// The headers of a request signed by the client with SigV4 that tell who signed it.
static SIGV4_IDENTITY: [HeaderName; 2] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-amz-security-token"),
];

/// Every header a client may carry a provider key in (for requests whose provider is not known
/// yet, such as a `/compat` route's).
pub static CLIENT_KEY_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// A stored credential a request went with: a key, or the service account a token was minted
/// from (see [`Provider::still_holds`]).
#[derive(Debug, Clone)]
pub enum HeldCredential {
    /// A stored key's auth header value.
    Key(AuthValue),
    /// A Google service account.
    ServiceAccount(Arc<crate::google_auth::ServiceAccount>),
}

/// Outcome of choosing the key for a request.
#[derive(Debug)]
pub enum KeyChoice<'a> {
    /// Inject this stored key.
    Stored(&'a AuthValue),
    /// Forward whatever provider auth the client sent.
    ClientOwn,
}

impl Provider {
    fn new(
        id: &str,
        base: &str,
        shape: UrlShape,
        auth: AuthStyle,
        format: ApiFormat,
        settings: Option<&ProviderSettings>,
    ) -> Result<Self, ProviderError> {
        let base_text = settings.and_then(|s| s.base_url.as_deref()).unwrap_or(base);
        let base = parse_base(id, base_text)?;
        let v1_base = match shape {
            UrlShape::Azure => azure_v1_base(base_text)
                .map(|v1| parse_base(id, &v1))
                .transpose()?,
            _ => None,
        };
        let auth_headers = match &auth {
            AuthStyle::Header { name, .. } => {
                let mut v = vec![name.clone()];
                for extra in &CLIENT_KEY_HEADERS {
                    if !v.contains(extra) {
                        v.push(extra.clone());
                    }
                }
                v
            }
            AuthStyle::ClientSigned => Vec::new(),
        };
        let account_id = settings.and_then(|s| s.account_id.clone());
        let upstream = format!(
            "{base_text}\0{}\0{format:?}",
            account_id.as_deref().unwrap_or_default()
        );
        Ok(Self {
            id: Arc::from(id),
            format,
            shape,
            base,
            v1_base,
            auth,
            auth_headers,
            foreign_key_headers: Vec::new(),
            stored_drop: Vec::new(),
            account_id,
            upstream,
            keys: HashMap::new(),
            service_accounts: HashMap::new(),
        })
    }

    /// Chooses the key for a request, by `cf-aig-byok-alias` (`None` = the default alias).
    pub fn choose_key(&self, alias: Option<&str>) -> Result<KeyChoice<'_>, GatewayError> {
        match alias {
            None => Ok(self
                .keys
                .get("default")
                .map_or(KeyChoice::ClientOwn, KeyChoice::Stored)),
            Some(a) => {
                self.keys
                    .get(a)
                    .map(KeyChoice::Stored)
                    .ok_or_else(|| GatewayError::AliasNotFound {
                        provider: self.id.to_string(),
                        alias: a.chars().take(64).collect(),
                    })
            }
        }
    }

    /// Whether `held`, a credential given to a request earlier, is still the one stored under
    /// `alias` (a key removed or rotated since is not).
    pub fn still_holds(&self, alias: &str, held: &HeldCredential) -> bool {
        match held {
            HeldCredential::Key(v) => self
                .keys
                .get(alias)
                .is_some_and(|k| k.header() == v.header()),
            HeldCredential::ServiceAccount(sa) => self
                .service_accounts
                .get(alias)
                .is_some_and(|now| now.same_key(sa)),
        }
    }

    /// The service account of `alias` (default `default`), when its key file is one.
    pub fn service_account(
        &self,
        alias: Option<&str>,
    ) -> Option<&Arc<crate::google_auth::ServiceAccount>> {
        self.service_accounts.get(alias.unwrap_or("default"))
    }

    /// The header the key goes into, if the gateway injects keys for this provider.
    pub fn auth_header(&self) -> Option<&HeaderName> {
        match &self.auth {
            AuthStyle::Header { name, .. } => Some(name),
            AuthStyle::ClientSigned => None,
        }
    }

    /// Whether its WebSocket sessions speak OpenAI's Realtime events (a `response.done` with
    /// `usage` per response), whose usage the gateway reads: OpenAI, Azure OpenAI, and custom
    /// providers of the OpenAI format.
    pub fn sessions_report_openai_usage(&self) -> bool {
        match &*self.id {
            "openai" | "azure-openai" => true,
            id => !BUILTIN_PROVIDERS.contains(&id) && self.format == ApiFormat::Openai,
        }
    }

    /// The deployment an Azure OpenAI route names (`{resource}/{deployment}/...`), which decides
    /// the model whatever the body names. A route of Azure's v1 API (`{resource}/openai/v1/...`)
    /// names none: its model is the body's, as on OpenAI.
    pub fn deployment<'r>(&self, rest: &'r str) -> Option<&'r str> {
        if self.shape != UrlShape::Azure {
            return None;
        }
        match AzurePath::of(rest) {
            AzurePath::Deployment(_, deployment, _) => Some(deployment).filter(|d| !d.is_empty()),
            AzurePath::V1(..) => None,
        }
    }

    /// The API's own path of a route (`chat/completions`, `v1beta/models/...`), where a model
    /// named in the path is looked for: an Azure OpenAI route's path after its resource and
    /// deployment (or `openai/v1`), so that a resource named `models` is no model; others' whole.
    pub fn api_path<'r>(&self, rest: &'r str) -> &'r str {
        match self.shape {
            UrlShape::Azure => AzurePath::of(rest).api_path(),
            _ => rest,
        }
    }

    /// Whether its OpenAI-format streams end with `data: [DONE]`, as OpenAI's do: all but
    /// Perplexity's, which end without it.
    pub fn ends_streams_with_done(&self) -> bool {
        self.format == ApiFormat::Openai && &*self.id != "perplexity-ai"
    }

    /// Whether requests are signed (AWS SigV4) rather than carrying a key in a header.
    pub fn signs_requests(&self) -> bool {
        matches!(self.auth, AuthStyle::ClientSigned)
    }

    /// Client headers replaced by an injected key.
    pub fn auth_headers(&self) -> &[HeaderName] {
        &self.auth_headers
    }

    /// The client headers not sent to this provider: with a stored key (`stored`) its own key
    /// headers and other providers', else other providers' own key headers (a key meant for a
    /// self-hosted service must not reach another provider, on a fallback say).
    pub fn dropped_headers(&self, stored: bool) -> &[HeaderName] {
        if stored {
            &self.stored_drop
        } else {
            &self.foreign_key_headers
        }
    }

    /// The client headers that say whose credentials a request carries, for the cache key when
    /// the client's own credentials go upstream: its key headers, or for a request the client
    /// signed itself (SigV4) the signature and session token. An access key id is no secret
    /// and a signature is dated, so such entries serve only a replay of the same signed request.
    pub fn client_identity_headers(&self) -> &[HeaderName] {
        match self.auth {
            AuthStyle::Header { .. } => &self.auth_headers,
            AuthStyle::ClientSigned => &SIGV4_IDENTITY,
        }
    }

    /// Headers the provider needs that the client may leave out: `anthropic-version` for
    /// Anthropic and every provider speaking its format.
    pub fn default_headers(&self) -> &'static [(&'static str, &'static str)] {
        if self.format == ApiFormat::Anthropic {
            &[("anthropic-version", "2023-06-01")]
        } else {
            &[]
        }
    }

    /// Number of stored keys usable by this provider.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The client's query as it goes upstream. Google AI Studio also takes its key as `?key=`:
    /// that parameter goes when the gateway injects a stored key, which replaces whatever
    /// provider auth the client sent.
    pub fn upstream_query<'q>(
        &self,
        query: Option<&'q str>,
        key: &KeyChoice<'_>,
    ) -> Option<std::borrow::Cow<'q, str>> {
        let q = query?;
        let is_key = |p: &&str| *p == "key" || p.starts_with("key=");
        if !matches!(key, KeyChoice::Stored(_))
            || &*self.id != "google-ai-studio"
            || !q.split('&').any(|p| is_key(&p))
        {
            return Some(std::borrow::Cow::Borrowed(q));
        }
        let kept: Vec<&str> = q.split('&').filter(|p| !is_key(p)).collect();
        (!kept.is_empty()).then(|| std::borrow::Cow::Owned(kept.join("&")))
    }

    /// Where its requests go, as the config says it: its base URL (or template), its account
    /// id and wire format. Part of the response cache's key, so that a reload pointing the
    /// provider elsewhere never answers with what the former upstream said.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The account of a long-form URL (`/v1/{account}/{gateway}/...`) when it goes into this
    /// provider's upstream URL: `workers-ai` without a configured account id.
    pub fn route_account<'r>(&self, account: Option<&'r str>) -> Option<&'r str> {
        account.filter(|_| self.shape == UrlShape::WorkersAi && self.account_id.is_none())
    }

    /// The upstream URI for a route, keeping the client's query.
    pub fn upstream_uri(
        &self,
        route: &ProviderRoute<'_>,
        query: Option<&str>,
    ) -> Result<Uri, GatewayError> {
        check_segments(route.rest)?;
        // The base the path goes under: the provider's, or Azure's v1 API's.
        let mut base = &self.base;
        // The upstream path is `{prefix}/{rest}` after the base's own path.
        let (vars, prefix, rest): (Vec<(&str, &str)>, &str, &str) = match self.shape {
            UrlShape::Plain => {
                // The groq SDK appends /openai/v1/... to its base URL, which for Cloudflare's
                // contract is /groq; the upstream base already ends in /openai/v1.
                let (prefix, rest) = match &*self.id {
                    "groq" => (
                        "",
                        route.rest.strip_prefix("openai/v1/").unwrap_or(route.rest),
                    ),
                    // Their bases end in /v1, which Cloudflare's examples send after the
                    // provider or leave out (baseten shows both; the Cerebras SDK and apps
                    // with an api.cerebras.ai base without /v1 send it): both reach the API.
                    "cerebras" | "baseten" => {
                        ("", route.rest.strip_prefix("v1/").unwrap_or(route.rest))
                    }
                    // Their APIs live under /v1, which Cloudflare's pages both send after the
                    // provider (curl) and put in the gateway URL (SDK base URLs: "replace
                    // https://api.x.ai/v1 with .../grok"): both reach the API.
                    "grok" | "openrouter" if !route.rest.starts_with("v1/") => ("/v1", route.rest),
                    // Cloudflare's page sets Cohere's SDK base URL to `.../cohere/v1`, after
                    // which today's SDK puts its own `v1/chat` or `v2/chat`.
                    "cohere" => (
                        "",
                        route
                            .rest
                            .strip_prefix("v1/")
                            .filter(|r| r.starts_with("v1/") || r.starts_with("v2/"))
                            .unwrap_or(route.rest),
                    ),
                    // Cloudflare's contract: `/huggingface/{model}` is the Inference API's
                    // `/models/{model}`; OpenAI-compatible paths (`v1/...`, as /compat sends)
                    // and paths already under `models/` go as they are.
                    "huggingface"
                        if !route.rest.starts_with("models/") && !route.rest.starts_with("v1/") =>
                    {
                        ("/models", route.rest)
                    }
                    _ => ("", route.rest),
                };
                (Vec::new(), prefix, rest)
            }
            UrlShape::Azure => match AzurePath::of(route.rest) {
                AzurePath::V1(resource, rest) => {
                    if resource.is_empty() {
                        return Err(bad_route(
                            "azure-openai v1 routes are /azure-openai/{resource}/openai/v1/...",
                        ));
                    }
                    let Some(v1) = &self.v1_base else {
                        return Err(bad_route(
                            "azure-openai v1 routes (/azure-openai/{resource}/openai/v1/...) need a baseURL ending in /deployments/{deployment}, which /v1 takes the place of; this gateway's azure-openai baseURL has none",
                        ));
                    };
                    base = v1;
                    (vec![("resource", resource)], "", rest)
                }
                AzurePath::Deployment(resource, deployment, rest) => {
                    if resource.is_empty() || deployment.is_empty() {
                        return Err(bad_route(
                            "azure-openai routes are /azure-openai/{resource}/{deployment}/... (or {resource}/openai/v1/... for Azure's v1 API)",
                        ));
                    }
                    (
                        vec![("resource", resource), ("deployment", deployment)],
                        "",
                        rest,
                    )
                }
            },
            UrlShape::Bedrock => {
                let mut parts = route.rest.splitn(3, '/');
                let service = parts.next().unwrap_or_default();
                let region = parts.next().unwrap_or_default();
                let rest = parts.next().unwrap_or_default();
                if service != "bedrock-runtime" || region.is_empty() {
                    return Err(bad_route(
                        "aws-bedrock routes are /aws-bedrock/bedrock-runtime/{region}/...",
                    ));
                }
                (vec![("region", region)], "", rest)
            }
            UrlShape::Vertex => {
                let region = route
                    .rest
                    .split('/')
                    .skip_while(|s| *s != "locations")
                    .nth(1)
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        bad_route("google-vertex-ai routes need a locations/{region} segment")
                    })?;
                (vec![("region", region)], "", route.rest)
            }
            UrlShape::WorkersAi => {
                let account = self
                    .account_id
                    .as_deref()
                    .or(route.account)
                    .ok_or_else(|| bad_route("workers-ai needs an account id: use the long form /v1/{account}/{gateway}/workers-ai/... or set spec.providers.workers-ai.accountId"))?;
                let prefix = if route.rest.starts_with("v1/") {
                    ""
                } else {
                    "/run"
                };
                (vec![("account", account)], prefix, route.rest)
            }
        };
        let push_path = |url: &mut String| {
            url.push_str(prefix);
            url.push('/');
            url.push_str(rest);
            if let Some(q) = query {
                url.push('?');
                url.push_str(q);
            }
        };
        let len = prefix.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1;
        match base {
            Base::Fixed {
                scheme,
                authority,
                path: base_path,
            } => {
                let mut full = String::with_capacity(base_path.len() + len);
                full.push_str(base_path);
                push_path(&mut full);
                let pq = PathAndQuery::try_from(full)
                    .map_err(|_| bad_route("the request path is not a valid URI path"))?;
                Uri::builder()
                    .scheme(scheme.clone())
                    .authority(authority.clone())
                    .path_and_query(pq)
                    .build()
                    .map_err(|_| bad_route("the request path is not a valid URI path"))
            }
            Base::Template(t) => {
                let mut url = t.clone();
                let host_end = t.find("://").map_or(0, |at| {
                    at + 3 + t[at + 3..].find('/').unwrap_or(t.len() - at - 3)
                });
                for (name, value) in vars {
                    // A value is a DNS label (whether the template puts it in the host or not),
                    // but for an Azure deployment in the path, which is a path segment
                    // (deployments are often named after their models: `gpt-4.1`).
                    let segment = name == "deployment" && !t[..host_end].contains("{deployment}");
                    if !segment && !is_host_label(value) {
                        return Err(bad_route(format!(
                            "{{{name}}} must be letters, digits and dashes, got {:?}",
                            truncate(value)
                        )));
                    }
                    if segment && !is_path_name(value) {
                        return Err(bad_route(format!(
                            "{{{name}}} must be letters, digits, dashes, dots and underscores, got {:?}",
                            truncate(value)
                        )));
                    }
                    if name == "region" && value == "global" {
                        // Vertex's global endpoint has no region in its host name.
                        url = url.replace("{region}-", "");
                    }
                    if name == "region"
                        && let Some(suffix) = aws_dns_suffix(value)
                    {
                        url =
                            url.replace("{region}.amazonaws.com", &format!("{{region}}.{suffix}"));
                    }
                    url = url.replace(&format!("{{{name}}}"), value);
                }
                url.reserve(len);
                push_path(&mut url);
                Uri::try_from(url)
                    .map_err(|_| bad_route("the request path is not a valid URI path"))
            }
        }
    }
}

/// The domain of an AWS region's endpoints where it is not `amazonaws.com`: the China regions'
/// (`cn-north-1`: `bedrock-runtime.cn-north-1.amazonaws.com.cn`) and the European Sovereign
/// Cloud's (`eusc-de-east-1`: `...amazonaws.eu`).
fn aws_dns_suffix(region: &str) -> Option<&'static str> {
    if region.starts_with("cn-") {
        Some("amazonaws.com.cn")
    } else if region.starts_with("eusc-") {
        Some("amazonaws.eu")
    } else {
        None
    }
}

/// A provider path not in the shape its provider needs: a bad route, 404/2001 (SPEC.md).
fn bad_route(msg: impl Into<String>) -> GatewayError {
    GatewayError::NotFound(msg.into())
}

/// Rejects `.` and `..` segments (also percent-encoded) so a route cannot climb out of a
/// provider's base path. Segments end at `/`, and also at `\`, `%2F` and `%5C`, which some
/// servers and proxies decode or normalise into a `/` (an encoded slash stays allowed inside a
/// segment: Bedrock inference profile ARNs carry one).
fn check_segments(rest: &str) -> Result<(), GatewayError> {
    let bytes = rest.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i <= bytes.len() {
        let sep = match bytes.get(i..) {
            None | Some([]) => 1,
            Some([b'/' | b'\\', ..]) => 1,
            Some([b'%', b'2', f, ..]) if f.eq_ignore_ascii_case(&b'f') => 3,
            Some([b'%', b'5', c, ..]) if c.eq_ignore_ascii_case(&b'c') => 3,
            Some(_) => 0,
        };
        if sep == 0 {
            i += 1;
            continue;
        }
        if is_dot_segment(&rest[start..i]) {
            return Err(bad_route("dot segments are not allowed in provider paths"));
        }
        i += sep;
        start = i;
    }
    Ok(())
}

/// `.` or `..`, any dot possibly percent-encoded (`%2e`, either case); without allocating.
fn is_dot_segment(seg: &str) -> bool {
    let mut rest = seg.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// A value that may become part of a host name.
fn is_host_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A name that goes into a template's path as one segment (an Azure deployment): letters,
/// digits, `-`, `_` and `.`, at most 64 (Azure's bound), and no `.` or `..` segment.
fn is_path_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_base(id: &str, text: &str) -> Result<Base, ProviderError> {
    // The operator checks the same (`sidegate_crds::validation`), so it never renders a base
    // URL refused here.
    if let Some(why) = sidegate_crds::validation::base_url_problem(text) {
        return Err(perr(id, format!("baseURL {why}")));
    }
    let text = text.trim_end_matches('/');
    if text.contains('{') {
        return Ok(Base::Template(text.to_owned()));
    }
    let uri =
        Uri::try_from(text).map_err(|e| perr(id, format!("baseURL {text:?} is not a URL: {e}")))?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(perr(
            id,
            format!("baseURL {text:?} needs a scheme and a host"),
        ));
    };
    let path = uri.path().trim_end_matches('/').to_owned();
    Ok(Base::Fixed {
        scheme,
        authority,
        path,
    })
}

/// Every provider of a gateway, by id.
#[derive(Debug, Default)]
pub struct ProviderTable {
    providers: HashMap<String, Provider>,
    /// Every header a configured provider takes a key in: [`CLIENT_KEY_HEADERS`] and custom
    /// providers' `authHeader`s.
    key_headers: Vec<HeaderName>,
}

impl ProviderTable {
    /// Builds the table from the built-ins, the config's `spec.providers`, and the stored keys.
    /// Returns warnings about keys that no provider can use.
    pub fn build(
        settings: &std::collections::BTreeMap<String, ProviderSettings>,
        keys: &KeyStore,
    ) -> Result<(Self, Vec<String>), ProviderError> {
        let mut providers = HashMap::new();
        for bi in BUILTINS {
            let s = settings.get(bi.id);
            if let Some(why) = s.and_then(|s| provider_problem(bi.id, s)) {
                return Err(perr(bi.id, why));
            }
            let auth = if bi.auth_header.is_empty() {
                AuthStyle::ClientSigned
            } else {
                AuthStyle::Header {
                    name: HeaderName::from_static(bi.auth_header),
                    scheme: bi.scheme.map(str::to_owned),
                }
            };
            providers.insert(
                bi.id.to_owned(),
                Provider::new(bi.id, bi.base, bi.shape, auth, bi.format, s)?,
            );
        }
        for (id, s) in settings {
            if BUILTIN_PROVIDERS.contains(&id.as_str()) {
                continue;
            }
            if let Some(why) = provider_problem(id, s) {
                return Err(perr(id, why));
            }
            let base = s
                .base_url
                .as_deref()
                .ok_or_else(|| perr(id, "custom providers need a baseURL"))?;
            let name = match &s.auth_header {
                Some(h) => HeaderName::try_from(h.as_str())
                    .map_err(|_| perr(id, format!("authHeader {h:?} is not a header name")))?,
                None => header::AUTHORIZATION,
            };
            let scheme = match (&s.auth_scheme, name == header::AUTHORIZATION) {
                (Some(sc), _) if sc.is_empty() => None,
                (Some(sc), _) => Some(sc.clone()),
                (None, true) => Some("Bearer".to_owned()),
                (None, false) => None,
            };
            let auth = AuthStyle::Header { name, scheme };
            providers.insert(
                id.clone(),
                Provider::new(
                    id,
                    base,
                    UrlShape::Plain,
                    auth,
                    s.format.unwrap_or(ApiFormat::Openai),
                    Some(s),
                )?,
            );
        }
        let mut warnings = Vec::new();
        for (pid, alias) in keys.aliases() {
            let Some(p) = providers.get_mut(pid) else {
                warnings.push(format!("key {pid}.{alias} is unused: provider {pid} is not configured in spec.providers"));
                continue;
            };
            let scheme = match &p.auth {
                AuthStyle::Header { scheme, .. } => scheme.as_deref(),
                AuthStyle::ClientSigned => {
                    // The gateway signs with these credentials (passthrough and /compat); while
                    // they cannot sign, their requests are refused, never sent unsigned.
                    if let Some(Err(why)) = keys
                        .get(pid, alias)
                        .map(|k| crate::compat::bedrock::AwsCredentials::parse(k.expose()))
                    {
                        warnings.push(format!(
                            "key {pid}.{alias} is unused: it cannot sign requests: {why}"
                        ));
                    }
                    continue;
                }
            };
            let Some(key) = keys.get(pid, alias) else {
                continue;
            };
            if &*p.id == "google-vertex-ai" {
                match crate::google_auth::ServiceAccount::parse(key.expose()) {
                    Some(Ok(sa)) => {
                        p.service_accounts.insert(alias.to_owned(), Arc::new(sa));
                        continue;
                    }
                    Some(Err(why)) => {
                        warnings.push(format!("key {pid}.{alias} is unused: {why}"));
                        continue;
                    }
                    None => {} // a ready access token
                }
            }
            match AuthValue::new(scheme, key) {
                Some(v) => {
                    p.keys.insert(alias.to_owned(), v);
                }
                None => warnings.push(format!(
                    "key {pid}.{alias} is unused: it has characters an HTTP header cannot carry"
                )),
            }
        }
        // In a fixed order: the built-ins' (ElevenLabs' `xi-api-key`), then the custom ones'.
        let mut key_headers = CLIENT_KEY_HEADERS.to_vec();
        let ids = BUILTINS
            .iter()
            .map(|bi| bi.id)
            .chain(settings.keys().map(String::as_str));
        for name in ids.filter_map(|id| providers.get(id)?.auth_header()) {
            if !key_headers.contains(name) {
                key_headers.push(name.clone());
            }
        }
        for p in providers.values_mut() {
            p.foreign_key_headers = key_headers[CLIENT_KEY_HEADERS.len()..]
                .iter()
                .filter(|n| p.auth_header() != Some(*n))
                .cloned()
                .collect();
            p.stored_drop = p.auth_headers.clone();
            p.stored_drop.extend(p.foreign_key_headers.iter().cloned());
        }
        Ok((
            Self {
                providers,
                key_headers,
            },
            warnings,
        ))
    }

    /// The provider with this id.
    pub fn get(&self, id: &str) -> Option<&Provider> {
        self.providers.get(id)
    }

    /// Every header a configured provider takes a key in (for requests whose provider is not
    /// known yet, and for the gateway token's check): [`CLIENT_KEY_HEADERS`] and custom
    /// providers' `authHeader`s.
    pub fn key_headers(&self) -> &[HeaderName] {
        &self.key_headers
    }

    /// Keeps the access tokens `former` (the table of the config this one replaces) minted from
    /// Google service accounts whose key is unchanged: a reload (a config edit, another key
    /// rotated) does not send every such account back to the token endpoint.
    pub fn keep_tokens(&mut self, former: &ProviderTable) {
        for (id, p) in &mut self.providers {
            let Some(old) = former.providers.get(id) else {
                continue;
            };
            for (alias, sa) in &mut p.service_accounts {
                // Only just built, the new table is not shared yet.
                if let (Some(sa), Some(old)) = (Arc::get_mut(sa), old.service_accounts.get(alias)) {
                    sa.keep_tokens_of(old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_placeholders_validation_allows_are_those_each_provider_fills() {
        use sidegate_crds::validation::{BASE_URL_PLACEHOLDERS, placeholders_filled_by};
        for b in BUILTINS {
            let filled = placeholders_filled_by(b.id);
            for p in BASE_URL_PLACEHOLDERS {
                assert_eq!(
                    b.base.contains(&format!("{{{p}}}")),
                    filled.contains(p),
                    "{}: {{{p}}}",
                    b.id
                );
            }
            assert_eq!(b.shape == UrlShape::Plain, filled.is_empty(), "{}", b.id);
        }
    }

    fn table(settings: &[(&str, ProviderSettings)]) -> ProviderTable {
        let s: BTreeMap<_, _> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        ProviderTable::build(&s, &KeyStore::default())
            .expect("table")
            .0
    }

    fn route<'a>(provider: &'a str, rest: &'a str) -> ProviderRoute<'a> {
        ProviderRoute {
            provider,
            rest,
            account: None,
            gateway: None,
        }
    }

    fn uri(t: &ProviderTable, provider: &str, rest: &str) -> Result<String, GatewayError> {
        let p = t.get(provider).expect("provider");
        p.upstream_uri(&route(provider, rest), None)
            .map(|u| u.to_string())
    }

    #[test]
    fn openai_compatible_providers_append_the_path_to_their_base() {
        let t = table(&[]);
        assert_eq!(
            uri(&t, "openai", "chat/completions").as_deref(),
            Ok("https://api.openai.com/v1/chat/completions")
        );
        assert_eq!(
            uri(&t, "groq", "chat/completions").as_deref(),
            Ok("https://api.groq.com/openai/v1/chat/completions")
        );
        assert_eq!(
            uri(&t, "anthropic", "v1/messages").as_deref(),
            Ok("https://api.anthropic.com/v1/messages")
        );
    }

    #[test]
    fn every_builtin_provider_has_spec_md_base_and_url_shape() {
        let t = table(&[]);
        for (provider, rest, want) in [
            (
                "openai",
                "chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "anthropic",
                "v1/messages",
                "https://api.anthropic.com/v1/messages",
            ),
            (
                "google-ai-studio",
                "v1beta/models/gemini-2.5-flash:generateContent",
                "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
            ),
            (
                "groq",
                "chat/completions",
                "https://api.groq.com/openai/v1/chat/completions",
            ),
            (
                "mistral",
                "v1/chat/completions",
                "https://api.mistral.ai/v1/chat/completions",
            ),
            ("cohere", "v2/chat", "https://api.cohere.ai/v2/chat"),
            // Cloudflare's SDK base URL (`.../cohere/v1`) and the SDK's own version after it.
            ("cohere", "v1/v2/chat", "https://api.cohere.ai/v2/chat"),
            ("cohere", "v1/v1/chat", "https://api.cohere.ai/v1/chat"),
            ("cohere", "v1/chat", "https://api.cohere.ai/v1/chat"),
            (
                "deepseek",
                "chat/completions",
                "https://api.deepseek.com/chat/completions",
            ),
            (
                "grok",
                "v1/chat/completions",
                "https://api.x.ai/v1/chat/completions",
            ),
            // Cloudflare's SDK base URLs leave grok's and openrouter's /v1 out.
            (
                "grok",
                "chat/completions",
                "https://api.x.ai/v1/chat/completions",
            ),
            ("grok", "v1/messages", "https://api.x.ai/v1/messages"),
            (
                "perplexity-ai",
                "chat/completions",
                "https://api.perplexity.ai/chat/completions",
            ),
            (
                "openrouter",
                "v1/chat/completions",
                "https://openrouter.ai/api/v1/chat/completions",
            ),
            (
                "openrouter",
                "chat/completions",
                "https://openrouter.ai/api/v1/chat/completions",
            ),
            // Cloudflare's HuggingFace shape: the model right after the provider.
            (
                "huggingface",
                "bigcode/starcoder",
                "https://api-inference.huggingface.co/models/bigcode/starcoder",
            ),
            (
                "huggingface",
                "models/gpt2",
                "https://api-inference.huggingface.co/models/gpt2",
            ),
            (
                "huggingface",
                "v1/chat/completions",
                "https://api-inference.huggingface.co/v1/chat/completions",
            ),
            (
                "cerebras",
                "chat/completions",
                "https://api.cerebras.ai/v1/chat/completions",
            ),
            (
                "baseten",
                "chat/completions",
                "https://inference.baseten.co/v1/chat/completions",
            ),
            (
                "parallel",
                "v1/tasks/runs",
                "https://api.parallel.ai/v1/tasks/runs",
            ),
            (
                "parallel",
                "v1beta/chat/completions",
                "https://api.parallel.ai/v1beta/chat/completions",
            ),
        ] {
            assert_eq!(
                uri(&t, provider, rest).as_deref(),
                Ok(want),
                "{provider} {rest}"
            );
        }
        // A base URL override keeps the shape (HuggingFace's router serves the same paths).
        let s = ProviderSettings {
            base_url: Some("https://router.huggingface.co/hf-inference".into()),
            ..Default::default()
        };
        let t = table(&[("huggingface", s)]);
        assert_eq!(
            uri(&t, "huggingface", "bigcode/starcoder").as_deref(),
            Ok("https://router.huggingface.co/hf-inference/models/bigcode/starcoder")
        );
    }

    #[test]
    fn a_custom_providers_key_header_goes_to_no_other_provider() {
        let custom = ProviderSettings {
            base_url: Some("http://llm.internal/v1".into()),
            auth_header: Some("x-custom-key".into()),
            ..Default::default()
        };
        let t = table(&[("custom-own", custom)]);
        fn names(h: &[HeaderName]) -> Vec<&str> {
            h.iter().map(HeaderName::as_str).collect()
        }
        assert_eq!(
            names(t.key_headers()),
            [
                "authorization",
                "x-api-key",
                "api-key",
                "x-goog-api-key",
                "xi-api-key",
                "x-custom-key"
            ]
        );
        let openai = t.get("openai").expect("openai");
        assert_eq!(
            names(openai.dropped_headers(false)),
            ["xi-api-key", "x-custom-key"]
        );
        let stored = names(openai.dropped_headers(true));
        assert!(stored.contains(&"authorization") && stored.contains(&"x-custom-key"));
        // Its own provider gets it; AWS (signed) never does.
        let own = t.get("custom-own").expect("custom");
        assert_eq!(names(own.dropped_headers(false)), ["xi-api-key"]);
        let bedrock = t.get("aws-bedrock").expect("bedrock");
        assert_eq!(
            names(bedrock.dropped_headers(false)),
            ["xi-api-key", "x-custom-key"]
        );
        // With built-ins only, ElevenLabs' key header goes to ElevenLabs alone.
        let t = table(&[]);
        assert_eq!(
            names(t.get("openai").expect("openai").dropped_headers(false)),
            ["xi-api-key"]
        );
        let elevenlabs = t.get("elevenlabs").expect("elevenlabs");
        assert!(elevenlabs.dropped_headers(false).is_empty());
    }

    #[test]
    fn the_media_providers_cloudflare_serves_take_their_keys_as_documented() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, key) in [
            ("replicate.default", "r8_k"),
            ("elevenlabs.default", "el_k"),
            ("cartesia.default", "ca_k"),
            ("fal.default", "fal_k"),
            ("ideogram.default", "id_k"),
        ] {
            std::fs::write(dir.path().join(name), key).expect("key file");
        }
        let keys = KeyStore::load(dir.path()).expect("keys");
        let (t, warnings) = ProviderTable::build(&BTreeMap::new(), &keys).expect("table");
        assert!(warnings.is_empty(), "{warnings:?}");
        for (provider, rest, want, header, value) in [
            (
                "replicate",
                "predictions",
                "https://api.replicate.com/v1/predictions",
                "authorization",
                "Bearer r8_k",
            ),
            (
                "elevenlabs",
                "v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb",
                "https://api.elevenlabs.io/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb",
                "xi-api-key",
                "el_k",
            ),
            (
                "cartesia",
                "tts/bytes",
                "https://api.cartesia.ai/tts/bytes",
                "x-api-key",
                "ca_k",
            ),
            (
                "fal",
                "fal-ai/fast-sdxl",
                "https://fal.run/fal-ai/fast-sdxl",
                "authorization",
                "Key fal_k",
            ),
            (
                "ideogram",
                "v1/ideogram-v3/generate",
                "https://api.ideogram.ai/v1/ideogram-v3/generate",
                "api-key",
                "id_k",
            ),
        ] {
            assert_eq!(uri(&t, provider, rest).as_deref(), Ok(want), "{provider}");
            let p = t.get(provider).expect(provider);
            assert_eq!(
                p.auth_header().map(HeaderName::as_str),
                Some(header),
                "{provider}"
            );
            let Ok(KeyChoice::Stored(v)) = p.choose_key(None) else {
                panic!("{provider}: no stored key");
            };
            assert_eq!(v.header().to_str().ok(), Some(value), "{provider}");
        }
    }

    #[test]
    fn azure_routes_take_cloudflares_path_and_the_one_azures_sdk_appends() {
        let t = table(&[]);
        let want = "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions";
        for rest in [
            "res/gpt4o/chat/completions",
            "res/openai/deployments/gpt4o/chat/completions",
        ] {
            assert_eq!(uri(&t, "azure-openai", rest).as_deref(), Ok(want), "{rest}");
            let azure = t.get("azure-openai").expect("azure");
            assert_eq!(azure.deployment(rest), Some("gpt4o"), "{rest}");
        }
        assert!(uri(&t, "azure-openai", "res/openai/deployments/").is_err());
        assert!(uri(&t, "azure-openai", "res").is_err());
    }

    #[test]
    fn azure_v1_routes_reach_the_resources_v1_api_and_name_no_deployment() {
        let t = table(&[]);
        let azure = t.get("azure-openai").expect("azure");
        for (rest, want, api_path) in [
            (
                "res/openai/v1/chat/completions",
                "https://res.openai.azure.com/openai/v1/chat/completions",
                "chat/completions",
            ),
            (
                "res/openai/v1/responses",
                "https://res.openai.azure.com/openai/v1/responses",
                "responses",
            ),
            (
                "models/openai/v1/embeddings",
                "https://models.openai.azure.com/openai/v1/embeddings",
                "embeddings",
            ),
            (
                "res/openai/v1",
                "https://res.openai.azure.com/openai/v1/",
                "",
            ),
        ] {
            assert_eq!(uri(&t, "azure-openai", rest).as_deref(), Ok(want), "{rest}");
            // The model is the body's, as on OpenAI; a resource named `models` is no model.
            assert_eq!(azure.deployment(rest), None, "{rest}");
            assert_eq!(azure.api_path(rest), api_path, "{rest}");
            assert!(is_azure_v1(rest), "{rest}");
        }
        // `openai/v1x` is no v1 API: a deployment `openai`, as before.
        assert_eq!(azure.deployment("res/openai/v1x/chat"), Some("openai"));
        assert!(!is_azure_v1("res/gpt-4o/chat/completions"));
        assert_eq!(
            azure.api_path("res/openai/deployments/gpt-4o/chat/completions"),
            "chat/completions"
        );
        // The resource is still a host label, and `..` cannot climb out of `/openai/v1`.
        assert!(uri(&t, "azure-openai", "my.res/openai/v1/chat").is_err());
        assert!(uri(&t, "azure-openai", "/openai/v1/chat").is_err());
        assert!(uri(&t, "azure-openai", "res/openai/v1/../deployments/x/chat").is_err());
        // A base URL pointed elsewhere keeps its v1 API in place of `/deployments/{deployment}`.
        let s = ProviderSettings {
            base_url: Some(
                "http://127.0.0.1:9/az/{resource}/openai/deployments/{deployment}".into(),
            ),
            ..Default::default()
        };
        let t = table(&[("azure-openai", s)]);
        assert_eq!(
            uri(&t, "azure-openai", "res/openai/v1/chat/completions").as_deref(),
            Ok("http://127.0.0.1:9/az/res/openai/v1/chat/completions")
        );
        let s = ProviderSettings {
            base_url: Some("http://127.0.0.1:9/openai/deployments/{deployment}".into()),
            ..Default::default()
        };
        let t = table(&[("azure-openai", s)]);
        assert_eq!(
            uri(&t, "azure-openai", "res/openai/v1/embeddings").as_deref(),
            Ok("http://127.0.0.1:9/openai/v1/embeddings")
        );
        // A base without `/deployments/{deployment}` has no v1 API to send to: a bad route.
        let s = ProviderSettings {
            base_url: Some("https://{deployment}.{resource}.example/openai".into()),
            ..Default::default()
        };
        let hosted = table(&[("azure-openai", s)]);
        let err =
            uri(&hosted, "azure-openai", "res/openai/v1/chat/completions").expect_err("no v1 base");
        assert_eq!(err.code(), 2001);
        assert!(
            err.to_string().contains("/deployments/{deployment}"),
            "{err}"
        );
    }

    #[test]
    fn groq_accepts_the_paths_its_own_sdk_sends() {
        let t = table(&[]);
        assert_eq!(
            uri(&t, "groq", "openai/v1/chat/completions").as_deref(),
            Ok("https://api.groq.com/openai/v1/chat/completions")
        );
    }

    #[test]
    fn cerebras_and_baseten_serve_paths_with_or_without_their_v1() {
        let t = table(&[]);
        for (provider, want) in [
            ("cerebras", "https://api.cerebras.ai/v1/chat/completions"),
            (
                "baseten",
                "https://inference.baseten.co/v1/chat/completions",
            ),
        ] {
            for rest in ["chat/completions", "v1/chat/completions"] {
                assert_eq!(
                    uri(&t, provider, rest).as_deref(),
                    Ok(want),
                    "{provider} {rest}"
                );
            }
        }
        // The same holds for a base URL pointed elsewhere (a proxy or a mock).
        let s = ProviderSettings {
            base_url: Some("http://127.0.0.1:9/v1".into()),
            ..Default::default()
        };
        let t = table(&[("cerebras", s)]);
        assert_eq!(
            uri(&t, "cerebras", "v1/models").as_deref(),
            Ok("http://127.0.0.1:9/v1/models")
        );
    }

    #[test]
    fn cloudflares_further_providers_take_their_key_where_their_apis_want_it() {
        let t = table(&[]);
        for (provider, header) in [
            ("cerebras", "authorization"),
            ("baseten", "authorization"),
            ("parallel", "x-api-key"),
        ] {
            let p = t.get(provider).expect("provider");
            assert_eq!(p.format, ApiFormat::Openai, "{provider}");
            assert_eq!(
                p.auth_header().map(HeaderName::as_str),
                Some(header),
                "{provider}"
            );
            // An OpenAI SDK's placeholder `Authorization` goes when a key is injected.
            assert!(
                p.auth_headers().contains(&header::AUTHORIZATION),
                "{provider}"
            );
        }
    }

    #[test]
    fn azure_takes_resource_and_deployment_from_the_path() {
        let t = table(&[]);
        assert_eq!(
            uri(&t, "azure-openai", "my-res/gpt4o/chat/completions").as_deref(),
            Ok("https://my-res.openai.azure.com/openai/deployments/gpt4o/chat/completions")
        );
        assert_eq!(
            uri(&t, "azure-openai", "only-resource").map_err(|e| e.code()),
            Err(2001)
        );
        // A deployment is a path segment: dots and underscores are Azure's, as in `gpt-4.1`.
        assert_eq!(
            uri(&t, "azure-openai", "my-res/gpt-4.1_eu/chat/completions").as_deref(),
            Ok("https://my-res.openai.azure.com/openai/deployments/gpt-4.1_eu/chat/completions")
        );
        for deployment in ["..", ".", "a%2Fb", "a b", "x@y"] {
            assert!(
                uri(&t, "azure-openai", &format!("my-res/{deployment}/chat")).is_err(),
                "{deployment}"
            );
        }
        // The resource is still a host label, and so is a deployment a template puts in its host.
        assert!(uri(&t, "azure-openai", "my.res/gpt-4.1/chat").is_err());
        let s = ProviderSettings {
            base_url: Some("https://{deployment}.{resource}.example/openai".into()),
            ..Default::default()
        };
        let hosted = table(&[("azure-openai", s)]);
        assert!(uri(&hosted, "azure-openai", "res/gpt-4.1/chat").is_err());
        assert_eq!(
            uri(&hosted, "azure-openai", "res/gpt-4o/chat").as_deref(),
            Ok("https://gpt-4o.res.example/openai/chat")
        );
    }

    #[test]
    fn host_placeholders_refuse_anything_but_a_host_label() {
        let t = table(&[]);
        let err = uri(&t, "azure-openai", "evil.com%2f/x/chat").expect_err("must refuse");
        assert_eq!(err.status().as_u16(), 404);
        assert!(uri(&t, "aws-bedrock", "bedrock-runtime/us-east-1@x/model").is_err());
    }

    #[test]
    fn bedrock_and_vertex_take_the_region() {
        let t = table(&[]);
        assert_eq!(
            uri(
                &t,
                "aws-bedrock",
                "bedrock-runtime/us-east-1/model/m/converse"
            )
            .as_deref(),
            Ok("https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse")
        );
        // The China regions and the European Sovereign Cloud have endpoints of their own domain.
        for (region, host) in [
            ("cn-north-1", "bedrock-runtime.cn-north-1.amazonaws.com.cn"),
            (
                "eusc-de-east-1",
                "bedrock-runtime.eusc-de-east-1.amazonaws.eu",
            ),
        ] {
            assert_eq!(
                uri(
                    &t,
                    "aws-bedrock",
                    &format!("bedrock-runtime/{region}/model/m/converse")
                )
                .as_deref(),
                Ok(format!("https://{host}/model/m/converse").as_str())
            );
        }
        assert_eq!(
            uri(
                &t,
                "google-vertex-ai",
                "v1/projects/p/locations/europe-west4/publishers/google/models/g:generateContent"
            )
            .as_deref(),
            Ok(
                "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4/publishers/google/models/g:generateContent"
            )
        );
        // Vertex's global location is served by a host without a region.
        assert_eq!(
            uri(
                &t,
                "google-vertex-ai",
                "v1/projects/p/locations/global/publishers/google/models/g:generateContent"
            )
            .as_deref(),
            Ok(
                "https://aiplatform.googleapis.com/v1/projects/p/locations/global/publishers/google/models/g:generateContent"
            )
        );
    }

    #[test]
    fn workers_ai_needs_an_account_and_adds_run() {
        let t = table(&[]);
        let p = t.get("workers-ai").expect("workers-ai");
        let r = ProviderRoute {
            provider: "workers-ai",
            rest: "@cf/meta/llama",
            account: Some("acc1"),
            gateway: Some("gw"),
        };
        assert_eq!(
            p.upstream_uri(&r, None).map(|u| u.to_string()).as_deref(),
            Ok("https://api.cloudflare.com/client/v4/accounts/acc1/ai/run/@cf/meta/llama")
        );
        assert!(uri(&t, "workers-ai", "@cf/meta/llama").is_err());
    }

    #[test]
    fn only_an_account_that_goes_into_the_upstream_url_is_the_routes() {
        let t = table(&[]);
        let workers = t.get("workers-ai").expect("workers-ai");
        assert_eq!(workers.route_account(Some("acc1")), Some("acc1"));
        assert_eq!(workers.route_account(None), None);
        let openai = t.get("openai").expect("openai");
        assert_eq!(openai.route_account(Some("acc1")), None);
        let configured = ProviderSettings {
            account_id: Some("acc-configured".into()),
            ..Default::default()
        };
        let t = table(&[("workers-ai", configured)]);
        let workers = t.get("workers-ai").expect("workers-ai");
        assert_eq!(workers.route_account(Some("acc1")), None);
    }

    #[test]
    fn base_urls_are_overridable_and_query_is_kept() {
        let s = ProviderSettings {
            base_url: Some("http://127.0.0.1:9/mock/v1/".into()),
            ..Default::default()
        };
        let t = table(&[("openai", s)]);
        let p = t.get("openai").expect("openai");
        let u = p
            .upstream_uri(&route("openai", "models"), Some("limit=2"))
            .expect("uri");
        assert_eq!(u.to_string(), "http://127.0.0.1:9/mock/v1/models?limit=2");
    }

    #[test]
    fn dot_segments_cannot_climb_out_of_the_base_path() {
        let t = table(&[]);
        for bad in [
            "../x",
            "a/%2e%2E/b",
            "./a",
            "..%2fadmin",
            "..%2Fadmin",
            "..\\..\\x",
            "%2e%2e%5cx",
            "a%2f..",
        ] {
            assert_eq!(
                uri(&t, "openai", bad).map_err(|e| e.code()),
                Err(2001),
                "{bad}"
            );
        }
        // An encoded slash inside a segment is fine (a Bedrock inference profile ARN), and so
        // are dots that are not a whole segment.
        for good in ["a%2Fb/c", "v1/x..y", "..a/b", "a\\b"] {
            assert!(uri(&t, "openai", good).is_ok(), "{good}");
        }
    }

    #[test]
    fn dot_segments_are_found_like_decoding_them_would() {
        let decoded = |seg: &str| {
            let d = seg.to_ascii_lowercase().replace("%2e", ".");
            d == "." || d == ".."
        };
        for seg in [
            "",
            ".",
            "..",
            "...",
            "%2e",
            "%2E",
            "%2e%2E",
            ".%2e",
            "%2e.",
            "%2e%2e%2e",
            "%2",
            "%2f",
            "a",
            "a.",
            ".a",
            "%%2e2e",
            "%2e%",
            "..%2e",
            "chat",
            "v1",
        ] {
            assert_eq!(is_dot_segment(seg), decoded(seg), "{seg:?}");
        }
    }

    #[test]
    fn custom_providers_need_a_base_url_and_a_valid_id() {
        let s: BTreeMap<_, _> = [("custom-x".to_string(), ProviderSettings::default())].into();
        let err = ProviderTable::build(&s, &KeyStore::default()).expect_err("needs base");
        assert_eq!(
            err.to_string(),
            "spec.providers.custom-x: custom providers need a baseURL"
        );
        let s: BTreeMap<_, _> = [("ollama".to_string(), ProviderSettings::default())].into();
        assert!(ProviderTable::build(&s, &KeyStore::default()).is_err());
    }

    #[test]
    fn alias_choice_defaults_to_client_key_without_a_stored_default() {
        let t = table(&[]);
        let p = t.get("openai").expect("openai");
        assert!(matches!(p.choose_key(None), Ok(KeyChoice::ClientOwn)));
        assert_eq!(
            p.choose_key(Some("team-b")).map_err(|e| e.code()).err(),
            Some(2040)
        );
    }
}
