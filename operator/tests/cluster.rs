//! The operator against a real kube-apiserver (and kube-controller-manager for garbage
//! collection), started by `tests/cluster/`:
//!
//! ```text
//! tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster
//! ```
//!
//! The CRDs are applied from the committed manifests with `kubectl apply --server-side`, the RBAC
//! of `operator/rbac.yaml` is applied, and the controllers run in this process impersonating the
//! operator's ServiceAccount, so every test also proves those rules are sufficient.

mod common;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::lease::{LeaderElector, LeaseSettings};

use common::{cluster_client, create_test_namespace, eventually};
use support::*;

#[tokio::test]
async fn a_gateway_with_keys_renders_its_config_map_and_secret_and_reports_ready() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "render").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);

    create(
        &secrets,
        &secret(
            "llm-keys",
            &[("openai", "sk-one\n"), ("anthropic", "sk-ant")],
        ),
    )
    .await;
    create(&secrets, &secret("tokens", &[("token", "tok-1")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(
        &keys,
        &provider_key(
            "anthropic-main",
            "anthropic",
            "default",
            "llm-keys",
            "anthropic",
        ),
    )
    .await;
    let mut other = provider_key("other-team", "openai", "other", "llm-keys", "openai");
    other.metadata.labels = Some(BTreeMap::from([("team".into(), "b".into())]));
    create(&keys, &other).await;
    create(
        &gateways,
        &gateway(
            "main",
            json!({
                "providerKeySelector": {"matchLabels": {"team": "a"}},
                "authentication": {"enabled": true, "tokenSecretRef": {"name": "tokens", "key": "token"}},
                "requestTimeout": "30s",
            }),
        ),
    )
    .await;

    let gw = wait_ready(&gateways, "main").await;
    let status = gw.status.clone().expect("status");
    assert_eq!(status.key_count, Some(2));
    let hash = status.config_hash.clone().expect("hash");
    let providers: Vec<(String, Vec<String>)> = status
        .provider_keys
        .iter()
        .map(|p| (p.provider.clone(), p.aliases.clone()))
        .collect();
    assert_eq!(
        providers,
        [
            ("anthropic".to_owned(), vec!["default".to_owned()]),
            ("openai".to_owned(), vec!["default".to_owned()]),
        ]
    );

    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("sidegate-main")
        .await
        .expect("ConfigMap rendered");
    let yaml = &cm.data.as_ref().expect("data")["gateway.yaml"];
    let config: sidegate_crds::GatewayConfig =
        serde_saphyr::from_str(yaml).expect("gateway.yaml parses");
    assert_eq!(config.gateway.hash.as_deref(), Some(hash.as_str()));
    assert_eq!(config.gateway.namespace.as_deref(), Some(ns.name.as_str()));
    assert!(!yaml.contains("sk-one") && !yaml.contains("tok-1"));
    let owner = &cm.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AIGateway", "main")
    );
    assert_eq!(
        cm.managed_fields()
            .first()
            .and_then(|m| m.manager.as_deref()),
        Some("sidegate-operator")
    );

    let keys_secret = secrets
        .get("sidegate-main-keys")
        .await
        .expect("keys Secret rendered");
    assert_eq!(
        secret_value(&keys_secret, "openai.default").as_deref(),
        Some("sk-one")
    );
    assert_eq!(
        secret_value(&keys_secret, "anthropic.default").as_deref(),
        Some("sk-ant")
    );
    assert_eq!(
        secret_value(&keys_secret, "authentication.tokens").as_deref(),
        Some("tok-1")
    );
    assert!(
        secret_value(&keys_secret, "openai.other").is_none(),
        "not selected"
    );

    // Status never carries values.
    let status_json = serde_json::to_string(&status).expect("status serializes");
    assert!(!status_json.contains("sk-one") && !status_json.contains("sk-ant"));

    // The ProviderKey controller reports its own status.
    eventually("ProviderKey openai-main Ready", WAIT, || async {
        let pk = keys.get("openai-main").await.ok()?;
        pk.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn rotating_a_key_secret_re_renders_the_gateway_within_seconds() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "rotate").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-old")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(&gateways, &gateway("rot", json!({}))).await;
    let before = wait_ready(&gateways, "rot").await;
    let old_hash = before.status.and_then(|s| s.config_hash).expect("hash");

    let started = Instant::now();
    secrets
        .replace("llm-keys", &PostParams::default(), &{
            let mut s = secrets.get("llm-keys").await.expect("secret");
            s.data = secret("x", &[("openai", "sk-new")]).data;
            s
        })
        .await
        .expect("rotating the key");
    eventually("rotated key rendered", WAIT, || async {
        let s = secrets.get("sidegate-rot-keys").await.ok()?;
        (secret_value(&s, "openai.default").as_deref() == Some("sk-new")).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "rotation took {took:?}");
    let new_hash = eventually("new hash in status", WAIT, || async {
        let gw = gateways.get("rot").await.ok()?;
        let h = gw.status?.config_hash?;
        (h != old_hash).then_some(h)
    })
    .await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("sidegate-rot")
        .await
        .expect("cm");
    assert!(cm.data.expect("data")["gateway.yaml"].contains(&new_hash));
    ns.delete().await;
}

/// The hash salt in the keys Secret of gateway `gw`, once there is one other than `not`.
async fn salt_in_keys_secret(secrets: &Api<Secret>, gw: &str, not: Option<&str>) -> String {
    eventually("a hash salt in the keys Secret", WAIT, || async {
        let s = secrets.get(&format!("sidegate-{gw}-keys")).await.ok()?;
        secret_value(&s, ".hash-salt").filter(|salt| Some(salt.as_str()) != not)
    })
    .await
}

/// Fails if `salt` shows up anywhere a reader without access to Secrets could see it.
async fn assert_salt_unpublished(client: &kube::Client, ns: &str, gw: &str, salt: &str) {
    let status = Api::<AIGateway>::namespaced(client.clone(), ns)
        .get(gw)
        .await
        .expect("gateway")
        .status;
    let status = serde_json::to_string(&status).expect("status serializes");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&format!("sidegate-{gw}"))
        .await
        .expect("ConfigMap");
    let cm = serde_json::to_string(&cm).expect("ConfigMap serializes");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let events = events.list(&Default::default()).await.expect("events");
    let events = serde_json::to_string(&events.items).expect("events serialize");
    for (what, text) in [("status", status), ("ConfigMap", cm), ("Events", events)] {
        assert!(!text.contains(salt), "the hash salt is in the {what}");
    }
}

#[tokio::test]
async fn the_hash_salt_is_kept_across_reconciles_and_a_deleted_one_is_replaced() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "salt").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    // Its gateway token is the only secret file: with a plain digest, the public hash would
    // confirm a right guess of the token.
    create(&secrets, &secret("tokens", &[("token", "tok-1")])).await;
    create(
        &gateways,
        &gateway(
            "gw",
            json!({"authentication": {"enabled": true, "tokenSecretRef": {"name": "tokens", "key": "token"}}}),
        ),
    )
    .await;
    let hash = wait_ready(&gateways, "gw")
        .await
        .status
        .and_then(|s| s.config_hash)
        .expect("hash");
    let salt = salt_in_keys_secret(&secrets, "gw", None).await;
    assert_eq!(salt.len(), 64, "32 bytes in hex");
    assert!(salt.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_salt_unpublished(&client, &ns.name, "gw", &salt).await;

    // Reconciled again (an annotation, and a new generation that renders the same config):
    // the same salt, the same hash.
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touched": "yes"}}})),
        )
        .await
        .expect("annotating");
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"sidecar": {"image": "ghcr.io/sidegate/sidegate:other"}}}),
            ),
        )
        .await
        .expect("patching the sidecar image");
    let again = wait_ready(&gateways, "gw").await;
    assert_eq!(
        again.status.and_then(|s| s.config_hash).as_ref(),
        Some(&hash)
    );
    let s = secrets.get("sidegate-gw-keys").await.expect("keys Secret");
    assert_eq!(
        secret_value(&s, ".hash-salt").as_deref(),
        Some(salt.as_str())
    );

    // The salt entry deleted from the keys Secret: a new salt and hash, no failure.
    secrets
        .patch(
            "sidegate-gw-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {".hash-salt": null}})),
        )
        .await
        .expect("deleting the salt");
    let new_salt = salt_in_keys_secret(&secrets, "gw", Some(&salt)).await;
    let new_hash = eventually("a new hash in status", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        gw.status?.config_hash.filter(|h| *h != hash)
    })
    .await;
    let gw = wait_ready(&gateways, "gw").await;
    assert_eq!(
        gw.status.and_then(|s| s.config_hash).as_ref(),
        Some(&new_hash)
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("sidegate-gw")
        .await
        .expect("cm");
    assert!(cm.data.expect("data")["gateway.yaml"].contains(&new_hash));
    let s = secrets.get("sidegate-gw-keys").await.expect("keys Secret");
    assert_eq!(
        secret_value(&s, "authentication.tokens").as_deref(),
        Some("tok-1")
    );
    assert_salt_unpublished(&client, &ns.name, "gw", &new_salt).await;

    // While the spec is invalid the keys are rendered again around the last config: a revoked
    // token is replaced under the same salt.
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providers": {"openai": {"baseURL": "http://api.example.com/v1"}}}})),
        )
        .await
        .expect("patch");
    eventually("ConfigRendered=False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "ConfigRendered").filter(|c| c.1 == "InvalidSpec")
    })
    .await;
    secrets
        .patch(
            "tokens",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": "tok-2"}})),
        )
        .await
        .expect("rotating the token");
    let s = eventually("the rotated token rendered", WAIT, || async {
        let s = secrets.get("sidegate-gw-keys").await.ok()?;
        (secret_value(&s, "authentication.tokens").as_deref() == Some("tok-2")).then_some(s)
    })
    .await;
    assert_eq!(
        secret_value(&s, ".hash-salt").as_deref(),
        Some(new_salt.as_str())
    );
    ns.delete().await;
}

