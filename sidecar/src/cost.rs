//! What a request cost, in USD: the tokens its response reported times the model's price (audio
//! and image tokens at the model's rates for them), plus what is charged per image generated,
//! per hosted tool call (web and file searches), per minute of audio or per character; or the
//! cost the provider itself states in the answer (Perplexity, OpenRouter).
//!
//! Prices come from a built-in table of well-known models ([`PRICES_AS_OF`]) merged with the
//! gateway's `spec.pricing`; a model is priced by the longest table name that it equals or
//! continues after `-`, `@` or `:` (so `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`, and
//! `claude-3-5-sonnet@20240620` is `claude-3-5-sonnet`; `.` is no boundary, so `gpt-5.1` is not
//! `gpt-5`, nor `gpt-5.10` `gpt-5.1`), unless what it adds names a sibling priced otherwise
//! (`mini`, `nano`, `lite`, `pro`, `fast`). A model the table does not know has no cost (not a
//! zero one). `cf-aig-custom-cost` overrides the price per request.
//!
//! The model is found without parsing the request: in the path for Gemini, Vertex and Bedrock
//! routes, else the top-level `"model": "..."` of the JSON body.

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use sidegate_crds::policy::{ModelPrice, parse_usd};

use crate::error::GatewayError;
use crate::headers::{GatewayHeaders, Gw};
use crate::usage::Tokens;

/// The day of the last audit of the built-in prices against the providers' public price lists.
/// Each row says where its price was read where that is not the table of 2025-11-25; the audit
/// of 2026-11-28 checked these, fixing or adding the rows it names:
/// - Anthropic: platform.claude.com's Pricing page and model overviews (stored copies read that
///   day): every Claude row confirmed; Mythos 5.1 and Haiku 5.5 added; the cache reads of Opus
///   5.5, Fable 5.1 and Mythos 5.1 ([`CLAUDE_CACHE_READ`]) fixed.
/// - Google: the Gemini API's price page as transcribed word for word on 2026-10-07: the 2.5 rows
///   confirmed; Gemini 3.5 Flash, 3.5 Flash-Lite, 3.1 Pro and Embedding 2 added.
/// - DeepSeek: api-docs.deepseek.com's pricing page (archived 2026-04-26, quoted 2026-05-20):
///   `deepseek-chat` and `deepseek-reasoner` fixed (V4-Flash's aliases), V4-Flash and V4-Pro
///   added, their cache hits fixed.
///
/// Not confirmed against the provider's own page (none of theirs was found stored, only
/// third-party tables, which agree with the rows here but name newer models at prices that moved
/// within weeks): OpenAI's rows (each as its comment says, else as of 2025-11-25), and xAI's,
/// Groq's, Mistral's, Cohere's and Perplexity's (as of 2025-11-25 where their comments give no
/// other date). Newer OpenAI (GPT-5.4 and later), xAI, Groq and Mistral models have no row:
/// price them in `spec.pricing`.
pub const PRICES_AS_OF: &str = "2026-11-28";

/// A model's price in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Per million input (prompt) tokens.
    pub input: f64,
    /// Per million output (generated) tokens.
    pub output: f64,
    /// Per million input tokens read from the provider's prompt cache.
    pub cache_read: f64,
    /// Per million input tokens written to the prompt cache (Anthropic's 5-minute writes).
    pub cache_write: f64,
    /// Per million input tokens written to the prompt cache for an hour (Anthropic).
    pub cache_write_1h: f64,
    /// Per million input audio tokens (the input price for a model without one of its own).
    pub audio_input: f64,
    /// Per million input audio tokens read from the prompt cache (the cache's read price for a
    /// model without one of its own).
    pub audio_cache_read: f64,
    /// Per million input image tokens read from the prompt cache (the cache's read price for a
    /// model without one of its own).
    pub image_cache_read: f64,
    /// Per million output audio tokens (the output price for a model without one of its own).
    pub audio_output: f64,
    /// Per million input image tokens (the input price for a model without one of its own).
    pub image_input: f64,
    /// Per million output image tokens (the output price for a model without one of its own).
    pub image_output: f64,
    /// Per image generated, in USD (Imagen; DALL·E at its default size and quality, which
    /// [`per_image`] prices by the request's).
    pub per_image: f64,
    /// Per server-side web search, in USD (Anthropic's web search tool, OpenAI's `web_search`).
    pub per_web_search: f64,
    /// Per call of OpenAI's `web_search_preview` tool, in USD.
    pub per_web_search_preview: f64,
    /// Per call of OpenAI's file search tool, in USD.
    pub per_file_search: f64,
    /// Per minute of audio, in USD (a transcription billed by duration: `whisper-1`).
    pub per_audio_minute: f64,
    /// Per 1,000 characters billed, in USD (Vertex AI's text embedding models).
    pub per_1k_characters: f64,
}

impl Price {
    /// `input` and `output`, with the prompt cache priced by the provider's rule for `model`
    /// (see [`cache_ratios`]), hosted tool calls by its provider's fees (see [`ToolFees`]), and
    /// audio and images at the rates [`NOT_TEXT`] gives a model of that name (as text
    /// otherwise).
    pub fn of(model: &str, input: f64, output: f64) -> Self {
        let name = normalize(model);
        let (read, write, write_1h) = cache_ratios(name);
        let fees = ToolFees::of(name);
        let mut price = Self {
            input,
            output,
            cache_read: input * read,
            cache_write: input * write,
            cache_write_1h: input * write_1h,
            audio_input: input,
            audio_cache_read: input * read,
            image_cache_read: input * read,
            audio_output: output,
            image_input: input,
            image_output: output,
            per_image: 0.0,
            per_web_search: fees.web_search,
            per_web_search_preview: fees.web_search_preview,
            per_file_search: fees.file_search,
            per_audio_minute: 0.0,
            per_1k_characters: 0.0,
        };
        for (_, rate) in NOT_TEXT.iter().filter(|(n, _)| *n == name) {
            match *rate {
                NotText::Audio { input, output } => {
                    price.audio_input = input;
                    price.audio_output = output;
                }
                NotText::AudioInput(usd) => price.audio_input = usd,
                NotText::CachedAudio(usd) => price.audio_cache_read = usd,
                NotText::CachedImage(usd) => price.image_cache_read = usd,
                NotText::Image { input, output } => {
                    price.image_input = input;
                    price.image_output = output;
                }
                NotText::ImageOutput(usd) => price.image_output = usd,
                NotText::PerImage(usd) => price.per_image = usd,
                NotText::PerAudioMinute(usd) => price.per_audio_minute = usd,
                NotText::PerThousandCharacters(usd) => price.per_1k_characters = usd,
            }
        }
        price
    }
}

/// What is charged per call of a provider's hosted (server-side) tools, beside the tokens, in
/// USD. The calls are counted where the answer shows them ([`crate::usage`]): Anthropic's
/// `server_tool_use.web_search_requests`, the `web_search_call` and `file_search_call` items of
/// an OpenAI (or Azure OpenAI) Responses answer. The fee belongs to the call, whatever the model
/// (a new snapshot, a fine-tune, a model only `spec.pricing` prices): only the preview web
/// search's depends on the model's family.
///
/// - Anthropic: "$10 per 1,000 searches, plus standard token costs" (docs.claude.com, Web search
///   tool, Usage and pricing; on Vertex AI too). Web fetch has "no additional charges" beyond
///   tokens. Code execution is billed by container time past a monthly free allowance (1,550
///   hours, then $0.05 an hour), which one answer cannot tell: not charged.
/// - OpenAI (developers.openai.com/api/docs/pricing, Tools, as stored 2026-06-27; read
///   2026-11-28): "Web search (all models)": $10.00 / 1k calls; "Web search preview (reasoning
///   models, including gpt-5, o-series)": $10.00 / 1k calls; "Web search preview
///   (non-reasoning models)": $25.00 / 1k calls, search content tokens free; "File search tool
///   call (Responses API only)": $2.50 / 1k calls. Search content tokens are in the answer's
///   input tokens. The non-reasoning models with the preview tool are GPT-4o's and GPT-4.1's
///   (their snapshots, minis and fine-tunes): a name of neither family, one the gateway cannot
///   place included (a newer model, an Azure deployment named otherwise), gets the $10 of the
///   reasoning models OpenAI sells now. Not charged: containers (Code Interpreter, hosted
///   shell; billed per 20-minute session of a container an answer may not have started), and
///   the fixed block of 8,000 input tokens per call that `gpt-4o-mini` and `gpt-4.1-mini` bill
///   for the non-preview tool's search content (the answer does not say whether its input
///   count holds them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ToolFees {
    /// Per web search (Anthropic's tool, OpenAI's `web_search`).
    pub web_search: f64,
    /// Per call of OpenAI's `web_search_preview`.
    pub web_search_preview: f64,
    /// Per call of OpenAI's file search.
    pub file_search: f64,
}

impl ToolFees {
    /// The fees of the model named `name` (normalized).
    pub fn of(name: &str) -> Self {
        // A fine-tune is named `ft:{base model}:{org}:{suffix}:{id}`.
        let base = name.strip_prefix("ft:").unwrap_or(name);
        let non_reasoning = ["gpt-4o", "gpt-4.1"].iter().any(|f| continues(base, f));
        Self {
            web_search: 0.01,
            web_search_preview: if non_reasoning { 0.025 } else { 0.01 },
            file_search: 0.0025,
        }
    }
}

/// Whether `name` is `family` or continues it after `-`, `@` or `:`.
fn continues(name: &str, family: &str) -> bool {
    name.strip_prefix(family).is_some_and(|rest| {
        rest.is_empty() || rest.starts_with(|c: char| BOUNDARY.contains(&(c as u8)))
    })
}

/// A price a model has for a part of its answers that is not text.
#[derive(Clone, Copy)]
enum NotText {
    /// Audio tokens in and out, per million.
    Audio { input: f64, output: f64 },
    /// Audio tokens in, per million (the model answers in text).
    AudioInput(f64),
    /// Audio tokens read from the prompt cache, per million.
    CachedAudio(f64),
    /// Image tokens read from the prompt cache, per million.
    CachedImage(f64),
    /// Image tokens in and out, per million.
    Image { input: f64, output: f64 },
    /// Image tokens out, per million.
    ImageOutput(f64),
    /// Each image generated.
    PerImage(f64),
    /// Each minute of audio.
    PerAudioMinute(f64),
    /// Each 1,000 characters of text billed.
    PerThousandCharacters(f64),
}

/// The prices of audio and images, for the [`BUILTIN`] row of the same name (a model priced by
/// that row, and a `spec.pricing` entry of that name), as of [`PRICES_AS_OF`].
const NOT_TEXT: &[(&str, NotText)] = &[
    // OpenAI (platform.openai.com/docs/pricing and the model pages, "Audio tokens").
    (
        "gpt-4o-audio-preview",
        NotText::Audio {
            input: 40.0,
            output: 80.0,
        },
    ),
    (
        "gpt-4o-audio-preview-2024-10-01",
        NotText::Audio {
            input: 100.0,
            output: 200.0,
        },
    ),
    (
        "gpt-4o-mini-audio-preview",
        NotText::Audio {
            input: 10.0,
            output: 20.0,
        },
    ),
    (
        "gpt-audio",
        NotText::Audio {
            input: 32.0,
            output: 64.0,
        },
    ),
    // Realtime (the model pages, "Audio tokens", "Image tokens"; cached audio at the cached
    // text price where no row says otherwise). An image row's output is the text output price:
    // realtime answers make no images.
    (
        "gpt-realtime",
        NotText::Audio {
            input: 32.0,
            output: 64.0,
        },
    ),
    (
        "gpt-realtime",
        NotText::Image {
            input: 5.0,
            output: 16.0,
        },
    ),
    // Cached image input "$0.50" against cached text "$0.40" (model pages of gpt-realtime and
    // its successors, Image tokens, read 2026-11-28).
    ("gpt-realtime", NotText::CachedImage(0.50)),
    // gpt-realtime-2: text $4, cached $0.40, out $24; audio and images as gpt-realtime's (its
    // model page, read 2026-11-28).
    (
        "gpt-realtime-2",
        NotText::Audio {
            input: 32.0,
            output: 64.0,
        },
    ),
    (
        "gpt-realtime-2",
        NotText::Image {
            input: 5.0,
            output: 24.0,
        },
    ),
    ("gpt-realtime-2", NotText::CachedImage(0.50)),
    // The minis: text $0.60, cached $0.06, out $2.40; audio $10, cached $0.30, out $20; image
    // $0.80, cached $0.08 (gpt-realtime-2.1-mini's model page, read 2026-11-28, which compares
    // it with gpt-realtime-mini at the same prices; gpt-realtime-mini's own page was not found).
    (
        "gpt-realtime-mini",
        NotText::Audio {
            input: 10.0,
            output: 20.0,
        },
    ),
    ("gpt-realtime-mini", NotText::CachedAudio(0.30)),
    (
        "gpt-realtime-mini",
        NotText::Image {
            input: 0.80,
            output: 2.40,
        },
    ),
    ("gpt-realtime-mini", NotText::CachedImage(0.08)),
    (
        "gpt-realtime-2.1-mini",
        NotText::Audio {
            input: 10.0,
            output: 20.0,
        },
    ),
    ("gpt-realtime-2.1-mini", NotText::CachedAudio(0.30)),
    (
        "gpt-realtime-2.1-mini",
        NotText::Image {
            input: 0.80,
            output: 2.40,
        },
    ),
    ("gpt-realtime-2.1-mini", NotText::CachedImage(0.08)),
    (
        "gpt-4o-realtime-preview",
        NotText::Audio {
            input: 40.0,
            output: 80.0,
        },
    ),
    (
        "gpt-4o-realtime-preview-2024-10-01",
        NotText::Audio {
            input: 100.0,
            output: 200.0,
        },
    ),
    (
        "gpt-4o-realtime-preview-2024-10-01",
        NotText::CachedAudio(20.0),
    ),
    (
        "gpt-4o-mini-realtime-preview",
        NotText::Audio {
            input: 10.0,
            output: 20.0,
        },
    ),
    // Transcription: the audio in at this rate, a prompt's text tokens at the input price.
    ("gpt-4o-transcribe", NotText::AudioInput(6.0)),
    ("gpt-4o-mini-transcribe", NotText::AudioInput(3.0)),
    // Whisper: "$0.006 / minute" of audio (Transcription and speech generation); its answers
    // report `usage: {"type": "duration", "seconds": n}`, no tokens.
    ("whisper-1", NotText::PerAudioMinute(0.006)),
    // Image generation (platform.openai.com/docs/pricing, Image tokens; the model pages):
    // image tokens in and out at these rates, a prompt's text tokens at the row's input price.
    // Their output is all image.
    (
        "gpt-image-1",
        NotText::Image {
            input: 10.0,
            output: 40.0,
        },
    ),
    (
        "gpt-image-1-mini",
        NotText::Image {
            input: 2.50,
            output: 8.0,
        },
    ),
    // DALL·E (developers.openai.com/api/docs/pricing, Image generation, "Prices per image",
    // as stored 2026-06-27; read 2026-11-28): at the default size and quality (1024x1024,
    // standard) here, by the request's in DALLE_IMAGES. Their answers have no usage: each image
    // of `data` is counted.
    ("dall-e-3", NotText::PerImage(0.04)),
    ("dall-e-2", NotText::PerImage(0.02)),
    // Google (ai.google.dev/gemini-api/docs/pricing, standard tier): audio input where it
    // costs more than text, image output ($0.039 per 1024px image of 1290 tokens), Imagen per
    // image.
    ("gemini-2.5-flash", NotText::AudioInput(1.0)),
    ("gemini-2.5-flash-lite", NotText::AudioInput(0.30)),
    ("gemini-2.0-flash", NotText::AudioInput(0.70)),
    ("gemini-2.5-flash-image", NotText::ImageOutput(30.0)),
    ("imagen-4.0-generate", NotText::PerImage(0.04)),
    ("imagen-4.0-fast-generate", NotText::PerImage(0.02)),
    ("imagen-4.0-ultra-generate", NotText::PerImage(0.06)),
    ("imagen-3.0-generate", NotText::PerImage(0.04)),
    ("imagen-3.0-fast-generate", NotText::PerImage(0.02)),
    // Vertex AI's text embeddings: "$0.000025 / 1,000 characters" of input, online requests
    // (cloud.google.com/vertex-ai/generative-ai/pricing, Embeddings); their answers state the
    // characters billed (`metadata.billableCharacterCount`). The Gemini API's
    // text-embedding-004 is free and states none.
    (
        "text-embedding-004",
        NotText::PerThousandCharacters(0.000025),
    ),
    (
        "text-embedding-005",
        NotText::PerThousandCharacters(0.000025),
    ),
    (
        "text-multilingual-embedding-002",
        NotText::PerThousandCharacters(0.000025),
    ),
];

