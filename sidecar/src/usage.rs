//! Token counts read from responses as they stream through, for logs and metrics: the `usage`
//! objects of OpenAI (`prompt_tokens`/`completion_tokens`, the Responses API's `input_tokens`/
//! `output_tokens`), Anthropic (`input_tokens`/`output_tokens`, in `message_start` and
//! `message_delta` for streams), Gemini (`usageMetadata.promptTokenCount`/
//! `candidatesTokenCount`) and Bedrock Converse (`inputTokens`/`outputTokens`), with the parts
//! that are priced apart or counted outside those two numbers:
//!
//! - prompt-cache reads and writes counted *beside* the input (Anthropic
//!   `cache_read_input_tokens`/`cache_creation_input_tokens`, the 1-hour part in
//!   `cache_creation.ephemeral_1h_input_tokens`; Bedrock `cacheReadInputTokens`/
//!   `cacheWriteInputTokens`, the 1-hour part in `cacheDetails[{"ttl":"1h","inputTokens":n}]`);
//! - prompt-cache reads counted *inside* the input (OpenAI `prompt_tokens_details.cached_tokens`
//!   and `input_tokens_details.cached_tokens`, Gemini `cachedContentTokenCount`, DeepSeek
//!   `prompt_cache_hit_tokens`);
//! - Gemini's thinking (`thoughtsTokenCount`, billed as output beside `candidatesTokenCount`)
//!   and tool-use prompt (`toolUsePromptTokenCount`, input beside `promptTokenCount`);
//! - audio and image tokens, priced apart by some models: OpenAI's `audio_tokens` in
//!   `prompt_tokens_details`/`input_token_details` (transcriptions) and
//!   `completion_tokens_details`, Gemini's `promptTokensDetails`/`candidatesTokensDetails`
//!   entries of modality `AUDIO` or `IMAGE`, all counted inside the input or output;
//! - image tokens in, priced apart by OpenAI's image models (`input_tokens_details.image_tokens`
//!   of an `/images/generations` or `/images/edits` answer; `output_tokens_details.image_tokens`
//!   out), inside the input or output;
//! - Anthropic's server-side web searches (`server_tool_use.web_search_requests`), charged apart;
//! - a realtime response's cached image tokens (counted by [`crate::websocket`]), priced apart;
//! - the seconds of audio a transcription billed by duration reports (`whisper-1`:
//!   `usage: {"type": "duration", "seconds": n}`);
//! - the cost the provider states for a request, read on its own answers only: Perplexity's
//!   `usage.cost.total_cost`, OpenRouter's `usage.cost` (plus, on a request it served with the
//!   account's own provider key, `is_byok: true`, the provider's charge in
//!   `cost_details.upstream_inference_cost`, which `cost` leaves out).
//!
//! Imagen's answers (`:predict` of an `imagen-*` model) have no usage: their images are counted
//! (each prediction's `"bytesBase64Encoded"`); so are those of OpenAI's (and Azure OpenAI's)
//! image answers (each image of `data`: DALL·E's have no usage, gpt-image-1's have one, read
//! too). An OpenAI (or Azure OpenAI) Responses answer's hosted tool calls charged per call (web
//! and file searches) are counted from its output items (`ToolCalls`). Vertex AI's embeddings (`:predict` of another
//! model) have none either: each prediction's `embeddings.statistics.token_count` is input, and
//! `metadata.billableCharacterCount` the characters some of those models are priced by.
//!
//! No JSON is parsed: each body frame is searched for `"usage` and the `"key": number` pairs of
//! the object after it are read (keys of its own level; the few nested ones above by name). The
//! last value seen wins (stream usage is cumulative): an object with the input (output) number
//! replaces every input-side (output-side) count, one without it (Anthropic's `message_delta`)
//! only the counts it has. When a frame ends inside a usage object (or inside `"usage` itself),
//! that piece is kept and read again together with the start of the next frame; nothing is
//! copied otherwise. Text inside JSON strings cannot pass for a usage object: its quotes are
//! escaped, so no key in it matches.

use std::sync::LazyLock;

use memchr::memmem;

/// What a key of a usage object counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    /// The input number (OpenAI, Gemini: all of it; Anthropic, Bedrock: the uncached part).
    Input,
    /// The output number.
    Output,
    /// Cache reads beside the input (Anthropic, Bedrock).
    ReadBeside,
    /// Cache writes beside the input (Anthropic, Bedrock).
    WriteBeside,
    /// Cache reads inside the input (OpenAI, Gemini, DeepSeek).
    ReadInside,
    /// Gemini's tool-use prompt, input beside the prompt.
    ToolPrompt,
    /// Gemini's thinking, output beside the candidates.
    Thoughts,
    /// Of the cache writes, those kept for an hour (Anthropic).
    Write1h,
    /// The total the answer states (`total_tokens`), which tells whether reasoning is counted
    /// inside the output (OpenAI) or beside it (xAI).
    Total,
    /// Reasoning tokens (`completion_tokens_details.reasoning_tokens`).
    Reasoning,
    /// Of the input, audio tokens (`prompt_tokens_details.audio_tokens`, a transcription's
    /// `input_token_details.audio_tokens`).
    AudioIn,
    /// Of the output, audio tokens (`completion_tokens_details.audio_tokens`).
    AudioOut,
    /// Of the input, image tokens (`input_tokens_details.image_tokens`).
    ImageIn,
    /// Of the output, image tokens (`output_tokens_details.image_tokens`).
    ImageOut,
    /// Anthropic's `server_tool_use.web_search_requests`.
    WebSearches,
}

/// What a key of the usage object's own level counts.
fn own_field(key: &[u8]) -> Option<Field> {
    // A match on byte strings: the length picks the few candidates to compare.
    Some(match key {
        b"prompt_tokens" | b"input_tokens" | b"promptTokenCount" | b"inputTokens" => Field::Input,
        b"completion_tokens" | b"output_tokens" | b"candidatesTokenCount" | b"outputTokens" => {
            Field::Output
        }
        b"cache_read_input_tokens" | b"cacheReadInputTokens" => Field::ReadBeside,
        b"cache_creation_input_tokens" | b"cacheWriteInputTokens" => Field::WriteBeside,
        b"cachedContentTokenCount" | b"prompt_cache_hit_tokens" => Field::ReadInside,
        b"toolUsePromptTokenCount" => Field::ToolPrompt,
        b"thoughtsTokenCount" => Field::Thoughts,
        b"total_tokens" => Field::Total,
        _ => return None,
    })
}

/// What a key one object down counts, in the object named `parent` (`prompt_tokens_details`,
/// `input_tokens_details`, `cache_creation`, `server_tool_use`, ...).
fn nested_field(parent: &[u8], key: &[u8]) -> Option<Field> {
    match key {
        b"cached_tokens" => Some(Field::ReadInside),
        b"ephemeral_1h_input_tokens" => Some(Field::Write1h),
        b"reasoning_tokens" => Some(Field::Reasoning),
        b"audio_tokens" => match parent {
            b"prompt_tokens_details" | b"input_tokens_details" | b"input_token_details" => {
                Some(Field::AudioIn)
            }
            b"completion_tokens_details" | b"output_tokens_details" | b"output_token_details" => {
                Some(Field::AudioOut)
            }
            _ => None,
        },
        b"image_tokens" => match parent {
            b"prompt_tokens_details" | b"input_tokens_details" => Some(Field::ImageIn),
            b"completion_tokens_details" | b"output_tokens_details" => Some(Field::ImageOut),
            _ => None,
        },
        b"web_search_requests" if parent == b"server_tool_use" => Some(Field::WebSearches),
        _ => None,
    }
}

/// The modality of a Gemini `ModalityTokenCount` entry, where it is priced apart from text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Modality {
    Audio,
    Image,
}

/// The keys an answer's images are counted by (see [`ImageKeys`]).
const IMAGEN_KEYS: [&[u8]; 2] = [b"\"bytesBase64Encoded\"", b"\"gcsUri\""];
const OPENAI_IMAGE_KEYS: [&[u8]; 2] = [b"\"b64_json\"", b"\"url\""];
static IMAGEN_FINDERS: LazyLock<[memmem::Finder<'static>; 2]> =
    LazyLock::new(|| IMAGEN_KEYS.map(memmem::Finder::new));
static OPENAI_IMAGE_FINDERS: LazyLock<[memmem::Finder<'static>; 2]> =
    LazyLock::new(|| OPENAI_IMAGE_KEYS.map(memmem::Finder::new));
/// Bytes of one frame's end kept for the next: a key cut by it, or one whose colon (after
/// spaces) has not come yet.
const IMAGE_CARRY: usize = 64;
/// Largest cost a provider may state for one request, in USD (as `cf-aig-custom-cost`'s).
const MAX_STATED_COST: f64 = 1_000_000.0;
/// Longest audio a request may report, in seconds (OpenAI takes files of 25 MB at most).
const MAX_AUDIO_SECONDS: f64 = 1_000_000.0;
const NEEDLE: &[u8] = b"\"usage";
/// What the finder looks for: `usage` without the quote, which JSON is full of (a quote as
/// the first byte would make every string a candidate); the quote is checked after.
const WORD: &[u8] = b"usage";
/// Longest usage object read (they are well under this, even pretty-printed with Gemini's
/// per-modality details for every modality of a prompt over cached content).
const WINDOW: usize = 8 * 1024;

static FINDER: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(WORD));
/// Cohere's `meta` object, read as a usage object where its counts are ([`Usage::for_answer`]).
const META_NEEDLE: &[u8] = b"\"meta";
static META_FINDER: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(&META_NEEDLE[1..]));
/// The keys of a Vertex AI embedding's token count (one per prediction's `statistics`) and of
/// the characters billed for the request (its `metadata`).
static TOKEN_COUNT_FINDER: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"token_count\""));
static CHARACTERS_FINDER: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"billableCharacterCount\""));

/// Whether an OpenAI-format provider takes `stream_options.include_usage`, which the gateway
/// adds to streams that lack it so that their tokens are counted. Providers that refuse fields
/// they do not know are left out: Mistral answers 422 to it (and, like Perplexity, sends usage
/// in every stream anyway); Azure takes it on its v1 API (`rest` under `{resource}/openai/v1/`)
/// and elsewhere from `api-version` 2024-09-01 on; others (`cohere`, `huggingface`,
/// `workers-ai`, `custom-*`) are not known to take it.
pub fn takes_stream_options(provider: &str, rest: &str, query: Option<&str>) -> bool {
    match provider {
        "openai" | "groq" | "deepseek" | "grok" | "openrouter" => true,
        "azure-openai" if crate::providers::is_azure_v1(rest) => true,
        "azure-openai" => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("api-version="))
            .is_some_and(|v| v.get(..10).is_some_and(|date| date >= "2024-09-01")),
        _ => false,
    }
}

/// The tokens of a response as providers bill them: all input (fresh, cache reads and cache
/// writes), of which the cache reads and writes, the audio and the images, and all output
/// (thinking included), of which the audio and images; and what is charged beside tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tokens {
    /// All input tokens; `None` when the response reported none.
    pub input: Option<u64>,
    /// All output tokens; `None` when the response reported none.
    pub output: Option<u64>,
    /// Of the input, the tokens read from the provider's prompt cache.
    pub cache_read: u64,
    /// Of the input, the tokens written to the provider's prompt cache.
    pub cache_write: u64,
    /// Of the cache writes, those kept for an hour (Anthropic's dearer writes).
    pub cache_write_1h: u64,
    /// Of the input not read from the cache, audio tokens.
    pub audio_input: u64,
    /// Of the cache reads, audio tokens (priced at the model's cached-audio rate).
    pub audio_cache_read: u64,
    /// Of the cache reads not audio, image tokens (priced at the model's cached-image rate).
    pub image_cache_read: u64,
    /// Of the input not read from the cache nor audio, image tokens.
    pub image_input: u64,
    /// Of the output, audio tokens.
    pub audio_output: u64,
    /// Of the output, image tokens.
    pub image_output: u64,
    /// Images generated (an Imagen or DALL·E answer, which has no tokens).
    pub images: u64,
    /// Server-side web searches (Anthropic's, OpenAI's `web_search_call`s).
    pub web_searches: u64,
    /// The web searches were made with OpenAI's `web_search_preview` tool (priced apart).
    pub web_search_preview: bool,
    /// OpenAI's file searches (`file_search_call`s).
    pub file_searches: u64,
    /// Seconds of audio billed by duration (a `whisper-1` transcription, which has no tokens).
    pub audio_seconds: f64,
    /// Characters billed (a Vertex AI embedding: `metadata.billableCharacterCount`).
    pub characters: u64,
    /// The cost the provider states for the request, in USD (Perplexity, OpenRouter).
    pub stated_cost: Option<f64>,
}

impl Tokens {
    /// Input and output with no cache reads or writes.
    pub fn plain(input: Option<u64>, output: Option<u64>) -> Self {
        Self {
            input,
            output,
            ..Self::default()
        }
    }

    /// The two totals, for metrics and the usage limits.
    pub fn totals(&self) -> [Option<u64>; 2] {
        [self.input, self.output]
    }

    /// Whether the answer called a hosted tool charged per call.
    pub fn tool_calls(&self) -> bool {
        self.web_searches > 0 || self.file_searches > 0
    }
}

