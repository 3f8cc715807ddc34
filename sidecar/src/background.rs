//! Background Responses (`background: true`): the answer to the request that makes one has no
//! usage (`"usage": null`, status `queued`), and the response's usage comes later, with a poll
//! (`GET responses/{id}`, streamed or not) or the cancellation that finds it finished — answers
//! a client may ask for again and again. The gateway remembers the background responses it saw
//! made and left unfinished ([`Pending`]: this process only, bounded, for a day), and counts the
//! first answer of one that shows it finished with its usage: then it is forgotten, and later
//! polls count nothing, as polls of responses made in the foreground never do.
//!
//! - [`RequestKind`]: which requests take part (a create asking for one, a poll), told from
//!   model calls and other requests ([`asks_background`], [`CreateState`] read the body).
//! - [`ResponseScan`]: the response object's `id`, `status` and `model`, read from an answer as
//!   it streams through (a JSON document, or each event's `response` in a stream).
//! - [`Watch`]: what a request's record does with them when it ends ([`Watch::settle`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use memchr::memmem::Finder;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Snapshot;
use crate::cost::{CustomCost, ModelName, Price};

/// Most background responses remembered at once; the oldest is forgotten for a new one.
pub const MAX_PENDING: usize = 10_000;
/// How long a background response is remembered: longer than any model runs.
pub const KEPT_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest response id remembered (OpenAI's are `resp_` and 48 hex digits).
const MAX_ID_LEN: usize = 256;
/// Longest string value a [`ResponseScan`] keeps (a model name's bound).
const MAX_VALUE_LEN: usize = crate::cost::MAX_MODEL_LEN;

/// What a provider request is to the accounting of its answer's tokens (see [`Self::of`]).
#[derive(Debug, PartialEq)]
pub enum RequestKind<'r> {
    /// A model asked (a `POST` that manages nothing made before): its answer's usage counts.
    /// `background`: it makes a background response (`POST .../responses` whose body asks
    /// `"background": true`).
    ModelCall { background: bool },
    /// A poll or cancellation of the response `id` (`GET .../responses/{id}`, streamed or not;
    /// `POST .../responses/{id}/cancel`): its answer is the response object, whose usage counts
    /// only for a background response remembered unfinished.
    Poll(Cow<'r, str>),
    /// A deletion of the response `id` (`DELETE .../responses/{id}`): once the provider agrees,
    /// no answer will bring its usage, so a remembered one is forgotten.
    Delete(Cow<'r, str>),
    /// Anything else (a batch's status, a file's content, a cancelled batch, an updated stored
    /// completion): a `usage` in its answer is no tokens spent now.
    Other,
}

impl<'r> RequestKind<'r> {
    /// What a request with this method, path after the provider (`rest`) and `body` is. The
    /// path's last segments are compared as the provider reads them, percent-decoded; the body is
    /// read only for a create.
    pub fn of(method: &http::Method, rest: &'r str, body: &[u8]) -> Self {
        let mut segments = decoded_last_segments(rest);
        let named = segments.each_ref().map(Option::as_deref);
        if method == http::Method::POST {
            match named {
                [Some("cancel"), Some(_), Some("responses")] => Self::poll(segments[1].take()),
                [Some("cancel"), _, Some("batches" | "responses")]
                | [_, Some("completions"), Some("chat")] => Self::Other,
                [Some("responses"), ..] => Self::ModelCall {
                    background: asks_background(body),
                },
                _ => Self::ModelCall { background: false },
            }
        } else if method == http::Method::GET && matches!(named, [Some(_), Some("responses"), _]) {
            Self::poll(segments[0].take())
        } else if method == http::Method::DELETE && matches!(named, [Some(_), Some("responses"), _])
        {
            match Self::poll(segments[0].take()) {
                Self::Poll(id) => Self::Delete(id),
                other => other,
            }
        } else {
            Self::Other
        }
    }

    fn poll(id: Option<Cow<'r, str>>) -> Self {
        match id {
            Some(id) if !id.is_empty() && id.len() <= MAX_ID_LEN => Self::Poll(id),
            _ => Self::Other,
        }
    }

    /// Whether the request asks a model.
    pub fn is_model_call(&self) -> bool {
        matches!(self, Self::ModelCall { .. })
    }
}

/// Whether a Responses API request body asks for a background response (`"background": true`).
pub fn asks_background(body: &[u8]) -> bool {
    CreateState::of(body).is_some_and(|s| s.background)
}

/// What a Responses API create body says of the state the provider keeps for it: its top-level
/// `background` and `conversation`, read as the providers' JSON parsers read them (escapes
/// decoded, the last value of a key given twice).
#[derive(Debug, Default, PartialEq)]
pub struct CreateState {
    /// `"background": true`: the response is made in the background and fetched by its id.
    pub background: bool,
    /// A `conversation` (not null), which the turn is added to.
    pub conversation: bool,
}

/// Built once: a searcher's set-up costs more than searching a short body.
static BACKGROUND_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"background\""));
static CONVERSATION_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"conversation\""));

