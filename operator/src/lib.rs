//! sidegate-operator: turns `AIGateway` and `ProviderKey` resources into a ConfigMap and a Secret
//! per gateway.
//!
//! - [`crd`]: the CustomResourceDefinitions generated from the API types.
//! - [`render`]: pure rendering of a gateway, its keys and Secrets into the owned objects.
//! - [`validate`]: spec checks the CRD schema cannot express (URL policy, route graphs).
//! - [`resources`]: the sidecar container's resources, checked as the apiserver checks them.
//! - [`status`]: conditions, status comparison and transition Events of both resources.
//! - [`events`]: the Event recorder (a series only for an Event of the same text).
//! - [`controller`]: the AIGateway reconciler (`Context`, `reconcile`, `error_policy`).
//! - [`providerkey`]: the ProviderKey status reconciler.
//! - [`pods`]: pods that name a gateway but run without its sidecar, or an outdated one.
//! - [`lease`]: leader election with a coordination.k8s.io Lease.
//! - [`owner`]: the operator's Deployment as owner of its Lease and certificate Secret.
//! - [`revision`]: the revision of the operator's Deployment a replica runs.
//! - [`scope`]: the namespaces served: the whole cluster, or those `--watch-namespace` names.
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics`; [`metrics`]: the Prometheus registry.
//! - [`listener`]: connection limits and timeouts shared by the admin and webhook listeners.
//! - [`webhook`]: the sidecar injection admission webhook and its certificates.
//! - [`shutdown`]: SIGTERM handling: unready at once, the webhook drains, then exit.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod events;
pub mod lease;
pub mod listener;
pub mod metrics;
pub mod owner;
pub mod pods;
pub mod providerkey;
pub mod render;
pub mod resources;
pub mod revision;
pub mod scope;
pub mod shutdown;
pub mod status;
pub mod validate;
pub mod webhook;

/// Errors of the operator library outside reconciles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A YAML serialization failed.
    #[error("YAML serialization failed: {0}")]
    Yaml(String),
}
