//! Which namespaces the operator serves: the whole cluster (the default), or only the ones
//! `--watch-namespace` names — then its RBAC can be Roles in those namespaces alone, and the
//! Secrets of every other namespace stay out of its reach.

use std::collections::BTreeSet;

use k8s_openapi::NamespaceResourceScope;
use kube::{Api, Client, Resource};

/// The namespaces the controllers watch and the webhook injects in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every namespace.
    namespaces: Option<BTreeSet<String>>,
}

/// A namespace name that cannot be one (RFC 1123 label: at most 63 lowercase letters, digits
/// and `-`, starting and ending with a letter or digit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--watch-namespace {0:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
)]
pub struct BadNamespace(pub String);

impl Scope {
    /// Every namespace.
    pub fn cluster() -> Self {
        Self::default()
    }

    /// Only `names` (blank entries ignored); the whole cluster when there are none.
    pub fn namespaces<I, S>(names: I) -> Result<Self, BadNamespace>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            if !is_label(name) {
                return Err(BadNamespace(name.to_owned()));
            }
            set.insert(name.to_owned());
        }
        Ok(Self {
            namespaces: (!set.is_empty()).then_some(set),
        })
    }

    /// Whether the operator serves namespace `ns`.
    pub fn includes(&self, ns: &str) -> bool {
        self.namespaces.as_ref().is_none_or(|set| set.contains(ns))
    }

    /// One entry per set of watches to run: `None` for the whole cluster, else each namespace.
    pub fn watches(&self) -> Vec<Option<&str>> {
        match &self.namespaces {
            None => vec![None],
            Some(set) => set.iter().map(|ns| Some(ns.as_str())).collect(),
        }
    }

    /// Runs `run` for each entry of [`Self::watches`] at once, until all have returned.
    pub async fn run_each<'a, F, Fut>(&'a self, run: F)
    where
        F: FnMut(Option<&'a str>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        futures_util::future::join_all(self.watches().into_iter().map(run)).await;
    }

    /// The API of `K` in `ns`, or in every namespace for `None` (an entry of [`Self::watches`]).
    pub fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    /// For logs: `the whole cluster` or `namespaces a, b`.
    pub fn describe(&self) -> String {
        match &self.namespaces {
            None => "the whole cluster".to_owned(),
            Some(set) => format!(
                "namespace{} {}",
                if set.len() == 1 { "" } else { "s" },
                set.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_names_is_the_whole_cluster() {
        let all = Scope::namespaces(["", " "]).expect("scope");
        assert_eq!(all, Scope::cluster());
        assert!(all.includes("anything"));
        assert_eq!(all.watches(), vec![None]);
        assert_eq!(all.describe(), "the whole cluster");
    }

    #[test]
    fn named_namespaces_are_the_only_ones_served() {
        let s = Scope::namespaces(["team-b", "team-a", "team-a"]).expect("scope");
        assert!(s.includes("team-a") && s.includes("team-b"));
        assert!(!s.includes("team-c") && !s.includes("kube-system"));
        assert_eq!(s.watches(), vec![Some("team-a"), Some("team-b")]);
        assert_eq!(s.describe(), "namespaces team-a, team-b");
        assert_eq!(
            Scope::namespaces(["apps"]).expect("one").describe(),
            "namespace apps"
        );
    }

    #[test]
    fn names_that_cannot_be_namespaces_are_refused() {
        for bad in ["Team-A", "team_a", "-team", "team-", "a.b", &"x".repeat(64)] {
            assert_eq!(
                Scope::namespaces([bad]),
                Err(BadNamespace(bad.to_owned())),
                "{bad}"
            );
        }
        assert!(Scope::namespaces([&"x".repeat(63)]).is_ok());
    }
}
