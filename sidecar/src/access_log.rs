//! The per-request access log: one line per request, text for people or JSON for pipelines.
//!
//! Lines are formatted by hand (no `fmt` machinery per field) into a shared buffer that a
//! background thread flushes to stderr every [`FLUSH_EVERY`] (or at once when it grows past
//! [`FLUSH_AT`]), so a request costs neither a `tracing` event nor a write syscall. The
//! process's other log lines ([`LogWriter`], for `tracing`) go through the same buffer, so only
//! that thread ever waits on stderr: a log pipe that stops draining (a stuck collector) cannot
//! stall requests or the health probes. Past [`MAX_HELD`] waiting bytes, lines are dropped and
//! counted, and the count is logged once stderr drains again. The fields
//! are SPEC.md's log fields (`id`, `created_at`, `status_code`, `duration`, ...) plus `method`,
//! `bytes` and `outcome`. Keys never reach this module: lines carry provider id, method, path
//! without query, status, sizes, time, and the client's own values (metadata, event id) escaped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest time a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Buffer size that wakes the flusher at once.
pub const FLUSH_AT: usize = 64 * 1024;
/// Most bytes held for a stderr that does not drain; lines past it are dropped (and counted).
pub const MAX_HELD: usize = 4 * 1024 * 1024;

/// Longest wait of [`flush`] for stderr to take the lines held: at exit, a log pipe that does not
/// drain must not keep the process alive (kubelet would wait for its grace period, then kill it).
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2026-01-01T00:00:00.000000Z  INFO request id=... provider=openai ...`
    Text,
    /// One JSON object per line.
    Json,
}

/// One finished request; the field names are SPEC.md's log fields (`id`, `created_at`, ...).
pub struct Entry<'a> {
    /// Request id (`cf-aig-log-id`).
    pub id: &'a str,
    /// When the request came in.
    pub created_at: SystemTime,
    /// Provider id, when the request got as far as naming a known one.
    pub provider: Option<&'a str>,
    /// The model the request named (or that answered it).
    pub model: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// Provider path, without query.
    pub path: &'a str,
    /// Status sent to the client.
    pub status_code: u16,
    /// Milliseconds from request to end of body.
    pub duration: f64,
    /// Response body bytes.
    pub bytes: u64,
    /// `complete`, `cancelled`, `upstream_error`, `buffers_full` (a stream the gateway ended
    /// when its unfinished event did not fit in the memory budget, `maxBufferedBytes`) or
    /// `refused` (an error made by the gateway).
    pub outcome: &'a str,
    /// Served from the response cache.
    pub cached: bool,
    /// Prompt tokens the provider reported.
    pub tokens_in: Option<u64>,
    /// Generated tokens the provider reported.
    pub tokens_out: Option<u64>,
    /// Cost in USD, when the model's price (or a custom cost) is known.
    pub cost: Option<f64>,
    /// The cost came from `cf-aig-custom-cost`.
    pub custom_cost: bool,
    /// `cf-aig-metadata` (a compact JSON object).
    pub metadata: Option<&'a str>,
    /// The dynamic-route step or universal-endpoint index that answered (`cf-aig-step`).
    pub step: Option<u32>,
    /// The client's `cf-aig-event-id`.
    pub event_id: Option<&'a str>,
    /// The bodies, when the gateway logs payloads.
    pub payloads: Option<Bodies<'a>>,
}

impl Entry<'_> {
    /// A 2xx/3xx whose body reached the client whole.
    pub fn success(&self) -> bool {
        self.status_code < 400 && self.outcome == "complete"
    }
}

/// The request and response bodies of a log line (each possibly cut short).
pub struct Bodies<'a> {
    /// The request body (its first bytes).
    pub request: &'a [u8],
    /// The request body was longer.
    pub request_cut: bool,
    /// The response body as the client got it (its first bytes).
    pub response: &'a [u8],
    /// The response body was longer.
    pub response_cut: bool,
}

struct Sink {
    format: Format,
    buf: Mutex<String>,
    /// Wakes the flusher when the buffer passes [`FLUSH_AT`] or holds a process log line.
    full: Condvar,
    /// Set (under the buffer's lock) with each wake-up, so one that comes while the flusher is
    /// busy writing is not lost.
    wake: AtomicBool,
    /// Lines dropped since the last write because [`MAX_HELD`] bytes were waiting.
    dropped: AtomicU64,
    /// The flusher thread runs (else [`flush`] writes to stderr itself).
    flusher: AtomicBool,
    /// Flushes asked for by [`flush`], counted.
    flushes_asked: AtomicU64,
    /// The last of those the flusher has done (its buffer written out).
    flushes_done: Mutex<u64>,
    /// Signalled with each flush the flusher has done.
    flushed: Condvar,
}

impl Sink {
    /// Wakes the flusher now. `_locked` is the buffer, borrowed from its lock: the flag is set
    /// under that lock, where the flusher checks it before waiting, so no wake-up is lost.
    fn wake_flusher(&self, _locked: &mut String) {
        self.wake.store(true, Ordering::Relaxed);
        self.full.notify_one();
    }
}

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// Starts the flusher thread; request lines written before this are dropped, other log lines
/// go to stderr directly.
pub fn init(format: Format) {
    let sink = Arc::new(Sink {
        format,
        buf: Mutex::new(String::with_capacity(FLUSH_AT)),
        full: Condvar::new(),
        wake: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        flusher: AtomicBool::new(false),
        flushes_asked: AtomicU64::new(0),
        flushes_done: Mutex::new(0),
        flushed: Condvar::new(),
    });
    if SINK.set(sink.clone()).is_ok() {
        let flusher = sink.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || run_flusher(&flusher, &mut std::io::stderr()));
        sink.flusher.store(spawned.is_ok(), Ordering::Release);
    }
}

/// The flusher thread: writes the buffer out to `out` every [`FLUSH_EVERY`], or when woken, and
/// says which [`flush`] calls it has served. The only writer of the log while it runs, so
/// chunks reach stderr in order.
fn run_flusher(sink: &Sink, out: &mut dyn std::io::Write) {
    loop {
        if let Ok(b) = sink.buf.lock()
            && !sink.wake.swap(false, Ordering::Relaxed)
        {
            // Woken early when asked; spurious wake-ups only flush early.
            if let Ok((_b, _)) = sink.full.wait_timeout(b, FLUSH_EVERY) {
                sink.wake.store(false, Ordering::Relaxed);
            }
        }
        // Read before the buffer is taken: the lines of those calls are in it.
        let asked = sink.flushes_asked.load(Ordering::Acquire);
        flush_sink(sink, out);
        if let Ok(mut done) = sink.flushes_done.lock() {
            *done = asked;
            sink.flushed.notify_all();
        }
    }
}

/// Has whatever is buffered written out (at exit, and before an error line), waiting at most
/// [`FLUSH_WAIT`]. The flusher thread writes it: a stderr that does not drain blocks that
/// thread only, and the lines it has not taken by then are lost with the process.
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    if sink.flusher.load(Ordering::Acquire) {
        flush_via_flusher(sink);
    } else {
        flush_sink(sink, &mut std::io::stderr());
    }
}

/// Asks the flusher thread for a flush and waits for it, at most [`FLUSH_WAIT`].
fn flush_via_flusher(sink: &Sink) {
    let ticket = sink.flushes_asked.fetch_add(1, Ordering::AcqRel) + 1;
    if let Ok(mut b) = sink.buf.lock() {
        sink.wake_flusher(&mut b);
    }
    if let Ok(done) = sink.flushes_done.lock() {
        let _ = sink
            .flushed
            .wait_timeout_while(done, FLUSH_WAIT, |done| *done < ticket);
    }
}

fn flush_sink(sink: &Sink, out: &mut dyn std::io::Write) {
    let text = {
        let Ok(mut b) = sink.buf.lock() else { return };
        if b.is_empty() {
            return;
        }
        std::mem::replace(&mut *b, String::with_capacity(FLUSH_AT))
    };
    let _ = out.write_all(text.as_bytes());
    let dropped = sink.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = out.write_all(dropped_note(sink.format, dropped, SystemTime::now()).as_bytes());
    }
}

/// The line that says `dropped` lines were lost, in the log's format (in JSON, one object like
/// `tracing`'s own lines, so a pipeline reading one JSON object per line can read it too).
fn dropped_note(format: Format, dropped: u64, now: SystemTime) -> String {
    const WHY: &str = "stderr did not take them as fast as they came";
    let mut b = String::with_capacity(160);
    match format {
        Format::Text => {
            timestamp(&mut b, now);
            let _ = writeln!(b, "  WARN {dropped} log lines dropped: {WHY}");
        }
        Format::Json => {
            b.push_str("{\"timestamp\":\"");
            timestamp(&mut b, now);
            let _ = writeln!(
                b,
                "\",\"level\":\"WARN\",\"message\":\"{dropped} log lines dropped: {WHY}\",\"dropped\":{dropped}}}"
            );
        }
    }
    b
}

/// Appends to the buffer with `fill`, unless [`MAX_HELD`] bytes are waiting already (then the
/// line is counted as dropped); wakes the flusher when `now` or the buffer passes [`FLUSH_AT`].
fn append(sink: &Sink, now: bool, fill: impl FnOnce(&mut String)) {
    let Ok(mut b) = sink.buf.lock() else { return };
    if b.len() >= MAX_HELD {
        sink.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    fill(&mut b);
    if now || b.len() >= FLUSH_AT {
        sink.wake_flusher(&mut b);
    }
}

/// Records one request.
pub fn write(e: &Entry<'_>) {
    let Some(sink) = SINK.get() else { return };
    append(sink, false, |b| match sink.format {
        Format::Text => text_line(b, e),
        Format::Json => json_line(b, e),
    });
}

/// How the text format writes an event's fields: `name=value` after the message, as `tracing`'s
/// default does, but with each value written as [`text_value`] writes those of request lines:
/// bare when it is visible ASCII without a quote or `=`, else quoted and escaped like a JSON
/// string. A value quoting client input (a header named in a refusal, a JSON key) can then
/// neither fake fields of its line (`x" status=200 id=01FAKE`) nor start a line of its own.
pub fn text_fields() -> TextFields {
    TextFields
}

