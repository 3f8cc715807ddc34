//! WebSocket passthrough: the providers' realtime APIs (OpenAI Realtime, Gemini Live, ...) on
//! the provider routes, as Cloudflare's WebSockets API serves them.
//!
//! An HTTP/1.1 `GET` asking to upgrade to `websocket` is admitted like any request (gateway
//! token, rate limit, spend limit), gets the provider's stored key like any request, and goes
//! upstream as the same upgrade request. When the provider switches protocols, the client gets
//! the provider's `101` and from then on the bytes of both directions are copied as they come,
//! until either side closes. A provider that answers otherwise (a `401` for a bad key, say) is
//! answered through as it is.
//!
//! The session is logged (and counted) once, when it ends, with status `101` and its duration.
//! Token counts are read from the provider's `response.done` events (OpenAI Realtime: `usage`
//! with `input_tokens` and `output_tokens`), so they count against token budgets and spend
//! limits as other answers do. For that the gateway asks the provider for uncompressed frames
//! (it drops the client's `Sec-WebSocket-Extensions`), as it asks for uncompressed HTTP answers.
//! The session's model, which prices its responses, is the deployment of an Azure OpenAI route
//! (as for its HTTP requests), else the URL's `?model=` or `?deployment=` (an Azure v1 route,
//! `{resource}/openai/v1/realtime`, names no deployment: its `?model=` is the model).
//!
//! Input audio transcriptions are charged too, as their
//! `conversation.item.input_audio_transcription.completed` events pass (`usage` with
//! `input_tokens` and `output_tokens`), priced at the transcription model the provider's
//! `session.created`/`session.updated` events name (`input_audio_transcription.model`, or
//! `audio.input.transcription.model`). A transcription billed by its audio's duration (`usage`
//! of `type: "duration"`), or by a model without a price, is not charged to the spend limit, and
//! the gateway warns (once per provider or model), as it does for HTTP answers.
//!
//! Each response is charged to the spend limit and token budget when its `response.done` passes,
//! and a session whose limits run out is closed (close code 1008). Sessions are ended (close code
//! 1001) when the gateway stops after its grace period, when its config is taken away (the
//! AIGateway deleted), and when the stored key a session was opened with is removed or rotated: a
//! session never goes on with keys the gateway no longer holds.
//!
//! A gateway whose DLP or guardrails check requests or responses refuses upgrades: it could not
//! check what a session carries. So does, where a spend limit or token budget applies, a
//! provider whose sessions do not speak OpenAI's Realtime events (Gemini Live): their usage would
//! go uncounted; and, where a spend limit applies, a session that names no model (nor asks for
//! transcription, `?intent=transcription`, priced by its transcription model): its responses
//! could not be priced. So does a provider whose requests the gateway signs (AWS): a session is
//! not a request it can sign.
//!
//! At each reload an open session is admitted again under the new config: it ends (close code
//! 1008) when the gateway token it was opened with is no longer one of the gateway's (the
//! session keeps a salted hash of it, never the token), when DLP or guardrails now check
//! requests or responses, when the new limits would refuse it (above) or are spent already; it
//! ends (1001) when its provider is no longer configured. Otherwise its responses are charged
//! from then on to the new config's limits, at its prices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::ProxyBody;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::headers::has_token;
use crate::providers::{HeldCredential, KeyChoice, Provider};
use crate::proxy::Gateway;
use crate::route::ProviderRoute;
use crate::telemetry::{LogOptions, RequestRecord};

/// Largest text message whose token counts are read; a longer one is passed on unread.
const MAX_READ_MESSAGE: usize = 1 << 20;
/// A message is gathered only when its first bytes name an event read for usage (OpenAI puts
/// the `type` first, after at most an `event_id`): audio deltas and the like pass without being
/// copied.
const PEEK: usize = 128;
/// What the first [`PEEK`] bytes of a message read for usage hold: `response.done`, an input
/// audio transcription's `...transcription.completed`, and the session's configuration
/// (`session.created`, `session.updated`, and the `transcription_session.` ones).
const READ_EVENTS: [&[u8]; 4] = [
    b"response.done",
    b"transcription.completed",
    b"session.created",
    b"session.updated",
];
/// Named in the gateway's warning for a transcription whose model the session never named.
const UNNAMED_TRANSCRIPTION_MODEL: &str = "(input audio transcription: model not named)";
/// Named in the gateway's warning for a response of a session that named no model.
const UNNAMED_MODEL: &str = "(realtime session: model not named)";
/// Why a session ends when its stored key goes.
const KEY_GONE: &str = "the provider key of this session was removed or rotated";
/// Size of the provider-to-client copy buffer.
const COPY_BUFFER: usize = 16 * 1024;
/// Once one direction of a session has ended, how long the other may take to end too.
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// The WebSocket sessions open now: counted, ended together when the gateway stops or its
/// config is taken away, and one by one when the stored key a session was opened with is removed
/// or rotated.
#[derive(Debug)]
pub struct Sessions {
    /// Bumped to end every session open now.
    ending: tokio::sync::watch::Sender<u64>,
    /// The config serving now, sent at each reload for sessions to check their key against.
    serving: tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    /// Sessions open now.
    open: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            ending: tokio::sync::watch::channel(0).0,
            serving: tokio::sync::watch::channel(None).0,
            open: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Sessions {
    /// Ends every session open now (sessions opened later are not affected).
    pub fn end_all(&self) {
        // Nor is a config that no longer serves kept for them.
        self.serving.send_replace(None);
        self.ending.send_modify(|g| *g += 1);
    }

    /// A new config serves: each session is admitted again under it (see the module docs), and
    /// those it would not admit end.
    pub fn reloaded(&self, serving: &Arc<Snapshot>) {
        self.serving.send_replace(Some(serving.clone()));
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once no session is open.
    pub async fn all_ended(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|n| *n == 0).await;
    }

    /// Counts a session the gateway serves itself (the universal endpoint's, see
    /// `crate::universal::socket`) as open until the returned handle is dropped; its `ending`
    /// changes when every session is to end.
    pub(crate) fn enter(&self) -> Entered {
        self.open.send_modify(|n| *n += 1);
        Entered {
            ending: self.ending.subscribe(),
            _open: OpenSession(self.open.clone()),
        }
    }

    fn join(&self) -> Watches {
        self.open.send_modify(|n| *n += 1);
        let mut serving = self.serving.subscribe();
        // A reload between the key's choice and now is checked at once.
        serving.mark_changed();
        Watches {
            ending: self.ending.subscribe(),
            serving,
            _open: OpenSession(self.open.clone()),
        }
    }
}

/// A session the gateway serves itself, counted as open while this lives.
pub(crate) struct Entered {
    /// Changes when every session is to end (the gateway stops, its config was taken away).
    pub(crate) ending: tokio::sync::watch::Receiver<u64>,
    _open: OpenSession,
}

/// What a session watches: the gateway ending every session, and reloads.
struct Watches {
    ending: tokio::sync::watch::Receiver<u64>,
    serving: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    _open: OpenSession,
}

/// The stored credential a session was opened with, and where it was stored.
#[derive(Debug)]
pub(crate) struct HeldKey {
    provider: Arc<str>,
    alias: String,
    credential: HeldCredential,
}

impl HeldKey {
    /// The stored credential `key` is (none for a client's own key), under `alias` of `provider`.
    pub(crate) fn of(
        provider: &Provider,
        alias: Option<&str>,
        key: &KeyChoice<'_>,
    ) -> Option<Self> {
        let KeyChoice::Stored(value) = key else {
            return None;
        };
        let credential = match provider.service_account(alias) {
            Some(sa) => HeldCredential::ServiceAccount(sa.clone()),
            None => HeldCredential::Key((*value).clone()),
        };
        Some(Self {
            provider: provider.id.clone(),
            alias: alias.unwrap_or("default").to_owned(),
            credential,
        })
    }

