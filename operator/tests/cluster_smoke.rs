//! Proves the test control plane from `tests/cluster/` is a real Kubernetes:
//! - `/version` reports Kubernetes v1.37 (the binaries were built with version ldflags);
//! - kube-controller-manager's garbage collector deletes a Secret owned by a deleted ConfigMap;
//! - kube-apiserver calls a mutating admission webhook at `https://127.0.0.1:PORT/mutate`
//!   (served by this test over TLS with a CA made here) and applies its patch.
//!
//! Run: `tests/cluster/with-cluster cargo test -p sidegate-operator --test cluster_smoke`

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Label the test webhook adds to ConfigMaps it admits.
const MUTATED_LABEL: &str = "sidegate.test/mutated-by-webhook";
/// Label that opts a ConfigMap in to the test webhook (objectSelector); value is per test run.
const SELECT_LABEL: &str = "sidegate.test/smoke-webhook";

#[tokio::test]
async fn apiserver_reports_v1_37() {
    let Some(client) = common::cluster_client().await else {
        return;
    };
    let info = client
        .apiserver_version()
        .await
        .expect("GET /version from the test apiserver");
    assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "37"));
    assert!(
        info.git_version.starts_with("v1.37."),
        "gitVersion should be v1.37.x (version ldflags), got {:?}",
        info.git_version
    );
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let Some(client) = common::cluster_client().await else {
        return;
    };
    let ns = common::create_test_namespace(&client, "sidegate-smoke-gc").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..ObjectMeta::default()
                },
                data: Some([("k".to_owned(), "v".to_owned())].into()),
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create owner ConfigMap");
    let owner_uid = owner.uid().expect("created ConfigMap has a uid");

    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("owned".into()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "ConfigMap".into(),
                        name: "owner".into(),
                        uid: owner_uid,
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                },
                data: Some([("k".to_owned(), ByteString(b"secret".to_vec()))].into()),
                ..Secret::default()
            },
        )
        .await
        .expect("create owned Secret");

    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner ConfigMap");

    let secrets_ref = &secrets;
    common::eventually(
        "kube-controller-manager's garbage collector to delete the owned Secret",
        Duration::from_secs(60),
        || async move {
            match secrets_ref.get_opt("owned").await {
                Ok(None) => Some(()),
                Ok(Some(_)) => None,
                Err(e) => panic!("GET secret owned: {e}"),
            }
        },
    )
    .await;

    ns.delete().await;
}

#[tokio::test]
async fn apiserver_calls_a_mutating_webhook_on_loopback() {
    let Some(client) = common::cluster_client().await else {
        return;
    };
    let ns = common::create_test_namespace(&client, "sidegate-smoke-webhook").await;
    let selector_value = ns.name.clone();

    // A CA and a serving cert for 127.0.0.1, made here; the apiserver trusts the CA via caBundle.
    let (ca_pem, server_config) = webhook_tls();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind webhook listener on 127.0.0.1");
    let port = listener.local_addr().expect("listener address").port();
    let server = tokio::spawn(serve_webhook(listener, TlsAcceptor::from(server_config)));

    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config_name = common::unique_name("sidegate-smoke");
    webhooks
        .create(
            &PostParams::default(),
            &MutatingWebhookConfiguration {
                metadata: ObjectMeta {
                    name: Some(config_name.clone()),
                    ..ObjectMeta::default()
                },
                webhooks: Some(vec![MutatingWebhook {
                    name: "configmaps.smoke.sidegate.test".into(),
                    admission_review_versions: vec!["v1".into()],
                    side_effects: "None".into(),
                    failure_policy: Some("Fail".into()),
                    timeout_seconds: Some(10),
                    client_config: WebhookClientConfig {
                        url: Some(format!("https://127.0.0.1:{port}/mutate")),
                        ca_bundle: Some(ByteString(ca_pem.into_bytes())),
                        ..WebhookClientConfig::default()
                    },
                    rules: Some(vec![RuleWithOperations {
                        api_groups: Some(vec!["".into()]),
                        api_versions: Some(vec!["v1".into()]),
                        operations: Some(vec!["CREATE".into()]),
                        resources: Some(vec!["configmaps".into()]),
                        scope: Some("Namespaced".into()),
                    }]),
                    // Only this test's namespace and only objects that opt in: never anything else.
                    namespace_selector: Some(match_label("kubernetes.io/metadata.name", &ns.name)),
                    object_selector: Some(match_label(SELECT_LABEL, &selector_value)),
                    ..MutatingWebhook::default()
                }]),
            },
        )
        .await
        .expect("create MutatingWebhookConfiguration");

    // The apiserver picks new webhook configurations up from its informer within moments:
    // create fresh ConfigMaps until one comes back mutated.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let mut attempt = 0u32;
    let mutated = common::eventually(
        "the apiserver to call the webhook and apply its patch",
        Duration::from_secs(30),
        || {
            attempt += 1;
            let cms = cms.clone();
            let selector_value = selector_value.clone();
            async move {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("webhooked-{attempt}")),
                        labels: Some([(SELECT_LABEL.to_owned(), selector_value)].into()),
                        ..ObjectMeta::default()
                    },
                    ..ConfigMap::default()
                };
                let created = cms
                    .create(&PostParams::default(), &cm)
                    .await
                    .expect("create ConfigMap selected by the webhook");
                created
                    .labels()
                    .contains_key(MUTATED_LABEL)
                    .then_some(created)
            }
        },
    )
    .await;
    assert_eq!(
        mutated.labels().get(MUTATED_LABEL).map(String::as_str),
        Some("true")
    );

    // A ConfigMap without the opt-in label is left alone (the selectors are honoured too).
    let plain = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("not-selected".into()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create ConfigMap not selected by the webhook");
    assert!(!plain.labels().contains_key(MUTATED_LABEL));

    webhooks
        .delete(&config_name, &DeleteParams::default())
        .await
        .expect("delete MutatingWebhookConfiguration");
    server.abort();
    ns.delete().await;
}

fn match_label(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(key.to_owned(), value.to_owned())].into()),
        ..LabelSelector::default()
    }
}

/// A fresh CA (PEM, for caBundle) and a rustls server config with a cert for 127.0.0.1 it signed.
fn webhook_tls() -> (String, Arc<rustls::ServerConfig>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sidegate smoke-test webhook CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-sign CA");

    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("webhook cert params");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let leaf_key = KeyPair::generate().expect("webhook key");
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .expect("sign webhook cert");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .expect("webhook TLS config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca.pem(), Arc::new(config))
}

/// Serves `POST /mutate` over TLS until aborted: adds MUTATED_LABEL=true to the object.
async fn serve_webhook(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(handle_admission);
            // Errors on one connection (apiserver hang-ups) only end that connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn handle_admission(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/mutate" {
        return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, b"{}".to_vec()),
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => return reply(StatusCode::BAD_REQUEST, b"{}".to_vec()),
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return reply(StatusCode::BAD_REQUEST, b"{}".to_vec()),
    };
    let patch = Patch(vec![PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(["metadata", "labels", MUTATED_LABEL]),
        value: serde_json::Value::String("true".into()),
    })]);
    let response = match AdmissionResponse::from(&request).with_patch(patch) {
        Ok(r) => r,
        Err(e) => AdmissionResponse::from(&request).deny(format!("patch: {e}")),
    };
    match serde_json::to_vec(&response.into_review()) {
        Ok(json) => reply(StatusCode::OK, json),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
    }
}
