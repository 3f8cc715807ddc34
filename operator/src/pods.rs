//! Pods that name a gateway but do not run the sidecar it would give them now.
//!
//! - Uninjected: the webhook admits a pod it cannot inject (its AIGateway does not exist yet,
//!   the webhook was down under `failurePolicy: Ignore`, ...) unchanged, so the app runs
//!   without the gateway.
//! - Outdated: the pod got the sidecar, but with another image or other settings than the
//!   webhook injects now (the operator was upgraded, its sidecar flags or the gateway's
//!   `spec.sidecar` changed): a running pod never changes, it keeps what it was created with.
//!
//! The AIGateway reconcile counts both into its status and says which in Events. Pods are
//! watched metadata-only, one watch per controller ([`watch`]): it triggers the reconciles and
//! fills a [`PodCache`] that every reconcile's [`survey`] reads, so a reconcile lists no pods.
//! The webhook marks every pod it injects with `sidegate.dev/injected` and what it injected
//! ([`InjectedWith`]), so the annotations find the candidates and tell most outdated pods apart;
//! only the rest are read whole, a few at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sidegate_crds::api::AIGateway;

use crate::webhook::inject::{
    self, INJECT_ANNOTATION, INJECTED_ANNOTATION, InjectedWith, SIDECAR_CONTAINER,
    SIDECAR_IMAGE_ANNOTATION, SIDECAR_SETTINGS_ANNOTATION,
};

/// Candidates read whole per reconcile; more are counted from their annotations alone.
pub const MAX_PODS_READ: usize = 32;
/// Pods named in the Event.
pub const MAX_PODS_NAMED: usize = 5;
/// How long a survey waits for its controller's first pod list before it gives up (the count
/// is then not updated): at startup the gateways may be listed before the pods are.
pub const CACHE_READY_WAIT: Duration = Duration::from_secs(10);

/// The pod watch's field selector: ended pods are never counted, so never cached (one that ends
/// leaves the selector, and the watch reports it deleted).
pub const NOT_ENDED: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// The annotations [`survey`] and [`gateway_for_pod`] read: the only ones cached.
pub const CACHED_ANNOTATIONS: [&str; 5] = [
    inject::GATEWAY_ANNOTATION,
    INJECT_ANNOTATION,
    INJECTED_ANNOTATION,
    SIDECAR_IMAGE_ANNOTATION,
    SIDECAR_SETTINGS_ANNOTATION,
];

/// Strips a watched pod's metadata to what is read of it (name, namespace, deletion timestamp
/// and [`CACHED_ANNOTATIONS`]) before it is cached: with thousands of pods, their labels,
/// managedFields, owners and other annotations would be most of the cache.
pub fn strip(pod: &mut PartialObjectMeta<Pod>) {
    let meta = std::mem::take(&mut pod.metadata);
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .into_iter()
        .flatten()
        .filter(|(key, _)| CACHED_ANNOTATIONS.contains(&key.as_str()))
        .collect();
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        deletion_timestamp: meta.deletion_timestamp,
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    };
}

/// The pod metadata one AIGateway controller watches (its namespace, or the whole cluster),
/// which [`survey`] reads instead of listing pods.
#[derive(Clone)]
pub struct PodCache {
    /// Pods not ended, [`strip`]ped; ready once the watch's first list is in.
    store: Store<PartialObjectMeta<Pod>>,
    /// The watch's last error, until it brings something again.
    watch_error: Arc<Mutex<Option<String>>>,
}

impl PodCache {
    /// Waits (at most `wait`) until the first list is in. A failing watch is not waited for: one
    /// refused for good (RBAC without pods) would hold every reconcile that long.
    async fn ready(&self, wait: Duration) -> Result<(), SurveyError> {
        let watch_error = self
            .watch_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let wait = if watch_error.is_some() {
            Duration::ZERO
        } else {
            wait
        };
        match tokio::time::timeout(wait, self.store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SurveyError::WatchEnded),
            Err(_) => Err(match watch_error {
                Some(error) => SurveyError::WatchFailing(error),
                None => SurveyError::NotReady(wait),
            }),
        }
    }
}

