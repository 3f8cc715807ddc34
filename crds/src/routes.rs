//! Dynamic routes (`model: "dynamic/<route>"`) and fallback chains (`model: "fallback/<name>"`)
//! compiled from the policy and checked: the operator reports what is wrong in the gateway's
//! status, the sidecar refuses it, with the same message naming the node and field.
//!
//! A route is a graph walked from its `start` node: `conditional` nodes test the request's
//! `cf-aig-metadata` (`metadata.plan == "paid" && metadata.tier != 2`; `==`, `!=`, `<`, `<=`,
//! `>`, `>=` against a string, number or bool; `&&` binds tighter than `||`), `percentage`
//! nodes pick a branch by weight, `rate` nodes take their `fallback` branch once `limit`
//! requests passed them within `interval`, `budget` nodes once the requests that passed them
//! within `interval` cost `limit` USD (each in a fixed or, with `technique: sliding`, a sliding
//! window; with `key: metadata.<name>`, one window per value of that metadata field), and
//! `model` nodes name a target; a failed target continues at the model node's `next`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::policy::{
    DynamicRoute, Fallback, RateLimitScope, RateLimitTechnique, RouteNode, RouteNodeType, parse_usd,
};

/// A provider and model to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Provider id.
    pub provider: String,
    /// Model at that provider.
    pub model: String,
    /// Time to first byte (else the request's).
    pub timeout: Option<std::time::Duration>,
    /// Attempts (else the request's retry policy).
    pub attempts: Option<u32>,
}

/// A node of a compiled route.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Entry.
    Start {
        /// Next node.
        next: String,
    },
    /// A test of the metadata.
    Conditional {
        /// The test.
        cond: Condition,
        /// Node when it holds.
        then: String,
        /// Node when it does not.
        other: String,
    },
    /// A weighted split.
    Percentage {
        /// Weights and nodes.
        branches: Vec<(u64, String)>,
        /// Sum of the weights (above 0).
        total: u64,
    },
    /// A request-rate cap.
    Rate {
        /// Requests per interval.
        limit: u64,
        /// Interval.
        interval: std::time::Duration,
        /// Sliding (else fixed) window.
        sliding: bool,
        /// Metadata field with a window per value (`user` for `metadata.user`); `None`: one
        /// window for all.
        key: Option<String>,
        /// Counted in the gateway's Redis by every pod (else per pod).
        global: bool,
        /// Node while under the limit.
        next: String,
        /// Node once over it.
        fallback: String,
    },
    /// A spend cap.
    Budget {
        /// USD per interval.
        limit: f64,
        /// Interval.
        interval: std::time::Duration,
        /// Sliding (else fixed) window.
        sliding: bool,
        /// Metadata field with a window per value; `None`: one window for all.
        key: Option<String>,
        /// Counted in the gateway's Redis by every pod (else per pod).
        global: bool,
        /// Node while under the cap.
        next: String,
        /// Node once the cap is spent.
        fallback: String,
    },
    /// A target.
    Model {
        /// What to call.
        target: Target,
        /// Node when the target fails (an end node: the failure is the answer).
        next: Option<String>,
    },
    /// Exit.
    End,
}

/// A compiled route: its start node and nodes by id.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// Id of the start node.
    pub start: String,
    /// Nodes by id.
    pub nodes: HashMap<String, Node>,
}

/// Routes and chains of a policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// Routes by name.
    pub routes: HashMap<String, Graph>,
    /// Fallback chains by name.
    pub chains: HashMap<String, Vec<Target>>,
}

/// Most retries of a model node (after its first attempt): 5 attempts in all, as
/// `cf-aig-max-attempts` allows.
const MAX_RETRIES: u32 = 4;
/// Longest time to first byte of a model node, as `cf-aig-request-timeout` allows.
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The node kind as configs spell it.
fn kind_name(kind: RouteNodeType) -> &'static str {
    match kind {
        RouteNodeType::Start => "start",
        RouteNodeType::Conditional => "conditional",
        RouteNodeType::Percentage => "percentage",
        RouteNodeType::Rate => "rate",
        RouteNodeType::Budget => "budget",
        RouteNodeType::Model => "model",
        RouteNodeType::End => "end",
    }
}

