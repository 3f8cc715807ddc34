//! Which sidecar images may be injected (`--allowed-sidecar-images`).
//!
//! An AIGateway may name its sidecar image (`spec.sidecar.image`), and the webhook puts that image
//! into every pod of the namespace that names the gateway, with the gateway's keys mounted.
//! Whoever may write an AIGateway would otherwise choose the code that runs in other people's
//! pods; the operator's flag decides instead. By default only the repository of the operator's
//! own `--sidecar-image` is allowed (any tag or digest).

use std::fmt;

/// The images the operator injects: its own default image, and those its rules allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedImages {
    /// `--sidecar-image`, allowed whatever the rules say (the operator's own choice).
    default_image: String,
    rules: Vec<Rule>,
}

/// One entry of `--allowed-sidecar-images`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `*`: any image.
    Any,
    /// `registry/path/` (ending in `/`): every repository under it.
    Prefix(String),
    /// `registry/path/name`: that repository, any tag or digest.
    Repository(String),
    /// `registry/path/name:tag` or `...@sha256:...`: that image only.
    Exact(Reference),
}

/// Why an entry of `--allowed-sidecar-images` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--allowed-sidecar-images (SIDEGATE_ALLOWED_SIDECAR_IMAGES): '{0}' is not '*', an image repository (e.g. ghcr.io/sidegate/sidegate), a prefix ending in '/' (e.g. registry.example.com/platform/) or an image with a tag or digest"
)]
pub struct InvalidRule(pub String);

/// An image reference, normalized as container runtimes resolve it: `sidegate` is
/// `docker.io/library/sidegate`, `index.docker.io/x/y` is `docker.io/x/y`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// Registry and path, e.g. `ghcr.io/sidegate/sidegate`.
    repository: String,
    /// `:tag`, `@digest`, both, or empty.
    suffix: String,
}

impl AllowedImages {
    /// Only `default_image` and the other tags and digests of its repository.
    pub fn repository_of(default_image: &str) -> Self {
        let rules = parse_reference(default_image)
            .map(|r| vec![Rule::Repository(r.repository)])
            .unwrap_or_default();
        Self {
            default_image: default_image.to_owned(),
            rules,
        }
    }

    /// `default_image` and what `entries` allow; no entries: [`Self::repository_of`].
    pub fn new(entries: &[String], default_image: &str) -> Result<Self, InvalidRule> {
        let entries: Vec<&str> = entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Ok(Self::repository_of(default_image));
        }
        let rules = entries
            .into_iter()
            .map(|e| parse_rule(e).ok_or_else(|| InvalidRule(e.to_owned())))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            default_image: default_image.to_owned(),
            rules,
        })
    }

    /// Whether `image` may be injected.
    pub fn allows(&self, image: &str) -> bool {
        if image == self.default_image {
            return true;
        }
        // Not a reference a runtime would pull as such: nothing to compare.
        let Some(image) = parse_reference(image) else {
            return false;
        };
        self.rules.iter().any(|rule| match rule {
            Rule::Any => true,
            Rule::Prefix(prefix) => image.repository.starts_with(prefix.as_str()),
            Rule::Repository(repository) => image.repository == *repository,
            Rule::Exact(exact) => image == *exact,
        })
    }
}

impl fmt::Display for AllowedImages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for rule in &self.rules {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match rule {
                Rule::Any => f.write_str("any image")?,
                Rule::Prefix(p) => write!(f, "{p}*")?,
                Rule::Repository(r) => write!(f, "{r} (any tag or digest)")?,
                Rule::Exact(e) => write!(f, "{}{}", e.repository, e.suffix)?,
            }
        }
        if first {
            write!(f, "only {}", self.default_image)?;
        }
        Ok(())
    }
}

fn parse_rule(entry: &str) -> Option<Rule> {
    if entry == "*" {
        return Some(Rule::Any);
    }
    if let Some(path) = entry.strip_suffix('/').filter(|p| !p.is_empty()) {
        // A prefix is a registry, or a registry and some path components.
        let (registry, rest) = split_registry(path);
        let valid = rest.is_none_or(|r| r.split('/').all(is_path_component));
        return (is_registry(&registry) && valid).then(|| {
            Rule::Prefix(match rest {
                Some(rest) => format!("{registry}/{rest}/"),
                None => format!("{registry}/"),
            })
        });
    }
    let reference = parse_reference(entry)?;
    Some(if reference.suffix.is_empty() {
        Rule::Repository(reference.repository)
    } else {
        Rule::Exact(reference)
    })
}