/// The field formatter of the text format (see [`text_fields`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for TextFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut line = TextFieldsLine::default();
        fields.record(&mut line);
        writer.write_str(&line.0)
    }
}

/// The fields of one event, as the text format writes them.
#[derive(Default)]
struct TextFieldsLine(String);

impl TextFieldsLine {
    fn push(&mut self, name: &str, value: &str) {
        // Those `tracing-log` adds to a `log` record say where it came from, as `tracing`'s
        // default formatter leaves them out.
        if name.starts_with("log.") {
            return;
        }
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if name == "message" {
            // The event's own words: control characters escaped, so it cannot start a line.
            let _ = OneLine(&mut self.0).write_str(value);
        } else {
            self.0.push_str(name);
            self.0.push('=');
            text_value(&mut self.0, value);
        }
    }
}

impl tracing::field::Visit for TextFieldsLine {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.push(field.name(), value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.push(field.name(), &format!("{value:?}"));
    }
}

/// Writes through to `W` with control characters escaped (`\n`, `\u{1b}`, ...).
struct OneLine<'a, W>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for OneLine<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if c.is_control() {
                self.0.write_str(&s[start..i])?;
                write!(self.0, "{}", c.escape_default())?;
                start = i + c.len_utf8();
            }
        }
        self.0.write_str(&s[start..])
    }
}

