//! The AIGateway controller: for each gateway, select its ProviderKeys, read their Secrets,
//! render ConfigMap `sidegate-<gw>` and Secret `sidegate-<gw>-keys`, apply them when they differ,
//! and report status and Events. Shape of kube-rs/controller-rs: one [`Context`], free functions
//! [`reconcile`] and [`error_policy`], the watch wiring in [`controller`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderAliases, ProviderKey};

use crate::metrics::{GatewayHealth, Metrics};
use crate::pods;
use crate::render::{self, FIELD_MANAGER};
use crate::scope::Scope;
use crate::status::{self, GatewayObservation, RenderSummary};
use crate::validate;
use crate::webhook::images::AllowedImages;
use crate::webhook::inject::{DEFAULT_SIDECAR_IMAGE, InjectConfig, InjectedWith};

/// Name of this controller in metrics and Events.
pub const CONTROLLER: &str = "aigateway";

/// Errors of one reconcile; all are retried by [`error_policy`]. Never holds key values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An apiserver request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Rendering failed for a reason the spec cannot fix.
    #[error(transparent)]
    Render(#[from] render::RenderError),
    /// An object with the name of a rendered one exists and was not made by the operator for
    /// this gateway; a forced apply would take it over (and deleting the gateway delete it).
    #[error(
        "{kind} {namespace}/{name} exists and was not made by {FIELD_MANAGER} for this AIGateway (it lacks the {managed_by}={FIELD_MANAGER} and {gateway_label} labels or is controlled by another object); the operator does not take it over: delete or rename it",
        managed_by = render::MANAGED_BY_LABEL,
        gateway_label = render::GATEWAY_LABEL
    )]
    NotOwned {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Error {
    fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }

    /// Short kind for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::Render(_) => "render",
            Self::NotOwned { .. } => "not-owned",
        }
    }

    /// The condition reason and message of an error that kept the rendered objects from being
    /// written (the message has no key values: the apiserver's messages name fields, not data).
    pub fn failure(&self) -> status::Failure {
        let (reason, message) = match self {
            Self::Kube {
                action,
                source: kube::Error::Api(s),
            } => (
                "ApplyFailed",
                format!("{action}: {} ({})", s.message, s.reason),
            ),
            Self::Kube { .. } => ("ApplyFailed", self.to_string()),
            Self::Render(_) => ("RenderFailed", self.to_string()),
            Self::NotOwned { .. } => ("ObjectNotOwned", self.to_string()),
        };
        status::Failure { reason, message }
    }
}

/// What each gateway read at its last reconcile, so that changes to those objects trigger it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dependencies {
    /// ProviderKeys it rendered (or tried to).
    pub provider_keys: BTreeSet<String>,
    /// Secrets it read (or found missing).
    pub secrets: BTreeSet<String>,
}

/// Dependencies of every gateway, by gateway.
pub type DependencyIndex = Mutex<HashMap<ObjectRef<AIGateway>, Dependencies>>;

/// Consecutive failed reconciles per object, for the backoff of the controllers' error policies.
pub struct Failures<K: Resource>(Mutex<HashMap<ObjectRef<K>, u32>>)
where
    K::DynamicType: Eq + Hash;