    /// Whether `serving` (no config: nothing) still stores it.
    fn still_held(&self, serving: Option<&Snapshot>) -> bool {
        serving
            .and_then(|s| s.providers.get(&self.provider))
            .is_some_and(|p| p.still_holds(&self.alias, &self.credential))
    }
}

/// The gateway token a session was admitted with, as a salted SHA-256 (the salt random per
/// process): the session keeps no token, yet a reload can tell whether it is still one of the
/// gateway's.
#[derive(Clone, Copy)]
struct TokenPrint([u8; 32]);

impl TokenPrint {
    fn of(token: &[u8]) -> Self {
        use sha2::Digest as _;
        static SALT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let salt = SALT.get_or_init(|| {
            use ring::rand::SecureRandom as _;
            let mut salt = [0u8; 32];
            let _ = ring::rand::SystemRandom::new().fill(&mut salt);
            salt
        });
        let mut h = sha2::Sha256::new();
        h.update(salt);
        h.update(token);
        Self(h.finalize().into())
    }

    /// The gateway token of an admitted request when authentication is on: the bearer token
    /// of `cf-aig-authorization`, else the token in a provider key header (see
    /// [`crate::proxy`]'s `authenticate`).
    fn presented(snap: &Snapshot, headers: &http::HeaderMap) -> Option<Self> {
        use crate::headers::bearer_token;
        if !snap.auth_required {
            return None;
        }
        if let Some(v) = headers.get("cf-aig-authorization") {
            return bearer_token(v.as_bytes()).map(Self::of);
        }
        crate::proxy::token_in_key_header(snap, headers).map(Self::of)
    }

    /// Whether `keys` still holds the token.
    fn held_by(&self, keys: &crate::keys::KeyStore) -> bool {
        use secrecy::ExposeSecret as _;
        use subtle::ConstantTimeEq as _;
        let mut held = subtle::Choice::from(0);
        for t in &keys.tokens {
            held |= Self::of(t.expose_secret().as_bytes()).0.ct_eq(&self.0);
        }
        held.into()
    }
}

/// Why a gateway does not admit a session (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// DLP or guardrails check requests or responses.
    Checked,
    /// Limits apply and the provider's sessions do not report usage the gateway reads.
    Unreadable,
    /// A spend limit applies and the session names no model to price it by.
    NoModel,
    /// The gateway signs the provider's requests.
    Signed,
}

impl Refusal {
    /// Whether `snap` refuses a session of `provider`, naming a model (`priced`: a model, or a
    /// transcription session priced by its transcription model) or not.
    fn of(snap: &Snapshot, provider: &Provider, priced: bool) -> Option<Self> {
        if snap.dlp.checks_requests()
            || snap.dlp.checks_responses()
            || snap.guardrails.checks_prompts()
            || snap.guardrails.checks_responses()
        {
            Some(Self::Checked)
        } else if snap.budgets.is_some() && !provider.sessions_report_openai_usage() {
            Some(Self::Unreadable)
        } else if snap.budgets.is_some_and(|b| b.spend.is_some()) && !priced {
            Some(Self::NoModel)
        } else if provider.signs_requests() {
            Some(Self::Signed)
        } else {
            None
        }
    }

    /// The refusal of an upgrade (400/2111).
    fn error(self, provider: &str) -> GatewayError {
        GatewayError::WebSocketRefused(match self {
            Self::Checked => "WebSocket sessions are refused: this gateway's DLP or guardrails check what requests and responses carry, which they cannot do for a session".into(),
            Self::Unreadable => format!(
                "WebSocket sessions are refused for {provider}: this gateway has a spend limit or token budget, and the gateway cannot read how much this provider's sessions use"
            ),
            Self::NoModel => format!(
                "WebSocket sessions are refused for {provider}: this gateway has a spend limit, and the session names no model to price its responses by: name it in the URL (?model=..., or the deployment of an azure-openai route)"
            ),
            Self::Signed => format!(
                "WebSocket sessions are refused for {provider}: the gateway signs its requests, and a session is not one it can sign"
            ),
        })
    }

    /// The reason of the close frame (1008) that ends an open session the gateway no longer
    /// admits after a reload (at most 123 bytes).
    fn reason(self) -> &'static str {
        match self {
            Self::Checked => "the gateway's DLP or guardrails now check requests or responses",
            Self::Unreadable => {
                "the gateway now has usage limits and cannot read this session's usage"
            }
            Self::NoModel => "the gateway now has a spend limit and this session names no model",
            Self::Signed => "the gateway now signs this provider's requests",
        }
    }
}

/// Counts a session as open until dropped.
struct OpenSession(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

type Failure = (Option<Arc<str>>, GatewayError);

/// Whether a request asks to switch to the WebSocket protocol (RFC 6455 §4.1: a `GET` with
/// `Upgrade: websocket` and `Connection: Upgrade`, tokens in any case).
pub fn is_upgrade(parts: &http::request::Parts) -> bool {
    parts.method == Method::GET
        && has_token(&parts.headers, header::UPGRADE, "websocket")
        && has_token(&parts.headers, header::CONNECTION, "upgrade")
}

/// The provider path of an upgrade: Cloudflare's `/openai?model=...` is OpenAI's `realtime`.
pub fn upstream_rest<'r>(provider: &Provider, rest: &'r str) -> &'r str {
    if rest.is_empty() && &*provider.id == "openai" {
        "realtime"
    } else {
        rest
    }
}

/// What a session needs from the provider route, as [`crate::proxy`] worked it out.
pub(crate) struct Upgrade<'a> {
    pub provider: &'a Provider,
    pub route: &'a ProviderRoute<'a>,
    pub uri: http::Uri,
    pub key: KeyChoice<'a>,
    /// The stored credential `key` is, if any: the session ends when it is removed or rotated.
    pub held: Option<HeldKey>,
    pub timeout: Duration,
    pub start: Instant,
}