/// The process's log lines (`tracing`'s writer): through the request log's buffer, so no thread
/// but the flusher waits on stderr; each wakes the flusher, so they come out at once. (Before
/// [`init`] they go to stderr directly.)
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(sink) = SINK.get() else {
            return std::io::stderr().lock().write_all(buf).map(|()| buf.len());
        };
        append(sink, true, |b| b.push_str(&String::from_utf8_lossy(buf)));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn text_line(b: &mut String, e: &Entry<'_>) {
    timestamp(b, e.created_at);
    b.push_str("  INFO request id=");
    b.push_str(e.id);
    if let Some(p) = e.provider {
        b.push_str(" provider=");
        text_value(b, p);
    }
    b.push_str(" method=");
    b.push_str(e.method);
    b.push_str(" path=");
    // Quoted when it holds a quote or more than visible ASCII (the parser takes obs-text).
    text_value(b, e.path);
    b.push_str(" status_code=");
    push_u64(b, e.status_code.into());
    b.push_str(if e.success() {
        " success=true"
    } else {
        " success=false"
    });
    b.push_str(" duration=");
    push_millis(b, e.duration);
    b.push_str(" bytes=");
    push_u64(b, e.bytes);
    b.push_str(" outcome=");
    b.push_str(e.outcome);
    if e.cached {
        b.push_str(" cached=true");
    }
    if let Some(n) = e.tokens_in {
        b.push_str(" tokens_in=");
        push_u64(b, n);
    }
    if let Some(n) = e.tokens_out {
        b.push_str(" tokens_out=");
        push_u64(b, n);
    }
    if let Some(m) = e.model {
        b.push_str(" model=");
        text_value(b, m);
    }
    if let Some(c) = e.cost {
        b.push_str(" cost=");
        push_usd(b, c);
    }
    if e.custom_cost {
        b.push_str(" custom_cost=true");
    }
    if let Some(m) = e.metadata {
        // Compact JSON (re-serialized when the header was read), as it is while it holds
        // visible ASCII only; else quoted and escaped like a JSON string, so that a value with
        // a space cannot fake another field (`{"team":"a status_code=200"}`).
        b.push_str(" metadata=");
        if m.bytes().all(|c| c.is_ascii_graphic()) {
            b.push_str(m);
        } else {
            json_str(b, m);
        }
    }
    if let Some(n) = e.step {
        b.push_str(" step=");
        push_u64(b, n.into());
    }
    if let Some(id) = e.event_id {
        b.push_str(" event_id=");
        text_value(b, id);
    }
    if let Some(p) = &e.payloads {
        // Quoted and escaped like JSON strings: a body cannot break the line.
        b.push_str(" request_body=");
        json_str(b, &String::from_utf8_lossy(p.request));
        b.push_str(" response_body=");
        json_str(b, &String::from_utf8_lossy(p.response));
        if p.request_cut || p.response_cut {
            b.push_str(" payload_truncated=true");
        }
    }
    b.push('\n');
}