#[tokio::test]
async fn a_missing_secret_is_reported_in_status_and_events_then_healed_when_created() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "missing").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "api-key"),
    )
    .await;
    create(&gateways, &gateway("gw", json!({}))).await;

    let (_, reason, message) = eventually("KeysResolved=False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "KeysResolved").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.starts_with("ProviderKey openai-main: Secret llm-keys not found"),
        "{message}"
    );

    // The Secret appears without the key the ProviderKey names.
    create(&secrets, &secret("llm-keys", &[("other", "x")])).await;
    let (_, reason, message) = eventually("KeyNotFound reported", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "KeysResolved").filter(|c| c.1 == "KeyNotFound")
    })
    .await;
    assert_eq!(reason, "KeyNotFound");
    assert!(
        message.starts_with("ProviderKey openai-main: Secret llm-keys has no key 'api-key'"),
        "{message}"
    );

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &ns.name);
    eventually("a KeyMissing Warning event", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("KeyMissing") && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;

    // The ProviderKey says so too, in its own Events.
    let key_event = |reason: &'static str, type_: &'static str| {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some(type_)
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ProviderKey")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("openai-main")
            })
        }
    };
    let missing = eventually(
        "a KeyMissing Warning event of the ProviderKey",
        WAIT,
        || key_event("KeyMissing", "Warning"),
    )
    .await;
    assert!(
        missing
            .note
            .as_deref()
            .is_some_and(|n| n.contains("Secret llm-keys")),
        "{missing:?}"
    );

    // Healed: the key is added.
    secrets
        .patch(
            "llm-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"api-key": "sk-fixed"}})),
        )
        .await
        .expect("adding the key");
    let gw = wait_ready(&gateways, "gw").await;
    assert_eq!(gw.status.and_then(|s| s.key_count), Some(1));
    eventually(
        "SecretFound and Ready events of the ProviderKey",
        WAIT,
        || async {
            key_event("SecretFound", "Normal").await?;
            key_event("Ready", "Normal").await
        },
    )
    .await;
    ns.delete().await;
}

/// The notes of the Events of `reason` about `kind` `name` in `ns`.
async fn notes_about(
    client: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    reason: &str,
) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let Ok(list) = events.list(&Default::default()).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some(kind)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .filter_map(|e| e.note)
        .collect()
}

#[tokio::test]
async fn an_event_whose_reason_repeats_within_minutes_carries_its_own_text() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "event-text").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let notes = |kind: &'static str, name: &'static str, reason: &'static str, want: String| {
        let client = client.clone();
        let ns = ns.name.clone();
        move || {
            let (client, ns, want) = (client.clone(), ns.clone(), want.clone());
            async move {
                let notes = notes_about(&client, &ns, kind, name, reason).await;
                notes.iter().any(|n| n.contains(&want)).then_some(notes)
            }
        }
    };

    // A KeyMissing naming one Secret, then (within seconds) another.
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "first", "api-key"),
    )
    .await;
    create(&gateways, &gateway("gw", json!({}))).await;
    for (what, want) in [
        ("of the gateway", ("AIGateway", "gw")),
        ("of the ProviderKey", ("ProviderKey", "openai-main")),
    ] {
        eventually(
            &format!("a KeyMissing {what} naming Secret first"),
            WAIT,
            notes(want.0, want.1, "KeyMissing", "Secret first".into()),
        )
        .await;
    }
    keys.patch(
        "openai-main",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"secretRef": {"name": "second"}}})),
    )
    .await
    .expect("patch ProviderKey");
    for (what, want) in [
        ("of the gateway", ("AIGateway", "gw")),
        ("of the ProviderKey", ("ProviderKey", "openai-main")),
    ] {
        let seen = eventually(
            &format!("a KeyMissing {what} naming Secret second"),
            WAIT,
            notes(want.0, want.1, "KeyMissing", "Secret second".into()),
        )
        .await;
        assert!(
            seen.iter().any(|n| n.contains("Secret first")),
            "the first text stays in its own Event: {seen:?}"
        );
    }

    // A Rendered Event per config hash, each naming its own.
    create(&secrets, &secret("second", &[("api-key", "sk-1")])).await;
    let first = wait_ready(&gateways, "gw")
        .await
        .status
        .and_then(|s| s.config_hash)
        .expect("hash");
    eventually(
        "a Rendered Event of the first hash",
        WAIT,
        notes("AIGateway", "gw", "Rendered", first.clone()),
    )
    .await;
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestTimeout": "45s"}})),
        )
        .await
        .expect("patch gateway");
    let second = eventually("a new hash in status", WAIT, || async {
        let h = gateways.get("gw").await.ok()?.status?.config_hash?;
        (h != first).then_some(h)
    })
    .await;
    let seen = eventually(
        "a Rendered Event of the second hash",
        WAIT,
        notes("AIGateway", "gw", "Rendered", second.clone()),
    )
    .await;
    assert!(seen.iter().any(|n| n.contains(&first)), "{seen:?}");
    ns.delete().await;
}

