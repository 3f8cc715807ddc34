//! The ProviderKey controller: reports whether each key's Secret and key exist (`SecretFound`)
//! and whether the key can be served (`Ready`; not when another ProviderKey with the same
//! provider and alias comes first). Rendering is the AIGateway controller's job.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::ProviderKey;

use crate::controller::{Context, Error};
use crate::render::{FIELD_MANAGER, is_usable, resolve_key};
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
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let secret = read_secret(&secrets, &ns, &key.spec.secret_ref.name).await?;
    let resolved = resolve_key(key, secret.as_ref()).map(|_| ());
    let url_problem = key
        .spec
        .base_url
        .as_deref()
        .and_then(|url| validate::upstream_url(url, &ns, validate::allows_insecure(key)).err());
    let shadowed_by = if resolved.is_ok() && url_problem.is_none() {
        shadowed_by(ctx, key, &ns).await?
    } else {
        None
    };
    let now = Time(Timestamp::now());
    let new_status = status::provider_key_status(
        key.status.as_ref(),
        status::KeyObservation {
            generation: key.metadata.generation,
            resolved: resolved.as_ref().map(|_| ()),
            base_url_problem: url_problem.as_deref(),
            shadowed_by: shadowed_by.as_deref(),
        },
        (&key.spec.provider, &key.spec.alias),
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

/// The ProviderKey that a gateway selecting both would serve instead of `key`: the first by
/// name of those in `ns` with the same provider and alias that would be rendered (render keeps
/// the first by name and reports the others as `DuplicateAlias`).
async fn shadowed_by(ctx: &Context, key: &ProviderKey, ns: &str) -> Result<Option<String>, Error> {
    let name = key.name_any();
    let all = Api::<ProviderKey>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Kube {
            action: format!("listing ProviderKeys in {ns}"),
            source,
        })?;
    let mut earlier: Vec<ProviderKey> = all
        .items
        .into_iter()
        .filter(|o| same_alias(o, key) && o.name_any() < name)
        .collect();
    earlier.sort_by_key(ResourceExt::name_any);
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    for other in earlier {
        let secret = read_secret(&secrets, ns, &other.spec.secret_ref.name).await?;
        if is_usable(&other, ns, secret.as_ref()) {
            return Ok(Some(other.name_any()));
        }
    }
    Ok(None)
}

fn same_alias(a: &ProviderKey, b: &ProviderKey) -> bool {
    a.namespace() == b.namespace()
        && a.spec.provider == b.spec.provider
        && a.spec.alias == b.spec.alias
}

/// The other ProviderKeys with the same provider and alias as `key`, whose `DuplicateAlias`
/// state changes with it.
pub fn keys_with_same_alias(
    key: &ProviderKey,
    keys: &[Arc<ProviderKey>],
) -> Vec<ObjectRef<ProviderKey>> {
    keys.iter()
        .filter(|k| same_alias(k, key) && k.name_any() != key.name_any())
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
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
    let same_alias_keys = keys.clone();
    controller
        .watches(
            Api::<ProviderKey>::all(client.clone()),
            watcher::Config::default(),
            move |key| keys_with_same_alias(&key, &same_alias_keys.state()),
        )
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

/// The Secret a ProviderKey names, if it exists.
async fn read_secret(api: &Api<Secret>, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Kube {
        action: format!("reading Secret {ns}/{name}"),
        source,
    })
}