/// The metadata-only watch of the pods of `api` that are not ended: the stream to drive (it
/// fills the cache, and each pod it brings may trigger its gateway, [`gateway_for_pod`]) and
/// the cache it fills.
pub fn watch(
    api: Api<PartialObjectMeta<Pod>>,
) -> (
    PodCache,
    impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store();
    let cache = PodCache {
        store,
        watch_error: Arc::default(),
    };
    let watch_error = cache.watch_error.clone();
    let pods = watcher(api, watcher::Config::default().fields(NOT_ENDED))
        .modify(strip)
        .inspect(move |event| {
            *watch_error.lock().unwrap_or_else(PoisonError::into_inner) =
                event.as_ref().err().map(ToString::to_string);
        })
        .reflect(writer)
        .map(|event| {
            event.map(|event| {
                let pods: Vec<_> = match event {
                    // Gone from the watch: deleted, or ended (out of its field selector). Marked
                    // going away, so that an injected pod's gateway counts it no more at once
                    // (`gateway_for_pod`); the watch's last word on an ended pod has no
                    // deletion timestamp of its own.
                    watcher::Event::Delete(mut pod) => {
                        pod.metadata
                            .deletion_timestamp
                            .get_or_insert_with(|| Time(Timestamp::now()));
                        vec![pod]
                    }
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => vec![pod],
                    watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
                };
                futures_util::stream::iter(pods.into_iter().map(Ok))
            })
        })
        .try_flatten();
    (cache, pods)
}

/// The [`PodCache`]s of the running AIGateway controllers, by the namespace each watches
/// (`None`: the whole cluster).
#[derive(Default)]
pub struct PodCaches(Mutex<BTreeMap<Option<String>, PodCache>>);

impl PodCaches {
    /// Sets the cache of the controller of `ns` (a new one replaces the last).
    pub fn insert(&self, ns: Option<&str>, cache: PodCache) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ns.map(str::to_owned), cache);
    }

    /// The cache that holds the pods of namespace `ns`.
    pub fn covering(&self, ns: &str) -> Result<PodCache, SurveyError> {
        let caches = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        caches
            .get(&Some(ns.to_owned()))
            .or_else(|| caches.get(&None))
            .cloned()
            .ok_or_else(|| SurveyError::NotWatched(ns.to_owned()))
    }
}

/// Why the pods of a gateway were not counted (the reconcile keeps the last counts).
#[derive(Debug, thiserror::Error)]
pub enum SurveyError {
    /// No controller watches the pods of this namespace.
    #[error("no pod watch covers namespace {0}")]
    NotWatched(String),
    /// The pod watch has not listed the pods yet.
    #[error("the pod watch has not listed the pods yet (waited {0:?})")]
    NotReady(Duration),
    /// The pod watch fails and has not listed the pods yet.
    #[error("the pod watch fails: {0}")]
    WatchFailing(String),
    /// The pod watch stopped before it listed the pods.
    #[error("the pod watch stopped before it listed the pods")]
    WatchEnded,
    /// Reading a pod failed.
    #[error("reading pods: {0}")]
    Kube(#[from] kube::Error),
}

/// The pods of one gateway that run without its sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UninjectedPods {
    /// How many.
    pub count: u32,
    /// The first few names, sorted.
    pub names: Vec<String>,
}

impl UninjectedPods {
    /// The Event note: how many, which, and what to do.
    pub fn note(&self, gateway: &str) -> String {
        format!(
            "{} pod(s) annotated {}: {gateway} run without the sidecar (created before the AIGateway, or while the webhook could not inject them): {}; restart them (kubectl rollout restart, or delete the pods) to get the sidecar (the webhook must be called for them: see the chart's webhook.namespaceSelectorExpressions and webhook.objectSelector)",
            self.count,
            inject::GATEWAY_ANNOTATION,
            named(self.count, &self.names),
        )
    }
}

/// The pods of one gateway whose sidecar is not the one the webhook injects now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutdatedPods {
    /// How many.
    pub count: u32,
    /// The first few names, sorted.
    pub names: Vec<String>,
    /// What the webhook injects now.
    pub now: InjectedWith,
}

impl OutdatedPods {
    /// The Event note: how many, which, what they should run, and what to do.
    pub fn note(&self, gateway: &str) -> String {
        let now = &self.now;
        format!(
            "{} pod(s) of AIGateway {gateway} run a sidecar injected with another image or other sidecar settings than it gets now (image {}, settings {}; spec.sidecar or the operator's sidecar flags changed, or the operator was upgraded): {}; restart them (kubectl rollout restart, or delete the pods) to get the current sidecar",
            self.count,
            now.image,
            now.settings_hash,
            named(self.count, &self.names),
        )
    }
}

