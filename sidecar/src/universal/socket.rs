//! Cloudflare's non-realtime WebSockets API: the universal endpoint over a WebSocket.
//!
//! A WebSocket upgrade on the universal endpoint's URL (`/`, long form
//! `/v1/{account}/{gateway}`) is admitted as any request is (gateway token, route, gateway id,
//! the request's `cf-aig-*` headers checked), and answered by the gateway itself: the session is
//! no provider's. Each message the client sends,
//! `{"type": "universal.create", "request": {"eventId", "provider", "endpoint", "headers",
//! "query", ...}}`, is one request to the universal endpoint — `request` its body (one step, or
//! a list of steps), `eventId` its `cf-aig-event-id`, the upgrade's headers its own — served by
//! the gateway as a `POST` is, through [`crate::proxy::Gateway::handle`]: authenticated, limited,
//! checked (DLP, guardrails), cached, retried, logged and charged as one. Its answer comes back
//! as `{"type": "universal.created", "metadata": {"cacheStatus", "eventId", "logId", "step",
//! "contentType", "status"}, "response": <the answer's body>}`; a stream as a
//! `universal.created` without `response`, a `universal.stream` per event (`metadata` with the
//! `eventId` only, `response` the event's data) and a `universal.done` with the metadata again —
//! or a `universal.error` when it broke off. The gateway's refusals and the providers' errors are
//! answers like any: their body is the `response`, their status in `metadata`.
//!
//! Requests are served side by side (at most [`IN_FLIGHT`] per session; the next message is
//! read once one ends) and each one's messages go out in order. A message is at most the
//! gateway's request body limit (longer: close code 1009); pings are answered; the session ends
//! when the client closes it (its requests still running are given up), or with close code
//! 1001 when the gateway stops.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{bad, json_kind};
use crate::body::{ProxyBody, RequestBody};
use crate::config::Snapshot;
use crate::error::{GatewayError, json_error, truncate};
use crate::headers::{GatewayHeaders, Gw};
use crate::proxy::Gateway;
use crate::websocket::{self, Incoming, MessageReader, ReadFailure};

/// Requests of one session served at once.
const IN_FLIGHT: usize = 16;
/// Messages waiting to be written to the client.
const OUT_QUEUE: usize = 32;
/// Largest answer sent whole in one message (a stream's events go one by one).
const MAX_ANSWER: usize = crate::dlp::MAX_RESPONSE_BYTES;
/// Once the session is over, how long its closing frame and the client's may take.
const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

type Failure = (Option<Arc<str>>, GatewayError);

/// Answers an upgrade on the universal endpoint (see the module docs): `101` once its
/// handshake and gateway headers are checked, the session running on its own from then on.
pub(crate) fn upgrade(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    parts: &http::request::Parts,
) -> Result<Response<ProxyBody>, Failure> {
    let none = |e: GatewayError| (None, e);
    // The request's gateway headers, as a POST's are checked before its body is read: they are
    // every message's.
    let aig = GatewayHeaders::scan(&parts.headers);
    crate::proxy::request_timeout(aig, snap.request_timeout).map_err(none)?;
    crate::cache::want(&snap.cache, aig).map_err(none)?;
    snap.retries.with_headers(aig).map_err(none)?;
    aig.byok_alias().map_err(none)?;
    let key = websocket::client_key(&parts.headers).map_err(none)?;
    let Some(client_side) = parts.extensions.get::<OnUpgrade>().cloned() else {
        return Err(none(GatewayError::WebSocketRefused(
            "a WebSocket upgrade needs HTTP/1.1".into(),
        )));
    };
    let mut answer = Response::new(ProxyBody::full(Bytes::new()));
    *answer.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = answer.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, websocket::accept_key(key));
    let session = Session {
        gw: gw.clone(),
        template: Arc::new(Template::of(parts)),
        max_message: usize::try_from(snap.max_body).unwrap_or(usize::MAX),
    };
    let entered = gw.sessions.enter();
    tokio::spawn(async move {
        match client_side.await {
            Ok(io) => session.run(TokioIo::new(io), entered).await,
            Err(e) => tracing::debug!(error = %e, "universal websocket upgrade did not complete"),
        }
    });
    Ok(answer)
}

/// What every request of a session is made of: the upgrade's path and headers.
struct Template {
    uri: http::Uri,
    headers: HeaderMap,
}

