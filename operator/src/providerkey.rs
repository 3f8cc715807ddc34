//! The ProviderKey controller: reports whether each key's Secret and key exist (`SecretFound`)
//! and whether the key can be served (`Ready`). Rendering is the AIGateway controller's job.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::ProviderKey;

use crate::controller::{Context, Error};
use crate::render::{FIELD_MANAGER, resolve_key};
use crate::status;
use crate::validate;

/// Name of this controller in metrics.
pub const CONTROLLER: &str = "providerkey";

/// Reconciles one ProviderKey's status.
pub async fn reconcile(key: Arc<ProviderKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile(CONTROLLER);
    let result = reconcile_inner(&key, &ctx).await;
    timer.finish(result.is_ok());
    result
}

async fn reconcile_inner(key: &ProviderKey, ctx: &Context) -> Result<Action, Error> {
    let (Some(ns), name) = (key.namespace(), key.name_any()) else {
        return Ok(Action::await_change());
    };
    let secret_name = &key.spec.secret_ref.name;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(secret_name)
        .await
        .map_err(|source| Error::Kube {
            action: format!("reading Secret {ns}/{secret_name}"),
            source,
        })?;
    let resolved = resolve_key(key, secret.as_ref()).map(|_| ());
    let url_problem = key
        .spec
        .base_url
        .as_deref()
        .and_then(|url| validate::upstream_url(url, &ns, validate::allows_insecure(key)).err());
    let now = Time(Timestamp::now());
    let new_status = status::provider_key_status(
        key.status.as_ref(),
        key.metadata.generation,
        resolved.as_ref().map(|_| ()),
        url_problem.as_deref(),
        &now,
    );
    if status::status_changed(key.status.as_ref(), &new_status) {
        let patch = json!({
            "apiVersion": "sidegate.dev/v1alpha1",
            "kind": "ProviderKey",
            "status": new_status,
        });
        Api::<ProviderKey>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::Kube {
                action: format!("updating status of ProviderKey {ns}/{name}"),
                source,
            })?;
        ctx.metrics.write(CONTROLLER, "status");
    }
    Ok(Action::requeue(ctx.resync))
}

/// Retries a failed ProviderKey reconcile after a short delay.
pub fn error_policy(key: Arc<ProviderKey>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.kind());
    tracing::warn!(provider_key = %key.name_any(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// ProviderKeys in the Secret's namespace that reference it.
pub fn keys_for_secret(
    ns: &str,
    name: &str,
    keys: &[Arc<ProviderKey>],
) -> Vec<ObjectRef<ProviderKey>> {
    keys.iter()
        .filter(|k| k.namespace().as_deref() == Some(ns) && k.spec.secret_ref.name == name)
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// Runs the ProviderKey controller until shutdown.
pub async fn run(client: Client, ctx: Arc<Context>, concurrency: u16) {
    let controller = Controller::new(
        Api::<ProviderKey>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let keys: Store<ProviderKey> = controller.store();
    controller
        .watches(
            Api::<PartialObjectMeta<Secret>>::all(client),
            watcher::Config::default(),
            move |secret| match secret.namespace() {
                Some(ns) => keys_for_secret(&ns, &secret.name_any(), &keys.state()),
                None => Vec::new(),
            },
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "providerkey reconcile failed");
            }
        })
        .await;
}