/// The first field `n` sets that its kind does not read: a route ported from elsewhere (a
/// Cloudflare model element's `fallback` output) must not lose a branch without a word.
fn stray_field(n: &RouteNode) -> Option<&'static str> {
    let set = [
        ("next", n.next.is_some()),
        ("condition", n.condition.is_some()),
        ("then", n.then_.is_some()),
        ("else", n.else_.is_some()),
        ("branches", !n.branches.is_empty()),
        ("provider", n.provider.is_some()),
        ("model", n.model.is_some()),
        ("timeout", n.timeout.is_some()),
        ("retries", n.retries.is_some()),
        ("limit", n.limit.is_some()),
        ("interval", n.interval.is_some()),
        ("fallback", n.fallback.is_some()),
        ("key", n.key.is_some()),
        ("technique", n.technique.is_some()),
        ("scope", n.scope.is_some()),
    ];
    let reads: &[&str] = match n.kind {
        RouteNodeType::Start => &["next"],
        RouteNodeType::Conditional => &["condition", "then", "else"],
        RouteNodeType::Percentage => &["branches"],
        RouteNodeType::Rate | RouteNodeType::Budget => &[
            "limit",
            "interval",
            "next",
            "fallback",
            "key",
            "technique",
            "scope",
        ],
        RouteNodeType::Model => &["next", "provider", "model", "timeout", "retries"],
        RouteNodeType::End => &[],
    };
    set.into_iter()
        .find(|(field, is_set)| *is_set && !reads.contains(field))
        .map(|(field, _)| field)
}