impl Template {
    fn of(parts: &http::request::Parts) -> Self {
        let mut headers = parts.headers.clone();
        // The upgrade's own, and those of a body: each request's are the gateway's.
        for name in [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_PROTOCOL,
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::TE,
        ] {
            headers.remove(name);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Self {
            uri: parts.uri.clone(),
            headers,
        }
    }

    /// The `POST` a message asks for.
    fn request(&self, create: &Create) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Whole(Some(create.body.clone())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = http::Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        let headers = req.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(create.body.len()));
        if let Some(id) = &create.event_header {
            headers.insert(Gw::EventId.name(), id.clone());
        }
        req
    }
}

/// A `universal.create` message, read.
struct Create {
    /// Its `eventId`, echoed in each message of its answer.
    event_id: Option<String>,
    /// The same, as the request's `cf-aig-event-id`.
    event_header: Option<HeaderValue>,
    /// Its `request`: the universal endpoint's body.
    body: Bytes,
}

impl Create {
    /// Reads a message; what cannot be served is refused (400/2108) with the `eventId` read, if
    /// any.
    fn read(raw: &[u8]) -> Result<Self, (Option<String>, GatewayError)> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| {
            (
                None,
                bad(format!("the message is not JSON: {}", json_error(&e))),
            )
        })?;
        let Value::Object(mut message) = value else {
            return Err((
                None,
                bad(format!(
                    "expected a message {{\"type\": \"universal.create\", \"request\": ...}}, got {}",
                    json_kind(&value)
                )),
            ));
        };
        let mut request = message.remove("request");
        // Cloudflare's is the request's; some clients put it beside `type` too.
        let own = request
            .as_mut()
            .and_then(Value::as_object_mut)
            .and_then(|r| r.shift_remove("eventId"));
        let event_id = match own.or_else(|| message.remove("eventId")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err((
                    None,
                    bad(format!(
                        "request.eventId: expected a string, got {}",
                        json_kind(&other)
                    )),
                ));
            }
        };
        let refuse = |e: GatewayError| (event_id.clone(), e);
        let event_header = match &event_id {
            None => None,
            Some(id) => Some(HeaderValue::from_bytes(id.as_bytes()).map_err(|_| {
                refuse(bad(
                    "request.eventId: control characters cannot be an event id".into(),
                ))
            })?),
        };
        match message.get("type") {
            Some(Value::String(t)) if t == "universal.create" => {}
            Some(Value::String(t)) => {
                return Err(refuse(bad(format!(
                    "type: expected universal.create, got {:?}",
                    truncate(t)
                ))));
            }
            other => {
                return Err(refuse(bad(format!(
                    "type: expected universal.create, got {}",
                    other.map_or("nothing", json_kind)
                ))));
            }
        }
        let request = request.ok_or_else(|| {
            refuse(bad(
                "request: missing: the step to serve (provider, endpoint, headers, query), or a list of steps".into(),
            ))
        })?;
        Ok(Self {
            event_id,
            event_header,
            body: Bytes::from(serde_json::to_vec(&request).unwrap_or_default()),
        })
    }
}

/// A session, once its connection switched protocols.
struct Session {
    gw: Arc<Gateway>,
    template: Arc<Template>,
    max_message: usize,
}

/// What the reader hands on of the client's side.
enum FromClient {
    Message(Vec<u8>),
    /// Its close frame (the status code echoed in the gateway's).
    Close(Option<u16>),
    /// It broke the protocol: the session ends with this close code.
    Violation(u16, &'static str),
}

impl Session {
    async fn run<C>(self, client: C, mut entered: websocket::Entered)
    where
        C: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rx, tx) = tokio::io::split(client);
        let (out, to_client) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
        let writer = tokio::spawn(write_frames(tx, to_client));
        let (from_client, mut messages) = mpsc::channel::<FromClient>(1);
        let reader = tokio::spawn(read_frames(
            MessageReader::new(rx, self.max_message),
            from_client,
            out.clone(),
        ));
        let mut requests = tokio::task::JoinSet::new();
        let closing = loop {
            let room = requests.len() < IN_FLIGHT;
            tokio::select! {
                message = messages.recv(), if room => match message {
                    Some(FromClient::Message(raw)) => {
                        requests.spawn(answer(self.gw.clone(), self.template.clone(), raw, out.clone()));
                    }
                    // Its requests still running are given up: no one reads their answers.
                    Some(FromClient::Close(code)) => break Some((echoed(code), "")),
                    Some(FromClient::Violation(code, reason)) => break Some((code, reason)),
                    // The client went away.
                    None => break None,
                },
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
                _ = entered.ending.changed() => break Some((1001, "the gateway is stopping")),
                // Writing to the client failed: it went away.
                () = out.closed() => break None,
            }
        };
        requests.abort_all();
        reader.abort();
        if let Some((code, reason)) = closing {
            let frame = websocket::close_frame(code, reason);
            let _ = tokio::time::timeout(CLOSING_GRACE, out.send(frame)).await;
        }
        drop(out);
        // Let the answers given up drop (their records log them as cancelled) and the close frame
        // go out.
        while requests.join_next().await.is_some() {}
        let _ = tokio::time::timeout(CLOSING_GRACE, writer).await;
    }
}

