//! Status of AIGateways and ProviderKeys: conditions computed from what a reconcile observed,
//! the comparison that keeps unchanged status from being written, and the Events that mark
//! transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sidegate_crds::api::{AIGatewayStatus, ProviderAliases, ProviderKeyStatus, conditions};

use crate::render::KeyProblem;

/// Longest condition message written; the apiserver allows 32768, people read far less.
const MAX_MESSAGE: usize = 2048;
/// Longest Event note: events.k8s.io/v1 refuses longer ones (and the Event would be lost).
const MAX_NOTE: usize = 1024;

/// What one AIGateway reconcile found.
#[derive(Debug, Clone, Default)]
pub struct GatewayObservation {
    /// `metadata.generation` reconciled.
    pub generation: Option<i64>,
    /// Spec problems (from [`crate::validate::gateway`]); non-empty means the policy was not
    /// rendered (the keys may have been, around the last rendered config: see `rendered`).
    pub spec_problems: Vec<String>,
    /// Number of ProviderKeys the selector matched.
    pub selected_keys: usize,
    /// What was rendered and applied: the whole config when the spec is valid, the keys around
    /// the last rendered config when it is not (`None`: nothing, e.g. an invalid spec never
    /// rendered, or a failure).
    pub rendered: Option<RenderSummary>,
    /// Why the rendered objects could not be written, if they could not.
    pub failure: Option<Failure>,
    /// Why the webhook does not inject the sidecar image the gateway names, if it does not.
    pub sidecar_image_refused: Option<String>,
    /// Pods naming the gateway that run without the sidecar (`None`: not checked this time,
    /// the last count stays).
    pub uninjected_pods: Option<crate::pods::UninjectedPods>,
    /// Pods naming the gateway whose sidecar is not the one injected now (`None`: not compared
    /// this time, the last count stays).
    pub outdated_pods: Option<crate::pods::OutdatedPods>,
}

/// A reconcile that could not write the rendered objects. Never holds key values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// PascalCase reason (`ApplyFailed`, `RenderFailed`, `ObjectNotOwned`).
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
}

/// The parts of a render that status reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderSummary {
    /// Content hash.
    pub hash: String,
    /// Provider → aliases.
    pub provider_keys: Vec<ProviderAliases>,
    /// Keys rendered.
    pub key_count: u32,
    /// Unresolved references.
    pub problems: Vec<KeyProblem>,
    /// Names of the ConfigMap and Secret.
    pub objects: (String, String),
}

/// A condition without its transition time, as computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub ok: bool,
    /// PascalCase reason.
    pub reason: String,
    /// What happened or what to fix.
    pub message: String,
}

impl Cond {
    fn new(type_: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok,
            reason: reason.to_owned(),
            message: truncate(message.into()),
        }
    }
}

fn truncate(s: String) -> String {
    truncate_to(s, MAX_MESSAGE)
}

/// `note` cut to what an Event may carry.
pub fn event_note(note: String) -> String {
    truncate_to(note, MAX_NOTE)
}