impl<K: Resource> Default for Failures<K>
where
    K::DynamicType: Eq + Hash,
{
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<K: Resource<DynamicType = ()>> Failures<K> {
    /// Counts a failed reconcile of `obj` and returns the delay before its retry ([`backoff`]).
    pub fn next_retry(&self, obj: &K) -> Duration {
        let mut failures = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = failures.entry(ObjectRef::from_obj(obj)).or_insert(0);
        *n = n.saturating_add(1);
        backoff(*n)
    }

    /// Forgets the failures of `obj`, which reconciled.
    pub fn clear(&self, obj: &K) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ObjectRef::from_obj(obj));
    }

    /// Keeps the counts of the objects that `exists` says still exist.
    pub fn retain(&self, exists: impl Fn(&ObjectRef<K>) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|obj, _| exists(obj));
    }

    /// The objects with a count (failing since their last successful reconcile).
    pub fn failing(&self) -> Vec<ObjectRef<K>> {
        let failures = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        failures.keys().cloned().collect()
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder (each different text its own Event: [`crate::events`]).
    pub recorder: crate::events::Recorder,
    /// What each gateway depends on.
    pub deps: Arc<DependencyIndex>,
    /// Consecutive failures per gateway, for backoff.
    pub failures: Failures<AIGateway>,
    /// Consecutive failures per ProviderKey, for backoff.
    pub key_failures: Failures<ProviderKey>,
    /// Requeue period of a healthy gateway (catches anything a watch missed).
    pub resync: Duration,
    /// Sidecar images the webhook injects, so a gateway naming another one says so in status.
    pub sidecar_images: AllowedImages,
    /// Namespaces the webhook never injects ([`crate::webhook::inject::excluded_namespaces`]):
    /// their pods are not counted as lacking the sidecar, since a restart would not bring it.
    pub excluded_namespaces: BTreeSet<String>,
    /// How the webhook injects (`--sidecar-image` and the other sidecar flags), so that pods
    /// injected otherwise are counted as outdated; `None`: not compared.
    pub injection: Option<InjectConfig>,
    /// The pods each running controller's pod watch caches, which the reconciles survey.
    pub pods: pods::PodCaches,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: crate::events::Recorder::new(client.clone(), reporter),
            client,
            metrics,
            deps: Arc::default(),
            failures: Failures::default(),
            key_failures: Failures::default(),
            resync: Duration::from_secs(300),
            sidecar_images: AllowedImages::repository_of(DEFAULT_SIDECAR_IMAGE),
            excluded_namespaces: BTreeSet::from(["kube-system".to_owned()]),
            injection: None,
            pods: pods::PodCaches::default(),
        }
    }
}

/// Reconciles one AIGateway.
pub async fn reconcile(gw: Arc<AIGateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile(CONTROLLER);
    let result = reconcile_inner(&gw, &ctx).await;
    timer.finish(result.is_ok());
    if result.is_ok() {
        ctx.failures.clear(&gw);
    }
    result
}