#[tokio::test]
async fn the_recorder_counts_an_identical_event_up_and_writes_another_text_anew() {
    use kube::runtime::events::{Event, EventType, Reporter};
    use sidegate_operator::events::Recorder;
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "event-series").await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let gw = create(&gateways, &gateway("gw", json!({}))).await;
    let reference = kube::Resource::object_ref(&gw, &());
    // As the operator's ServiceAccount: its RBAC allows creating and patching Events.
    let mut config = kube::Config::infer().await.expect("kubeconfig");
    config.auth_info.impersonate = Some(OPERATOR_SA.into());
    let recorder = Recorder::new(
        kube::Client::try_from(config).expect("client"),
        Reporter {
            controller: "sidegate-test".to_owned(),
            instance: None,
        },
    );
    let note = |n: &str| Event {
        type_: EventType::Warning,
        reason: "TestReason".to_owned(),
        note: Some(n.to_owned()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    for n in ["first", "first", "second", "first"] {
        recorder
            .publish(&note(n), &reference)
            .await
            .expect("published");
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &ns.name);
    let mut seen: Vec<(String, Option<i32>)> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("TestReason"))
        .map(|e| (e.note.unwrap_or_default(), e.series.map(|s| s.count)))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("first".to_owned(), Some(3)), ("second".to_owned(), None)]
    );
    ns.delete().await;
}

#[tokio::test]
async fn deleting_a_gateway_garbage_collects_its_config_map_and_secret() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "gc").await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    create(&gateways, &gateway("doomed", json!({}))).await;
    wait_ready(&gateways, "doomed").await;
    assert!(cms.get_opt("sidegate-doomed").await.expect("get").is_some());

    gateways
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("deleting the gateway");
    eventually(
        "ConfigMap and Secret collected",
        Duration::from_secs(60),
        || async {
            let cm = cms.get_opt("sidegate-doomed").await.ok()?;
            let s = secrets.get_opt("sidegate-doomed-keys").await.ok()?;
            (cm.is_none() && s.is_none()).then_some(())
        },
    )
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn an_invalid_but_schema_valid_spec_is_a_condition_and_keeps_the_last_config() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "invalid").await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&gateways, &gateway("gw", json!({}))).await;
    let ready = wait_ready(&gateways, "gw").await;
    let hash = ready.status.and_then(|s| s.config_hash);

    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providers": {"openai": {"baseURL": "http://api.example.com/v1"}}}})),
        )
        .await
        .expect("patch");
    let (_, reason, message) = eventually("ConfigRendered=False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "ConfigRendered").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("providers.openai.baseURL 'http://api.example.com/v1' uses plain http outside the cluster"), "{message}");
    let gw = gateways.get("gw").await.expect("gw");
    assert_eq!(
        gw.status.and_then(|s| s.config_hash),
        hash,
        "last good config stays"
    );
    ns.delete().await;
}

async fn has_event(client: &kube::Client, ns: &str, reason: &str, type_: &str) -> Option<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&Default::default()).await.ok()?;
    list.items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some(type_))
        .map(|e| e.note.unwrap_or_default())
}

#[tokio::test]
async fn while_the_spec_is_invalid_rotated_and_deleted_keys_still_reach_the_keys_secret() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "invalid-keys").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("llm-keys", &[("openai", "sk-old"), ("anthropic", "sk-ant")]),
    )
    .await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(
        &keys,
        &provider_key(
            "anthropic-main",
            "anthropic",
            "default",
            "llm-keys",
            "anthropic",
        ),
    )
    .await;
    create(&gateways, &gateway("gw", json!({"requestTimeout": "30s"}))).await;
    wait_ready(&gateways, "gw").await;
    let policy_before = {
        let cm = cms.get("sidegate-gw").await.expect("cm");
        let config: sidegate_crds::GatewayConfig =
            serde_saphyr::from_str(&cm.data.expect("data")["gateway.yaml"]).expect("parses");
        config.spec
    };

    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestTimeout": "45s", "providers": {"openai": {"baseURL": "http://api.example.com/v1"}}}})),
        )
        .await
        .expect("patch");
    eventually("ConfigRendered=False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "ConfigRendered").filter(|c| c.1 == "InvalidSpec")
    })
    .await;

    // The OpenAI key is rotated (the old one revoked) and the Anthropic ProviderKey deleted.
    secrets
        .patch(
            "llm-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"openai": "sk-new"}})),
        )
        .await
        .expect("rotating");
    keys.delete("anthropic-main", &DeleteParams::default())
        .await
        .expect("deleting a ProviderKey");
    eventually("the keys Secret follows", WAIT, || async {
        let s = secrets.get("sidegate-gw-keys").await.ok()?;
        (secret_value(&s, "openai.default").as_deref() == Some("sk-new")
            && secret_value(&s, "anthropic.default").is_none())
        .then_some(())
    })
    .await;
    let gw = eventually("status of the keys-only render", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        (gw.status.as_ref()?.key_count == Some(1)).then_some(gw)
    })
    .await;
    let cm = cms.get("sidegate-gw").await.expect("cm");
    let config: sidegate_crds::GatewayConfig =
        serde_saphyr::from_str(&cm.data.expect("data")["gateway.yaml"]).expect("parses");
    assert_eq!(config.spec, policy_before, "the last good policy stays");
    assert_eq!(
        config.keys,
        BTreeMap::from([("openai".to_owned(), vec!["default".to_owned()])])
    );
    let status = gw.status.clone().expect("status");
    assert_eq!(config.gateway.hash, status.config_hash);
    let (rendered, reason, message) = condition(&gw, "ConfigRendered").expect("condition");
    assert_eq!(
        (rendered.as_str(), reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        message.contains("its keys follow the ProviderKeys and Secrets"),
        "{message}"
    );
    assert_eq!(condition(&gw, "Ready").expect("Ready").0, "False");
    let note = eventually("a KeysRendered event", WAIT, || {
        has_event(&client, &ns.name, "KeysRendered", "Normal")
    })
    .await;
    assert!(
        note.contains("the last rendered config stays in use"),
        "{note}"
    );

    // Fixed, the whole spec is rendered again.
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providers": null}})),
        )
        .await
        .expect("patch");
    let gw = wait_ready(&gateways, "gw").await;
    let cm = cms.get("sidegate-gw").await.expect("cm");
    assert!(cm.data.expect("data")["gateway.yaml"].contains("requestTimeout: 45s"));
    assert_eq!(gw.status.and_then(|s| s.key_count), Some(1));
    ns.delete().await;
}