fn truncate_to(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The conditions of an AIGateway: `ConfigRendered`, `KeysResolved`, then `Ready`.
pub fn gateway_conditions(obs: &GatewayObservation) -> Vec<Cond> {
    let rendered = if let Some(f) = &obs.failure {
        Cond::new(
            conditions::CONFIG_RENDERED,
            false,
            f.reason,
            format!(
                "config not written, pods keep the last written one: {}",
                f.message
            ),
        )
    } else if !obs.spec_problems.is_empty() {
        let keys = if obs.rendered.is_some() {
            " (its keys follow the ProviderKeys and Secrets)"
        } else {
            ""
        };
        Cond::new(
            conditions::CONFIG_RENDERED,
            false,
            "InvalidSpec",
            format!(
                "spec not rendered, the last rendered config stays in use{keys}: {}",
                obs.spec_problems.join("; ")
            ),
        )
    } else if let Some(r) = &obs.rendered {
        Cond::new(
            conditions::CONFIG_RENDERED,
            true,
            "Rendered",
            format!(
                "ConfigMap {} and Secret {} hold config {}",
                r.objects.0, r.objects.1, r.hash
            ),
        )
    } else {
        Cond::new(
            conditions::CONFIG_RENDERED,
            false,
            "NotRendered",
            "config not rendered yet",
        )
    };
    let keys = match &obs.rendered {
        None if obs.failure.is_some() => Cond::new(
            conditions::KEYS_RESOLVED,
            false,
            "NotRendered",
            "keys are resolved once the config is written",
        ),
        None => Cond::new(
            conditions::KEYS_RESOLVED,
            false,
            "NotRendered",
            "keys are resolved once the spec is valid",
        ),
        Some(r) if !r.problems.is_empty() => {
            let reason = r.problems.first().map_or("KeyUnresolved", |p| p.reason);
            let list: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
            Cond::new(
                conditions::KEYS_RESOLVED,
                false,
                reason,
                format!("{}; {} other key(s) rendered", list.join("; "), r.key_count),
            )
        }
        Some(_) if obs.selected_keys == 0 => Cond::new(
            conditions::KEYS_RESOLVED,
            true,
            "NoProviderKeys",
            "no ProviderKey matches providerKeySelector; clients' own provider credentials are forwarded",
        ),
        Some(r) => Cond::new(
            conditions::KEYS_RESOLVED,
            true,
            "KeysResolved",
            format!(
                "{} key(s): {}",
                r.key_count,
                describe_aliases(&r.provider_keys)
            ),
        ),
    };
    let ready = match (rendered.ok, keys.ok) {
        // No pod gets the sidecar at all: the first thing to fix.
        _ if obs.sidecar_image_refused.is_some() => Cond::new(
            conditions::READY,
            false,
            "SidecarImageNotAllowed",
            obs.sidecar_image_refused.clone().unwrap_or_default(),
        ),
        (true, true) => Cond::new(
            conditions::READY,
            true,
            "Ready",
            "gateway config and keys are rendered",
        ),
        (false, _) => Cond::new(
            conditions::READY,
            false,
            &rendered.reason,
            rendered.message.clone(),
        ),
        (true, false) => Cond::new(conditions::READY, false, &keys.reason, keys.message.clone()),
    };
    vec![rendered, keys, ready]
}

fn describe_aliases(keys: &[ProviderAliases]) -> String {
    keys.iter()
        .map(|p| format!("{} [{}]", p.provider, p.aliases.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns computed conditions into API conditions, keeping `lastTransitionTime` of those whose
/// status did not change.
pub fn merge_conditions(
    previous: &[Condition],
    computed: &[Cond],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    computed
        .iter()
        .map(|c| {
            let status = if c.ok { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The full AIGateway status for an observation. Fields of the last render are kept when the
/// spec is invalid, since that config is still what pods serve.
pub fn gateway_status(
    previous: Option<&AIGatewayStatus>,
    obs: &GatewayObservation,
    now: &Time,
) -> AIGatewayStatus {
    let computed = gateway_conditions(obs);
    let prev_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let mut status = match (&obs.rendered, previous) {
        (Some(r), _) => AIGatewayStatus {
            config_hash: Some(r.hash.clone()),
            key_count: Some(r.key_count),
            provider_keys: r.provider_keys.clone(),
            ..AIGatewayStatus::default()
        },
        (None, Some(p)) => AIGatewayStatus {
            config_hash: p.config_hash.clone(),
            key_count: p.key_count,
            provider_keys: p.provider_keys.clone(),
            ..AIGatewayStatus::default()
        },
        (None, None) => AIGatewayStatus::default(),
    };
    status.observed_generation = obs.generation;
    status.conditions = merge_conditions(prev_conditions, &computed, obs.generation, now);
    status.uninjected_pods = match &obs.uninjected_pods {
        Some(pods) => Some(pods.count),
        None => previous.and_then(|p| p.uninjected_pods),
    };
    status.outdated_pods = match &obs.outdated_pods {
        Some(pods) => Some(pods.count),
        None => previous.and_then(|p| p.outdated_pods),
    };
    status
}

/// The Event for a change of the gateway's pods with an outdated sidecar: a Warning naming them
/// when their number changes to one that is not zero, a Normal one when the last is gone.
pub fn outdated_pods_transition(
    old: Option<&AIGatewayStatus>,
    obs: &GatewayObservation,
    gateway: &str,
) -> Option<Transition> {
    let pods = obs.outdated_pods.as_ref()?;
    let before = old.and_then(|o| o.outdated_pods).unwrap_or(0);
    if pods.count == before {
        return None;
    }
    Some(if pods.count > 0 {
        Transition {
            warning: true,
            reason: "OutdatedSidecars".to_owned(),
            note: pods.note(gateway),
        }
    } else {
        Transition {
            warning: false,
            reason: "AllSidecarsCurrent".to_owned(),
            note: "every injected pod naming this gateway runs the sidecar it would get now"
                .to_owned(),
        }
    })
}

/// The Event for a change of the gateway's pods without the sidecar: a Warning naming them when
/// their number changes to one that is not zero, a Normal one when the last is gone.
pub fn uninjected_pods_transition(
    old: Option<&AIGatewayStatus>,
    obs: &GatewayObservation,
    gateway: &str,
) -> Option<Transition> {
    let pods = obs.uninjected_pods.as_ref()?;
    let before = old.and_then(|o| o.uninjected_pods).unwrap_or(0);
    if pods.count == before {
        return None;
    }
    Some(if pods.count > 0 {
        Transition {
            warning: true,
            reason: "UninjectedPods".to_owned(),
            note: pods.note(gateway),
        }
    } else {
        Transition {
            warning: false,
            reason: "AllPodsInjected".to_owned(),
            note: "every pod naming this gateway runs the sidecar".to_owned(),
        }
    })
}

/// Whether writing `new` would change anything a reader sees (transition times of unchanged
/// conditions are kept by [`merge_conditions`], so plain equality is the test).
pub fn status_changed<S: PartialEq>(old: Option<&S>, new: &S) -> bool {
    old != Some(new)
}

/// An Event to publish for a status transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human message.
    pub note: String,
}

/// Condition `type_` of `conditions`, if present.
fn find_condition(conditions: &[Condition], type_: &str) -> Option<Condition> {
    conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// Condition `type_` of `new` when it differs from the one in `old` (status or message) or is
/// new; the events of a status are about these.
fn changed_condition(old: &[Condition], new: &[Condition], type_: &str) -> Option<Condition> {
    match (find_condition(old, type_), find_condition(new, type_)) {
        (Some(a), Some(b)) => (a.status != b.status || a.message != b.message).then_some(b),
        (None, b) => b,
        (Some(_), None) => None,
    }
}

/// Whether condition `type_` of `conditions` is True.
fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The Event reason of a key problem: `KeyMissing` for a missing Secret or Secret key, else the
/// problem's own reason (`KeyEmpty`, `KeyInvalid`, ...).
fn key_problem_event_reason(reason: &str) -> String {
    if reason == "SecretNotFound" || reason == "KeyNotFound" {
        "KeyMissing".to_owned()
    } else {
        reason.to_owned()
    }
}

/// The Events that mark the difference between two AIGateway statuses: a new config rendered,
/// a spec or key problem appearing or changing, and the gateway becoming ready.
pub fn gateway_transitions(
    old: Option<&AIGatewayStatus>,
    new: &AIGatewayStatus,
) -> Vec<Transition> {
    let old_conditions = old.map(|o| o.conditions.as_slice()).unwrap_or_default();
    let find = |s: Option<&AIGatewayStatus>, t: &str| -> Option<Condition> {
        s.and_then(|s| find_condition(&s.conditions, t))
    };
    let changed = |t: &str| changed_condition(old_conditions, &new.conditions, t);
    let mut out = Vec::new();
    // InvalidSpec, ApplyFailed, RenderFailed, ObjectNotOwned.
    if let Some(c) = changed(conditions::CONFIG_RENDERED)
        && c.status == "False"
        && c.reason != "NotRendered"
    {
        out.push(Transition {
            warning: true,
            reason: c.reason.clone(),
            note: c.message,
        });
    }
    if old.and_then(|o| o.config_hash.as_ref()) != new.config_hash.as_ref()
        && let Some(hash) = &new.config_hash
    {
        let keys_only = find(Some(new), conditions::CONFIG_RENDERED)
            .is_some_and(|c| c.status == "False" && c.reason == "InvalidSpec");
        let keys = new.key_count.unwrap_or_default();
        out.push(if keys_only {
            Transition {
                warning: false,
                reason: "KeysRendered".to_owned(),
                note: format!(
                    "spec invalid, the last rendered config stays in use; its keys were rendered again from the ProviderKeys and Secrets: config {hash} with {keys} key(s)"
                ),
            }
        } else {
            Transition {
                warning: false,
                reason: "Rendered".to_owned(),
                note: format!("rendered config {hash} with {keys} key(s)"),
            }
        });
    }
    if let Some(c) = changed(conditions::KEYS_RESOLVED)
        && c.status == "False"
        && c.reason != "NotRendered"
    {
        out.push(Transition {
            warning: true,
            reason: key_problem_event_reason(&c.reason),
            note: c.message,
        });
    }
    // Ready's own reasons (the others are the events above).
    if let Some(c) = changed(conditions::READY)
        && c.status == "False"
        && c.reason == "SidecarImageNotAllowed"
    {
        out.push(Transition {
            warning: true,
            reason: c.reason.clone(),
            note: c.message,
        });
    }
    if let Some(c) = became_ready(old_conditions, &new.conditions) {
        out.push(c);
    }
    out
}

/// The `Ready` Event when `Ready` is True in `new` and was not in `old`.
fn became_ready(old: &[Condition], new: &[Condition]) -> Option<Transition> {
    let c = find_condition(new, conditions::READY).filter(|c| c.status == "True")?;
    (!is_true(old, conditions::READY)).then(|| Transition {
        warning: false,
        reason: "Ready".to_owned(),
        note: c.message,
    })
}

/// The Events that mark the difference between two ProviderKey statuses: its key going missing
/// or becoming unusable (`KeyMissing`, `KeyEmpty`, ...), found again (`SecretFound`), a reason it
/// is not served (`InvalidBaseURL`, `DuplicateAlias`), and the key becoming ready.
pub fn provider_key_transitions(
    old: Option<&ProviderKeyStatus>,
    new: &ProviderKeyStatus,
) -> Vec<Transition> {
    let old = old.map(|o| o.conditions.as_slice()).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(c) = changed_condition(old, &new.conditions, conditions::SECRET_FOUND) {
        if c.status == "False" {
            out.push(Transition {
                warning: true,
                reason: key_problem_event_reason(&c.reason),
                note: c.message,
            });
        } else if find_condition(old, conditions::SECRET_FOUND).is_some() {
            out.push(Transition {
                warning: false,
                reason: "SecretFound".to_owned(),
                note: c.message,
            });
        }
    }
    // Not ready for a reason of its own (the Secret's is the event above).
    if let Some(c) = changed_condition(old, &new.conditions, conditions::READY)
        && c.status == "False"
        && is_true(&new.conditions, conditions::SECRET_FOUND)
    {
        out.push(Transition {
            warning: true,
            reason: c.reason.clone(),
            note: c.message,
        });
    }
    out.extend(became_ready(old, &new.conditions));
    out
}

/// What a ProviderKey reconcile found.
#[derive(Debug, Clone, Copy)]
pub struct KeyObservation<'a> {
    /// `metadata.generation` reconciled.
    pub generation: Option<i64>,
    /// Whether its key resolved from its Secret.
    pub resolved: Result<(), &'a KeyProblem>,
    /// Why its baseURL is refused, if it is.
    pub base_url_problem: Option<&'a str>,
    /// The ProviderKey whose key a gateway selecting both serves instead (same provider and
    /// alias, older, valid).
    pub shadowed_by: Option<&'a str>,
}

/// The status of a ProviderKey given what its reconcile found.
pub fn provider_key_status(
    previous: Option<&ProviderKeyStatus>,
    obs: KeyObservation<'_>,
    provider_alias: (&str, &str),
    now: &Time,
) -> ProviderKeyStatus {
    let KeyObservation {
        generation,
        resolved,
        base_url_problem,
        shadowed_by,
    } = obs;
    let secret = match resolved {
        Ok(()) => Cond::new(
            conditions::SECRET_FOUND,
            true,
            "SecretFound",
            "key found in Secret",
        ),
        Err(p) => Cond::new(conditions::SECRET_FOUND, false, p.reason, p.to_string()),
    };
    let (provider, alias) = provider_alias;
    let ready = match (&secret.ok, base_url_problem, shadowed_by) {
        (false, _, _) => Cond::new(
            conditions::READY,
            false,
            &secret.reason,
            secret.message.clone(),
        ),
        (true, Some(why), _) => Cond::new(
            conditions::READY,
            false,
            "InvalidBaseURL",
            format!("baseURL {why}"),
        ),
        (true, None, Some(first)) => Cond::new(
            conditions::READY,
            false,
            "DuplicateAlias",
            format!(
                "{provider}/{alias} is also provided by ProviderKey {first}, which is older (or as old and first by name): gateways that select both serve its key, not this one"
            ),
        ),
        (true, None, None) => Cond::new(
            conditions::READY,
            true,
            "Ready",
            "key can be served by gateways that select it",
        ),
    };
    let prev = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    ProviderKeyStatus {
        conditions: merge_conditions(prev, &[secret, ready], generation, now),
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn rendered(problems: Vec<KeyProblem>, keys: u32) -> RenderSummary {
        RenderSummary {
            hash: "sha256:abc".into(),
            provider_keys: vec![ProviderAliases {
                provider: "openai".into(),
                aliases: vec!["default".into()],
            }],
            key_count: keys,
            problems,
            objects: ("sidegate-main".into(), "sidegate-main-keys".into()),
        }
    }

    fn cond<'a>(s: &'a AIGatewayStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    fn missing_key() -> KeyProblem {
        KeyProblem {
            source: "ProviderKey openai-main".into(),
            reason: "KeyNotFound",
            detail: "Secret llm-keys has no key 'api-key'".into(),
        }
    }

    #[test]
    fn a_clean_render_is_ready() {
        let obs = GatewayObservation {
            generation: Some(2),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let s = gateway_status(None, &obs, &at(100));
        assert_eq!(cond(&s, conditions::READY).status, "True");
        assert_eq!(
            cond(&s, conditions::KEYS_RESOLVED).message,
            "1 key(s): openai [default]"
        );
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.config_hash.as_deref(), Some("sha256:abc"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
    }

    #[test]
    fn a_missing_key_makes_keys_resolved_and_ready_false_with_an_actionable_message() {
        let obs = GatewayObservation {
            generation: Some(1),
            selected_keys: 2,
            rendered: Some(rendered(vec![missing_key()], 1)),
            ..GatewayObservation::default()
        };
        let s = gateway_status(None, &obs, &at(100));
        let keys = cond(&s, conditions::KEYS_RESOLVED);
        assert_eq!(
            (keys.status.as_str(), keys.reason.as_str()),
            ("False", "KeyNotFound")
        );
        assert_eq!(
            keys.message,
            "ProviderKey openai-main: Secret llm-keys has no key 'api-key'; 1 other key(s) rendered"
        );
        assert_eq!(cond(&s, conditions::READY).status, "False");
        assert_eq!(cond(&s, conditions::CONFIG_RENDERED).status, "True");
    }

    #[test]
    fn a_sidecar_image_the_operator_does_not_inject_makes_ready_false_with_a_warning() {
        let ok = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let first = gateway_status(None, &ok, &at(100));
        let refused = GatewayObservation {
            generation: Some(2),
            sidecar_image_refused: Some("spec.sidecar.image \"evil:1\" is not allowed".into()),
            ..ok.clone()
        };
        let s = gateway_status(Some(&first), &refused, &at(200));
        let ready = cond(&s, conditions::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "SidecarImageNotAllowed")
        );
        assert!(ready.message.contains("evil:1"), "{}", ready.message);
        assert_eq!(cond(&s, conditions::CONFIG_RENDERED).status, "True");
        assert_eq!(cond(&s, conditions::KEYS_RESOLVED).status, "True");
        let t = gateway_transitions(Some(&first), &s);
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(t[0].warning && t[0].reason == "SidecarImageNotAllowed");
        // Once only.
        let again = gateway_status(Some(&s), &refused, &at(300));
        assert!(gateway_transitions(Some(&s), &again).is_empty());
    }

    #[test]
    fn an_invalid_spec_keeps_the_last_rendered_hash() {
        let good = gateway_status(
            None,
            &GatewayObservation {
                generation: Some(1),
                selected_keys: 1,
                rendered: Some(rendered(vec![], 1)),
                ..GatewayObservation::default()
            },
            &at(100),
        );
        let bad = gateway_status(
            Some(&good),
            &GatewayObservation {
                generation: Some(2),
                spec_problems: vec!["cache.ttl 10s must be between 60s and 30d".into()],
                ..GatewayObservation::default()
            },
            &at(200),
        );
        let c = cond(&bad, conditions::CONFIG_RENDERED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(
            c.message
                .contains("cache.ttl 10s must be between 60s and 30d")
        );
        assert_eq!(bad.config_hash, good.config_hash);
        assert_eq!(cond(&bad, conditions::READY).status, "False");
    }

    #[test]
    fn pods_without_the_sidecar_are_counted_and_each_new_count_is_a_warning_naming_them() {
        use crate::pods::UninjectedPods;
        let observe = |count: Option<u32>| GatewayObservation {
            generation: Some(1),
            rendered: Some(rendered(vec![], 1)),
            uninjected_pods: count.map(|count| UninjectedPods {
                count,
                names: (0..count.min(5)).map(|i| format!("app-{i}")).collect(),
            }),
            ..GatewayObservation::default()
        };
        let none = gateway_status(None, &observe(Some(0)), &at(100));
        assert_eq!(none.uninjected_pods, Some(0));
        assert_eq!(
            uninjected_pods_transition(None, &observe(Some(0)), "main"),
            None
        );

        let two = gateway_status(Some(&none), &observe(Some(2)), &at(200));
        assert_eq!(two.uninjected_pods, Some(2));
        assert!(status_changed(Some(&none), &two));
        let t =
            uninjected_pods_transition(Some(&none), &observe(Some(2)), "main").expect("an Event");
        assert!(t.warning);
        assert_eq!(t.reason, "UninjectedPods");
        assert!(
            t.note.contains("app-0, app-1") && t.note.contains("restart them"),
            "{}",
            t.note
        );
        assert_eq!(
            uninjected_pods_transition(Some(&two), &observe(Some(2)), "main"),
            None,
            "the same count again is no new Event"
        );

        // Not counted this time (the pods could not be listed): the last count stays.
        let unknown = gateway_status(Some(&two), &observe(None), &at(300));
        assert_eq!(unknown.uninjected_pods, Some(2));
        assert_eq!(
            uninjected_pods_transition(Some(&two), &observe(None), "main"),
            None
        );

        let gone =
            uninjected_pods_transition(Some(&two), &observe(Some(0)), "main").expect("an Event");
        assert_eq!(
            (gone.warning, gone.reason.as_str()),
            (false, "AllPodsInjected")
        );
    }

    #[test]
    fn pods_with_an_outdated_sidecar_are_counted_and_each_new_count_is_a_warning() {
        use crate::pods::OutdatedPods;
        let observe = |count: Option<u32>| GatewayObservation {
            generation: Some(1),
            rendered: Some(rendered(vec![], 1)),
            outdated_pods: count.map(|count| OutdatedPods {
                count,
                names: (0..count.min(5)).map(|i| format!("app-{i}")).collect(),
                ..OutdatedPods::default()
            }),
            ..GatewayObservation::default()
        };
        // Not compared (the operator does not know how its webhook injects): no field.
        let unknown = gateway_status(None, &observe(None), &at(100));
        assert_eq!(unknown.outdated_pods, None);

        let none = gateway_status(None, &observe(Some(0)), &at(100));
        assert_eq!(none.outdated_pods, Some(0));
        assert_eq!(
            outdated_pods_transition(None, &observe(Some(0)), "main"),
            None
        );
        let two = gateway_status(Some(&none), &observe(Some(2)), &at(200));
        assert_eq!(two.outdated_pods, Some(2));
        assert!(status_changed(Some(&none), &two));
        let t = outdated_pods_transition(Some(&none), &observe(Some(2)), "main").expect("an Event");
        assert!(t.warning);
        assert_eq!(t.reason, "OutdatedSidecars");
        assert!(
            t.note.contains("app-0, app-1") && t.note.contains("restart them"),
            "{}",
            t.note
        );
        assert_eq!(
            outdated_pods_transition(Some(&two), &observe(Some(2)), "main"),
            None,
            "the same count again is no new Event"
        );
        assert_eq!(
            gateway_status(Some(&two), &observe(None), &at(300)).outdated_pods,
            Some(2),
            "not compared this time: the last count stays"
        );
        let gone =
            outdated_pods_transition(Some(&two), &observe(Some(0)), "main").expect("an Event");
        assert_eq!(
            (gone.warning, gone.reason.as_str()),
            (false, "AllSidecarsCurrent")
        );
    }

    #[test]
    fn an_unchanged_observation_produces_an_identical_status_so_nothing_is_written() {
        let obs = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let first = gateway_status(None, &obs, &at(100));
        let again = gateway_status(Some(&first), &obs, &at(900));
        assert!(!status_changed(Some(&first), &again));
        assert!(gateway_transitions(Some(&first), &again).is_empty());
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let ok = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let broken = GatewayObservation {
            rendered: Some(rendered(vec![missing_key()], 0)),
            ..ok.clone()
        };
        let s1 = gateway_status(None, &ok, &at(100));
        let s2 = gateway_status(Some(&s1), &broken, &at(200));
        assert_eq!(
            cond(&s2, conditions::CONFIG_RENDERED).last_transition_time,
            at(100)
        );
        assert_eq!(
            cond(&s2, conditions::KEYS_RESOLVED).last_transition_time,
            at(200)
        );
    }

    #[test]
    fn events_mark_render_problems_and_recovery() {
        let ok = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let first = gateway_status(None, &ok, &at(100));
        let reasons = |t: Vec<Transition>| t.into_iter().map(|t| t.reason).collect::<Vec<_>>();
        assert_eq!(
            reasons(gateway_transitions(None, &first)),
            ["Rendered", "Ready"]
        );

        let mut broken_render = rendered(vec![missing_key()], 0);
        broken_render.hash = "sha256:def".into();
        let broken = gateway_status(
            Some(&first),
            &GatewayObservation {
                rendered: Some(broken_render),
                ..ok.clone()
            },
            &at(200),
        );
        let t = gateway_transitions(Some(&first), &broken);
        assert_eq!(reasons(t.clone()), ["Rendered", "KeyMissing"]);
        assert!(t[1].warning);
        assert!(t[1].note.contains("Secret llm-keys has no key 'api-key'"));

        let healed = gateway_status(Some(&broken), &ok, &at(300));
        assert_eq!(
            reasons(gateway_transitions(Some(&broken), &healed)),
            ["Rendered", "Ready"]
        );
    }

    #[test]
    fn a_failed_write_is_not_ready_for_this_generation_and_warns() {
        let ok = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let first = gateway_status(None, &ok, &at(100));
        let failed = GatewayObservation {
            generation: Some(2),
            selected_keys: 1,
            failure: Some(Failure {
                reason: "ApplyFailed",
                message: "applying Secret team-a/sidegate-main-keys: field is immutable".into(),
            }),
            ..GatewayObservation::default()
        };
        let s = gateway_status(Some(&first), &failed, &at(200));
        for t in [conditions::CONFIG_RENDERED, conditions::READY] {
            let c = cond(&s, t);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "ApplyFailed"),
                "{t}"
            );
            assert!(c.message.contains("field is immutable"), "{}", c.message);
            assert_eq!(c.observed_generation, Some(2));
        }
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.config_hash, first.config_hash, "what pods have");
        let t = gateway_transitions(Some(&first), &s);
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(t[0].warning && t[0].reason == "ApplyFailed");

        // A new gateway whose first write fails gets conditions too.
        let s = gateway_status(None, &failed, &at(200));
        assert_eq!(cond(&s, conditions::READY).reason, "ApplyFailed");
    }

    #[test]
    fn keys_rendered_around_an_invalid_spec_are_reported_as_such() {
        let ok = GatewayObservation {
            generation: Some(1),
            selected_keys: 1,
            rendered: Some(rendered(vec![], 1)),
            ..GatewayObservation::default()
        };
        let first = gateway_status(None, &ok, &at(100));
        let mut keys_only = rendered(vec![], 0);
        keys_only.hash = "sha256:def".into();
        let s = gateway_status(
            Some(&first),
            &GatewayObservation {
                generation: Some(2),
                spec_problems: vec!["cache.ttl 10s must be between 60s and 30d".into()],
                selected_keys: 0,
                rendered: Some(keys_only),
                failure: None,
                sidecar_image_refused: None,
                uninjected_pods: None,
                outdated_pods: None,
            },
            &at(200),
        );
        let c = cond(&s, conditions::CONFIG_RENDERED);
        assert_eq!(c.reason, "InvalidSpec");
        assert!(
            c.message
                .contains("its keys follow the ProviderKeys and Secrets"),
            "{}",
            c.message
        );
        assert_eq!(s.config_hash.as_deref(), Some("sha256:def"));
        let reasons: Vec<String> = gateway_transitions(Some(&first), &s)
            .into_iter()
            .map(|t| t.reason)
            .collect();
        assert_eq!(reasons, ["InvalidSpec", "KeysRendered"]);
    }

    #[test]
    fn provider_key_status_names_the_missing_secret() {
        let p = KeyProblem {
            source: "ProviderKey openai-main".into(),
            reason: "SecretNotFound",
            detail: "Secret llm-keys not found".into(),
        };
        let obs = |resolved, shadowed_by| KeyObservation {
            generation: Some(1),
            resolved,
            base_url_problem: None,
            shadowed_by,
        };
        let s = provider_key_status(None, obs(Err(&p), None), ("openai", "default"), &at(1));
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .expect("ready");
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message,
            "ProviderKey openai-main: Secret llm-keys not found"
        );
        let ok = provider_key_status(Some(&s), obs(Ok(()), None), ("openai", "default"), &at(2));
        assert!(ok.conditions.iter().all(|c| c.status == "True"));

        // The losing ProviderKey of a duplicate alias is found but not ready.
        let lost = provider_key_status(
            Some(&ok),
            obs(Ok(()), Some("openai-a")),
            ("openai", "default"),
            &at(3),
        );
        let ready = lost
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DuplicateAlias")
        );
        assert!(
            ready.message.contains("ProviderKey openai-a"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn provider_key_events_mark_a_missing_key_its_recovery_and_other_reasons_once() {
        let missing = KeyProblem {
            source: "ProviderKey openai-main".into(),
            reason: "KeyNotFound",
            detail: "Secret llm-keys has no key 'api-key'".into(),
        };
        let obs = |resolved, base_url_problem, shadowed_by| KeyObservation {
            generation: Some(1),
            resolved,
            base_url_problem,
            shadowed_by,
        };
        let status = |prev, o| provider_key_status(prev, o, ("openai", "default"), &at(1));
        let events = |old: Option<&ProviderKeyStatus>, new: &ProviderKeyStatus| {
            provider_key_transitions(old, new)
                .into_iter()
                .map(|t| (t.warning, t.reason))
                .collect::<Vec<_>>()
        };
        let w = |r: &str| (true, r.to_owned());
        let n = |r: &str| (false, r.to_owned());

        let first = status(None, obs(Err(&missing), None, None));
        assert_eq!(events(None, &first), [w("KeyMissing")]);
        let t = provider_key_transitions(None, &first);
        assert!(t[0].note.contains("has no key 'api-key'"), "{}", t[0].note);
        // Nothing changed, nothing said.
        let again = status(Some(&first), obs(Err(&missing), None, None));
        assert!(events(Some(&first), &again).is_empty());

        let found = status(Some(&again), obs(Ok(()), None, None));
        assert_eq!(events(Some(&again), &found), [n("SecretFound"), n("Ready")]);
        // A key that is ready from the start is only Ready.
        assert_eq!(events(None, &found), [n("Ready")]);

        let bad_url = status(
            Some(&found),
            obs(Ok(()), Some("'http://x' uses plain http"), None),
        );
        assert_eq!(events(Some(&found), &bad_url), [w("InvalidBaseURL")]);
        let shadowed = status(Some(&bad_url), obs(Ok(()), None, Some("openai-a")));
        assert_eq!(events(Some(&bad_url), &shadowed), [w("DuplicateAlias")]);
        let healed = status(Some(&shadowed), obs(Ok(()), None, None));
        assert_eq!(events(Some(&shadowed), &healed), [n("Ready")]);
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let s = truncate("é".repeat(3000));
        assert!(s.len() <= MAX_MESSAGE && s.ends_with("..."));
        // A condition message as long as allowed is too long for an Event note.
        let note = event_note(s);
        assert!(
            note.len() <= 1024 && note.ends_with("..."),
            "{}",
            note.len()
        );
        assert_eq!(event_note("short".into()), "short");
    }
}