/// DALL·E's price per image by model, quality and size (the source of NOT_TEXT's DALL·E rows):
/// DALL·E 3 standard $0.04 (1024x1024) and $0.08 (1024x1792, 1792x1024), HD $0.08 and $0.12;
/// DALL·E 2 (standard only) $0.016 (256x256), $0.018 (512x512), $0.02 (1024x1024).
const DALLE_IMAGES: &[(&str, &str, &str, f64)] = &[
    ("dall-e-3", "standard", "1024x1024", 0.04),
    ("dall-e-3", "standard", "1024x1792", 0.08),
    ("dall-e-3", "standard", "1792x1024", 0.08),
    ("dall-e-3", "hd", "1024x1024", 0.08),
    ("dall-e-3", "hd", "1024x1792", 0.12),
    ("dall-e-3", "hd", "1792x1024", 0.12),
    ("dall-e-2", "standard", "256x256", 0.016),
    ("dall-e-2", "standard", "512x512", 0.018),
    ("dall-e-2", "standard", "1024x1024", 0.02),
];

/// The size and quality an OpenAI image request asks for, which a DALL·E image is priced by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// `size` (`1024x1792`); the model's default (1024x1024) when absent.
    pub size: Option<Box<str>>,
    /// `quality` (`hd`); `standard` when absent or `auto`.
    pub quality: Option<Box<str>>,
}