#[tokio::test]
async fn a_failed_write_is_reported_for_the_current_generation_and_retried() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "apply-fail").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-old")])).await;
    create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(&gateways, &gateway("gw", json!({}))).await;
    wait_ready(&gateways, "gw").await;

    // Someone marks the rendered Secret immutable: the apiserver refuses new key data.
    secrets
        .patch(
            "sidegate-gw-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"immutable": true})),
        )
        .await
        .expect("marking immutable");
    secrets
        .patch(
            "llm-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"openai": "sk-new"}})),
        )
        .await
        .expect("rotating");
    let generation = gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requestTimeout": "45s"}})),
        )
        .await
        .expect("patch")
        .metadata
        .generation;
    // The rotation alone may fail a reconcile of the previous generation first.
    let gw = eventually("Ready=False ApplyFailed", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        let ready = condition(&gw, "Ready")?;
        let current = gw.status.as_ref()?.observed_generation == generation;
        (ready.1 == "ApplyFailed" && current).then_some(gw)
    })
    .await;
    let status = gw.status.clone().expect("status");
    assert_eq!(status.observed_generation, generation);
    for t in ["Ready", "ConfigRendered"] {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ApplyFailed")
        );
        assert_eq!(c.observed_generation, generation);
        assert!(
            c.message.contains("applying Secret") && c.message.contains("immutable"),
            "{}",
            c.message
        );
    }
    let status_json = serde_json::to_string(&status).expect("json");
    assert!(!status_json.contains("sk-new") && !status_json.contains("sk-old"));
    eventually("an ApplyFailed Warning event", WAIT, || {
        has_event(&client, &ns.name, "ApplyFailed", "Warning")
    })
    .await;

    // Retried: once the Secret is gone, the gateway heals.
    secrets
        .delete("sidegate-gw-keys", &DeleteParams::default())
        .await
        .expect("deleting");
    wait_ready(&gateways, "gw").await;
    let s = secrets.get("sidegate-gw-keys").await.expect("re-rendered");
    assert_eq!(
        secret_value(&s, "openai.default").as_deref(),
        Some("sk-new")
    );
    ns.delete().await;
}

#[tokio::test]
async fn an_existing_secret_of_the_rendered_name_is_not_taken_over() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "not-owned").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    // The user's own Secret, which happens to have the name the gateway's keys would get.
    create(
        &secrets,
        &secret("sidegate-gw-keys", &[("mine", "precious")]),
    )
    .await;
    create(&gateways, &gateway("gw", json!({}))).await;

    let (_, reason, message) = eventually("ConfigRendered=False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "ConfigRendered").filter(|c| c.0 == "False" && c.1 != "NotRendered")
    })
    .await;
    assert_eq!(reason, "ObjectNotOwned");
    assert!(
        message.contains("Secret")
            && message.contains("sidegate-gw-keys")
            && message.contains("does not take it over"),
        "{message}"
    );
    let gw = gateways.get("gw").await.expect("gw");
    assert_eq!(condition(&gw, "Ready").expect("Ready").1, "ObjectNotOwned");
    eventually("an ObjectNotOwned Warning event", WAIT, || {
        has_event(&client, &ns.name, "ObjectNotOwned", "Warning")
    })
    .await;
    // Untouched: no owner (deleting the gateway would delete it), same data, no ConfigMap
    // pointing pods at it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = secrets.get("sidegate-gw-keys").await.expect("secret");
    assert!(
        s.owner_references().is_empty(),
        "{:?}",
        s.owner_references()
    );
    assert_eq!(secret_value(&s, "mine").as_deref(), Some("precious"));
    assert_eq!(s.data.as_ref().map(BTreeMap::len), Some(1));
    assert!(cms.get_opt("sidegate-gw").await.expect("get").is_none());

    // Once the user's Secret is gone, the gateway renders.
    secrets
        .delete("sidegate-gw-keys", &DeleteParams::default())
        .await
        .expect("deleting");
    wait_ready(&gateways, "gw").await;
    ns.delete().await;
}

#[tokio::test]
async fn the_losing_provider_key_of_a_duplicate_alias_is_not_ready_until_the_first_is_gone() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "dup-alias").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    create(
        &secrets,
        &secret("llm-keys", &[("a", "sk-a"), ("b", "sk-b")]),
    )
    .await;
    create(
        &keys,
        &provider_key("openai-a", "openai", "default", "llm-keys", "a"),
    )
    .await;
    create(
        &keys,
        &provider_key("openai-b", "openai", "default", "llm-keys", "b"),
    )
    .await;
    let ready = |name: &'static str| {
        let keys = keys.clone();
        async move {
            let pk = keys.get(name).await.ok()?;
            pk.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.status, c.reason, c.message))
        }
    };
    eventually("openai-a Ready", WAIT, || async {
        ready("openai-a").await.filter(|c| c.0 == "True")
    })
    .await;
    let (_, reason, message) = eventually("openai-b not Ready", WAIT, || async {
        ready("openai-b").await.filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "DuplicateAlias");
    assert!(message.contains("ProviderKey openai-a"), "{message}");

    // The first one deleted, the other is the one served.
    keys.delete("openai-a", &DeleteParams::default())
        .await
        .expect("deleting");
    eventually("openai-b Ready", WAIT, || async {
        ready("openai-b").await.filter(|c| c.0 == "True")
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_gateway_naming_a_sidecar_image_the_operator_does_not_inject_says_so_in_ready() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "image").await;
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(
        &gateways,
        &gateway(
            "gw",
            json!({"sidecar": {"image": "attacker.example/sidegate:1"}}),
        ),
    )
    .await;
    let (_, reason, message) = eventually("Ready False", WAIT, || async {
        let gw = gateways.get("gw").await.ok()?;
        condition(&gw, "Ready").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "SidecarImageNotAllowed");
    assert!(
        message.contains("attacker.example/sidegate:1")
            && message.contains("--allowed-sidecar-images"),
        "{message}"
    );
    let note = eventually("a SidecarImageNotAllowed Event", WAIT, || {
        has_event(&client, &ns.name, "SidecarImageNotAllowed", "Warning")
    })
    .await;
    assert!(note.contains("attacker.example/sidegate:1"), "{note}");

    // The config is rendered all the same; another tag of the operator's image is fine.
    let gw = gateways.get("gw").await.expect("gateway");
    assert_eq!(
        condition(&gw, "ConfigRendered").map(|c| c.0).as_deref(),
        Some("True")
    );
    gateways
        .patch(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"sidecar": {"image": "ghcr.io/sidegate/sidegate:other"}}}),
            ),
        )
        .await
        .expect("patching the sidecar image");
    wait_ready(&gateways, "gw").await;
    ns.delete().await;
}