fn json_line(b: &mut String, e: &Entry<'_>) {
    b.push_str("{\"created_at\":\"");
    timestamp(b, e.created_at);
    b.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"id\":\"");
    b.push_str(e.id);
    b.push_str("\",\"provider\":");
    json_opt_str(b, e.provider);
    b.push_str(",\"model\":");
    json_opt_str(b, e.model);
    b.push_str(",\"method\":");
    json_str(b, e.method);
    b.push_str(",\"path\":");
    json_str(b, e.path);
    b.push_str(",\"status_code\":");
    push_u64(b, e.status_code.into());
    b.push_str(if e.success() {
        ",\"success\":true"
    } else {
        ",\"success\":false"
    });
    b.push_str(if e.cached {
        ",\"cached\":true"
    } else {
        ",\"cached\":false"
    });
    b.push_str(",\"duration\":");
    push_millis(b, e.duration);
    b.push_str(",\"bytes\":");
    push_u64(b, e.bytes);
    b.push_str(",\"outcome\":\"");
    b.push_str(e.outcome);
    b.push_str("\",\"tokens_in\":");
    json_opt_u64(b, e.tokens_in);
    b.push_str(",\"tokens_out\":");
    json_opt_u64(b, e.tokens_out);
    b.push_str(",\"cost\":");
    match e.cost {
        Some(c) => push_usd(b, c),
        None => b.push_str("null"),
    }
    b.push_str(if e.custom_cost {
        ",\"custom_cost\":true"
    } else {
        ",\"custom_cost\":false"
    });
    // Already compact JSON (re-serialized when the header was read).
    b.push_str(",\"metadata\":");
    b.push_str(e.metadata.unwrap_or("null"));
    b.push_str(",\"step\":");
    json_opt_u64(b, e.step.map(u64::from));
    b.push_str(",\"event_id\":");
    json_opt_str(b, e.event_id);
    if let Some(p) = &e.payloads {
        b.push_str(",\"request_body\":");
        json_str(b, &String::from_utf8_lossy(p.request));
        b.push_str(",\"response_body\":");
        json_str(b, &String::from_utf8_lossy(p.response));
        if p.request_cut || p.response_cut {
            b.push_str(",\"payload_truncated\":true");
        }
    }
    b.push_str("}\n");
}

/// Appends a text-line value: as it is when it is visible ASCII without a quote or `=`, else
/// quoted and escaped like a JSON string (a client's value cannot fake another field or break
/// the line).
fn text_value(b: &mut String, s: &str) {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'=')
    {
        b.push_str(s);
    } else {
        json_str(b, s);
    }
}

/// Appends `s` as a JSON string, or `null`.
fn json_opt_str(b: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(b, s),
        None => b.push_str("null"),
    }
}

/// Appends `n` as a JSON number, or `null`.
fn json_opt_u64(b: &mut String, n: Option<u64>) {
    match n {
        Some(n) => push_u64(b, n),
        None => b.push_str("null"),
    }
}

/// Appends `n` in decimal.
fn push_u64(b: &mut String, n: u64) {
    b.push_str(itoa::Buffer::new().format(n));
}

/// Appends a USD amount as a JSON number (shortest decimal of [`round_usd`], never an
/// exponent).
fn push_usd(b: &mut String, usd: f64) {
    if usd.is_finite() {
        let _ = write!(b, "{}", round_usd(usd));
    } else {
        b.push('0');
    }
}

/// Significant digits a written cost keeps: a price times tokens summed in binary floating
/// point ends in noise past the 15th (`0.000016800000000000002`).
const USD_DIGITS: i32 = 12;