/// The close code that answers a client's close frame: its own, when one an endpoint may send
/// (RFC 6455 §7.4), else 1000.
fn echoed(code: Option<u16>) -> u16 {
    code.filter(|c| matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999))
        .unwrap_or(1000)
}

/// Reads the client's frames for the session, answering its pings.
async fn read_frames<R: AsyncRead + Unpin>(
    mut reader: MessageReader<R>,
    to_session: mpsc::Sender<FromClient>,
    out: mpsc::Sender<Vec<u8>>,
) {
    loop {
        let next = match reader.next().await {
            Ok(Some(Incoming::Message { data, .. })) => FromClient::Message(data),
            Ok(Some(Incoming::Ping(payload))) => {
                if out.send(websocket::pong_frame(&payload)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Incoming::Close(code))) => FromClient::Close(code),
            Err(ReadFailure::Violation { code, reason }) => FromClient::Violation(code, reason),
            Ok(None) => return,
            Err(ReadFailure::Io(e)) => {
                tracing::debug!(error = %e, "universal websocket session: the client's connection failed");
                return;
            }
        };
        let last = !matches!(next, FromClient::Message(_));
        if to_session.send(next).await.is_err() || last {
            return;
        }
    }
}

/// Writes the session's frames to the client until its close frame, or until it goes away.
async fn write_frames<W: AsyncWrite>(
    client: tokio::io::WriteHalf<W>,
    mut frames: mpsc::Receiver<Vec<u8>>,
) {
    let mut client = client;
    while let Some(frame) = frames.recv().await {
        let close = websocket::is_close_frame(&frame);
        if client.write_all(&frame).await.is_err() {
            return;
        }
        if close {
            break;
        }
    }
    let _ = client.shutdown().await;
}

/// Serves one message and sends its answer.
async fn answer(
    gw: Arc<Gateway>,
    template: Arc<Template>,
    raw: Vec<u8>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let create = match Create::read(&raw) {
        Ok(create) => create,
        Err((event_id, e)) => {
            let mut metadata = serde_json::Map::new();
            if let Some(id) = event_id {
                metadata.insert("eventId".into(), Value::String(id));
            }
            metadata.insert("contentType".into(), "application/json".into());
            metadata.insert("status".into(), e.status().as_u16().into());
            let _ = out
                .send(message(
                    "universal.created",
                    &metadata,
                    Some(e.to_json().as_bytes()),
                ))
                .await;
            return;
        }
    };
    drop(raw);
    let resp = match gw.clone().handle(template.request(&create)).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let _ = send_answer(&gw, resp, create.event_id, &out).await;
}