/// The numbers of usage, as the provider reported them (one per [`Field`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// The input number (`prompt_tokens`, `input_tokens`, ...): for Anthropic and Bedrock
    /// without the cache reads and writes. [`Usage::tokens`] has the total.
    pub input: Option<u64>,
    /// The output number; without Gemini's thinking.
    pub output: Option<u64>,
    read_beside: Option<u64>,
    write_beside: Option<u64>,
    read_inside: Option<u64>,
    tool_prompt: Option<u64>,
    thoughts: Option<u64>,
    write_1h: Option<u64>,
    audio_in: Option<u64>,
    /// Of the audio in, what was read from the cache (Gemini's `cacheTokensDetails`).
    audio_cached: Option<u64>,
    /// Of the cache reads, image tokens (a realtime response's).
    image_cached: Option<u64>,
    audio_out: Option<u64>,
    image_in: Option<u64>,
    image_out: Option<u64>,
    web_searches: Option<u64>,
    audio_seconds: Option<f64>,
    stated_cost: Option<f64>,
}

impl Counts {
    /// Adds a part of a long answer (a WebSocket session's response): its input and output,
    /// the cache reads counted inside the input (as OpenAI counts them), its audio and image
    /// tokens.
    pub fn add_part(&mut self, part: &Tokens) {
        let add =
            |slot: &mut Option<u64>, n: u64| *slot = Some(slot.unwrap_or(0).saturating_add(n));
        let [input, output] = part.totals().map(|n| n.unwrap_or(0));
        add(&mut self.input, input);
        add(&mut self.output, output);
        for (slot, n) in [
            (&mut self.read_inside, part.cache_read),
            // The audio in counts its cached part, as Gemini's `promptTokensDetails` do.
            (
                &mut self.audio_in,
                part.audio_input.saturating_add(part.audio_cache_read),
            ),
            (&mut self.audio_cached, part.audio_cache_read),
            (&mut self.image_cached, part.image_cache_read),
            (&mut self.image_in, part.image_input),
            (&mut self.audio_out, part.audio_output),
        ] {
            if n > 0 {
                add(slot, n);
            }
        }
    }
}

/// Tokens of one response.
#[derive(Debug, Default)]
pub struct Usage {
    /// What the usage objects read so far say.
    pub counts: Counts,
    /// The unfinished usage object (or `"usage` prefix) the last frame ended in.
    pending: Vec<u8>,
    /// For a Bedrock InvokeModelWithResponseStream answer, its event-stream framing.
    invoke: Option<Box<InvokeStream>>,
    /// The object the counts are in.
    object: UsageObject,
    /// Where the answer states what the request cost, if its provider is one that does.
    stated: StatedCost,
    /// For an image model's answer (Imagen, OpenAI's `/images/*`), the images counted so far.
    images: Option<Box<ImageCount>>,
    /// For an OpenAI Responses answer, the hosted tool calls counted so far.
    tools: Option<Box<ToolCalls>>,
    /// For a Vertex AI embeddings answer, its counts so far.
    embeddings: Option<Box<EmbeddingCounts>>,
}

/// What an OpenAI answer holds that is counted beside its usage, told by its request's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenAiAnswer {
    /// `images/generations`, `images/edits`, `images/variations`: images.
    Images,
    /// `responses`, `responses/{id}` (a poll), `responses/{id}/cancel`: a response object (or
    /// a stream of its events), with its hosted tool calls.
    Response,
    Other,
}

impl OpenAiAnswer {
    /// Of the path after the provider (no query), its last segments compared as the provider
    /// reads them (percent-decoded).
    fn of(path: &str) -> Self {
        // Nearly every answer (chat completions, embeddings) is told apart by its last two
        // segments as they are, before any is decoded.
        let bytes = path.as_bytes();
        if memchr::memchr(b'%', bytes).is_none() {
            let mut end = bytes.len();
            while end > 0 && bytes[end - 1] == b'/' {
                end -= 1;
            }
            let segment = |end: usize| {
                let start = memchr::memrchr(b'/', &bytes[..end]).map_or(0, |at| at + 1);
                (start, &bytes[start..end])
            };
            let (start, last) = segment(end);
            let before: &[u8] = match start.checked_sub(1) {
                Some(end) => segment(end).1,
                None => b"",
            };
            if !matches!(
                (last, before),
                (
                    b"responses" | b"cancel" | b"generations" | b"edits" | b"variations",
                    _
                ) | (_, b"responses")
            ) {
                return Self::Other;
            }
        }
        let segments = crate::background::decoded_last_segments(path);
        match segments.each_ref().map(Option::as_deref) {
            [
                Some("generations" | "edits" | "variations"),
                Some("images"),
                _,
            ] => Self::Images,
            [Some("responses"), ..]
            | [Some(_), Some("responses"), _]
            | [Some("cancel"), Some(_), Some("responses")] => Self::Response,
            _ => Self::Other,
        }
    }
}

/// The object of an answer that holds its counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum UsageObject {
    /// `usage`, `usageMetadata` (most answers).
    #[default]
    Usage,
    /// `meta` (Cohere's v1 API and its embeddings: `meta.billed_units`).
    Meta,
}

/// A provider's own statement of what a request cost, in its usage object; another provider's
/// answer is not taken at its word.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum StatedCost {
    #[default]
    None,
    /// `usage.cost.total_cost`.
    Perplexity,
    /// `usage.cost`, plus `usage.cost_details.upstream_inference_cost` when `usage.is_byok`.
    OpenRouter,
}

/// Whose answer an [`ImageCount`] reads, and so which keys stand for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKeys {
    /// Imagen's `:predict`: each prediction's image data (`bytesBase64Encoded`), or where it was
    /// stored instead (`parameters.storageUri`: a Cloud Storage URI, `gcsUri`, no bytes). Its
    /// answers have no usage.
    Imagen,
    /// OpenAI's `/images/*`: each image of `data`, as base64 (`b64_json`) or a link (`url`).
    /// DALL·E's answers have no usage; gpt-image-1's have one, read too.
    OpenAi,
}

impl ImageKeys {
    fn keys(self) -> &'static [&'static [u8]; 2] {
        match self {
            Self::Imagen => &IMAGEN_KEYS,
            Self::OpenAi => &OPENAI_IMAGE_KEYS,
        }
    }

    fn finders(self) -> &'static [memmem::Finder<'static>; 2] {
        match self {
            Self::Imagen => &IMAGEN_FINDERS,
            Self::OpenAi => &OPENAI_IMAGE_FINDERS,
        }
    }
}

/// The images of an image model's answer, counted as its bytes go by (megabytes of base64 in
/// few frames): an image key counts where it is a key — not after a `\` (inside a string: an
/// echoed or revised prompt may hold the key's text) and followed by a `:`. The end of each
/// frame is kept for the next: a key cut by a frame's end, or whose colon is still to come, is
/// read whole.
#[derive(Debug)]
struct ImageCount {
    keys: ImageKeys,
    images: u64,
    /// The last [`IMAGE_CARRY`] bytes seen.
    tail: Vec<u8>,
    /// Where in `tail` a key starts that awaited its colon.
    pending: Option<usize>,
}

impl ImageCount {
    fn new(keys: ImageKeys) -> Self {
        Self {
            keys,
            images: 0,
            tail: Vec::new(),
            pending: None,
        }
    }

    fn observe(&mut self, data: &[u8]) {
        let (keys, finders) = (self.keys.keys(), self.keys.finders());
        let carried = self.tail.len();
        let mut undecided = None;
        if carried > 0 {
            // Keys starting in the carried bytes that this frame ends: cut by the seam, or
            // awaiting their colon.
            let mut seam = std::mem::take(&mut self.tail);
            seam.extend_from_slice(&data[..data.len().min(IMAGE_CARRY)]);
            for (key, finder) in keys.iter().zip(finders) {
                for at in finder.find_iter(&seam) {
                    let unread = at + key.len() > carried || self.pending == Some(at);
                    if at < carried && unread {
                        match is_key(&seam, at, key.len(), None) {
                            Some(true) => self.images = self.images.saturating_add(1),
                            Some(false) => {}
                            // Spaces to the seam's end, which is the data's end (else they run
                            // past what is kept: given up).
                            None if data.len() <= IMAGE_CARRY => {
                                undecided = Some(seam.len() - at);
                            }
                            None => {}
                        }
                    }
                }
            }
            self.tail = seam;
            self.tail.truncate(carried);
        }
        let before = self.tail.last().copied();
        for (key, finder) in keys.iter().zip(finders) {
            for at in finder.find_iter(data) {
                match is_key(data, at, key.len(), before) {
                    Some(true) => self.images = self.images.saturating_add(1),
                    Some(false) => {}
                    None => undecided = Some(data.len() - at),
                }
            }
        }
        // The last IMAGE_CARRY bytes of all seen, and where in them the undecided key starts
        // (given up when its spaces run past them).
        self.tail
            .extend_from_slice(&data[data.len().saturating_sub(IMAGE_CARRY)..]);
        let drop = self.tail.len().saturating_sub(IMAGE_CARRY);
        self.tail.drain(..drop);
        self.pending = undecided
            .filter(|&from_end| from_end <= self.tail.len())
            .map(|from_end| self.tail.len() - from_end);
    }
}

/// Whether the `len` bytes at `at` in `buf` (a quoted key's text) stand as a key: not after a
/// `\` (`before` is the byte before `buf`) and followed by a `:`, spaces between; `None` when
/// `buf` ends first.
fn is_key(buf: &[u8], at: usize, len: usize, before: Option<u8>) -> Option<bool> {
    let prev = if at == 0 { before } else { Some(buf[at - 1]) };
    if prev == Some(b'\\') {
        return Some(false);
    }
    match buf[at + len..].iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b':') => Some(true),
        Some(_) => Some(false),
        None => None,
    }
}

/// The hosted tools an OpenAI Responses answer called that are charged per call: web searches
/// (`web_search_call` items, less those whose action opened a page or found in one, `open_page`
/// and `find_in_page`: only searches are charged), file searches (`file_search_call` items), and
/// whether the web search tool the response declares is the preview one (`web_search_preview`,
/// priced apart) and not the other.
///
/// Read key by key as the answer's bytes go by, however its frames cut it (no JSON is parsed;
/// nothing is kept but the open containers of the first [`TOOL_LEVELS`] levels and one short
/// key or `type` value), and only where the provider writes items and tools:
///
/// - a response object (a create's, a poll's, a cancellation's answer): the elements of its
///   top-level `output` array, by their own `type` and their `action`'s, and those of its
///   top-level `tools`, by their `type`;
/// - an event stream: each event's own top-level `type`, the `item` of each
///   `response.output_item.done`, and the `output` and `tools` of each event's `response`.
///
/// Nothing nested deeper in them is read: values the app writes and the response echoes (its
/// `metadata`, a tool's JSON schema, `text.format`, `instructions` given as items, the
/// attributes of the files a file search found, an MCP server's tool schemas) cannot pass for an
/// item, a tool or an event, whatever `"type"` they hold.
///
/// A response object lists each item once. A stream announces each item in events of its own
/// and lists them all again in its final event's response (`response.completed`,
/// `.incomplete`, `.failed`): a whole final event's items count. A stream that ends before one
/// ends (cut before it, or inside it) counts, of web searches and of file searches each, the
/// most that its `response.*_call.completed` events (which do not tell a search from a page
/// opened), its `response.output_item.done` items, or the items of the final event read so far
/// show. The tools declared by any of its events' responses set the rate.
#[derive(Debug, Default)]
struct ToolCalls {
    /// The open containers of the first [`TOOL_LEVELS`] levels (deeper ones are only counted).
    levels: [ToolLevel; TOOL_LEVELS],
    depth: usize,
    /// The string being read, if inside one; its text while it is kept (`spoiled` when too
    /// long or escaped: no key or value read has escapes).
    string: Option<ToolString>,
    escaped: bool,
    text: Vec<u8>,
    spoiled: bool,
    /// The item being read.
    item: ItemSeen,
    /// The event being read (or the response object, whose own `type` no answer has).
    event: EventSeen,
    /// An event `response.*` was seen: the answer is an event stream.
    stream: bool,
    /// The calls of a response object's items.
    document: Calls,
    /// The calls a stream's `response.*_call.completed` events reported.
    completed: Calls,
    /// The calls of a stream's `response.output_item.done` items.
    done: Calls,
    /// The calls of the items of a stream's last whole final event.
    ended: Option<Calls>,
    /// The response declares `web_search_preview` (any snapshot), and `web_search` (any).
    preview: bool,
    general: bool,
}

/// Levels of containers whose keys a [`ToolCalls`] may read: an event, its `response`, the
/// response's `output`, an item, the item's `action`.
const TOOL_LEVELS: usize = 5;
/// Longest key or `type` value read (the names looked for are shorter).
const MAX_TOOL_TEXT: usize = 64;

/// What a container is to a [`ToolCalls`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ToolRole {
    /// Nothing counted is in it.
    #[default]
    Other,
    /// A top-level object: a response object, or an event of a stream.
    Top,
    /// An event's `response`.
    Response,
    /// The `output` array of a response object or of an event's `response`.
    Output,
    /// An output item: an element of `output`, or an event's `item`.
    Item,
    /// An item's `action`.
    Action,
    /// The `tools` array of a response object or of an event's `response`.
    Tools,
    /// An element of `tools`.
    Tool,
}

impl ToolRole {
    /// Whether the keys of an object of this role are read.
    fn reads_keys(self) -> bool {
        matches!(
            self,
            Self::Top | Self::Response | Self::Item | Self::Action | Self::Tool
        )
    }