/// Compiles `spec.routes` and `spec.fallbacks`; the error names the node and field.
/// `known_provider` tells whether a provider id can be served.
pub fn compile(
    routes: &[DynamicRoute],
    fallbacks: &[Fallback],
    known_provider: impl Fn(&str) -> bool,
) -> Result<Compiled, String> {
    let mut out = Compiled::default();
    for (ri, r) in routes.iter().enumerate() {
        let at = |ni: usize, field: &str| format!("spec.routes[{ri}].nodes[{ni}].{field}");
        let mut nodes = HashMap::new();
        let mut start = None;
        for (ni, n) in r.nodes.iter().enumerate() {
            let need = |v: &Option<String>, field: &str| {
                v.clone()
                    .ok_or_else(|| format!("{} is required for a {:?} node", at(ni, field), n.kind))
            };
            // The window (interval, sliding, key) and both branches of a rate or budget node.
            let capped = || {
                let interval = n
                    .interval
                    .map(|d| d.get())
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("{} must be above 0", at(ni, "interval")))?;
                let key = match n.key.as_deref() {
                    None => None,
                    Some(k) => Some(
                        k.strip_prefix("metadata.")
                            .filter(|name| is_metadata_name(name))
                            .ok_or_else(|| {
                                format!(
                                    "{} must be metadata.<name> (a cf-aig-metadata field: letters, digits, _ or -), got {k:?}",
                                    at(ni, "key")
                                )
                            })?
                            .to_owned(),
                    ),
                };
                let sliding = n.technique == Some(RateLimitTechnique::Sliding);
                let global = n.scope == Some(RateLimitScope::Global);
                Ok::<_, String>((
                    (interval, sliding, key, global),
                    need(&n.next, "next")?,
                    need(&n.fallback, "fallback")?,
                ))
            };
            if let Some(field) = stray_field(n) {
                let hint = match (n.kind, field) {
                    (RouteNodeType::Model, "fallback") => {
                        " (a model node that fails goes on to its next node)"
                    }
                    _ => "",
                };
                let kind = kind_name(n.kind);
                let a = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                return Err(format!(
                    "{} is not a field of {a} {kind} node{hint}",
                    at(ni, field)
                ));
            }
            let node = match n.kind {
                RouteNodeType::Start => {
                    if start.replace(n.id.clone()).is_some() {
                        return Err(format!("spec.routes[{ri}]: more than one start node"));
                    }
                    Node::Start {
                        next: need(&n.next, "next")?,
                    }
                }
                RouteNodeType::Conditional => Node::Conditional {
                    cond: Condition::parse(n.condition.as_deref().unwrap_or_default())
                        .map_err(|e| format!("{}: {e}", at(ni, "condition")))?,
                    then: need(&n.then_, "then")?,
                    other: need(&n.else_, "else")?,
                },
                RouteNodeType::Percentage => {
                    if n.branches.is_empty() {
                        return Err(format!("{} needs at least one branch", at(ni, "branches")));
                    }
                    let branches: Vec<(u64, String)> = n
                        .branches
                        .iter()
                        .map(|b| (u64::from(b.weight), b.next.clone()))
                        .collect();
                    let total = branches.iter().map(|b| b.0).sum();
                    if total == 0 {
                        return Err(format!("{}: the weights add up to 0", at(ni, "branches")));
                    }
                    Node::Percentage { branches, total }
                }
                RouteNodeType::Rate => {
                    let limit = n
                        .limit
                        .as_deref()
                        .and_then(|l| l.trim().parse::<u64>().ok())
                        .filter(|l| *l > 0)
                        .ok_or_else(|| {
                            format!("{} must be a number of requests above 0", at(ni, "limit"))
                        })?;
                    let ((interval, sliding, key, global), next, fallback) = capped()?;
                    Node::Rate {
                        limit,
                        interval,
                        sliding,
                        key,
                        global,
                        next,
                        fallback,
                    }
                }
                RouteNodeType::Budget => {
                    let limit = n
                        .limit
                        .as_deref()
                        .and_then(|l| parse_usd(l.trim()))
                        .filter(|l| *l > 0.0)
                        .ok_or_else(|| {
                            format!("{} must be an amount of USD above 0", at(ni, "limit"))
                        })?;
                    let ((interval, sliding, key, global), next, fallback) = capped()?;
                    Node::Budget {
                        limit,
                        interval,
                        sliding,
                        key,
                        global,
                        next,
                        fallback,
                    }
                }
                RouteNodeType::Model => {
                    let next = need(&n.next, "next")?;
                    let provider = need(&n.provider, "provider")?;
                    if !known_provider(&provider) {
                        return Err(format!(
                            "{}: unknown provider {provider:?}",
                            at(ni, "provider")
                        ));
                    }
                    // Retries after the first attempt, as Cloudflare's model element counts them.
                    if let Some(r) = n.retries
                        && r > MAX_RETRIES
                    {
                        return Err(format!(
                            "{} must be 0 to {MAX_RETRIES} retries, got {r}",
                            at(ni, "retries")
                        ));
                    }
                    let timeout = n.timeout.map(|d| d.get());
                    if let Some(t) = timeout
                        && (t.is_zero() || t > MAX_TIMEOUT)
                    {
                        return Err(format!(
                            "{} must be 1ms to 1h, got {}ms",
                            at(ni, "timeout"),
                            t.as_millis()
                        ));
                    }
                    Node::Model {
                        target: Target {
                            provider,
                            model: need(&n.model, "model")?,
                            timeout,
                            attempts: n.retries.map(|r| r + 1),
                        },
                        next: Some(next),
                    }
                }
                RouteNodeType::End => Node::End,
            };
            if nodes.insert(n.id.clone(), node).is_some() {
                return Err(format!("{}: duplicate node id {:?}", at(ni, "id"), n.id));
            }
        }
        let start = start.ok_or_else(|| format!("spec.routes[{ri}]: no start node"))?;
        if !nodes.values().any(|n| matches!(n, Node::End)) {
            return Err(format!("spec.routes[{ri}] ({}): no end node", r.name));
        }
        // Every edge leads to a node of the route.
        for (id, node) in &nodes {
            let edges: Vec<&String> = match node {
                Node::Start { next } => vec![next],
                Node::Conditional { then, other, .. } => vec![then, other],
                Node::Percentage { branches, .. } => branches.iter().map(|b| &b.1).collect(),
                Node::Rate { next, fallback, .. } | Node::Budget { next, fallback, .. } => {
                    vec![next, fallback]
                }
                Node::Model { next, .. } => next.iter().collect(),
                Node::End => vec![],
            };
            if let Some(bad) = edges.into_iter().find(|e| !nodes.contains_key(*e)) {
                return Err(format!(
                    "spec.routes[{ri}] ({}): node {id:?} leads to {bad:?}, which is not a node of the route",
                    r.name
                ));
            }
        }
        if out
            .routes
            .insert(r.name.clone(), Graph { start, nodes })
            .is_some()
        {
            return Err(format!(
                "spec.routes[{ri}].name: duplicate route name {:?}",
                r.name
            ));
        }
    }
    for (ci, c) in fallbacks.iter().enumerate() {
        if c.targets.is_empty() {
            return Err(format!("spec.fallbacks[{ci}].targets: at least one target"));
        }
        let mut targets = Vec::with_capacity(c.targets.len());
        for (ti, t) in c.targets.iter().enumerate() {
            if !known_provider(&t.provider) {
                return Err(format!(
                    "spec.fallbacks[{ci}].targets[{ti}].provider: unknown provider {:?}",
                    t.provider
                ));
            }
            targets.push(Target {
                provider: t.provider.clone(),
                model: t.model.clone(),
                timeout: None,
                attempts: None,
            });
        }
        if out.chains.insert(c.name.clone(), targets).is_some() {
            return Err(format!(
                "spec.fallbacks[{ci}].name: duplicate fallback name {:?}",
                c.name
            ));
        }
    }
    Ok(out)
}

/// Whether `name` can follow `metadata.` in a condition or a node's key.
fn is_metadata_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A condition on the request metadata: `||` of `&&` of comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition(Vec<Vec<Cmp>>);