impl CreateState {
    /// What `body` says; `None` when it cannot be read (not a JSON object). A body that names
    /// neither key, plainly or with escaped letters, is not parsed.
    pub fn of(body: &[u8]) -> Option<Self> {
        if BACKGROUND_KEY.find(body).is_none()
            && CONVERSATION_KEY.find(body).is_none()
            && !crate::cost::escapes_ascii_letter(body)
        {
            return Some(Self::default());
        }
        let [background, conversation] =
            crate::text::top_level_values(body, ["background", "conversation"])?;
        Some(Self {
            background: background.and_then(|v| v.as_bool()) == Some(true),
            conversation: conversation.is_some_and(|v| !v.is_null()),
        })
    }
}

/// Longest path segment percent-decoded: one longer decodes to more than [`MAX_ID_LEN`] bytes,
/// so it is neither a remembered id nor a name compared with.
const MAX_ENCODED_SEGMENT: usize = 3 * MAX_ID_LEN;

/// The last three segments of a path, last first, percent-decoded as the provider reads them
/// (`respons%65s` is `responses`). A path without `%` (nearly all) is only searched for one.
pub(crate) fn decoded_last_segments(rest: &str) -> [Option<Cow<'_, str>>; 3] {
    let segments = last_segments(rest);
    if memchr::memchr(b'%', rest.as_bytes()).is_none() {
        return segments.map(|s| s.map(Cow::Borrowed));
    }
    segments.map(|s| {
        s.map(|s| {
            if s.contains('%') && s.len() <= MAX_ENCODED_SEGMENT {
                Cow::Owned(crate::cost::percent_decode(s))
            } else {
                Cow::Borrowed(s)
            }
        })
    })
}

/// The last three segments of a path, last first (trailing `/`s left out). Asked of every
/// request: a byte search per segment.
fn last_segments(rest: &str) -> [Option<&str>; 3] {
    let mut left = rest;
    while let Some(trimmed) = left.strip_suffix('/') {
        left = trimmed;
    }
    // As `rsplit('/')`: the part before the first `/` is a segment too (empty or not).
    let mut segments = [None; 3];
    for slot in &mut segments {
        match memchr::memrchr(b'/', left.as_bytes()) {
            Some(at) => {
                *slot = Some(&left[at + 1..]);
                left = &left[..at];
            }
            None => {
                *slot = Some(left);
                break;
            }
        }
    }
    segments
}

/// Whether a response's `status` is final: its usage, if any, will not change.
fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "incomplete" | "cancelled")
}

/// What charging a background response needs from the request that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The model the request named (for Azure, its deployment), priced as its answer would be.
    pub model: Option<ModelName>,
    /// Its `cf-aig-custom-cost`.
    pub custom_cost: Option<CustomCost>,
}

/// The background responses of this process awaiting their usage, by provider and id; at most
/// [`MAX_PENDING`], each for [`KEPT_FOR`] or until counted.
#[derive(Debug, Default)]
pub struct Pending {
    book: Mutex<Book>,
    /// Whether the warning that the oldest are forgotten was given.
    warned_full: AtomicBool,
    /// How many are remembered (`sidegate_background_responses_pending`).
    gauge: Gauge,
}

#[derive(Debug, Default)]
struct Book {
    /// By `{provider}\0{id}`.
    entries: HashMap<Box<str>, Entry>,
    /// The keys in the order they were remembered, by a number given in that order.
    order: BTreeMap<u64, Box<str>>,
    next: u64,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    at: Instant,
    charge: Charge,
}

fn key(provider: &str, id: &str) -> Box<str> {
    format!("{provider}\0{id}").into()
}

