//! Golden files of the rendered ConfigMap and Secret for the design docs' example gateway.
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p sidegate-operator --test render_golden`.

mod golden_file;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use sidegate_crds::GatewayConfig;
use sidegate_crds::api::{AIGateway, ProviderKey};
use sidegate_operator::render::{HashSalt, render};

fn load_all<T: DeserializeOwned>(file: &str) -> Vec<T> {
    let text = std::fs::read_to_string(golden_file::tests_dir().join("fixtures").join(file))
        .unwrap_or_else(|e| panic!("reading fixture {file}: {e}"));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("parsing fixture {file}: {e}"))
}

fn assert_golden(name: &str, actual: &str) {
    golden_file::assert_golden("", name, actual);
}

/// The Secret with its values decoded, so the golden file is readable.
fn readable(secret: &Secret) -> String {
    let data: BTreeMap<&str, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    let view = serde_json::json!({
        "metadata": secret.metadata,
        "type": secret.type_,
        "data (decoded)": data,
    });
    serde_saphyr::to_string(&view).expect("secret view serializes")
}

/// A fixed salt, so the hash in the golden files is stable (the operator draws a random one per
/// gateway).
fn salt() -> HashSalt {
    HashSalt::from([0x5a; 32])
}

fn example() -> (AIGateway, Vec<ProviderKey>, BTreeMap<String, Secret>) {
    let gateway = load_all::<AIGateway>("aigateway.yaml").remove(0);
    let keys = load_all::<ProviderKey>("providerkeys.yaml");
    let secrets = load_all::<Secret>("secrets.yaml")
        .into_iter()
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
        .collect();
    (gateway, keys, secrets)
}

#[test]
fn example_gateway_renders_the_golden_config_map_and_secret() {
    let (gateway, keys, secrets) = example();
    let rendered = render(&gateway, &keys, &secrets, None, &salt()).expect("example renders");
    assert!(rendered.problems.is_empty(), "{:?}", rendered.problems);
    let cm = serde_saphyr::to_string(&rendered.config_map).expect("configmap serializes");
    assert_golden("example-configmap.yaml", &cm);
    assert_golden("example-secret.yaml", &readable(&rendered.secret));
}

#[test]
fn rendered_gateway_yaml_is_what_the_sidecar_reads() {
    let (gateway, keys, secrets) = example();
    let rendered = render(&gateway, &keys, &secrets, None, &salt()).expect("example renders");
    let yaml = &rendered.config_map.data.as_ref().expect("data")["gateway.yaml"];
    let config: GatewayConfig =
        serde_saphyr::from_str(yaml).expect("sidecar can parse gateway.yaml");
    assert_eq!(config.schema_version, sidegate_crds::SCHEMA_VERSION);
    assert_eq!(config.gateway.name.as_deref(), Some("main"));
    assert_eq!(config.gateway.generation, Some(3));
    assert_eq!(config.gateway.hash.as_deref(), Some(rendered.hash.as_str()));
    // Kubernetes references are resolved into key files, never left for the sidecar.
    let auth = config.spec.authentication.expect("authentication kept");
    assert!(auth.enabled && auth.token_secret_ref.is_none());
    assert!(
        config
            .spec
            .redis
            .expect("redis kept")
            .url_secret_ref
            .is_none()
    );
    assert_eq!(
        config.keys,
        BTreeMap::from([
            ("anthropic".to_owned(), vec!["default".to_owned()]),
            ("aws-bedrock".to_owned(), vec!["default".to_owned()]),
            (
                "openai".to_owned(),
                vec!["batch".to_owned(), "default".to_owned()]
            ),
        ])
    );
    // Neither the hash salt nor any key value appears in the ConfigMap.
    assert!(
        !yaml.contains(&"5a".repeat(32)),
        "the salt leaked into gateway.yaml"
    );
    for secret in secrets.values() {
        for value in secret.string_data.iter().flatten().map(|(_, v)| v.trim()) {
            assert!(
                !yaml.contains(value),
                "a secret value leaked into gateway.yaml"
            );
        }
    }
}