/// Parses `[registry/]path[:tag][@digest]` (the grammar of distribution's references).
fn parse_reference(image: &str) -> Option<Reference> {
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    // A ':' after the last '/' starts the tag (one before it is a registry port).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].find(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    let (registry, path) = split_registry(name);
    let path = path?;
    if !is_registry(&registry) || !path.split('/').all(is_path_component) {
        return None;
    }
    let mut suffix = String::new();
    if let Some(tag) = tag {
        let ok = tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return None;
        }
        suffix = format!(":{tag}");
    }
    if let Some(digest) = digest {
        let (algorithm, hex) = digest.split_once(':')?;
        let ok = !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c))
            && hex.len() >= 32
            && hex.chars().all(|c| c.is_ascii_hexdigit());
        if !ok {
            return None;
        }
        suffix.push('@');
        suffix.push_str(digest);
    }
    let repository = if registry == "docker.io" && !path.contains('/') {
        format!("docker.io/library/{path}")
    } else {
        format!("{registry}/{path}")
    };
    Some(Reference { repository, suffix })
}

/// The registry of `name` (lowercase, Docker Hub's aliases folded into `docker.io`) and the
/// path after it; a first component that is no host (no '.', no ':', not `localhost`) belongs
/// to the path on Docker Hub.
fn split_registry(name: &str) -> (String, Option<&str>) {
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_ascii_lowercase(), Some(rest))
        }
        Some(_) => ("docker.io".to_owned(), Some(name)),
        None if name.contains('.') || name.contains(':') || name == "localhost" => {
            (name.to_ascii_lowercase(), None)
        }
        None => ("docker.io".to_owned(), Some(name)),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => registry,
    };
    (registry, path.filter(|p| !p.is_empty()))
}

fn is_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// A path component: lowercase letters and digits, separated by '.', '_', '__' or dashes.
fn is_path_component(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    c.starts_with(alnum)
        && c.ends_with(alnum)
        && c.chars().all(|ch| alnum(ch) || "._-".contains(ch))
        && !c.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "ghcr.io/sidegate/sidegate:0.1.0";

    fn allowed(entries: &[&str]) -> AllowedImages {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        AllowedImages::new(&entries, OWN).expect("valid entries")
    }

    #[test]
    fn by_default_only_the_repository_of_the_operators_sidecar_image_is_allowed() {
        let images = allowed(&[]);
        assert!(images.allows(OWN));
        assert!(images.allows("ghcr.io/sidegate/sidegate:0.2.0"));
        assert!(images.allows(&format!(
            "ghcr.io/sidegate/sidegate@sha256:{}",
            "a".repeat(64)
        )));
        for other in [
            "ghcr.io/sidegate/sidegate-evil:0.1.0",
            "ghcr.io/sidegate/sidegate/evil:0.1.0",
            "ghcr.io/attacker/sidegate:0.1.0",
            "attacker.example/sidegate/sidegate:0.1.0",
            "sidegate:0.1.0",
            "ghcr.io/sidegate/sidegate:bad tag",
            "",
        ] {
            assert!(!images.allows(other), "{other}");
        }
        assert_eq!(
            images.to_string(),
            "ghcr.io/sidegate/sidegate (any tag or digest)"
        );
    }

    #[test]
    fn rules_name_repositories_prefixes_exact_images_or_anything() {
        let images = allowed(&[
            "registry.example.com/platform/",
            "sidegate",
            "quay.io/team/sidegate:1.2",
        ]);
        assert!(images.allows(OWN), "the operator's own image always is");
        assert!(images.allows("registry.example.com/platform/sidegate:x"));
        assert!(
            images.allows(
                "registry.example.com/platform/a/b@sha256:0123456789abcdef0123456789abcdef"
            )
        );
        assert!(!images.allows("registry.example.com/platformer/sidegate:x"));
        assert!(!images.allows("registry.example.com/sidegate:x"));
        // Docker Hub's short names are what runtimes pull: the same repository.
        assert!(images.allows("docker.io/library/sidegate:dev"));
        assert!(images.allows("index.docker.io/library/sidegate"));
        assert!(!images.allows("docker.io/attacker/sidegate:dev"));
        assert!(images.allows("quay.io/team/sidegate:1.2"));
        assert!(!images.allows("quay.io/team/sidegate:1.3"));
        assert!(
            !images.allows("ghcr.io/sidegate/sidegate:0.2.0"),
            "entries replace the default"
        );

        assert!(allowed(&["*"]).allows("attacker.example/anything:1"));
        assert!(allowed(&["localhost:5000/"]).allows("localhost:5000/sidegate:dev"));
    }

    #[test]
    fn entries_that_are_no_image_or_prefix_are_refused() {
        for bad in [
            "ghcr.io/Sidegate/x",
            "https://ghcr.io/x",
            "a b",
            "ghcr.io/x:",
            "/",
        ] {
            assert!(AllowedImages::new(&[bad.to_owned()], OWN).is_err(), "{bad}");
        }
        // Blank entries (a trailing comma) are nothing.
        assert_eq!(
            AllowedImages::new(&[" ".to_owned()], OWN),
            Ok(AllowedImages::repository_of(OWN))
        );
    }
}