async fn reconcile_inner(gw: &AIGateway, ctx: &Context) -> Result<Action, Error> {
    let name = gw.name_any();
    let Some(ns) = gw.namespace() else {
        return Ok(Action::await_change());
    };
    let client = &ctx.client;

    // Select keys and read every Secret the gateway references (fresh reads, never a cache, so a
    // rotation seen by the watch is the one rendered).
    let all_keys = Api::<ProviderKey>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(Error::kube(format!("listing ProviderKeys in {ns}")))?;
    let selector = gw.spec.provider_key_selector.as_ref();
    let keys: Vec<ProviderKey> = all_keys
        .items
        .into_iter()
        .filter(|k| render::selects(selector, k))
        .collect();
    let secret_names = render::referenced_secrets(gw, &keys);
    let secrets_api = Api::<Secret>::namespaced(client.clone(), &ns);
    let mut secrets = BTreeMap::new();
    for secret_name in &secret_names {
        if let Some(s) = secrets_api
            .get_opt(secret_name)
            .await
            .map_err(Error::kube(format!("reading Secret {ns}/{secret_name}")))?
        {
            secrets.insert(secret_name.clone(), s);
        }
    }
    let mut dependencies = Dependencies {
        provider_keys: keys.iter().map(ResourceExt::name_any).collect(),
        secrets: secret_names.into_iter().collect(),
    };
    // A Secret of the rendered name that is not the operator's blocks rendering until it is
    // gone: its deletion should trigger a reconcile (the owned-object watch does not see it).
    dependencies.secrets.insert(render::keys_secret_name(&name));
    ctx.deps
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(ObjectRef::from_obj(gw), dependencies);

    let mut obs = GatewayObservation {
        generation: gw.metadata.generation,
        spec_problems: validate::gateway(gw),
        selected_keys: keys.len(),
        rendered: None,
        failure: None,
        sidecar_image_refused: refused_sidecar_image(gw, &ctx.sidecar_images),
        uninjected_pods: None,
        outdated_pods: None,
    };
    let injected_now = ctx
        .injection
        .as_ref()
        .and_then(|config| injected_now(gw, config));
    // Informational: a failure (e.g. RBAC without pods) keeps the last count, never the render.
    let surveyed = async {
        let cache = ctx.pods.covering(&ns)?;
        pods::survey(
            client,
            &cache,
            &ns,
            &name,
            injected_now.as_ref(),
            &ctx.excluded_namespaces,
        )
        .await
    };
    match surveyed.await {
        Ok(found) => {
            obs.uninjected_pods = Some(found.uninjected);
            obs.outdated_pods = found.outdated;
        }
        Err(e) => {
            tracing::warn!(gateway = %name, namespace = %ns, error = %e, "pods without the current sidecar not counted")
        }
    }
    let outcome = render_and_apply(ctx, gw, &ns, &mut obs.spec_problems, &keys, &secrets).await;
    match &outcome {
        Ok(rendered) => {
            obs.rendered = rendered.as_ref().map(|r| RenderSummary {
                hash: r.hash.clone(),
                key_count: u32::try_from(r.key_count()).unwrap_or(u32::MAX),
                provider_keys: r
                    .key_index
                    .iter()
                    .map(|(provider, aliases)| ProviderAliases {
                        provider: provider.clone(),
                        aliases: aliases.clone(),
                    })
                    .collect(),
                problems: r.problems.clone(),
                objects: (
                    render::config_map_name(&name),
                    render::keys_secret_name(&name),
                ),
            });
        }
        Err(e) => obs.failure = Some(e.failure()),
    }

    let now = Time(Timestamp::now());
    let new_status = status::gateway_status(gw.status.as_ref(), &obs, &now);
    ctx.metrics.gateway_observed(
        &ns,
        &name,
        gw.uid().as_deref(),
        GatewayHealth::of(&new_status),
    );
    if status::status_changed(gw.status.as_ref(), &new_status) {
        let api = Api::<AIGateway>::namespaced(client.clone(), &ns);
        let patch = json!({
            "apiVersion": "sidegate.dev/v1alpha1",
            "kind": "AIGateway",
            "status": new_status,
        });
        let written = api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(Error::kube(format!(
                "updating status of AIGateway {ns}/{name}"
            )));
        match written {
            Ok(_) => {
                ctx.metrics.write(CONTROLLER, "status");
                let mut transitions = status::gateway_transitions(gw.status.as_ref(), &new_status);
                transitions.extend(status::uninjected_pods_transition(
                    gw.status.as_ref(),
                    &obs,
                    &name,
                ));
                transitions.extend(status::outdated_pods_transition(
                    gw.status.as_ref(),
                    &obs,
                    &name,
                ));
                publish_events(ctx, CONTROLLER, gw, transitions).await;
            }
            // The render's error is the one to retry on (and to log).
            Err(e) if outcome.is_ok() => return Err(e),
            Err(e) => {
                tracing::warn!(gateway = %name, namespace = %ns, error = %e, "status not written")
            }
        }
    }
    // A failure is retried with backoff, its status written first.
    outcome?;
    Ok(Action::requeue(ctx.resync))
}

/// What the webhook injects into a new pod of `gw` under `config`; `None` when it injects
/// nothing (an image it refuses, resources the apiserver would refuse): restarting outdated
/// pods would not help then, the gateway's status says what to fix.
fn injected_now(gw: &AIGateway, config: &InjectConfig) -> Option<InjectedWith> {
    let sidecar = gw.spec.sidecar.clone().unwrap_or_default();
    if let Some(image) = sidecar.image.as_deref()
        && !config.allowed_images.allows(image)
    {
        return None;
    }
    if let Some(resources) = sidecar.resources.as_ref()
        && !crate::resources::problems(resources, "spec.sidecar.resources").is_empty()
    {
        return None;
    }
    Some(InjectedWith::new(config, &sidecar))
}

/// Why the webhook will not inject the sidecar image `gw` names, if it will not.
fn refused_sidecar_image(gw: &AIGateway, allowed: &AllowedImages) -> Option<String> {
    let image = gw.spec.sidecar.as_ref()?.image.as_deref()?;
    (!allowed.allows(image)).then(|| {
        format!(
            "spec.sidecar.image {image:?} is not an image this operator injects (allowed: {allowed}; operator flag --allowed-sidecar-images): pods naming this gateway are created without the sidecar"
        )
    })
}