impl Book {
    /// Forgets the oldest entry.
    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, key) = self.order.pop_first()?;
        self.entries.remove(&key)
    }

    /// Forgets what was remembered [`KEPT_FOR`] before `now` or longer.
    fn expire(&mut self, now: Instant) {
        while let Some(e) = self
            .order
            .first_key_value()
            .and_then(|(_, k)| self.entries.get(k))
            && now.saturating_duration_since(e.at) >= KEPT_FOR
        {
            self.pop_oldest();
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.order.remove(&e.seq);
        Some(e)
    }
}

impl Pending {
    /// None remembered yet; `gauge` tells how many are.
    pub fn new(gauge: Gauge) -> Self {
        Self {
            gauge,
            ..Self::default()
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the gauge to `book`'s count, under its lock (so two changes cannot set it out of order).
    fn count(&self, book: &Book) {
        self.gauge
            .set(i64::try_from(book.entries.len()).unwrap_or(i64::MAX));
    }

    /// Remembers the background response `id` of `provider` at `now`, with what charging it
    /// needs; the oldest is forgotten when [`MAX_PENDING`] are remembered already.
    pub fn remember(&self, provider: &str, id: &str, charge: Charge, now: Instant) {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return;
        }
        let key = key(provider, id);
        let mut book = self.book();
        book.expire(now);
        book.remove(&key);
        if book.entries.len() >= MAX_PENDING {
            book.pop_oldest();
            if !self.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = MAX_PENDING,
                    "background responses awaiting their usage are at their bound: the oldest are forgotten, and their usage will not be counted (said once)"
                );
            }
        }
        let seq = book.next;
        book.next += 1;
        book.order.insert(seq, key.clone());
        book.entries.insert(
            key,
            Entry {
                seq,
                at: now,
                charge,
            },
        );
        self.count(&book);
    }

    /// Whether the background response `id` of `provider` is remembered at `now`.
    pub fn knows(&self, provider: &str, id: &str, now: Instant) -> bool {
        let book = self.book();
        book.entries
            .get(&*key(provider, id))
            .is_some_and(|e| now.saturating_duration_since(e.at) < KEPT_FOR)
    }

    /// Takes the background response `id` of `provider` out, to be counted: `None` when it is
    /// not remembered (never, forgotten, or counted already) at `now`.
    pub fn claim(&self, provider: &str, id: &str, now: Instant) -> Option<Charge> {
        let mut book = self.book();
        book.expire(now);
        let charge = book.remove(&key(provider, id)).map(|e| e.charge);
        self.count(&book);
        charge
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.book().entries.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key of the response object the scan reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Key {
    #[default]
    Other,
    /// An event's response object.
    Response,
    Id,
    Status,
    Model,
}

impl Key {
    fn of(name: &[u8]) -> Self {
        match name {
            b"response" => Self::Response,
            b"id" => Self::Id,
            b"status" => Self::Status,
            b"model" => Self::Model,
            _ => Self::Other,
        }
    }
}

/// An open container of the first two levels.
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    object: bool,
    /// The next string in this object is a key.
    expect_key: bool,
    /// The key whose value comes (or came) last in this object.
    key: Key,
}

/// The string being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A key of an object of the first two levels.
    Key,
    /// A value the scan keeps.
    Value(Key),
    /// Anything else.
    Skipped,
}

/// The `id`, `status` and `model` of a response object in an answer, read byte by byte as its
/// frames go by (however they cut it), keeping no more than one short string: the top-level
/// ones of a JSON document, or, in an event stream, those of each event's `response` object (the
/// last event's win). Nested objects (output items have a `status` too) are passed over, and so
/// are strings with escapes (ids, statuses and model names have none).
#[derive(Debug, Default)]
pub struct ResponseScan {
    /// An event stream (else one JSON document).
    events: bool,
    depth: usize,
    levels: [Level; 2],
    reading: Option<Reading>,
    escaped: bool,
    /// The string read so far, while it is kept; `spoiled` when too long or escaped.
    text: Vec<u8>,
    spoiled: bool,
    /// The response's id.
    pub id: Option<Box<str>>,
    /// The response's status.
    pub status: Option<Box<str>>,
    /// The model the response names.
    pub model: Option<Box<str>>,
}

impl ResponseScan {
    /// A scan of an answer that is an event stream (`events`) or a JSON document.
    pub fn new(events: bool) -> Self {
        Self {
            events,
            ..Self::default()
        }
    }

    /// Whether the response was seen in a final status.
    pub fn finished(&self) -> bool {
        self.status.as_deref().is_some_and(is_terminal)
    }

    /// Whether the response was seen, and still going (queued, in progress).
    pub fn unfinished(&self) -> bool {
        self.status.as_deref().is_some_and(|s| !is_terminal(s))
    }