/// Serves an upgrade request (see the module docs).
pub(crate) async fn serve(
    gw: &Gateway,
    snap: &Arc<Snapshot>,
    parts: &http::request::Parts,
    up: Upgrade<'_>,
    opts: &LogOptions<'_>,
) -> Result<Response<ProxyBody>, Failure> {
    let provider = up.provider;
    let fail = |e: GatewayError| (Some(provider.id.clone()), e);
    // The deployment decides an Azure OpenAI session's model, as it does for HTTP requests.
    let query = parts.uri.query().unwrap_or_default();
    let model = provider
        .deployment(up.route.rest)
        .map(str::to_owned)
        .or_else(|| query_value(query, "model"))
        .or_else(|| query_value(query, "deployment"))
        .and_then(|m| crate::cost::ModelName::named(&m));
    let transcription = query_value(query, "intent").as_deref() == Some("transcription");
    if let Some(refusal) = Refusal::of(snap, provider, model.is_some() || transcription) {
        return Err(fail(refusal.error(&provider.id)));
    }
    let Some(client_side) = parts.extensions.get::<OnUpgrade>().cloned() else {
        return Err(fail(GatewayError::WebSocketRefused(
            "a WebSocket upgrade needs HTTP/1.1".into(),
        )));
    };
    let stored_key = matches!(up.key, KeyChoice::Stored(_));
    let mut request = crate::proxy::build_upstream_request(
        provider,
        &Method::GET,
        &parts.headers,
        up.uri,
        up.key,
        Bytes::new(),
        false,
    );
    let headers = request.headers_mut();
    let protocols = upstream_subprotocols(headers, stored_key, &snap.keys);
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if let Some(protocols) = protocols {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocols);
    }
    // Hop-by-hop, so not forwarded as they came: the upgrade is asked for again on the
    // gateway's own connection to the provider, without compression (see the module docs).
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    headers.remove(header::ACCEPT_ENCODING);
    let upstream = gw
        .attempt(request, up.timeout, snap.request_timeout)
        .await
        .map_err(fail)?;
    let (mut head, body) = upstream.into_parts();
    // The provider's own `cf-aig-*` and hop-by-hop headers go; the gateway's are added after.
    let upstream_side = head.extensions.remove::<OnUpgrade>();
    let (connection, upgrade) = (
        head.headers.get(header::CONNECTION).cloned(),
        head.headers.get(header::UPGRADE).cloned(),
    );
    // With them the headers `Connection` names (read before it goes).
    crate::headers::strip_response_headers(&mut head.headers);
    let log_id =
        crate::proxy::tag_response(&mut head.headers, parts.headers.get("cf-aig-event-id"));
    let mut record = RequestRecord::new(
        gw.metrics.clone(),
        provider.id.clone(),
        Method::GET,
        up.route.rest,
        head.status.as_u16(),
        up.start,
        opts,
        log_id,
    );
    if let Some(m) = &model {
        record.set_model(m.clone(), &snap.pricing);
    }
    let tally = gw.tally(snap);
    record.set_tally(tally.clone());
    let admitted = Admitted {
        provider: provider.id.clone(),
        token: TokenPrint::presented(snap, &parts.headers),
        model,
        transcription,
        ledger: gw.ledger.clone(),
        pricing: snap.pricing.clone(),
    };
    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        // The provider's answer (an error, most likely) goes through as it is.
        let body = crate::proxy::answer_body(body, true, None, record, None);
        return Ok(Response::from_parts(head, body));
    }
    let Some(upstream_side) = upstream_side else {
        return Err(fail(GatewayError::UpstreamUnavailable(
            "the provider switched protocols on a connection that cannot be handed over".into(),
        )));
    };
    // The provider's handshake answer (its `Sec-WebSocket-Accept` answers the client's key).
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.insert(
        header::CONNECTION,
        connection.unwrap_or(HeaderValue::from_static("upgrade")),
    );
    head.headers.insert(
        header::UPGRADE,
        upgrade.unwrap_or(HeaderValue::from_static("websocket")),
    );
    let answer = Response::from_parts(head, ProxyBody::full(Bytes::new()));
    let session = Session {
        record,
        tally,
        metrics: gw.metrics.clone(),
        held: up.held,
        admitted,
        watches: gw.sessions.join(),
    };
    session.warn_unpriced();
    let provider_id = provider.id.clone();
    // The client's side switches once this answer is written; the session runs on its own,
    // counted in `gw.sessions`; its lines name the request's log id.
    let relay = async move {
        let (client, upstream) = tokio::join!(client_side, upstream_side);
        let (client, upstream) = match (client, upstream) {
            (Ok(c), Ok(u)) => (TokioIo::new(c), TokioIo::new(u)),
            (c, u) => {
                let e = c.err().or(u.err()).map(|e| e.to_string());
                tracing::debug!(provider = %provider_id, error = ?e, "websocket upgrade did not complete");
                session.record.finish_upstream_error();
                return;
            }
        };
        run(client, upstream, session).await;
    };
    match crate::log_id::current() {
        Some(log_id) => tokio::spawn(crate::log_id::scope(log_id, relay)),
        None => tokio::spawn(relay),
    };
    Ok(answer)
}

/// An open session's bookkeeping.
struct Session {
    record: RequestRecord,
    /// The usage limits its responses are charged to as they complete.
    tally: Option<crate::budget::Tally>,
    metrics: Arc<crate::telemetry::Metrics>,
    /// The stored credential it was opened with, if any.
    held: Option<HeldKey>,
    /// What it was admitted with, checked again at each reload.
    admitted: Admitted,
    watches: Watches,
}

/// What a session was admitted with.
struct Admitted {
    provider: Arc<str>,
    /// The gateway token (when authentication was on).
    token: Option<TokenPrint>,
    /// The model its responses are priced at.
    model: Option<crate::cost::ModelName>,
    /// The URL asked for a transcription session (`?intent=transcription`).
    transcription: bool,
    /// This pod's counters, kept across reloads: a reload's limits are charged to them.
    ledger: Arc<crate::budget::Ledger>,
    /// The prices of the config serving, for its transcriptions.
    pricing: crate::cost::Pricing,
}

/// Usage read from a session's events.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Used {
    /// A response's tokens (`response.done`), priced at the session's model: of the input,
    /// `cached` read from the prompt cache (`input_token_details.cached_tokens`, at the cache
    /// rate), `cached_audio` and `cached_image` of those (`cached_tokens_details.audio_tokens`,
    /// `.image_tokens`), `audio` and `image` tokens not read from it (`audio_tokens`,
    /// `image_tokens` less their cached ones); of the output, `audio_out`
    /// (`output_token_details.audio_tokens`). Audio and images are priced at their own rates,
    /// cached or not.
    Response {
        input: u64,
        output: u64,
        cached: u64,
        cached_audio: u64,
        cached_image: u64,
        audio: u64,
        image: u64,
        audio_out: u64,
    },
    /// An input audio transcription's tokens, priced at the transcription model (`None`: the
    /// session never named it).
    Transcription {
        input: u64,
        /// Of the input, the audio (`input_token_details.audio_tokens`; all of it when the
        /// usage does not say), priced at the model's audio rate.
        audio: u64,
        output: u64,
        model: Option<String>,
    },
    /// An input audio transcription that reported no tokens (billed by its audio's duration).
    Untokened { model: Option<String> },
}

impl Session {
    /// Resolves when the session must end, with the close code and reason: every session ends,
    /// or a reload no longer admits it (see the module docs).
    async fn ended(&mut self) -> (u16, &'static str) {
        loop {
            tokio::select! {
                _ = self.watches.ending.changed() => return (1001, "the gateway is stopping"),
                Ok(()) = self.watches.serving.changed() => {
                    let serving = self.watches.serving.borrow_and_update().clone();
                    // Done before any wait, so that a reload is taken in whole even when this
                    // future is dropped (a frame came) during the check below.
                    if let Some(end) = self.readmit(serving.as_deref()) {
                        return end;
                    }
                    if let Some(t) = &self.tally
                        && t.check(&self.metrics).await.is_err()
                    {
                        return (1008, "usage limit reached");
                    }
                }
            }
        }
    }

    /// Admits the session again under `serving` (none: the config was taken away), and charges
    /// it from now on to its limits at its prices; the close code and reason when it is not.
    fn readmit(&mut self, serving: Option<&Snapshot>) -> Option<(u16, &'static str)> {
        let Some(snap) = serving else {
            // The gateway ends every session then; a stored key is gone at once.
            return self.held.is_some().then_some((1001, KEY_GONE));
        };
        if self
            .held
            .as_ref()
            .is_some_and(|h| !h.still_held(Some(snap)))
        {
            return Some((1001, KEY_GONE));
        }
        let a = &self.admitted;
        let Some(provider) = snap.providers.get(&a.provider) else {
            return Some((1001, "the provider of this session is no longer configured"));
        };
        if snap.auth_required && !a.token.is_some_and(|t| t.held_by(&snap.keys)) {
            return Some((1008, "the gateway token of this session is no longer valid"));
        }
        if let Some(refusal) = Refusal::of(snap, provider, a.model.is_some() || a.transcription) {
            return Some((1008, refusal.reason()));
        }
        self.tally = snap.budgets.map(|settings| crate::budget::Tally {
            ledger: a.ledger.clone(),
            settings,
            shared: snap.shared.clone(),
        });
        self.record.set_tally(self.tally.clone());
        if let Some(m) = &a.model {
            self.record.set_model(m.clone(), &snap.pricing);
        }
        self.admitted.pricing = snap.pricing.clone();
        self.warn_unpriced();
        None
    }

    /// Warns, under a spend limit, that the session's model has no price (once per model, as
    /// for HTTP answers): its responses will not be charged.
    fn warn_unpriced(&self) {
        let a = &self.admitted;
        if let (Some(t), Some(m)) = (&self.tally, &a.model)
            && a.pricing.lookup(m.as_str()).is_none()
        {
            t.uncharged(
                &a.provider,
                m.as_str(),
                true,
                crate::log_id::current().as_deref(),
            );
        }
    }