/// Renders the gateway's objects and writes those that changed. With a valid spec that is the
/// whole config; with an invalid one the last rendered config stays and only its keys are
/// rendered again (a revoked key must not stay in the pods until the spec is fixed), or nothing
/// if the gateway was never rendered. A Redis URL that cannot be rendered nor kept is one more
/// spec problem ([`render::unrenderable_redis_url`]). Objects of the rendered names that the
/// operator did not make are left alone ([`Error::NotOwned`]).
async fn render_and_apply(
    ctx: &Context,
    gw: &AIGateway,
    ns: &str,
    spec_problems: &mut Vec<String>,
    keys: &[ProviderKey],
    secrets: &BTreeMap<String, Secret>,
) -> Result<Option<render::Rendered>, Error> {
    let name = gw.name_any();
    let cm_name = render::config_map_name(&name);
    let secret_name = render::keys_secret_name(&name);
    let current_cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(&cm_name)
        .await
        .map_err(Error::kube(format!("reading ConfigMap {ns}/{cm_name}")))?;
    let current_secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&secret_name)
        .await
        .map_err(Error::kube(format!("reading Secret {ns}/{secret_name}")))?;
    for (kind, object_name, meta) in [
        (
            "ConfigMap",
            &cm_name,
            current_cm.as_ref().map(|c| &c.metadata),
        ),
        (
            "Secret",
            &secret_name,
            current_secret.as_ref().map(|s| &s.metadata),
        ),
    ] {
        if let Some(meta) = meta
            && !render::is_managed_for(meta, gw)
        {
            return Err(Error::NotOwned {
                kind,
                namespace: ns.to_owned(),
                name: object_name.clone(),
            });
        }
    }
    spec_problems.extend(render::unrenderable_redis_url(
        gw,
        secrets,
        current_secret.as_ref(),
    ));
    // The salt of the Secret rendered last: a new one would change the hash of the same content.
    let salt = render::HashSalt::kept_or_new(current_secret.as_ref())?;
    let rendered = if spec_problems.is_empty() {
        render::render(gw, keys, secrets, current_secret.as_ref(), &salt)?
    } else {
        let Some(kept) = current_cm.as_ref().and_then(render::rendered_config) else {
            return Ok(None);
        };
        render::render_keys_only(gw, &kept, keys, secrets, current_secret.as_ref(), &salt)?
    };
    apply_if_changed(ctx, ns, &rendered, current_cm, current_secret).await?;
    Ok(Some(rendered))
}

/// Applies the rendered objects that differ from what the apiserver holds (`current_cm`,
/// `current_secret`; a steady state writes nothing).
async fn apply_if_changed(
    ctx: &Context,
    ns: &str,
    rendered: &render::Rendered,
    current_cm: Option<ConfigMap>,
    current_secret: Option<Secret>,
) -> Result<(), Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Keys first: the config may name keys (and tokens) that must be there when it loads.
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let secret_name = rendered.secret.name_any();
    if !current_secret.is_some_and(|c| render::secret_up_to_date(&c, &rendered.secret)) {
        secrets
            .patch(&secret_name, &params, &Patch::Apply(&rendered.secret))
            .await
            .map_err(Error::kube(format!("applying Secret {ns}/{secret_name}")))?;
        ctx.metrics.write(CONTROLLER, "secret");
    }
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let cm_name = rendered.config_map.name_any();
    if !current_cm.is_some_and(|c| render::config_map_up_to_date(&c, &rendered.config_map)) {
        // k8s-openapi writes apiVersion and kind, which server-side apply needs.
        cms.patch(&cm_name, &params, &Patch::Apply(&rendered.config_map))
            .await
            .map_err(Error::kube(format!("applying ConfigMap {ns}/{cm_name}")))?;
        ctx.metrics.write(CONTROLLER, "configmap");
    }
    Ok(())
}

/// Publishes the Events of status transitions of `obj` (an AIGateway or ProviderKey), for
/// `controller`'s metrics. Best effort: a failure is logged, the reconcile goes on.
pub async fn publish_events<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    controller: &'static str,
    obj: &K,
    transitions: Vec<status::Transition>,
) {
    let reference = obj.object_ref(&());
    for t in transitions {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason,
            note: Some(status::event_note(t.note)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        // Events are best effort: a failure must not fail (and retry) the reconcile.
        match ctx.recorder.publish(&event, &reference).await {
            Ok(()) => ctx.metrics.write(controller, "event"),
            Err(e) => {
                tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), namespace = ?obj.namespace(), error = %e, "event not published")
            }
        }
    }
}

