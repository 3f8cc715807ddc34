//! The ProviderKey controller: reports whether each key's Secret and key exist (`SecretFound`)
//! and whether the key can be served (`Ready`; not when an older ProviderKey has the same
//! provider and alias), with Events on their transitions and the AIGateway controller's
//! backoff on failures. Rendering is the AIGateway controller's job.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::predicates;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};

use crate::controller::{Context, Error, publish_events};
use crate::render::{FIELD_MANAGER, claim_order, claim_problem, resolve_key, selects};
use crate::scope::Scope;
use crate::status;
use crate::validate;

/// Name of this controller in metrics.
pub const CONTROLLER: &str = "providerkey";

/// Reconciles one ProviderKey's status.
pub async fn reconcile(key: Arc<ProviderKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile(CONTROLLER);
    let result = reconcile_inner(&key, &ctx).await;
    timer.finish(result.is_ok());
    if result.is_ok() {
        ctx.key_failures.clear(&key);
    }
    result
}

async fn reconcile_inner(key: &ProviderKey, ctx: &Context) -> Result<Action, Error> {
    let (Some(ns), name) = (key.namespace(), key.name_any()) else {
        return Ok(Action::await_change());
    };
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let secret = read_secret(&secrets, &ns, &key.spec.secret_ref.name).await?;
    let resolved = resolve_key(key, secret.as_ref()).map(|_| ());
    let url_problem = validate::provider_key_base_url(key, &ns);
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
        let transitions = status::provider_key_transitions(key.status.as_ref(), &new_status);
        publish_events(ctx, CONTROLLER, key, transitions).await;
    }
    Ok(Action::requeue(ctx.resync))
}

/// The ProviderKey that a gateway selecting both would serve instead of `key`, listed from `ns`
/// with the gateways there ([`older_claim`]).
async fn shadowed_by(ctx: &Context, key: &ProviderKey, ns: &str) -> Result<Option<String>, Error> {
    let listing = |what: &str| {
        let action = format!("listing {what} in {ns}");
        move |source| Error::Kube { action, source }
    };
    let all = Api::<ProviderKey>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(listing("ProviderKeys"))?;
    let gateways = Api::<AIGateway>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(listing("AIGateways"))?;
    Ok(older_claim(key, &all.items, &gateways.items, ns).map(ResourceExt::name_any))
}

/// The oldest of `others` (by [`claim_order`]) that claims the provider and alias of `key` and is
/// older than it, where a gateway would serve that one instead of `key`: render keeps the older
/// one and reports `key` as `DuplicateAlias`, whether or not the older one's key resolves (a
/// newcomer never takes an alias, not even while the Secret of the one holding it is missing).
/// Only claims some gateway of `gateways` selects with `key` count — gateways selecting
/// different keys by label each serve their own — unless none selects `key` (then any gateway
/// that came to select both would).
pub fn older_claim<'a>(
    key: &ProviderKey,
    others: &'a [ProviderKey],
    gateways: &[AIGateway],
    ns: &str,
) -> Option<&'a ProviderKey> {
    let selecting: Vec<&AIGateway> = gateways
        .iter()
        .filter(|g| selects(g.spec.provider_key_selector.as_ref(), key))
        .collect();
    let meet = |o: &ProviderKey| {
        selecting.is_empty()
            || selecting
                .iter()
                .any(|g| selects(g.spec.provider_key_selector.as_ref(), o))
    };
    others
        .iter()
        .filter(|o| {
            same_alias(o, key)
                && claim_order(o) < claim_order(key)
                && claim_problem(o, ns).is_none()
                && meet(o)
        })
        .min_by_key(|o| claim_order(o))
}

fn same_alias(a: &ProviderKey, b: &ProviderKey) -> bool {
    a.namespace() == b.namespace()
        && a.spec.provider == b.spec.provider
        && a.spec.alias == b.spec.alias
}

/// The other ProviderKeys whose `DuplicateAlias` state may change with `key`: those of its
/// namespace with its provider, and those shadowed now (by this key, perhaps, before it moved to
/// another provider or alias: the watch shows only its new claim).
pub fn keys_with_same_alias(
    key: &ProviderKey,
    keys: &[Arc<ProviderKey>],
) -> Vec<ObjectRef<ProviderKey>> {
    keys.iter()
        .filter(|k| {
            k.namespace() == key.namespace()
                && k.name_any() != key.name_any()
                && (k.spec.provider == key.spec.provider || is_shadowed(k))
        })
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// Whether a key's status says it is not served for an older claim on its alias.
fn is_shadowed(key: &ProviderKey) -> bool {
    key.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "DuplicateAlias")
    })
}

