//! Sidecar injection as a specification: fixtures in `tests/fixtures/inject/`, the JSON patches
//! the webhook returns in `tests/golden/inject/`, and the patched pods checked field by field.
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p sidegate-operator --test webhook_inject`.

mod golden_file;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, LocalObjectReference, Pod};
use sidegate_crds::api::SidecarSettings;
use sidegate_operator::webhook::images::AllowedImages;
use sidegate_operator::webhook::inject::{
    self, EnvFromKeys, EnvSource, EnvSourceKeys, InjectConfig, InjectSettings, Injection,
    PLACEHOLDER_API_KEY, ShutdownTiming, Skip,
};

fn fixture(name: &str) -> Pod {
    let path = golden_file::tests_dir().join("fixtures/inject").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {name}: {e}"))
}

fn assert_golden(name: &str, actual: &str) {
    golden_file::assert_golden("inject", name, actual);
}

/// The operator's defaults, plus a second sidecar repository some tests' gateways name.
fn config() -> InjectConfig {
    let mut config = InjectConfig::new(
        "ghcr.io/sidegate/sidegate:0.1.0",
        "0.1.0",
        "sidegate-system",
    );
    config.allowed_images = AllowedImages::new(
        &[
            "ghcr.io/sidegate/sidegate".into(),
            "registry.local/sidegate".into(),
        ],
        &config.image,
    )
    .expect("valid entries");
    config
}

fn run(pod: &Pod, namespace: &str, sidecar: &SidecarSettings) -> Option<Injection> {
    run_reading(pod, namespace, sidecar, &EnvFromKeys::default())
}

/// [`run`], the pod's envFrom objects having been read as `env_from` says.
fn run_reading(
    pod: &Pod,
    namespace: &str,
    sidecar: &SidecarSettings,
    env_from: &EnvFromKeys,
) -> Option<Injection> {
    let config = config();
    inject::inject(
        pod,
        &InjectSettings {
            config: &config,
            namespace,
            sidecar,
            env_from,
        },
    )
    .expect("injection does not fail")
}

fn patched(pod: &Pod, injection: &Injection) -> Pod {
    let mut doc = serde_json::to_value(pod).expect("pod serializes");
    json_patch::patch(&mut doc, &injection.patch).expect("patch applies to the pod");
    serde_json::from_value(doc).expect("patched pod is a Pod")
}

/// What reading a ConfigMap or Secret with `keys` finds.
fn found(keys: &[&str]) -> EnvSourceKeys {
    EnvSourceKeys::Found(keys.iter().map(|k| (*k).to_owned()).collect())
}

fn config_map(name: &str) -> EnvSource {
    EnvSource::ConfigMap(name.into())
}

fn secret(name: &str) -> EnvSource {
    EnvSource::Secret(name.into())
}

/// Injects with the defaults, checks the patch against its golden file, returns the patched pod.
fn injected(fixture_name: &str, sidecar: &SidecarSettings, golden: &str) -> (Pod, Injection) {
    let pod = fixture(fixture_name);
    let injection = run(&pod, "team-a", sidecar).expect("pod is injected");
    let patch_yaml = serde_saphyr::to_string(&injection.patch).expect("patch serializes");
    assert_golden(golden, &patch_yaml);
    let mut doc = serde_json::to_value(&pod).expect("pod serializes");
    json_patch::patch(&mut doc, &injection.patch).expect("patch applies to the pod");
    let patched: Pod = serde_json::from_value(doc).expect("patched pod is a Pod");
    (patched, injection)
}

fn env_of(c: &Container) -> BTreeMap<String, Option<String>> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

#[test]
fn a_plain_pod_gets_a_native_sidecar_volumes_env_and_the_injected_annotation() {
    let (pod, injection) = injected("plain.yaml", &SidecarSettings::default(), "plain.yaml");
    assert_eq!(injection.gateway, "main");
    assert!(injection.warnings.is_empty());
    assert_eq!(annotation(&pod, inject::INJECTED_ANNOTATION), Some("0.1.0"));
    let spec = pod.spec.expect("spec");

    let init = spec.init_containers.expect("init containers");
    let sidecar = &init[0];
    assert_eq!(sidecar.name, "sidegate");
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    assert_eq!(
        sidecar.args.as_deref().expect("args"),
        [
            "--config",
            "/etc/sidegate/config/gateway.yaml",
            "--keys-dir",
            "/etc/sidegate/keys",
            "--listen",
            "127.0.0.1:8787",
            "--admin",
            "[::]:8788",
            "--wait-for-config",
            "--log-format",
            "json",
            "--shutdown-grace",
            "25",
        ]
    );
    let mounts = sidecar.volume_mounts.as_ref().expect("mounts");
    assert!(
        mounts
            .iter()
            .all(|m| m.sub_path.is_none() && m.read_only == Some(true)),
        "whole-volume read-only mounts, so kubelet's updates arrive"
    );
    let sc = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.http_get.as_ref())
            .map(|h| (h.path.clone().unwrap_or_default(), h.port.clone()))
    };
    let admin = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8788);
    assert_eq!(
        probe_path(sidecar.readiness_probe.as_ref()),
        Some(("/readyz".into(), admin.clone()))
    );
    assert_eq!(
        probe_path(sidecar.liveness_probe.as_ref()),
        Some(("/healthz".into(), admin))
    );
    assert!(sidecar.resources.is_some());

    let volumes = spec.volumes.expect("volumes");
    let cm = volumes[0].config_map.as_ref().expect("ConfigMap volume");
    assert_eq!(
        (cm.name.as_str(), cm.optional),
        ("sidegate-main", Some(true))
    );
    let secret = volumes[1].secret.as_ref().expect("Secret volume");
    assert_eq!(
        (secret.secret_name.as_deref(), secret.optional),
        (Some("sidegate-main-keys"), Some(true))
    );

    let app = &spec.containers[0];
    assert!(app.volume_mounts.is_none(), "the app never sees the keys");
    let env = env_of(app);
    assert_eq!(
        env["OPENAI_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/openai")
    );
    assert_eq!(
        env["ANTHROPIC_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/anthropic")
    );
    assert_eq!(
        env["GOOGLE_GEMINI_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/google-ai-studio")
    );
    assert_eq!(env["OPENAI_API_KEY"].as_deref(), Some(PLACEHOLDER_API_KEY));
    assert_eq!(
        env["ANTHROPIC_API_KEY"].as_deref(),
        Some(PLACEHOLDER_API_KEY)
    );
}

#[test]
fn variables_the_pod_already_sets_are_left_alone_and_a_container_whose_env_from_was_not_read_keeps_all_base_urls_to_it()
 {
    let (pod, injection) = injected("env-set.yaml", &SidecarSettings::default(), "env-set.yaml");
    let spec = pod.spec.clone().expect("spec");
    let app = &spec.containers[0];
    let env = env_of(app);
    assert_eq!(
        env["OPENAI_BASE_URL"].as_deref(),
        Some("https://proxy.example.com/v1")
    );
    assert!(
        !env.contains_key("OPENAI_API_BASE"),
        "the app's OpenAI endpoint is not overridden under another name"
    );
    let key = app
        .env
        .iter()
        .flatten()
        .filter(|e| e.name == "OPENAI_API_KEY")
        .collect::<Vec<_>>();
    assert_eq!(key.len(), 1, "not duplicated");
    assert!(key[0].value_from.is_some(), "still from its Secret");
    assert_eq!(
        env["ANTHROPIC_API_KEY"].as_deref(),
        Some(PLACEHOLDER_API_KEY)
    );

    // envFrom may point the worker's SDKs at an in-cluster model server and give its key: an
    // env entry would win over both (env takes precedence over envFrom), so none is added, and
    // the pod's creator is told.
    assert!(
        spec.containers[1].env.is_none(),
        "{:?}",
        spec.containers[1].env
    );
    assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
    let warning = &injection.warnings[0];
    for part in [
        "\"worker\"",
        "envFrom",
        "OPENAI_BASE_URL",
        "ANTHROPIC_BASE_URL",
        "http://127.0.0.1:8787/<provider>",
        "sidegate.dev/override-env-from: \"true\"",
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning}");
    }
    assert!(!warning.contains("\"app\""), "{warning}");
    assert!(warning.contains("Secret worker-env: not read"), "{warning}");
    assert_eq!(
        annotation(&pod, inject::ENV_KEPT_ANNOTATION),
        Some(
            "worker: OPENAI_BASE_URL,OPENAI_API_BASE,ANTHROPIC_BASE_URL,GOOGLE_GEMINI_BASE_URL,CO_API_URL,GROQ_BASE_URL (envFrom not read)"
        )
    );
}

/// The keys of the objects `env-from.yaml` names, as the webhook reads them.
fn env_from_keys() -> EnvFromKeys {
    EnvFromKeys(
        [
            (config_map("db"), found(&["DB_HOST", "DB_PORT"])),
            (
                config_map("llm-endpoints"),
                found(&["OPENAI_BASE_URL", "OPENAI_MODEL"]),
            ),
            // Prefixed ANTHROPIC_: ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY and
            // ANTHROPIC_OPENAI_BASE_URL, which no SDK reads.
            (
                secret("agent-env"),
                found(&["BASE_URL", "API_KEY", "OPENAI_BASE_URL"]),
            ),
            (config_map("extra"), EnvSourceKeys::NotFound),
        ]
        .into(),
    )
}

#[test]
fn only_the_base_urls_env_from_objects_define_are_left_to_them_prefix_included() {
    let pod = fixture("env-from.yaml");
    assert_eq!(
        inject::env_from_sources(&pod),
        [
            config_map("db"),
            config_map("llm-endpoints"),
            secret("agent-env"),
            config_map("extra"),
        ]
        .into()
    );
    let injection = run_reading(
        &pod,
        "team-a",
        &SidecarSettings::default(),
        &env_from_keys(),
    )
    .expect("injected");
    let patch_yaml = serde_saphyr::to_string(&injection.patch).expect("patch serializes");
    assert_golden("env-from.yaml", &patch_yaml);
    let pod = patched(&pod, &injection);
    let spec = pod.spec.as_ref().expect("spec");
    let names = |c: &Container| env_of(c).into_keys().collect::<Vec<_>>();

    // A ConfigMap without base URLs or keys (DB_HOST): every one is injected, placeholder keys
    // too, as without envFrom (an SDK given a base URL but no key would not start).
    assert_eq!(
        names(&spec.containers[0]),
        [
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "CO_API_URL",
            "GOOGLE_GEMINI_BASE_URL",
            "GROQ_BASE_URL",
            "OPENAI_API_BASE",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
        ]
    );
    // A ConfigMap pointing OpenAI at an in-cluster server: OpenAI is left to it under both of
    // its names (LangChain would prefer an injected OPENAI_API_BASE), its key too (the
    // placeholder would go to that server), the others are injected.
    assert_eq!(
        names(&spec.containers[1]),
        [
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "CO_API_URL",
            "GOOGLE_GEMINI_BASE_URL",
            "GROQ_BASE_URL",
            "LOG_LEVEL",
        ]
    );
    // Secret key BASE_URL under prefix ANTHROPIC_: Anthropic is left to it; its
    // OPENAI_BASE_URL key is ANTHROPIC_OPENAI_BASE_URL in the container; the optional missing
    // ConfigMap defines nothing.
    let agent = env_of(&spec.containers[2]);
    assert!(!agent.contains_key("ANTHROPIC_BASE_URL"), "{agent:?}");
    assert_eq!(
        agent["OPENAI_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/openai")
    );
    assert!(!agent.contains_key("ANTHROPIC_API_KEY"), "{agent:?}");

    assert_eq!(
        annotation(&pod, inject::ENV_KEPT_ANNOTATION),
        Some("chat: OPENAI_BASE_URL,OPENAI_API_BASE; agent: ANTHROPIC_BASE_URL")
    );
    assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
    let warning = &injection.warnings[0];
    for part in [
        "\"chat\" (OPENAI_BASE_URL, OPENAI_API_BASE)",
        "\"agent\" (ANTHROPIC_BASE_URL)",
        "sidegate.dev/override-env-from: \"true\"",
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning}");
    }
    assert!(!warning.contains("\"app\""), "{warning}");
}

#[test]
fn env_from_objects_without_base_urls_or_keys_leave_the_pod_as_a_pod_without_env_from() {
    let pod = fixture("env-from.yaml");
    let mut keys = env_from_keys();
    keys.0
        .insert(config_map("llm-endpoints"), found(&["OPENAI_MODEL"]));
    keys.0.insert(secret("agent-env"), found(&[]));
    let injection =
        run_reading(&pod, "team-a", &SidecarSettings::default(), &keys).expect("injected");
    assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    let pod = patched(&pod, &injection);
    assert_eq!(annotation(&pod, inject::ENV_KEPT_ANNOTATION), None);
    for c in &pod.spec.as_ref().expect("spec").containers {
        let env = env_of(c);
        for (name, route) in inject::SDK_BASE_URL_VARIABLES {
            assert_eq!(
                env.get(*name).cloned().flatten(),
                Some(format!("http://127.0.0.1:8787/{route}")),
                "{} {name}",
                c.name
            );
        }
        for name in inject::PLACEHOLDER_KEY_VARIABLES {
            assert_eq!(
                env.get(*name).cloned().flatten().as_deref(),
                Some(PLACEHOLDER_API_KEY),
                "{} {name}",
                c.name
            );
        }
    }
}

#[test]
fn a_container_whose_env_from_objects_cannot_be_read_keeps_all_base_urls_to_them_with_a_warning() {
    let pod = fixture("env-from.yaml");
    let mut keys = env_from_keys();
    // Forbidden, missing without optional (the pod waits for it, which may hold anything),
    // never read (timed out before its turn).
    keys.0.insert(
        config_map("llm-endpoints"),
        EnvSourceKeys::Unreadable("403 Forbidden".into()),
    );
    keys.0.insert(config_map("db"), EnvSourceKeys::NotFound);
    keys.0.remove(&secret("agent-env"));
    let injection =
        run_reading(&pod, "team-a", &SidecarSettings::default(), &keys).expect("injected");
    let pod = patched(&pod, &injection);
    let spec = pod.spec.as_ref().expect("spec");
    for c in &spec.containers {
        let env = env_of(c);
        for (name, _) in inject::SDK_BASE_URL_VARIABLES {
            assert!(!env.contains_key(*name), "{} {name}: {env:?}", c.name);
        }
    }
    let all = "OPENAI_BASE_URL,OPENAI_API_BASE,ANTHROPIC_BASE_URL,GOOGLE_GEMINI_BASE_URL,CO_API_URL,GROQ_BASE_URL (envFrom not read)";
    assert_eq!(
        annotation(&pod, inject::ENV_KEPT_ANNOTATION),
        Some(format!("app: {all}; chat: {all}; agent: {all}").as_str())
    );
    assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
    let warning = &injection.warnings[0];
    for part in [
        "\"app\", \"chat\", \"agent\"",
        "ConfigMap db: not found",
        "ConfigMap llm-endpoints: 403 Forbidden",
        "Secret agent-env: not read",
        "http://127.0.0.1:8787/<provider>",
        "sidegate.dev/override-env-from: \"true\"",
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning}");
    }
    assert!(!warning.contains("extra"), "{warning}");
}

#[test]
fn the_override_env_from_annotation_sets_the_base_urls_over_env_from_but_never_placeholder_keys() {
    let mut pod = fixture("env-set.yaml");
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(inject::OVERRIDE_ENV_FROM_ANNOTATION.into(), "true".into());
    assert!(inject::env_from_sources(&pod).is_empty(), "nothing to read");
    let injection = run(&pod, "team-a", &SidecarSettings::default()).expect("injected");
    assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    assert_eq!(
        annotation(&patched(&pod, &injection), inject::ENV_KEPT_ANNOTATION),
        None
    );
    let mut doc = serde_json::to_value(&pod).expect("pod serializes");
    json_patch::patch(&mut doc, &injection.patch).expect("patch applies");
    let patched: Pod = serde_json::from_value(doc).expect("a Pod");
    let worker = env_of(&patched.spec.expect("spec").containers[1]);
    assert_eq!(
        worker["OPENAI_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/openai")
    );
    assert_eq!(
        worker["ANTHROPIC_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:8787/anthropic")
    );
    assert!(!worker.contains_key("OPENAI_API_KEY"));
    assert!(!worker.contains_key("ANTHROPIC_API_KEY"));
}

#[test]
fn env_from_init_containers_of_a_native_sidecar_pod_are_named_in_the_warning_too() {
    let mut pod = fixture("multi-container.yaml");
    let spec = pod.spec.as_mut().expect("spec");
    let init = &mut spec.init_containers.as_mut().expect("init containers")[0];
    init.env_from = Some(vec![
        serde_json::from_value(serde_json::json!({"configMapRef": {"name": "llm-endpoints"}}))
            .expect("EnvFromSource"),
    ]);
    let name = init.name.clone();
    let injection = run(&pod, "team-a", &SidecarSettings::default()).expect("injected");
    assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
    assert!(
        injection.warnings[0].contains(&format!("{name:?}")),
        "{}",
        injection.warnings[0]
    );
}

#[test]
fn every_container_of_a_multi_container_pod_gets_the_env_and_existing_lists_are_appended_to() {
    let (pod, _) = injected(
        "multi-container.yaml",
        &SidecarSettings::default(),
        "multi-container.yaml",
    );
    assert_eq!(annotation(&pod, "prometheus.io/scrape"), Some("true"));
    let spec = pod.spec.expect("spec");
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        init,
        ["sidegate", "warm-cache"],
        "sidecar first, so init containers can use it"
    );
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["api", "indexer"]);
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten().skip(1))
    {
        assert_eq!(
            env_of(c)["OPENAI_BASE_URL"].as_deref(),
            Some("http://127.0.0.1:8787/openai"),
            "{}",
            c.name
        );
    }
    assert_eq!(
        env_of(&spec.containers[0])["LOG_LEVEL"].as_deref(),
        Some("debug")
    );
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["data", "sidegate-config", "sidegate-keys"]);
}

#[test]
fn a_job_pod_gets_a_native_sidecar_so_the_job_can_complete() {
    let (pod, injection) = injected("job.yaml", &SidecarSettings::default(), "job.yaml");
    assert!(injection.warnings.is_empty());
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(
        spec.init_containers.expect("init")[0]
            .restart_policy
            .as_deref(),
        Some("Always")
    );
}

#[test]
fn native_sidecar_false_injects_a_plain_container_and_warns_for_jobs() {
    let plain = SidecarSettings {
        native_sidecar: false,
        port: 9000,
        admin_port: 9001,
        image: Some("registry.local/sidegate:dev".into()),
        ..SidecarSettings::default()
    };
    let (pod, injection) = injected("plain.yaml", &plain, "plain-container.yaml");
    assert!(injection.warnings.is_empty());
    let spec = pod.spec.expect("spec");
    assert!(spec.init_containers.is_none());
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["app", "sidegate"],
        "the app stays kubectl's default container"
    );
    let sidecar = &spec.containers[1];
    assert_eq!(sidecar.restart_policy, None);
    assert_eq!(
        sidecar.image.as_deref(),
        Some("registry.local/sidegate:dev")
    );
    assert!(sidecar.args.iter().flatten().any(|a| a == "127.0.0.1:9000"));
    // It gets SIGTERM with the app: it serves the app's last requests for 5 s; the pod has
    // Kubernetes' default 30 s, so in-flight requests get 25.
    let args = sidecar.args.as_deref().expect("args");
    assert_eq!(flag(args, "--shutdown-delay"), Some("5"));
    assert_eq!(flag(args, "--shutdown-grace"), Some("25"));
    assert_eq!(
        env_of(&spec.containers[0])["ANTHROPIC_BASE_URL"].as_deref(),
        Some("http://127.0.0.1:9000/anthropic")
    );

    let job = run(&fixture("job.yaml"), "team-a", &plain).expect("injected");
    assert_eq!(job.warnings.len(), 1);
    assert!(
        job.warnings[0].contains("nativeSidecar"),
        "{}",
        job.warnings[0]
    );
}

fn sidecar_args(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().expect("spec");
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == "sidegate")
        .expect("sidecar injected");
    sidecar.args.clone().expect("args")
}

/// The value of `flag` in `args`, if present.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .map(|i| args[i + 1].as_str())
}

#[test]
fn the_sidecar_gets_the_pods_termination_grace_period_minus_a_margin_and_a_classic_one_a_drain_delay()
 {
    let classic = SidecarSettings {
        native_sidecar: false,
        ..SidecarSettings::default()
    };
    // A classic sidecar gets SIGTERM with its app: it keeps serving the app's last requests for
    // 5 s, and streams in flight get the 300 s the pod owner gave, minus 5 s for the sidecar's
    // own exit.
    let (pod, _) = injected("long-streams.yaml", &classic, "long-streams-container.yaml");
    let args = sidecar_args(&pod);
    assert_eq!(flag(&args, "--shutdown-grace"), Some("295"));
    assert_eq!(flag(&args, "--shutdown-delay"), Some("5"));
    // kubelet stops a native sidecar only after the app exited: no delay, the same grace.
    let pod = fixture("long-streams.yaml");
    let native = run(&pod, "team-a", &SidecarSettings::default()).expect("injected");
    let mut doc = serde_json::to_value(&pod).expect("pod serializes");
    json_patch::patch(&mut doc, &native.patch).expect("patch applies");
    let args = sidecar_args(&serde_json::from_value(doc).expect("a Pod"));
    assert_eq!(flag(&args, "--shutdown-grace"), Some("295"));
    assert_eq!(flag(&args, "--shutdown-delay"), None);
}

#[test]
fn short_termination_grace_periods_keep_half_for_the_requests_and_a_delay_within_it() {
    let timing = |secs: Option<i64>, native: bool| {
        let t = ShutdownTiming::for_pod(secs, native);
        (t.grace_secs, t.delay_secs)
    };
    for (secs, classic, native) in [
        (None, (25, 5), (25, 0)),
        (Some(30), (25, 5), (25, 0)),
        (Some(3600), (3595, 5), (3595, 0)),
        (Some(10), (5, 2), (5, 0)),
        (Some(4), (2, 1), (2, 0)),
        (Some(2), (1, 0), (1, 0)),
        (Some(0), (1, 0), (1, 0)),
        (Some(-1), (1, 0), (1, 0)),
    ] {
        assert_eq!(timing(secs, false), classic, "classic, {secs:?}");
        assert_eq!(timing(secs, true), native, "native, {secs:?}");
    }
    assert_eq!(
        ShutdownTiming::for_pod(Some(2), false).args(),
        ["--shutdown-grace", "1"],
        "no delay flag when there is no delay"
    );
}

#[test]
fn an_already_injected_pod_is_not_patched_again() {
    let pod = fixture("already-injected.yaml");
    assert!(run(&pod, "team-a", &SidecarSettings::default()).is_none());
    assert_eq!(
        inject::requested_gateway(&pod, "team-a", &config()),
        Err(Skip::AlreadyInjected)
    );
}

#[test]
fn injecting_the_result_of_an_injection_changes_nothing() {
    let (pod, _) = injected("plain.yaml", &SidecarSettings::default(), "plain.yaml");
    assert!(run(&pod, "team-a", &SidecarSettings::default()).is_none());
}

#[test]
fn an_opted_out_pod_is_skipped() {
    let pod = fixture("opted-out.yaml");
    assert!(run(&pod, "team-a", &SidecarSettings::default()).is_none());
    assert_eq!(
        inject::requested_gateway(&pod, "team-a", &config()),
        Err(Skip::OptedOut)
    );
}

#[test]
fn pods_in_excluded_namespaces_are_skipped() {
    let pod = fixture("plain.yaml");
    for ns in ["kube-system", "sidegate-system"] {
        assert!(run(&pod, ns, &SidecarSettings::default()).is_none(), "{ns}");
        assert_eq!(
            inject::requested_gateway(&pod, ns, &config()),
            Err(Skip::ExcludedNamespace(ns.into()))
        );
    }
}

#[test]
fn an_operator_watching_some_namespaces_injects_only_there() {
    let pod = fixture("plain.yaml");
    let mut config = config();
    config.scope =
        sidegate_operator::scope::Scope::namespaces(["team-a", "team-b"]).expect("scope");
    assert_eq!(
        inject::requested_gateway(&pod, "team-a", &config),
        inject::requested_gateway(&pod, "team-a", &self::config())
    );
    assert!(inject::requested_gateway(&pod, "team-b", &config).is_ok());
    assert_eq!(
        inject::requested_gateway(&pod, "team-c", &config),
        Err(Skip::UnwatchedNamespace("team-c".into()))
    );
}

#[test]
fn an_annotation_that_names_no_aigateway_is_skipped_unlooked_up() {
    let with =
        |value: &str| BTreeMap::from([(inject::GATEWAY_ANNOTATION.to_owned(), value.to_owned())]);
    for value in [
        "main/",
        "main/status",
        "main?x=1",
        "main#a",
        "Main",
        "-main",
        &"a".repeat(64),
    ] {
        assert_eq!(
            inject::requested_gateway_by_annotations(Some(&with(value))),
            Err(Skip::InvalidGatewayName(value.to_owned())),
            "{value}"
        );
    }
    for value in ["main", " main ", "team-a.gw", "0", &"a".repeat(63)] {
        assert_eq!(
            inject::requested_gateway_by_annotations(Some(&with(value))),
            Ok(value.trim().to_owned())
        );
    }
}

#[test]
fn a_pod_without_the_gateway_annotation_is_skipped() {
    let pod = fixture("not-annotated.yaml");
    assert!(run(&pod, "team-a", &SidecarSettings::default()).is_none());
    assert_eq!(
        inject::requested_gateway(&pod, "team-a", &config()),
        Err(Skip::NotRequested)
    );
}

#[test]
fn a_pod_that_already_has_a_container_named_sidegate_is_refused_not_mangled() {
    let mut pod = fixture("plain.yaml");
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].name = "sidegate".into();
    }
    let config = config();
    let err = inject::inject(
        &pod,
        &InjectSettings {
            config: &config,
            namespace: "team-a",
            sidecar: &SidecarSettings::default(),
            env_from: &EnvFromKeys::default(),
        },
    )
    .expect_err("name clash");
    assert!(err.to_string().contains("sidegate"), "{err}");
}

fn refusal(pod: &Pod, sidecar: &SidecarSettings) -> Option<inject::InjectError> {
    let config = config();
    inject::inject(
        pod,
        &InjectSettings {
            config: &config,
            namespace: "team-a",
            sidecar,
            env_from: &EnvFromKeys::default(),
        },
    )
    .err()
}

/// Where a pod's container "web" runs: with the app, as a plain init container, or as the pod's
/// own native sidecar (an init container with `restartPolicy: Always`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Runs {
    App,
    Init,
    InitSidecar,
}

fn with_port(pod: Pod, runs: Runs, port: i32) -> Pod {
    with_ports(
        pod,
        runs,
        serde_json::json!([{"containerPort": 8080}, {"containerPort": port}]),
    )
}

fn with_ports(mut pod: Pod, runs: Runs, ports: serde_json::Value) -> Pod {
    let spec = pod.spec.as_mut().expect("spec");
    let mut container: Container = serde_json::from_value(serde_json::json!({
        "name": "web",
        "image": "example.com/web:1",
        "ports": ports,
    }))
    .expect("container");
    if runs == Runs::InitSidecar {
        container.restart_policy = Some("Always".into());
    }
    if runs == Runs::App {
        spec.containers.push(container);
    } else {
        spec.init_containers.get_or_insert_default().push(container);
    }
    pod
}

#[test]
fn a_pod_declaring_the_sidecar_port_or_admin_port_is_refused_not_injected_into_a_crash_loop() {
    let defaults = SidecarSettings::default();
    let classic = SidecarSettings {
        native_sidecar: false,
        ..SidecarSettings::default()
    };
    // A native sidecar runs beside every container of the pod; a classic one beside the app
    // containers and the pod's own native sidecars.
    for (sidecar, runs) in [
        (&defaults, Runs::App),
        (&defaults, Runs::Init),
        (&defaults, Runs::InitSidecar),
        (&classic, Runs::App),
        (&classic, Runs::InitSidecar),
    ] {
        for (port, role) in [(8787, "(port)"), (8788, "(adminPort)")] {
            let pod = with_port(fixture("plain.yaml"), runs, port);
            let err = refusal(&pod, sidecar).unwrap_or_else(|| {
                panic!(
                    "port {port} ({runs:?}, native {}) was injected",
                    sidecar.native_sidecar
                )
            });
            assert!(
                err.is_in_the_pod(),
                "{err:?}: the pod's own spec, so denied"
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("containerPort {port}"))
                    && message.contains(role)
                    && message.contains("\"web\"")
                    && message.contains("AIGateway main")
                    && message.contains("spec.sidecar.port")
                    && message.contains("sidegate.dev/inject: \"false\""),
                "{message}"
            );
        }
    }
    // The gateway's own ports are what counts: moved away, the same pod is injected.
    let moved = SidecarSettings {
        port: 9787,
        admin_port: 9788,
        ..SidecarSettings::default()
    };
    let pod = with_port(fixture("plain.yaml"), Runs::App, 8787);
    assert!(refusal(&pod, &moved).is_none());
    assert!(run(&pod, "team-a", &moved).is_some());
}

#[test]
fn an_init_container_that_ends_before_a_classic_sidecar_starts_may_use_its_ports() {
    let classic = SidecarSettings {
        native_sidecar: false,
        ..SidecarSettings::default()
    };
    let pod = with_port(fixture("plain.yaml"), Runs::Init, 8787);
    assert_eq!(refusal(&pod, &classic), None);
    let injection = run(&pod, "team-a", &classic).expect("injected");
    let spec = patched(&pod, &injection).spec.expect("spec");
    assert!(spec.containers.iter().any(|c| c.name == "sidegate"));
}

#[test]
fn a_udp_port_of_the_sidecars_number_is_no_clash() {
    // The sidecar listens on TCP only; a DNS-like UDP listener on 8787 does not stop it.
    let pod = with_ports(
        fixture("plain.yaml"),
        Runs::App,
        serde_json::json!([{"containerPort": 8787, "protocol": "UDP"}]),
    );
    assert_eq!(refusal(&pod, &SidecarSettings::default()), None);
    let tcp = with_ports(
        fixture("plain.yaml"),
        Runs::App,
        serde_json::json!([{"containerPort": 8787, "protocol": "TCP"}]),
    );
    assert!(refusal(&tcp, &SidecarSettings::default()).is_some());
}

#[test]
fn only_conflicts_in_the_pods_own_spec_deny_it_and_the_gateways_problems_admit_it() {
    let mut host = fixture("plain.yaml");
    host.spec.as_mut().expect("spec").host_network = Some(true);
    let host = refusal(&host, &SidecarSettings::default()).expect("hostNetwork refused");
    assert!(host.is_in_the_pod(), "{host:?}");
    assert!(host.to_string().contains("remove hostNetwork"), "{host}");
    let mut named = fixture("plain.yaml");
    named.spec.as_mut().expect("spec").containers[0].name = "sidegate".into();
    assert!(
        refusal(&named, &SidecarSettings::default())
            .expect("name taken")
            .is_in_the_pod()
    );
    let other_image = SidecarSettings {
        image: Some("evil.example/sidecar:1".into()),
        ..SidecarSettings::default()
    };
    let image = refusal(&fixture("plain.yaml"), &other_image).expect("image not allowed");
    assert!(
        !image.is_in_the_pod(),
        "{image:?}: the gateway's, not the pod's"
    );
}

#[test]
fn the_operators_image_pull_secrets_are_added_to_the_pods_own_without_duplicates() {
    let mut config = config();
    config.image_pull_secrets = vec!["sidegate-registry".into(), "shared-registry".into()];
    let inject_with = |pod: &Pod| {
        let injection = inject::inject(
            pod,
            &InjectSettings {
                config: &config,
                namespace: "team-a",
                sidecar: &SidecarSettings::default(),
                env_from: &EnvFromKeys::default(),
            },
        )
        .expect("no refusal")
        .expect("injected");
        let spec = patched(pod, &injection).spec.expect("spec");
        spec.image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
    };
    // A pod without any gets the operator's.
    let plain = fixture("plain.yaml");
    assert!(
        plain
            .spec
            .as_ref()
            .expect("spec")
            .image_pull_secrets
            .is_none()
    );
    assert_eq!(
        inject_with(&plain),
        ["sidegate-registry", "shared-registry"]
    );
    // A pod with its own keeps them first; one it already names is not added again.
    let mut own = fixture("plain.yaml");
    own.spec.as_mut().expect("spec").image_pull_secrets = Some(vec![
        LocalObjectReference {
            name: "app-registry".into(),
        },
        LocalObjectReference {
            name: "shared-registry".into(),
        },
    ]);
    assert_eq!(
        inject_with(&own),
        ["app-registry", "shared-registry", "sidegate-registry"]
    );
    // Without the setting, the patch leaves imagePullSecrets alone (the golden patches).
    let injection = run(&plain, "team-a", &SidecarSettings::default()).expect("injected");
    assert!(
        !serde_json::to_string(&injection.patch)
            .expect("patch")
            .contains("imagePullSecrets")
    );
}

#[test]
fn a_windows_pod_is_skipped_not_given_a_linux_sidecar_the_apiserver_would_refuse() {
    let by_os: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "win", "annotations": {"sidegate.dev/gateway": "main"}},
        "spec": {"os": {"name": "windows"}, "containers": [{"name": "app", "image": "app:1"}]},
    }))
    .expect("pod");
    let by_selector: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "win", "annotations": {"sidegate.dev/gateway": "main"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/os": "windows"},
            "containers": [{"name": "app", "image": "app:1"}],
        },
    }))
    .expect("pod");
    for pod in [&by_os, &by_selector] {
        assert!(inject::is_windows_pod(pod));
        assert_eq!(
            inject::requested_gateway(pod, "team-a", &config()),
            Err(Skip::WindowsPod)
        );
        assert!(run(pod, "team-a", &SidecarSettings::default()).is_none());
    }
    let linux: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lin", "annotations": {"sidegate.dev/gateway": "main"}},
        "spec": {
            "os": {"name": "linux"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "containers": [{"name": "app", "image": "app:1"}],
        },
    }))
    .expect("pod");
    assert!(!inject::is_windows_pod(&linux));
    assert!(run(&linux, "team-a", &SidecarSettings::default()).is_some());
}

#[test]
fn the_sidecar_uid_and_gid_can_be_left_to_the_platform_and_stay_non_root() {
    let mut config = config();
    config.run_as_user = None;
    config.run_as_group = None;
    let pod = fixture("plain.yaml");
    let injection = inject::inject(
        &pod,
        &InjectSettings {
            config: &config,
            namespace: "team-a",
            sidecar: &SidecarSettings::default(),
            env_from: &EnvFromKeys::default(),
        },
    )
    .expect("injects")
    .expect("annotated pod");
    let mut doc = serde_json::to_value(&pod).expect("pod serializes");
    json_patch::patch(&mut doc, &injection.patch).expect("patch applies");
    let patched: Pod = serde_json::from_value(doc).expect("a Pod");
    let sidecar = &patched.spec.expect("spec").init_containers.expect("init")[0];
    let sc = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!((sc.run_as_user, sc.run_as_group), (None, None));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));

    // Another uid is injected as given.
    config.run_as_user = Some(1000680000);
    config.run_as_group = Some(0);
    let injection = inject::inject(
        &pod,
        &InjectSettings {
            config: &config,
            namespace: "team-a",
            sidecar: &SidecarSettings::default(),
            env_from: &EnvFromKeys::default(),
        },
    )
    .expect("injects")
    .expect("annotated pod");
    let patch = serde_json::to_string(&injection.patch).expect("json");
    assert!(
        patch.contains(r#""runAsUser":1000680000"#) && patch.contains(r#""runAsGroup":0"#),
        "{patch}"
    );
}

#[test]
fn a_host_network_pod_is_refused() {
    let mut pod = fixture("plain.yaml");
    pod.spec.as_mut().expect("spec").host_network = Some(true);
    let err = refusal(&pod, &SidecarSettings::default()).expect("hostNetwork refused");
    assert!(err.to_string().contains("hostNetwork"), "{err}");
    pod.spec.as_mut().expect("spec").host_network = Some(false);
    assert!(refusal(&pod, &SidecarSettings::default()).is_none());
}

#[test]
fn a_gateway_naming_a_sidecar_image_the_operator_does_not_allow_gets_no_sidecar() {
    // The operator's defaults: only the repository of its own sidecar image.
    let config = InjectConfig::new(
        "ghcr.io/sidegate/sidegate:0.1.0",
        "0.1.0",
        "sidegate-system",
    );
    let pod = fixture("plain.yaml");
    let with_image = |image: &str| SidecarSettings {
        image: Some(image.into()),
        ..SidecarSettings::default()
    };
    let injected_image = |sidecar: &SidecarSettings| {
        let injection = inject::inject(
            &pod,
            &InjectSettings {
                config: &config,
                namespace: "team-a",
                sidecar,
                env_from: &EnvFromKeys::default(),
            },
        )?
        .expect("annotated pod");
        let mut doc = serde_json::to_value(&pod).expect("pod serializes");
        json_patch::patch(&mut doc, &injection.patch).expect("patch applies");
        let patched: Pod = serde_json::from_value(doc).expect("a Pod");
        Ok::<_, inject::InjectError>(
            patched.spec.expect("spec").init_containers.expect("init")[0]
                .image
                .clone(),
        )
    };

    let err = injected_image(&with_image("attacker.example/sidegate:1"))
        .expect_err("a foreign image is refused");
    assert_eq!(
        err.to_string(),
        "AIGateway main asks for sidecar image \"attacker.example/sidegate:1\", which this operator does not inject (allowed: ghcr.io/sidegate/sidegate (any tag or digest); operator flag --allowed-sidecar-images)"
    );
    for lookalike in [
        "ghcr.io/sidegate/sidegate-debug:0.1.0",
        "ghcr.io/sidegate/sidegate/shell:0.1.0",
    ] {
        assert!(
            matches!(
                injected_image(&with_image(lookalike)),
                Err(inject::InjectError::ImageNotAllowed { .. })
            ),
            "{lookalike}"
        );
    }

    // Another tag or a digest of the operator's repository is injected as named.
    let digest = format!("ghcr.io/sidegate/sidegate@sha256:{}", "0".repeat(64));
    for allowed in ["ghcr.io/sidegate/sidegate:0.2.0", digest.as_str()] {
        assert_eq!(
            injected_image(&with_image(allowed))
                .expect("allowed")
                .as_deref(),
            Some(allowed)
        );
    }
    assert_eq!(
        injected_image(&SidecarSettings::default())
            .expect("the default")
            .as_deref(),
        Some("ghcr.io/sidegate/sidegate:0.1.0")
    );
}

#[test]
fn a_gateway_whose_sidecar_resources_the_apiserver_would_refuse_gets_no_sidecar_injected() {
    let config = config();
    let pod = fixture("plain.yaml");
    let with_resources = |resources: serde_json::Value| SidecarSettings {
        resources: Some(serde_json::from_value(resources).expect("ResourceRequirements")),
        ..SidecarSettings::default()
    };
    let inject = |sidecar: &SidecarSettings| {
        inject::inject(
            &pod,
            &InjectSettings {
                config: &config,
                namespace: "team-a",
                sidecar,
                env_from: &EnvFromKeys::default(),
            },
        )
    };

    let err = inject(&with_resources(serde_json::json!({
        "requests": {"memory": "1Gi"},
        "limits": {"memory": "256Mi"},
    })))
    .expect_err("a request above its limit is refused");
    assert_eq!(
        err.to_string(),
        "AIGateway main sets sidecar resources the apiserver would refuse: spec.sidecar.resources.requests.memory 1Gi is more than limits.memory 256Mi (a request may not exceed its limit)"
    );
    for refused in [
        serde_json::json!({"requests": {"cpu": "abc"}}),
        serde_json::json!({"claims": [{"name": "gpu"}]}),
        serde_json::json!({"limits": {"nvidia.com/gpu": "1"}}),
    ] {
        assert!(
            matches!(
                inject(&with_resources(refused.clone())),
                Err(inject::InjectError::InvalidResources { .. })
            ),
            "{refused}"
        );
    }

    // Resources the apiserver accepts are injected as written, in place of the defaults.
    let accepted =
        serde_json::json!({"requests": {"cpu": "0.1", "memory": "1Gi"}, "limits": {"cpu": "100m"}});
    let injection = inject(&with_resources(accepted.clone()))
        .expect("accepted")
        .expect("annotated pod");
    let mut doc = serde_json::to_value(&pod).expect("pod serializes");
    json_patch::patch(&mut doc, &injection.patch).expect("patch applies");
    let patched: Pod = serde_json::from_value(doc).expect("a Pod");
    let sidecar = &patched.spec.expect("spec").init_containers.expect("init")[0];
    assert_eq!(
        serde_json::to_value(&sidecar.resources).expect("json"),
        accepted
    );
}

#[test]
fn the_excluded_namespaces_are_kube_system_the_operators_own_and_the_flags() {
    assert_eq!(
        inject::excluded_namespaces("sidegate-system", &["batch".into(), " ".into()]),
        ["batch", "kube-system", "sidegate-system"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        InjectConfig::new("img", "0.1.0", "ops").excluded_namespaces,
        inject::excluded_namespaces("ops", &[])
    );
}

#[test]
fn an_injected_pod_records_the_sidecar_image_and_a_hash_of_the_sidecar_settings() {
    let (pod, _) = injected("plain.yaml", &SidecarSettings::default(), "plain.yaml");
    let now = inject::InjectedWith::new(&config(), &SidecarSettings::default());
    assert_eq!(
        annotation(&pod, inject::SIDECAR_IMAGE_ANNOTATION),
        Some("ghcr.io/sidegate/sidegate:0.1.0")
    );
    assert_eq!(
        annotation(&pod, inject::SIDECAR_SETTINGS_ANNOTATION),
        Some(now.settings_hash.as_str())
    );
    assert_eq!(now.settings_hash.len(), 12);
    // The recorded image is the one the sidecar container runs.
    let spec = pod.spec.expect("spec");
    let sidecar = &spec.init_containers.expect("init containers")[0];
    assert_eq!(sidecar.image.as_deref(), Some(now.image.as_str()));
}

#[test]
fn what_a_pod_is_injected_with_changes_with_each_setting_that_shapes_the_sidecar() {
    let base = SidecarSettings::default();
    let hash = |config: &InjectConfig, sidecar: &SidecarSettings| {
        inject::InjectedWith::new(config, sidecar)
    };
    let before = hash(&config(), &base);
    assert_eq!(before, hash(&config(), &base), "deterministic");

    let named = SidecarSettings {
        image: Some("registry.local/sidegate:2".into()),
        ..base.clone()
    };
    let with_image = hash(&config(), &named);
    assert_eq!(with_image.image, "registry.local/sidegate:2");
    assert_eq!(
        with_image.settings_hash, before.settings_hash,
        "the image is recorded apart"
    );
    let mut upgraded = config();
    upgraded.image = "ghcr.io/sidegate/sidegate:0.2.0".into();
    assert_eq!(
        hash(&upgraded, &base).image,
        "ghcr.io/sidegate/sidegate:0.2.0"
    );

    let resources: k8s_openapi::api::core::v1::ResourceRequirements =
        serde_json::from_value(serde_json::json!({"limits": {"memory": "512Mi"}}))
            .expect("resources");
    let changed = [
        SidecarSettings {
            resources: Some(resources.clone()),
            ..base.clone()
        },
        SidecarSettings {
            native_sidecar: false,
            ..base.clone()
        },
        SidecarSettings {
            port: 9000,
            ..base.clone()
        },
        SidecarSettings {
            admin_port: 9001,
            ..base.clone()
        },
    ];
    for sidecar in &changed {
        assert_ne!(
            hash(&config(), sidecar).settings_hash,
            before.settings_hash,
            "{sidecar:?}"
        );
    }
    let mut flags = config();
    flags.image_pull_policy = Some("Always".into());
    assert_ne!(hash(&flags, &base).settings_hash, before.settings_hash);
    let mut flags = config();
    flags.default_resources = resources;
    assert_ne!(hash(&flags, &base).settings_hash, before.settings_hash);
    // The uid/gid: the defaults hash as before they were settable (pods injected then stay
    // current); another value or none does not.
    let mut flags = config();
    flags.run_as_user = Some(inject::SIDECAR_UID);
    assert_eq!(hash(&flags, &base), before);
    flags.run_as_user = None;
    assert_ne!(hash(&flags, &base).settings_hash, before.settings_hash);
    let mut flags = config();
    flags.run_as_group = Some(1000);
    assert_ne!(hash(&flags, &base).settings_hash, before.settings_hash);
    // The operator's version alone changes nothing the sidecar runs with.
    let mut flags = config();
    flags.version = "9.9.9".into();
    assert_eq!(hash(&flags, &base), before);
}