/// `usd` rounded to [`USD_DIGITS`] significant digits, for the log lines and spans.
pub(crate) fn round_usd(usd: f64) -> f64 {
    if usd == 0.0 || !usd.is_finite() {
        return usd;
    }
    // Exact powers of ten (up to 1e22) keep the rounding exact: `n / 10^k` is the nearest
    // double to the decimal it stands for.
    const POW10: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    let k = USD_DIGITS - 1 - usd.abs().log10().floor() as i32;
    let Some(&scale) = usize::try_from(k).ok().and_then(|k| POW10.get(k)) else {
        return usd;
    };
    (usd * scale).round() / scale
}

/// Appends milliseconds with three decimals (like `{:.3}`, to the microsecond).
fn push_millis(b: &mut String, ms: f64) {
    if !(0.0..1e15).contains(&ms) {
        let _ = write!(b, "{ms:.3}");
        return;
    }
    let us = (ms * 1000.0).round() as u64;
    push_u64(b, us / 1000);
    b.push('.');
    let frac = us % 1000;
    b.push(char::from(b'0' + (frac / 100) as u8));
    b.push(char::from(b'0' + (frac / 10 % 10) as u8));
    b.push(char::from(b'0' + (frac % 10) as u8));
}

/// Appends `s` as a JSON string.
fn json_str(b: &mut String, s: &str) {
    b.push('"');
    for c in s.chars() {
        match c {
            '"' => b.push_str("\\\""),
            '\\' => b.push_str("\\\\"),
            // Control characters (C1 too: NEL breaks lines, CSI starts terminal sequences),
            // line separators and bidirectional controls (which reorder what a reader sees).
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                let _ = write!(b, "\\u{:04x}", c as u32);
            }
            c => b.push(c),
        }
    }
    b.push('"');
}

/// The formatted date and time of the last second a line was written in (`YYYY-MM-DDTHH:MM:SS`).
static SECOND: Mutex<(u64, String)> = Mutex::new((u64::MAX, String::new()));

