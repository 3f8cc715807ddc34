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
//! go uncounted. So does a provider whose requests the gateway signs (AWS): a session is not a
//! request it can sign.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
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
/// A message is gathered only when its first bytes name a `response.done` (OpenAI puts the
/// `type` first): audio deltas and the like pass without being copied.
const PEEK: usize = 128;
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

    /// A new config serves: sessions whose stored key it no longer holds end.
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
    if snap.dlp.checks_requests()
        || snap.dlp.checks_responses()
        || snap.guardrails.checks_prompts()
        || snap.guardrails.checks_responses()
    {
        return Err(fail(GatewayError::WebSocketRefused(
            "WebSocket sessions are refused: this gateway's DLP or guardrails check what requests and responses carry, which they cannot do for a session".into(),
        )));
    }
    if snap.budgets.is_some() && !provider.sessions_report_openai_usage() {
        return Err(fail(GatewayError::WebSocketRefused(format!(
            "WebSocket sessions are refused for {}: this gateway has a spend limit or token budget, and the gateway cannot read how much this provider's sessions use",
            provider.id
        ))));
    }
    if provider.signs_requests() {
        return Err(fail(GatewayError::WebSocketRefused(format!(
            "WebSocket sessions are refused for {}: the gateway signs its requests, and a session is not one it can sign",
            provider.id
        ))));
    }
    let Some(client_side) = parts.extensions.get::<OnUpgrade>().cloned() else {
        return Err(fail(GatewayError::WebSocketRefused(
            "a WebSocket upgrade needs HTTP/1.1".into(),
        )));
    };
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
    let model = parts
        .uri
        .query()
        .and_then(|q| query_value(q, "model"))
        .and_then(|m| crate::cost::ModelName::named(&m));
    let (mut head, body) = upstream.into_parts();
    // The provider's own `cf-aig-*` and hop-by-hop headers go; the gateway's are added after.
    let upstream_side = head.extensions.remove::<OnUpgrade>();
    let (connection, upgrade) = (
        head.headers.remove(header::CONNECTION),
        head.headers.remove(header::UPGRADE),
    );
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
    if let Some(m) = model {
        record.set_model(m, &snap.pricing);
    }
    let tally = gw.tally(snap);
    record.set_tally(tally.clone());
    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        // The provider's answer (an error, most likely) goes through as it is.
        let body = crate::proxy::answer_body(body, false, record, None);
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
        watches: gw.sessions.join(),
    };
    let provider_id = provider.id.clone();
    // The client's side switches once this answer is written; the session runs on its own,
    // counted in `gw.sessions`.
    tokio::spawn(async move {
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
    });
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
    watches: Watches,
}

impl Session {
    /// Resolves when the session must end: every session ends, or a reload took its key away.
    async fn ended(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.watches.ending.changed() => return "the gateway is stopping",
                Ok(()) = self.watches.serving.changed(), if self.held.is_some() => {
                    let serving = self.watches.serving.borrow_and_update().clone();
                    if self.held.as_ref().is_some_and(|h| !h.still_held(serving.as_deref())) {
                        return "the provider key of this session was removed or rotated";
                    }
                }
            }
        }
    }
}

/// How the provider-to-client direction of a session ended.
enum End {
    /// The provider closed its side.
    Closed,
    /// Reading or writing failed.
    Failed(std::io::Error),
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
    let (up, down) = {
        let to_provider = async {
            let copied = tokio::io::copy(&mut client_rx, &mut upstream_tx).await;
            // The client closed its side: so does the gateway, towards the provider.
            let _ = upstream_tx.shutdown().await;
            copied
        };
        let to_client = async {
            let end = forward(&mut upstream_rx, &mut client_tx, &mut s).await;
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
                match tokio::time::timeout(CLOSING_GRACE, &mut to_client).await {
                    Ok(down) => (Some(up), down),
                    Err(_) => (Some(up), End::Closed),
                }
            }
        }
    };
    let record = s.record;
    match (up, down) {
        (Some(Ok(_)) | None, End::Closed | End::Ending) => record.finish_complete(),
        (_, End::Limit(e)) => {
            tracing::info!(error = %e, "websocket session closed: usage limit reached");
            record.finish_complete();
        }
        (up, down) => {
            let down = match down {
                End::Failed(e) => Some(e),
                _ => None,
            };
            tracing::debug!(to_provider = ?up.and_then(Result::err), to_client = ?down, "websocket session ended with an error");
            record.finish_upstream_error();
        }
    }
}