    /// Reads the next bytes of the answer.
    pub fn observe(&mut self, data: &[u8]) {
        for &b in data {
            match self.reading {
                Some(reading) => self.in_string(reading, b),
                None => self.outside_strings(b),
            }
        }
    }

    fn in_string(&mut self, reading: Reading, b: u8) {
        if self.escaped {
            self.escaped = false;
            return;
        }
        match b {
            b'\\' => {
                self.escaped = true;
                self.spoiled = true;
            }
            b'"' => {
                self.reading = None;
                self.end_string(reading);
            }
            _ if reading == Reading::Skipped || self.spoiled => {}
            _ if self.text.len() >= MAX_VALUE_LEN => self.spoiled = true,
            _ => self.text.push(b),
        }
    }

    fn outside_strings(&mut self, b: u8) {
        let depth = self.depth;
        match b {
            b'{' | b'[' => {
                if let Some(level) = self.levels.get_mut(depth) {
                    *level = Level {
                        object: b == b'{',
                        expect_key: true,
                        key: Key::Other,
                    };
                }
                self.depth += 1;
            }
            b'}' | b']' => self.depth = depth.saturating_sub(1),
            // A quote outside any container is no JSON's (an event stream's field lines).
            b'"' if depth > 0 => {
                let reading = match self.levels.get(depth - 1) {
                    Some(l) if l.object && l.expect_key => Reading::Key,
                    Some(l) if l.object && self.keeps(depth, l.key) => Reading::Value(l.key),
                    _ => Reading::Skipped,
                };
                self.reading = Some(reading);
                self.text.clear();
                self.spoiled = false;
            }
            b':' => {
                if let Some(level) = depth.checked_sub(1).and_then(|d| self.levels.get_mut(d)) {
                    level.expect_key = false;
                }
            }
            b',' => {
                if let Some(level) = depth.checked_sub(1).and_then(|d| self.levels.get_mut(d)) {
                    level.expect_key = level.object;
                    level.key = Key::Other;
                }
            }
            _ => {}
        }
    }

    /// Whether the value of `key` at `depth` is one of the response object's that the scan keeps.
    fn keeps(&self, depth: usize, key: Key) -> bool {
        let in_response = if self.events {
            depth == 2 && self.levels[0].key == Key::Response
        } else {
            depth == 1
        };
        in_response && matches!(key, Key::Id | Key::Status | Key::Model)
    }

    fn end_string(&mut self, reading: Reading) {
        match reading {
            Reading::Skipped => {}
            Reading::Key => {
                let key = if self.spoiled {
                    Key::Other
                } else {
                    Key::of(&self.text)
                };
                if let Some(level) = self
                    .depth
                    .checked_sub(1)
                    .and_then(|d| self.levels.get_mut(d))
                {
                    level.key = key;
                }
            }
            Reading::Value(key) if !self.spoiled => {
                let value = String::from_utf8_lossy(&self.text).into();
                match key {
                    Key::Id => self.id = Some(value),
                    Key::Status => self.status = Some(value),
                    Key::Model => self.model = Some(value),
                    Key::Other | Key::Response => {}
                }
            }
            Reading::Value(_) => {}
        }
    }
}

/// What a request's record does, when it ends, about a background response.
#[derive(Debug)]
pub struct Watch {
    scan: ResponseScan,
    pending: Arc<Pending>,
    provider: Arc<str>,
    role: Role,
}

#[derive(Debug)]
enum Role {
    /// The request that asked for a background response: remembered when its answer leaves
    /// the response unfinished, to be charged as `charge` says.
    Create(Charge),
    /// A poll or cancellation of the remembered response `id`: its answer's usage counts when
    /// it shows the response finished and no other answer counted it first. `snap` prices it.
    Poll { id: Box<str>, snap: Arc<Snapshot> },
}

/// What a record does with its answer's usage, as [`Watch::settle`] decides.
#[derive(Debug, PartialEq)]
pub enum Settled {
    /// As any answer's: counted as read.
    AsAnswered,
    /// A background response remembered: its usage comes later (none now, whatever the answer
    /// reported).
    Deferred,
    /// A poll that counts nothing: its usage is the response's, counted once elsewhere (or not
    /// yet final).
    NotCounted,
    /// The poll that counts the response's usage: priced as `model` (and `price`) with the
    /// custom cost of the request that made it.
    Counted {
        model: Option<ModelName>,
        price: Option<Box<Price>>,
        custom_cost: Option<CustomCost>,
    },
}