/// Appends an RFC 3339 UTC timestamp with microseconds.
fn timestamp(b: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    {
        let mut cached = SECOND.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != secs {
            let (y, m, day) = civil_from_days((secs / 86_400) as i64);
            let s = secs % 86_400;
            cached.1.clear();
            let _ = write!(
                cached.1,
                "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
                s / 3600,
                s / 60 % 60,
                s % 60,
            );
            cached.0 = secs;
        }
        b.push_str(&cached.1);
    }
    b.push('.');
    let mut us = d.subsec_micros();
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (us % 10) as u8;
        us /= 10;
    }
    for &c in &digits {
        b.push(char::from(c));
    }
    b.push('Z');
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_log_fields_cannot_start_a_line() {
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Out {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("out").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Out::default();
        let make = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || make.clone())
            .with_ansi(false)
            .fmt_fields(text_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let err = "unknown field `zz\n2026-01-01 INFO forged`";
            tracing::info!(error = %err, code = 2108, name = "a\rb", "request refused\nby me");
            let alias = r#"x" status=200 code=0 id=01FAKE"#;
            tracing::info!(
                provider = "openai",
                alias,
                query = "a=b",
                blank = "",
                status = 400u16,
                id = "01REAL",
                "request refused"
            );
        });
        let text = String::from_utf8(out.0.lock().expect("out").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.contains(r#"request refused\nby me error="unknown field `zz\u000a2026-01-01 INFO forged`" code=2108 name="a\u000db""#),
            "{text}"
        );
        // The client's value is one quoted field: the line's own fields stay the only ones.
        assert!(
            text.contains(r#" request refused provider=openai alias="x\" status=200 code=0 id=01FAKE" query="a=b" blank="" status=400 id=01REAL"#),
            "{text}"
        );
    }

    #[test]
    fn the_note_on_dropped_lines_is_in_the_log_format() {
        let at = UNIX_EPOCH + Duration::from_micros(1_795_646_428_555_485);
        let note = dropped_note(Format::Json, 42, at);
        assert!(
            note.ends_with("}\n") && note.matches('\n').count() == 1,
            "{note}"
        );
        let v: serde_json::Value = serde_json::from_str(note.trim_end()).expect("one JSON object");
        assert_eq!(v["timestamp"], "2026-11-25T22:40:28.555485Z");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["dropped"], 42);
        assert_eq!(
            v["message"],
            "42 log lines dropped: stderr did not take them as fast as they came"
        );
        assert_eq!(
            dropped_note(Format::Text, 42, at),
            "2026-11-25T22:40:28.555485Z  WARN 42 log lines dropped: stderr did not take them as fast as they came\n"
        );
    }

    /// A sink served by a flusher thread writing to `out`.
    fn sink_with_flusher(out: impl std::io::Write + Send + 'static) -> Arc<Sink> {
        let sink = Arc::new(Sink {
            format: Format::Text,
            buf: Mutex::new(String::new()),
            full: Condvar::new(),
            wake: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            flusher: AtomicBool::new(true),
            flushes_asked: AtomicU64::new(0),
            flushes_done: Mutex::new(0),
            flushed: Condvar::new(),
        });
        let flusher = sink.clone();
        let mut out = out;
        std::thread::spawn(move || run_flusher(&flusher, &mut out));
        sink
    }

    /// A stderr that takes what it is given (into a shared buffer), or one whose writes say they
    /// began, then block until the release's sender is dropped (a log pipe nobody drains).
    struct Stderr {
        took: Arc<Mutex<Vec<u8>>>,
        stuck: Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>,
    }

    impl std::io::Write for Stderr {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some((began, release)) = &self.stuck {
                let _ = began.send(());
                let _ = release.recv();
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.took.lock().expect("took").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flush_writes_out_what_is_held_through_the_flusher() {
        let took = Arc::new(Mutex::new(Vec::new()));
        let sink = sink_with_flusher(Stderr {
            took: took.clone(),
            stuck: None,
        });
        append(&sink, false, |b| b.push_str("one\n"));
        append(&sink, false, |b| b.push_str("two\n"));
        let started = std::time::Instant::now();
        flush_via_flusher(&sink);
        assert!(started.elapsed() < FLUSH_WAIT, "{:?}", started.elapsed());
        assert_eq!(took.lock().expect("took").as_slice(), b"one\ntwo\n");
    }

    #[test]
    fn a_flush_waits_for_a_stderr_that_does_not_drain_no_longer_than_its_bound() {
        let (release, blocked) = std::sync::mpsc::channel();
        let (began, writing) = std::sync::mpsc::channel();
        let sink = sink_with_flusher(Stderr {
            took: Arc::default(),
            stuck: Some((began, blocked)),
        });
        append(&sink, true, |b| b.push_str("stuck\n"));
        // The flusher takes the line and blocks writing it, as in write(2) on a full pipe.
        writing.recv().expect("the flusher writes");
        append(&sink, false, |b| b.push_str("held\n"));
        let started = std::time::Instant::now();
        flush_via_flusher(&sink);
        let took = started.elapsed();
        assert!(took >= FLUSH_WAIT && took < FLUSH_WAIT * 3, "{took:?}");
        drop(release);
    }

    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            id: "01ABC",
            created_at: UNIX_EPOCH + Duration::from_micros(1_795_646_428_555_485),
            provider: Some("openai"),
            model: None,
            method: "POST",
            path: "chat/\"completions",
            status_code: 200,
            duration: 1.5,
            bytes: 10,
            outcome: "complete",
            cached: false,
            tokens_in: None,
            tokens_out: None,
            cost: None,
            custom_cost: false,
            metadata: None,
            step: None,
            event_id: None,
            payloads: None,
        }
    }

    fn json(e: &Entry<'_>) -> serde_json::Value {
        let mut b = String::new();
        json_line(&mut b, e);
        assert!(b.ends_with("}\n") && b.matches('\n').count() == 1, "{b}");
        serde_json::from_str(b.trim_end()).expect("valid json")
    }

    fn text(e: &Entry<'_>) -> String {
        let mut b = String::new();
        text_line(&mut b, e);
        assert!(b.ends_with('\n') && b.matches('\n').count() == 1, "{b}");
        b
    }

    #[test]
    fn payloads_are_escaped_strings_that_cannot_break_the_line() {
        let bodies = Bodies {
            request: b"{\"q\":\"line one\nline \\\"two\\\"\"}",
            request_cut: false,
            response: b"data: {\"x\":1}\n\n\xff",
            response_cut: true,
        };
        let v = json(&Entry {
            payloads: Some(bodies),
            ..entry()
        });
        assert_eq!(v["request_body"], "{\"q\":\"line one\nline \\\"two\\\"\"}");
        assert_eq!(v["response_body"], "data: {\"x\":1}\n\n\u{fffd}");
        assert_eq!(v["payload_truncated"], true);
        let b = text(&Entry {
            payloads: Some(Bodies {
                request: b"hi",
                request_cut: false,
                response: b"a\nb",
                response_cut: false,
            }),
            ..entry()
        });
        assert!(
            b.contains(r#" request_body="hi" response_body="a\u000ab""#),
            "{b}"
        );
        assert!(!b.contains("payload_truncated"), "{b}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut b = String::new();
        timestamp(
            &mut b,
            UNIX_EPOCH + Duration::from_micros(1_795_646_428_555_485),
        );
        assert_eq!(b, "2026-11-25T22:40:28.555485Z");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn json_lines_carry_every_spec_field_null_when_unknown() {
        let v = json(&entry());
        let spec = [
            "id",
            "created_at",
            "provider",
            "model",
            "path",
            "status_code",
            "success",
            "cached",
            "duration",
            "tokens_in",
            "tokens_out",
            "cost",
            "custom_cost",
            "metadata",
            "step",
            "event_id",
        ];
        for f in spec {
            assert!(v.get(f).is_some(), "{f} missing: {v}");
        }
        for old in ["log_id", "timestamp", "status", "duration_ms"] {
            assert!(v.get(old).is_none(), "{old} still there: {v}");
        }
        assert_eq!(v["id"], "01ABC");
        assert_eq!(v["created_at"], "2026-11-25T22:40:28.555485Z");
        assert_eq!(v["provider"], "openai");
        assert_eq!(v["path"], "chat/\"completions");
        assert_eq!(v["status_code"], 200);
        assert_eq!(v["success"], true);
        assert_eq!(v["cached"], false);
        assert_eq!(v["duration"], 1.5);
        assert_eq!(v["custom_cost"], false);
        assert_eq!(v["message"], "request");
        for unknown in [
            "model",
            "tokens_in",
            "tokens_out",
            "cost",
            "metadata",
            "step",
            "event_id",
        ] {
            assert!(v[unknown].is_null(), "{unknown}: {v}");
        }
        let v = json(&Entry {
            provider: None,
            ..entry()
        });
        assert!(v["provider"].is_null(), "{v}");
        let v = json(&Entry {
            metadata: Some(r#"{"team":"a b","n":1}"#),
            model: Some("gpt-4o-mini"),
            tokens_in: Some(3),
            tokens_out: Some(4),
            cost: Some(0.0000225),
            custom_cost: true,
            step: Some(2),
            ..entry()
        });
        assert_eq!(v["metadata"]["team"], "a b");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!((&v["tokens_in"], &v["tokens_out"]), (&3.into(), &4.into()));
        assert_eq!(v["cost"], 0.0000225);
        assert_eq!(v["custom_cost"], true);
        assert_eq!(v["step"], 2);
    }

    #[test]
    fn client_values_are_escaped_in_both_formats() {
        let sneaky = "ev \"1\"\\\n\",\"success\":true provider=x";
        let e = Entry {
            event_id: Some(sneaky),
            model: Some("m\"odel"),
            provider: Some("custom-a b"),
            status_code: 429,
            outcome: "refused",
            ..entry()
        };
        let v = json(&e);
        assert_eq!(v["event_id"], sneaky);
        assert_eq!(v["model"], "m\"odel");
        assert_eq!(v["provider"], "custom-a b");
        assert_eq!(v["success"], false);
        let b = text(&e);
        assert!(
            b.contains(r#" event_id="ev \"1\"\\\u000a\",\"success\":true provider=x""#),
            "{b}"
        );
        assert!(b.contains(r#" provider="custom-a b" "#), "{b}");
        assert!(b.contains(r#" model="m\"odel""#), "{b}");
        assert_eq!(b.matches(" success=").count(), 1, "{b}");
        assert!(b.contains(" success=false "), "{b}");
        let b = text(&Entry {
            event_id: Some("order-42"),
            ..entry()
        });
        assert!(b.trim_end().ends_with(" event_id=order-42"), "{b}");
        // A path with a quote, C1 controls (NEL, CSI), a line separator and a bidi override:
        // quoted and escaped, in both formats.
        let odd = "/openai/\"v1\u{85}\u{9b}[2J\u{2028}\u{202e}x";
        let e = Entry {
            path: odd,
            model: Some("gpt\u{85}x"),
            ..entry()
        };
        let b = text(&e);
        assert!(
            b.contains(r#" path="/openai/\"v1\u0085\u009b[2J\u2028\u202ex" "#),
            "{b}"
        );
        assert!(b.contains(r#" model="gpt\u0085x""#), "{b}");
        assert_eq!(b.trim_end().lines().count(), 1);
        assert!(!b.contains('\u{85}') && !b.contains('\u{2028}'), "{b}");
        let v = json(&e);
        assert_eq!(v["path"], odd);
        let mut raw = String::new();
        json_line(&mut raw, &e);
        assert!(
            !raw.contains('\u{85}') && !raw.contains('\u{202e}'),
            "{raw}"
        );
    }

    #[test]
    fn success_is_a_2xx_or_3xx_whose_body_completed() {
        let ok = |status_code, outcome| {
            Entry {
                status_code,
                outcome,
                ..entry()
            }
            .success()
        };
        assert!(ok(200, "complete") && ok(304, "complete"));
        assert!(!ok(200, "cancelled") && !ok(200, "upstream_error") && !ok(200, "buffers_full"));
        assert!(!ok(400, "complete") && !ok(429, "refused") && !ok(502, "complete"));
    }

    #[test]
    fn text_lines_name_every_field() {
        let b = text(&entry());
        assert!(
            b.starts_with("2026-11-25T22:40:28.555485Z  INFO request id=01ABC provider=openai "),
            "{b}"
        );
        for f in [
            " method=POST",
            " status_code=200 success=true",
            " duration=1.500",
            " bytes=10",
            " outcome=complete",
        ] {
            assert!(b.contains(f), "{b}");
        }
        for absent in [
            "cached",
            "log_id",
            " status=",
            "duration_ms",
            "step",
            "event_id",
        ] {
            assert!(!b.contains(absent), "{absent}: {b}");
        }
        let b = text(&Entry {
            cached: true,
            ..entry()
        });
        assert!(
            b.trim_end().ends_with("outcome=complete cached=true"),
            "{b}"
        );
        let b = text(&Entry {
            model: Some("gpt-4o"),
            cost: Some(1e-7),
            step: Some(1),
            ..entry()
        });
        assert!(
            b.trim_end().ends_with("model=gpt-4o cost=0.0000001 step=1"),
            "{b}"
        );
        let b = text(&Entry {
            provider: None,
            ..entry()
        });
        assert!(b.contains("id=01ABC method=POST"), "{b}");
    }

    #[test]
    fn metadata_with_spaces_is_quoted_in_text_lines() {
        let b = text(&Entry {
            metadata: Some(r#"{"team":"a","n":2}"#),
            ..entry()
        });
        assert!(
            b.trim_end().ends_with(r#" metadata={"team":"a","n":2}"#),
            "{b}"
        );
        let forged = r#"{"team":"a status_code=200 success=true"}"#;
        let b = text(&Entry {
            metadata: Some(forged),
            status_code: 400,
            outcome: "refused",
            ..entry()
        });
        let quoted = r#" metadata="{\"team\":\"a status_code=200 success=true\"}""#;
        assert!(b.contains(quoted), "{b}");
        // Outside the quoted value, the line has its own fields only.
        let rest = b.replace(quoted, "");
        assert_eq!(rest.matches(" status_code=").count(), 1, "{b}");
        assert!(rest.contains(" status_code=400 success=false "), "{b}");
        // Other characters past visible ASCII (a non-breaking space) are quoted too.
        let b = text(&Entry {
            metadata: Some("{\"t\":\"a\u{a0}b\"}"),
            ..entry()
        });
        assert!(b.contains(" metadata=\"{"), "{b}");
    }

    #[test]
    fn costs_are_written_without_float_noise() {
        let noisy = 12.0 * 0.15e-6 + 25.0 * 0.6e-6;
        for (usd, want) in [
            (0.000016800000000000002, "0.0000168"),
            (0.1 + 0.2, "0.3"),
            (noisy, "0.0000168"),
            (0.0000225, "0.0000225"),
            (1e-7, "0.0000001"),
            (123.456789012345, "123.456789012"),
            (0.0, "0"),
        ] {
            let mut b = String::new();
            push_usd(&mut b, usd);
            assert_eq!(b, want, "{usd:?}");
        }
        let mut b = String::new();
        json_line(
            &mut b,
            &Entry {
                cost: Some(0.000016800000000000002),
                ..entry()
            },
        );
        assert!(b.contains(r#","cost":0.0000168,"#), "{b}");
    }

    #[test]
    fn numbers_are_formatted_like_fmt() {
        for n in [0u64, 7, 10, 99, 200, 65_535, 1_234_567, u64::MAX] {
            let mut b = String::new();
            push_u64(&mut b, n);
            assert_eq!(b, n.to_string());
        }
        for ms in [0.0, 0.0004, 0.0015, 1.5, 12.3456, 999.9999, 123_456.789] {
            let mut b = String::new();
            push_millis(&mut b, ms);
            assert_eq!(b, format!("{ms:.3}"), "{ms}");
        }
        let mut b = String::new();
        let t = UNIX_EPOCH + Duration::from_micros(1_795_646_428_000_007);
        timestamp(&mut b, t);
        timestamp(&mut b, t + Duration::from_micros(1_000_000));
        assert_eq!(b, "2026-11-25T22:40:28.000007Z2026-11-25T22:40:29.000007Z");
    }
}