/// Retries a failed reconcile with exponential backoff per gateway: 1s, 2s, 4s, ... up to 5 min.
pub fn error_policy(gw: Arc<AIGateway>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.kind());
    let delay = ctx.failures.next_retry(&gw);
    tracing::warn!(gateway = %gw.name_any(), namespace = ?gw.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `attempt` (1-based).
pub fn backoff(attempt: u32) -> Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Gateways in `ns` that may use ProviderKey `key`: those whose selector matches it now and
/// those that rendered it before (its labels may have changed so that it no longer matches).
pub fn gateways_for_key(
    key: &ProviderKey,
    gateways: &[Arc<AIGateway>],
    deps: &DependencyIndex,
) -> Vec<ObjectRef<AIGateway>> {
    let Some(ns) = key.namespace() else {
        return Vec::new();
    };
    let name = key.name_any();
    let deps = deps.lock().unwrap_or_else(PoisonError::into_inner);
    gateways
        .iter()
        .filter(|gw| gw.namespace().as_deref() == Some(ns.as_str()))
        .filter(|gw| {
            render::selects(gw.spec.provider_key_selector.as_ref(), key)
                || deps
                    .get(&ObjectRef::from_obj(gw.as_ref()))
                    .is_some_and(|d| d.provider_keys.contains(&name))
        })
        .map(|gw| ObjectRef::from_obj(gw.as_ref()))
        .collect()
}

/// Drops what is kept per gateway (dependencies, failure counts) for gateways that no longer
/// exist: a deleted gateway is not reconciled again, so nothing else removes its entries (with
/// gateways made and deleted per pull request they would pile up, and a Secret it read would
/// keep naming it).
pub fn forget_deleted(
    deps: &DependencyIndex,
    failures: &Failures<AIGateway>,
    exists: impl Fn(&ObjectRef<AIGateway>) -> bool,
) {
    deps.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|gw, _| exists(gw));
    failures.retain(exists);
}

/// Gateways that read Secret `name` in `ns` at their last reconcile.
pub fn gateways_for_secret(
    ns: &str,
    name: &str,
    deps: &DependencyIndex,
) -> Vec<ObjectRef<AIGateway>> {
    deps.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|(gw, d)| gw.namespace.as_deref() == Some(ns) && d.secrets.contains(name))
        .map(|(gw, _)| gw.clone())
        .collect()
}

