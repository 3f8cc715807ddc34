//! `operator/webhook.yaml`, the MutatingWebhookConfiguration the operator expects (the Helm chart
//! ships it), is generated from `webhook::configuration` and must not drift from it.
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p sidegate-operator --test webhook_manifest`.

use std::path::Path;

use sidegate_operator::webhook;

const HEADER: &str = "\
# MutatingWebhookConfiguration of the sidegate sidecar injection webhook (the Helm chart ships it).
# Generated from operator/src/webhook/mod.rs (`configuration`); checked by
# operator/tests/webhook_manifest.rs. caBundle is filled in by the operator (--cert-mode
# self-managed) or by cert-manager's CA injector (annotation cert-manager.io/inject-ca-from).
";

#[test]
fn the_committed_webhook_manifest_matches_the_code() {
    let excluded = ["kube-system", "sidegate-system"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let config = webhook::configuration(
        "sidegate-operator",
        webhook::service_client_config("sidegate-webhook", "sidegate-system", None),
        &excluded,
    );
    let mut value = serde_json::to_value(&config).expect("serializes");
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "apiVersion".into(),
            "admissionregistration.k8s.io/v1".into(),
        );
        obj.insert("kind".into(), "MutatingWebhookConfiguration".into());
    }
    let mut yaml = format!("{HEADER}{}", serde_saphyr::to_string(&value).expect("yaml"));
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("webhook.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &yaml).expect("write webhook.yaml");
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("read operator/webhook.yaml");
    assert_eq!(
        committed, yaml,
        "operator/webhook.yaml is stale; rerun with UPDATE_GOLDEN=1"
    );
}