/// Copies what the provider sends to the client, charging each `response.done`, until the
/// provider closes, a copy fails, the usage limits run out or the gateway ends the session.
async fn forward<R, W>(upstream: &mut R, client: &mut W, s: &mut Session) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = tokio::select! {
            read = upstream.read(&mut buf) => match read {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e) => return End::Failed(e),
            },
            why = s.ended() => {
                tracing::info!(reason = why, "websocket session ended by the gateway");
                close(client, &frames, 1001, why).await;
                return End::Ending;
            }
        };
        frames.feed(&buf[..n]);
        tokio::select! {
            written = client.write_all(&buf[..n]) => if let Err(e) = written {
                return End::Failed(e);
            },
            _ = s.ended() => return End::Ending,
        }
        s.record.add_bytes(n as u64);
        if let Some((input, output)) = frames.take_counted() {
            s.record.charge_part(input, output);
            if let Some(t) = &s.tally
                && let Err(e) = t.check(&s.metrics).await
            {
                close(client, &frames, 1008, "usage limit reached").await;
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
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = vec![0x88, 2 + reason.len() as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    let _ = tokio::time::timeout(CLOSING_GRACE, client.write_all(&frame)).await;
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
/// counts of its `response.done` messages. Frames from a server are unmasked, but a masked one is
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
    /// Tokens of the `response.done` messages read since [`Self::take_counted`].
    input: u64,
    output: u64,
    counted: bool,
}

impl Frames {
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
        let Some(&second) = self.header.get(1) else {
            return 2;
        };
        let masked = if second & 0x80 != 0 { 4 } else { 0 };
        match second & 0x7f {
            126 => 4 + masked,
            127 => 10 + masked,
            _ => 2 + masked,
        }
    }

    fn start_frame(&mut self) {
        let h = std::mem::take(&mut self.header);
        let (first, second) = (h[0], h[1]);
        let opcode = first & 0x0f;
        let (len, rest) = match second & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), &h[4..]),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                &h[10..],
            ),
            n => (u64::from(n), &h[2..]),
        };
        self.mask = (second & 0x80 != 0).then(|| ([rest[0], rest[1], rest[2], rest[3]], 0));
        self.fin = first & 0x80 != 0;
        // Control frames (opcode 8 and up: close, ping, pong) may come between the frames of a
        // message and leave it as it is.
        self.reading = match opcode {
            1 => {
                self.message = Some(Vec::new());
                self.peeked = false;
                true
            }
            0 => self.message.is_some(),
            2..=7 => {
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
            for b in &mut m[from..] {
                *b ^= key[*at % 4];
                *at += 1;
            }
        }
        if !self.peeked && m.len() >= PEEK {
            self.peeked = true;
            if memchr::memmem::find(&m[..PEEK], b"response.done").is_none() {
                self.message = None;
            }
        }
    }

    fn end_frame(&mut self) {
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

    /// Adds the usage of a `response.done` message.
    fn read_message(&mut self, m: &[u8]) {
        if memchr::memmem::find(m, b"response.done").is_none() {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(m) else {
            return;
        };
        if v.get("type").and_then(|t| t.as_str()) != Some("response.done") {
            return;
        }
        let Some(usage) = v.pointer("/response/usage") else {
            return;
        };
        let count = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
        if let (Some(i), Some(o)) = (count("input_tokens"), count("output_tokens")) {
            self.input = self.input.saturating_add(i);
            self.output = self.output.saturating_add(o);
            self.counted = true;
        }
    }

    /// Input and output tokens of the `response.done` messages read since the last call, when
    /// there were any.
    fn take_counted(&mut self) -> Option<(u64, u64)> {
        let counted = std::mem::take(&mut self.counted).then_some((self.input, self.output));
        (self.input, self.output) = (0, 0);
        counted
    }

    /// Whether the bytes fed so far end where a frame ends.
    fn at_boundary(&self) -> bool {
        !self.in_payload && self.header.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                f.take_counted(),
                Some((111, 46)),
                "fed {chunk} bytes at a time"
            );
            assert_eq!(f.take_counted(), None, "taken once");
            assert!(f.at_boundary());
            assert!(!f.in_payload && f.header.is_empty());
        }
        let mut none = Frames::default();
        none.feed(&frame(true, 1, br#"{"type":"session.created"}"#, None));
        assert_eq!(none.take_counted(), None);
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
        assert_eq!(f.take_counted(), None);
        // The next one is read again.
        f.feed(&frame(true, 1, &done(5, 5, 0), None));
        assert_eq!(f.take_counted(), Some((5, 5)));
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
}