impl Watch {
    /// A watch on the answer to a request that asked `provider` for a background response; an
    /// event stream (`events`) or a JSON document.
    pub fn create(pending: Arc<Pending>, provider: Arc<str>, charge: Charge, events: bool) -> Self {
        Self {
            scan: ResponseScan::new(events),
            pending,
            provider,
            role: Role::Create(charge),
        }
    }

    /// A watch on an answer with the remembered response `id` of `provider` (a poll, a
    /// cancellation), priced by `snap`.
    pub fn poll(
        pending: Arc<Pending>,
        provider: Arc<str>,
        id: &str,
        snap: Arc<Snapshot>,
        events: bool,
    ) -> Self {
        Self {
            scan: ResponseScan::new(events),
            pending,
            provider,
            role: Role::Poll {
                id: id.into(),
                snap,
            },
        }
    }

    /// Reads the next bytes of the answer.
    pub fn observe(&mut self, data: &[u8]) {
        self.scan.observe(data);
    }

    /// Decides, when the answer ended (`answered`: with a success status), what its usage is:
    /// `tokens` whether it reported some. A created response still unfinished is remembered,
    /// whatever usage its answer reports (`null`, or zeros from some servers: not the
    /// response's yet); a poll counts the first time it shows the response finished, with usage.
    pub fn settle(self, answered: bool, tokens: bool, now: Instant) -> Settled {
        match self.role {
            Role::Create(charge) => match &self.scan.id {
                Some(id) if answered && self.scan.unfinished() => {
                    self.pending.remember(&self.provider, id, charge, now);
                    Settled::Deferred
                }
                _ => Settled::AsAnswered,
            },
            Role::Poll { id, snap } => {
                if !(answered && self.scan.finished()) {
                    return Settled::NotCounted;
                }
                // Finished: its usage will not change, so it is forgotten whether it has one
                // (counted now) or not (nothing to count, ever).
                let Some(charge) = self.pending.claim(&self.provider, &id, now) else {
                    return Settled::NotCounted;
                };
                if !tokens {
                    return Settled::NotCounted;
                }
                let answer = self.scan.model.as_deref().and_then(ModelName::named);
                // The request's model, as its answer would have been priced (an Azure
                // deployment's name, a name in `spec.pricing`); else, when only it has a price,
                // the one that answered (a dated snapshot's name).
                let (model, price) = [charge.model, answer]
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        let price = snap.pricing.lookup(m.as_str());
                        (Some(m), price)
                    })
                    .reduce(|first, next| {
                        if first.1.is_some() || next.1.is_none() {
                            first
                        } else {
                            next
                        }
                    })
                    .unwrap_or((None, None));
                Settled::Counted {
                    model,
                    price: price.map(Box::new),
                    custom_cost: charge.custom_cost,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(events: bool, frames: &[&[u8]]) -> ResponseScan {
        let mut s = ResponseScan::new(events);
        for f in frames {
            s.observe(f);
        }
        s
    }

    const QUEUED: &[u8] = br#"{"id":"resp_1","object":"response","created_at":1,"status":"queued","background":true,"model":"o3-pro-2025-06-10","output":[],"usage":null}"#;

    #[test]
    fn a_response_document_gives_its_top_level_id_status_and_model() {
        let s = scan(false, &[QUEUED]);
        assert_eq!(s.id.as_deref(), Some("resp_1"));
        assert_eq!(s.status.as_deref(), Some("queued"));
        assert_eq!(s.model.as_deref(), Some("o3-pro-2025-06-10"));
        assert!(s.unfinished() && !s.finished());
    }

    #[test]
    fn a_response_split_anywhere_reads_the_same() {
        for cut in 0..QUEUED.len() {
            let s = scan(false, &[&QUEUED[..cut], &QUEUED[cut..]]);
            assert_eq!(
                (s.id.as_deref(), s.status.as_deref()),
                (Some("resp_1"), Some("queued")),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = QUEUED.chunks(1).collect();
        assert_eq!(
            scan(false, &bytes).model.as_deref(),
            Some("o3-pro-2025-06-10")
        );
    }

    #[test]
    fn nested_statuses_and_escaped_text_are_not_the_responses() {
        let body = br#"{
            "output": [{"type": "message", "id": "msg_1", "status": "completed",
                        "content": [{"type": "output_text", "text": "say \"status\": \"completed\""}]}],
            "metadata": {"status": "completed", "id": "x"},
            "id": "resp_2",
            "status": "in_progress",
            "instructions": "{\"status\":\"failed\"}"
        }"#;
        let s = scan(false, &[body]);
        assert_eq!(s.id.as_deref(), Some("resp_2"));
        assert_eq!(s.status.as_deref(), Some("in_progress"));
        assert_eq!(s.model, None);
    }

    #[test]
    fn an_event_stream_gives_the_last_events_response() {
        let stream = concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_3","status":"queued","model":"o3","usage":null}}"#,
            "\n\n",
            "event: response.output_item.done\n",
            r#"data: {"type":"response.output_item.done","item":{"id":"msg_1","status":"completed"}}"#,
            "\n\n",
            "event: response.completed\n",
            r#"data: {"type":"response.completed","response":{"id":"resp_3","status":"completed","model":"o3-2025-04-16","usage":{"input_tokens":1}}}"#,
            "\n\n",
        );
        let s = scan(true, &[stream.as_bytes()]);
        assert_eq!(s.id.as_deref(), Some("resp_3"));
        assert_eq!(s.status.as_deref(), Some("completed"));
        assert_eq!(s.model.as_deref(), Some("o3-2025-04-16"));
        // The same stream read as a document finds no top-level response fields.
        assert_eq!(scan(false, &[stream.as_bytes()]).status, None);
    }

    #[test]
    fn terminal_statuses_are_final_and_others_are_not() {
        for (status, finished) in [
            ("completed", true),
            ("failed", true),
            ("incomplete", true),
            ("cancelled", true),
            ("queued", false),
            ("in_progress", false),
        ] {
            let body = format!(r#"{{"id":"r","status":"{status}"}}"#);
            let s = scan(false, &[body.as_bytes()]);
            assert_eq!(
                (s.finished(), s.unfinished()),
                (finished, !finished),
                "{status}"
            );
        }
        assert!(!scan(false, &[b"{\"id\":\"r\"}"]).unfinished());
    }

    #[test]
    fn requests_are_told_apart_by_method_and_path() {
        let (get, post) = (http::Method::GET, http::Method::POST);
        let kind = |method: &http::Method, path| RequestKind::of(method, path, b"{}");
        let poll = |id| RequestKind::Poll(Cow::Borrowed(id));
        let model_call = RequestKind::ModelCall { background: false };
        for path in [
            "v1/chat/completions",
            "chat/completions",
            "v1/responses",
            "res/dep/responses/",
            "v1/batches",
            "v1/responses/resp_1",
        ] {
            assert_eq!(kind(&post, path), model_call, "{path}");
        }
        assert_eq!(kind(&get, "v1/responses/resp_1"), poll("resp_1"));
        assert_eq!(kind(&get, "res/dep/responses/resp_1/"), poll("resp_1"));
        assert_eq!(kind(&post, "v1/responses/resp_1/cancel"), poll("resp_1"));
        assert_eq!(
            kind(&http::Method::DELETE, "v1/respons%65s/resp_1/"),
            RequestKind::Delete(Cow::Owned("resp_1".into()))
        );
        for (method, path) in [
            (&post, "v1/batches/batch_1/cancel"),
            (&post, "v1/responses//cancel"),
            (&post, "v1/chat/completions/chatcmpl-1"),
            (&get, "v1/responses/resp_1/input_items"),
            (&get, "v1/responses"),
            (&get, "v1/chat/completions"),
            (&http::Method::DELETE, "v1/responses"),
            (&http::Method::DELETE, "v1/responses/resp_1/input_items"),
            (&http::Method::DELETE, "v1/chat/completions/chatcmpl-1"),
        ] {
            assert_eq!(kind(method, path), RequestKind::Other, "{method} {path}");
        }
        let long = format!("v1/responses/{}", "r".repeat(MAX_ID_LEN + 1));
        assert_eq!(
            kind(&get, &long),
            RequestKind::Other,
            "an id past the bound"
        );
    }

    #[test]
    fn paths_are_compared_percent_decoded_as_providers_read_them() {
        let (get, post) = (http::Method::GET, http::Method::POST);
        let body = br#"{"model":"o3-pro","background":true}"#;
        let poll = |id: &str| RequestKind::Poll(Cow::Owned(id.to_owned()));
        assert_eq!(
            RequestKind::of(&post, "v1/respons%65s", body),
            RequestKind::ModelCall { background: true }
        );
        assert_eq!(
            RequestKind::of(&get, "v1/responses/resp%5F1", body),
            poll("resp_1")
        );
        assert_eq!(
            RequestKind::of(&post, "v1/%72esponses/resp_1/c%61ncel", body),
            poll("resp_1")
        );
        assert_eq!(
            RequestKind::of(&post, "v1/batches/b/canc%65l", body),
            RequestKind::Other
        );
        // A segment too long to decode to a remembered id is left as it is.
        let long = format!("v1/responses/{}", "%72".repeat(MAX_ID_LEN + 1));
        assert_eq!(RequestKind::of(&get, &long, body), RequestKind::Other);
        let at_bound = format!("v1/responses/{}", "%72".repeat(MAX_ID_LEN));
        assert_eq!(
            RequestKind::of(&get, &at_bound, body),
            poll(&"r".repeat(MAX_ID_LEN))
        );
    }

    #[test]
    fn last_segments_are_those_of_rsplit_without_trailing_slashes() {
        for path in [
            "", "/", "a", "/a", "a/", "a//", "a/b", "/a/b", "a/b/c", "a/b/c/d/", "a//b", "//",
        ] {
            let mut back = path.trim_end_matches('/').rsplit('/');
            let want = [back.next(), back.next(), back.next()];
            assert_eq!(last_segments(path), want, "{path:?}");
        }
    }

    #[test]
    fn background_is_read_from_the_body() {
        assert!(asks_background(br#"{"model":"o3-pro","background":true}"#));
        assert!(!asks_background(
            br#"{"model":"o3-pro","background":false}"#
        ));
        assert!(!asks_background(br#"{"model":"o3-pro","background":null}"#));
        assert!(!asks_background(
            br#"{"model":"o3-pro","background":"yes"}"#
        ));
        assert!(!asks_background(
            br#"{"model":"o3-pro","input":"background"}"#
        ));
        assert!(!asks_background(
            br#"{"model":"o3-pro","metadata":{"background":true}}"#
        ));
        assert!(!asks_background(br#"{"model":"o3-pro"}"#));
        assert!(!asks_background(br#"[{"background":true}]"#));
    }

    #[test]
    fn the_body_is_read_as_providers_parse_it() {
        // An escaped key is the same key.
        assert!(asks_background(
            br#"{"model":"o3-pro","backgr\u006fund":true}"#
        ));
        assert!(asks_background(
            br#"{"model":"o3-pro","\u0062ackground":true}"#
        ));
        // Of a key given twice, the last counts.
        assert!(asks_background(
            br#"{"background":false,"model":"o3-pro","background":true}"#
        ));
        assert!(!asks_background(
            br#"{"background":true,"model":"o3-pro","background":false}"#
        ));
        assert_eq!(
            CreateState::of(br#"{"conversation":"c","c\u006fnversation":null}"#),
            Some(CreateState::default())
        );
        assert_eq!(
            CreateState::of(br#"{"background":true,"conversation":{"id":"c"}}"#),
            Some(CreateState {
                background: true,
                conversation: true
            })
        );
        // A body that names neither key is not parsed: valid JSON or not, it says nothing.
        assert_eq!(CreateState::of(b"{not json"), Some(CreateState::default()));
        assert_eq!(CreateState::of(br#"{"background":tru"#), None);
    }

    fn charge(model: &str) -> Charge {
        Charge {
            model: Some(ModelName::new(model)),
            custom_cost: None,
        }
    }

    #[test]
    fn a_remembered_response_is_claimed_once() {
        let p = Pending::default();
        let now = Instant::now();
        p.remember("openai", "resp_1", charge("o3-pro"), now);
        assert!(p.knows("openai", "resp_1", now));
        assert!(
            !p.knows("azure-openai", "resp_1", now),
            "another provider's"
        );
        assert_eq!(p.claim("openai", "resp_1", now), Some(charge("o3-pro")));
        assert_eq!(p.claim("openai", "resp_1", now), None);
        assert!(!p.knows("openai", "resp_1", now));
        assert!(p.is_empty());
    }

    #[test]
    fn a_response_is_forgotten_a_day_after() {
        let p = Pending::default();
        let t0 = Instant::now();
        p.remember("openai", "old", charge("m"), t0);
        p.remember("openai", "new", charge("m"), t0 + KEPT_FOR / 2);
        let later = t0 + KEPT_FOR;
        assert!(!p.knows("openai", "old", later));
        assert_eq!(p.claim("openai", "old", later), None);
        assert_eq!(p.len(), 1, "the expired one is dropped");
        assert!(p.claim("openai", "new", later).is_some());
    }

    #[test]
    fn the_oldest_is_forgotten_past_the_bound() {
        let p = Pending::default();
        let now = Instant::now();
        for i in 0..MAX_PENDING + 5 {
            p.remember("openai", &format!("resp_{i}"), charge("m"), now);
        }
        assert_eq!(p.len(), MAX_PENDING);
        assert!(!p.knows("openai", "resp_4", now));
        assert!(p.knows("openai", "resp_5", now));
        // Remembering one again moves it to the newest.
        p.remember("openai", "resp_5", charge("m"), now);
        p.remember("openai", "one_more", charge("m"), now);
        assert!(p.knows("openai", "resp_5", now));
        assert!(!p.knows("openai", "resp_6", now));
        assert_eq!(p.len(), MAX_PENDING);
    }

    fn snapshot() -> Arc<Snapshot> {
        let src = crate::config::Sources {
            config: "gateway.yaml".into(),
            keys_dir: None,
        };
        Arc::new(
            crate::config::load_with(&src, b"schemaVersion: 1\nspec: {}\n".to_vec())
                .expect("config"),
        )
    }

    fn poll(p: &Arc<Pending>, body: &[u8]) -> Watch {
        let mut w = Watch::poll(p.clone(), "openai".into(), "resp_1", snapshot(), false);
        w.observe(body);
        w
    }

    #[test]
    fn an_unfinished_background_create_is_remembered_and_a_finished_one_is_not() {
        let p = Arc::new(Pending::default());
        let now = Instant::now();
        let create = |body: &[u8], answered, tokens| {
            let mut w = Watch::create(p.clone(), "openai".into(), charge("o3-pro"), false);
            w.observe(body);
            w.settle(answered, tokens, now)
        };
        let done = br#"{"id":"resp_9","status":"completed","usage":{"input_tokens":1}}"#;
        assert_eq!(create(done, true, true), Settled::AsAnswered);
        assert_eq!(create(QUEUED, false, false), Settled::AsAnswered, "a 4xx");
        assert!(p.is_empty());
        assert_eq!(create(QUEUED, true, false), Settled::Deferred);
        assert!(p.knows("openai", "resp_1", now));
        // A usage object (zeros) in an unfinished response's answer is not its usage yet.
        let zeros = br#"{"id":"resp_2","status":"in_progress","usage":{"input_tokens":0,"output_tokens":0}}"#;
        assert_eq!(create(zeros, true, true), Settled::Deferred);
        assert!(p.knows("openai", "resp_2", now));
    }

    #[test]
    fn a_poll_counts_the_first_final_answer_with_usage_priced_as_the_request() {
        let p = Arc::new(Pending::default());
        let now = Instant::now();
        p.remember("openai", "resp_1", charge("o3-pro"), now);
        let running = br#"{"id":"resp_1","status":"in_progress","usage":null}"#;
        assert_eq!(
            poll(&p, running).settle(true, false, now),
            Settled::NotCounted
        );
        let done = br#"{"id":"resp_1","status":"completed","model":"o3-pro-2025-06-10","usage":{"input_tokens":1}}"#;
        assert_eq!(poll(&p, done).settle(false, true, now), Settled::NotCounted);
        assert!(p.knows("openai", "resp_1", now), "still to count");
        let Settled::Counted { model, price, .. } = poll(&p, done).settle(true, true, now) else {
            panic!("not counted");
        };
        assert_eq!(model.as_ref().map(ModelName::as_str), Some("o3-pro"));
        assert!(price.is_some());
        assert_eq!(poll(&p, done).settle(true, true, now), Settled::NotCounted);
    }

    #[test]
    fn a_poll_prices_the_answers_model_when_the_request_named_none_with_a_price() {
        let p = Arc::new(Pending::default());
        let now = Instant::now();
        p.remember("openai", "resp_1", charge("my-deployment"), now);
        let done = br#"{"id":"resp_1","status":"completed","model":"gpt-4o-mini-2024-07-18","usage":{"input_tokens":1}}"#;
        let Settled::Counted { model, price, .. } = poll(&p, done).settle(true, true, now) else {
            panic!("not counted");
        };
        assert_eq!(
            model.as_ref().map(ModelName::as_str),
            Some("gpt-4o-mini-2024-07-18")
        );
        assert!(price.is_some());
    }
}
