//! sidegate API types.
//!
//! - [`policy`]: the gateway features of SPEC.md (auth, cache, rate limits, retries, routes, DLP, ...),
//!   shared by the `AIGateway` resource and the rendered sidecar config.
//! - [`config`]: `gateway.yaml`, the file the operator renders and the sidecar reads.
//! - [`units`]: duration (`30s`) and size (`64Mi`) strings used in both.
//! - [`provider`]: the provider ids of SPEC.md.
//! - [`routes`]: dynamic routes and fallback chains, compiled and checked.
//! - [`validation`]: the checks of a policy beyond its schema, made by operator and sidecar alike.
//! - `api` (feature `kube`): the `AIGateway` and `ProviderKey` custom resources.

#[cfg(feature = "kube")]
pub mod api;
pub mod config;
pub mod policy;
pub mod provider;
pub mod routes;
pub mod units;
pub mod validation;

pub use config::{GatewayConfig, GatewayIdentity, SCHEMA_VERSION};
pub use policy::GatewayPolicy;
pub use units::{ByteSize, Duration};