/// Builds the AIGateway controller of namespace `ns` (`None`: every namespace): owned Secrets
/// (a metadata-only watch of the operator's labelled objects), ConfigMaps by the rendered
/// name, ProviderKeys, key Secrets and pods that may lack the sidecar mapped back to their
/// gateways; gateway deletions sweep the indexes and metrics.
/// The pod watch also fills the controller's pod cache, set in `ctx.pods` for the reconciles.
pub fn controller(client: Client, ctx: Arc<Context>, ns: Option<&str>) -> Controller<AIGateway> {
    let owned = watcher::Config::default().labels(&render::managed_selector());
    let controller = Controller::new(
        Scope::api::<AIGateway>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .owns(Scope::api::<PartialObjectMeta<Secret>>(&client, ns), owned);
    let gateways: Store<AIGateway> = controller.store();
    let deps = ctx.deps.clone();
    let store = gateways.clone();
    let controller = controller.watches(
        Scope::api::<ProviderKey>(&client, ns),
        watcher::Config::default(),
        move |key| gateways_for_key(&key, &store.state(), &deps),
    );
    // Pods, metadata only: those that may lack the sidecar trigger their gateway, and every
    // pod not ended is cached (stripped) for the surveys, so that a reconcile lists no pods.
    let (pod_cache, pod_events) = pods::watch(Scope::api::<PartialObjectMeta<Pod>>(&client, ns));
    ctx.pods.insert(ns, pod_cache);
    let controller =
        controller.watches_stream(pod_events, |pod| pods::gateway_for_pod(&pod.metadata));
    // A deleted gateway leaves the indexes and metrics at once: one that never rendered owns
    // nothing whose deletion would say so (the sweep below waits for a Secret to change).
    let swept = ctx.clone();
    let deleted = watcher(
        Scope::api::<PartialObjectMeta<AIGateway>>(&client, ns),
        watcher::Config::default(),
    )
    .try_filter_map(move |event| {
        if let watcher::Event::Delete(gw) = event
            && let Some(ns) = gw.namespace()
        {
            let gone = ObjectRef::<AIGateway>::new(&gw.name_any()).within(&ns);
            forget_deleted(&swept.deps, &swept.failures, |g| *g != gone);
            swept
                .metrics
                .gateway_deleted(&ns, &gone.name, gw.uid().as_deref());
        }
        std::future::ready(Ok(None::<PartialObjectMeta<AIGateway>>))
    });
    let controller = controller.watches_stream(deleted, |_| None);
    // ConfigMaps by the rendered name (`sidegate-<gateway>`): the operator's own, and a foreign
    // one, which blocks rendering until it is deleted — that should trigger its gateway at once
    // (a watch of the operator's labelled objects would not see it).
    let cm_gateways = gateways.clone();
    let controller = controller.watches(
        Scope::api::<PartialObjectMeta<ConfigMap>>(&client, ns),
        watcher::Config::default(),
        move |cm| {
            let gw = ObjectRef::<AIGateway>::new(cm.name_any().strip_prefix("sidegate-")?)
                .within(&cm.namespace()?);
            cm_gateways.get(&gw).is_some().then_some(gw)
        },
    );
    let watched = ns.map(str::to_owned);
    controller.watches(
        Scope::api::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
        move |secret| {
            // Secrets change often enough to sweep here; until the first list completes the
            // store is empty, and so is what there is to sweep. Only this controller's
            // namespace: the others' gateways are in their controllers' stores.
            let exists = |gw: &ObjectRef<AIGateway>| {
                (watched.is_some() && gw.namespace != watched) || gateways.get(gw).is_some()
            };
            forget_deleted(&ctx.deps, &ctx.failures, exists);
            ctx.metrics
                .retain_gateways(|ns, name| exists(&ObjectRef::new(name).within(ns)));
            match secret.namespace() {
                Some(ns) => gateways_for_secret(&ns, &secret.name_any(), &ctx.deps),
                None => Vec::new(),
            }
        },
    )
}

/// Runs the AIGateway controllers of `scope` (one per watched namespace, or one for the whole
/// cluster) until shutdown.
pub async fn run(client: Client, ctx: Arc<Context>, concurrency: u16, scope: &Scope) {
    scope
        .run_each(|ns| run_one(client.clone(), ctx.clone(), concurrency, ns))
        .await;
}

async fn run_one(client: Client, ctx: Arc<Context>, concurrency: u16, ns: Option<&str>) {
    // A short debounce folds the burst of triggers one change causes (the gateway, its keys,
    // its owned objects) into one reconcile.
    let config = kube::runtime::controller::Config::default()
        .concurrency(concurrency)
        .debounce(Duration::from_millis(200));
    controller(client, ctx.clone(), ns)
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(gateway = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_deleted_gateways_are_forgotten() {
        let gw = |name: &str| ObjectRef::<AIGateway>::new(name).within("team-a");
        let deps: DependencyIndex = Mutex::default();
        let failures = Failures::<AIGateway>::default();
        for name in ["kept", "deleted"] {
            let mut obj = AIGateway::new(name, Default::default());
            obj.metadata.namespace = Some("team-a".into());
            failures.next_retry(&obj);
        }
        for name in ["kept", "deleted"] {
            deps.lock().expect("deps").insert(
                gw(name),
                Dependencies {
                    provider_keys: BTreeSet::new(),
                    secrets: BTreeSet::from(["llm-keys".to_owned()]),
                },
            );
        }
        assert_eq!(gateways_for_secret("team-a", "llm-keys", &deps).len(), 2);
        forget_deleted(&deps, &failures, |r| r.name == "kept");
        assert_eq!(
            gateways_for_secret("team-a", "llm-keys", &deps),
            vec![gw("kept")]
        );
        assert_eq!(failures.failing(), vec![gw("kept")]);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
