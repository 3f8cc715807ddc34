//! sidegate sidecar: a local AI gateway that speaks the Cloudflare AI Gateway contract.
//!
//! - [`route`]: URL shapes → provider routes.
//! - [`providers`]: the providers of SPEC.md: upstream URLs and where keys go.
//! - [`keys`]: provider keys and gateway tokens from the keys directory.
//! - [`config`]: `gateway.yaml` + keys → a validated [`config::Snapshot`].
//! - [`proxy`]: the request pipeline.
//! - [`compat`]: the unified OpenAI-compatible endpoint, translating to each provider's API.
//! - [`upstream`]: the client to the providers and their response bodies.
//! - [`universal`]: the universal endpoint (steps tried in order), over HTTP and WebSocket.
//! - [`websocket`]: WebSocket sessions (the providers' realtime APIs) passed through, and the
//!   framing of the sessions the gateway serves itself.
//! - [`headers`]: what crosses from client to upstream and back.
//! - [`body`]: streamed response bodies and their completion records.
//! - [`buffers`]: the process-wide budget of bytes held in buffered bodies.
//! - [`error`]: gateway-made errors in the SPEC.md envelope.
//! - [`cost`], [`budget`]: request cost from model prices; spend limits and token budgets.
//! - [`background`]: background Responses, counted once with the poll that finds them done.
//! - [`log_id`]: request ids (`cf-aig-log-id`).
//! - [`otel`]: OpenTelemetry export, one GenAI span per request (OTLP/HTTP JSON).
//! - [`reload`]: live reload on file changes.
//! - [`server`], [`admin`], [`telemetry`], [`access_log`]: listeners, health, metrics, request log.

pub mod access_log;
pub mod admin;
pub mod background;
pub mod body;
pub mod budget;
pub mod buffers;
pub mod cache;
pub mod chunked;
pub mod compat;
pub mod config;
pub mod cost;
pub mod dlp;
pub mod error;
pub mod google_auth;
pub mod guardrails;
pub mod headers;
pub mod keys;
pub mod log_id;
pub mod multipart;
pub mod otel;
pub mod providers;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod route;
pub mod routing;
pub mod server;
pub mod shared;
pub mod telemetry;
pub mod text;
pub mod universal;
pub mod upstream;
pub mod usage;
pub mod websocket;