/// The ProviderKeys of a gateway's namespace, whose `DuplicateAlias` state depends on which
/// keys the gateways there select.
pub fn keys_of_gateway_namespace(
    gateway: &AIGateway,
    keys: &[Arc<ProviderKey>],
) -> Vec<ObjectRef<ProviderKey>> {
    keys.iter()
        .filter(|k| k.namespace() == gateway.namespace())
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// Retries a failed ProviderKey reconcile with the AIGateway controller's backoff, per key:
/// 1s, 2s, 4s, ... up to 5 min.
pub fn error_policy(key: Arc<ProviderKey>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.kind());
    let delay = ctx.key_failures.next_retry(&key);
    tracing::warn!(provider_key = %key.name_any(), namespace = ?key.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
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

/// Runs the ProviderKey controllers of `scope` (one per watched namespace, or one for the
/// whole cluster) until shutdown.
pub async fn run(client: Client, ctx: Arc<Context>, concurrency: u16, scope: &Scope) {
    scope
        .run_each(|ns| run_one(client.clone(), ctx.clone(), concurrency, ns))
        .await;
}

async fn run_one(client: Client, ctx: Arc<Context>, concurrency: u16, ns: Option<&str>) {
    let controller = Controller::new(
        Scope::api::<ProviderKey>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let keys: Store<ProviderKey> = controller.store();
    let watched = ns.map(str::to_owned);
    let same_alias_keys = keys.clone();
    let gateway_keys = keys.clone();
    let sweep = ctx.clone();
    controller
        .watches(
            Scope::api::<ProviderKey>(&client, ns),
            watcher::Config::default(),
            move |key| keys_with_same_alias(&key, &same_alias_keys.state()),
        )
        .watches_stream(
            // Which keys a gateway selects changes with its spec (not its status updates).
            watcher(
                Scope::api::<AIGateway>(&client, ns),
                watcher::Config::default(),
            )
            .applied_objects()
            .predicate_filter(predicates::generation, PredicateConfig::default()),
            move |gateway| keys_of_gateway_namespace(&gateway, &gateway_keys.state()),
        )
        .watches(
            Scope::api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret| {
                // Failure counts of deleted keys would stay forever; Secrets change often enough
                // to sweep here (before the first list an empty store only resets backoffs).
                // Only this controller's namespace: the others' keys are in their stores.
                sweep.key_failures.retain(|k| {
                    (watched.is_some() && k.namespace != watched) || keys.get(k).is_some()
                });
                match secret.namespace() {
                    Some(ns) => keys_for_secret(&ns, &secret.name_any(), &keys.state()),
                    None => Vec::new(),
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use sidegate_crds::api::{ProviderKeySecretRef, ProviderKeySpec};

    fn key(name: &str, alias: &str, created: i64) -> ProviderKey {
        let mut pk = ProviderKey::new(
            name,
            ProviderKeySpec {
                provider: "openai".into(),
                alias: alias.into(),
                secret_ref: ProviderKeySecretRef {
                    name: "s".into(),
                    key: Some("k".into()),
                },
                base_url: None,
                region: None,
            },
        );
        pk.metadata.namespace = Some("team-a".into());
        pk.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(created).expect("valid time")));
        pk
    }

    fn shadow<'a>(key: &ProviderKey, all: &'a [ProviderKey]) -> Option<&'a str> {
        older_claim(key, all, &[], "team-a").map(|k| k.metadata.name.as_deref().unwrap_or_default())
    }

    #[test]
    fn an_older_claim_shadows_a_key_only_where_a_gateway_would_serve_both() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        use sidegate_crds::api::AIGatewaySpec;
        let team = |name: &str, team: &str, created| {
            let mut k = key(name, "default", created);
            k.metadata.labels = Some([("team".to_owned(), team.to_owned())].into());
            k
        };
        let gateway = |team: Option<&str>| {
            let selector = team.map(|t| LabelSelector {
                match_labels: Some([("team".to_owned(), t.to_owned())].into()),
                ..LabelSelector::default()
            });
            AIGateway::new(
                "gw",
                AIGatewaySpec {
                    provider_key_selector: selector,
                    ..AIGatewaySpec::default()
                },
            )
        };
        let (a, b) = (team("pk-a", "a", 1), team("pk-b", "b", 2));
        let all = [a.clone(), b.clone()];
        let older = |gateways: &[AIGateway]| {
            older_claim(&b, &all, gateways, "team-a").map(ResourceExt::name_any)
        };
        // Gateways selecting different keys by label: each serves its own.
        assert_eq!(older(&[gateway(Some("a")), gateway(Some("b"))]), None);
        // One selecting both serves the older; so would any, while none selects the newer.
        assert_eq!(older(&[gateway(None)]).as_deref(), Some("pk-a"));
        assert_eq!(
            older(&[gateway(Some("b")), gateway(None)]).as_deref(),
            Some("pk-a")
        );
        assert_eq!(older(&[]).as_deref(), Some("pk-a"));
        assert_eq!(older(&[gateway(Some("a"))]).as_deref(), Some("pk-a"));
        // A key shadowed now is triggered by any change of its namespace's keys (the one that
        // shadowed it may have moved to another alias or provider).
        let mut shadowed = Arc::new(b.clone());
        Arc::make_mut(&mut shadowed).status = Some(sidegate_crds::api::ProviderKeyStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "DuplicateAlias".into(),
                message: String::new(),
                last_transition_time: Time(Timestamp::from_second(3).expect("valid time")),
                observed_generation: None,
            }],
            ..Default::default()
        });
        let mut moved = a.clone();
        moved.spec.provider = "anthropic".into();
        let triggered = keys_with_same_alias(&moved, &[Arc::new(a), shadowed]);
        assert_eq!(triggered, [ObjectRef::from_obj(&b)]);
    }

    #[tokio::test]
    async fn failed_reconciles_are_retried_with_the_gateway_backoff_per_key() {
        // A client that never connects: the error policy does not call the apiserver.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let ctx = Arc::new(Context::new(client, Arc::default(), None));
        let failure = || Error::NotOwned {
            kind: "Secret",
            namespace: "team-a".into(),
            name: "x".into(),
        };
        let (a, b) = (
            Arc::new(key("openai-a", "default", 1)),
            Arc::new(key("openai-b", "default", 2)),
        );
        let retry = |k: &Arc<ProviderKey>| error_policy(k.clone(), &failure(), ctx.clone());
        assert_eq!(retry(&a), Action::requeue(crate::controller::backoff(1)));
        assert_eq!(retry(&a), Action::requeue(crate::controller::backoff(2)));
        assert_eq!(
            retry(&a),
            Action::requeue(std::time::Duration::from_secs(4))
        );
        assert_eq!(
            retry(&b),
            Action::requeue(std::time::Duration::from_secs(1))
        );
        // A successful reconcile starts over.
        ctx.key_failures.clear(&a);
        assert_eq!(
            retry(&a),
            Action::requeue(std::time::Duration::from_secs(1))
        );
        for _ in 0..20 {
            retry(&b);
        }
        assert_eq!(
            retry(&b),
            Action::requeue(std::time::Duration::from_secs(300))
        );
    }

    #[test]
    fn an_alias_belongs_to_the_oldest_provider_key_then_the_first_by_name() {
        let all = [
            key("openai-main", "default", 100),
            key("00-evil-default", "default", 200),
            key("team-b", "team-b", 50),
            key("openai-twin", "default", 100),
        ];
        assert_eq!(shadow(&all[0], &all), None, "the oldest keeps its alias");
        assert_eq!(shadow(&all[1], &all), Some("openai-main"));
        assert_eq!(shadow(&all[2], &all), None, "another alias");
        assert_eq!(
            shadow(&all[3], &all),
            Some("openai-main"),
            "as old: by name"
        );

        // A ProviderKey that claims nothing (here an invalid baseURL) shadows nothing.
        let mut invalid = key("aaa", "default", 10);
        invalid.spec.base_url = Some("http://169.254.169.254/latest".into());
        let all = [invalid, key("openai-main", "default", 100)];
        assert_eq!(shadow(&all[1], &all), None);
    }
}