    /// Charges what an event reported to the record and the usage limits.
    fn charge(&mut self, used: Used) {
        let a = &self.admitted;
        match used {
            Used::Response {
                input,
                output,
                cached,
                cached_audio,
                cached_image,
                audio,
                image,
                audio_out,
            } => {
                self.record.charge_part(crate::usage::Tokens {
                    cache_read: cached,
                    audio_cache_read: cached_audio,
                    image_cache_read: cached_image,
                    audio_input: audio,
                    image_input: image,
                    audio_output: audio_out,
                    ..crate::usage::Tokens::plain(Some(input), Some(output))
                });
                if let Some(t) = &self.tally
                    && a.model.is_none()
                {
                    t.uncharged(
                        &a.provider,
                        UNNAMED_MODEL,
                        true,
                        crate::log_id::current().as_deref(),
                    );
                }
            }
            Used::Transcription {
                input,
                audio,
                output,
                model,
            } => {
                let Some(t) = &self.tally else {
                    return;
                };
                let tokens = crate::usage::Tokens {
                    audio_input: audio,
                    ..crate::usage::Tokens::plain(Some(input), Some(output))
                };
                let price = model.as_deref().and_then(|m| a.pricing.lookup(m));
                let cost = crate::cost::cost(price, None, &tokens);
                t.add(&self.metrics, cost, tokens.totals());
                if cost.is_none() {
                    let model = model.as_deref().unwrap_or(UNNAMED_TRANSCRIPTION_MODEL);
                    t.uncharged(
                        &a.provider,
                        model,
                        true,
                        crate::log_id::current().as_deref(),
                    );
                }
            }
            Used::Untokened { model } => {
                if let Some(t) = &self.tally {
                    let model = model.as_deref().unwrap_or(UNNAMED_TRANSCRIPTION_MODEL);
                    t.uncharged(
                        &a.provider,
                        model,
                        false,
                        crate::log_id::current().as_deref(),
                    );
                }
            }
        }
    }
}

/// The subprotocol a browser puts its OpenAI key in (it cannot set headers):
/// `openai-insecure-api-key.<key>`.
const KEY_SUBPROTOCOL: &str = "openai-insecure-api-key.";

/// The client's subprotocols as the provider gets them: a key in them goes only where the
/// client's own key is used (a stored key replaces the client's, as its headers are), and a
/// gateway token never.
fn upstream_subprotocols(
    headers: &HeaderMap,
    stored_key: bool,
    keys: &crate::keys::KeyStore,
) -> Option<HeaderValue> {
    let mut kept = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        // Subprotocol names are tokens (RFC 6455 §4.1): a value that is not text holds none.
        let Ok(list) = value.to_str() else { continue };
        for protocol in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let passes = match protocol.strip_prefix(KEY_SUBPROTOCOL) {
                Some(key) => !stored_key && !keys.is_token(key.as_bytes()),
                None => true,
            };
            if passes {
                kept.push(protocol);
            }
        }
    }
    HeaderValue::from_str(&kept.join(", "))
        .ok()
        .filter(|v| !v.is_empty())
}

/// How the provider-to-client direction of a session ended.
enum End {
    /// The provider closed its side.
    Closed,
    /// Reading from the provider failed.
    Failed(std::io::Error),
    /// Writing to the client failed: it went away.
    ClientGone(std::io::Error),
    /// The usage limits ran out (close code 1008 sent).
    Limit(GatewayError),
    /// The gateway ended the session (close code 1001 sent).
    Ending,
}

/// Copies a session both ways until either side closes it (the other then gets
/// [`CLOSING_GRACE`] to close too), charging the provider's responses as they complete, and
/// finishes its record.
async fn run<C, U>(client: C, upstream: U, mut s: Session)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    // The frames each side sent, for their close frames.
    let (mut from_client, mut from_provider) = (Frames::client_side(), Frames::default());
    let mut client_first = false;
    let (up, down) = {
        let to_provider = async {
            let copied = to_provider(&mut client_rx, &mut upstream_tx, &mut from_client).await;
            // The client closed its side: so does the gateway, towards the provider.
            let _ = upstream_tx.shutdown().await;
            copied
        };
        let to_client = async {
            let end = forward(&mut upstream_rx, &mut client_tx, &mut s, &mut from_provider).await;
            let _ = client_tx.shutdown().await;
            end
        };
        tokio::pin!(to_provider, to_client);
        tokio::select! {
            down = &mut to_client => {
                // The provider's side is over: the client's gets a moment to close, then goes.
                let up = tokio::time::timeout(CLOSING_GRACE, &mut to_provider).await.ok();
                (up, down)
            }
            up = &mut to_provider => {
                client_first = true;
                match tokio::time::timeout(CLOSING_GRACE, &mut to_client).await {
                    Ok(down) => (Some(up), down),
                    Err(_) => (Some(up), End::Closed),
                }
            }
        }
    };
    // Once either side sent its close frame, the session is ending: the client's connection
    // reset then (its socket closed with the provider's answering close frame unread) is part
    // of that, not a failure.
    let closing = from_client.close_seen || from_provider.close_seen;
    let (up, down) = match (up, down) {
        (Some(Err(Failed::Client(_))), down) if closing => (Some(Ok(())), down),
        (up, End::ClientGone(_)) if closing => (up, End::Closed),
        ended => ended,
    };
    // The client's side ended first with no close frame either way: the client went away.
    let client_left = client_first && !closing;
    let record = s.record;
    match (up, down) {
        (_, End::Closed) if client_left => {
            tracing::debug!(
                "websocket session ended: the client dropped the connection without a close frame"
            );
            drop(record);
        }
        (Some(Ok(_)) | None, End::Closed | End::Ending) => record.finish_complete(),
        (_, End::Limit(e)) => {
            tracing::info!(error = %e, log_id = crate::log_id::current().as_deref(), "websocket session closed: usage limit reached");
            record.finish_complete();
        }
        // The client went away: its session is cancelled (the record says so when dropped),
        // not the provider's fault.
        (Some(Err(Failed::Client(e))), _) | (_, End::ClientGone(e)) => {
            tracing::debug!(error = %e, "websocket session ended: the client went away");
            drop(record);
        }
        (up, down) => {
            let up = match up {
                Some(Err(Failed::Provider(e) | Failed::Client(e))) => Some(e),
                _ => None,
            };
            let down = match down {
                End::Failed(e) => Some(e),
                _ => None,
            };
            tracing::debug!(to_provider = ?up, from_provider = ?down, "websocket session ended with an error");
            record.finish_upstream_error();
        }
    }
}

/// Which side of a copy failed.
#[derive(Debug)]
enum Failed {
    /// Reading from the client.
    Client(std::io::Error),
    /// Writing to the provider.
    Provider(std::io::Error),
}

/// Copies what the client sends to the provider until the client closes its side, following
/// its `frames` (a client that just drops the connection sends no close frame).
async fn to_provider<R, W>(
    client: &mut R,
    upstream: &mut W,
    frames: &mut Frames,
) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = client.read(&mut buf).await.map_err(Failed::Client)?;
        if n == 0 {
            return Ok(());
        }
        frames.feed(&buf[..n]);
        upstream
            .write_all(&buf[..n])
            .await
            .map_err(Failed::Provider)?;
        // Nothing may follow a close frame (RFC 6455 §5.5.1): the client's side is over, and
        // the provider has the grace to answer it.
        if frames.close_seen {
            return Ok(());
        }
    }
}

/// Copies what the provider sends to the client, charging each `response.done` and input audio
/// transcription, until the
/// provider closes, a copy fails, the usage limits run out or the gateway ends the session.
async fn forward<R, W>(
    upstream: &mut R,
    client: &mut W,
    s: &mut Session,
    frames: &mut Frames,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = tokio::select! {
            read = upstream.read(&mut buf) => match read {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e) => return End::Failed(e),
            },
            (code, why) = s.ended() => {
                tracing::info!(reason = why, code, log_id = crate::log_id::current().as_deref(), "websocket session ended by the gateway");
                close(client, frames, code, why).await;
                return End::Ending;
            }
        };
        frames.feed(&buf[..n]);
        tokio::select! {
            written = client.write_all(&buf[..n]) => if let Err(e) = written {
                return End::ClientGone(e);
            },
            _ = s.ended() => return End::Ending,
        }
        s.record.add_bytes(n as u64);
        let used = frames.take_used();
        if !used.is_empty() {
            for u in used {
                s.charge(u);
            }
            if let Some(t) = &s.tally
                && let Err(e) = t.check(&s.metrics).await
            {
                close(client, frames, 1008, "usage limit reached").await;
                return End::Limit(e);
            }
        }
    }
}