impl ImageOptions {
    /// What a request for `model` to `path` (after the provider) asks, from its JSON body or
    /// its form upload (edits, variations); `None` when the model is not one priced by them
    /// (DALL·E) or the path not an image endpoint (`images/generations`, `images/edits`,
    /// `images/variations`). Other requests are not read.
    pub fn of_request(
        model: &str,
        path: &str,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Option<Self> {
        // Asked of every request: the model's name first (DALL·E is named as it is).
        if !model.starts_with("dall-e-") {
            return None;
        }
        let path = path.split('?').next().unwrap_or(path);
        // As the provider reads the path (percent-decoded).
        let segments = crate::background::decoded_last_segments(path);
        if !matches!(
            segments.each_ref().map(Option::as_deref),
            [
                Some("generations" | "edits" | "variations"),
                Some("images"),
                _
            ]
        ) {
            return None;
        }
        if crate::multipart::boundary(headers).is_some() {
            let field = |name: &[u8]| {
                crate::multipart::field(headers, body, name)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(|v| v.trim().into())
            };
            return Some(Self {
                size: field(b"size"),
                quality: field(b"quality"),
            });
        }
        // As the provider's parser reads it: escapes decoded, the last of a repeated key.
        let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
        let text = |key: &str| doc.get(key).and_then(|v| v.as_str()).map(Box::from);
        Some(Self {
            size: text("size"),
            quality: text("quality"),
        })
    }
}

/// The price of one image of `model` made as `asked` says, for a model priced by the image's
/// size and quality (DALL·E); `None` for another model or a size and quality it has no price
/// for (the provider refuses them).
pub fn per_image(model: &str, asked: &ImageOptions) -> Option<f64> {
    let name = normalize(model);
    let size = asked.size.as_deref().unwrap_or("1024x1024");
    let quality = match asked.quality.as_deref() {
        None | Some("auto") => "standard",
        // DALL·E 2 makes standard images only, whatever quality is asked.
        Some(_) if continues(name, "dall-e-2") => "standard",
        Some(q) => q,
    };
    DALLE_IMAGES
        .iter()
        .find(|(m, q, s, _)| continues(name, m) && *q == quality && *s == size)
        .map(|&(.., usd)| usd)
}

/// How a provider prices prompt-cache reads, writes and one-hour writes, as multiples of the
/// model's input price, by model family; `(1, 1, 1)` (no discount) for a model whose provider
/// has none or that the gateway does not know.
///
/// - Anthropic (direct, Bedrock, Vertex): reads 0.1, writes 1.25 (5-minute TTL), 2 (1 hour);
///   reads 0.05 on Claude Opus 5.5 and 0.025 on Claude Fable 5.1 and Mythos 5.1
///   ([`CLAUDE_CACHE_READ`]).
/// - OpenAI: cached input 0.1 for the GPT-5 family, 5.1 and 5.2 with it (not the pro models)
///   and gpt-image-1-mini, 0.25 for GPT-4.1, o3, o4-mini, the deep-research models and
///   gpt-image-1, 0.5 for GPT-4o (not `gpt-4o-2024-05-13`), GPT-4o mini and realtime, GPT-4.5,
///   o1, o1-mini and o3-mini; none for the pro models.
/// - Gemini: cached input 0.1 for 2.5 models, 0.25 for 2.0 Flash and 1.5.
/// - DeepSeek: cache hits 0.02 on DeepSeek-V4-Flash (and its aliases `deepseek-chat`,
///   `deepseek-reasoner`: $0.0028 against $0.14), $0.003625 against $0.435 on V4-Pro.
///   xAI: cached input 0.25.
pub fn cache_ratios(name: &str) -> (f64, f64, f64) {
    if name.starts_with("claude-") {
        let read = CLAUDE_CACHE_READ
            .iter()
            .find(|(model, _)| continues(name, model))
            .map_or(0.1, |&(_, read)| read);
        return (read, 1.25, 2.0);
    }
    // A GPT-5 point release (`gpt-5.1`, `gpt-5.4-pro`, one priced in `spec.pricing` too) is of
    // the GPT-5 family here: read as `gpt-5...` without its point.
    let family;
    let name = match gpt_5_point_release(name) {
        Some(rest) => {
            family = format!("gpt-5{rest}");
            family.as_str()
        }
        None => name,
    };
    CACHE_READ
        .iter()
        .find(|(family, _)| continues(name, family))
        .map_or((1.0, 1.0, 1.0), |&(_, read)| (read, 1.0, 1.0))
}

/// What follows the point of a GPT-5 point release's name (`-pro` of `gpt-5.4-pro`, `` of
/// `gpt-5.2`), if `name` is one.
fn gpt_5_point_release(name: &str) -> Option<&str> {
    let digits = name.strip_prefix("gpt-5.")?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    (end > 0).then(|| &digits[end..])
}

/// Claude models whose cache hits are not a tenth of their input price (platform.claude.com,
/// Pricing, "Cache hits and refreshes", and the model pages' "Cache read", read 2026-11-28):
/// Opus 5.5 $0.20 against $4; Fable 5.1 and Mythos 5.1 $0.25 against $10. Their writes are
/// Anthropic's 1.25x and 2x ($5 / $8 on Opus 5.5, $12.50 / $20 on Fable 5.1).
const CLAUDE_CACHE_READ: &[(&str, f64)] = &[
    ("claude-opus-5-5", 0.05),
    ("claude-fable-5-1", 0.025),
    ("claude-mythos-5-1", 0.025),
];

/// Cached input as a multiple of the input price, by model family: the first family a model's
/// name equals or continues (after `-`, `@`, `:`) counts, so the exceptions come first.
const CACHE_READ: &[(&str, f64)] = &[
    ("gpt-5-pro", 1.0),
    ("o1-pro", 1.0),
    ("o3-pro", 1.0),
    ("gpt-4o-2024-05-13", 1.0),
    ("o1-mini", 0.5),
    ("o3-mini", 0.5),
    // Its point releases too (`gpt-5.1`, `gpt-5.2-pro`: see [`cache_ratios`]).
    ("gpt-5", 0.1),
    // $0.40 against $4 on gpt-realtime, $0.06 against $0.60 on gpt-realtime-mini.
    ("gpt-realtime", 0.1),
    ("gpt-4.1", 0.25),
    ("o3", 0.25),
    ("o4-mini", 0.25),
    ("gpt-4o", 0.5),
    ("gpt-4.5-preview", 0.5),
    ("o1", 0.5),
    // Cached text and image input: $0.20 and $0.25 against $2 and $2.50 on gpt-image-1-mini,
    // $1.25 and $2.50 against $5 and $10 on gpt-image-1 (their model pages).
    ("gpt-image-1-mini", 0.1),
    ("gpt-image-1", 0.25),
    ("gemini-2.5", 0.1),
    ("gemini-2.0-flash", 0.25),
    ("gemini-1.5", 0.25),
    // DeepSeek-V4-Pro's hit is $0.003625 against $0.435 (a 120th); V4-Flash's, and those of
    // `deepseek-chat` and `deepseek-reasoner`, its aliases, $0.0028 against $0.14.
    ("deepseek-v4-pro", 0.003625 / 0.435),
    ("deepseek", 0.02),
    ("grok", 0.25),
];

/// List prices (USD per million input, output tokens) as of [`PRICES_AS_OF`]: standard tier,
/// shortest-context tier where prices depend on prompt length, no batch discounts; prompt-cache
/// reads and writes are priced from the input price by [`cache_ratios`]. A variant with a price
/// of its own has its own row (`gpt-5-pro`, `o3-deep-research`, `grok-4-fast`), or it would be
/// priced as the model it continues.
/// Same-named open models are priced as the provider SPEC.md routes them to sells them (Llama:
/// Groq).
const BUILTIN: &[(&str, f64, f64)] = &[
    // OpenAI
    ("gpt-5", 1.25, 10.0),
    ("gpt-5-pro", 15.0, 120.0),
    ("gpt-5-mini", 0.25, 2.0),
    ("gpt-5-nano", 0.05, 0.40),
    // GPT-5.1 and 5.2 (read 2026-11-28): gpt-5.1 $1.25 / $10, cached $0.125 (its model page,
    // developers.openai.com); gpt-5.2 $1.75 / $14, cached $0.175, and gpt-5.2-codex the same
    // (GitHub Docs' Copilot price table, Vercel AI Gateway's OpenAI row); gpt-5.2-pro $21 /
    // $168, no cached price; gpt-5.1-codex-mini $0.25 / $2 (OpenRouter's pass-through row).
    // gpt-5.1-codex and -codex-max list at gpt-5.1's price and are priced by its row (`.` is no
    // boundary: `gpt-5.1` is not `gpt-5`, nor `gpt-5.10` `gpt-5.1`). The `-chat-latest` aliases
    // take their base's row too; no source seen gave their own price.
    ("gpt-5.1", 1.25, 10.0),
    ("gpt-5.1-codex-mini", 0.25, 2.0),
    ("gpt-5.2", 1.75, 14.0),
    ("gpt-5.2-pro", 21.0, 168.0),
    ("gpt-4.5-preview", 75.0, 150.0),
    ("gpt-4.1", 2.0, 8.0),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4o", 2.50, 10.0),
    ("gpt-4o-2024-05-13", 5.0, 15.0),
    ("gpt-4o-mini", 0.15, 0.60),
    // Realtime models: text prices here, audio and image ones in NOT_TEXT.
    ("gpt-realtime", 4.0, 16.0),
    ("gpt-realtime-2", 4.0, 24.0),
    ("gpt-realtime-mini", 0.60, 2.40),
    ("gpt-realtime-2.1-mini", 0.60, 2.40),
    ("gpt-4o-realtime-preview", 5.0, 20.0),
    ("gpt-4o-realtime-preview-2024-10-01", 5.0, 20.0),
    ("gpt-4o-mini-realtime-preview", 0.60, 2.40),
    // Audio models: text prices here, audio ones in NOT_TEXT.
    ("gpt-4o-audio-preview", 2.50, 10.0),
    ("gpt-4o-audio-preview-2024-10-01", 2.50, 10.0),
    ("gpt-4o-mini-audio-preview", 0.15, 0.60),
    ("gpt-audio", 2.50, 10.0),
    ("gpt-audio-mini", 0.60, 2.40),
    // Speech: "$0.60" per 1M text tokens in, "$12.00" per 1M audio tokens out (its model page,
    // read 2026-11-28; OpenAI's estimate, ~$0.015 a minute of audio). Its output is all audio,
    // so the output column is the audio rate. Only a speech request streamed as SSE
    // (`stream_format: "sse"`) reports tokens (`speech.audio.done`'s `usage`); one answered
    // with the audio file itself reports none and has no cost.
    ("gpt-4o-mini-tts", 0.60, 12.0),
    // Transcription models: text in (a prompt) and out; the audio in is in NOT_TEXT.
    ("gpt-4o-transcribe", 2.50, 10.0),
    ("gpt-4o-mini-transcribe", 1.25, 5.0),
    // Billed by the minute of audio (NOT_TEXT); its answers have no tokens.
    ("whisper-1", 0.0, 0.0),
    // Image models: text in here, image tokens in and out in NOT_TEXT (the output column is
    // the image output rate: they answer nothing else).
    ("gpt-image-1", 5.0, 40.0),
    ("gpt-image-1-mini", 2.0, 8.0),
    // Priced per image (NOT_TEXT, DALLE_IMAGES); their answers have no tokens.
    ("dall-e-3", 0.0, 0.0),
    ("dall-e-2", 0.0, 0.0),
    ("gpt-4-turbo", 10.0, 30.0),
    ("gpt-4-0125-preview", 10.0, 30.0),
    ("gpt-4-1106-preview", 10.0, 30.0),
    ("gpt-4-1106-vision-preview", 10.0, 30.0),
    ("gpt-4-vision-preview", 10.0, 30.0),
    ("gpt-4", 30.0, 60.0),
    ("gpt-4-32k", 60.0, 120.0),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("gpt-3.5-turbo-instruct", 1.50, 2.00),
    ("o1", 15.0, 60.0),
    ("o1-pro", 150.0, 600.0),
    ("o1-mini", 1.10, 4.40),
    ("o3", 2.0, 8.0),
    ("o3-pro", 20.0, 80.0),
    ("o3-deep-research", 10.0, 40.0),
    ("o3-mini", 1.10, 4.40),
    ("o4-mini", 1.10, 4.40),
    ("o4-mini-deep-research", 2.0, 8.0),
    ("text-embedding-3-small", 0.02, 0.0),
    ("text-embedding-3-large", 0.13, 0.0),
    ("text-embedding-ada-002", 0.10, 0.0),
    // Anthropic
    ("claude-3-haiku", 0.25, 1.25),
    ("claude-3-sonnet", 3.0, 15.0),
    ("claude-3-opus", 15.0, 75.0),
    ("claude-3-5-haiku", 0.80, 4.0),
    ("claude-3-5-sonnet", 3.0, 15.0),
    ("claude-3-7-sonnet", 3.0, 15.0),
    ("claude-haiku-4-5", 1.0, 5.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-sonnet-4-5", 3.0, 15.0),
    ("claude-opus-4", 15.0, 75.0),
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-opus-4-5", 5.0, 25.0),
    // The models after them (platform.claude.com, each model's overview, "Input pricing" and
    // "Output pricing", read 2026-11-28; Claude Mythos 5 "shares Claude Fable 5's
    // specifications and pricing"). Cache reads and writes by the Anthropic ratios, as their
    // pages list them (but the reads of CLAUDE_CACHE_READ). A later version the table does not
    // name (`claude-fable-5-2`, `claude-haiku-5-6`) has no price: not its predecessor's.
    ("claude-opus-4-6", 5.0, 25.0),
    ("claude-opus-4-7", 5.0, 25.0),
    ("claude-opus-4-8", 5.0, 25.0),
    ("claude-sonnet-4-6", 3.0, 15.0),
    ("claude-opus-5", 5.0, 25.0),
    ("claude-opus-5-5", 4.0, 20.0),
    ("claude-sonnet-5", 2.0, 10.0),
    ("claude-sonnet-5-5", 2.0, 10.0),
    ("claude-fable-5", 10.0, 50.0),
    ("claude-fable-5-1", 10.0, 50.0),
    ("claude-mythos-5", 10.0, 50.0),
    // Audit of 2026-11-28 (platform.claude.com, Pricing, "Model pricing"): Claude Mythos 5.1 is
    // Fable 5.1's price, $10 / $50; Claude Haiku 5.5 (its overview: "From $0.10 / MTok",
    // "From $0.50 / MTok") is $0.10 / $0.50 for prompts up to 100K tokens, the shortest-context
    // tier ($0.50 / $2.50 past it).
    ("claude-mythos-5-1", 10.0, 50.0),
    ("claude-haiku-5-5", 0.10, 0.50),
    // Google Gemini
    ("gemini-1.5-flash", 0.075, 0.30),
    ("gemini-1.5-flash-8b", 0.0375, 0.15),
    ("gemini-1.5-pro", 1.25, 5.0),
    ("gemini-2.0-flash", 0.10, 0.40),
    ("gemini-2.0-flash-lite", 0.075, 0.30),
    ("gemini-2.5-flash", 0.30, 2.50),
    ("gemini-2.5-flash-lite", 0.10, 0.40),
    ("gemini-2.5-pro", 1.25, 10.0),
    ("gemini-2.5-flash-image", 0.30, 2.50),
    // Audit of 2026-11-28, from the Gemini API's price page (ai.google.dev/gemini-api/docs/
    // pricing) as transcribed word for word on 2026-10-07: Gemini 3.5 Flash $1.50 / $9.00,
    // 3.5 Flash-Lite $0.30 / $2.50, 3.1 Pro Preview $2.00 / $12.00 for prompts up to 200K tokens
    // ($4 / $18 past them), Gemini Embedding 2 $0.20 (text). Their cached input has no ratio
    // here (no source gave it): it is priced as input. Gemini 3.8 Flash is left out: its
    // $0.75 / $3.75 lasts "through December 31, 2026", $1.50 / $7.50 from 2027-01-01.
    ("gemini-3.5-flash", 1.50, 9.0),
    ("gemini-3.5-flash-lite", 0.30, 2.50),
    ("gemini-3.1-pro", 2.0, 12.0),
    // Priced by the character on Vertex AI (NOT_TEXT), not by the token.
    ("text-embedding-004", 0.0, 0.0),
    ("text-embedding-005", 0.0, 0.0),
    ("text-multilingual-embedding-002", 0.0, 0.0),
    // "$0.15 / 1M input tokens" on the Gemini API and on Vertex AI (cloud.google.com/vertex-ai/
    // generative-ai/pricing, Embeddings).
    ("gemini-embedding-001", 0.15, 0.0),
    ("gemini-embedding-2", 0.20, 0.0),
    // Imagen: per image (NOT_TEXT); its answers have no tokens.
    ("imagen-4.0-generate", 0.0, 0.0),
    ("imagen-4.0-fast-generate", 0.0, 0.0),
    ("imagen-4.0-ultra-generate", 0.0, 0.0),
    ("imagen-3.0-generate", 0.0, 0.0),
    ("imagen-3.0-fast-generate", 0.0, 0.0),
    // Mistral
    ("mistral-large", 2.0, 6.0),
    ("mistral-medium", 0.40, 2.0),
    ("mistral-small", 0.10, 0.30),
    ("open-mistral-nemo", 0.15, 0.15),
    ("codestral", 0.30, 0.90),
    ("ministral-8b", 0.10, 0.10),
    ("ministral-3b", 0.04, 0.04),
    ("pixtral-large", 2.0, 6.0),
    ("mistral-embed", 0.10, 0.0),
    // Cohere (cohere.com/pricing; billed units)
    ("command-a", 2.50, 10.0),
    ("command-r-plus", 2.50, 10.0),
    ("command-r", 0.15, 0.60),
    ("command-r7b", 0.0375, 0.15),
    ("embed-english-v3.0", 0.10, 0.0),
    ("embed-multilingual-v3.0", 0.10, 0.0),
    ("embed-v4.0", 0.12, 0.0),
    // Groq
    ("llama-3.3-70b-versatile", 0.59, 0.79),
    ("llama-3.1-8b-instant", 0.05, 0.08),
    ("llama3-70b-8192", 0.59, 0.79),
    ("llama3-8b-8192", 0.05, 0.08),
    ("llama-4-scout", 0.11, 0.34),
    ("llama-4-maverick", 0.20, 0.60),
    ("gemma2-9b-it", 0.20, 0.20),
    // DeepSeek, xAI
    // DeepSeek-V4 (api-docs.deepseek.com/quick_start/pricing, as archived 2026-04-26 and
    // quoted 2026-05-20): V4-Flash $0.14 / $0.28, cache hits $0.0028 (cut to a tenth on
    // 2026-04-26); V4-Pro $0.435 / $0.87, hits $0.003625 (its 75% discount, made its price).
    // `deepseek-chat` and `deepseek-reasoner` are V4-Flash's non-thinking and thinking modes
    // (until DeepSeek retires the names), priced as it; cache ratios in CACHE_READ.
    ("deepseek-v4-flash", 0.14, 0.28),
    ("deepseek-v4-pro", 0.435, 0.87),
    ("deepseek-chat", 0.14, 0.28),
    ("deepseek-reasoner", 0.14, 0.28),
    ("grok-4", 3.0, 15.0),
    ("grok-4-fast", 0.20, 0.50),
    ("grok-4-1-fast", 0.20, 0.50),
    ("grok-3", 3.0, 15.0),
    ("grok-3-mini", 0.30, 0.50),
    // The same models served faster, at higher prices (docs.x.ai Models and Pricing, archived
    // 2025-06-02: grok-3-fast $5 / $25, grok-3-mini-fast $0.60 / $4; cached input a quarter).
    ("grok-3-fast", 5.0, 25.0),
    ("grok-3-mini-fast", 0.60, 4.0),
    // Perplexity (docs.perplexity.ai/getting-started/pricing): tokens only. Its answers state
    // their whole cost (`usage.cost.total_cost`, with the per-request search fees), which is
    // taken instead when present.
    ("sonar", 1.0, 1.0),
    ("sonar-pro", 3.0, 15.0),
    ("sonar-reasoning", 1.0, 5.0),
    ("sonar-reasoning-pro", 2.0, 8.0),
    ("sonar-deep-research", 2.0, 8.0),
];

/// Characters after which a longer model name still counts as the shorter one.
const BOUNDARY: &[u8] = b"-@:";

/// The price table of a config: the built-in prices with `spec.pricing` merged over them.
#[derive(Debug, Clone)]
pub struct Pricing {
    /// Sorted by name, names unique.
    entries: Vec<(Box<str>, Price)>,
}

impl Default for Pricing {
    fn default() -> Self {
        Self::with(&[]).unwrap_or(Self {
            entries: Vec::new(),
        })
    }
}

impl Pricing {
    /// The built-in table with `overrides` added (an override of a known name replaces it).
    pub fn with(overrides: &[ModelPrice]) -> Result<Self, String> {
        let mut entries: Vec<(Box<str>, Price)> =
            Vec::with_capacity(BUILTIN.len() + overrides.len());
        for (i, p) in overrides.iter().enumerate() {
            let usd = |field: &str, v: &str| {
                parse_usd(v).ok_or_else(|| {
                    format!("spec.pricing[{i}].{field} {v:?} must be a decimal number of USD")
                })
            };
            let mut price = Price::of(
                &p.model,
                usd("inputPerMillion", &p.input_per_million)?,
                usd("outputPerMillion", &p.output_per_million)?,
            );
            // A price by the token replaces Google's by the character (Vertex text embeddings).
            if price.input > 0.0 {
                price.per_1k_characters = 0.0;
            }
            // Cache prices given replace the provider's rule.
            for (field, given, into) in [
                (
                    "cacheReadPerMillion",
                    &p.cache_read_per_million,
                    &mut price.cache_read,
                ),
                (
                    "cacheWritePerMillion",
                    &p.cache_write_per_million,
                    &mut price.cache_write,
                ),
                (
                    "cacheWrite1hPerMillion",
                    &p.cache_write_1h_per_million,
                    &mut price.cache_write_1h,
                ),
            ] {
                if let Some(v) = given {
                    *into = usd(field, v)?;
                }
            }
            // Named as the app sends the model (`openai/gpt-oss-120b`, a Bedrock id with its
            // publisher) or as the table does: found either way.
            let normalized = normalize(&p.model);
            if normalized != p.model {
                entries.push((normalized.into(), price));
            }
            entries.push((p.model.as_str().into(), price));
        }
        for (name, input, output) in BUILTIN {
            if !overrides.iter().any(|o| o.model == *name) {
                entries.push(((*name).into(), Price::of(name, *input, *output)));
            }
        }
        for (name, same_as) in SAME_PRICE {
            let base = BUILTIN.iter().find(|(n, _, _)| n == same_as);
            if let Some((base, input, output)) = base
                && !overrides.iter().any(|o| o.model == *name)
            {
                entries.push(((*name).into(), Price::of(base, *input, *output)));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        Ok(Self { entries })
    }

    /// The price of `model`, if the table knows it (see the module doc for the matching).
    pub fn lookup(&self, model: &str) -> Option<Price> {
        // AWS SDKs send a Bedrock ARN in the path percent-encoded
        // (`arn%3Aaws%3Abedrock%3A...%3Ainference-profile%2Fus.anthropic.claude-...`).
        let decoded;
        let model = if model.contains('%') {
            decoded = percent_decode(model);
            &decoded
        } else {
            model
        };
        let name = normalize(model);
        let exact = |n: &str| {
            self.entries
                .binary_search_by(|(e, _)| (**e).cmp(n))
                .ok()
                .map(|i| self.entries[i].1)
        };
        // The name as sent first (a `spec.pricing` entry may name it so), then normalized.
        exact(model).or_else(|| exact(name)).or_else(|| {
            name.bytes()
                .enumerate()
                .rev()
                .filter(|(_, c)| BOUNDARY.contains(c))
                .take_while(|&(i, _)| {
                    !names_a_sibling(&name[i..]) && !names_a_later_version(&name[i + 1..])
                })
                .find_map(|(i, _)| exact(&name[..i]))
        })
    }
}

/// Later versions priced as the model they follow, its audio and image rates too (a later
/// version is otherwise no price of its predecessor's: see [`names_a_later_version`]).
/// gpt-realtime-1.5: $4 / $16 text, $32 / $64 audio, as gpt-realtime (its model page; third-party
/// tables read 2026-11-28 agree).
const SAME_PRICE: &[(&str, &str)] = &[("gpt-realtime-1.5", "gpt-realtime")];

/// Words that, in what a model's name adds to a shorter one, make it another model of the
/// family than the one named so (`gpt-5-codex-mini`, `gpt-realtime-2.1-mini`: not `gpt-5`, nor
/// `gpt-realtime`): a smaller or larger sibling, or one served faster (`grok-3-fast`, at
/// $5 / $25 against grok-3's $3 / $15; `grok-4-fast`, cheaper than grok-4), priced otherwise.
const SIBLINGS: &[&str] = &["mini", "nano", "lite", "pro", "fast"];

/// Whether `rest`, what a model's name adds to a table name (from its boundary), names a
/// sibling of that model (see [`SIBLINGS`]).
fn names_a_sibling(rest: &str) -> bool {
    rest.split(|c: char| c.is_ascii() && (BOUNDARY.contains(&(c as u8)) || c == '.'))
        .any(|word| SIBLINGS.contains(&word))
}

/// Whether `rest`, what a model's name adds to a table name (after its boundary), starts with
/// a minor version: one digit, 1 to 9, alone or before a boundary or a point
/// (`claude-opus-4-6` is not `claude-opus-4`, $5 / $25 against $15 / $75; `gpt-realtime-1.5` is
/// not `gpt-realtime`). Dates and snapshot numbers (`-20250514`, `-0613`, `-001`, `-08-2024`)
/// and `-0` (Anthropic's alias of the model itself, `claude-opus-4-0`) stay the model's.
fn names_a_later_version(rest: &str) -> bool {
    let b = rest.as_bytes();
    matches!(b.first(), Some(b'1'..=b'9'))
        && b.get(1).is_none_or(|c| *c == b'.' || BOUNDARY.contains(c))
}

/// `s` with its `%XX` escapes decoded (invalid ones kept as they are).
pub(crate) fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(s.as_bytes())).into_owned()
}

/// `b` with its `%XX` escapes decoded (invalid ones kept as they are).
pub(crate) fn percent_decode_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The model part of a name: after the last `/` (`models/gemini-2.5-flash`,
/// `meta-llama/llama-4-scout-...`), without Bedrock's region and vendor prefixes
/// (`us.anthropic.claude-...`).
fn normalize(model: &str) -> &str {
    let mut name = model.rsplit('/').next().unwrap_or(model);
    while let Some((head, rest)) = name.split_once('.')
        && !head.is_empty()
        && head.bytes().all(|c| c.is_ascii_lowercase())
        && !rest.is_empty()
    {
        name = rest;
    }
    name
}

/// The model a request body names: the string value of the top-level `"model"` key (one nested
/// elsewhere, as in `{"metadata": {"model": ...}}`, is not the model the provider serves). When
/// the key comes more than once the last one counts, as in the JSON parsers providers run
/// (Python's, JavaScript's, Go's), so a decoy before it cannot choose the price. A top-level key
/// or the model's value written with escapes (`"mo\u0064el"`) is decoded.
///
/// The JSON is not parsed. Nearly every body names its model once and plainly, near the start:
/// the scan stops at the first top-level `model`, and two `memmem` searches of the rest for
/// `model"` and an escaped ASCII letter ([`escapes_ascii_letter`]) show whether another key
/// could follow; only then is the whole body scanned.
pub fn model_in_body(body: &[u8]) -> Option<Cow<'_, str>> {
    let (model, end) = top_level_model(body, true)?;
    let rest = &body[end..];
    if MODEL_KEY.find(rest).is_none() && !escapes_ascii_letter(rest) {
        return model;
    }
    top_level_model(body, false).and_then(|(model, _)| model)
}

/// Built once: a searcher's set-up costs more than searching a short body.
static MODEL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"model\""));
static LOW_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u00"));