#[derive(Debug, Clone, PartialEq)]
struct Cmp {
    key: String,
    op: Op,
    value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Condition {
    /// Parses a condition; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty condition".into());
        }
        let mut ors = Vec::new();
        for or in split_outside_quotes(s, "||") {
            let mut ands = Vec::new();
            for cmp in split_outside_quotes(or, "&&") {
                ands.push(Cmp::parse(cmp.trim())?);
            }
            ors.push(ands);
        }
        Ok(Self(ors))
    }

    /// Whether the condition holds for `metadata`.
    pub fn eval(&self, metadata: &Map<String, Value>) -> bool {
        self.0
            .iter()
            .any(|ands| ands.iter().all(|c| c.eval(metadata)))
    }
}

/// Splits on `sep` where it is not inside a quoted string.
fn split_outside_quotes<'s>(s: &'s str, sep: &str) -> Vec<&'s str> {
    let mut parts = Vec::new();
    let (mut quote, mut last) = (None, 0);
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            // Bytes, not `s[i..]`: `i` may be inside a multi-byte character.
            None if bytes[i..].starts_with(sep.as_bytes()) => {
                parts.push(&s[last..i]);
                i += sep.len();
                last = i;
                continue;
            }
            None => {}
        }
        i += 1;
    }
    parts.push(&s[last..]);
    parts
}

impl Cmp {
    fn parse(s: &str) -> Result<Self, String> {
        const OPS: [(&str, Op); 6] = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let (pos, text, op) = OPS
            .iter()
            .filter_map(|(t, op)| s.find(t).map(|p| (p, *t, *op)))
            .min_by_key(|(p, t, _)| (*p, std::cmp::Reverse(t.len())))
            .ok_or_else(|| format!("expected metadata.<key> <op> <value> in {s:?}"))?;
        let left = s[..pos].trim();
        let right = s[pos + text.len()..].trim();
        let key = left
            .strip_prefix("metadata.")
            .filter(|k| is_metadata_name(k))
            .ok_or_else(|| format!("the left side must be metadata.<key>, got {left:?}"))?;
        let value = if let Some(q) = right
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| right.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
        {
            Value::String(q.to_owned())
        } else if right == "true" || right == "false" {
            Value::Bool(right == "true")
        } else if let Ok(n) = right.parse::<f64>() {
            serde_json::Number::from_f64(n)
                .map(Value::Number)
                .ok_or_else(|| format!("bad number {right:?}"))?
        } else {
            return Err(format!(
                "the right side must be a quoted string, a number or true/false, got {right:?}"
            ));
        };
        if matches!(value, Value::String(_) | Value::Bool(_)) && !matches!(op, Op::Eq | Op::Ne) {
            return Err(format!("{text} compares numbers only"));
        }
        Ok(Self {
            key: key.to_owned(),
            op,
            value,
        })
    }