/// Sends an answer as the API's messages; `Err` once the client is gone.
async fn send_answer(
    gw: &Gateway,
    resp: Response<ProxyBody>,
    event_id: Option<String>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), mpsc::error::SendError<Vec<u8>>> {
    let (head, body) = resp.into_parts();
    let metadata = metadata(&head, event_id);
    let stream = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let snap = gw.snapshot.load_full();
    let mut body = std::pin::pin!(body);
    if !stream {
        let mut held = gw
            .buffers
            .guard(snap.as_ref().map_or(u64::MAX, |s| s.max_buffered));
        let whole = crate::body::hold_whole(body.as_mut(), MAX_ANSWER, Some(&mut held)).await;
        let (metadata, whole) = match whole {
            Ok(whole) => (metadata, whole),
            Err(e) => {
                let e = e.into_gateway_error("the answer to send in one message");
                let mut metadata = metadata;
                metadata.insert("status".into(), e.status().as_u16().into());
                metadata.insert("contentType".into(), "application/json".into());
                (metadata, Bytes::from(e.to_json()))
            }
        };
        return out
            .send(message("universal.created", &metadata, Some(&whole)))
            .await;
    }
    out.send(message("universal.created", &metadata, None))
        .await?;
    let mut only_event_id = serde_json::Map::new();
    if let Some(id) = metadata.get("eventId") {
        only_event_id.insert("eventId".into(), id.clone());
    }
    let mut parser = crate::compat::sse::SseParser::ending_at_oversized();
    if let Some(snap) = &snap {
        parser.hold_in(gw.buffers.guard(snap.max_buffered));
    }
    let mut events = Vec::new();
    let failure = loop {
        use http_body_util::BodyExt as _;
        let mut take = |ev: crate::compat::sse::Event<'_>| {
            // `[DONE]` ends OpenAI-format streams: `universal.done` says so here.
            if !ev.data.is_empty() && ev.data != "[DONE]" {
                events.push(message(
                    "universal.stream",
                    &only_event_id,
                    Some(ev.data.as_bytes()),
                ));
            }
        };
        match body.as_mut().frame().await {
            None => {
                parser.finish(&mut take);
                break None;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    parser.feed(&data, &mut take);
                }
            }
            Some(Err(e)) => {
                break Some(GatewayError::UpstreamUnavailable(format!(
                    "the stream broke off: {e}"
                )));
            }
        }
        for event in events.drain(..) {
            out.send(event).await?;
        }
        if parser.too_large() {
            break Some(GatewayError::UpstreamUnavailable(
                crate::compat::sse::too_large("provider's"),
            ));
        }
        if let Some(e) = parser.refused() {
            break Some(GatewayError::BuffersFull { limit: e.limit });
        }
    };
    for event in events.drain(..) {
        out.send(event).await?;
    }
    match failure {
        None => out.send(message("universal.done", &metadata, None)).await,
        Some(e) => {
            out.send(message(
                "universal.error",
                &metadata,
                Some(e.to_json().as_bytes()),
            ))
            .await
        }
    }
}

/// The `metadata` of an answer: as Cloudflare's (`cacheStatus`, `eventId`, `logId`, `step`,
/// `contentType`, those the answer has), and its `status`.
fn metadata(
    head: &http::response::Parts,
    event_id: Option<String>,
) -> serde_json::Map<String, Value> {
    let header = |name: &str| {
        head.headers
            .get(name)
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
    };
    let mut m = serde_json::Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            m.insert(key.into(), v);
        }
    };
    put("cacheStatus", header("cf-aig-cache-status"));
    put(
        "eventId",
        event_id
            .map(Value::String)
            .or_else(|| header("cf-aig-event-id")),
    );
    put("logId", header("cf-aig-log-id"));
    put("step", header("cf-aig-step"));
    put("contentType", header("content-type"));
    m.insert("status".into(), head.status.as_u16().into());
    m
}