/// Whether `body` holds a JSON escape of a lowercase ASCII letter (`\u0061`..`\u007a`), the only
/// way to spell a key such as `model` or `stream` without its plain bytes (text in other scripts
/// escapes only code points past ASCII).
pub fn escapes_ascii_letter(body: &[u8]) -> bool {
    LOW_ESCAPE
        .find_iter(body)
        .any(|at| matches!(body.get(at + 4..at + 6), Some([b'6' | b'7', _])))
}

/// The value of the first (`first`) or last top-level `"model"` key and where it ends; `None`
/// when there is no such key. `memchr` jumps from quote to brace, strings are skipped whole, and
/// only braces are counted: in valid JSON a string followed by `:` is an object key, so arrays
/// need no count.
fn top_level_model(body: &[u8], first: bool) -> Option<(Option<Cow<'_, str>>, usize)> {
    let mut found = None;
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(at) = body
        .get(i..)
        .and_then(|rest| memchr::memchr3(b'"', b'{', b'}', rest))
    {
        let at = i + at;
        i = at + 1;
        match body[at] {
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            _ => {
                let start = at + 1;
                let (end, escaped) = string_end(body, start)?;
                i = end + 1;
                if depth != 1 {
                    continue;
                }
                // A key (not a value like Gemini's `"role": "model"`), then its value.
                let Some(value) = body[i..].trim_ascii_start().strip_prefix(b":") else {
                    continue;
                };
                let is_model = if escaped {
                    decode(&body[start - 1..=end]).is_some_and(|k| k == "model")
                } else {
                    &body[start..end] == b"model"
                };
                if !is_model {
                    continue;
                }
                let value = value.trim_ascii_start();
                let from = body.len() - value.len();
                let model = match value.strip_prefix(b"\"") {
                    Some(_) => {
                        let (to, escaped) = string_end(body, from + 1)?;
                        i = to + 1;
                        let text = &body[from + 1..to];
                        if escaped {
                            decode(&body[from..=to]).map(Cow::Owned)
                        } else {
                            std::str::from_utf8(text).ok().map(Cow::Borrowed)
                        }
                        .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_LEN)
                    }
                    // Not a string (a number, `null`): no model a price could name.
                    None => None,
                };
                if first {
                    return Some((model, i));
                }
                found = Some((model, i));
            }
        }
    }
    found
}

/// A JSON string literal (quotes included) with its escapes decoded.
fn decode(literal: &[u8]) -> Option<String> {
    serde_json::from_slice(literal).ok()
}

/// The index of the quote that ends the JSON string whose content starts at `from`, and whether
/// the string holds an escape.
fn string_end(body: &[u8], mut from: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', body.get(from..)?)?;
        if body[at] == b'"' {
            return Some((at, escaped));
        }
        escaped = true;
        from = at + 2;
    }
}

/// The model a provider path names: `.../models/{model}:generateContent` (Gemini, Vertex) or
/// `.../model/{modelId}/converse` (Bedrock).
pub fn model_in_path(path: &str) -> Option<&str> {
    // Segment by segment (no substring search: this runs for every passthrough request).
    let mut found = None;
    let mut segments = path.split('/');
    while let Some(segment) = segments.next() {
        if segment != "models" && segment != "model" {
            continue;
        }
        let Some(next) = segments.next() else {
            break;
        };
        let name = &next[..next.find([':', '?']).unwrap_or(next.len())];
        if !name.is_empty() {
            if segment == "models" {
                return Some(name);
            }
            found = found.or(Some(name));
        }
    }
    found.or_else(|| workers_ai_model(path))
}

/// A Workers AI model in a path (`@cf/meta/llama-3.1-8b-instruct`, `@hf/...`): its three
/// segments from the `@`.
fn workers_ai_model(path: &str) -> Option<&str> {
    let start = if path.starts_with('@') {
        0
    } else {
        path.find("/@")? + 1
    };
    let rest = &path[start..];
    let rest = &rest[..rest.find('?').unwrap_or(rest.len())];
    let end = rest
        .match_indices('/')
        .nth(2)
        .map_or(rest.len(), |(i, _)| i);
    let model = &rest[..end];
    (model.matches('/').count() == 2).then_some(model)
}

/// The model of a passthrough request: from the path, else from the body.
pub fn request_model(path: &str, body: &[u8]) -> Option<ModelName> {
    if let Some(m) = model_in_path(path) {
        return ModelName::named(m);
    }
    model_in_body(body).map(|m| ModelName::new(&m))
}

/// The model a form request names in its `model` field (an audio transcription or
/// translation, an image edit: uploads that are `multipart/form-data`).
pub fn form_model(headers: &http::HeaderMap, body: &[u8]) -> Option<ModelName> {
    let model = crate::multipart::field(headers, body, b"model")?;
    ModelName::named(std::str::from_utf8(model).ok()?.trim())
}

/// Longest model name kept without a heap allocation.
const INLINE: usize = 62;

/// A model name owned by a request's record; short names (all real ones) are kept inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName(Repr);

/// Longest model name the gateway prices, logs and names in `cf-aig-model`.
pub const MAX_MODEL_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl ModelName {
    /// `name` when it can be a model's: not empty, at most [`MAX_MODEL_LEN`] bytes (longer
    /// names are no provider's, and would be logged and remembered whole).
    pub fn named(name: &str) -> Option<Self> {
        (!name.is_empty() && name.len() <= MAX_MODEL_LEN).then(|| Self::new(name))
    }

    /// Owns `name`.
    pub fn new(name: &str) -> Self {
        if name.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            Self(Repr::Inline {
                len: name.len() as u8,
                bytes,
            })
        } else {
            Self(Repr::Heap(name.into()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a `&str` whole, so always UTF-8.
            Repr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Repr::Heap(s) => s,
        }
    }
}

/// Largest `total_cost` of `cf-aig-custom-cost`, in USD.
const MAX_CUSTOM_TOTAL: f64 = 1_000_000.0;
/// Largest per-token price of `cf-aig-custom-cost`, in USD.
const MAX_CUSTOM_PER_TOKEN: f64 = 1.0;

/// A request's `cf-aig-custom-cost`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CustomCost {
    /// USD per input and per output token.
    PerToken {
        /// Per input token.
        input: f64,
        /// Per output token.
        output: f64,
        /// Per input token read from the provider's prompt cache (`per_cache_read_token`;
        /// `input` when the header gives none).
        cache_read: f64,
        /// Per input token written to the provider's prompt cache (`per_cache_write_token`, for
        /// writes of any lifetime; `input` when the header gives none).
        cache_write: f64,
    },
    /// The whole request's cost in USD.
    Total(f64),
}

/// The per-token keys of `cf-aig-custom-cost`, as Cloudflare's custom-costs page names them.
const PER_TOKEN_KEYS: [&str; 4] = [
    "per_token_in",
    "per_token_out",
    "per_cache_read_token",
    "per_cache_write_token",
];

impl CustomCost {
    /// `cf-aig-custom-cost` of `headers`, if present: `{"per_token_in": .., "per_token_out": ..}`
    /// with, optionally, `per_cache_read_token` and `per_cache_write_token`, or
    /// `{"total_cost": ..}`; non-negative numbers.
    pub fn from_headers(headers: GatewayHeaders<'_>) -> Result<Option<Self>, GatewayError> {
        let Some(v) = headers.get(Gw::CustomCost) else {
            return Ok(None);
        };
        let bad = |reason: &str| GatewayError::BadHeader {
            name: "cf-aig-custom-cost",
            reason: reason.into(),
        };
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(v.as_bytes())
            .map_err(|_| {
                bad(
                    r#"expected {"per_token_in": n, "per_token_out": n} (with "per_cache_read_token" and "per_cache_write_token" if wanted) or {"total_cost": n}"#,
                )
            })?;
        // Bounded, so that costs and the sums of them (metrics, spend limits, Redis) stay
        // finite: a price of 1e308 times a token count is infinity.
        let num = |key: &str| -> Result<Option<f64>, GatewayError> {
            let max = if key == "total_cost" {
                MAX_CUSTOM_TOTAL
            } else {
                MAX_CUSTOM_PER_TOKEN
            };
            match map.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|n| n.is_finite() && (0.0..=max).contains(n))
                    .map(Some)
                    .ok_or_else(|| bad(&format!("{key} must be a number from 0 to {max}"))),
            }
        };
        if let Some(k) = map
            .keys()
            .find(|k| *k != "total_cost" && !PER_TOKEN_KEYS.contains(&k.as_str()))
        {
            return Err(bad(&format!(
                "unknown key {:?} (expected per_token_in and per_token_out, with per_cache_read_token and per_cache_write_token if wanted, or total_cost)",
                k.chars().take(32).collect::<String>()
            )));
        }
        let [input, output, cache_read, cache_write] = [
            num(PER_TOKEN_KEYS[0])?,
            num(PER_TOKEN_KEYS[1])?,
            num(PER_TOKEN_KEYS[2])?,
            num(PER_TOKEN_KEYS[3])?,
        ];
        let per_token = [input, output, cache_read, cache_write]
            .iter()
            .any(Option::is_some);
        match (input, output, num("total_cost")?) {
            (Some(input), Some(output), None) => Ok(Some(Self::PerToken {
                input,
                output,
                cache_read: cache_read.unwrap_or(input),
                cache_write: cache_write.unwrap_or(input),
            })),
            (_, _, Some(t)) if !per_token => Ok(Some(Self::Total(t))),
            (_, _, Some(_)) => Err(bad("total_cost cannot be combined with per-token prices")),
            _ if !per_token => Err(bad("empty object")),
            _ => Err(bad(
                "per_token_in and per_token_out go together, and cache prices need both",
            )),
        }
    }

    /// Per input and output token, the cache's tokens at the input price.
    #[cfg(test)]
    pub fn per_token(input: f64, output: f64) -> Self {
        Self::PerToken {
            input,
            output,
            cache_read: input,
            cache_write: input,
        }
    }
}