/// Waits until the apiserver's clock (the machine's: it runs on loopback) is past the second of
/// `created`, so that objects created next are younger than it: creation times have whole
/// seconds, and objects of the same second are ordered by name.
async fn until_after_creation_second_of(
    created: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) {
    while k8s_openapi::jiff::Timestamp::now().as_second() <= created.0.as_second() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_older_provider_key_keeps_its_alias_and_base_url_when_a_newer_one_tries_to_take_them() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "hijack").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Api<ProviderKey> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    create(&secrets, &secret("llm-keys", &[("openai", "sk-real")])).await;
    create(&secrets, &secret("db", &[("password", "hunter2")])).await;
    create(&secrets, &secret("mine", &[("key", "sk-newcomer")])).await;
    let real = create(
        &keys,
        &provider_key("openai-main", "openai", "default", "llm-keys", "openai"),
    )
    .await;
    create(&gateways, &gateway("main", json!({}))).await;
    wait_ready(&gateways, "main").await;

    // Newcomers whose names sort first: one takes the default alias for another Secret of the
    // namespace, one asks for a base URL for its own alias.
    until_after_creation_second_of(real.metadata.creation_timestamp.as_ref().expect("created"))
        .await;
    let mut redirect = provider_key("0-evil", "openai", "evil", "mine", "key");
    redirect.spec.base_url = Some("https://attacker.example/v1".into());
    create(&keys, &redirect).await;
    create(
        &keys,
        &provider_key("00-evil-default", "openai", "default", "db", "password"),
    )
    .await;

    // A reconcile that saw the second newcomer (and so the first) reports the duplicate alias,
    // whichever ProviderKey lost it; what it rendered is written before its status.
    let gw = eventually("the duplicate alias reported", WAIT, || async {
        let gw = gateways.get("main").await.ok()?;
        let (_, _, message) = condition(&gw, "KeysResolved")?;
        message.contains("is also provided by").then_some(gw)
    })
    .await;
    let keys_secret = secrets
        .get("sidegate-main-keys")
        .await
        .expect("keys Secret");
    assert_eq!(
        secret_value(&keys_secret, "openai.default").as_deref(),
        Some("sk-real"),
        "the older ProviderKey keeps its alias"
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("sidegate-main")
        .await
        .expect("ConfigMap");
    let config: sidegate_crds::GatewayConfig =
        serde_saphyr::from_str(&cm.data.expect("data")["gateway.yaml"]).expect("parses");
    assert_eq!(
        config
            .spec
            .providers
            .get("openai")
            .and_then(|p| p.base_url.clone()),
        None,
        "openai keys still go to the provider's default URL"
    );
    assert_eq!(config.keys["openai"], ["default"]);
    assert_eq!(
        secret_value(&keys_secret, "openai.evil"),
        None,
        "the newcomer disagreeing on baseURL is withheld"
    );
    let (status, reason, message) = condition(&gw, "KeysResolved").expect("KeysResolved");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "DuplicateAlias")
    );
    assert!(
        message.contains("ProviderKey 00-evil-default: openai/default is also provided by ProviderKey openai-main")
            && message.contains("ProviderKey 0-evil: baseURL https://attacker.example/v1 differs from"),
        "{message}"
    );
    let note = eventually("a DuplicateAlias Event", WAIT, || {
        has_event(&client, &ns.name, "DuplicateAlias", "Warning")
    })
    .await;
    assert!(note.contains("ProviderKey openai-main"), "{note}");

    // The ProviderKeys say the same: the newcomer lost its alias to the older one.
    let ready = |name: &'static str| {
        let keys = keys.clone();
        async move {
            let pk = keys.get(name).await.ok()?;
            pk.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.status, c.reason, c.message))
        }
    };
    let (_, reason, message) = eventually("00-evil-default not Ready", WAIT, || async {
        ready("00-evil-default").await.filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "DuplicateAlias");
    assert!(message.contains("ProviderKey openai-main"), "{message}");
    eventually("openai-main Ready", WAIT, || async {
        ready("openai-main").await.filter(|c| c.0 == "True")
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn the_apiserver_rejects_invalid_resources_with_clear_messages() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "reject").await;
    let dyn_gateways: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<AIGateway>(&()),
    );
    let dyn_keys: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<ProviderKey>(&()),
    );

    async fn rejected(api: &Api<kube::api::DynamicObject>, obj: serde_json::Value) -> String {
        let obj: kube::api::DynamicObject = serde_json::from_value(obj).expect("object");
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => panic!("{} was accepted", obj.name_any()),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{s:?}");
                s.message
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let gw = |name: &str, spec: serde_json::Value| json!({"apiVersion": "sidegate.dev/v1alpha1", "kind": "AIGateway", "metadata": {"name": name}, "spec": spec});
    let pk = |name: &str, spec: serde_json::Value| json!({"apiVersion": "sidegate.dev/v1alpha1", "kind": "ProviderKey", "metadata": {"name": name}, "spec": spec});

    let cases = [
        (
            rejected(&dyn_gateways, gw("rl", json!({"rateLimit": {"limit": 0, "interval": "60s"}}))).await,
            "spec.rateLimit.limit: Invalid value: 0: spec.rateLimit.limit in body should be greater than or equal to 1",
        ),
        (
            rejected(&dyn_gateways, gw("retries", json!({"retries": {"maxAttempts": 6}}))).await,
            "spec.retries.maxAttempts in body should be less than or equal to 5",
        ),
        (
            rejected(&dyn_gateways, gw("delay", json!({"retries": {"maxAttempts": 2, "retryDelay": "10s"}}))).await,
            "retryDelay must be at most 5s",
        ),
        (
            rejected(&dyn_gateways, gw("auth", json!({"authentication": {"enabled": true}}))).await,
            "authentication.enabled needs tokenSecretRef",
        ),
        (
            rejected(&dyn_gateways, gw("cache", json!({"cache": {"enabled": true, "backend": "disk"}}))).await,
            "spec.cache.backend: Unsupported value: \"disk\": supported values: \"memory\", \"redis\"",
        ),
        (
            rejected(&dyn_gateways, gw("redis", json!({"cache": {"enabled": true, "backend": "redis"}}))).await,
            "cache.backend redis needs the redis block",
        ),
        (
            rejected(&dyn_gateways, gw("prov", json!({"providers": {"OpenAI": {"baseURL": "https://x.example"}}}))).await,
            "providers keys must be provider ids from SPEC.md or custom-<slug>",
        ),
        (
            rejected(&dyn_gateways, gw("dup", json!({"fallbacks": [
                {"name": "a", "targets": [{"provider": "openai", "model": "m"}]},
                {"name": "a", "targets": [{"provider": "openai", "model": "m"}]}]}))).await,
            "Duplicate value",
        ),
        (
            rejected(&dyn_gateways, gw("node", json!({"routes": [{"name": "r", "nodes": [
                {"id": "s", "type": "start", "next": "m"}, {"id": "m", "type": "model", "next": "e"}, {"id": "e", "type": "end"}]}]}))).await,
            "a model node needs provider and model",
        ),
        (
            // The name is a label value of the objects the operator renders (at most 63).
            rejected(&dyn_gateways, gw(&"g".repeat(64), json!({}))).await,
            "AIGateway names are at most 63 characters",
        ),
        (
            // Admitted, it could not be decoded: the operator's list of every gateway would fail.
            rejected(&dyn_gateways, gw("ttl", json!({"cache": {"enabled": true, "ttl": "99999999999999999999s"}}))).await,
            "spec.cache.ttl in body should match",
        ),
        (
            rejected(&dyn_gateways, gw("weight", json!({"routes": [{"name": "r", "nodes": [
                {"id": "s", "type": "start", "next": "p"},
                {"id": "p", "type": "percentage", "branches": [{"weight": 4294967296u64, "next": "e"}]},
                {"id": "e", "type": "end"}]}]}))).await,
            "should be less than or equal to 1000000",
        ),
        (
            rejected(&dyn_gateways, gw("ttl-short", json!({"cache": {"enabled": true, "ttl": "59s"}}))).await,
            "cache.ttl must be between 60s and 30d",
        ),
        (
            rejected(&dyn_gateways, gw("ttl-long", json!({"cache": {"enabled": true, "ttl": "721h"}}))).await,
            "cache.ttl must be between 60s and 30d",
        ),
        (
            rejected(&dyn_gateways, gw("ttl-days", json!({"cache": {"enabled": true, "ttl": "999999999d"}}))).await,
            "cache.ttl must be between 60s and 30d",
        ),
        (
            rejected(&dyn_gateways, gw("dlp", json!({"dlp": {"policies": [
                {"id": "p", "action": "BLOCK", "check": ["REQUEST"], "profiles": ["iban"]}]}}))).await,
            "spec.dlp.policies[0].profiles[0]: Unsupported value: \"iban\"",
        ),
        (
            rejected(&dyn_gateways, gw("gore", json!({"guardrails": {
                "moderationURL": "https://moderation.example.com/v1/moderations", "prompt": {"gore": "block"}}}))).await,
            "categories are those of OpenAI's moderation API",
        ),
        (
            rejected(&dyn_gateways, gw("base", json!({"providers": {"openai": {"baseURL": "api.openai.com/v1"}}}))).await,
            "baseURL must be an absolute http(s) URL",
        ),
        (
            rejected(&dyn_gateways, gw("long", json!({"providers": {"openai": {"baseURL": format!("https://x.example/{}", "a".repeat(2048))}}}))).await,
            "spec.providers.openai.baseURL: Too long",
        ),
        (
            rejected(&dyn_keys, pk("bogus", json!({"provider": "bogus", "secretRef": {"name": "s", "key": "k"}}))).await,
            "spec.provider in body should match",
        ),
        (
            rejected(&dyn_keys, pk("bedrock", json!({"provider": "aws-bedrock", "secretRef": {"name": "s"}}))).await,
            "aws-bedrock keys need spec.region",
        ),
        (
            rejected(&dyn_keys, pk("nokey", json!({"provider": "openai", "secretRef": {"name": "s"}}))).await,
            "secretRef.key is required",
        ),
        (
            rejected(&dyn_keys, pk("url", json!({"provider": "openai", "secretRef": {"name": "s", "key": "k"}, "baseURL": "ftp://x.example/v1"}))).await,
            "baseURL must be an absolute http(s) URL",
        ),
        (
            rejected(&dyn_keys, pk("alias", json!({"provider": "openai", "alias": "a.b", "secretRef": {"name": "s", "key": "k"}}))).await,
            "spec.alias in body should match",
        ),
    ];
    for (message, expected) in cases {
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }

    // What the schema admitted before it checked TTLs, base URLs, profiles and categories, and
    // is valid, is still admitted.
    let admitted = [
        json!({"cache": {"enabled": true, "ttl": "60s"}}),
        json!({"cache": {"enabled": true, "ttl": "60000ms"}}),
        json!({"cache": {"enabled": true, "ttl": "1m"}}),
        json!({"cache": {"enabled": true, "ttl": "720h"}}),
        json!({"cache": {"enabled": true, "ttl": "30d"}}),
        json!({"providers": {
            "azure-openai": {"baseURL": "https://{resource}.openai.azure.com/openai/deployments/{deployment}"},
            "aws-bedrock": {"baseURL": "https://bedrock-runtime.{region}.amazonaws.com"},
            "google-vertex-ai": {"baseURL": "https://{region}-aiplatform.googleapis.com"},
            "workers-ai": {"baseURL": "https://api.cloudflare.com/client/v4/accounts/{account}/ai"},
            "openai": {"baseURL": "http://10.0.0.7:8080/v1"},
            "custom-ollama": {"baseURL": "http://ollama.models.svc.cluster.local:11434/v1"}}}),
        json!({"dlp": {"policies": [{"id": "p", "action": "FLAG", "check": ["REQUEST", "RESPONSE"],
            "profiles": sidegate_crds::policy::DLP_PROFILES}]}}),
        json!({"guardrails": {"moderationURL": "https://moderation.example.com/v1/moderations",
            "prompt": sidegate_crds::policy::GUARDRAIL_CATEGORIES.iter().map(|c| (*c, "block")).collect::<BTreeMap<_, _>>(),
            "response": {"violence/graphic": "flag"}}}),
    ];
    for (i, spec) in admitted.into_iter().enumerate() {
        let obj: kube::api::DynamicObject =
            serde_json::from_value(gw(&format!("admitted-{i}"), spec.clone())).expect("object");
        if let Err(e) = dyn_gateways.create(&PostParams::default(), &obj).await {
            panic!("{spec} was refused: {e}");
        }
    }
    ns.delete().await;
}