    /// The role of a container opened (`object` or array) as the value of `key` in `self`.
    fn child(self, key: ToolKey, object: bool) -> Self {
        match (self, key, object) {
            (Self::Top, ToolKey::Response, true) => Self::Response,
            (Self::Top | Self::Response, ToolKey::Output, false) => Self::Output,
            (Self::Top | Self::Response, ToolKey::Tools, false) => Self::Tools,
            (Self::Top, ToolKey::Item, true) | (Self::Output, _, true) => Self::Item,
            (Self::Item, ToolKey::Action, true) => Self::Action,
            (Self::Tools, _, true) => Self::Tool,
            _ => Self::Other,
        }
    }
}

/// A key a [`ToolCalls`] reads the value of.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ToolKey {
    #[default]
    Other,
    Type,
    Response,
    Output,
    Item,
    Action,
    Tools,
}

impl ToolKey {
    fn of(name: &[u8]) -> Self {
        match name {
            b"type" => Self::Type,
            b"response" => Self::Response,
            b"output" => Self::Output,
            b"item" => Self::Item,
            b"action" => Self::Action,
            b"tools" => Self::Tools,
            _ => Self::Other,
        }
    }
}

/// An open container of the first [`TOOL_LEVELS`] levels.
#[derive(Debug, Default, Clone, Copy)]
struct ToolLevel {
    role: ToolRole,
    object: bool,
    /// The next string in this object is a key.
    expect_key: bool,
    /// The key whose value comes (or came) last in this object.
    key: ToolKey,
}

/// The string a [`ToolCalls`] is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolString {
    /// A key of an object whose keys are read.
    Key,
    /// The `type` of an object of this role.
    Type(ToolRole),
    /// Anything else.
    Skipped,
}

/// Web searches and file searches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Calls {
    web_search: u64,
    file_search: u64,
}

impl Calls {
    fn add(&mut self, other: Self) {
        self.web_search = self.web_search.saturating_add(other.web_search);
        self.file_search = self.file_search.saturating_add(other.file_search);
    }

    /// Of each, the larger.
    fn max(self, other: Self) -> Self {
        Self {
            web_search: self.web_search.max(other.web_search),
            file_search: self.file_search.max(other.file_search),
        }
    }
}

/// Where an item being read is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ItemPlace {
    /// In a response object's `output`.
    #[default]
    Document,
    /// An event's `item`.
    Event,
    /// In an event's `response.output`.
    EventResponse,
}

/// What an output item has shown so far.
#[derive(Debug, Default, Clone, Copy)]
struct ItemSeen {
    place: ItemPlace,
    web_search: bool,
    file_search: bool,
    /// Its action opened a page or found in one.
    not_search: bool,
}

impl ItemSeen {
    fn calls(self) -> Calls {
        Calls {
            web_search: u64::from(self.web_search && !self.not_search),
            file_search: u64::from(self.file_search),
        }
    }
}

/// An event of a stream, as far as it was read.
#[derive(Debug, Default, Clone, Copy)]
struct EventSeen {
    kind: EventKind,
    /// The calls of its `item`.
    item: Calls,
    /// The calls of its `response.output` items.
    response: Calls,
}

/// The events whose items count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// Not known yet, or not one of these.
    #[default]
    Other,
    /// `response.output_item.done`.
    ItemDone,
    /// `response.completed`, `response.incomplete`, `response.failed`.
    Final,
}

/// What [`ToolCalls`] counted.
#[derive(Debug, Default, Clone, Copy)]
struct ToolUse {
    web_searches: u64,
    preview: bool,
    file_searches: u64,
}