/// Sends the client a close frame (RFC 6455 §5.5.1) with `code` and `reason`, when the bytes
/// copied so far end on a frame boundary (else the connection is closed without one).
async fn close<W: AsyncWrite + Unpin>(client: &mut W, frames: &Frames, code: u16, reason: &str) {
    if !frames.at_boundary() {
        return;
    }
    let frame = close_frame(code, reason);
    let _ = tokio::time::timeout(CLOSING_GRACE, client.write_all(&frame)).await;
}

/// A server's close frame with `code` and `reason` (cut to the 123 bytes a control frame's
/// payload has room for, at a character boundary).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    server_frame(CLOSE, &payload)
}

/// Opcodes (RFC 6455 §5.2).
const CONTINUATION: u8 = 0;
const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

/// A whole frame (`FIN` set) as a server sends it: unmasked.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// A text message as a server sends it, in one frame: `text` is UTF-8.
pub(crate) fn text_frame(text: &[u8]) -> Vec<u8> {
    server_frame(TEXT, text)
}

/// The pong that answers a ping with `payload`.
pub(crate) fn pong_frame(payload: &[u8]) -> Vec<u8> {
    server_frame(PONG, payload)
}

/// Whether `frame` (one of [`server_frame`]'s) is a close frame.
pub(crate) fn is_close_frame(frame: &[u8]) -> bool {
    frame.first() == Some(&(0x80 | CLOSE))
}

/// A frame's header (RFC 6455 §5.2).
struct FrameHead {
    fin: bool,
    /// The `RSV1-3` bits, which no extension the gateway speaks sets.
    rsv: u8,
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
}

impl FrameHead {
    /// The length of a header whose second byte is `second`: 2 bytes, then 2 or 8 of length,
    /// then 4 of mask when masked.
    fn len_of(second: u8) -> usize {
        let masked = if second & 0x80 != 0 { 4 } else { 0 };
        match second & 0x7f {
            126 => 4 + masked,
            127 => 10 + masked,
            _ => 2 + masked,
        }
    }

    /// A whole header (`h` of [`Self::len_of`] bytes).
    fn parse(h: &[u8]) -> Self {
        let (first, second) = (h[0], h[1]);
        let (len, rest) = match second & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), &h[4..]),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                &h[10..],
            ),
            n => (u64::from(n), &h[2..]),
        };
        Self {
            fin: first & 0x80 != 0,
            rsv: first & 0x70,
            opcode: first & 0x0f,
            len,
            mask: (second & 0x80 != 0).then(|| [rest[0], rest[1], rest[2], rest[3]]),
        }
    }
}

/// Unmasks `data`, the payload bytes of a frame masked with `key` from offset `at` on.
fn unmask(data: &mut [u8], key: [u8; 4], at: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(at + i) % 4];
    }
}