#[tokio::test]
async fn pods_created_before_their_gateway_run_without_the_sidecar_and_the_gateway_says_so() {
    use k8s_openapi::api::core::v1::Pod;
    use sidegate_operator::webhook::inject::{
        GATEWAY_ANNOTATION, INJECT_ANNOTATION, INJECTED_ANNOTATION, SIDECAR_CONTAINER,
    };
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "uninjected").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let gateways: Api<AIGateway> = Api::namespaced(client.clone(), &ns.name);
    wait_for_default_service_account(&client, &ns.name).await;
    // No webhook here and no node: each pod is stored as created.
    let pod = |name: &str, annotations: &[(&str, &str)], sidecar: bool| -> Pod {
        let mut containers = vec![json!({"name": "app", "image": "example.com/app:1"})];
        if sidecar {
            containers.push(json!({"name": SIDECAR_CONTAINER, "image": "example.com/sidegate:1"}));
        }
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations.iter().copied().collect::<BTreeMap<_, _>>()},
            "spec": {"containers": containers},
        }))
        .expect("pod")
    };
    create(
        &pods,
        &pod("early-app", &[(GATEWAY_ANNOTATION, "main")], false),
    )
    .await;
    create(
        &pods,
        &pod(
            "opted-out",
            &[(GATEWAY_ANNOTATION, "main"), (INJECT_ANNOTATION, "false")],
            false,
        ),
    )
    .await;
    create(
        &pods,
        &pod(
            "injected",
            &[(GATEWAY_ANNOTATION, "main"), (INJECTED_ANNOTATION, "v1")],
            true,
        ),
    )
    .await;
    // Injected by hand, without the webhook's mark: it has the sidecar all the same.
    create(
        &pods,
        &pod("by-hand", &[(GATEWAY_ANNOTATION, "main")], true),
    )
    .await;
    create(
        &pods,
        &pod("other-gateway", &[(GATEWAY_ANNOTATION, "other")], false),
    )
    .await;
    create(&pods, &pod("plain", &[], false)).await;

    create(&gateways, &gateway("main", json!({}))).await;
    let uninjected = |want: u32| {
        let gateways = gateways.clone();
        move || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("main").await.ok()?;
                (gw.status?.uninjected_pods == Some(want)).then_some(())
            }
        }
    };
    eventually("status.uninjectedPods 1", WAIT, uninjected(1)).await;
    let note = eventually("an UninjectedPods Warning", WAIT, || {
        has_event(&client, &ns.name, "UninjectedPods", "Warning")
    })
    .await;
    assert!(
        note.contains("1 pod(s)") && note.contains("early-app") && note.contains("restart them"),
        "{note}"
    );
    for other in ["opted-out", "injected", "by-hand", "other-gateway", "plain"] {
        assert!(!note.contains(other), "{other} in {note}");
    }

    // The pod watch brings each change, not the resync (60 s here) nor the reconciles the
    // gateway's own status writes trigger: let those settle first (debounce 200 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    create(
        &pods,
        &pod("late-app", &[(GATEWAY_ANNOTATION, "main")], false),
    )
    .await;
    eventually("status.uninjectedPods 2", WAIT, uninjected(2)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in ["early-app", "late-app"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    eventually("status.uninjectedPods 0", WAIT, uninjected(0)).await;
    eventually("an AllPodsInjected Event", WAIT, || {
        has_event(&client, &ns.name, "AllPodsInjected", "Normal")
    })
    .await;
    ns.delete().await;
}

/// The messages of every `x-kubernetes-validations` rule in the generated CRDs.
fn schema_rule_messages() -> std::collections::BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Array(rules)) = map.get("x-kubernetes-validations") {
                    out.extend(
                        rules
                            .iter()
                            .filter_map(|r| r["message"].as_str().map(str::to_owned)),
                    );
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    for (_, crd) in sidegate_operator::crd::definitions() {
        walk(
            &serde_json::to_value(crd).expect("CRD serializes"),
            &mut out,
        );
    }
    out
}