impl ToolCalls {
    fn observe(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let Some(reading) = self.string else {
                self.outside_strings(data[i]);
                i += 1;
                continue;
            };
            if self.escaped {
                self.escaped = false;
                i += 1;
                continue;
            }
            // Text is skipped whole: answers are mostly text.
            let rest = &data[i..];
            let end = memchr::memchr2(b'"', b'\\', rest);
            if reading != ToolString::Skipped {
                self.keep(&rest[..end.unwrap_or(rest.len())]);
            }
            let Some(at) = end else {
                return;
            };
            i += at + 1;
            if rest[at] == b'\\' {
                self.escaped = true;
                self.spoiled = true;
            } else {
                self.string = None;
                self.end_string(reading);
            }
        }
    }

    /// Keeps `text`, the next of the string read, while the string is short enough to be read.
    fn keep(&mut self, text: &[u8]) {
        if !self.spoiled {
            self.spoiled = self.text.len() + text.len() > MAX_TOOL_TEXT;
            if !self.spoiled {
                self.text.extend_from_slice(text);
            }
        }
    }

    fn outside_strings(&mut self, b: u8) {
        let depth = self.depth;
        let current = depth.checked_sub(1).and_then(|d| self.levels.get_mut(d));
        match b {
            b'{' | b'[' => {
                let object = b == b'{';
                let role = match current {
                    None if depth == 0 && object => ToolRole::Top,
                    Some(parent) => parent.role.child(parent.key, object),
                    None => ToolRole::Other,
                };
                self.open(role, object);
            }
            b'}' | b']' => self.close(),
            // A quote outside any container is no JSON's (an event stream's field lines).
            b'"' => {
                let Some(level) = current else {
                    return;
                };
                self.string = Some(match *level {
                    l if !l.object || !l.role.reads_keys() => ToolString::Skipped,
                    l if l.expect_key => ToolString::Key,
                    l if l.key == ToolKey::Type => ToolString::Type(l.role),
                    _ => ToolString::Skipped,
                });
                self.text.clear();
                self.spoiled = false;
            }
            b':' => {
                if let Some(level) = current {
                    level.expect_key = false;
                }
            }
            b',' => {
                if let Some(level) = current {
                    level.expect_key = level.object;
                    level.key = ToolKey::Other;
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, role: ToolRole, object: bool) {
        let depth = self.depth;
        if let Some(level) = self.levels.get_mut(depth) {
            *level = ToolLevel {
                role,
                object,
                expect_key: object,
                key: ToolKey::Other,
            };
        }
        self.depth = depth.saturating_add(1);
        match role {
            ToolRole::Top => self.event = EventSeen::default(),
            ToolRole::Item => {
                let place = match depth {
                    1 => ItemPlace::Event,
                    2 => ItemPlace::Document,
                    _ => ItemPlace::EventResponse,
                };
                self.item = ItemSeen {
                    place,
                    ..ItemSeen::default()
                };
            }
            _ => {}
        }
    }

    fn close(&mut self) {
        let Some(depth) = self.depth.checked_sub(1) else {
            return;
        };
        self.depth = depth;
        let Some(level) = self.levels.get(depth) else {
            return;
        };
        match level.role {
            ToolRole::Item => {
                let calls = self.item.calls();
                match self.item.place {
                    ItemPlace::Document => self.document.add(calls),
                    ItemPlace::Event => self.event.item.add(calls),
                    ItemPlace::EventResponse => self.event.response.add(calls),
                }
            }
            // The end of an event (decided now: its `type` may come after its items).
            ToolRole::Top => {
                let event = std::mem::take(&mut self.event);
                match event.kind {
                    EventKind::ItemDone => self.done.add(event.item),
                    EventKind::Final => self.ended = Some(event.response),
                    EventKind::Other => {}
                }
            }
            _ => {}
        }
    }

    fn end_string(&mut self, reading: ToolString) {
        let Some(level) = self
            .depth
            .checked_sub(1)
            .and_then(|d| self.levels.get_mut(d))
        else {
            return;
        };
        match reading {
            ToolString::Skipped => {}
            ToolString::Key => {
                level.key = if self.spoiled {
                    ToolKey::Other
                } else {
                    ToolKey::of(&self.text)
                };
            }
            ToolString::Type(_) if self.spoiled => {}
            ToolString::Type(role) => {
                let text = std::mem::take(&mut self.text);
                self.take_type(role, &text);
                self.text = text;
            }
        }
    }

    /// Takes the `type` of an object of `role`.
    fn take_type(&mut self, role: ToolRole, value: &[u8]) {
        let add = |n: &mut u64| *n = n.saturating_add(1);
        match role {
            ToolRole::Top => {
                self.stream |= value.starts_with(b"response.");
                self.event.kind = match value {
                    b"response.completed" | b"response.incomplete" | b"response.failed" => {
                        EventKind::Final
                    }
                    b"response.output_item.done" => EventKind::ItemDone,
                    b"response.web_search_call.completed" => {
                        add(&mut self.completed.web_search);
                        EventKind::Other
                    }
                    b"response.file_search_call.completed" => {
                        add(&mut self.completed.file_search);
                        EventKind::Other
                    }
                    _ => EventKind::Other,
                };
            }
            ToolRole::Item => {
                self.item.web_search = value == b"web_search_call";
                self.item.file_search = value == b"file_search_call";
            }
            ToolRole::Action => {
                self.item.not_search = matches!(value, b"open_page" | b"find_in_page");
            }
            ToolRole::Tool => {
                if value.starts_with(b"web_search_preview") {
                    self.preview = true;
                } else if value == b"web_search" || value.starts_with(b"web_search_2") {
                    self.general = true;
                }
            }
            _ => {}
        }
    }

    /// The calls counted so far.
    fn calls(&self) -> ToolUse {
        let calls = if !self.stream {
            self.document
        } else if let Some(ended) = self.ended {
            ended
        } else {
            // Cut: the most that what came shows, the event it was cut in included.
            let mut done = self.done;
            let mut last = Calls::default();
            match self.event.kind {
                EventKind::ItemDone => done.add(self.event.item),
                EventKind::Final => last = self.event.response,
                EventKind::Other => {}
            }
            self.completed.max(done).max(last)
        };
        ToolUse {
            web_searches: calls.web_search,
            preview: self.preview && !self.general,
            file_searches: calls.file_search,
        }
    }
}

/// The counts of a Vertex AI embeddings answer (`{"predictions": [{"embeddings": {"values":
/// [...], "statistics": {"token_count": n, ...}}}, ...], "metadata": {"billableCharacterCount":
/// n}}`): the predictions' tokens added up, and the characters Google bills.
#[derive(Debug)]
struct EmbeddingCounts {
    tokens: KeySum,
    characters: KeySum,
}

impl Default for EmbeddingCounts {
    fn default() -> Self {
        Self {
            tokens: KeySum::new(&TOKEN_COUNT_FINDER),
            characters: KeySum::new(&CHARACTERS_FINDER),
        }
    }
}

/// The numbers after each `"key":` of an answer, added up as its bytes go by: each is counted
/// once, however the frames cut it. For answers whose only strings are keys (a Vertex
/// embedding's values are numbers), so that no text can look like one.
#[derive(Debug)]
struct KeySum {
    finder: &'static memmem::Finder<'static>,
    total: Option<u64>,
    /// The end of the last frame: a key whose number may go on, or what may start a key.
    carry: Vec<u8>,
}

impl KeySum {
    fn new(finder: &'static memmem::Finder<'static>) -> Self {
        Self {
            finder,
            total: None,
            carry: Vec::new(),
        }
    }

    fn observe(&mut self, data: &[u8]) {
        let key = self.finder.needle().len();
        let mut seam = std::mem::take(&mut self.carry);
        if !seam.is_empty() {
            // A key that starts in the carried bytes, read with the start of this frame.
            let before = seam.len();
            seam.extend_from_slice(&data[..data.len().min(MAX_KEY_AND_NUMBER)]);
            if let Some(at) = self.finder.find(&seam).filter(|&at| at < before) {
                match number_after_key(&seam[at + key..]) {
                    Reading::Number(n) => self.add(n),
                    Reading::Unfinished if data.len() < MAX_KEY_AND_NUMBER => {
                        self.carry = seam.split_off(at);
                        return;
                    }
                    Reading::Unfinished | Reading::NotANumber => {}
                }
                seam.clear();
            }
        }
        for at in self.finder.find_iter(data) {
            match number_after_key(&data[at + key..]) {
                Reading::Number(n) => self.add(n),
                Reading::Unfinished => {
                    self.carry = data[at..].to_vec();
                    return;
                }
                Reading::NotANumber => {}
            }
        }
        // Shorter than the key: a key it starts is found with the next frame (a frame shorter
        // than that keeps what came before it too).
        let keep = key - 1;
        if data.len() >= keep || seam.is_empty() {
            seam.clear();
            seam.extend_from_slice(&data[data.len().saturating_sub(keep)..]);
        } else {
            // The carried bytes and all of this frame, whose key was not found in them.
            seam.drain(..seam.len().saturating_sub(keep));
        }
        self.carry = seam;
    }

    fn add(&mut self, n: u64) {
        self.total = Some(self.total.unwrap_or(0).saturating_add(n));
    }
}

/// Longest `"key": n` read across a frame's end (the key, spaces and a `u64`).
const MAX_KEY_AND_NUMBER: usize = 64;

/// What follows a key of a [`KeySum`].
enum Reading {
    Number(u64),
    /// The data ends before the number does.
    Unfinished,
    NotANumber,
}

fn number_after_key(after_key: &[u8]) -> Reading {
    let rest = after_key.trim_ascii_start();
    let Some(value) = rest.strip_prefix(b":") else {
        return if rest.is_empty() {
            Reading::Unfinished
        } else {
            Reading::NotANumber
        };
    };
    let value = value.trim_ascii_start();
    match leading_number(value) {
        Some(n) => Reading::Number(n),
        None if value.iter().all(u8::is_ascii_digit) => Reading::Unfinished,
        None => Reading::NotANumber,
    }
}

/// Bedrock's InvokeModelWithResponseStream answer: event-stream messages whose `chunk`
/// payloads, `{"bytes":"<base64>"}`, hold the model's own stream events (Anthropic's
/// `message_start` and `message_delta` with their usage, ...), which a byte scan cannot see
/// before they are decoded. The last one adds `amazon-bedrock-invocationMetrics`, Bedrock's
/// token counts for any model, read when the model's own events carried none.
#[derive(Debug, Default)]
struct InvokeStream {
    decoder: crate::compat::eventstream::Decoder,
}

/// The `amazon-bedrock-invocationMetrics` of an InvokeModelWithResponseStream chunk.
#[derive(serde::Deserialize)]
struct InvocationMetrics {
    #[serde(rename = "amazon-bedrock-invocationMetrics")]
    metrics: TokenCounts,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenCounts {
    input_token_count: Option<u64>,
    output_token_count: Option<u64>,
}

/// The counts one usage object holds.
#[derive(Default)]
struct Seen {
    counts: Counts,
    /// A value of the base input (output) key one level down (Cohere's `billed_units`), used
    /// when the object's own level has none.
    nested_input: Option<u64>,
    nested_output: Option<u64>,
    /// [`Field::Total`] and [`Field::Reasoning`]: reasoning beside the output when the total
    /// holds it apart (xAI's Grok).
    total: Option<u64>,
    reasoning: Option<u64>,
    /// OpenRouter's parts of its stated cost: what it charged, whether the provider was paid
    /// with the account's own key, and what that provider charged.
    charged: Option<f64>,
    byok: bool,
    upstream_cost: Option<f64>,
}

/// A Gemini `ModalityTokenCount` entry being read (`{"modality": "AUDIO", "tokenCount": n}`).
#[derive(Default)]
struct ModalityEntry {
    modality: Option<Modality>,
    tokens: Option<u64>,
}

impl Seen {
    fn set(&mut self, field: Field, n: u64) {
        let c = &mut self.counts;
        let slot = match field {
            Field::Total => &mut self.total,
            Field::Reasoning => &mut self.reasoning,
            Field::Input => &mut c.input,
            Field::Output => &mut c.output,
            Field::ReadBeside => &mut c.read_beside,
            Field::WriteBeside => &mut c.write_beside,
            Field::ReadInside => &mut c.read_inside,
            Field::ToolPrompt => &mut c.tool_prompt,
            Field::Thoughts => &mut c.thoughts,
            Field::Write1h => &mut c.write_1h,
            Field::AudioIn => &mut c.audio_in,
            Field::AudioOut => &mut c.audio_out,
            Field::ImageIn => &mut c.image_in,
            Field::ImageOut => &mut c.image_out,
            Field::WebSearches => &mut c.web_searches,
        };
        *slot = Some(n);
    }

    /// Adds a Gemini entry of `parent` (`promptTokensDetails`, `candidatesTokensDetails`).
    fn add_modality(&mut self, parent: &[u8], entry: &ModalityEntry) {
        let (Some(modality), Some(n)) = (entry.modality, entry.tokens) else {
            return;
        };
        let c = &mut self.counts;
        let slot = match (parent, modality) {
            (b"promptTokensDetails", Modality::Audio) => &mut c.audio_in,
            (b"cacheTokensDetails", Modality::Audio) => &mut c.audio_cached,
            (b"candidatesTokensDetails", Modality::Audio) => &mut c.audio_out,
            (b"candidatesTokensDetails", Modality::Image) => &mut c.image_out,
            _ => return,
        };
        *slot = Some(slot.unwrap_or(0).saturating_add(n));
    }

    fn add_1h(&mut self, n: u64) {
        let c = &mut self.counts;
        c.write_1h = Some(c.write_1h.unwrap_or(0).saturating_add(n));
    }
}

impl Usage {
    /// The tokens read so far, totalled as providers bill them.
    pub fn tokens(&self) -> Tokens {
        let c = &self.counts;
        let n = |v: Option<u64>| v.unwrap_or(0);
        let beside = n(c.read_beside)
            .saturating_add(n(c.write_beside))
            .saturating_add(n(c.tool_prompt));
        let input = match c.input {
            None if beside == 0 => None,
            i => Some(n(i).saturating_add(beside)),
        };
        let output = match (c.output, c.thoughts) {
            (None, None) => None,
            (o, t) => Some(n(o).saturating_add(n(t))),
        };
        let all = n(input);
        let cache_write = n(c.write_beside).min(all);
        let cache_read = n(c.read_beside)
            .saturating_add(n(c.read_inside))
            .min(all - cache_write);
        let audio_output = n(c.audio_out).min(n(output));
        let audio_input = n(c.audio_in).saturating_sub(n(c.audio_cached)).min(all);
        let audio_cache_read = n(c.audio_cached).min(cache_read);
        let tools = self.tools.as_ref().map(|t| t.calls()).unwrap_or_default();
        Tokens {
            input,
            output,
            cache_read,
            cache_write,
            cache_write_1h: n(c.write_1h).min(cache_write),
            audio_input,
            audio_cache_read,
            image_cache_read: n(c.image_cached).min(cache_read - audio_cache_read),
            image_input: n(c.image_in).min(all - audio_input),
            audio_output,
            image_output: n(c.image_out).min(n(output) - audio_output),
            images: self.images.as_ref().map_or(0, |i| i.images),
            web_searches: n(c.web_searches).saturating_add(tools.web_searches),
            web_search_preview: tools.preview,
            file_searches: tools.file_searches,
            audio_seconds: c.audio_seconds.unwrap_or(0.0),
            characters: self
                .embeddings
                .as_ref()
                .and_then(|e| e.characters.total)
                .unwrap_or(0),
            stated_cost: c.stated_cost,
        }
    }

    /// Takes the counts of one whole usage object (see the module doc for what replaces what).
    fn commit(&mut self, seen: Seen) {
        let (c, mut new) = (&mut self.counts, seen.counts);
        if let Some(charged) = seen.charged {
            let upstream = seen.upstream_cost.filter(|_| seen.byok).unwrap_or(0.0);
            new.stated_cost = Some(charged + upstream).filter(|usd| *usd <= MAX_STATED_COST);
        }
        let input = new.input.or(seen.nested_input);
        let output = new.output.or(seen.nested_output);
        // Reasoning the stated total holds beside the output (xAI) is output too; counted
        // inside it (OpenAI), the total is input and output alone.
        if let (Some(total), Some(reasoning), Some(i), Some(o)) =
            (seen.total, seen.reasoning, input, output)
            && reasoning > 0
            && total == i.saturating_add(o).saturating_add(reasoning)
        {
            new.thoughts = new.thoughts.or(Some(reasoning));
        }
        if input.is_some() {
            // Anthropic's `message_delta` repeats the input side without its `cache_creation`
            // breakdown: the hour-long writes `message_start` named stay.
            let write_1h = new
                .write_1h
                .or(c.write_1h)
                .map(|w| w.min(new.write_beside.unwrap_or(w)));
            *c = Counts {
                input,
                output: c.output,
                thoughts: c.thoughts,
                audio_out: c.audio_out,
                image_out: c.image_out,
                write_1h,
                ..new
            };
        } else {
            let keep = |slot: &mut Option<u64>, v: Option<u64>| *slot = v.or(*slot);
            keep(&mut c.read_beside, new.read_beside);
            keep(&mut c.write_beside, new.write_beside);
            keep(&mut c.read_inside, new.read_inside);
            keep(&mut c.tool_prompt, new.tool_prompt);
            keep(&mut c.write_1h, new.write_1h);
            keep(&mut c.audio_in, new.audio_in);
            keep(&mut c.audio_cached, new.audio_cached);
            keep(&mut c.image_in, new.image_in);
            keep(&mut c.web_searches, new.web_searches);
            c.audio_seconds = new.audio_seconds.or(c.audio_seconds);
            c.stated_cost = new.stated_cost.or(c.stated_cost);
        }
        if output.is_some() {
            c.output = output;
            c.thoughts = new.thoughts;
            c.audio_out = new.audio_out;
            c.image_out = new.image_out;
        } else {
            let keep = |slot: &mut Option<u64>, v: Option<u64>| *slot = v.or(*slot);
            keep(&mut c.thoughts, new.thoughts);
            keep(&mut c.audio_out, new.audio_out);
            keep(&mut c.image_out, new.image_out);
        }
    }

    /// A reader of the usage of the answer to a request of `provider` on `path`: Bedrock's
    /// InvokeModelWithResponseStream answers are read through their event-stream framing, an
    /// Imagen or OpenAI (Azure OpenAI) image answer's images are counted, an OpenAI (Azure
    /// OpenAI) Responses answer's hosted tool calls, a Vertex embedding's statistics read, and
    /// Perplexity's and OpenRouter's stated costs taken.
    pub fn for_answer(provider: &str, path: &str) -> Self {
        let invoke = (provider == "aws-bedrock"
            && path
                .trim_end_matches('/')
                .ends_with("/invoke-with-response-stream"))
        .then(|| {
            // Its usage is in small messages: a long one is skipped, not held.
            let decoder = crate::compat::eventstream::Decoder::skipping_past(1 << 20);
            Box::new(InvokeStream { decoder })
        });
        let path = path.trim_start_matches('/');
        let in_meta = provider == "cohere"
            && (path.starts_with("v1/") || path.trim_end_matches('/').ends_with("/embed"));
        let path = path.split('?').next().unwrap_or(path);
        let predict = matches!(provider, "google-ai-studio" | "google-vertex-ai")
            && path.ends_with(":predict");
        let imagen =
            predict && crate::cost::model_in_path(path).is_some_and(|m| m.starts_with("imagen-"));
        let embeddings = predict && !imagen && provider == "google-vertex-ai";
        // Azure OpenAI answers in OpenAI's own format.
        let (images, tools) = if matches!(provider, "openai" | "azure-openai") {
            let answer = OpenAiAnswer::of(path);
            (
                (answer == OpenAiAnswer::Images).then_some(ImageKeys::OpenAi),
                answer == OpenAiAnswer::Response,
            )
        } else {
            (imagen.then_some(ImageKeys::Imagen), false)
        };
        Self {
            invoke,
            object: if in_meta {
                UsageObject::Meta
            } else {
                UsageObject::Usage
            },
            stated: match provider {
                "perplexity-ai" => StatedCost::Perplexity,
                "openrouter" => StatedCost::OpenRouter,
                _ => StatedCost::None,
            },
            images: images.map(|keys| Box::new(ImageCount::new(keys))),
            tools: tools.then(Box::default),
            embeddings: embeddings.then(Box::default),
            ..Self::default()
        }
    }

    /// Reads the usage numbers in `data` (the next frame of the body).
    pub fn observe(&mut self, data: &[u8]) {
        if let Some(images) = &mut self.images {
            images.observe(data);
            // No usage to read in an Imagen answer: megabytes of base64 are not scanned for it.
            if images.keys == ImageKeys::Imagen {
                return;
            }
        }
        if let Some(tools) = &mut self.tools {
            tools.observe(data);
        }
        if let Some(embeddings) = &mut self.embeddings {
            embeddings.tokens.observe(data);
            embeddings.characters.observe(data);
            self.counts.input = embeddings.tokens.total;
            return;
        }
        if let Some(mut invoke) = self.invoke.take() {
            self.observe_invoke(&mut invoke, data);
            self.invoke = Some(invoke);
            return;
        }
        self.observe_plain(data);
    }

    /// [`Self::observe`] for an InvokeModelWithResponseStream answer (see [`InvokeStream`]).
    fn observe_invoke(&mut self, invoke: &mut InvokeStream, data: &[u8]) {
        invoke.decoder.push(data);
        while let Some(Ok(message)) = invoke.decoder.next_message() {
            let Some(event) = message.invoke_chunk() else {
                continue;
            };
            // Each chunk is one whole event of the model's stream.
            self.observe_plain(&event);
            self.pending.clear();
            if memchr::memmem::find(&event, b"\"amazon-bedrock-invocationMetrics\"").is_some()
                && let Ok(m) = serde_json::from_slice::<InvocationMetrics>(&event)
            {
                let c = &mut self.counts;
                if c.input.is_none() && c.output.is_none() {
                    c.input = m.metrics.input_token_count;
                    c.output = m.metrics.output_token_count;
                }
            }
        }
    }

    fn observe_plain(&mut self, data: &[u8]) {
        let mut carried = false;
        if !self.pending.is_empty() {
            // The object that started in an earlier frame, read across the seam first so that
            // what this frame holds is read last.
            let mut seam = std::mem::take(&mut self.pending);
            let before = seam.len();
            seam.extend_from_slice(&data[..data.len().min(WINDOW)]);
            if let Some(at) = self.scan(&seam)
                && at < before
                && data.len() <= WINDOW
            {
                // Still unfinished, and this whole frame is in the seam: wait for more.
                seam.drain(..at);
                self.pending = seam;
                carried = true;
            }
        }
        if let Some(from) = self.scan(data)
            && !carried
        {
            let from = from.max(data.len().saturating_sub(WINDOW));
            self.pending.extend_from_slice(&data[from..]);
        }
    }

    /// Reads every usage object in `buf`, in order. Returns where an object that `buf` ends
    /// inside starts (or a prefix of `"usage` at its very end), to be read again with more.
    fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let (finder, needle) = match self.object {
            UsageObject::Usage => (&*FINDER, NEEDLE),
            UsageObject::Meta => (&*META_FINDER, META_NEEDLE),
        };
        let mut at = 1;
        while let Some(found) = buf.get(at..).and_then(|rest| finder.find(rest)) {
            let start = at + found - 1;
            at = start + needle.len();
            // A key opens an object or follows a comma (or starts a carried piece); a quote
            // after anything else is inside a string (`\"usage\":{` in a model's text), whose
            // unbalanced braces would hide the real object after it.
            // (Or starts an SSE `data:` line without a space: a document split over lines.)
            let key = start == 0
                || matches!(buf[start - 1], b'{' | b',' | b' ' | b'\n' | b'\r' | b'\t')
                || (buf[..start].ends_with(b"data:")
                    && (start == 5 || matches!(buf[start - 6], b'\n' | b'\r')));
            if buf[start] == b'"' && key && !self.read_object(&buf[at..]) {
                return Some(start);
            }
        }
        // `"usa` at the very end: the needle may go on in the next frame.
        (1..needle.len())
            .rev()
            .find(|&n| buf.ends_with(&needle[..n]))
            .map(|n| buf.len() - n)
    }

    /// Reads the numbers of the object starting at `s` (just after `"usage`), in one pass over
    /// its `"key": value` pairs, and takes them when it is whole. Returns false when `s` ends
    /// before the object (or the scalar value, `null`) does.
    fn read_object(&mut self, s: &[u8]) -> bool {
        let cut = s.len() > WINDOW;
        let window = &s[..s.len().min(WINDOW)];
        let mut seen = Seen::default();
        // Bedrock's `cacheDetails` entry being read: its `inputTokens`, and whether its `ttl`
        // is `1h`; Gemini's `ModalityTokenCount` entry.
        let (mut detail_tokens, mut detail_1h) = (None, false);
        let mut entry = ModalityEntry::default();
        // The last key of the object's own level: the name of the object one level down.
        let mut parent: &[u8] = b"";
        let mut depth = 0usize;
        let mut i = 0;
        while let Some(off) = memchr::memchr3(b'{', b'}', b'"', &window[i..]) {
            i += off;
            match window[i] {
                b'{' => {
                    depth += 1;
                    (detail_tokens, detail_1h) = (None, false);
                    entry = ModalityEntry::default();
                }
                b'}' => {
                    if depth == 2
                        && detail_1h
                        && let Some(n) = detail_tokens
                    {
                        seen.add_1h(n);
                    }
                    if depth == 2 {
                        seen.add_modality(parent, &entry);
                    }
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        self.commit(seen);
                        return true;
                    }
                }
                // A quote outside the object: the key's own closing quote (`"usage"`,
                // `"usageMetadata"`) comes before the colon; one after it means the value
                // was a scalar (`"usage":null,"x"`).
                _ if depth == 0 => {
                    if window[..i].contains(&b':') {
                        return true;
                    }
                }
                _ => {
                    let start = i + 1;
                    let Some(len) = memchr::memchr(b'"', &window[start..]) else {
                        break;
                    };
                    let key = &window[start..start + len];
                    i = start + len + 1;
                    let rest = window[i..].trim_ascii_start();
                    let Some(value) = rest.strip_prefix(b":") else {
                        continue;
                    };
                    let value = value.trim_ascii_start();
                    if depth == 1 {
                        parent = key;
                        match (key, self.stated) {
                            (b"seconds", _) => {
                                seen.counts.audio_seconds =
                                    usd_or_seconds(value).filter(|s| *s <= MAX_AUDIO_SECONDS);
                                continue;
                            }
                            (b"cost", StatedCost::OpenRouter) => {
                                seen.charged = stated_cost(value);
                                continue;
                            }
                            (b"is_byok", StatedCost::OpenRouter) => {
                                seen.byok = value.starts_with(b"true");
                                continue;
                            }
                            _ => {}
                        }
                    }
                    if depth == 2 {
                        match key {
                            b"ttl" => {
                                detail_1h = value.starts_with(b"\"1h\"");
                                continue;
                            }
                            b"modality" => {
                                entry.modality = if value.starts_with(b"\"AUDIO\"") {
                                    Some(Modality::Audio)
                                } else if value.starts_with(b"\"IMAGE\"") {
                                    Some(Modality::Image)
                                } else {
                                    None
                                };
                                continue;
                            }
                            b"tokenCount" => {
                                entry.tokens = leading_number(value);
                                continue;
                            }
                            b"total_cost"
                                if self.stated == StatedCost::Perplexity && parent == b"cost" =>
                            {
                                seen.counts.stated_cost = stated_cost(value);
                                continue;
                            }
                            b"upstream_inference_cost"
                                if self.stated == StatedCost::OpenRouter
                                    && parent == b"cost_details" =>
                            {
                                seen.upstream_cost = stated_cost(value);
                                continue;
                            }
                            _ => {}
                        }
                    }
                    // What the key counts, if anything (most keys count nothing: their numbers
                    // are not read).
                    let (field, nested) = match depth {
                        1 => (own_field(key), false),
                        2 => match nested_field(parent, key) {
                            Some(f) => (Some(f), false),
                            None => match own_field(key) {
                                f @ Some(Field::Input | Field::Output) => (f, true),
                                _ => continue,
                            },
                        },
                        _ => continue,
                    };
                    let Some(field) = field else {
                        continue;
                    };
                    let Some(n) = leading_number(value) else {
                        continue;
                    };
                    match (field, nested) {
                        (Field::Input, true) => {
                            detail_tokens = Some(n);
                            seen.nested_input = seen.nested_input.or(Some(n));
                        }
                        (Field::Output, true) => {
                            seen.nested_output = seen.nested_output.or(Some(n));
                        }
                        (f, _) => seen.set(f, n),
                    }
                    continue;
                }
            }
            i += 1;
        }
        // The data ended first. Done only if it was cut at WINDOW (too long to read: what was
        // read counts) or a scalar value has begun after the colon (`"usage": null`).
        if cut {
            self.commit(seen);
            return true;
        }
        depth == 0
            && window
                .iter()
                .position(|&c| c == b':')
                .is_some_and(|colon| !window[colon + 1..].trim_ascii().is_empty())
    }
}

/// The whole number `value` starts with, if the data goes on after it (it may be cut
/// mid-number otherwise).
fn leading_number(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|c| c.is_ascii_digit()).count();
    (digits > 0 && digits < value.len())
        .then(|| {
            value[..digits].iter().try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
        })
        .flatten()
}

