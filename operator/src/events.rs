//! The operator's events.k8s.io/v1 Event recorder.
//!
//! Like kube-runtime's `Recorder`, an Event repeated within [`SERIES_TTL`] of its last sighting
//! is not a new object but a series on the first one (its count and last time bumped). Unlike it,
//! a repetition is the same type, reason, action, object *and note*: kube's recorder keys its
//! cache without the note, so a `Rendered` Event of a new hash, or a `KeyMissing` naming another
//! Secret, only bumped the count of the first one, whose stale text `kubectl describe` kept
//! showing. Here each different text is an Event of its own.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use serde_json::json;

/// How long after its last sighting an Event is still continued as a series (kube-runtime's
/// recorder uses the same 6 minutes).
pub const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// What makes two Events the same one: everything `kubectl describe` shows of it but the count
/// and times.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
    /// apiVersion, kind, namespace, name, uid of the object the Event is about.
    regarding: [Option<String>; 5],
    related: Option<[Option<String>; 5]>,
}

fn reference_key(r: &ObjectReference) -> [Option<String>; 5] {
    [
        r.api_version.clone(),
        r.kind.clone(),
        r.namespace.clone(),
        r.name.clone(),
        r.uid.clone(),
    ]
}

impl EventKey {
    fn new(ev: &Event, regarding: &ObjectReference) -> Self {
        Self {
            warning: ev.type_ == EventType::Warning,
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
            regarding: reference_key(regarding),
            related: ev.secondary.as_ref().map(reference_key),
        }
    }
}

/// The Event to write for `ev`: a new object, or (`true`) the next count of a series.
type Next = (K8sEvent, bool);

/// Publishes Events, continuing a series only for an Event identical to one published within
/// [`SERIES_TTL`].
pub struct Recorder {
    client: kube::Client,
    reporter: Reporter,
    cache: Mutex<HashMap<EventKey, K8sEvent>>,
}

impl Recorder {
    /// A recorder publishing as `reporter`.
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            cache: Mutex::default(),
        }
    }

    /// Publishes `ev` about `regarding` (in its namespace, `default` for a cluster-scoped one).
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = EventKey::new(ev, regarding);
        let (event, series) = self.next(&key, ev, regarding, Timestamp::now());
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let events = Api::<K8sEvent>::namespaced(self.client.clone(), ns);
        let written = if series {
            let name = event.metadata.name.clone().unwrap_or_default();
            let patch = json!({"series": event.series});
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(event),
                // Gone (expired, or deleted): a new Event then.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    let fresh = self.generate(ev, regarding, Timestamp::now());
                    events.create(&PostParams::default(), &fresh).await?;
                    Ok(fresh)
                }
                Err(e) => Err(e),
            }
        } else {
            events.create(&PostParams::default(), &event).await?;
            Ok(event)
        }?;
        self.lock().insert(key, written);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EventKey, K8sEvent>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The Event to write for `ev` at `now`: the next count of the series of an identical Event
    /// seen within [`SERIES_TTL`], else a new one. Forgets Events not seen for longer.
    fn next(
        &self,
        key: &EventKey,
        ev: &Event,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Next {
        let mut cache = self.lock();
        cache.retain(|_, e| last_seen(e).is_none_or(|t| t + SERIES_TTL > now));
        match cache.get(key) {
            Some(previous) => {
                let mut event = previous.clone();
                event.series = Some(EventSeries {
                    count: previous.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                (event, true)
            }
            None => (self.generate(ev, regarding, now), false),
        }
    }

    /// A new Event for `ev` about `regarding` at `now`.
    fn generate(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding
                        .name
                        .as_deref()
                        .unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_owned(),
            ),
            ..Default::default()
        }
    }
}

/// When `e` was last seen.
fn last_seen(e: &K8sEvent) -> Option<Timestamp> {
    e.series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> Recorder {
        // A client that is never called: `next` only reads the cache.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        Recorder::new(
            client,
            Reporter {
                controller: "sidegate-operator".to_owned(),
                instance: None,
            },
        )
    }

    fn gateway() -> ObjectReference {
        ObjectReference {
            api_version: Some("sidegate.io/v1alpha1".to_owned()),
            kind: Some("AIGateway".to_owned()),
            namespace: Some("team-a".to_owned()),
            name: Some("main".to_owned()),
            uid: Some("u1".to_owned()),
            ..Default::default()
        }
    }

    fn rendered(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "Rendered".to_owned(),
            note: Some(note.to_owned()),
            action: "Reconcile".to_owned(),
            secondary: None,
        }
    }

    /// Runs `next` and records its result as `publish` does after a successful write.
    fn publish(r: &Recorder, ev: &Event, now: Timestamp) -> Next {
        let key = EventKey::new(ev, &gateway());
        let next = r.next(&key, ev, &gateway(), now);
        r.lock().insert(key, next.0.clone());
        next
    }

    #[tokio::test]
    async fn a_different_note_is_a_new_event_with_its_own_text_and_an_identical_one_a_series() {
        let r = recorder();
        let t0 = Timestamp::from_second(1_000_000).expect("time");
        let (first, series) = publish(&r, &rendered("rendered config sha256:aaa"), t0);
        assert!(!series);
        assert_eq!(first.note.as_deref(), Some("rendered config sha256:aaa"));

        // Same reason, another hash: a new Event carrying the new text.
        let t1 = t0 + SignedDuration::from_secs(10);
        let (second, series) = publish(&r, &rendered("rendered config sha256:bbb"), t1);
        assert!(!series, "{second:?}");
        assert_eq!(second.note.as_deref(), Some("rendered config sha256:bbb"));
        assert_ne!(second.metadata.name, first.metadata.name);
        assert!(second.series.is_none());

        // The first text again, within the TTL: the series of the first Event.
        let t2 = t1 + SignedDuration::from_secs(10);
        let (again, series) = publish(&r, &rendered("rendered config sha256:aaa"), t2);
        assert!(series);
        assert_eq!(again.metadata.name, first.metadata.name);
        assert_eq!(again.note.as_deref(), Some("rendered config sha256:aaa"));
        let s = again.series.as_ref().expect("series");
        assert_eq!((s.count, s.last_observed_time.0), (2, t2));
        let (third, _) = publish(&r, &rendered("rendered config sha256:aaa"), t2);
        assert_eq!(third.series.map(|s| s.count), Some(3));

        // Past the TTL since its last sighting: a new Event again.
        let late = t2 + SERIES_TTL + SignedDuration::from_secs(1);
        let (fresh, series) = publish(&r, &rendered("rendered config sha256:aaa"), late);
        assert!(!series);
        assert_ne!(fresh.metadata.name, first.metadata.name);
    }

    #[tokio::test]
    async fn a_new_event_says_who_reported_it_and_what_about() {
        let r = recorder();
        let warning = Event {
            type_: EventType::Warning,
            reason: "KeyMissing".to_owned(),
            note: Some("Secret redis not found".to_owned()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        let (e, _) = publish(&r, &warning, Timestamp::UNIX_EPOCH);
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("KeyMissing"));
        assert_eq!(e.action.as_deref(), Some("Reconcile"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("team-a"));
        assert_eq!(e.metadata.name.as_deref(), Some("main.0"));
        assert_eq!(e.reporting_controller.as_deref(), Some("sidegate-operator"));
        assert_eq!(e.reporting_instance.as_deref(), Some("sidegate-operator"));
        assert_eq!(e.regarding, Some(gateway()));
    }
}