#[tokio::test]
async fn every_schema_rule_refuses_its_case_with_its_message_and_admits_the_nearest_valid_spec() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let ns = create_test_namespace(&client, "rules").await;
    let api = |kind: &str| -> Api<kube::api::DynamicObject> {
        let resource = match kind {
            "AIGateway" => kube::api::ApiResource::erase::<AIGateway>(&()),
            _ => kube::api::ApiResource::erase::<ProviderKey>(&()),
        };
        Api::namespaced_with(client.clone(), &ns.name, &resource)
    };
    let object = |kind: &str, name: &str, spec: &serde_json::Value| -> kube::api::DynamicObject {
        serde_json::from_value(json!({"apiVersion": "sidegate.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name}, "spec": spec}))
        .expect("object")
    };
    let redis = json!({"urlSecretRef": {"name": "redis", "key": "url"}});
    let route = |node: serde_json::Value| {
        json!({"routes": [{"name": "r", "nodes": [
            {"id": "s", "type": "start", "next": "n"}, node, {"id": "e", "type": "end"}]}]})
    };
    let providers = |n: usize| json!({"providers": (0..n).map(|i| (format!("custom-p{i}"), json!({}))).collect::<BTreeMap<_, _>>()});
    let secret_ref = json!({"name": "s", "key": "k"});

    // (kind, refused name and spec, the rule's message, admitted name and spec): the admitted
    // spec is the refused one with the least change that satisfies the rule.
    let g = "AIGateway";
    let k = "ProviderKey";
    type Named = (String, serde_json::Value);
    let cases: Vec<(&str, Named, &str, Named)> = vec![
        (
            g,
            ("g".repeat(64), json!({})),
            "AIGateway names are at most 63 characters",
            ("g".repeat(63), json!({})),
        ),
        (
            g,
            ("auth".into(), json!({"authentication": {"enabled": true}})),
            "authentication.enabled needs tokenSecretRef",
            (
                "auth".into(),
                json!({"authentication": {"enabled": true, "tokenSecretRef": {"name": "t", "key": "token"}}}),
            ),
        ),
        (
            g,
            (
                "cache-redis".into(),
                json!({"cache": {"enabled": true, "backend": "redis"}}),
            ),
            "cache.backend redis needs the redis block",
            (
                "cache-redis".into(),
                json!({"cache": {"enabled": true, "backend": "redis"}, "redis": redis}),
            ),
        ),
        (
            g,
            (
                "global".into(),
                json!({"rateLimit": {"limit": 10, "interval": "60s", "scope": "global"}}),
            ),
            "rateLimit.scope global needs the redis block",
            (
                "global".into(),
                json!({"rateLimit": {"limit": 10, "interval": "60s", "scope": "global"}, "redis": redis}),
            ),
        ),
        (
            g,
            (
                "ttl-min".into(),
                json!({"cache": {"enabled": true, "ttl": "59s"}}),
            ),
            "cache.ttl must be between 60s and 30d",
            (
                "ttl-min".into(),
                json!({"cache": {"enabled": true, "ttl": "60s"}}),
            ),
        ),
        (
            g,
            (
                "ttl-max".into(),
                json!({"cache": {"enabled": true, "ttl": "31d"}}),
            ),
            "cache.ttl must be between 60s and 30d",
            (
                "ttl-max".into(),
                json!({"cache": {"enabled": true, "ttl": "30d"}}),
            ),
        ),
        (
            g,
            (
                "delay".into(),
                json!({"retries": {"maxAttempts": 2, "retryDelay": "5001ms"}}),
            ),
            "retryDelay must be at most 5s",
            (
                "delay".into(),
                json!({"retries": {"maxAttempts": 2, "retryDelay": "5000ms"}}),
            ),
        ),
        // CEL's duration() overflows on this (a conversion error, not the rule's message).
        (
            g,
            (
                "delay-hours".into(),
                json!({"retries": {"maxAttempts": 2, "retryDelay": "999999999h"}}),
            ),
            "retryDelay must be at most 5s",
            (
                "delay-hours".into(),
                json!({"retries": {"maxAttempts": 2, "retryDelay": "5s"}}),
            ),
        ),
        (
            g,
            (
                "prompt".into(),
                json!({"guardrails": {"moderationURL": "https://m.example/v1/moderations", "prompt": {"gore": "block"}}}),
            ),
            "categories are those of OpenAI's moderation API",
            (
                "prompt".into(),
                json!({"guardrails": {"moderationURL": "https://m.example/v1/moderations", "prompt": {"violence": "block"}}}),
            ),
        ),
        (
            g,
            (
                "response".into(),
                json!({"guardrails": {"moderationURL": "https://m.example/v1/moderations", "response": {"Hate": "flag"}}}),
            ),
            "categories are those of OpenAI's moderation API",
            (
                "response".into(),
                json!({"guardrails": {"moderationURL": "https://m.example/v1/moderations", "response": {"hate": "flag"}}}),
            ),
        ),
        (
            g,
            ("provider-id".into(), json!({"providers": {"OpenAI": {}}})),
            "providers keys must be provider ids from SPEC.md or custom-<slug>",
            ("provider-id".into(), json!({"providers": {"openai": {}}})),
        ),
        (
            g,
            ("providers".into(), providers(33)),
            "spec.providers: Too many: 33: must have at most 32 items",
            ("providers".into(), providers(32)),
        ),
        (
            g,
            (
                "base-url".into(),
                json!({"providers": {"openai": {"baseURL": "api.openai.com/v1"}}}),
            ),
            "baseURL must be an absolute http(s) URL, e.g. https://api.openai.com/v1 (placeholders",
            (
                "base-url".into(),
                json!({"providers": {"openai": {"baseURL": "https://api.openai.com/v1"}}}),
            ),
        ),
        (
            g,
            (
                "model".into(),
                route(json!({"id": "n", "type": "model", "provider": "openai", "next": "e"})),
            ),
            "a model node needs provider and model",
            (
                "model".into(),
                route(
                    json!({"id": "n", "type": "model", "provider": "openai", "model": "gpt-4o-mini", "next": "e"}),
                ),
            ),
        ),
        (
            g,
            (
                "conditional".into(),
                route(
                    json!({"id": "n", "type": "conditional", "condition": "metadata.plan == \"paid\"", "then": "e"}),
                ),
            ),
            "a conditional node needs condition, then and else",
            (
                "conditional".into(),
                route(
                    json!({"id": "n", "type": "conditional", "condition": "metadata.plan == \"paid\"", "then": "e", "else": "e"}),
                ),
            ),
        ),
        // Without branches at all, not only with an empty list.
        (
            g,
            (
                "percentage".into(),
                route(json!({"id": "n", "type": "percentage"})),
            ),
            "a percentage node needs branches",
            (
                "percentage".into(),
                route(
                    json!({"id": "n", "type": "percentage", "branches": [{"weight": 1, "next": "e"}]}),
                ),
            ),
        ),
        (
            g,
            (
                "percentage-empty".into(),
                route(json!({"id": "n", "type": "percentage", "branches": []})),
            ),
            "a percentage node needs branches",
            (
                "percentage-empty".into(),
                route(
                    json!({"id": "n", "type": "percentage", "branches": [{"weight": 0, "next": "e"}, {"weight": 1, "next": "e"}]}),
                ),
            ),
        ),
        (
            g,
            (
                "rate".into(),
                route(
                    json!({"id": "n", "type": "rate", "limit": "10", "interval": "60s", "next": "e"}),
                ),
            ),
            "rate and budget nodes need limit, interval and fallback",
            (
                "rate".into(),
                route(
                    json!({"id": "n", "type": "rate", "limit": "10", "interval": "60s", "fallback": "e", "next": "e"}),
                ),
            ),
        ),
        (
            g,
            (
                "budget".into(),
                route(
                    json!({"id": "n", "type": "budget", "interval": "1d", "fallback": "e", "next": "e"}),
                ),
            ),
            "rate and budget nodes need limit, interval and fallback",
            (
                "budget".into(),
                route(
                    json!({"id": "n", "type": "budget", "limit": "1.50", "interval": "1d", "fallback": "e", "next": "e"}),
                ),
            ),
        ),
        (
            g,
            (
                "ports".into(),
                json!({"sidecar": {"port": 9000, "adminPort": 9000}}),
            ),
            "port and adminPort must differ",
            (
                "ports".into(),
                json!({"sidecar": {"port": 9000, "adminPort": 9001}}),
            ),
        ),
        // adminPort's default is 8788.
        (
            g,
            ("port-default".into(), json!({"sidecar": {"port": 8788}})),
            "port and adminPort must differ",
            ("port-default".into(), json!({"sidecar": {"port": 8789}})),
        ),
        (
            k,
            (
                "bedrock".into(),
                json!({"provider": "aws-bedrock", "secretRef": {"name": "s"}}),
            ),
            "aws-bedrock keys need spec.region",
            (
                "bedrock".into(),
                json!({"provider": "aws-bedrock", "region": "us-east-1", "secretRef": {"name": "s"}}),
            ),
        ),
        (
            k,
            (
                "secret-key".into(),
                json!({"provider": "openai", "secretRef": {"name": "s"}}),
            ),
            "secretRef.key is required",
            (
                "secret-key".into(),
                json!({"provider": "openai", "secretRef": secret_ref}),
            ),
        ),
        (
            k,
            (
                "region".into(),
                json!({"provider": "openai", "region": "us-east-1", "secretRef": secret_ref}),
            ),
            "region is only used by aws-bedrock and google-vertex-ai keys",
            (
                "region".into(),
                json!({"provider": "openai", "secretRef": secret_ref}),
            ),
        ),
        (
            k,
            (
                "vertex-region".into(),
                json!({"provider": "google-ai-studio", "region": "us-east1", "secretRef": secret_ref}),
            ),
            "region is only used by aws-bedrock and google-vertex-ai keys",
            (
                "vertex-region".into(),
                json!({"provider": "google-vertex-ai", "region": "us-east1", "secretRef": secret_ref}),
            ),
        ),
        (
            k,
            (
                "key-url".into(),
                json!({"provider": "openai", "secretRef": secret_ref, "baseURL": "ftp://x.example/v1"}),
            ),
            "baseURL must be an absolute http(s) URL, e.g. https://api.openai.com/v1",
            (
                "key-url".into(),
                json!({"provider": "openai", "secretRef": secret_ref, "baseURL": "https://x.example/v1"}),
            ),
        ),
    ];

    for (kind, (name, spec), expected, _) in &cases {
        let message = match api(kind)
            .create(&PostParams::default(), &object(kind, name, spec))
            .await
        {
            Ok(_) => panic!("{kind} {name} {spec} was accepted; expected {expected:?}"),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{kind} {name}: {s:?}");
                s.message
            }
            Err(e) => panic!("{kind} {name}: unexpected error: {e}"),
        };
        assert!(
            message.contains(expected),
            "{kind} {name}: expected {expected:?} in {message:?}"
        );
        // A rule that fails to evaluate refuses with CEL's error, not with what to fix.
        for error in ["evaluating rule", "no such key", "conversion error"] {
            assert!(
                !message.contains(error),
                "{kind} {name}: the rule did not evaluate: {message:?}"
            );
        }
    }
    for (kind, _, _, (name, spec)) in &cases {
        if let Err(e) = api(kind)
            .create(&PostParams::default(), &object(kind, name, spec))
            .await
        {
            panic!("{kind} {name} {spec} was refused: {e}");
        }
    }

    // A rule added later gets its case here.
    let untested: Vec<_> = schema_rule_messages()
        .into_iter()
        .filter(|m| !cases.iter().any(|(_, _, expected, _)| m.contains(expected)))
        .collect();
    assert!(
        untested.is_empty(),
        "schema rules without a case: {untested:?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn only_one_replica_leads_and_a_released_lease_is_taken_over_at_once() {
    let Some(client) = cluster_client().await else {
        return;
    };
    let ns = create_test_namespace(&client, "lease").await;
    let settings = |identity: &str| LeaseSettings {
        namespace: ns.name.clone(),
        name: "sidegate-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(1),
        owner: None,
    };
    let a = LeaderElector::new(client.clone(), settings("replica-a"));
    let b = LeaderElector::new(client.clone(), settings("replica-b"));
    tokio::time::timeout(Duration::from_secs(10), a.acquire())
        .await
        .expect("first replica leads");
    assert!(
        tokio::time::timeout(Duration::from_secs(3), b.acquire())
            .await
            .is_err(),
        "second replica must stand by while the lease is held"
    );
    a.release().await;
    tokio::time::timeout(Duration::from_secs(5), b.acquire())
        .await
        .expect("standby takes over a released lease");
    ns.delete().await;
}

#[tokio::test]
async fn kubectl_explain_describes_the_gateway_fields() {
    let Some(client) = cluster_client().await else {
        return;
    };
    operator(&client).await;
    let out = std::process::Command::new("kubectl")
        .args(["explain", "aigateway.spec.cache"])
        .output()
        .expect("kubectl explain runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "Response caching.",
        "backend",
        "Default time to live (60s .. 30d)",
        "Upper bound of the memory cache",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}