/// The USD amount `value` starts with (a JSON number: `0.01053`, `3e-05`), if the data goes on
/// after it and it can be a cost.
fn stated_cost(value: &[u8]) -> Option<f64> {
    usd_or_seconds(value).filter(|usd| *usd <= MAX_STATED_COST)
}

/// The non-negative JSON number `value` starts with (`0.01053`, `3e-05`, `9`), if the data
/// goes on after it.
fn usd_or_seconds(value: &[u8]) -> Option<f64> {
    let len = value
        .iter()
        .take_while(|c| matches!(c, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
        .count();
    (len > 0 && len < value.len())
        .then(|| std::str::from_utf8(&value[..len]).ok()?.parse::<f64>().ok())
        .flatten()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An InvokeModelWithResponseStream answer carrying `events` (the model's own JSON events).
    fn invoke_stream(events: &[&str]) -> Vec<u8> {
        use base64::Engine as _;
        let headers = [
            (":event-type", "chunk"),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ];
        let mut out = Vec::new();
        for e in events {
            let bytes = base64::engine::general_purpose::STANDARD.encode(e);
            let payload = format!(r#"{{"bytes":"{bytes}","p":"abcdefgh"}}"#);
            out.extend(crate::compat::eventstream::encode(
                &headers,
                payload.as_bytes(),
            ));
        }
        out
    }

    #[test]
    fn bedrock_invoke_streams_are_read_through_their_framing_and_base64() {
        const PATH: &str = "/aws-bedrock/bedrock-runtime/us-east-1/model/anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream";
        let claude = invoke_stream(&[
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","usage":{"input_tokens":12,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
            r#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":112,"outputTokenCount":7,"invocationLatency":500,"firstByteLatency":200}}"#,
        ]);
        // Split anywhere: the counts are the model's own (its cache reads apart).
        for at in [0, 1, 13, claude.len() / 2, claude.len() - 1] {
            let mut u = Usage::for_answer("aws-bedrock", PATH);
            u.observe(&claude[..at]);
            u.observe(&claude[at..]);
            let t = u.tokens();
            assert_eq!(
                (t.input, t.output, t.cache_read),
                (Some(112), Some(7), 100),
                "split at {at}"
            );
        }
        // A model whose events carry no usage: Bedrock's invocation metrics.
        let llama = invoke_stream(&[
            r#"{"generation":"hi","stop_reason":null}"#,
            r#"{"generation":"","stop_reason":"stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":20,"outputTokenCount":3,"invocationLatency":90,"firstByteLatency":40}}"#,
        ]);
        let mut u = Usage::for_answer("aws-bedrock", PATH);
        u.observe(&llama);
        assert_eq!((u.counts.input, u.counts.output), (Some(20), Some(3)));
        // Other routes read the bytes as they come (and see nothing in these).
        let mut u = Usage::for_answer(
            "aws-bedrock",
            "/aws-bedrock/bedrock-runtime/us-east-1/model/m/invoke",
        );
        u.observe(&claude);
        assert_eq!((u.counts.input, u.counts.output), (None, None));
    }

    fn usage_of(frames: &[&str]) -> (Option<u64>, Option<u64>) {
        let mut u = Usage::default();
        for f in frames {
            u.observe(f.as_bytes());
        }
        (u.counts.input, u.counts.output)
    }

    #[test]
    fn stream_options_go_only_to_providers_that_take_them() {
        let chat = "chat/completions";
        assert!(takes_stream_options("openai", chat, None));
        assert!(takes_stream_options("groq", chat, None));
        assert!(
            !takes_stream_options("mistral", chat, None),
            "Mistral answers 422"
        );
        assert!(!takes_stream_options("custom-local", chat, None));
        let deployment = "res/dep/chat/completions";
        assert!(takes_stream_options(
            "azure-openai",
            deployment,
            Some("api-version=2024-10-21")
        ));
        assert!(!takes_stream_options(
            "azure-openai",
            deployment,
            Some("api-version=2024-06-01")
        ));
        assert!(!takes_stream_options("azure-openai", deployment, None));
        // Azure's v1 API takes it without an `api-version`, as OpenAI's does.
        assert!(takes_stream_options(
            "azure-openai",
            "res/openai/v1/chat/completions",
            None
        ));
    }

    #[test]
    fn every_provider_format_is_read() {
        assert_eq!(
            usage_of(&[
                r#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"prompt_tokens_details":{"cached_tokens":0}}}"#
            ]),
            (Some(12), Some(34))
        );
        assert_eq!(
            usage_of(&[r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":9}}"#]),
            (Some(7), Some(9))
        );
        assert_eq!(
            usage_of(&[
                r#"{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"totalTokenCount":8}}"#
            ]),
            (Some(3), Some(5))
        );
        assert_eq!(
            usage_of(&[
                r#"{"output":{},"usage":{"inputTokens":4,"outputTokens":6,"totalTokens":10}}"#
            ]),
            (Some(4), Some(6))
        );
        assert_eq!(usage_of(&[r#"{"choices":[]}"#]), (None, None));
    }

    #[test]
    fn only_unfinished_objects_are_kept_between_frames() {
        let mut u = Usage::default();
        u.observe(br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert!(u.pending.is_empty());
        u.observe(b"data: {\"choices\":[],\"usage\":null}\n\n");
        assert!(u.pending.is_empty());
        u.observe(b"data: {\"choices\":[],\"usage\": ");
        assert_eq!(u.pending, b"\"usage\": ");
        u.observe(b"{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n");
        assert!(u.pending.is_empty());
        assert_eq!((u.counts.input, u.counts.output), (Some(5), Some(6)));
        u.observe(b"data: {\"us");
        assert_eq!(u.pending, b"\"us");
    }

    #[test]
    fn streams_take_the_last_values_and_survive_split_frames() {
        // OpenAI: usage null until the last chunk.
        assert_eq!(
            usage_of(&[
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ]),
            (Some(5), Some(2))
        );
        // Anthropic: input in message_start, cumulative output in message_delta.
        assert_eq!(
            usage_of(&[
                "event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n",
                "event: message_delta\ndata: {\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n",
            ]),
            (Some(11), Some(15))
        );
        // Both events in one frame, then an unrelated frame: the later event still wins.
        assert_eq!(
            usage_of(&[
                "data: {\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}\n\ndata: {\"usage\":{\"output_tokens\":15}}\n\n",
                "data: {\"type\":\"message_stop\"}\n\n",
            ]),
            (Some(11), Some(15))
        );
        // An object split anywhere, in two or three frames.
        let whole = r#"{"usage":{"prompt_tokens":21,"completion_tokens":43}}"#;
        for cut in 1..whole.len() {
            assert_eq!(
                usage_of(&[&whole[..cut], &whole[cut..]]),
                (Some(21), Some(43)),
                "cut at {cut}"
            );
            for second in cut + 1..whole.len() {
                assert_eq!(
                    usage_of(&[&whole[..cut], &whole[cut..second], &whole[second..]]),
                    (Some(21), Some(43)),
                    "cut at {cut} and {second}"
                );
            }
        }
    }
    fn tokens_of(frames: &[&str]) -> Tokens {
        let mut u = Usage::default();
        for f in frames {
            u.observe(f.as_bytes());
        }
        u.tokens()
    }

    #[test]
    fn reasoning_beside_the_output_is_output_and_inside_it_is_not_counted_twice() {
        // xAI: the total holds reasoning apart from completion_tokens.
        let xai = r#"{"usage":{"prompt_tokens":10,"completion_tokens":9,"total_tokens":113,"completion_tokens_details":{"reasoning_tokens":94}}}"#;
        assert_eq!(tokens_of(&[xai]).output, Some(103));
        // OpenAI: reasoning inside completion_tokens, the total without it.
        let openai = r#"{"usage":{"prompt_tokens":10,"completion_tokens":103,"total_tokens":113,"completion_tokens_details":{"reasoning_tokens":94}}}"#;
        assert_eq!(tokens_of(&[openai]).output, Some(103));
    }

    fn tokens(input: u64, output: u64, read: u64, write: u64, write_1h: u64) -> Tokens {
        Tokens {
            input: Some(input),
            output: Some(output),
            cache_read: read,
            cache_write: write,
            cache_write_1h: write_1h,
            ..Tokens::default()
        }
    }

    fn read_answer(provider: &str, path: &str, frames: &[&[u8]]) -> Tokens {
        let mut u = Usage::for_answer(provider, path);
        for f in frames {
            u.observe(f);
        }
        u.tokens()
    }

    #[test]
    fn openai_audio_tokens_are_told_apart_inside_the_input_and_output() {
        let chat = r#"{"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":800,"text_tokens":200},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":400,"text_tokens":100}}}"#;
        let t = tokens_of(&[chat]);
        assert_eq!((t.input, t.output), (Some(1000), Some(500)));
        assert_eq!((t.audio_input, t.audio_output), (800, 400));
        // A transcription: `input_token_details`, the text prompt beside the audio.
        let transcription = r#"{"text":"hi","usage":{"type":"tokens","input_tokens":120,"input_token_details":{"text_tokens":40,"audio_tokens":80},"output_tokens":50,"total_tokens":170}}"#;
        let t = tokens_of(&[transcription]);
        assert_eq!(
            (t.input, t.output, t.audio_input, t.audio_output),
            (Some(120), Some(50), 80, 0)
        );
        // A key of another object, or of the usage object's own level, is not audio.
        let other = r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"audio_tokens":9,"x_details":{"audio_tokens":9}}}"#;
        let t = tokens_of(&[other]);
        assert_eq!((t.audio_input, t.audio_output), (0, 0));
        // Split anywhere.
        for cut in 1..chat.len() {
            let t = tokens_of(&[&chat[..cut], &chat[cut..]]);
            assert_eq!((t.audio_input, t.audio_output), (800, 400), "cut at {cut}");
        }
    }

    #[test]
    fn gemini_audio_input_and_image_output_are_read_by_modality() {
        let body = r#"{"usageMetadata":{"promptTokenCount":1060,"candidatesTokenCount":1300,"totalTokenCount":2360,"promptTokensDetails":[{"modality":"TEXT","tokenCount":50},{"modality":"AUDIO","tokenCount":1000},{"tokenCount":10,"modality":"IMAGE"}],"candidatesTokensDetails":[{"modality":"IMAGE","tokenCount":1290},{"modality":"TEXT","tokenCount":10}],"toolUsePromptTokensDetails":[{"modality":"AUDIO","tokenCount":7}]}}"#;
        let t = tokens_of(&[body]);
        assert_eq!((t.input, t.output), (Some(1060), Some(1300)));
        assert_eq!(
            (t.audio_input, t.audio_output, t.image_output),
            (1000, 0, 1290)
        );
        for cut in 1..body.len() {
            let t = tokens_of(&[&body[..cut], &body[cut..]]);
            assert_eq!(
                (t.audio_input, t.image_output),
                (1000, 1290),
                "cut at {cut}"
            );
        }
        // Audio read from the cache is not fresh audio.
        let cached = r#"{"usageMetadata":{"promptTokenCount":31000,"cachedContentTokenCount":28000,"candidatesTokenCount":10,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5000},{"modality":"AUDIO","tokenCount":26000}],"cacheTokensDetails":[{"modality":"TEXT","tokenCount":3000},{"modality":"AUDIO","tokenCount":25000}]}}"#;
        let t = tokens_of(&[cached]);
        assert_eq!(
            (t.input, t.cache_read, t.audio_input),
            (Some(31000), 28000, 1000)
        );
        // Streamed: the last chunk's counts, not a sum over chunks.
        let chunk = |image: u64| {
            format!(
                "data: {{\"usageMetadata\":{{\"promptTokenCount\":10,\"candidatesTokenCount\":{image},\"candidatesTokensDetails\":[{{\"modality\":\"IMAGE\",\"tokenCount\":{image}}}]}}}}\r\n\r\n"
            )
        };
        let t = tokens_of(&[&chunk(1290), &chunk(1290)]);
        assert_eq!((t.output, t.image_output), (Some(1290), 1290));
    }

    #[test]
    fn anthropic_web_searches_are_counted_once_per_answer() {
        let body = r#"{"type":"message","usage":{"input_tokens":2000,"output_tokens":300,"server_tool_use":{"web_search_requests":3,"web_fetch_requests":1}}}"#;
        assert_eq!(tokens_of(&[body]).web_searches, 3);
        // Streamed: cumulative in message_delta.
        let start = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":2000,\"output_tokens\":1,\"server_tool_use\":{\"web_search_requests\":0}}}}\n\n";
        let delta = "data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":2000,\"output_tokens\":300,\"server_tool_use\":{\"web_search_requests\":3}}}\n\n";
        assert_eq!(tokens_of(&[start, delta]).web_searches, 3);
        let old_delta = "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":300,\"server_tool_use\":{\"web_search_requests\":2}}}\n\n";
        assert_eq!(tokens_of(&[start, old_delta]).web_searches, 2);
        // A decoy (a tool's input) before the real usage does not linger.
        let decoy = r#"{"content":[{"type":"tool_use","input":{"usage":{"input_tokens":1,"server_tool_use":{"web_search_requests":999}}}}],"usage":{"input_tokens":5,"output_tokens":3}}"#;
        assert_eq!(tokens_of(&[decoy]).web_searches, 0);
    }

    /// An OpenAI Responses object with three web search calls (one opening a page), a file
    /// search, a message quoting an item's type, the tools declared (`tools`), its usage and
    /// metadata the app chose to look like a final event.
    fn response_object(tools: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "id": "resp_1", "object": "response", "created_at": 1741476542, "status": "completed",
            "model": "gpt-4.1-2025-04-14",
            "output": [
                {"type": "web_search_call", "id": "ws_1", "status": "completed",
                 "action": {"type": "search", "query": "sidegate"}},
                {"id": "ws_2", "type": "web_search_call", "status": "completed",
                 "action": {"type": "open_page", "url": "https://example.com"}},
                {"type": "web_search_call", "id": "ws_3", "status": "completed",
                 "action": {"type": "search", "query": "x", "sources": [{"type": "url", "url": "https://a"}]}},
                {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["q"], "results": null},
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "annotations": [],
                              "text": "Quoted: {\"type\":\"web_search_call\"} and \"type\": \"file_search_call\""}]}
            ],
            "tools": tools,
            "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 356, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 684},
            // The app's own: no item, no final event.
            "metadata": {"a": "} {\"type\": \"open_page\"", "type": "response.completed", "b\\": "open_page"}
        })
    }

    fn tool_use(t: &Tokens) -> (u64, bool, u64, Option<u64>) {
        (
            t.web_searches,
            t.web_search_preview,
            t.file_searches,
            t.input,
        )
    }

    #[test]
    fn responses_hosted_tool_calls_are_counted_once_each_however_cut() {
        let preview = serde_json::json!([
            {"type": "web_search_preview", "search_context_size": "medium", "user_location": {"type": "approximate"}},
            {"type": "file_search", "vector_store_ids": ["vs_1"]}
        ]);
        let doc = response_object(preview);
        let compact = doc.to_string();
        let pretty = serde_json::to_string_pretty(&doc).expect("json");
        for body in [&compact, &pretty] {
            for cut in 0..body.len() {
                let (a, b) = body.as_bytes().split_at(cut);
                let t = read_answer("openai", "/openai/responses", &[a, b]);
                assert_eq!(tool_use(&t), (2, true, 1, Some(328)), "cut at {cut}");
            }
            let bytes: Vec<&[u8]> = body.as_bytes().chunks(1).collect();
            assert_eq!(
                tool_use(&read_answer("openai", "responses", &bytes)),
                (2, true, 1, Some(328))
            );
        }
        // A poll or cancellation of a response answers with the object too.
        for path in [
            "v1/responses/resp_1",
            "responses/resp_1/cancel",
            "respons%65s",
        ] {
            let t = read_answer("openai", path, &[compact.as_bytes()]);
            assert_eq!(tool_use(&t), (2, true, 1, Some(328)), "{path}");
        }
        // The general tool (any snapshot), or both declared: not the preview's price.
        for tools in [
            serde_json::json!([{"type": "web_search"}]),
            serde_json::json!([{"type": "web_search_2025_08_26"}]),
            serde_json::json!([{"type": "web_search_preview_2025_03_11"}, {"type": "web_search"}]),
        ] {
            let body = response_object(tools.clone()).to_string();
            let t = read_answer("openai", "responses", &[body.as_bytes()]);
            assert_eq!(tool_use(&t), (2, false, 1, Some(328)), "{tools}");
        }
        // Azure OpenAI answers in the same format.
        for path in ["res/gpt-4.1/responses", "res/gpt-4.1/responses/resp_1"] {
            let t = read_answer("azure-openai", path, &[compact.as_bytes()]);
            assert_eq!(tool_use(&t), (2, true, 1, Some(328)), "{path}");
        }
        // Other endpoints and providers are not read for them: only the usage.
        for (provider, path) in [
            ("openai", "responses/resp_1/input_items"),
            ("openai", "chat/completions"),
            ("azure-openai", "res/gpt-4.1/chat/completions"),
            ("anthropic", "v1/responses"),
        ] {
            let t = read_answer(provider, path, &[compact.as_bytes()]);
            assert_eq!(tool_use(&t), (0, false, 0, Some(328)), "{provider} {path}");
        }
    }

    #[test]
    fn values_the_app_writes_never_pass_for_items_tools_or_final_events() {
        let mut doc = response_object(serde_json::json!([
            {"type": "web_search_preview"},
            {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {
                "filter": {"type": "object", "default": {"type": "response.completed"}},
                "kind": {"type": "web_search"}}}},
            {"type": "mcp", "server_label": "docs", "allowed_tools": null}
        ]));
        let file_hits = |attributes: serde_json::Value| {
            serde_json::json!({"type": "file_search_call", "id": "fs_2", "status": "completed",
                "queries": ["q"], "results": [
                    {"file_id": "f1", "score": 0.9, "text": "t", "attributes": attributes},
                    {"file_id": "f2", "score": 0.8, "text": "t", "attributes": {"type": "web_search_call"}}]})
        };
        let output = doc["output"].as_array_mut().expect("output");
        output.push(file_hits(serde_json::json!({"type": "open_page"})));
        output.push(file_hits(
            serde_json::json!({"nested": {"type": "file_search_call"}}),
        ));
        // An MCP server's tools, their schemas echoed.
        output.push(
            serde_json::json!({"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "docs",
            "tools": [{"name": "find", "input_schema": {"type": "web_search_call",
                "properties": {"action": {"type": "search"}}}}]}),
        );
        // A function call whose arguments are the app's JSON, as a string.
        output.push(
            serde_json::json!({"type": "function_call", "name": "lookup",
            "arguments": "{\"type\": \"web_search_call\"}", "action": {"type": "search"}}),
        );
        doc["instructions"] = serde_json::json!([
            {"type": "web_search_call", "id": "ws_9", "action": {"type": "search"}},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be brief"}]}]);
        doc["text"] = serde_json::json!({"format": {"type": "json_schema", "name": "r", "schema": {
            "type": "object", "properties": {"type": {"type": "string", "enum": ["response.completed"]}}}}});
        doc["reasoning"] = serde_json::json!({"effort": null, "summary": null});
        let body = doc.to_string();
        // Two searches, one page opened, three file searches; preview declared alone.
        let want = (2, true, 3, Some(328));
        for cut in 0..body.len() {
            let (a, b) = body.as_bytes().split_at(cut);
            assert_eq!(
                tool_use(&read_answer("openai", "responses", &[a, b])),
                want,
                "cut at {cut}"
            );
        }
    }

    /// A Responses event stream whose response makes one web search (announced by its own
    /// events), then answers; `ended`: with its final `response.completed` event.
    fn response_events(ended: bool) -> String {
        let item = serde_json::json!({"type": "web_search_call", "id": "ws_1", "status": "completed",
                                      "action": {"type": "search", "query": "sidegate"}});
        let mut response = response_object(serde_json::json!([{"type": "web_search"}]));
        response["output"] =
            serde_json::json!([item, {"type": "message", "id": "msg_1", "content": []}]);
        let started = serde_json::json!({"id": "resp_1", "object": "response", "status": "in_progress",
                                         "output": [], "tools": [{"type": "web_search"}], "usage": null,
                                         "metadata": {"type": "web_search_call"}});
        let mut events = vec![
            (
                "response.created",
                serde_json::json!({"type": "response.created", "sequence_number": 0, "response": started}),
            ),
            (
                "response.output_item.added",
                serde_json::json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "web_search_call", "id": "ws_1", "status": "in_progress"}}),
            ),
            (
                "response.web_search_call.in_progress",
                serde_json::json!({"type": "response.web_search_call.in_progress", "item_id": "ws_1"}),
            ),
            (
                "response.web_search_call.searching",
                serde_json::json!({"type": "response.web_search_call.searching", "item_id": "ws_1"}),
            ),
            (
                "response.web_search_call.completed",
                serde_json::json!({"type": "response.web_search_call.completed", "item_id": "ws_1"}),
            ),
            (
                "response.output_item.done",
                serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            ),
            (
                "response.output_text.delta",
                serde_json::json!({"type": "response.output_text.delta", "delta": "\"type\":\"web_search_call\""}),
            ),
        ];
        if ended {
            events.push((
                "response.completed",
                serde_json::json!({"type": "response.completed", "response": response}),
            ));
        }
        events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect()
    }

    #[test]
    fn a_responses_stream_counts_the_calls_of_its_final_response() {
        let stream = response_events(true);
        for cut in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(cut);
            let t = read_answer("openai", "responses", &[a, b]);
            assert_eq!(tool_use(&t), (1, false, 0, Some(328)), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.as_bytes().chunks(3).collect();
        assert_eq!(
            tool_use(&read_answer("openai", "responses", &bytes)),
            (1, false, 0, Some(328))
        );
        // Cut before its final event: the calls its progress events reported, no tokens.
        let cut = response_events(false);
        let t = read_answer("openai", "responses", &[cut.as_bytes()]);
        assert_eq!(tool_use(&t), (1, false, 0, None));
    }

    /// A stream whose three web searches (one only opened a page) and file search are each
    /// announced, reported completed and done, then listed again by `response.completed`;
    /// `response.created` declares the preview tool.
    fn preview_stream() -> (String, usize) {
        let searched = |id: &str, action: &str| {
            serde_json::json!({"type": "web_search_call", "id": id,
            "status": "completed", "action": {"type": action, "query": "q", "url": "https://a"}})
        };
        let items = [
            searched("ws_1", "search"),
            searched("ws_2", "open_page"),
            searched("ws_3", "search"),
            serde_json::json!({"type": "file_search_call", "id": "fs_1", "status": "completed",
                "queries": ["q"], "results": [{"file_id": "f", "attributes": {"type": "open_page"}}]}),
        ];
        let tools = serde_json::json!([{"type": "web_search_preview"},
            {"type": "file_search", "vector_store_ids": ["vs_1"]}]);
        let created = serde_json::json!({"type": "response.created", "response": {"id": "resp_1",
            "status": "in_progress", "output": [], "tools": tools, "usage": null}});
        let mut events = vec![created];
        for item in &items {
            let kind = item["type"].as_str().expect("type");
            events.push(
                serde_json::json!({"type": "response.output_item.added", "item": {"type": kind}}),
            );
            events.push(
                serde_json::json!({"type": format!("response.{kind}.completed"), "item_id": "x"}),
            );
            events.push(serde_json::json!({"type": "response.output_item.done", "item": item}));
        }
        let mut response = response_object(tools);
        response["output"] = serde_json::Value::Array(items.to_vec());
        let head: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
            .collect();
        let last = serde_json::json!({"type": "response.completed", "sequence_number": 14, "response": response});
        let stream = format!("{head}event: response.completed\ndata: {last}\n\n");
        (stream, head.len())
    }

    #[test]
    fn a_responses_stream_cut_anywhere_charges_what_it_showed_at_its_declared_rate() {
        let (stream, head) = preview_stream();
        let whole = read_answer("openai", "responses", &[stream.as_bytes()]);
        assert_eq!(tool_use(&whole), (2, true, 1, Some(328)));
        for cut in head..stream.len() {
            let t = read_answer("openai", "responses", &[&stream.as_bytes()[..cut]]);
            let (searches, preview, files, _) = tool_use(&t);
            // The completed events' 3 and 1 until the final event's items show more (they
            // never do) or it ends: then its own 2 and 1.
            let want = if cut < stream.len() - 2 {
                (3, 1)
            } else {
                (2, 1)
            };
            assert_eq!((searches, files), want, "cut at {cut}");
            assert!(preview, "cut at {cut}: the preview's rate, as declared");
        }
        // Without its completed events (a provider that sends none), the done items count.
        let no_completed: String = stream
            .split("\n\n")
            .filter(|e| !e.contains("_call.completed"))
            .map(|e| format!("{e}\n\n"))
            .collect();
        let cut = no_completed
            .find("event: response.completed")
            .expect("final");
        let t = read_answer(
            "openai",
            "responses",
            &[&no_completed.as_bytes()[..cut + 120]],
        );
        assert_eq!(tool_use(&t), (2, true, 1, None));
        // Its final event's items past the done ones, as far as they came.
        let only_final: String = no_completed
            .split("\n\n")
            .filter(|e| !e.contains("output_item.done"))
            .map(|e| format!("{e}\n\n"))
            .collect();
        let at = only_final.find("event: response.completed").expect("final");
        let item_3 = at + only_final[at..].find("\"id\":\"ws_3\"").expect("ws_3");
        let t = read_answer("openai", "responses", &[&only_final.as_bytes()[..item_3]]);
        assert_eq!(
            tool_use(&t),
            (1, true, 0, None),
            "ws_1 whole, ws_2 a page opened"
        );
        let tools = at + only_final[at..].find("\"tools\"").expect("tools");
        let t = read_answer("openai", "responses", &[&only_final.as_bytes()[..tools]]);
        assert_eq!(tool_use(&t), (2, true, 1, None));
    }

    #[test]
    fn openai_image_answers_count_their_images_beside_their_usage() {
        // DALL·E: no usage, one image of `data` per picture, as a link or base64.
        let linked = serde_json::to_string_pretty(&serde_json::json!({"created": 1, "data": [
            {"url": "https://oaidalleapi.example/1.png", "revised_prompt": "a \"url\": cat"},
            {"url": "https://oaidalleapi.example/2.png", "revised_prompt": "b"}]}))
        .expect("json");
        let inline = r#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="},{"b64_json":"iVBORw0KGgo="},{"b64_json":"iVBORw0KGgo="}]}"#;
        for (body, n) in [(linked.as_str(), 2), (inline, 3)] {
            for cut in 0..body.len() {
                let (a, b) = body.as_bytes().split_at(cut);
                let t = read_answer("openai", "/openai/images/generations", &[a, b]);
                assert_eq!((t.images, t.input), (n, None), "cut at {cut}");
            }
        }
        for path in ["images/edits", "v1/images/variations"] {
            assert_eq!(read_answer("openai", path, &[inline.as_bytes()]).images, 3);
        }
        // Azure OpenAI's DALL·E deployments answer alike.
        for path in [
            "res/dall-e-3/images/generations",
            "res/openai/deployments/dall-e-3/images/generations",
        ] {
            let t = read_answer("azure-openai", path, &[inline.as_bytes()]);
            assert_eq!(t.images, 3, "{path}");
        }
        // gpt-image-1: its usage is read too.
        let tokened = br#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}],"usage":{"input_tokens":10,"output_tokens":1056,"output_tokens_details":{"image_tokens":1056}}}"#;
        let t = read_answer("openai", "images/generations", &[tokened]);
        assert_eq!((t.images, t.input, t.image_output), (1, Some(10), 1056));
        // Not an image endpoint: nothing counted.
        assert_eq!(
            read_answer("openai", "chat/completions", &[inline.as_bytes()]).images,
            0
        );
    }

    #[test]
    fn only_perplexitys_stated_cost_is_taken() {
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":300,"total_tokens":310,"search_context_size":"low","cost":{"input_tokens_cost":3e-05,"output_tokens_cost":0.0045,"request_cost":0.006,"total_cost":0.01053}}}"#;
        let path = "/perplexity-ai/chat/completions";
        let t = read_answer("perplexity-ai", path, &[body]);
        assert_eq!(
            (t.input, t.output, t.stated_cost),
            (Some(10), Some(300), Some(0.01053))
        );
        assert_eq!(read_answer("openai", path, &[body]).stated_cost, None);
        for cut in 1..body.len() {
            let t = read_answer("perplexity-ai", path, &[&body[..cut], &body[cut..]]);
            assert_eq!(t.stated_cost, Some(0.01053), "cut at {cut}");
        }
        // In exponent form, and the last chunk's of a stream.
        let chunk = |usd: &str| {
            format!(
                "data: {{\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2,\"cost\":{{\"total_cost\":{usd}}}}}}}\n\n"
            )
        };
        let (a, b) = (chunk("5e-03"), chunk("6.5E-3"));
        let t = read_answer("perplexity-ai", path, &[a.as_bytes(), b.as_bytes()]);
        assert_eq!(t.stated_cost, Some(0.0065));
        // Not a cost: negative, huge, not a number; a `total_cost` of another object.
        for bad in ["-1", "1e300", "\"0.5\"", "null"] {
            let body =
                format!(r#"{{"usage":{{"prompt_tokens":1,"cost":{{"total_cost":{bad}}}}}}}"#);
            assert_eq!(
                read_answer("perplexity-ai", path, &[body.as_bytes()]).stated_cost,
                None,
                "{bad}"
            );
        }
        let other = br#"{"usage":{"prompt_tokens":1,"x":{"total_cost":5},"total_cost":5}}"#;
        assert_eq!(
            read_answer("perplexity-ai", path, &[other]).stated_cost,
            None
        );
    }

    #[test]
    fn openrouters_stated_cost_is_taken_with_a_byok_providers_charge() {
        let path = "/openrouter/v1/chat/completions";
        let usage = |cost: &str, byok: bool, upstream: &str| {
            format!(
                r#"{{"id":"gen-1","usage":{{"prompt_tokens":194,"completion_tokens":2,"total_tokens":196,"cost":{cost},"is_byok":{byok},"prompt_tokens_details":{{"cached_tokens":0}},"cost_details":{{"upstream_inference_cost":{upstream}}}}}}}"#
            )
        };
        let body = usage("0.95", false, "0.95");
        let t = read_answer("openrouter", path, &[body.as_bytes()]);
        assert_eq!(
            (t.input, t.output, t.stated_cost),
            (Some(194), Some(2), Some(0.95))
        );
        for cut in 1..body.len() {
            let (a, b) = body.as_bytes().split_at(cut);
            let t = read_answer("openrouter", path, &[a, b]);
            assert_eq!(t.stated_cost, Some(0.95), "cut at {cut}");
        }
        // Served with the account's own key: OpenRouter's fee and the provider's charge.
        let byok = usage("2e-05", true, "0.0004");
        let t = read_answer("openrouter", path, &[byok.as_bytes()]);
        assert!(
            t.stated_cost.is_some_and(|c| (c - 0.00042).abs() < 1e-12),
            "{t:?}"
        );
        let unknown = usage("2e-05", true, "null");
        let t = read_answer("openrouter", path, &[unknown.as_bytes()]);
        assert_eq!(t.stated_cost, Some(2e-05));
        // The last chunk of a stream, after chunks with no usage.
        let stream = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n".to_owned(),
            format!("data: {}\n\n", usage("0.0004", false, "0.0004")),
        ];
        let frames: Vec<&[u8]> = stream.iter().map(|f| f.as_bytes()).collect();
        assert_eq!(
            read_answer("openrouter", path, &frames).stated_cost,
            Some(0.0004)
        );
        // Another provider's `cost`, or Perplexity's shape on OpenRouter, is not taken.
        assert_eq!(
            read_answer("openai", path, &[body.as_bytes()]).stated_cost,
            None
        );
        let pplx = br#"{"usage":{"prompt_tokens":1,"cost":{"total_cost":5}}}"#;
        assert_eq!(read_answer("openrouter", path, &[pplx]).stated_cost, None);
        for bad in ["-1", "1e300", "\"0.5\"", "null"] {
            let body = format!(r#"{{"usage":{{"prompt_tokens":1,"cost":{bad}}}}}"#);
            assert_eq!(
                read_answer("openrouter", path, &[body.as_bytes()]).stated_cost,
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn seconds_of_audio_billed_by_duration_are_read() {
        let path = "/openai/audio/transcriptions";
        let body = br#"{"task":"transcribe","duration":90.4,"text":"hi","usage":{"type":"duration","seconds":91}}"#;
        for cut in 1..body.len() {
            let t = read_answer("openai", path, &[&body[..cut], &body[cut..]]);
            assert_eq!(
                (t.input, t.output, t.audio_seconds),
                (None, None, 91.0),
                "cut at {cut}"
            );
        }
        let t = read_answer(
            "openai",
            path,
            &[br#"{"usage":{"type":"duration","seconds":2.5}}"#],
        );
        assert_eq!(t.audio_seconds, 2.5);
        for bad in ["-3", "1e300", "\"9\"", "null"] {
            let body = format!(r#"{{"usage":{{"type":"duration","seconds":{bad}}}}}"#);
            let t = read_answer("openai", path, &[body.as_bytes()]);
            assert_eq!(t.audio_seconds, 0.0, "{bad}");
        }
    }

    #[test]
    fn image_tokens_of_an_image_models_answer_are_told_apart() {
        let body = br#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}],"usage":{"input_tokens":343,"input_tokens_details":{"image_tokens":323,"text_tokens":20},"output_tokens":1056,"total_tokens":1399}}"#;
        for cut in 1..body.len() {
            let t = read_answer(
                "openai",
                "/openai/images/edits",
                &[&body[..cut], &body[cut..]],
            );
            assert_eq!(
                (t.input, t.output, t.image_input, t.image_output),
                (Some(343), Some(1056), 323, 0),
                "cut at {cut}"
            );
        }
        let out = br#"{"usage":{"input_tokens":10,"output_tokens":1300,"output_tokens_details":{"image_tokens":1290,"text_tokens":10}}}"#;
        let t = read_answer("openai", "/openai/images/generations", &[out]);
        assert_eq!((t.image_input, t.image_output), (0, 1290));
        // Never more than the input's part not read from the cache or audio.
        let odd = br#"{"usage":{"input_tokens":10,"input_tokens_details":{"image_tokens":50,"audio_tokens":4}}}"#;
        let t = read_answer("openai", "/openai/responses", &[odd]);
        assert_eq!((t.audio_input, t.image_input), (4, 6));
    }

    #[test]
    fn vertex_embedding_statistics_add_up_to_the_input() {
        let body = br#"{"predictions":[{"embeddings":{"values":[0.1,-0.2],"statistics":{"truncated":false,"token_count":3}}},{"embeddings":{"statistics":{"token_count":2,"truncated":false},"values":[0.3]}},{"embeddings":{"values":[0.5],"statistics":{"token_count":1,"truncated":true}}}],"metadata":{"billableCharacterCount":24}}"#;
        let path = "/google-vertex-ai/v1/projects/p/locations/us-central1/publishers/google/models/text-embedding-005:predict";
        for cut in 0..body.len() {
            for second in cut..body.len() {
                let frames: [&[u8]; 3] = [&body[..cut], &body[cut..second], &body[second..]];
                let t = read_answer("google-vertex-ai", path, &frames);
                assert_eq!(
                    (t.input, t.output, t.characters),
                    (Some(6), None, 24),
                    "cut at {cut} and {second}"
                );
            }
        }
        // A byte at a time.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let t = read_answer("google-vertex-ai", path, &bytes);
        assert_eq!((t.input, t.characters), (Some(6), 24));
        // Only Vertex's embeddings: not another provider's answer, not an Imagen one.
        assert_eq!(read_answer("openai", path, &[body]).input, None);
        let imagen = path.replace("text-embedding-005", "imagen-4.0-generate-001");
        assert_eq!(
            read_answer("google-vertex-ai", &imagen, &[body]).input,
            None
        );
    }

    #[test]
    fn imagen_images_are_counted_across_frames() {
        let body = br#"{"predictions":[{"mimeType":"image/png","bytesBase64Encoded":"iVBORw0KGgo="},{"raiFilteredReason":"x"},{"bytesBase64Encoded":"iVBORw0KGgo=","mimeType":"image/png"}]}"#;
        let path = "/google-ai-studio/v1beta/models/imagen-4.0-generate-001:predict";
        for cut in 0..body.len() {
            for second in cut..body.len() {
                let frames: [&[u8]; 3] = [&body[..cut], &body[cut..second], &body[second..]];
                let t = read_answer("google-ai-studio", path, &frames);
                assert_eq!(t.images, 2, "cut at {cut} and {second}");
            }
        }
        let vertex = "/google-vertex-ai/v1/projects/p/locations/us-central1/publishers/google/models/imagen-3.0-generate-002:predict";
        assert_eq!(read_answer("google-vertex-ai", vertex, &[body]).images, 2);
        // Stored in Cloud Storage: no bytes, one `gcsUri` each; a prompt echo holding a key's
        // text (escaped) is no image; spaces before a colon that comes in the next frame.
        let stored = br#"{"predictions":[{"mimeType":"image/png","gcsUri":"gs://b/1.png","prompt":"draw \"bytesBase64Encoded\" and \"gcsUri\""},{"gcsUri"   :"gs://b/2.png"}]}"#;
        for cut in 0..stored.len() {
            for second in cut..stored.len() {
                let frames: [&[u8]; 3] = [&stored[..cut], &stored[cut..second], &stored[second..]];
                let t = read_answer("google-vertex-ai", vertex, &frames);
                assert_eq!(t.images, 2, "cut at {cut} and {second}");
            }
        }
        // Not an Imagen answer: not counted (an embedding's `:predict`, another provider).
        let embed = "/google-vertex-ai/v1/projects/p/locations/l/publishers/google/models/text-embedding-005:predict";
        assert_eq!(read_answer("google-vertex-ai", embed, &[body]).images, 0);
        assert_eq!(read_answer("openai", path, &[body]).images, 0);
    }

    #[test]
    fn anthropic_cache_reads_and_writes_count_as_input() {
        // Non-streamed: 50 fresh + 100k read beside `input_tokens`.
        let body = r#"{"id":"msg","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":50,"cache_creation_input_tokens":0,"cache_read_input_tokens":100000,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":500,"service_tier":"standard"}}"#;
        assert_eq!(tokens_of(&[body]), tokens(100_050, 500, 100_000, 0, 0));
        // Streamed: the cache write in message_start, the output in message_delta.
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg\",\"usage\":{\"input_tokens\":50,\"cache_creation_input_tokens\":100000,\"cache_read_input_tokens\":0,\"cache_creation\":{\"ephemeral_5m_input_tokens\":40000,\"ephemeral_1h_input_tokens\":60000},\"output_tokens\":1}}}\n\n";
        let delta = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":500}}\n\n";
        assert_eq!(
            tokens_of(&[start, delta]),
            tokens(100_050, 500, 0, 100_000, 60_000)
        );
        // Split anywhere, the object is still read whole.
        let whole = format!("{start}{delta}");
        for cut in 1..whole.len() {
            assert_eq!(
                tokens_of(&[&whole[..cut], &whole[cut..]]),
                tokens(100_050, 500, 0, 100_000, 60_000),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bedrock_cache_counts_after_the_output_are_read() {
        let body = r#"{"metrics":{"latencyMs":100},"output":{"message":{"content":[{"text":"hi"}],"role":"assistant"}},"stopReason":"end_turn","usage":{"inputTokens":50,"outputTokens":500,"totalTokens":100550,"cacheReadInputTokens":100000,"cacheWriteInputTokens":0}}"#;
        assert_eq!(tokens_of(&[body]), tokens(100_050, 500, 100_000, 0, 0));
        // `cacheDetails` entries name their own `inputTokens` (a write's), which is not the input.
        let body = r#"{"usage":{"inputTokens":50,"outputTokens":500,"totalTokens":3550,"cacheReadInputTokens":0,"cacheWriteInputTokens":3000,"cacheDetails":[{"inputTokens":1000,"ttl":"1h"},{"ttl":"5m","inputTokens":2000}]}}"#;
        assert_eq!(tokens_of(&[body]), tokens(3050, 500, 0, 3000, 1000));
    }

    #[test]
    fn gemini_thinking_is_output_and_tool_prompts_input() {
        let body = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":1000,"candidatesTokenCount":200,"totalTokenCount":3200,"promptTokensDetails":[{"modality":"TEXT","tokenCount":1000}],"thoughtsTokenCount":2000},"modelVersion":"gemini-2.5-pro"}"#;
        assert_eq!(tokens_of(&[body]), tokens(1000, 2200, 0, 0, 0));
        let body = r#"{"usageMetadata":{"promptTokenCount":1000,"candidatesTokenCount":200,"cachedContentTokenCount":800,"toolUsePromptTokenCount":300,"thoughtsTokenCount":50}}"#;
        assert_eq!(tokens_of(&[body]), tokens(1300, 250, 800, 0, 0));
        // Streamed: cumulative per chunk, the last one wins.
        let chunk = |cand: u64, thoughts: u64| {
            format!(
                "data: {{\"candidates\":[],\"usageMetadata\":{{\"promptTokenCount\":1000,\"candidatesTokenCount\":{cand},\"thoughtsTokenCount\":{thoughts}}}}}\n\n"
            )
        };
        let (a, b) = (chunk(1, 2000), chunk(200, 2000));
        assert_eq!(tokens_of(&[&a, &b]), tokens(1000, 2200, 0, 0, 0));
    }

    #[test]
    fn cached_input_inside_the_prompt_is_told_apart() {
        let chat = r#"{"id":"x","usage":{"prompt_tokens":100000,"completion_tokens":1000,"total_tokens":101000,"prompt_tokens_details":{"cached_tokens":90000,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":800}}}"#;
        assert_eq!(tokens_of(&[chat]), tokens(100_000, 1000, 90_000, 0, 0));
        let responses = r#"{"object":"response","usage":{"input_tokens":5000,"input_tokens_details":{"cached_tokens":4000},"output_tokens":3000,"output_tokens_details":{"reasoning_tokens":2500},"total_tokens":8000}}"#;
        assert_eq!(tokens_of(&[responses]), tokens(5000, 3000, 4000, 0, 0));
        let deepseek = r#"{"usage":{"prompt_tokens":1000,"completion_tokens":10,"prompt_cache_hit_tokens":600,"prompt_cache_miss_tokens":400}}"#;
        assert_eq!(tokens_of(&[deepseek]), tokens(1000, 10, 600, 0, 0));
        // No cache at all: plain totals.
        assert_eq!(
            tokens_of(&[r#"{"usage":{"prompt_tokens":7,"completion_tokens":9}}"#]),
            tokens(7, 9, 0, 0, 0)
        );
        assert_eq!(tokens_of(&[r#"{"choices":[]}"#]), Tokens::default());
    }

    #[test]
    fn a_usage_object_starting_a_data_line_is_read() {
        // A document over several `data:` lines, without the space after the colon.
        let frames = [
            "data:{\"id\":\"c\",\r\ndata:\"usage\": {\"prompt_tokens\": 12,\r\ndata:\"completion_tokens\": 3}}\r\n\r\n",
        ];
        assert_eq!(usage_of(&frames), (Some(12), Some(3)));
    }

    #[test]
    fn usage_text_inside_strings_is_never_read() {
        // The answer's text quotes a usage object; the real one has other numbers.
        let body = r#"{"output":[{"content":[{"type":"output_text","text":"Here: {\"usage\":{\"input_tokens\":1,\"cache_read_input_tokens\":999999,\"thoughtsTokenCount\":5,\"output_tokens\":1}}"}]}],"usage":{"input_tokens":5000,"output_tokens":3000}}"#;
        assert_eq!(tokens_of(&[body]), tokens(5000, 3000, 0, 0, 0));
        // Even when the quoted one comes last (the text of a streamed delta).
        let stream = [
            "data: {\"response\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":20}}}\n\n",
            "data: {\"delta\":\"{\\\"usage\\\":{\\\"input_tokens\\\":1,\\\"cached_tokens\\\":1,\\\"output_tokens\\\":1}}\"}\n\n",
        ];
        assert_eq!(tokens_of(&stream), tokens(10, 20, 0, 0, 0));
        // An object that is JSON (a tool's input) before the real usage: the real one replaces
        // every input- and output-side count, so the decoy's cache counts do not linger.
        let body = r#"{"content":[{"type":"tool_use","input":{"usage":{"input_tokens":1,"cachedContentTokenCount":1,"cache_read_input_tokens":7,"output_tokens":1,"thoughtsTokenCount":9}}}],"usage":{"input_tokens":5000,"output_tokens":3000}}"#;
        assert_eq!(tokens_of(&[body]), tokens(5000, 3000, 0, 0, 0));
        // A quoted object left open (its braces never balance) before the real one.
        let body = r#"{"choices":[{"message":{"content":"Print \"usage\":{ fill in"}}],"usage":{"prompt_tokens":1900,"completion_tokens":1000}}"#;
        assert_eq!(tokens_of(&[body]), tokens(1900, 1000, 0, 0, 0));
        let cut = body.len() / 2;
        assert_eq!(
            tokens_of(&[&body[..cut], &body[cut..]]),
            tokens(1900, 1000, 0, 0, 0)
        );
    }

    #[test]
    fn nested_base_counts_are_used_only_without_top_level_ones() {
        // Cohere v2: what is billed, one level down.
        let body = r#"{"usage":{"billed_units":{"input_tokens":5,"output_tokens":10},"tokens":{"input_tokens":71,"output_tokens":10}}}"#;
        assert_eq!(tokens_of(&[body]), tokens(5, 10, 0, 0, 0));
    }

    #[test]
    fn cohere_v1_and_embeddings_report_in_meta() {
        let read = |path: &str, frames: &[&str]| {
            let mut u = Usage::for_answer("cohere", path);
            for f in frames {
                u.observe(f.as_bytes());
            }
            u.tokens()
        };
        let chat = r#"{"text":"hi","generation_id":"g","meta":{"api_version":{"version":"1"},"billed_units":{"input_tokens":5,"output_tokens":10},"tokens":{"input_tokens":70,"output_tokens":10}}}"#;
        assert_eq!(read("v1/chat", &[chat]), tokens(5, 10, 0, 0, 0));
        let (a, b) = chat.split_at(40);
        assert_eq!(read("v1/chat", &[a, b]), tokens(5, 10, 0, 0, 0));
        // The v1 stream's last JSON line holds the whole response.
        let stream = concat!(
            r#"{"is_finished":false,"event_type":"text-generation","text":"hi"}"#,
            "\n",
            r#"{"is_finished":true,"event_type":"stream-end","response":{"text":"hi","meta":{"billed_units":{"input_tokens":3,"output_tokens":2}}},"finish_reason":"COMPLETE"}"#,
            "\n"
        );
        assert_eq!(read("v1/chat", &[stream]), tokens(3, 2, 0, 0, 0));
        let embed = r#"{"id":"e","embeddings":{"float":[[0.1]]},"texts":["hi"],"meta":{"api_version":{"version":"2"},"billed_units":{"input_tokens":7}}}"#;
        assert_eq!(read("v2/embed", &[embed]).input, Some(7));
        // v2 chat keeps its `usage`; a `meta` elsewhere is not read there.
        let v2 = r#"{"id":"c","meta":{"billed_units":{"input_tokens":99}},"usage":{"billed_units":{"input_tokens":5,"output_tokens":10}}}"#;
        assert_eq!(read("v2/chat", &[v2]), tokens(5, 10, 0, 0, 0));
    }
}