/// The cost in USD of a response that reported `tokens`: the custom cost when the request set
/// one (per token: the prompt cache's reads and writes at their custom prices, every other
/// input token at `per_token_in`), else the cost the provider stated, else
/// the model's price: the prompt cache's reads and writes, audio and image tokens at theirs,
/// plus images, hosted tool calls, minutes of audio and characters at theirs; `None` when none
/// of these (or nothing counted) is known.
pub fn cost(price: Option<Price>, custom: Option<CustomCost>, tokens: &Tokens) -> Option<f64> {
    let known = tokens.totals() != [None, None];
    let [i, o] = tokens.totals().map(|n| n.unwrap_or(0));
    let read = tokens.cache_read.min(i);
    let write = tokens.cache_write.min(i - read);
    let write_1h = tokens.cache_write_1h.min(write);
    let fresh = i - read - write;
    let audio_read = tokens.audio_cache_read.min(read);
    let image_read = tokens.image_cache_read.min(read - audio_read);
    let audio_in = tokens.audio_input.min(fresh);
    let image_in = tokens.image_input.min(fresh - audio_in);
    let audio_out = tokens.audio_output.min(o);
    let image_out = tokens.image_output.min(o - audio_out);
    let text_out = o - audio_out - image_out;
    match custom {
        Some(CustomCost::Total(t)) => Some(t),
        Some(CustomCost::PerToken {
            input,
            output,
            cache_read,
            cache_write,
        }) => known.then_some(
            fresh as f64 * input
                + read as f64 * cache_read
                + write as f64 * cache_write
                + o as f64 * output,
        ),
        None if tokens.stated_cost.is_some() => tokens.stated_cost,
        None => price
            .filter(|_| {
                known
                    || tokens.images > 0
                    || tokens.tool_calls()
                    || tokens.audio_seconds > 0.0
                    || tokens.characters > 0
            })
            // A model priced only by the character, in an answer whose characters were not
            // counted (a `/compat` embedding, translated): its cost is not known, not 0.
            .filter(|p| !(p.per_1k_characters > 0.0 && tokens.characters == 0))
            .map(|p| {
                ((fresh - audio_in - image_in) as f64 * p.input
                    + audio_in as f64 * p.audio_input
                    + image_in as f64 * p.image_input
                    + (read - audio_read - image_read) as f64 * p.cache_read
                    + audio_read as f64 * p.audio_cache_read
                    + image_read as f64 * p.image_cache_read
                    + (write - write_1h) as f64 * p.cache_write
                    + write_1h as f64 * p.cache_write_1h
                    + text_out as f64 * p.output
                    + audio_out as f64 * p.audio_output
                    + image_out as f64 * p.image_output)
                    / 1e6
                    + tokens.images as f64 * p.per_image
                    + tokens.web_searches as f64
                        * if tokens.web_search_preview {
                            p.per_web_search_preview
                        } else {
                            p.per_web_search
                        }
                    + tokens.file_searches as f64 * p.per_file_search
                    + tokens.audio_seconds / 60.0 * p.per_audio_minute
                    + tokens.characters as f64 / 1000.0 * p.per_1k_characters
            }),
    }
    .filter(|c| c.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn price(input: f64, output: f64) -> Option<(f64, f64)> {
        Some((input, output))
    }

    /// The input and output price `t` gives `model`.
    fn look(t: &Pricing, model: &str) -> Option<(f64, f64)> {
        t.lookup(model).map(|p| (p.input, p.output))
    }

    fn plain(input: f64, output: f64) -> Option<Price> {
        Some(Price::of("", input, output))
    }

    #[test]
    fn models_are_priced_by_the_longest_name_they_continue() {
        let t = Pricing::default();
        assert_eq!(look(&t, "gpt-4o"), price(2.5, 10.0));
        assert_eq!(look(&t, "gpt-4o-mini"), price(0.15, 0.60));
        assert_eq!(look(&t, "gpt-4o-mini-2024-07-18"), price(0.15, 0.60));
        assert_eq!(look(&t, "gpt-4o-2024-08-06"), price(2.5, 10.0));
        assert_eq!(look(&t, "gpt-4o-2024-05-13"), price(5.0, 15.0));
        assert_eq!(look(&t, "gpt-4.1-mini-2025-04-14"), price(0.40, 1.60));
        assert_eq!(look(&t, "o3-mini-2025-01-31"), price(1.10, 4.40));
        assert_eq!(look(&t, "claude-3-5-sonnet-20241022"), price(3.0, 15.0));
        assert_eq!(look(&t, "claude-3-5-sonnet@20240620"), price(3.0, 15.0));
        assert_eq!(look(&t, "claude-opus-4-5-20251101"), price(5.0, 25.0));
        assert_eq!(look(&t, "claude-opus-4-20250514"), price(15.0, 75.0));
        assert_eq!(look(&t, "claude-haiku-4-5"), price(1.0, 5.0));
        assert_eq!(look(&t, "models/gemini-2.5-flash"), price(0.30, 2.50));
        assert_eq!(
            look(&t, "gemini-2.5-flash-lite-preview-06-17"),
            price(0.10, 0.40)
        );
        assert_eq!(
            look(&t, "us.anthropic.claude-3-5-haiku-20241022-v1:0"),
            price(0.80, 4.0)
        );
        assert_eq!(
            look(&t, "meta-llama/llama-4-scout-17b-16e-instruct"),
            price(0.11, 0.34)
        );
        assert_eq!(look(&t, "mistral-large-latest"), price(2.0, 6.0));
    }

    #[test]
    fn a_smaller_or_larger_sibling_is_not_priced_as_the_model_it_continues() {
        let t = Pricing::default();
        // Their own rows.
        assert_eq!(look(&t, "gpt-realtime-2.1-mini"), price(0.60, 2.40));
        assert_eq!(look(&t, "gpt-realtime-mini-2025-12-15"), price(0.60, 2.40));
        assert_eq!(look(&t, "gpt-realtime-2"), price(4.0, 24.0));
        // Snapshots and variants of the same price still are their model.
        assert_eq!(look(&t, "gpt-realtime-1.5"), price(4.0, 16.0));
        assert_eq!(look(&t, "gpt-5-codex"), price(1.25, 10.0));
        assert_eq!(look(&t, "gpt-4o-mini-search-preview"), price(0.15, 0.60));
        assert_eq!(look(&t, "gemini-2.5-pro-preview-05-06"), price(1.25, 10.0));
        // A mini, nano, lite or pro the table does not know is no price of its family's.
        for name in [
            "gpt-5-codex-mini",
            "gpt-realtime-9-mini",
            "gpt-realtime-2.1-mini-2026-01-01x",
            "gpt-5.2-mini",
            "gpt-4.1-2025-04-14-nano",
            "gemini-2.5-flash-image-lite",
            "gpt-5-codex-pro",
            "o3-mini.pro",
        ] {
            let want = match name {
                "gpt-realtime-2.1-mini-2026-01-01x" => price(0.60, 2.40),
                _ => None,
            };
            assert_eq!(look(&t, name), want, "{name}");
        }
        // Named in spec.pricing, it is priced.
        let own = Pricing::with(&[ModelPrice {
            model: "gpt-5-codex-mini".into(),
            input_per_million: "0.25".into(),
            output_per_million: "2".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        assert_eq!(look(&own, "gpt-5-codex-mini"), price(0.25, 2.0));
    }

    #[test]
    fn names_that_only_share_letters_are_not_priced() {
        let t = Pricing::default();
        // `gpt-4` is a model, but `gpt-4o-...` is not a variant of it, nor `o1x` of `o1`.
        assert_eq!(look(&t, "gpt-4x"), None);
        assert_eq!(look(&t, "o1x"), None);
        assert_eq!(look(&t, "my-finetune"), None);
        assert_eq!(look(&t, ""), None);
        assert_eq!(look(&t, "mock-model"), None);
    }

    #[test]
    fn spec_prices_add_models_and_replace_known_ones() {
        let t = Pricing::with(&[
            ModelPrice {
                model: "gpt-4o".into(),
                input_per_million: "1".into(),
                output_per_million: "2".into(),
                ..ModelPrice::default()
            },
            ModelPrice {
                model: "house-llm".into(),
                input_per_million: "0.5".into(),
                output_per_million: "0".into(),
                ..ModelPrice::default()
            },
        ])
        .expect("valid");
        assert_eq!(look(&t, "gpt-4o-2024-08-06"), price(1.0, 2.0));
        // The longer built-in name still wins for its own variants.
        assert_eq!(look(&t, "gpt-4o-mini"), price(0.15, 0.60));
        assert_eq!(look(&t, "house-llm-v2"), price(0.5, 0.0));
        let err = Pricing::with(&[ModelPrice {
            model: "x".into(),
            input_per_million: "cheap".into(),
            output_per_million: "1".into(),
            ..ModelPrice::default()
        }])
        .expect_err("bad price");
        assert!(err.contains("spec.pricing[0].inputPerMillion"), "{err}");
    }

    #[test]
    fn the_model_is_found_in_the_body_or_the_path_without_parsing() {
        let model = |body: &[u8]| model_in_body(body).map(Cow::into_owned);
        let found = |m: &str| Some(m.to_owned());
        let body = br#"{"messages":[{"role":"user","content":"say \"model\": \"x\""}], "model" : "gpt-4o-mini","stream":true}"#;
        assert_eq!(model(body), found("gpt-4o-mini"));
        assert_eq!(model(br#"{"model":123}"#), None);
        let gemini = br#"{"contents":[{"role":"model","parts":[]}],"model":"gemini-2.5-pro"}"#;
        assert_eq!(model(gemini), found("gemini-2.5-pro"));
        assert_eq!(model(b"not json"), None);
        assert_eq!(model(br#"{"model":""}"#), None);
        // Only the top-level key: a nested "model" must not choose the price.
        let decoy =
            br#"{"metadata":{"model":"not-priced"},"tools":[{"model":"x"}],"model":"gpt-4o"}"#;
        assert_eq!(model(decoy), found("gpt-4o"));
        assert_eq!(model(br#"{"metadata":{"model":"not-priced"}}"#), None);
        let escaped = br#"{"x":"a\\","y":"}\"{","model":"m1"}"#;
        assert_eq!(model(escaped), found("m1"));
        // The providers' parsers decode escapes and keep the last of repeated keys: so does the
        // scan, or an app could name an unpriced model to the gateway and a priced one upstream.
        assert_eq!(model(br#"{"mo\u0064el":"gpt-4o"}"#), found("gpt-4o"));
        assert_eq!(model(br#"{"model":"gpt\u002d4o"}"#), found("gpt-4o"));
        assert_eq!(model(br#"{"model":"a\"b"}"#), found("a\"b"));
        assert_eq!(
            model(br#"{"model":"unpriced","stream":true,"model":"gpt-4o"}"#),
            found("gpt-4o")
        );
        // Text that only looks like another key sends the scan through the whole body.
        assert_eq!(
            model(br#"{"model":"a","messages":[{"content":"which model", "x": "\u00e9"}]}"#),
            found("a")
        );
        // Strings in arrays are values, never followed by `:`.
        assert_eq!(model(br#"{"stop":["model", ":"],"model":"m"}"#), found("m"));
        assert_eq!(model(br#"{"a":[{"model":"x"}],"b":["model"]}"#), None);
        assert_eq!(model(br#"{"model":"gpt-4o","model":null}"#), None);
        assert_eq!(model(br#"{"model":"gpt-4o","model":{"model":"x"}}"#), None);
        assert_eq!(
            model(br#"{"\u006dodel":"a","model":"b","x":{"model":"c"}}"#),
            found("b")
        );
        assert_eq!(
            model_in_path("v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            model_in_path(
                "v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent"
            ),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            model_in_path(
                "bedrock-runtime/us-east-1/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
            ),
            Some("anthropic.claude-3-haiku-20240307-v1%3A0")
        );
        assert_eq!(model_in_path("chat/completions"), None);
        // Workers AI names the model in the path, from its `@`.
        for path in [
            "@cf/meta/llama-3.1-8b-instruct",
            "run/@cf/meta/llama-3.1-8b-instruct?x=1",
            "acct/ai/run/@cf/meta/llama-3.1-8b-instruct/",
        ] {
            assert_eq!(
                model_in_path(path),
                Some("@cf/meta/llama-3.1-8b-instruct"),
                "{path}"
            );
        }
        assert_eq!(model_in_path("@cf/meta"), None);
        let m = request_model("chat/completions", br#"{"model":"gpt-4o"}"#).expect("found");
        assert_eq!(m.as_str(), "gpt-4o");
        let long = "x".repeat(200);
        assert_eq!(ModelName::new(&long).as_str(), long);
    }

    fn custom(v: &'static str) -> Result<Option<CustomCost>, u16> {
        let mut h = http::HeaderMap::new();
        h.insert("cf-aig-custom-cost", HeaderValue::from_static(v));
        CustomCost::from_headers(GatewayHeaders::scan(&h)).map_err(|e| e.code())
    }

    #[test]
    fn custom_costs_are_per_token_or_total_and_checked() {
        assert_eq!(
            CustomCost::from_headers(GatewayHeaders::scan(&http::HeaderMap::new())),
            Ok(None)
        );
        assert_eq!(
            custom(r#"{"per_token_in": 0.000001, "per_token_out": 0.000002}"#),
            Ok(Some(CustomCost::per_token(0.000001, 0.000002)))
        );
        // Cloudflare's cache-read and cache-write prices, each optional beside the two others.
        assert_eq!(
            custom(
                r#"{"per_token_in": 0.000003, "per_token_out": 0.000015, "per_cache_read_token": 0.0000003, "per_cache_write_token": 0.00000375}"#
            ),
            Ok(Some(CustomCost::PerToken {
                input: 0.000003,
                output: 0.000015,
                cache_read: 0.0000003,
                cache_write: 0.00000375,
            }))
        );
        assert_eq!(
            custom(r#"{"per_token_in": 0.5, "per_token_out": 1, "per_cache_read_token": 0}"#),
            Ok(Some(CustomCost::PerToken {
                input: 0.5,
                output: 1.0,
                cache_read: 0.0,
                cache_write: 0.5,
            }))
        );
        assert_eq!(
            custom(r#"{"total_cost": 0.5}"#),
            Ok(Some(CustomCost::Total(0.5)))
        );
        for bad in [
            "cheap",
            "[1]",
            "{}",
            r#"{"total_cost": -1}"#,
            r#"{"total_cost": "1"}"#,
            r#"{"per_token_in": 1}"#,
            r#"{"per_token_in": 1, "per_token_out": 1, "total_cost": 1}"#,
            r#"{"cost": 1}"#,
            // Cache prices beside the input and output prices only.
            r#"{"per_cache_read_token": 0.1}"#,
            r#"{"per_token_in": 1, "per_cache_write_token": 1}"#,
            r#"{"total_cost": 1, "per_cache_read_token": 0.1}"#,
            r#"{"per_token_in": 1, "per_token_out": 1, "per_cache_read_token": -1}"#,
            r#"{"per_token_in": 1, "per_token_out": 1, "per_cache_write_token": 2}"#,
            r#"{"per_token_in": 1, "per_token_out": 1, "per_cache_read_token": "0.1"}"#,
            r#"{"per_token_in": 1, "per_token_out": 1, "per_cache_token": 0.1}"#,
            // Finite, but a cost (and the counters summing costs) would overflow to infinity.
            r#"{"per_token_in": 1e308, "per_token_out": 1}"#,
            r#"{"total_cost": 1e308}"#,
        ] {
            assert_eq!(custom(bad), Err(2100), "{bad}");
        }
        assert!(custom(r#"{"total_cost": 1000000}"#).is_ok());
        assert_eq!(
            cost(
                plain(f64::MAX, 1.0),
                None,
                &Tokens::plain(Some(10), Some(1))
            ),
            None
        );
    }

    #[test]
    fn cost_is_tokens_times_price_unless_overridden() {
        let p = plain(2.5, 10.0);
        let c = cost(p, None, &Tokens::plain(Some(1000), Some(500))).expect("priced");
        assert!((c - 0.0075).abs() < 1e-12, "{c}");
        assert_eq!(
            cost(p, None, &Tokens::plain(None, None)),
            None,
            "no tokens, no cost"
        );
        assert_eq!(
            cost(None, None, &Tokens::plain(Some(1), Some(1))),
            None,
            "unknown model"
        );
        let per = Some(CustomCost::per_token(0.001, 0.002));
        let c = cost(p, per, &Tokens::plain(Some(10), Some(5))).expect("custom");
        assert!((c - 0.02).abs() < 1e-12, "{c}");
        assert_eq!(
            cost(
                None,
                Some(CustomCost::Total(0.25)),
                &Tokens::plain(None, None)
            ),
            Some(0.25)
        );
    }
    fn close(got: Option<f64>, want: f64) {
        let got = got.expect("priced");
        assert!((got - want).abs() < 1e-9, "{got} != {want}");
    }

    #[test]
    fn claude_models_with_cheaper_cache_hits_read_them_at_their_own_rate() {
        let t = Pricing::default();
        let read_write = |model: &str| {
            let p = t.lookup(model).expect(model);
            (p.cache_read, p.cache_write, p.cache_write_1h)
        };
        // platform.claude.com, Pricing and the model pages (audit of 2026-11-28).
        for (model, want) in [
            ("claude-opus-5-5", (0.20, 5.0, 8.0)),
            ("claude-opus-5-5-20260922", (0.20, 5.0, 8.0)),
            ("claude-fable-5-1", (0.25, 12.5, 20.0)),
            ("claude-mythos-5-1", (0.25, 12.5, 20.0)),
            // The tenth of the others stays theirs.
            ("claude-fable-5", (1.0, 12.5, 20.0)),
            ("claude-mythos-5", (1.0, 12.5, 20.0)),
            ("claude-opus-5", (0.50, 6.25, 10.0)),
            ("claude-sonnet-5-5", (0.20, 2.5, 4.0)),
            ("claude-haiku-5-5", (0.01, 0.125, 0.20)),
        ] {
            let (read, write, write_1h) = read_write(model);
            for (got, want) in [(read, want.0), (write, want.1), (write_1h, want.2)] {
                assert!((got - want).abs() < 1e-12, "{model}: {got} != {want}");
            }
        }
    }

    #[test]
    fn the_gemini_models_of_the_2026_11_28_audit_have_their_page_prices() {
        let t = Pricing::default();
        assert_eq!(look(&t, "gemini-3.5-flash"), price(1.50, 9.0));
        assert_eq!(look(&t, "gemini-3.5-flash-lite"), price(0.30, 2.50));
        assert_eq!(look(&t, "gemini-3.1-pro-preview"), price(2.0, 12.0));
        assert_eq!(look(&t, "gemini-embedding-2"), price(0.20, 0.0));
        // Not the 3.5 Flash's price, nor any other's: left out (a price that ends 2026-12-31).
        assert_eq!(look(&t, "gemini-3.8-flash"), None);
        // Gemini 2.5's rows, confirmed by the same page, unchanged.
        assert_eq!(look(&t, "gemini-2.5-pro"), price(1.25, 10.0));
        assert_eq!(look(&t, "gemini-2.5-flash"), price(0.30, 2.50));
        assert_eq!(look(&t, "gemini-2.5-flash-lite"), price(0.10, 0.40));
    }

    #[test]
    fn prompt_cache_reads_and_writes_are_priced_as_the_provider_prices_them() {
        let t = Pricing::default();
        let sonnet = t.lookup("claude-sonnet-4-5-20250929");
        let tokens = |input, output, read, write, write_1h| Tokens {
            input: Some(input),
            output: Some(output),
            cache_read: read,
            cache_write: write,
            cache_write_1h: write_1h,
            ..Tokens::default()
        };
        // 50 fresh + 100k read, 500 out: 50*3 + 100k*0.30 + 500*15 per 1M.
        close(
            cost(sonnet, None, &tokens(100_050, 500, 100_000, 0, 0)),
            0.03765,
        );
        // 100k written for 5 minutes (1.25x), then for an hour (2x).
        close(
            cost(sonnet, None, &tokens(100_050, 500, 0, 100_000, 0)),
            0.38265,
        );
        close(
            cost(sonnet, None, &tokens(100_050, 500, 0, 100_000, 100_000)),
            0.60765,
        );
        // Bedrock names it with region and vendor prefixes, the same price.
        close(
            cost(
                t.lookup("us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
                None,
                &tokens(100_050, 500, 100_000, 0, 0),
            ),
            0.03765,
        );
        // Gemini 2.5 Pro: thinking is output (2200 out); 800 of the prompt cached at 0.1x.
        let pro = t.lookup("gemini-2.5-pro");
        close(cost(pro, None, &tokens(1000, 2200, 0, 0, 0)), 0.02325);
        close(cost(pro, None, &tokens(1000, 2200, 800, 0, 0)), 0.02235);
        // OpenAI: gpt-5 cached input $0.125, gpt-4o 50%, gpt-4.1 25%, gpt-5-pro none.
        let gpt5 = t.lookup("gpt-5-2025-08-07");
        close(
            cost(gpt5, None, &tokens(100_000, 1000, 90_000, 0, 0)),
            0.03375,
        );
        close(
            cost(
                t.lookup("gpt-4o"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            1.25,
        );
        close(
            cost(
                t.lookup("gpt-4.1-mini"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            0.10,
        );
        close(
            cost(
                t.lookup("o3-mini"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            0.55,
        );
        close(
            cost(
                t.lookup("gpt-5-pro"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            15.0,
        );
        // DeepSeek cache hits: $0.0028 per 1M on V4-Flash (and deepseek-chat, its alias),
        // $0.003625 on V4-Pro.
        for (model, hit) in [
            ("deepseek-chat", 0.0028),
            ("deepseek-v4-flash", 0.0028),
            ("deepseek-v4-pro", 0.003625),
        ] {
            close(
                cost(
                    t.lookup(model),
                    None,
                    &tokens(1_000_000, 0, 1_000_000, 0, 0),
                ),
                hit,
            );
        }
        // A model the gateway knows no cache rule for: cached tokens at the input price.
        let house = Pricing::with(&[ModelPrice {
            model: "house-llm".into(),
            input_per_million: "1".into(),
            output_per_million: "0".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        close(
            cost(
                house.lookup("house-llm"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            1.0,
        );
        // spec.pricing replacing a Claude price keeps Anthropic's cache rule.
        let own = Pricing::with(&[ModelPrice {
            model: "claude-sonnet-4-5".into(),
            input_per_million: "10".into(),
            output_per_million: "0".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        close(
            cost(
                own.lookup("claude-sonnet-4-5"),
                None,
                &tokens(1_000_000, 0, 1_000_000, 0, 0),
            ),
            1.0,
        );
        // Cache prices in spec.pricing replace the rule: 1M fresh, 1M read, 1M written for
        // 5 minutes and 1M for an hour, priced 10 + 0.5 + 12 + 20 (1.0 and 2.0 by the rule).
        let given = Pricing::with(&[ModelPrice {
            model: "claude-sonnet-4-5".into(),
            input_per_million: "10".into(),
            output_per_million: "0".into(),
            cache_read_per_million: Some("0.5".into()),
            cache_write_per_million: Some("12".into()),
            cache_write_1h_per_million: Some("20".into()),
        }])
        .expect("valid");
        let mixed = tokens(4_000_000, 0, 1_000_000, 2_000_000, 1_000_000);
        close(cost(given.lookup("claude-sonnet-4-5"), None, &mixed), 42.5);
        close(cost(own.lookup("claude-sonnet-4-5"), None, &mixed), 43.5);
        let err = Pricing::with(&[ModelPrice {
            model: "x".into(),
            input_per_million: "1".into(),
            output_per_million: "1".into(),
            cache_write_per_million: Some("free".into()),
            ..ModelPrice::default()
        }])
        .expect_err("bad cache price");
        assert!(
            err.contains("spec.pricing[0].cacheWritePerMillion"),
            "{err}"
        );
        // A custom per-token cost without cache prices prices every input token alike.
        let per = Some(CustomCost::per_token(0.000001, 0.0));
        close(
            cost(sonnet, per, &tokens(100_050, 0, 100_000, 0, 0)),
            0.10005,
        );
        // With them, the cache's reads and writes (of either lifetime) are priced at theirs,
        // within the input count the answer reports, in place of the model's rates.
        let cached = Some(CustomCost::PerToken {
            input: 0.000001,
            output: 0.00001,
            cache_read: 0.0000001,
            cache_write: 0.000002,
        });
        close(
            cost(sonnet, cached, &tokens(103_000, 300, 100_000, 2_000, 500)),
            (1_000.0 * 1.0 + 100_000.0 * 0.1 + 2_000.0 * 2.0 + 300.0 * 10.0) / 1e6,
        );
        close(
            cost(None, cached, &tokens(1_000, 0, 0, 0, 0)),
            1_000.0 / 1e6,
        );
        // Reads and writes past the input count are not priced past it.
        close(
            cost(None, cached, &tokens(1_000, 0, 5_000, 0, 0)),
            1_000.0 * 0.1 / 1e6,
        );
    }

    #[test]
    fn audio_and_image_tokens_are_priced_at_the_models_rates_for_them() {
        let t = Pricing::default();
        let tokens = |input, output, audio_input, audio_output, image_output| Tokens {
            audio_input,
            audio_output,
            image_output,
            ..Tokens::plain(Some(input), Some(output))
        };
        // gpt-4o-audio-preview: text $2.50 / $10, audio $40 / $80.
        let audio = tokens(1000, 500, 800, 400, 0);
        let want = (200.0 * 2.5 + 800.0 * 40.0 + 100.0 * 10.0 + 400.0 * 80.0) / 1e6;
        close(
            cost(t.lookup("gpt-4o-audio-preview-2025-06-03"), None, &audio),
            want,
        );
        close(
            cost(t.lookup("gpt-4o-audio-preview-2024-10-01"), None, &audio),
            (200.0 * 2.5 + 800.0 * 100.0 + 100.0 * 10.0 + 400.0 * 200.0) / 1e6,
        );
        close(
            cost(t.lookup("gpt-audio-2025-08-28"), None, &audio),
            (200.0 * 2.5 + 800.0 * 32.0 + 100.0 * 10.0 + 400.0 * 64.0) / 1e6,
        );
        close(
            cost(t.lookup("gpt-4o-mini-audio-preview"), None, &audio),
            (200.0 * 0.15 + 800.0 * 10.0 + 100.0 * 0.60 + 400.0 * 20.0) / 1e6,
        );
        // A model without audio rates prices audio as text (gpt-audio-mini's are not published).
        close(
            cost(t.lookup("gpt-audio-mini"), None, &audio),
            (1000.0 * 0.60 + 500.0 * 2.40) / 1e6,
        );
        // Transcription: 40 text tokens of prompt at $2.50, 80 of audio at $6, 50 out at $10.
        let heard = tokens(120, 50, 80, 0, 0);
        close(
            cost(t.lookup("gpt-4o-transcribe"), None, &heard),
            (40.0 * 2.5 + 80.0 * 6.0 + 50.0 * 10.0) / 1e6,
        );
        close(
            cost(t.lookup("gpt-4o-mini-transcribe"), None, &heard),
            (40.0 * 1.25 + 80.0 * 3.0 + 50.0 * 5.0) / 1e6,
        );
        // Gemini: audio in at $1.00 on 2.5 Flash ($0.30 text), image out at $30 on Flash Image.
        close(
            cost(
                t.lookup("gemini-2.5-flash"),
                None,
                &tokens(1050, 100, 1000, 0, 0),
            ),
            (50.0 * 0.30 + 1000.0 * 1.0 + 100.0 * 2.5) / 1e6,
        );
        close(
            cost(
                t.lookup("gemini-2.5-flash-lite-preview-09-2025"),
                None,
                &tokens(1000, 0, 1000, 0, 0),
            ),
            1000.0 * 0.30 / 1e6,
        );
        close(
            cost(
                t.lookup("gemini-2.5-flash-image-preview"),
                None,
                &tokens(10, 1300, 0, 0, 1290),
            ),
            (10.0 * 0.30 + 10.0 * 2.5 + 1290.0 * 30.0) / 1e6,
        );
        // Counts past their totals are cut to them (audio never more than the fresh input).
        let odd = Tokens {
            cache_read: 600,
            ..tokens(1000, 10, 900, 50, 50)
        };
        close(
            cost(t.lookup("gpt-4o-audio-preview"), None, &odd),
            (400.0 * 40.0 + 600.0 * 1.25 + 10.0 * 80.0) / 1e6,
        );
        // spec.pricing replacing a model's text prices keeps its audio rates.
        let own = Pricing::with(&[ModelPrice {
            model: "gpt-4o-audio-preview".into(),
            input_per_million: "1".into(),
            output_per_million: "2".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        close(
            cost(own.lookup("gpt-4o-audio-preview"), None, &audio),
            (200.0 + 800.0 * 40.0 + 100.0 * 2.0 + 400.0 * 80.0) / 1e6,
        );
        // A custom per-token cost prices every token alike.
        let per = Some(CustomCost::per_token(0.000001, 0.000002));
        close(cost(t.lookup("gpt-4o-audio-preview"), per, &audio), 0.002);
    }

    #[test]
    fn images_and_web_searches_are_charged_beside_the_tokens() {
        let t = Pricing::default();
        let images = |n| Tokens {
            images: n,
            ..Tokens::default()
        };
        // Imagen answers have no tokens: their images are the cost.
        close(
            cost(t.lookup("imagen-4.0-generate-001"), None, &images(2)),
            0.08,
        );
        close(
            cost(t.lookup("imagen-4.0-fast-generate-001"), None, &images(3)),
            0.06,
        );
        close(
            cost(t.lookup("imagen-4.0-ultra-generate-001"), None, &images(1)),
            0.06,
        );
        close(
            cost(t.lookup("imagen-3.0-generate-002"), None, &images(1)),
            0.04,
        );
        assert_eq!(
            cost(t.lookup("imagen-4.0-generate-001"), None, &images(0)),
            None,
            "nothing counted, no cost"
        );
        // $10 per 1,000 web searches on Claude models, beside the tokens.
        let searched = Tokens {
            web_searches: 3,
            ..Tokens::plain(Some(2000), Some(300))
        };
        close(
            cost(t.lookup("claude-sonnet-4-5-20250929"), None, &searched),
            (2000.0 * 3.0 + 300.0 * 15.0) / 1e6 + 0.03,
        );
        close(
            cost(
                t.lookup("us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
                None,
                &searched,
            ),
            (2000.0 * 3.0 + 300.0 * 15.0) / 1e6 + 0.03,
        );
    }

    #[test]
    fn hosted_tool_calls_are_charged_at_the_providers_fees() {
        let t = Pricing::default();
        let tokens = Tokens::plain(Some(2000), Some(300));
        let searched = |n, preview| Tokens {
            web_searches: n,
            web_search_preview: preview,
            ..tokens
        };
        let mini = (2000.0 * 0.15 + 300.0 * 0.60) / 1e6;
        // OpenAI's `web_search`: $10 per 1,000 calls on every model.
        close(
            cost(t.lookup("gpt-4o-mini"), None, &searched(3, false)),
            mini + 0.03,
        );
        // `web_search_preview`: $25 per 1,000 on the non-reasoning models, $10 on the others.
        close(
            cost(t.lookup("gpt-4o-mini-2024-07-18"), None, &searched(3, true)),
            mini + 0.075,
        );
        close(
            cost(t.lookup("gpt-4.1"), None, &searched(1, true)),
            (2000.0 * 2.0 + 300.0 * 8.0) / 1e6 + 0.025,
        );
        close(
            cost(t.lookup("gpt-5-mini"), None, &searched(2, true)),
            (2000.0 * 0.25 + 300.0 * 2.0) / 1e6 + 0.02,
        );
        close(
            cost(t.lookup("o4-mini-deep-research"), None, &searched(2, true)),
            (2000.0 * 2.0 + 300.0 * 8.0) / 1e6 + 0.02,
        );
        // File search: $2.50 per 1,000 calls.
        let filed = Tokens {
            file_searches: 4,
            ..tokens
        };
        close(
            cost(t.lookup("gpt-5"), None, &filed),
            (2000.0 * 1.25 + 300.0 * 10.0) / 1e6 + 0.01,
        );
        // The fee is the call's, whatever the model: a newer one than the table's, a
        // fine-tune, one only spec.pricing prices. Only the preview's $25 is GPT-4o's and
        // GPT-4.1's (fine-tunes of them too); any other name gets the $10 of the others.
        let own = Pricing::with(
            &[
                "gpt-5.2",
                "gpt-5.5",
                "ft:gpt-4.1-mini:acme::abc123",
                "house-llm",
            ]
            .map(|m| ModelPrice {
                model: m.into(),
                input_per_million: "1".into(),
                output_per_million: "2".into(),
                ..ModelPrice::default()
            }),
        )
        .expect("valid");
        let own_tokens = (2000.0 + 600.0) / 1e6;
        for (model, general, preview) in [
            ("gpt-5.2", 0.03, 0.03),
            ("gpt-5.5-2026-04-24", 0.03, 0.03),
            ("ft:gpt-4.1-mini:acme::abc123", 0.03, 0.075),
            ("house-llm", 0.03, 0.03),
        ] {
            close(
                cost(own.lookup(model), None, &searched(3, false)),
                own_tokens + general,
            );
            close(
                cost(own.lookup(model), None, &searched(3, true)),
                own_tokens + preview,
            );
            close(cost(own.lookup(model), None, &filed), own_tokens + 0.01);
        }
        close(
            cost(t.lookup("claude-haiku-4-5"), None, &searched(1, false)),
            (2000.0 * 1.0 + 300.0 * 5.0) / 1e6 + 0.01,
        );
        // Calls without tokens (a stream cut before its usage) still cost their fees.
        let bare = Tokens {
            web_searches: 2,
            ..Tokens::default()
        };
        close(cost(t.lookup("gpt-5"), None, &bare), 0.02);
        assert_eq!(cost(None, None, &bare), None, "no price, no cost");
        // spec.pricing replacing a model's token prices keeps its fees; a custom per-token
        // cost replaces them.
        let own = Pricing::with(&[ModelPrice {
            model: "gpt-4o".into(),
            input_per_million: "1".into(),
            output_per_million: "2".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        close(
            cost(own.lookup("gpt-4o"), None, &searched(2, true)),
            (2000.0 + 600.0) / 1e6 + 0.05,
        );
        let per = Some(CustomCost::per_token(0.000001, 0.000002));
        close(cost(t.lookup("gpt-4o"), per, &searched(2, true)), 0.0026);
    }

    #[test]
    fn dalle_images_are_priced_by_the_size_and_quality_asked() {
        let t = Pricing::default();
        let images = |n| Tokens {
            images: n,
            ..Tokens::default()
        };
        // At the defaults (1024x1024, standard) as the table has them.
        close(cost(t.lookup("dall-e-3"), None, &images(2)), 0.08);
        close(cost(t.lookup("dall-e-2"), None, &images(3)), 0.06);
        let asked = |size: Option<&str>, quality: Option<&str>| ImageOptions {
            size: size.map(Box::from),
            quality: quality.map(Box::from),
        };
        let at = |model, size, quality| per_image(model, &asked(size, quality));
        assert_eq!(at("dall-e-3", None, None), Some(0.04));
        assert_eq!(at("dall-e-3", None, Some("auto")), Some(0.04));
        assert_eq!(
            at("dall-e-3", Some("1792x1024"), Some("standard")),
            Some(0.08)
        );
        assert_eq!(at("dall-e-3", Some("1024x1024"), Some("hd")), Some(0.08));
        assert_eq!(at("dall-e-3", Some("1024x1792"), Some("hd")), Some(0.12));
        assert_eq!(at("dall-e-2", Some("256x256"), None), Some(0.016));
        assert_eq!(at("dall-e-2", Some("512x512"), None), Some(0.018));
        assert_eq!(at("dall-e-2", None, None), Some(0.02));
        // Sizes and qualities a model is not sold at (the provider refuses them), other models.
        assert_eq!(at("dall-e-3", Some("256x256"), None), None);
        // DALL·E 2 makes standard images only: asked for HD, it makes one of those.
        assert_eq!(at("dall-e-2", None, Some("hd")), Some(0.02));
        assert_eq!(at("dall-e-2", Some("256x256"), Some("hd")), Some(0.016));
        assert_eq!(at("dall-e-2", Some("1792x1024"), Some("hd")), None);
        assert_eq!(at("gpt-image-1", None, None), None);
        assert_eq!(at("dall-e-30", None, None), None);
    }

    #[test]
    fn image_requests_are_read_for_dalle_only() {
        let json = http::HeaderMap::new();
        let read = |model, path, body: &[u8]| ImageOptions::of_request(model, path, &json, body);
        let body = br#"{"model":"dall-e-3","prompt":"a \"size\": \"256x256\" cat","size":"1792x1024","quality":"hd","n":1}"#;
        let want = |size: &str, quality: Option<&str>| {
            Some(ImageOptions {
                size: Some(size.into()),
                quality: quality.map(Box::from),
            })
        };
        assert_eq!(
            read("dall-e-3", "images/generations", body),
            want("1792x1024", Some("hd"))
        );
        assert_eq!(
            read("dall-e-3", "v1/images/generations/", body),
            want("1792x1024", Some("hd"))
        );
        // The last of a repeated key, escapes decoded, as the provider's parser reads them.
        let twice = br#"{"quality":"standard","size":"1024x1024","quality":"h\u0064"}"#;
        assert_eq!(
            read("dall-e-3", "images/generations", twice),
            want("1024x1024", Some("hd"))
        );
        assert_eq!(
            read("dall-e-3", "images/generations", b"{}"),
            Some(ImageOptions::default())
        );
        // Other models and endpoints are not read.
        assert_eq!(read("gpt-image-1", "images/generations", body), None);
        assert_eq!(read("dall-e-3", "chat/completions", body), None);
        assert_eq!(read("dall-e-3", "myimages/generations", body), None);
        assert_eq!(
            read("dall-e-3", "images/generation%73?x=1", body),
            want("1792x1024", Some("hd"))
        );
        // A form upload (an edit, a variation): its fields.
        let mut form = http::HeaderMap::new();
        form.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let upload = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndall-e-2\r\n--XyZ\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n512x512\r\n--XyZ--\r\n";
        assert_eq!(
            ImageOptions::of_request("dall-e-2", "images/variations", &form, upload),
            want("512x512", None)
        );
    }

    #[test]
    fn realtime_responses_price_audio_images_and_the_cache_at_the_models_rates() {
        let t = Pricing::default();
        // A `response.done` usage (developer forum's example): 789 in, 640 of them cached (256
        // text, 384 audio), 476 audio in all; 32 out, 23 of them audio.
        let session = Tokens {
            cache_read: 640,
            audio_cache_read: 384,
            audio_input: 476 - 384,
            audio_output: 23,
            ..Tokens::plain(Some(789), Some(32))
        };
        // gpt-realtime: text $4 / $16, audio $32 / $64, cached input $0.40.
        close(
            cost(t.lookup("gpt-realtime-2025-08-28"), None, &session),
            (57.0 * 4.0 + 92.0 * 32.0 + 640.0 * 0.40 + 9.0 * 16.0 + 23.0 * 64.0) / 1e6,
        );
        // gpt-realtime-mini: text $0.60 / $2.40, audio $10 / $20, cached text $0.06, cached
        // audio $0.30.
        close(
            cost(t.lookup("gpt-realtime-mini"), None, &session),
            (57.0 * 0.60 + 92.0 * 10.0 + 256.0 * 0.06 + 384.0 * 0.30 + 9.0 * 2.40 + 23.0 * 20.0)
                / 1e6,
        );
        // The 2024-10-01 snapshot: audio $100 / $200, cached audio $20.
        close(
            cost(
                t.lookup("gpt-4o-realtime-preview-2024-10-01"),
                None,
                &session,
            ),
            (57.0 * 5.0 + 92.0 * 100.0 + 256.0 * 2.50 + 384.0 * 20.0 + 9.0 * 20.0 + 23.0 * 200.0)
                / 1e6,
        );
        // gpt-4o-realtime-preview: text $5 / $20, audio $40 / $80, cached $2.50.
        close(
            cost(
                t.lookup("gpt-4o-realtime-preview-2025-06-03"),
                None,
                &session,
            ),
            (57.0 * 5.0 + 92.0 * 40.0 + 640.0 * 2.50 + 9.0 * 20.0 + 23.0 * 80.0) / 1e6,
        );
        close(
            cost(t.lookup("gpt-4o-mini-realtime-preview"), None, &session),
            (57.0 * 0.60 + 92.0 * 10.0 + 640.0 * 0.30 + 9.0 * 2.40 + 23.0 * 20.0) / 1e6,
        );
        // An image in the input: $5 on gpt-realtime.
        let seen = Tokens {
            image_input: 1000,
            ..Tokens::plain(Some(1100), Some(0))
        };
        close(
            cost(t.lookup("gpt-realtime"), None, &seen),
            (100.0 * 4.0 + 1000.0 * 5.0) / 1e6,
        );
        // Cached images at $0.50 on gpt-realtime, not at the cached text's $0.40; at the cached
        // text price on a model without a rate of its own.
        let cached = Tokens {
            cache_read: 1500,
            audio_cache_read: 300,
            image_cache_read: 1000,
            ..Tokens::plain(Some(2000), Some(0))
        };
        close(
            cost(t.lookup("gpt-realtime-2025-08-28"), None, &cached),
            (500.0 * 4.0 + 200.0 * 0.40 + 300.0 * 0.40 + 1000.0 * 0.50) / 1e6,
        );
        // $0.08 on the minis, against cached text at $0.06.
        for mini in [
            "gpt-realtime-mini",
            "gpt-realtime-mini-2025-12-15",
            "gpt-realtime-2.1-mini",
        ] {
            close(
                cost(t.lookup(mini), None, &cached),
                (500.0 * 0.60 + 200.0 * 0.06 + 300.0 * 0.30 + 1000.0 * 0.08) / 1e6,
            );
        }
        // gpt-realtime-2: output $24, the rest as gpt-realtime.
        close(
            cost(
                t.lookup("gpt-realtime-2"),
                None,
                &Tokens {
                    output: Some(100),
                    ..cached
                },
            ),
            (500.0 * 4.0 + 200.0 * 0.40 + 300.0 * 0.40 + 1000.0 * 0.50 + 100.0 * 24.0) / 1e6,
        );
        // Never more than the cache reads not audio.
        let odd = Tokens {
            image_cache_read: 5000,
            ..cached
        };
        close(
            cost(t.lookup("gpt-realtime"), None, &odd),
            (500.0 * 4.0 + 300.0 * 0.40 + 1200.0 * 0.50) / 1e6,
        );
    }

    #[test]
    fn whisper_is_priced_by_the_minute_of_audio() {
        let t = Pricing::default();
        let heard = |seconds| Tokens {
            audio_seconds: seconds,
            ..Tokens::default()
        };
        close(
            cost(t.lookup("whisper-1"), None, &heard(91.0)),
            91.0 / 60.0 * 0.006,
        );
        close(
            cost(t.lookup("whisper-1"), None, &heard(2.5)),
            2.5 / 60.0 * 0.006,
        );
        assert_eq!(
            cost(t.lookup("whisper-1"), None, &heard(0.0)),
            None,
            "nothing counted, no cost"
        );
        // Other models have no price by the minute.
        assert_eq!(
            cost(t.lookup("gpt-4o-transcribe"), None, &heard(60.0)),
            Some(0.0)
        );
        close(
            cost(
                t.lookup("whisper-1"),
                Some(CustomCost::Total(0.25)),
                &heard(91.0),
            ),
            0.25,
        );
    }

    #[test]
    fn image_models_price_image_tokens_in_and_out_at_their_rates() {
        let t = Pricing::default();
        let edit = Tokens {
            image_input: 323,
            ..Tokens::plain(Some(343), Some(1056))
        };
        // gpt-image-1: text in $5, image in $10, image out $40.
        close(
            cost(t.lookup("gpt-image-1"), None, &edit),
            (20.0 * 5.0 + 323.0 * 10.0 + 1056.0 * 40.0) / 1e6,
        );
        // gpt-image-1-mini: $2, $2.50, $8.
        close(
            cost(t.lookup("gpt-image-1-mini"), None, &edit),
            (20.0 * 2.0 + 323.0 * 2.5 + 1056.0 * 8.0) / 1e6,
        );
        // Image output counted apart is priced the same (the model answers only images).
        let out = Tokens {
            image_output: 1056,
            ..edit
        };
        close(
            cost(t.lookup("gpt-image-1-2025-04-15"), None, &out),
            (20.0 * 5.0 + 323.0 * 10.0 + 1056.0 * 40.0) / 1e6,
        );
        // A model without an image input rate prices image tokens in as text.
        close(
            cost(t.lookup("gpt-4o-mini"), None, &edit),
            (343.0 * 0.15 + 1056.0 * 0.60) / 1e6,
        );
        // Image tokens past the fresh input (after the cache and audio) are cut to it; cached
        // input at 0.25x on gpt-image-1, 0.1x on the mini.
        let odd = Tokens {
            cache_read: 300,
            ..edit
        };
        close(
            cost(t.lookup("gpt-image-1"), None, &odd),
            (300.0 * 1.25 + 43.0 * 10.0 + 1056.0 * 40.0) / 1e6,
        );
        close(
            cost(t.lookup("gpt-image-1-mini"), None, &odd),
            (300.0 * 0.2 + 43.0 * 2.5 + 1056.0 * 8.0) / 1e6,
        );
    }

    #[test]
    fn gemini_embedding_is_priced_by_its_input_tokens() {
        let t = Pricing::default();
        assert_eq!(look(&t, "gemini-embedding-001"), price(0.15, 0.0));
        close(
            cost(
                t.lookup("gemini-embedding-001"),
                None,
                &Tokens::plain(Some(1_000_000), None),
            ),
            0.15,
        );
    }

    #[test]
    fn vertex_text_embeddings_are_priced_by_the_characters_billed() {
        let t = Pricing::default();
        let embedded = Tokens {
            characters: 4000,
            ..Tokens::plain(Some(1000), None)
        };
        for model in [
            "text-embedding-005",
            "text-embedding-004",
            "text-multilingual-embedding-002",
        ] {
            close(cost(t.lookup(model), None, &embedded), 4.0 * 0.000025);
        }
        // Tokens without the characters they are priced by: not known.
        assert_eq!(
            cost(
                t.lookup("text-embedding-005"),
                None,
                &Tokens::plain(Some(1000), None),
            ),
            None
        );
        // Unless spec.pricing gives the model a price by the token, which replaces the one by
        // the character.
        let own = Pricing::with(&[ModelPrice {
            model: "text-embedding-005".into(),
            input_per_million: "0.1".into(),
            output_per_million: "0".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        close(
            cost(
                own.lookup("text-embedding-005"),
                None,
                &Tokens::plain(Some(1000), None),
            ),
            1000.0 * 0.1 / 1e6,
        );
        close(
            cost(own.lookup("text-embedding-005"), None, &embedded),
            1000.0 * 0.1 / 1e6,
        );
        // gemini-embedding-001 is priced by its tokens, whatever characters are stated.
        close(
            cost(t.lookup("gemini-embedding-001"), None, &embedded),
            1000.0 * 0.15 / 1e6,
        );
    }

    #[test]
    fn a_cost_the_provider_states_replaces_the_price_but_not_a_custom_cost() {
        let t = Pricing::default();
        let stated = Tokens {
            stated_cost: Some(0.01053),
            ..Tokens::plain(Some(10), Some(300))
        };
        close(cost(t.lookup("sonar-pro"), None, &stated), 0.01053);
        // Also for a model the table does not know.
        close(cost(None, None, &stated), 0.01053);
        close(cost(None, Some(CustomCost::Total(0.5)), &stated), 0.5);
        // Without it, Perplexity's models are priced by their tokens.
        close(
            cost(
                t.lookup("sonar-pro"),
                None,
                &Tokens::plain(Some(10), Some(300)),
            ),
            (10.0 * 3.0 + 300.0 * 15.0) / 1e6,
        );
        assert_eq!(look(&t, "sonar"), price(1.0, 1.0));
        assert_eq!(look(&t, "sonar-reasoning-pro"), price(2.0, 8.0));
        assert_eq!(look(&t, "sonar-deep-research"), price(2.0, 8.0));
    }

    #[test]
    fn variants_with_their_own_price_are_not_priced_as_their_base() {
        let t = Pricing::default();
        assert_eq!(look(&t, "deepseek-chat"), price(0.14, 0.28));
        assert_eq!(look(&t, "deepseek-reasoner"), price(0.14, 0.28));
        assert_eq!(look(&t, "deepseek-v4-flash"), price(0.14, 0.28));
        assert_eq!(look(&t, "deepseek-v4-pro"), price(0.435, 0.87));
        assert_eq!(look(&t, "grok-4-fast-reasoning"), price(0.20, 0.50));
        assert_eq!(look(&t, "grok-4-fast-non-reasoning"), price(0.20, 0.50));
        assert_eq!(look(&t, "grok-4-1-fast-reasoning"), price(0.20, 0.50));
        assert_eq!(look(&t, "grok-4-1-fast-non-reasoning"), price(0.20, 0.50));
        assert_eq!(look(&t, "grok-4-0709"), price(3.0, 15.0));
        assert_eq!(look(&t, "o3-deep-research-2025-06-26"), price(10.0, 40.0));
        assert_eq!(look(&t, "o4-mini-deep-research"), price(2.0, 8.0));
        assert_eq!(look(&t, "o3-2025-04-16"), price(2.0, 8.0));
        assert_eq!(look(&t, "gpt-5-pro-2025-10-06"), price(15.0, 120.0));
        assert_eq!(look(&t, "gpt-4-0125-preview"), price(10.0, 30.0));
        assert_eq!(look(&t, "gpt-4-1106-preview"), price(10.0, 30.0));
        assert_eq!(look(&t, "gpt-4-32k-0613"), price(60.0, 120.0));
        assert_eq!(look(&t, "gpt-4-0613"), price(30.0, 60.0));
    }

    #[test]
    fn a_later_version_is_not_priced_as_the_model_it_follows() {
        let t = Pricing::default();
        for (name, want) in [
            // Opus 4.6 to 4.8 are $5 / $25, not Opus 4's $15 / $75.
            ("claude-opus-4-6", price(5.0, 25.0)),
            ("claude-opus-4-7", price(5.0, 25.0)),
            ("claude-opus-4-8-20260528", price(5.0, 25.0)),
            ("claude-sonnet-4-6", price(3.0, 15.0)),
            ("claude-opus-5", price(5.0, 25.0)),
            ("claude-opus-5-5", price(4.0, 20.0)),
            ("claude-sonnet-5-5", price(2.0, 10.0)),
            ("claude-fable-5-1", price(10.0, 50.0)),
            ("claude-mythos-5", price(10.0, 50.0)),
            ("claude-mythos-5-1", price(10.0, 50.0)),
            ("claude-haiku-5-5", price(0.10, 0.50)),
            // Versions the table does not name: no price, not their predecessor's.
            ("claude-opus-4-9", None),
            ("claude-fable-5-2", None),
            ("claude-mythos-5-2", None),
            ("claude-haiku-5-6", None),
            ("claude-opus-5-7", None),
            // Snapshots, dates and Anthropic's `-0` alias stay the model's.
            ("claude-opus-4-0", price(15.0, 75.0)),
            ("claude-opus-4-20250514", price(15.0, 75.0)),
            ("gpt-4-0613", price(30.0, 60.0)),
            ("gemini-2.5-pro-preview-05-06", price(1.25, 10.0)),
            // Versions priced as their predecessor, by name (SAME_PRICE).
            ("gpt-realtime-1.5", price(4.0, 16.0)),
            ("gpt-realtime-1.5-2026-02-23", price(4.0, 16.0)),
        ] {
            assert_eq!(look(&t, name), want, "{name}");
        }
        // gpt-realtime-1.5 has gpt-realtime's audio rates too.
        let (v15, v1) = (t.lookup("gpt-realtime-1.5"), t.lookup("gpt-realtime"));
        let audio =
            |p: Option<Price>| p.map(|p| (p.audio_input, p.audio_output, p.image_cache_read));
        assert_eq!(audio(v15), audio(v1));
        assert_eq!(audio(v15), Some((32.0, 64.0, 0.5)));
    }

    #[test]
    fn a_gpt_5_point_release_has_the_gpt_5_cache_ratio_even_when_the_table_does_not_name_it() {
        for (name, read) in [
            ("gpt-5.1", 0.1),
            ("gpt-5.4", 0.1),
            ("gpt-5.3-codex", 0.1),
            ("gpt-5.10-mini", 0.1),
            ("gpt-5.2-pro", 1.0),
            ("gpt-5.4-pro", 1.0),
            ("gpt-5-pro", 1.0),
            ("gpt-5.", 1.0),
            ("gpt-5.x", 1.0),
        ] {
            assert_eq!(cache_ratios(name).0, read, "{name}");
        }
        // Priced in `spec.pricing`: cached input at a tenth of it.
        let t = Pricing::with(&[ModelPrice {
            model: "gpt-5.4".into(),
            input_per_million: "2.50".into(),
            output_per_million: "15".into(),
            ..ModelPrice::default()
        }])
        .expect("valid");
        let cached = t.lookup("gpt-5.4").map(|p| p.cache_read);
        assert!(
            cached.is_some_and(|c| (c - 0.25).abs() < 1e-12),
            "{cached:?}"
        );
    }

    #[test]
    fn gpt_5_point_releases_are_priced_by_their_own_rows_not_by_gpt_5() {
        let t = Pricing::default();
        for (name, want) in [
            ("gpt-5.1", price(1.25, 10.0)),
            ("gpt-5.1-2025-11-13", price(1.25, 10.0)),
            ("gpt-5.1-codex", price(1.25, 10.0)),
            ("gpt-5.1-codex-max", price(1.25, 10.0)),
            ("gpt-5.1-codex-mini", price(0.25, 2.0)),
            ("openai/gpt-5.1-codex-mini", price(0.25, 2.0)),
            ("gpt-5.2", price(1.75, 14.0)),
            ("gpt-5.2-2025-12-11", price(1.75, 14.0)),
            ("gpt-5.2-codex", price(1.75, 14.0)),
            ("gpt-5.2-pro", price(21.0, 168.0)),
            ("gpt-5.2-pro-2025-12-11", price(21.0, 168.0)),
            // `.` is no boundary: a later point release is none of these, nor gpt-5.
            ("gpt-5.10", None),
            ("gpt-5.1x", None),
            ("gpt-5.3", None),
            // Siblings OpenAI does not sell are not their family's price.
            ("gpt-5.1-mini", None),
            ("gpt-5.1-nano", None),
            ("gpt-5.1-pro", None),
            ("gpt-5.2-mini", None),
            ("gpt-5.2-nano", None),
        ] {
            assert_eq!(look(&t, name), want, "{name}");
        }
        // Cached input: a tenth (gpt-5.1 $0.125, gpt-5.2 $0.175, gpt-5.1-codex-mini $0.025);
        // none on gpt-5.2-pro.
        let cached = |name: &str| t.lookup(name).map(|p| p.cache_read);
        for (name, want) in [
            ("gpt-5.1", 0.125),
            ("gpt-5.1-codex", 0.125),
            ("gpt-5.1-codex-mini", 0.025),
            ("gpt-5.2", 0.175),
            ("gpt-5.2-pro", 21.0),
        ] {
            let got = cached(name).expect("priced");
            assert!((got - want).abs() < 1e-12, "{name}: {got} != {want}");
        }
        // A price given for gpt-5 is not gpt-5.1's, and one given for a later point release
        // prices that release (and its variants), not gpt-5.1.
        let own = Pricing::with(&[
            ModelPrice {
                model: "gpt-5".into(),
                input_per_million: "9".into(),
                output_per_million: "9".into(),
                ..ModelPrice::default()
            },
            ModelPrice {
                model: "gpt-5.10".into(),
                input_per_million: "3".into(),
                output_per_million: "30".into(),
                ..ModelPrice::default()
            },
        ])
        .expect("valid");
        assert_eq!(look(&own, "gpt-5-2025-08-07"), price(9.0, 9.0));
        assert_eq!(look(&own, "gpt-5.1"), price(1.25, 10.0));
        assert_eq!(look(&own, "gpt-5.10-codex"), price(3.0, 30.0));
        assert_eq!(look(&own, "gpt-5.1-codex"), price(1.25, 10.0));
    }

    #[test]
    fn fast_variants_are_priced_by_their_own_rows_not_by_their_base() {
        let t = Pricing::default();
        for (name, want) in [
            ("grok-3-fast", price(5.0, 25.0)),
            ("grok-3-fast-latest", price(5.0, 25.0)),
            ("grok-3-mini-fast", price(0.60, 4.0)),
            ("grok-3-mini-fast-latest", price(0.60, 4.0)),
            ("grok-3-latest", price(3.0, 15.0)),
            ("grok-4-fast-reasoning", price(0.20, 0.50)),
            ("grok-4-1-fast-non-reasoning", price(0.20, 0.50)),
            ("imagen-4.0-fast-generate-001", price(0.0, 0.0)),
            // A fast variant the table does not know is not its base's price.
            ("grok-4-0709-fast", None),
            ("grok-3-mini-beta-fast", None),
        ] {
            assert_eq!(look(&t, name), want, "{name}");
        }
        // xAI's cached input, a quarter: $1.25 and $0.15.
        close(
            cost(
                t.lookup("grok-3-fast"),
                None,
                &Tokens {
                    cache_read: 1_000_000,
                    ..Tokens::plain(Some(1_000_000), Some(0))
                },
            ),
            1.25,
        );
        let mini = t.lookup("grok-3-mini-fast").expect("priced");
        assert!(
            (mini.cache_read - 0.15).abs() < 1e-12,
            "{}",
            mini.cache_read
        );
        // Imagen's fast model keeps its own per-image price.
        assert_eq!(
            t.lookup("imagen-4.0-fast-generate-001")
                .map(|p| p.per_image),
            Some(0.02)
        );
    }

    #[test]
    fn speech_is_priced_by_its_text_in_and_audio_out_when_the_answer_reports_them() {
        let t = Pricing::default();
        let tts = t.lookup("gpt-4o-mini-tts-2025-12-15");
        assert_eq!(look(&t, "gpt-4o-mini-tts"), price(0.60, 12.0));
        // A speech request streamed as SSE ends with `speech.audio.done` and its usage: text
        // tokens in, audio tokens out.
        let mut sse = crate::usage::Usage::for_answer("openai", "audio/speech");
        sse.observe(br#"data: {"type":"speech.audio.delta","audio":"SUQzBAAAAAAA"}"#);
        sse.observe(b"\n\n");
        sse.observe(
            br#"data: {"type":"speech.audio.done","usage":{"input_tokens":14,"output_tokens":1010,"total_tokens":1024}}"#,
        );
        let tokens = sse.tokens();
        assert_eq!((tokens.input, tokens.output), (Some(14), Some(1010)));
        close(
            cost(tts, None, &tokens),
            (14.0 * 0.60 + 1010.0 * 12.0) / 1e6,
        );
        // The audio file itself (the default answer) reports nothing: no cost, not a zero one.
        let mut file = crate::usage::Usage::for_answer("openai", "audio/speech");
        file.observe(b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x00");
        assert_eq!(cost(tts, None, &file.tokens()), None);
    }

    #[test]
    fn percent_encoded_bedrock_arns_are_priced() {
        let t = Pricing::default();
        let path = "bedrock-runtime/us-east-1/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse";
        let model = model_in_path(path).expect("found");
        assert_eq!(look(&t, model), price(3.0, 15.0));
        assert_eq!(
            look(&t, "anthropic.claude-3-haiku-20240307-v1%3A0"),
            price(0.25, 1.25)
        );
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }
}