/// One of the API's messages, as a text frame: `{"type", "metadata", "response"}`, `response`
/// the answer's JSON as it came (not parsed and written anew: its numbers keep every digit),
/// else its text as a string, else its bytes in base64 (and `metadata.encoding: "base64"`).
fn message(
    kind: &str,
    metadata: &serde_json::Map<String, Value>,
    response: Option<&[u8]>,
) -> Vec<u8> {
    let mut metadata = std::borrow::Cow::Borrowed(metadata);
    let mut encoded = None;
    let response = response.map(|body| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
            body.trim_ascii()
        } else {
            let text = match std::str::from_utf8(body) {
                Ok(text) => Value::from(text),
                Err(_) => {
                    use base64::Engine as _;
                    metadata.to_mut().insert("encoding".into(), "base64".into());
                    Value::from(base64::engine::general_purpose::STANDARD.encode(body))
                }
            };
            encoded.insert(text.to_string()).as_bytes()
        }
    });
    let head = format!(
        r#"{{"type":{},"metadata":{}"#,
        Value::from(kind),
        Value::Object(metadata.into_owned())
    );
    let mut text = Vec::with_capacity(head.len() + response.map_or(0, <[u8]>::len) + 13);
    text.extend_from_slice(head.as_bytes());
    if let Some(response) = response {
        text.extend_from_slice(br#","response":"#);
        // Valid JSON, so UTF-8.
        text.extend_from_slice(response);
    }
    text.push(b'}');
    websocket::text_frame(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &[u8]) -> Value {
        // One unmasked frame: its length in 1, 3 or 9 bytes after the first.
        let skip = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&frame[skip..]).expect("a JSON message")
    }

    #[test]
    fn a_create_message_is_its_request_with_its_event_id_apart() {
        let c = Create::read(br#"{"type":"universal.create","request":{"eventId":"e1","provider":"openai","endpoint":"x","query":{}}}"#)
            .map_err(|(_, e)| e.to_string())
            .expect("valid");
        assert_eq!(c.event_id.as_deref(), Some("e1"));
        assert_eq!(c.event_header.expect("header"), "e1");
        assert_eq!(
            &c.body[..],
            br#"{"provider":"openai","endpoint":"x","query":{}}"#
        );
        // A list of steps, its event id beside `type`.
        let c = Create::read(br#"{"type":"universal.create","eventId":"e2","request":[{},{}]}"#)
            .map_err(|(_, e)| e.to_string())
            .expect("valid");
        assert_eq!(
            (c.event_id.as_deref(), &c.body[..]),
            (Some("e2"), &b"[{},{}]"[..])
        );
        let refused = |raw: &[u8]| Create::read(raw).err().expect("refused");
        for (raw, event_id, needle) in [
            (&b"nope"[..], None, "not JSON"),
            (b"[1]", None, "got an array"),
            (
                br#"{"type":"universal.create","request":{"eventId":5}}"#,
                None,
                "request.eventId: expected a string, got a number",
            ),
            (
                br#"{"type":"response.create","request":{"eventId":"e"}}"#,
                Some("e"),
                "type: expected universal.create",
            ),
            (br#"{"request":{"eventId":"e"}}"#, Some("e"), "got nothing"),
            (
                br#"{"type":"universal.create","eventId":"e"}"#,
                Some("e"),
                "request: missing",
            ),
            (
                br#"{"type":"universal.create","request":{"eventId":"a\nb"}}"#,
                Some("a\nb"),
                "control characters",
            ),
        ] {
            let (id, e) = refused(raw);
            assert_eq!(id.as_deref(), event_id, "{e}");
            assert!(e.to_string().contains(needle), "{e}");
            assert_eq!(e.code(), 2108);
        }
    }

    #[test]
    fn a_clients_close_is_answered_with_its_code_when_one_an_endpoint_may_send() {
        assert_eq!(
            [
                Some(1001),
                Some(4000),
                None,
                Some(1005),
                Some(1006),
                Some(999),
                Some(2000)
            ]
            .map(echoed),
            [1001, 4000, 1000, 1000, 1000, 1000, 1000]
        );
    }

    #[test]
    fn an_answer_goes_as_its_json_as_it_came_else_as_text_else_in_base64() {
        let mut meta = serde_json::Map::new();
        meta.insert("eventId".into(), "e".into());
        // Every digit kept, not read into a float and written anew.
        let json = text(&message(
            "universal.created",
            &meta,
            Some(b" {\"n\": 123456789012345678901234567890} \n"),
        ));
        assert_eq!(json["type"], "universal.created");
        assert_eq!(json["metadata"], serde_json::json!({"eventId": "e"}));
        let raw = String::from_utf8(
            message("t", &meta, Some(br#"{"n":123456789012345678901234567890}"#))[2..].to_vec(),
        )
        .expect("utf-8");
        assert!(
            raw.ends_with(r#""response":{"n":123456789012345678901234567890}}"#),
            "{raw}"
        );
        assert_eq!(
            text(&message("t", &meta, Some(b"plain \"text\"")))["response"],
            "plain \"text\""
        );
        let binary = text(&message("t", &meta, Some(&[0xff, 0x00, 0x10])));
        assert_eq!(
            (
                binary["response"].as_str(),
                binary["metadata"]["encoding"].as_str()
            ),
            (Some("/wAQ"), Some("base64"))
        );
        assert!(
            text(&message("universal.done", &meta, None))
                .get("response")
                .is_none()
        );
    }
}