/// The `Sec-WebSocket-Accept` that answers a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2), for
/// a session the gateway serves itself.
pub(crate) fn accept_key(key: &HeaderValue) -> HeaderValue {
    use base64::Engine as _;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finish());
    // Base64 is visible ASCII.
    HeaderValue::from_str(&accept).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Sec-WebSocket-Key` of an upgrade the gateway answers itself, checked as RFC 6455 §4.2.1
/// asks: version 13, and a key of 16 bytes in base64.
pub(crate) fn client_key(headers: &HeaderMap) -> Result<&HeaderValue, GatewayError> {
    use base64::Engine as _;
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(GatewayError::WebSocketRefused(
            "a WebSocket upgrade needs Sec-WebSocket-Version: 13".into(),
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or_else(|| {
            GatewayError::WebSocketRefused(
                "a WebSocket upgrade needs a Sec-WebSocket-Key of 16 bytes in base64".into(),
            )
        })
}

/// What a client sent, as [`MessageReader`] reads it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A whole data message, its fragments joined and unmasked (`text`: a text message, whose
    /// bytes are UTF-8).
    Message { text: bool, data: Vec<u8> },
    /// A ping, with its payload for the pong.
    Ping(Vec<u8>),
    /// A close frame, with its status code if it had one.
    Close(Option<u16>),
}

/// Why a client's session ends while its frames are read: its connection failed, or it broke
/// the protocol (the close code and reason it gets, RFC 6455 §7.4.1).
#[derive(Debug)]
pub(crate) enum ReadFailure {
    Io(std::io::Error),
    Violation { code: u16, reason: &'static str },
}

impl From<std::io::Error> for ReadFailure {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

fn violation(code: u16, reason: &'static str) -> ReadFailure {
    ReadFailure::Violation { code, reason }
}

/// Reads the messages a client sends to a session the gateway serves itself (RFC 6455 §5):
/// masked frames, a message's fragments joined up to `max` bytes (a longer one ends the session
/// with close code 1009), control frames between them; pongs are skipped.
pub(crate) struct MessageReader<R> {
    io: R,
    max: usize,
    /// The message whose fragments are being joined: text or not, and its bytes so far.
    partial: Option<(bool, Vec<u8>)>,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub(crate) fn new(io: R, max: usize) -> Self {
        Self {
            io,
            max,
            partial: None,
        }
    }

    /// The next message, ping or close; `None` once the client closed the connection between
    /// frames. Not cancel-safe: a frame read halfway is lost.
    pub(crate) async fn next(&mut self) -> Result<Option<Incoming>, ReadFailure> {
        loop {
            let mut h = [0u8; 14];
            match self.io.read_exact(&mut h[..2]).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let len = FrameHead::len_of(h[1]);
            self.io.read_exact(&mut h[2..len]).await?;
            let head = FrameHead::parse(&h[..len]);
            let Some(key) = head.mask else {
                return Err(violation(1002, "a client's frames are masked"));
            };
            if head.rsv != 0 {
                return Err(violation(1002, "no extension was agreed"));
            }
            let control = head.opcode >= CLOSE;
            if control && (!head.fin || head.len > 125) {
                return Err(violation(
                    1002,
                    "a control frame is whole and at most 125 bytes",
                ));
            }
            let joined = self.partial.as_ref().map_or(0, |(_, d)| d.len());
            if !control && joined as u64 + head.len > self.max as u64 {
                return Err(violation(1009, "message too big"));
            }
            // At most `max`, or 125 bytes; grown as the bytes come, not as the header says.
            let mut payload = Vec::new();
            (&mut self.io)
                .take(head.len)
                .read_to_end(&mut payload)
                .await?;
            if payload.len() as u64 != head.len {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            unmask(&mut payload, key, 0);
            match head.opcode {
                PING => return Ok(Some(Incoming::Ping(payload))),
                PONG => continue,
                CLOSE => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(Some(Incoming::Close(code)));
                }
                TEXT | BINARY if self.partial.is_none() => {
                    self.partial = Some((head.opcode == TEXT, payload));
                }
                CONTINUATION => match &mut self.partial {
                    Some((_, data)) => data.extend_from_slice(&payload),
                    None => return Err(violation(1002, "a continuation frame with no message")),
                },
                TEXT | BINARY => {
                    return Err(violation(1002, "a new message before the last one ended"));
                }
                _ => return Err(violation(1002, "unknown opcode")),
            }
            if head.fin
                && let Some((text, data)) = self.partial.take()
            {
                if text && std::str::from_utf8(&data).is_err() {
                    return Err(violation(1007, "a text message is UTF-8"));
                }
                return Ok(Some(Incoming::Message { text, data }));
            }
        }
    }
}

/// The value of `name` in a URL query (percent-decoding only what model names use).
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            v.replace("%3A", ":")
                .replace("%3a", ":")
                .replace("%40", "@")
        })
    })
}

/// Reads the WebSocket frames a provider sends (RFC 6455 §5.2) as they pass, for the token
/// counts of its `response.done` and transcription messages (and the transcription model its
/// session messages name). Frames from a server are unmasked, but a masked one is
/// read too; messages over [`MAX_READ_MESSAGE`] are skipped.
#[derive(Default)]
struct Frames {
    /// The bytes of a frame header read so far (while not in a payload).
    header: Vec<u8>,
    /// In a frame's payload, with this many bytes still to come.
    in_payload: bool,
    left: u64,
    /// The current frame's masking key and how far into its payload it is.
    mask: Option<([u8; 4], usize)>,
    /// The current frame ends its message.
    fin: bool,
    /// The text message being gathered (`None` when the current message is not read).
    message: Option<Vec<u8>>,
    /// The current frame belongs to the text message being gathered.
    reading: bool,
    /// The first [`PEEK`] bytes of the message were looked at.
    peeked: bool,
    /// Usage read since [`Self::take_used`], in the order it came.
    used: Vec<Used>,
    /// The input audio transcription model the session's last configuration named.
    transcription_model: Option<String>,
    /// Only frames are followed, no message read (the client's side of a session).
    frames_only: bool,
    /// The current frame's opcode.
    opcode: u8,
    /// A whole close frame passed.
    close_seen: bool,
}

impl Frames {
    /// Follows the frames of the client's side, for the close frame that ends it cleanly.
    fn client_side() -> Self {
        Self {
            frames_only: true,
            ..Self::default()
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if !self.in_payload {
                // A header: 2 bytes, then 2 or 8 of length, then 4 of mask when masked.
                let take = (self.header_len() - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() == self.header_len() {
                    self.start_frame();
                }
                continue;
            }
            let n = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(data.len());
            if self.reading {
                self.gather(&data[..n]);
            }
            self.left -= n as u64;
            data = &data[n..];
            if self.left == 0 {
                self.end_frame();
            }
        }
    }

    /// Length of the current header, as far as its first two bytes tell.
    fn header_len(&self) -> usize {
        self.header
            .get(1)
            .map_or(2, |&second| FrameHead::len_of(second))
    }

    fn start_frame(&mut self) {
        let h = std::mem::take(&mut self.header);
        let FrameHead {
            fin,
            opcode,
            len,
            mask,
            ..
        } = FrameHead::parse(&h);
        self.mask = mask.map(|key| (key, 0));
        self.fin = fin;
        self.opcode = opcode;
        // Control frames (opcode 8 and up: close, ping, pong) may come between the frames of a
        // message and leave it as it is.
        self.reading = !self.frames_only
            && match opcode {
                TEXT => {
                    self.message = Some(Vec::new());
                    self.peeked = false;
                    true
                }
                CONTINUATION => self.message.is_some(),
                BINARY..=7 => {
                    self.message = None;
                    false
                }
                _ => false,
            };
        self.left = len;
        self.in_payload = true;
        if len == 0 {
            self.end_frame();
        }
    }

    /// Adds payload bytes of the current frame to the message being gathered.
    fn gather(&mut self, data: &[u8]) {
        let Some(m) = &mut self.message else {
            return;
        };
        if m.len() + data.len() > MAX_READ_MESSAGE {
            self.message = None;
            return;
        }
        let from = m.len();
        m.extend_from_slice(data);
        if let Some((key, at)) = &mut self.mask {
            unmask(&mut m[from..], *key, *at);
            *at += data.len();
        }
        if !self.peeked && m.len() >= PEEK {
            self.peeked = true;
            if !names_read_event(&m[..PEEK]) {
                self.message = None;
            }
        }
    }

    fn end_frame(&mut self) {
        self.close_seen |= self.opcode == CLOSE;
        if self.reading
            && self.fin
            && let Some(m) = self.message.take()
        {
            self.read_message(&m);
        }
        self.reading = false;
        self.in_payload = false;
        self.mask = None;
    }

    /// Adds the usage of a `response.done` or transcription message, or notes the
    /// transcription model a session message names.
    fn read_message(&mut self, m: &[u8]) {
        if !names_read_event(m) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(m) else {
            return;
        };
        let tokens = |usage: &serde_json::Value| {
            let count = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
            count("input_tokens").map(|i| (i, count("output_tokens").unwrap_or(0)))
        };
        match v.get("type").and_then(|t| t.as_str()) {
            Some("response.done") => {
                let usage = v.pointer("/response/usage");
                let count = |k: &str| usage?.get(k).and_then(serde_json::Value::as_u64);
                if let (Some(input), Some(output)) = (count("input_tokens"), count("output_tokens"))
                {
                    let at = |path: &str| {
                        usage
                            .and_then(|u| u.pointer(path))
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(0)
                    };
                    let cached = at("/input_token_details/cached_tokens").min(input);
                    // Of the input not read from the cache: its audio, then its images.
                    let fresh = input - cached;
                    let cached_audio =
                        at("/input_token_details/cached_tokens_details/audio_tokens").min(cached);
                    let cached_image =
                        at("/input_token_details/cached_tokens_details/image_tokens");
                    let audio = at("/input_token_details/audio_tokens")
                        .saturating_sub(cached_audio)
                        .min(fresh);
                    let image = at("/input_token_details/image_tokens")
                        .saturating_sub(cached_image)
                        .min(fresh - audio);
                    self.used.push(Used::Response {
                        input,
                        output,
                        cached,
                        cached_audio,
                        cached_image: cached_image.min(cached - cached_audio),
                        audio,
                        image,
                        audio_out: at("/output_token_details/audio_tokens").min(output),
                    });
                }
            }
            Some("conversation.item.input_audio_transcription.completed") => {
                let model = self.transcription_model.clone();
                self.used.push(match v.get("usage").and_then(tokens) {
                    Some((input, output)) => Used::Transcription {
                        input,
                        audio: v
                            .pointer("/usage/input_token_details/audio_tokens")
                            .and_then(serde_json::Value::as_u64)
                            .map_or(input, |a| a.min(input)),
                        output,
                        model,
                    },
                    None => Used::Untokened { model },
                });
            }
            Some(
                "session.created"
                | "session.updated"
                | "transcription_session.created"
                | "transcription_session.updated",
            ) => {
                let named = [
                    "/session/audio/input/transcription",
                    "/session/input_audio_transcription",
                ]
                .iter()
                .find_map(|p| v.pointer(p));
                if let Some(t) = named {
                    self.transcription_model =
                        t.get("model").and_then(|m| m.as_str()).map(str::to_owned);
                }
            }
            _ => {}
        }
    }

    /// The usage read since the last call.
    fn take_used(&mut self) -> Vec<Used> {
        std::mem::take(&mut self.used)
    }

    /// Whether the bytes fed so far end where a frame ends.
    fn at_boundary(&self) -> bool {
        !self.in_payload && self.header.is_empty()
    }
}

/// Whether `m` names an event read for usage ([`READ_EVENTS`]).
fn names_read_event(m: &[u8]) -> bool {
    READ_EVENTS
        .iter()
        .any(|name| memchr::memmem::find(m, name).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_the_subprotocols_go_upstream_only_with_the_clients_own_key_and_tokens_never() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("authentication.tokens"), "gw-token\n").expect("tokens");
        let keys = crate::keys::KeyStore::load(dir.path()).expect("keys");
        let mut headers = HeaderMap::new();
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime, openai-insecure-api-key.sk-own"),
        );
        headers.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.gw-token,openai-beta.realtime-v1"),
        );
        let got = |stored| upstream_subprotocols(&headers, stored, &keys);
        assert_eq!(
            got(true).expect("kept"),
            "realtime, openai-beta.realtime-v1"
        );
        assert_eq!(
            got(false).expect("kept"),
            "realtime, openai-insecure-api-key.sk-own, openai-beta.realtime-v1"
        );
        let mut only_key = HeaderMap::new();
        only_key.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.sk-own"),
        );
        assert_eq!(upstream_subprotocols(&only_key, true, &keys), None);
    }

    /// A frame as a server sends it (unmasked), or masked with `mask`.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                f.extend_from_slice(&key);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    impl Frames {
        /// The tokens of the `response.done` messages read since the last call, summed, when
        /// there were any (and no other usage was read).
        fn take_responses(&mut self) -> Option<(u64, u64)> {
            let used = self.take_used();
            let mut sum = None;
            for u in used {
                let Used::Response { input, output, .. } = u else {
                    panic!("not a response: {u:?}");
                };
                let (i, o) = sum.unwrap_or((0, 0));
                sum = Some((i + input, o + output));
            }
            sum
        }
    }

    /// A `response.done` event as OpenAI sends it (`event_id` and `type` first).
    fn done(input: u64, output: u64, pad: usize) -> Vec<u8> {
        format!(
            r#"{{"event_id":"ev1","type":"response.done","response":{{"id":"resp1","status":"completed","output":[{{"text":"{}"}}],"usage":{{"total_tokens":{},"input_tokens":{input},"output_tokens":{output}}}}}}}"#,
            "x".repeat(pad),
            input + output
        )
        .into_bytes()
    }

    #[test]
    fn token_counts_are_read_from_response_done_messages_however_the_bytes_arrive() {
        let mut stream = Vec::new();
        stream.extend(frame(true, 1, br#"{"type":"session.created"}"#, None));
        stream.extend(frame(true, 2, &[0u8; 300], None)); // binary, 16-bit length
        stream.extend(frame(true, 1, &done(10, 4, 0), None));
        // A fragmented message with a ping between its frames, 64-bit length in the middle.
        let big = done(100, 40, 70_000);
        let (a, b) = big.split_at(20);
        stream.extend(frame(false, 1, a, None));
        stream.extend(frame(true, 9, b"ping", None));
        stream.extend(frame(true, 0, b, None));
        // A masked one (a server must not mask, but it is read all the same).
        stream.extend(frame(true, 1, &done(1, 2, 3), Some([1, 2, 3, 4])));
        // An event that only mentions the name is not one.
        stream.extend(frame(true, 1, br#"{"type":"x","note":"response.done","response":{"usage":{"input_tokens":9,"output_tokens":9}}}"#, None));
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut f = Frames::default();
            for piece in stream.chunks(chunk) {
                f.feed(piece);
            }
            assert_eq!(
                f.take_responses(),
                Some((111, 46)),
                "fed {chunk} bytes at a time"
            );
            assert_eq!(f.take_responses(), None, "taken once");
            assert!(f.at_boundary());
            assert!(!f.in_payload && f.header.is_empty());
        }
        let mut none = Frames::default();
        none.feed(&frame(true, 1, br#"{"type":"session.created"}"#, None));
        assert_eq!(none.take_responses(), None);
        // A long message whose first bytes name no response.done is not gathered at all.
        let mut audio = Frames::default();
        let delta = format!(
            r#"{{"type":"response.output_audio.delta","delta":"{}","note":"response.done"}}"#,
            "A".repeat(5000)
        );
        audio.feed(&frame(true, 1, delta.as_bytes(), None)[..3000]);
        assert!(audio.message.is_none() && !audio.at_boundary());
    }

    #[test]
    fn messages_over_the_read_limit_are_passed_unread() {
        let mut f = Frames::default();
        f.feed(&frame(true, 1, &done(5, 5, MAX_READ_MESSAGE), None));
        assert_eq!(f.take_responses(), None);
        // The next one is read again.
        f.feed(&frame(true, 1, &done(5, 5, 0), None));
        assert_eq!(f.take_responses(), Some((5, 5)));
    }

    #[test]
    fn upgrade_requests_and_query_values_are_recognised() {
        let req = |method: Method, pairs: &[(&'static str, &'static str)]| {
            let mut r = http::Request::builder()
                .method(method)
                .uri("/openai?model=gpt-4o-realtime-preview");
            for (k, v) in pairs {
                r = r.header(*k, *v);
            }
            r.body(()).expect("request").into_parts().0
        };
        assert!(is_upgrade(&req(
            Method::GET,
            &[
                ("upgrade", "WebSocket"),
                ("connection", "keep-alive, Upgrade")
            ]
        )));
        assert!(!is_upgrade(&req(Method::GET, &[("upgrade", "websocket")])));
        assert!(!is_upgrade(&req(
            Method::POST,
            &[("upgrade", "websocket"), ("connection", "upgrade")]
        )));
        assert!(!is_upgrade(&req(
            Method::GET,
            &[("upgrade", "h2c"), ("connection", "upgrade")]
        )));
        assert_eq!(
            query_value("a=1&model=gpt-4o-realtime-preview-2024-12-17", "model").as_deref(),
            Some("gpt-4o-realtime-preview-2024-12-17")
        );
        assert_eq!(
            query_value("model=%40cf%3Ax", "model").as_deref(),
            Some("@cf:x")
        );
        assert_eq!(query_value("models=x", "model"), None);
    }

    #[test]
    fn the_client_side_notes_a_whole_close_frame_and_reads_no_message() {
        let key = Some([1, 2, 3, 4]);
        let mut stream = frame(true, 1, &done(1, 1, 0), key);
        let text = stream.len();
        stream.extend(frame(true, 9, b"ping", key));
        stream.extend(frame(true, 8, &1000u16.to_be_bytes(), key));
        for chunk in [1, 3, stream.len()] {
            let mut f = Frames::client_side();
            for piece in stream[..text].chunks(chunk) {
                f.feed(piece);
            }
            assert!(!f.close_seen);
            // Whole only with its last byte.
            let last = stream.len() - 1;
            for piece in stream[text..last].chunks(chunk) {
                f.feed(piece);
            }
            assert!(!f.close_seen, "fed {chunk} bytes at a time");
            f.feed(&stream[last..]);
            assert!(f.close_seen, "fed {chunk} bytes at a time");
            assert_eq!(f.take_used(), []);
        }
        // The payload of a data frame is no close frame, whatever its bytes.
        let mut f = Frames::client_side();
        f.feed(&frame(true, 2, &[0x88, 0x02, 0x03, 0xe8], key));
        assert!(!f.close_seen);
    }

    #[test]
    fn response_usage_tells_cached_audio_and_image_tokens_apart() {
        let ev = |s: &str| frame(true, 1, s.as_bytes(), None);
        let mut f = Frames::default();
        f.feed(&ev(r#"{"type":"response.done","event_id":"e1","response":{"id":"r1","usage":{"total_tokens":821,"input_tokens":789,"output_tokens":32,"input_token_details":{"text_tokens":303,"audio_tokens":476,"image_tokens":10,"cached_tokens":640,"cached_tokens_details":{"text_tokens":250,"audio_tokens":384,"image_tokens":6}},"output_token_details":{"text_tokens":9,"audio_tokens":23}}}}"#));
        // Counts past their totals are cut to them.
        f.feed(&ev(r#"{"type":"response.done","response":{"usage":{"input_tokens":10,"output_tokens":5,"input_token_details":{"cached_tokens":4,"audio_tokens":50,"image_tokens":50},"output_token_details":{"audio_tokens":9}}}}"#));
        assert_eq!(
            f.take_used(),
            [
                Used::Response {
                    input: 789,
                    output: 32,
                    cached: 640,
                    cached_audio: 384,
                    cached_image: 6,
                    audio: 92,
                    image: 4,
                    audio_out: 23
                },
                Used::Response {
                    input: 10,
                    output: 5,
                    cached: 4,
                    cached_audio: 0,
                    cached_image: 0,
                    audio: 6,
                    image: 0,
                    audio_out: 5
                },
            ]
        );
    }

    #[test]
    fn transcriptions_are_read_with_the_model_the_session_names_at_their_time() {
        let ev = |s: &str| frame(true, 1, s.as_bytes(), None);
        let mut stream = Vec::new();
        // A transcription before any session configuration: its model is not known.
        stream.extend(ev(r#"{"event_id":"e0","type":"conversation.item.input_audio_transcription.completed","item_id":"i0","transcript":"hi","usage":{"type":"tokens","total_tokens":9,"input_tokens":7,"output_tokens":2}}"#));
        // The beta shape names the model under input_audio_transcription.
        stream.extend(ev(r#"{"event_id":"e1","type":"transcription_session.updated","session":{"input_audio_transcription":{"model":"gpt-4o-transcribe","language":"en"}}}"#));
        stream.extend(ev(r#"{"event_id":"e2","type":"conversation.item.input_audio_transcription.completed","item_id":"i1","transcript":"hello","usage":{"type":"tokens","total_tokens":30,"input_tokens":20,"input_token_details":{"text_tokens":5,"audio_tokens":15},"output_tokens":10}}"#));
        // The GA shape names it under audio.input.transcription; whisper-1 bills by duration.
        stream.extend(ev(r#"{"event_id":"e3","type":"session.updated","session":{"type":"realtime","audio":{"input":{"transcription":{"model":"whisper-1"}}}}}"#));
        stream.extend(ev(r#"{"event_id":"e4","type":"conversation.item.input_audio_transcription.completed","item_id":"i2","transcript":"x","usage":{"type":"duration","seconds":3.2}}"#));
        stream.extend(ev(&String::from_utf8(done(4, 5, 0)).expect("utf-8")));
        // A session configuration without transcription clears the model.
        stream.extend(ev(r#"{"event_id":"e5","type":"session.updated","session":{"input_audio_transcription":null}}"#));
        stream.extend(ev(r#"{"event_id":"e6","type":"conversation.item.input_audio_transcription.completed","usage":{"type":"tokens","input_tokens":1,"output_tokens":1}}"#));
        // Deltas and failures carry no usage.
        stream.extend(ev(r#"{"event_id":"e7","type":"conversation.item.input_audio_transcription.delta","delta":"h"}"#));
        for chunk in [1, 5, 64, stream.len()] {
            let mut f = Frames::default();
            let mut used = Vec::new();
            for piece in stream.chunks(chunk) {
                f.feed(piece);
                used.extend(f.take_used());
            }
            let named = |m: &str| Some(m.to_owned());
            assert_eq!(
                used,
                [
                    Used::Transcription {
                        input: 7,
                        audio: 7,
                        output: 2,
                        model: None
                    },
                    Used::Transcription {
                        input: 20,
                        audio: 15,
                        output: 10,
                        model: named("gpt-4o-transcribe")
                    },
                    Used::Untokened {
                        model: named("whisper-1")
                    },
                    Used::Response {
                        input: 4,
                        output: 5,
                        cached: 0,
                        cached_audio: 0,
                        cached_image: 0,
                        audio: 0,
                        image: 0,
                        audio_out: 0
                    },
                    Used::Transcription {
                        input: 1,
                        audio: 1,
                        output: 1,
                        model: None
                    },
                ],
                "fed {chunk} bytes at a time"
            );
        }
    }

    /// The messages a reader (at most `max` bytes a message) reads from `stream`, and how it
    /// ended.
    fn read_all(stream: &[u8], max: usize) -> (Vec<Incoming>, Option<ReadFailure>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut reader = MessageReader::new(stream, max);
            let mut got = Vec::new();
            loop {
                match reader.next().await {
                    Ok(Some(m)) => got.push(m),
                    Ok(None) => return (got, None),
                    Err(e) => return (got, Some(e)),
                }
            }
        })
    }

    fn violated(end: Option<ReadFailure>) -> u16 {
        match end {
            Some(ReadFailure::Violation { code, .. }) => code,
            other => panic!("not a violation: {other:?}"),
        }
    }

    #[test]
    fn a_clients_messages_are_joined_unmasked_with_control_frames_between_their_fragments() {
        let key = Some([9, 8, 7, 6]);
        let mut stream = frame(true, TEXT, b"{\"a\":1}", key);
        stream.extend(frame(false, BINARY, b"par", key));
        stream.extend(frame(true, PING, b"p", key));
        stream.extend(frame(true, PONG, b"ignored", key));
        stream.extend(frame(false, CONTINUATION, b"t o", key));
        stream.extend(frame(true, CONTINUATION, b"f it", key));
        let long = vec![b'x'; 70_000];
        stream.extend(frame(true, TEXT, &long, key));
        stream.extend(frame(true, CLOSE, &1000u16.to_be_bytes(), key));
        let (got, end) = read_all(&stream, 1 << 20);
        assert!(end.is_none(), "{end:?}");
        assert_eq!(
            got,
            [
                Incoming::Message {
                    text: true,
                    data: b"{\"a\":1}".to_vec()
                },
                Incoming::Ping(b"p".to_vec()),
                Incoming::Message {
                    text: false,
                    data: b"part of it".to_vec()
                },
                Incoming::Message {
                    text: true,
                    data: long
                },
                Incoming::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn a_client_breaking_the_protocol_or_the_size_limit_gets_its_close_code() {
        let key = Some([1, 2, 3, 4]);
        // Over the limit, whole or in fragments: 1009 before the payload is read.
        assert_eq!(
            violated(read_all(&frame(true, TEXT, &[b'a'; 11], key), 10).1),
            1009
        );
        let mut parts = frame(false, TEXT, &[b'a'; 6], key);
        parts.extend(frame(true, CONTINUATION, &[b'a'; 6], key));
        assert_eq!(violated(read_all(&parts, 10).1), 1009);
        // Unmasked, a stray continuation, a message inside a message, a long control frame,
        // text that is not UTF-8, an unknown opcode: 1002 (1007 for the text).
        assert_eq!(
            violated(read_all(&frame(true, TEXT, b"hi", None), 10).1),
            1002
        );
        assert_eq!(
            violated(read_all(&frame(true, CONTINUATION, b"hi", key), 10).1),
            1002
        );
        let mut nested = frame(false, TEXT, b"a", key);
        nested.extend(frame(true, TEXT, b"b", key));
        assert_eq!(violated(read_all(&nested, 10).1), 1002);
        assert_eq!(
            violated(read_all(&frame(true, PING, &[0; 126], key), 1000).1),
            1002
        );
        assert_eq!(
            violated(read_all(&frame(true, TEXT, &[0xff, 0xfe], key), 10).1),
            1007
        );
        assert_eq!(violated(read_all(&frame(true, 3, b"x", key), 10).1), 1002);
        // A connection that ends mid-frame is a failed connection, not a clean end.
        let cut = frame(true, TEXT, b"hello", key);
        let (got, end) = read_all(&cut[..cut.len() - 1], 10);
        assert!(
            got.is_empty() && matches!(end, Some(ReadFailure::Io(_))),
            "{end:?}"
        );
    }

    #[test]
    fn the_handshake_answers_rfc_6455s_example_and_checks_what_the_client_sent() {
        // RFC 6455 §1.3.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept_key(&key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut headers = HeaderMap::new();
        headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
        assert!(client_key(&headers).is_err(), "no version");
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert_eq!(client_key(&headers).expect("valid"), &key);
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert!(client_key(&headers).is_err(), "not 16 bytes");
        // Server frames are unmasked, with the length in as many bytes as it needs.
        assert_eq!(text_frame(b"hi"), [0x81, 2, b'h', b'i']);
        assert_eq!(&text_frame(&[b'a'; 300])[..4], [0x81, 126, 1, 44]);
        assert_eq!(
            &text_frame(&[b'a'; 70_000])[..10],
            [0x81, 127, 0, 0, 0, 0, 0, 1, 17, 112]
        );
        let close = close_frame(1001, &"é".repeat(100));
        // Cut to 123 bytes of reason at a character boundary.
        assert_eq!(
            (close[0], close[1], &close[2..4]),
            (0x88, 124, &[3, 233][..])
        );
        assert!(is_close_frame(&close) && !is_close_frame(&pong_frame(b"x")));
    }

    #[test]
    fn gateway_tokens_are_kept_as_salted_hashes_and_checked_against_the_held_ones() {
        let a = TokenPrint::of(b"gw-token-a");
        assert_eq!(a.0, TokenPrint::of(b"gw-token-a").0);
        assert_ne!(a.0, TokenPrint::of(b"gw-token-b").0);
        // Not the plain SHA-256 of the token: the salt is the process's own.
        use sha2::Digest as _;
        let plain: [u8; 32] = sha2::Sha256::digest(b"gw-token-a").into();
        assert_ne!(a.0, plain);
    }
}
