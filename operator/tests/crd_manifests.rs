//! The committed CRD manifests are exactly what `sidegate-operator crd` generates, and the schema
//! patterns agree with the Rust validators.
//! Regenerate with: `cargo run -p sidegate-operator -- crd --out-dir crds/manifests`.

use std::path::Path;

use sidegate_crds::provider::{
    ALIAS_PATTERN, PROVIDER_ID_PATTERN, is_valid_alias, is_valid_provider_id,
};
use sidegate_operator::crd;

#[test]
fn committed_crd_manifests_match_the_generated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/manifests");
    for (file, def) in crd::definitions() {
        let generated = crd::to_yaml(&def).expect("CRD serializes");
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if committed != generated {
            let _ = std::fs::write(std::env::temp_dir().join(file), &generated);
        }
        assert!(
            committed == generated,
            "crds/manifests/{file} is stale (generated copy in {}): run `cargo run -p sidegate-operator -- crd --out-dir crds/manifests` and commit it",
            std::env::temp_dir().join(file).display()
        );
    }
}

#[test]
fn crd_schemas_are_structural_enough_for_kubectl_explain() {
    for (_, def) in crd::definitions() {
        let yaml = crd::to_yaml(&def).expect("CRD serializes");
        // Structural schemas forbid these at any level; kube's rewriter must have removed them.
        for forbidden in [
            "anyOf:",
            "oneOf:",
            "allOf:",
            "$ref",
            "additionalProperties: false",
        ] {
            assert!(
                !yaml.contains(forbidden),
                "{forbidden} in {}",
                def.metadata.name.unwrap_or_default()
            );
        }
    }
}

#[test]
fn schema_patterns_agree_with_the_rust_validators() {
    let provider = regex::Regex::new(PROVIDER_ID_PATTERN).expect("provider pattern compiles");
    let alias = regex::Regex::new(ALIAS_PATTERN).expect("alias pattern compiles");
    let long_slug = format!("custom-{}", "a".repeat(56));
    let too_long_slug = format!("custom-{}", "a".repeat(57));
    for id in sidegate_crds::provider::BUILTIN_PROVIDERS
        .iter()
        .copied()
        .chain([
            "custom-ollama",
            "custom-a",
            "custom-my-llm-2",
            long_slug.as_str(),
            too_long_slug.as_str(),
            "custom-",
            "custom--x",
            "custom-x-",
            "custom-Bad",
            "openai2",
            "OpenAI",
            "",
        ])
    {
        assert_eq!(
            provider.is_match(id),
            is_valid_provider_id(id),
            "provider id {id:?}"
        );
    }
    let long_alias = "a".repeat(64);
    for a in [
        "default",
        "team_b-2",
        "",
        "a.b",
        "../x",
        "A",
        long_alias.as_str(),
        &long_alias[..63],
    ] {
        assert_eq!(alias.is_match(a), is_valid_alias(a), "alias {a:?}");
    }
}

#[test]
fn the_charts_notes_name_the_columns_kubectl_get_aigw_prints() {
    let notes = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sidegate/templates/NOTES.txt"),
    )
    .expect("NOTES.txt");
    let named = notes
        .split("(columns: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("NOTES.txt names the columns of kubectl get aigw");
    let (_, aigateway) = crd::definitions()
        .into_iter()
        .find(|(file, _)| *file == "aigateway.yaml")
        .expect("AIGateway CRD");
    let printed: Vec<String> = aigateway
        .spec
        .versions
        .iter()
        .flat_map(|v| v.additional_printer_columns.iter().flatten())
        .map(|c| c.name.clone())
        .collect();
    // Name is always printed first; the notes name the others.
    assert_eq!(named, printed.join(", "));
}
