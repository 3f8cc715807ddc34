//! Provider ids of SPEC.md, shared so that the operator validates what the sidecar serves.

/// Every built-in provider id: SPEC.md's table and the further providers Cloudflare's gateway
/// documents (`cerebras`, `baseten`, `parallel`, `replicate`, `elevenlabs`, `cartesia`, `fal`,
/// `ideogram`); `custom-<slug>` providers come from config.
pub const BUILTIN_PROVIDERS: &[&str] = &[
    "openai",
    "anthropic",
    "azure-openai",
    "aws-bedrock",
    "google-ai-studio",
    "google-vertex-ai",
    "groq",
    "mistral",
    "cohere",
    "deepseek",
    "grok",
    "perplexity-ai",
    "openrouter",
    "huggingface",
    "workers-ai",
    "cerebras",
    "baseten",
    "parallel",
    "replicate",
    "elevenlabs",
    "cartesia",
    "fal",
    "ideogram",
];

/// Schema pattern of a provider id: the built-in ids or `custom-<slug>`; a test keeps it equal to
/// [`is_valid_provider_id`].
pub const PROVIDER_ID_PATTERN: &str = "^(openai|anthropic|azure-openai|aws-bedrock|google-ai-studio|google-vertex-ai|groq|mistral|cohere|deepseek|grok|perplexity-ai|openrouter|huggingface|workers-ai|cerebras|baseten|parallel|replicate|elevenlabs|cartesia|fal|ideogram|custom-[a-z0-9]([a-z0-9-]{0,54}[a-z0-9])?)$";

/// Schema pattern of a key alias; a test keeps it equal to [`is_valid_alias`].
pub const ALIAS_PATTERN: &str = "^[A-Za-z0-9_-]{1,63}$";

/// Prefix of user-defined providers: `custom-<slug>`.
pub const CUSTOM_PREFIX: &str = "custom-";

/// Whether `id` is a built-in provider or a well-formed `custom-<slug>` id.
pub fn is_valid_provider_id(id: &str) -> bool {
    BUILTIN_PROVIDERS.contains(&id) || is_custom_provider_id(id)
}

/// Whether `id` is `custom-<slug>` with a slug of lowercase letters, digits and dashes.
pub fn is_custom_provider_id(id: &str) -> bool {
    id.strip_prefix(CUSTOM_PREFIX).is_some_and(|slug| {
        !slug.is_empty()
            && slug.len() <= 56
            && slug
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !slug.starts_with('-')
            && !slug.ends_with('-')
    })
}

/// Whether `alias` is a valid key alias: it becomes part of a file name (`<provider>.<alias>`).
pub fn is_valid_alias(alias: &str) -> bool {
    !alias.is_empty()
        && alias.len() <= 63
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_need_a_lowercase_slug() {
        assert!(is_valid_provider_id("openai"));
        assert!(is_valid_provider_id("cerebras"));
        assert!(is_valid_provider_id("baseten"));
        assert!(is_valid_provider_id("parallel"));
        assert!(is_valid_provider_id("custom-ollama"));
        assert!(is_valid_provider_id("custom-my-llm-2"));
        assert!(!is_valid_provider_id("custom-"));
        assert!(!is_valid_provider_id("custom-Bad"));
        assert!(!is_valid_provider_id("custom-a/b"));
        assert!(!is_valid_provider_id("openai2"));
    }

    #[test]
    fn aliases_are_safe_file_name_parts() {
        assert!(is_valid_alias("default"));
        assert!(is_valid_alias("team_b-2"));
        assert!(!is_valid_alias(""));
        assert!(!is_valid_alias("a.b"));
        assert!(!is_valid_alias("../x"));
    }
}