    fn eval(&self, metadata: &Map<String, Value>) -> bool {
        let Some(have) = metadata.get(&self.key) else {
            return self.op == Op::Ne;
        };
        match (&self.value, have) {
            (Value::Number(want), Value::Number(got)) => {
                let (w, g) = (
                    want.as_f64().unwrap_or(f64::NAN),
                    got.as_f64().unwrap_or(f64::NAN),
                );
                match self.op {
                    Op::Eq => g == w,
                    Op::Ne => g != w,
                    Op::Lt => g < w,
                    Op::Le => g <= w,
                    Op::Gt => g > w,
                    Op::Ge => g >= w,
                }
            }
            (want, got) => match self.op {
                Op::Eq => want == got,
                Op::Ne => want != got,
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn conditions_parse_quotes_numbers_and_bools() {
        let e =
            Condition::parse(r#"metadata.a == "x || y" || metadata.b != false"#).expect("parse");
        assert!(e.eval(&meta(serde_json::json!({"a": "x || y"}))));
        assert!(e.eval(&meta(serde_json::json!({"b": true}))));
        assert!(!e.eval(&meta(serde_json::json!({"a": "z", "b": false}))));
        assert!(Condition::parse(r#"metadata.a > "x""#).is_err());
        assert!(Condition::parse("plan == 1").is_err());
        assert!(
            Condition::parse("metadata.n < 1.5")
                .expect("n")
                .eval(&meta(serde_json::json!({"n": 1})))
        );
        let both =
            Condition::parse(r#"metadata.plan == "paid" && metadata.tier >= 2"#).expect("and");
        assert!(both.eval(&meta(serde_json::json!({"plan": "paid", "tier": 2}))));
        assert!(!both.eval(&meta(serde_json::json!({"plan": "paid", "tier": 1}))));
        assert!(!both.eval(&Map::new()));
    }

    /// A route whose node 1 is `capped`, between a start node and an end node.
    fn route_with(capped: RouteNode) -> Result<Compiled, String> {
        let node = |id: &str, kind: RouteNodeType, next: Option<&str>| RouteNode {
            next: next.map(Into::into),
            ..RouteNode::new(id, kind)
        };
        let capped = RouteNode {
            id: "cap".into(),
            ..capped
        };
        let nodes = vec![
            node("s", RouteNodeType::Start, Some("cap")),
            capped,
            node("e", RouteNodeType::End, None),
        ];
        compile(
            &[DynamicRoute {
                name: "r".into(),
                nodes,
            }],
            &[],
            |_| true,
        )
    }

    /// A yaml node of the route (`type`, `limit`, `interval`, `next` and `fallback` given).
    fn capped(kind: &str, extra: &str) -> RouteNode {
        let limit = if kind == "budget" {
            "\"1.00\""
        } else {
            "\"5\""
        };
        serde_json::from_value(
            serde_json::from_str::<Value>(&format!(
                r#"{{"id": "cap", "type": "{kind}", "limit": {limit}, "interval": "1m", "next": "e", "fallback": "e"{extra}}}"#
            ))
            .expect("json"),
        )
        .expect("a node")
    }

    #[test]
    fn rate_and_budget_nodes_take_a_metadata_key_a_technique_and_a_scope() {
        for kind in ["rate", "budget"] {
            let got = route_with(capped(
                kind,
                r#", "key": "metadata.user_id", "technique": "sliding", "scope": "global""#,
            ))
            .expect("valid");
            let (sliding, key, global) = match &got.routes["r"].nodes["cap"] {
                Node::Rate {
                    sliding,
                    key,
                    global,
                    ..
                }
                | Node::Budget {
                    sliding,
                    key,
                    global,
                    ..
                } => (*sliding, key.clone(), *global),
                other => panic!("{other:?}"),
            };
            assert!(sliding && global, "{kind}");
            assert_eq!(key.as_deref(), Some("user_id"), "{kind}");
            // None of them: one fixed window on each pod, as before.
            let got = route_with(capped(kind, "")).expect("valid");
            assert!(matches!(
                &got.routes["r"].nodes["cap"],
                Node::Rate {
                    sliding: false,
                    key: None,
                    global: false,
                    ..
                } | Node::Budget {
                    sliding: false,
                    key: None,
                    global: false,
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_key_that_is_not_a_metadata_field_is_refused_naming_the_node() {
        for bad in [
            "user_id",
            "metadata.",
            "metadata.a.b",
            "headers.x",
            "metadata.é",
        ] {
            let err =
                route_with(capped("rate", &format!(r#", "key": "{bad}""#))).expect_err("refused");
            assert!(
                err.starts_with("spec.routes[0].nodes[1].key must be metadata.<name>")
                    && err.contains(&format!("{bad:?}")),
                "{err}"
            );
        }
        // A technique other than fixed or sliding does not parse.
        let err = serde_json::from_str::<RouteNode>(
            r#"{"id": "cap", "type": "rate", "technique": "bogus"}"#,
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("unknown variant `bogus`, expected `fixed` or `sliding`"),
            "{err}"
        );
        // Nodes other than rate and budget do not read them.
        let mut start = capped("rate", r#", "key": "metadata.user""#);
        start.kind = RouteNodeType::Start;
        start.limit = None;
        start.interval = None;
        start.fallback = None;
        let err = route_with(start).expect_err("refused");
        assert_eq!(
            err,
            "spec.routes[0].nodes[1].key is not a field of a start node"
        );
    }

    #[test]
    fn non_ascii_conditions_are_parsed_or_refused_never_a_panic() {
        // Curly quotes pasted from a document: not quotes to the parser, so a clear error.
        let err =
            Condition::parse("metadata.plan == “paid” || metadata.x == 1").expect_err("curly");
        assert!(err.contains("right side"), "{err}");
        let e = Condition::parse(r#"metadata.city == "Zürich" || metadata.team == 'équipe'"#)
            .expect("non-ASCII inside quotes");
        assert!(e.eval(&meta(serde_json::json!({"city": "Zürich"}))));
        assert!(e.eval(&meta(serde_json::json!({"team": "équipe"}))));
        for s in [
            "é||é",
            "metadata.é == 1",
            "&&é",
            "ü",
            "metadata.a == 1 && ß",
        ] {
            let _ = Condition::parse(s);
        }
    }
}