/// `names`, and how many of `count` they leave out.
fn named(count: u32, names: &[String]) -> String {
    let mut text = names.join(", ");
    let more = (count as usize).saturating_sub(names.len());
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// What the pods of one gateway run, as far as it differs from what they should.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayPods {
    /// Pods without the sidecar.
    pub uninjected: UninjectedPods,
    /// Pods with an outdated sidecar (`None`: not compared, what injection gives is unknown).
    pub outdated: Option<OutdatedPods>,
}

/// How an injected pod's sidecar compares with what the webhook injects now, by its annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// Injected with the same image and settings.
    Current,
    /// Injected with another image or other settings.
    Outdated,
    /// Injected before the webhook recorded what it injected: the image is in the pod's
    /// sidecar container, the settings are not known (and not compared).
    Unrecorded,
}

/// How the sidecar recorded in `meta` (a pod the webhook injected) compares with `now`.
pub fn drift(meta: &ObjectMeta, now: &InjectedWith) -> Drift {
    let get = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key));
    let Some(image) = get(SIDECAR_IMAGE_ANNOTATION) else {
        return Drift::Unrecorded;
    };
    let settings = get(SIDECAR_SETTINGS_ANNOTATION);
    if *image == now.image && settings.is_none_or(|s| *s == now.settings_hash) {
        Drift::Current
    } else {
        Drift::Outdated
    }
}

/// The gateway whose sidecar the webhook injected into the pod of `meta`, unless the pod is
/// being deleted.
pub fn injected_gateway(meta: &ObjectMeta) -> Option<String> {
    let annotations = meta.annotations.as_ref()?;
    annotations.get(INJECTED_ANNOTATION)?;
    let gateway = annotations.get(inject::GATEWAY_ANNOTATION)?.trim();
    (!gateway.is_empty() && meta.deletion_timestamp.is_none()).then(|| gateway.to_owned())
}

/// Whether the sidecar container of `pod` runs `image` (`None`: the pod has no sidecar).
fn sidecar_image_is(pod: &Pod, image: &str) -> Option<bool> {
    let spec = pod.spec.as_ref()?;
    let sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == SIDECAR_CONTAINER)?;
    Some(sidecar.image.as_deref() == Some(image))
}

/// The gateway a pod asks for, if by its metadata it may run without the sidecar: annotated
/// `sidegate.dev/gateway`, not opted out, not marked injected by the webhook, not being deleted.
pub fn requested_gateway_without_sidecar(meta: &ObjectMeta) -> Option<String> {
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    inject::requested_gateway_by_annotations(meta.annotations.as_ref()).ok()
}

/// The gateway to reconcile when a pod changes: the one it names, if it may lack the sidecar.
/// A pod being deleted counts no more, so its gateway is reconciled too (the watch's last word
/// on a deleted pod carries its deletion timestamp).
/// An injected pod going away may have been outdated: its gateway is reconciled then too (not on
/// the injected pods' other changes, status updates mostly, which change no count).
pub fn gateway_for_pod(meta: &ObjectMeta) -> Option<ObjectRef<AIGateway>> {
    let gateway = match inject::requested_gateway_by_annotations(meta.annotations.as_ref()) {
        Ok(gateway) => gateway,
        Err(inject::Skip::AlreadyInjected) if meta.deletion_timestamp.is_some() => meta
            .annotations
            .as_ref()?
            .get(inject::GATEWAY_ANNOTATION)?
            .trim()
            .to_owned(),
        Err(_) => return None,
    };
    Some(ObjectRef::new(&gateway).within(meta.namespace.as_deref()?))
}

/// Whether `pod` runs the sidecar (as a native sidecar or a regular container).
pub fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    })
}

/// Whether `pod` has ended (a Job's pod): restarting it is not what anyone wants.
fn has_ended(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pods in `ns` that name gateway `name` and run without the sidecar, and, when `now` says
/// what injection gives, those whose sidecar differs from it: the pods of `cache` (no list; it
/// is waited for until its first list is in, at most [`CACHE_READY_WAIT`], so an empty cache is
/// never taken for no pods) and reads of at most [`MAX_PODS_READ`] pods of each kind. None in a
/// namespace of `excluded` (the webhook's exclusions), nor Windows pods: a restart would not
/// inject them either.
///
/// A pod injected before the webhook recorded what it injected is compared by the image of its
/// sidecar container alone; beyond the reads it is not counted.
pub async fn survey(
    client: &Client,
    cache: &PodCache,
    ns: &str,
    name: &str,
    now: Option<&InjectedWith>,
    excluded: &BTreeSet<String>,
) -> Result<GatewayPods, SurveyError> {
    if excluded.contains(ns) {
        return Ok(GatewayPods {
            outdated: now.map(|now| OutdatedPods {
                now: now.clone(),
                ..OutdatedPods::default()
            }),
            ..GatewayPods::default()
        });
    }
    cache.ready(CACHE_READY_WAIT).await?;
    let cached = cache
        .store
        .state_filter(|pod| pod.metadata.namespace.as_deref() == Some(ns));
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let mut candidates: Vec<String> = Vec::new();
    let mut outdated = BTreeSet::new();
    let mut unrecorded: Vec<String> = Vec::new();
    for pod in &cached {
        if requested_gateway_without_sidecar(&pod.metadata).as_deref() == Some(name) {
            candidates.push(pod.name_any());
        } else if let Some(now) = now
            && injected_gateway(&pod.metadata).as_deref() == Some(name)
        {
            match drift(&pod.metadata, now) {
                Drift::Current => {}
                Drift::Outdated => {
                    outdated.insert(pod.name_any());
                }
                Drift::Unrecorded => unrecorded.push(pod.name_any()),
            }
        }
    }
    candidates.sort();
    unrecorded.sort();
    let unread = candidates.len().saturating_sub(MAX_PODS_READ);
    let mut without = BTreeSet::new();
    for pod_name in candidates.into_iter().take(MAX_PODS_READ) {
        // Gone since the watch saw it: nothing to count. Windows pods are never injected: a
        // restart would not bring the sidecar either.
        if let Some(pod) = api.get_opt(&pod_name).await?
            && !has_sidecar(&pod)
            && !has_ended(&pod)
            && !inject::is_windows_pod(&pod)
        {
            without.insert(pod_name);
        }
    }
    if let Some(now) = now {
        for pod_name in unrecorded.into_iter().take(MAX_PODS_READ) {
            if let Some(pod) = api.get_opt(&pod_name).await?
                && sidecar_image_is(&pod, &now.image) == Some(false)
                && !has_ended(&pod)
            {
                outdated.insert(pod_name);
            }
        }
    }
    Ok(GatewayPods {
        uninjected: UninjectedPods {
            count: u32::try_from(without.len() + unread).unwrap_or(u32::MAX),
            names: without.into_iter().take(MAX_PODS_NAMED).collect(),
        },
        outdated: now.map(|now| OutdatedPods {
            count: u32::try_from(outdated.len()).unwrap_or(u32::MAX),
            names: outdated.into_iter().take(MAX_PODS_NAMED).collect(),
            now: now.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("app-1".into()),
            namespace: Some("team-a".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_pod_naming_a_gateway_without_the_injected_mark_maps_to_that_gateway() {
        let gw = ObjectRef::<AIGateway>::new("main").within("team-a");
        assert_eq!(
            gateway_for_pod(&meta(&[(inject::GATEWAY_ANNOTATION, " main ")])),
            Some(gw)
        );
        for skipped in [
            meta(&[]),
            meta(&[(inject::GATEWAY_ANNOTATION, "")]),
            meta(&[
                (inject::GATEWAY_ANNOTATION, "main"),
                (inject::INJECTED_ANNOTATION, "v1"),
            ]),
            meta(&[
                (inject::GATEWAY_ANNOTATION, "main"),
                (inject::INJECT_ANNOTATION, "false"),
            ]),
        ] {
            assert_eq!(gateway_for_pod(&skipped), None, "{skipped:?}");
        }
        // A pod being deleted is not counted, and its gateway reconciled to count it out.
        let mut deleting = meta(&[(inject::GATEWAY_ANNOTATION, "main")]);
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(requested_gateway_without_sidecar(&deleting), None);
        assert_eq!(
            gateway_for_pod(&deleting),
            Some(ObjectRef::new("main").within("team-a"))
        );
    }

    #[test]
    fn an_injected_pod_maps_to_its_gateway_only_when_it_goes_away() {
        let mut injected = meta(&[
            (inject::GATEWAY_ANNOTATION, "main"),
            (INJECTED_ANNOTATION, "0.1.0"),
        ]);
        assert_eq!(gateway_for_pod(&injected), None);
        assert_eq!(injected_gateway(&injected).as_deref(), Some("main"));
        injected.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(
            gateway_for_pod(&injected),
            Some(ObjectRef::new("main").within("team-a"))
        );
        assert_eq!(injected_gateway(&injected), None, "no longer counted");
    }

    #[test]
    fn a_pod_is_outdated_when_its_recorded_image_or_settings_differ_from_those_injected_now() {
        let now = InjectedWith {
            image: "ghcr.io/sidegate/sidegate:0.2.0".into(),
            settings_hash: "abc123abc123".into(),
        };
        let recorded = |image: &str, settings: Option<&str>| {
            let mut annotations = vec![
                (inject::GATEWAY_ANNOTATION, "main"),
                (INJECTED_ANNOTATION, "0.1.0"),
                (SIDECAR_IMAGE_ANNOTATION, image),
            ];
            if let Some(s) = settings {
                annotations.push((SIDECAR_SETTINGS_ANNOTATION, s));
            }
            meta(&annotations)
        };
        assert_eq!(
            drift(
                &recorded("ghcr.io/sidegate/sidegate:0.2.0", Some("abc123abc123")),
                &now
            ),
            Drift::Current
        );
        assert_eq!(
            drift(
                &recorded("ghcr.io/sidegate/sidegate:0.1.0", Some("abc123abc123")),
                &now
            ),
            Drift::Outdated
        );
        assert_eq!(
            drift(
                &recorded("ghcr.io/sidegate/sidegate:0.2.0", Some("ffffffffffff")),
                &now
            ),
            Drift::Outdated
        );
        // An image without settings: the image is what can be compared.
        assert_eq!(
            drift(&recorded("ghcr.io/sidegate/sidegate:0.2.0", None), &now),
            Drift::Current
        );
        // Injected before anything was recorded: its sidecar container is read.
        assert_eq!(
            drift(
                &meta(&[
                    (inject::GATEWAY_ANNOTATION, "main"),
                    (INJECTED_ANNOTATION, "0.1.0")
                ]),
                &now
            ),
            Drift::Unrecorded
        );
    }

    #[test]
    fn an_unrecorded_pod_is_compared_by_the_image_of_its_sidecar_container() {
        let pod = |json: serde_json::Value| -> Pod { serde_json::from_value(json).expect("pod") };
        let with = |image: &str| {
            pod(serde_json::json!({"spec": {
                "containers": [{"name": "app", "image": "app:1"}],
                "initContainers": [{"name": SIDECAR_CONTAINER, "image": image}],
            }}))
        };
        assert_eq!(
            sidecar_image_is(&with("sidegate:2"), "sidegate:2"),
            Some(true)
        );
        assert_eq!(
            sidecar_image_is(&with("sidegate:1"), "sidegate:2"),
            Some(false)
        );
        let without = pod(serde_json::json!({"spec": {"containers": [{"name": "app"}]}}));
        assert_eq!(sidecar_image_is(&without, "sidegate:2"), None);
    }

    #[test]
    fn the_outdated_note_says_what_pods_get_now_and_to_restart_them() {
        let pods = OutdatedPods {
            count: 6,
            names: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
            now: InjectedWith {
                image: "ghcr.io/sidegate/sidegate:0.2.0".into(),
                settings_hash: "abc123abc123".into(),
            },
        };
        assert_eq!(
            pods.note("main"),
            "6 pod(s) of AIGateway main run a sidecar injected with another image or other sidecar settings than it gets now (image ghcr.io/sidegate/sidegate:0.2.0, settings abc123abc123; spec.sidecar or the operator's sidecar flags changed, or the operator was upgraded): a, b, c, d, e and 1 more; restart them (kubectl rollout restart, or delete the pods) to get the current sidecar"
        );
    }

    #[test]
    fn the_sidecar_is_found_as_a_native_sidecar_or_a_container() {
        let pod = |json: serde_json::Value| -> Pod { serde_json::from_value(json).expect("pod") };
        let app = serde_json::json!({"name": "app", "image": "app:1"});
        let sidecar = serde_json::json!({"name": SIDECAR_CONTAINER, "image": "sidegate:1"});
        assert!(!has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app]}})
        )));
        assert!(has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app], "initContainers": [sidecar]}})
        )));
        assert!(has_sidecar(&pod(
            serde_json::json!({"spec": {"containers": [app, sidecar]}})
        )));
    }

    #[test]
    fn the_note_names_a_few_pods_and_says_to_restart_them() {
        let pods = UninjectedPods {
            count: 7,
            names: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
        };
        assert_eq!(
            pods.note("main"),
            "7 pod(s) annotated sidegate.dev/gateway: main run without the sidecar (created before the AIGateway, or while the webhook could not inject them): a, b, c, d, e and 2 more; restart them (kubectl rollout restart, or delete the pods) to get the sidecar (the webhook must be called for them: see the chart's webhook.namespaceSelectorExpressions and webhook.objectSelector)"
        );
    }

    #[test]
    fn a_cached_pod_keeps_only_what_the_survey_and_the_trigger_read() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            ManagedFieldsEntry, OwnerReference, Time,
        };
        use kube::api::PartialObjectMetaExt;
        let mut watched = meta(&[
            (inject::GATEWAY_ANNOTATION, "main"),
            (INJECT_ANNOTATION, "true"),
            (INJECTED_ANNOTATION, "0.1.0"),
            (SIDECAR_IMAGE_ANNOTATION, "ghcr.io/sidegate/sidegate:0.1.0"),
            (SIDECAR_SETTINGS_ANNOTATION, "abc123abc123"),
            ("sidegate.dev/something-else", "x"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
        ]);
        watched.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        watched.labels = Some([("app".to_owned(), "web".to_owned())].into());
        watched.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        watched.owner_references = Some(vec![OwnerReference::default()]);
        watched.uid = Some("0b8c".into());
        watched.resource_version = Some("42".into());
        let mut pod = watched.clone().into_response_partial::<Pod>();
        strip(&mut pod);
        let mut kept = meta(&[
            (inject::GATEWAY_ANNOTATION, "main"),
            (INJECT_ANNOTATION, "true"),
            (INJECTED_ANNOTATION, "0.1.0"),
            (SIDECAR_IMAGE_ANNOTATION, "ghcr.io/sidegate/sidegate:0.1.0"),
            (SIDECAR_SETTINGS_ANNOTATION, "abc123abc123"),
        ]);
        kept.deletion_timestamp = watched.deletion_timestamp.clone();
        assert_eq!(pod.metadata, kept);
        assert_eq!(
            gateway_for_pod(&pod.metadata),
            gateway_for_pod(&watched),
            "the trigger maps the stripped pod as the watched one"
        );

        let mut plain = meta(&[("other", "x")]).into_response_partial::<Pod>();
        strip(&mut plain);
        assert_eq!(plain.metadata.annotations, None);
        assert_eq!(plain.name_any(), "app-1");
    }

    fn unlisted_cache() -> (PodCache, reflector::store::Writer<PartialObjectMeta<Pod>>) {
        let (store, writer) = reflector::store();
        let cache = PodCache {
            store,
            watch_error: Arc::default(),
        };
        (cache, writer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_survey_waits_a_bounded_time_for_the_first_pod_list_and_never_reads_an_empty_cache() {
        let (cache, mut writer) = unlisted_cache();
        let start = tokio::time::Instant::now();
        let waited = cache.ready(CACHE_READY_WAIT).await;
        assert!(
            matches!(waited, Err(SurveyError::NotReady(_))),
            "{waited:?}"
        );
        assert_eq!(start.elapsed(), CACHE_READY_WAIT);

        // Listed meanwhile: the wait ends then.
        let listing = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.ready(CACHE_READY_WAIT).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(listing.await.expect("joined").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_pod_watch_is_not_waited_for() {
        let (cache, _writer) = unlisted_cache();
        *cache.watch_error.lock().expect("lock") = Some("pods is forbidden".into());
        let start = tokio::time::Instant::now();
        let waited = cache.ready(CACHE_READY_WAIT).await;
        assert!(
            matches!(&waited, Err(SurveyError::WatchFailing(e)) if e == "pods is forbidden"),
            "{waited:?}"
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn the_cache_of_a_namespace_is_its_own_or_the_whole_clusters() {
        let caches = PodCaches::default();
        assert!(matches!(
            caches.covering("team-a"),
            Err(SurveyError::NotWatched(_))
        ));
        let (team_a, _a) = unlisted_cache();
        caches.insert(Some("team-a"), team_a.clone());
        assert!(caches.covering("team-b").is_err());
        let (cluster, _c) = unlisted_cache();
        caches.insert(None, cluster.clone());
        let covering = |ns| caches.covering(ns).expect("covered").watch_error;
        assert!(Arc::ptr_eq(&covering("team-a"), &team_a.watch_error));
        assert!(Arc::ptr_eq(&covering("team-b"), &cluster.watch_error));
    }
}
