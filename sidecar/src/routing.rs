//! Walking the dynamic routes and fallback chains of `/compat` (compiled and checked by
//! [`sidegate_crds::routes`]) for one request: which provider and model serve it, and what to
//! try when one fails. When a target fails (no answer, timeout, non-2xx) the walk goes on from
//! that model node's `next`; reaching `end` (or a model node without `next`) makes that failure
//! the answer. Rate and budget nodes count per pod, or with `scope: global` in the gateway's
//! Redis ([`crate::shared`]; while it cannot be used, by this pod alone, as the gateway's own
//! global limit), in fixed or sliding windows (the gateway rate limit's, [`crate::ratelimit`]),
//! one per node or, with a `key`, one per value of that metadata field (a budget node is
//! charged the cost of the requests that took its `next` branch, when their responses end, in
//! billionths of a USD; a rate node counts only the requests sent upstream); one over its limit
//! that leads to `end` before any target is the answer, a 429 as the gateway's own limits give.
//! A walk visits at most 64 nodes and 16 targets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sidegate_crds::policy::{DynamicRoute, Fallback};
pub use sidegate_crds::routes::Target;
use sidegate_crds::routes::{Compiled, Graph, Node};

use crate::budget::usd_units;
use crate::error::GatewayError;
use crate::ratelimit::{Keyed, Limiter, Settings as RateSettings, Shape, counted, interval_text};
use crate::shared::{Shared, Wait, Windows};
use crate::telemetry::{Metrics, RedisOp};

/// The gateway's Redis, for the nodes that count there, and the metrics its failures go to.
pub type Redis = (Arc<Shared>, Arc<Metrics>);

/// Most nodes visited for one request (routes may loop back; the walk stops here).
const MAX_HOPS: usize = 64;
/// Most targets tried for one request.
const MAX_TARGETS: usize = 16;

/// The routes and chains of a loaded config, with the counters of their rate and budget nodes.
#[derive(Debug, Default)]
pub struct Routing {
    compiled: Compiled,
    /// Per (route, node id) of every rate and budget node.
    counters: HashMap<(String, String), Counter>,
    seed: AtomicU64,
    /// The models a budget node was told of that have no price (warned once each).
    unpriced: Arc<Unpriced>,
}

/// Models whose answers a budget node could not charge, for lack of a price: said once each.
#[derive(Debug, Default)]
struct Unpriced(std::sync::Mutex<std::collections::HashSet<String>>);

/// How many unpriced models are remembered (a client names any model it likes).
const MAX_UNPRICED: usize = 1024;

/// The windows of one rate or budget node, and what they count: a reload keeps them for a node
/// of the same kind counting by the same key in windows of the same shape.
#[derive(Debug)]
struct Counter {
    budget: bool,
    key: Option<String>,
    /// The node's interval and technique.
    shape: Shape,
    /// Counted in Redis (when the walk has it; else here).
    global: bool,
    windows: Arc<Keyed>,
}

/// Where a rate or budget node counts one request: a window of this pod, or one in Redis (and
/// the pod's window of the same node and value, which counts too and decides alone while Redis
/// cannot be used).
#[derive(Clone)]
enum Window {
    Pod(Arc<Limiter>),
    Redis {
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        windows: Windows,
        pod: Arc<Limiter>,
    },
}

/// What a rate node's window holds of a request it let past.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// Counted on this pod at that time.
    Pod(Instant),
    /// Counted in that window in Redis (or kept for it while Redis could not be used), and on
    /// this pod at that time.
    Redis(u64, Instant),
    /// Nothing: sent (the count stays).
    Nothing,
    /// Counted, then given back while the request waited ([`Walk::set_aside`]).
    GivenBack,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pod(l) => f.debug_tuple("Pod").field(l).finish(),
            Self::Redis { windows, .. } => f.debug_tuple("Redis").field(windows).finish(),
        }
    }
}

impl Window {
    /// Counts a request under `s` if it is within the limit; else the wait until one would be.
    /// `wait` is the request's for Redis.
    async fn check(&self, s: &RateSettings, now: Instant, wait: &Wait) -> Result<Held, Duration> {
        match self {
            Self::Pod(l) => l.check(s, now).map(|()| Held::Pod(now)),
            Self::Redis {
                shared,
                metrics,
                windows,
                pod,
            } => shared
                .count(metrics, wait, windows, s, pod, now, RedisOp::RouteNode)
                .await
                .map(|window| Held::Redis(window, now)),
        }
    }

    /// Whether a budget node's window has room under `s`; else the wait until it has.
    /// `wait` is the request's for Redis.
    async fn room(&self, s: &RateSettings, now: Instant, wait: &Wait) -> Result<(), Duration> {
        match self {
            Self::Pod(l) => l.room(s, now),
            Self::Redis {
                shared,
                metrics,
                windows,
                pod,
            } => {
                shared
                    .room(metrics, wait, windows, s, pod, now, RedisOp::RouteNode)
                    .await
            }
        }
    }

    /// Adds `n` whatever the limit.
    fn add(&self, s: &RateSettings, n: u64) {
        match self {
            Self::Pod(l) => l.add(s, Instant::now(), n),
            Self::Redis {
                shared,
                metrics,
                windows,
                pod,
            } => {
                shared.add(metrics, windows, s, n);
                pod.add(s, Instant::now(), n);
            }
        }
    }

    /// Takes back what [`Self::check`] counted.
    fn release(&self, s: &RateSettings, held: Held) {
        match (self, held) {
            (Self::Pod(l), Held::Pod(at)) => l.release(s, at),
            (
                Self::Redis {
                    shared,
                    metrics,
                    windows,
                    pod,
                },
                Held::Redis(window, at),
            ) => {
                shared.uncount(metrics, windows, s, window);
                pod.release(s, at);
            }
            _ => {}
        }
    }
}

/// The window a budget node charged a request to, and its shape.
#[derive(Debug)]
pub struct BudgetCharge {
    window: Window,
    settings: RateSettings,
    unpriced: Arc<Unpriced>,
}

impl BudgetCharge {
    /// Adds the cost of a request that took this node's `next` branch.
    pub fn charge(&self, usd: f64) {
        self.window.add(&self.settings, usd_units(usd));
    }

    /// A successful answer of `model` had no cost to charge (no price, or no token counts):
    /// warned once per model, as an operator who set a budget would want to hear it does not
    /// see these answers. `log_id` is the answer's request's.
    pub fn uncharged(&self, model: &str, log_id: &str) {
        let mut seen = self
            .unpriced
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_UNPRICED || !seen.insert(model.to_owned()) {
            return;
        }
        drop(seen);
        tracing::warn!(
            model,
            log_id,
            "a route's budget node could not charge an answer: its model has no price (or it reported no token counts); give it one in spec.pricing (said once per model)"
        );
    }
}

impl Routing {
    /// Routes from `spec.routes` and chains from `spec.fallbacks`; the error names the node and
    /// field. `known_provider` tells whether a provider id can be served.
    pub fn from_policy(
        routes: &[DynamicRoute],
        fallbacks: &[Fallback],
        known_provider: impl Fn(&str) -> bool,
    ) -> Result<Self, String> {
        let compiled = sidegate_crds::routes::compile(routes, fallbacks, known_provider)?;
        let mut counters = HashMap::new();
        for (name, graph) in &compiled.routes {
            for (id, node) in &graph.nodes {
                let (budget, key, global, interval, sliding) = match node {
                    Node::Rate {
                        key,
                        global,
                        interval,
                        sliding,
                        ..
                    } => (false, key, global, interval, sliding),
                    Node::Budget {
                        key,
                        global,
                        interval,
                        sliding,
                        ..
                    } => (true, key, global, interval, sliding),
                    _ => continue,
                };
                counters.insert(
                    (name.clone(), id.clone()),
                    Counter {
                        budget,
                        key: key.clone(),
                        shape: Shape {
                            interval: *interval,
                            sliding: *sliding,
                        },
                        global: *global,
                        windows: Arc::default(),
                    },
                );
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Ok(Self {
            compiled,
            counters,
            seed: AtomicU64::new(seed),
            unpriced: Arc::default(),
        })
    }

    /// Takes over the counters of `old` (the config this one replaces) for the rate and budget
    /// nodes still there (same route and node id, same kind, same `key`): a reload — any change
    /// to the gateway, a node's new `limit` included — must not give every route, or every
    /// user, a fresh allowance. A node whose interval or technique changed gets new windows,
    /// counting from zero: the old ones stay with the requests admitted under `old`, whose
    /// charges and give-backs, when they end, go to them ([`Limiter::carried_over`]).
    pub fn keep_counters(&mut self, old: &Routing) {
        for (id, counter) in &mut self.counters {
            if let Some(kept) = old
                .counters
                .get(id)
                .filter(|k| k.budget == counter.budget && k.key == counter.key)
            {
                counter.windows = if kept.shape == counter.shape {
                    kept.windows.clone()
                } else {
                    Arc::new(kept.windows.afresh())
                };
            }
        }
    }

    /// The window of node `id` of route `name` for a request with `metadata`, when it is a
    /// rate or budget node (in `redis` when the node counts there, else on this pod), with the
    /// node's settings in the window's units (billionths of a USD for a budget) and the time
    /// the window was taken at.
    fn node_window(
        &self,
        (name, id): (&str, &str),
        node: &Node,
        metadata: &Map<String, Value>,
        redis: Option<&Redis>,
    ) -> Option<(Window, RateSettings, Instant)> {
        let settings = match *node {
            Node::Rate {
                limit,
                interval,
                sliding,
                global,
                ..
            } => RateSettings {
                limit,
                interval,
                sliding,
                global,
            },
            Node::Budget {
                limit,
                interval,
                sliding,
                global,
                ..
            } => RateSettings {
                limit: usd_units(limit).max(1),
                interval,
                sliding,
                global,
            },
            _ => return None,
        };
        let now = Instant::now();
        let c = self.counters.get(&(name.to_owned(), id.to_owned()))?;
        let value = c.key.as_ref().and_then(|k| metadata.get(k));
        let pod = c.windows.window(value, &settings, now);
        let window = match redis {
            Some((shared, metrics)) if c.global => Window::Redis {
                windows: shared.route_windows(c.budget, name, id, value, settings.interval),
                shared: shared.clone(),
                metrics: metrics.clone(),
                pod,
            },
            _ => Window::Pod(pod),
        };
        Some((window, settings, now))
    }

    /// The `/compat` model strings of the routes and chains: `dynamic/<route>`,
    /// `fallback/<chain>`, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = (self.compiled.routes.keys())
            .map(|n| format!("dynamic/{n}"))
            .chain(self.compiled.chains.keys().map(|n| format!("fallback/{n}")))
            .collect();
        models.sort_unstable();
        models
    }

    /// The walk for a `/compat` model string: `dynamic/<route>`, `fallback/<chain>`, or `None`
    /// for a plain `{provider}/{model}`. `Err` names what does not exist.
    pub fn walk<'a>(&'a self, model: &str) -> Option<Result<Walk<'a>, String>> {
        if let Some(name) = model.strip_prefix("dynamic/") {
            return Some(
                self.compiled
                    .routes
                    .get_key_value(name)
                    .map(|(name, r)| {
                        Walk(Position::Route {
                            name,
                            route: r,
                            at: Some(&r.start),
                            hops: 0,
                            tried: 0,
                            routing: self,
                            charged: Vec::new(),
                            counted: Vec::new(),
                            limited: None,
                            redis: None,
                        })
                    })
                    .ok_or_else(|| format!("no dynamic route named {name:?} (spec.routes)")),
            );
        }
        if let Some(name) = model.strip_prefix("fallback/") {
            return Some(
                self.compiled
                    .chains
                    .get(name)
                    .map(|t| {
                        Walk(Position::Chain {
                            targets: t,
                            next: 0,
                        })
                    })
                    .ok_or_else(|| format!("no fallback chain named {name:?} (spec.fallbacks)")),
            );
        }
        None
    }

    /// A number in `0..n`, for percentage splits (xorshift; fast, not for secrets).
    fn roll(&self, n: u64) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x % n
    }
}

/// Where one request is in a route or chain.
pub struct Walk<'a>(Position<'a>);

enum Position<'a> {
    Route {
        name: &'a String,
        route: &'a Graph,
        at: Option<&'a String>,
        hops: usize,
        tried: usize,
        routing: &'a Routing,
        /// Budget nodes whose `next` branch this request took.
        charged: Vec<BudgetCharge>,
        /// Rate nodes this request passed, which count it when it is sent upstream.
        counted: Vec<Reserved>,
        /// The last rate or budget node over its limit the walk went past, for the error
        /// when that leads it to `end` before any target.
        limited: Option<Limited>,
        /// The gateway's Redis, for the nodes with `scope: global`.
        redis: Option<Redis>,
    },
    Chain {
        targets: &'a [Target],
        next: usize,
    },
}

impl<'a> Walk<'a> {
    /// The walk with the gateway's Redis, where its nodes with `scope: global` count (without
    /// it, they count on this pod).
    pub fn with_redis(mut self, redis: Option<Redis>) -> Self {
        if let Position::Route { redis: r, .. } = &mut self.0 {
            *r = redis;
        }
        self
    }

    /// Every target the walk could reach (a chain's, or a route's model nodes), whatever the
    /// request's metadata.
    pub fn targets(&self) -> Vec<&'a Target> {
        match &self.0 {
            Position::Chain { targets, .. } => targets.iter().collect(),
            Position::Route { route, .. } => route
                .nodes
                .values()
                .filter_map(|n| match n {
                    Node::Model { target, .. } => Some(target),
                    _ => None,
                })
                .collect(),
        }
    }

    /// The next target to try, given the request's metadata; `None` when the walk ends.
    /// `redis_wait` is the request's for the gateway's Redis.
    pub async fn next_target(
        &mut self,
        metadata: &Map<String, Value>,
        redis_wait: &Wait,
    ) -> Option<&'a Target> {
        match &mut self.0 {
            Position::Chain { targets, next } => {
                let t = targets.get(*next)?;
                *next += 1;
                Some(t)
            }
            Position::Route {
                name,
                route,
                at,
                hops,
                tried,
                routing,
                charged,
                counted,
                limited,
                redis,
            } => loop {
                let id = (*at)?;
                *hops += 1;
                if *hops > MAX_HOPS {
                    *at = None;
                    return None;
                }
                let node = route.nodes.get(id)?;
                *at = match node {
                    Node::Start { next } => Some(next),
                    Node::Conditional { cond, then, other } => {
                        Some(if cond.eval(metadata) { then } else { other })
                    }
                    Node::Percentage { branches, total } => {
                        let mut roll = routing.roll(*total);
                        branches
                            .iter()
                            .find(|(w, _)| {
                                if roll < *w {
                                    true
                                } else {
                                    roll -= w;
                                    false
                                }
                            })
                            .map(|(_, next)| next)
                    }
                    Node::Rate {
                        limit,
                        interval,
                        key,
                        next,
                        fallback,
                        ..
                    } => match routing.node_window((name, id), node, metadata, redis.as_ref()) {
                        // Counted as the walk passes (requests waiting on guardrails or the
                        // cache at the same time see it), given back unless sent.
                        Some((window, settings, now)) => {
                            match window.check(&settings, now, redis_wait).await {
                                Ok(held) => {
                                    counted.push(Reserved {
                                        window,
                                        settings,
                                        held,
                                    });
                                    Some(next)
                                }
                                Err(retry_after) => {
                                    *limited = Some(Limited::Rate {
                                        route: (*name).clone(),
                                        node: id.clone(),
                                        limit: *limit,
                                        interval: *interval,
                                        key: key.clone(),
                                        retry_after,
                                    });
                                    Some(fallback)
                                }
                            }
                        }
                        None => Some(next),
                    },
                    Node::Budget {
                        limit,
                        key,
                        next,
                        fallback,
                        ..
                    } => match routing.node_window((name, id), node, metadata, redis.as_ref()) {
                        Some((window, settings, now)) => {
                            match window.room(&settings, now, redis_wait).await {
                                Ok(()) => {
                                    charged.push(BudgetCharge {
                                        window,
                                        settings,
                                        unpriced: routing.unpriced.clone(),
                                    });
                                    Some(next)
                                }
                                Err(retry_after) => {
                                    *limited = Some(Limited::Budget {
                                        route: (*name).clone(),
                                        node: id.clone(),
                                        limit: *limit,
                                        key: key.clone(),
                                        retry_after,
                                    });
                                    Some(fallback)
                                }
                            }
                        }
                        None => Some(next),
                    },
                    Node::Model { target, next } => {
                        *tried += 1;
                        if *tried > MAX_TARGETS {
                            *at = None;
                            return None;
                        }
                        *at = next.as_ref();
                        return Some(target);
                    }
                    Node::End => None,
                };
            },
        }
    }

    /// The budget nodes to charge with this request's cost (those whose `next` it took).
    pub fn take_budget_charges(&mut self) -> Vec<BudgetCharge> {
        match &mut self.0 {
            Position::Route { charged, .. } => std::mem::take(charged),
            Position::Chain { .. } => Vec::new(),
        }
    }

    /// The request goes upstream: the rate nodes it passed keep its count (or count it again,
    /// when it was set aside to wait for an identical request that then failed). One refused
    /// by the gateway, or answered from its cache, is given back when the walk is dropped.
    pub fn sent(&mut self) {
        if let Position::Route { counted, .. } = &mut self.0 {
            for mut kept in counted.drain(..) {
                if matches!(kept.held, Held::GivenBack) {
                    kept.window.add(&kept.settings, 1);
                }
                kept.held = Held::Nothing;
            }
        }
    }

    /// The request waits for an identical request's answer, which will be its own: the rate
    /// nodes it passed give its count back meanwhile, as for a cache hit.
    pub fn set_aside(&mut self) {
        if let Position::Route { counted, .. } = &mut self.0 {
            counted.iter_mut().for_each(Reserved::give_back);
        }
    }

    /// Why a walk that ended before any target did: the rate or budget node over its limit
    /// that sent it to `end` (429, as the gateway's own limits answer); `None` otherwise.
    pub fn limit_error(&self) -> Option<GatewayError> {
        let Position::Route {
            limited: Some(l),
            tried: 0,
            ..
        } = &self.0
        else {
            return None;
        };
        Some(match l {
            Limited::Rate {
                route,
                node,
                limit,
                interval,
                key,
                retry_after,
            } => GatewayError::RouteLimited {
                what: format!(
                    "rate limit exceeded: route {route:?} node {node:?} allows {} per {}{}",
                    counted(*limit, "request"),
                    interval_text(*interval),
                    per_value(key)
                ),
                spend: false,
                retry_after: *retry_after,
            },
            Limited::Budget {
                route,
                node,
                limit,
                key,
                retry_after,
            } => GatewayError::RouteLimited {
                what: format!(
                    "spend limit exceeded: route {route:?} node {node:?} spent its {limit} USD{}",
                    per_value(key)
                ),
                spend: true,
                retry_after: *retry_after,
            },
        })
    }
}

/// A request a rate node counted as a walk passed it, until the request is sent.
#[derive(Debug)]
struct Reserved {
    window: Window,
    settings: RateSettings,
    held: Held,
}

impl Reserved {
    /// Gives the count back, if it still holds it.
    fn give_back(&mut self) {
        if let held @ (Held::Pod(_) | Held::Redis(..)) = self.held {
            self.held = Held::GivenBack;
            self.window.release(&self.settings, held);
        }
    }
}

impl Drop for Reserved {
    /// Not sent (refused, a cache hit, the client gone): the node's count is given back.
    fn drop(&mut self) {
        self.give_back();
    }
}

/// A rate or budget node over its limit that a walk went past.
#[derive(Debug, Clone)]
enum Limited {
    Rate {
        route: String,
        node: String,
        limit: u64,
        interval: Duration,
        key: Option<String>,
        retry_after: Duration,
    },
    Budget {
        route: String,
        node: String,
        limit: f64,
        key: Option<String>,
        retry_after: Duration,
    },
}

/// How a limit error names a node's key (never the request's value of it).
fn per_value(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(" for each value of metadata.{k}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidegate_crds::policy::{ModelTarget, RouteNode, RouteNodeType, WeightedBranch};

    /// The walk's next target (the pod's counters answer at once).
    fn next<'a>(walk: &mut Walk<'a>, m: &Map<String, Value>) -> Option<&'a Target> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(walk.next_target(m, &Wait::default()))
    }

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn node(id: &str, kind: RouteNodeType) -> RouteNode {
        RouteNode::new(id, kind)
    }

    fn model(id: &str, provider: &str, m: &str, next: Option<&str>) -> RouteNode {
        RouteNode {
            provider: Some(provider.into()),
            model: Some(m.into()),
            next: next.map(Into::into),
            ..node(id, RouteNodeType::Model)
        }
    }

    fn routing(nodes: Vec<RouteNode>) -> Result<Routing, String> {
        Routing::from_policy(
            &[DynamicRoute {
                name: "r".into(),
                nodes,
            }],
            &[],
            |p| p != "nope",
        )
    }

    /// The targets a request's walk goes through, each sent upstream (and counted).
    fn targets(r: &Routing, m: &Map<String, Value>) -> Vec<String> {
        let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
        std::iter::from_fn(|| {
            let t = next(&mut walk, m);
            walk.sent();
            t
        })
        .map(|t| format!("{}/{}", t.provider, t.model))
        .collect()
    }

    #[test]
    fn a_field_its_node_does_not_read_is_refused_by_name() {
        let start = RouteNode {
            next: Some("m".into()),
            ..node("s", RouteNodeType::Start)
        };
        // A Cloudflare model element's `fallback` output, ported as it is.
        let Err(err) = routing(vec![
            start.clone(),
            RouteNode {
                fallback: Some("backup".into()),
                ..model("m", "openai", "gpt-4o", Some("e"))
            },
            model("backup", "anthropic", "claude-sonnet-4-5", Some("e")),
            node("e", RouteNodeType::End),
        ]) else {
            panic!("refused");
        };
        assert!(
            err.contains("spec.routes[0].nodes[1].fallback is not a field of a model node")
                && err.contains("goes on to its next node"),
            "{err}"
        );
        let Err(err) = routing(vec![
            start,
            model("m", "openai", "gpt-4o", Some("e")),
            RouteNode {
                limit: Some("3".into()),
                ..node("e", RouteNodeType::End)
            },
        ]) else {
            panic!("refused");
        };
        assert_eq!(
            err,
            "spec.routes[0].nodes[2].limit is not a field of an end node"
        );
    }

    #[test]
    fn conditions_pick_branches_and_models_fall_back_along_next() {
        let r = routing(vec![
            RouteNode {
                next: Some("plan".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                condition: Some(r#"metadata.plan == "paid" && metadata.tier >= 2"#.into()),
                then_: Some("big".into()),
                else_: Some("small".into()),
                ..node("plan", RouteNodeType::Conditional)
            },
            model("big", "openai", "gpt-4o", Some("backup")),
            model("backup", "anthropic", "claude-sonnet-4-5", Some("e")),
            model("small", "openai", "gpt-4o-mini", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        assert_eq!(
            targets(&r, &meta(serde_json::json!({"plan": "paid", "tier": 3}))),
            ["openai/gpt-4o", "anthropic/claude-sonnet-4-5"]
        );
        assert_eq!(
            targets(&r, &meta(serde_json::json!({"plan": "paid", "tier": 1}))),
            ["openai/gpt-4o-mini"]
        );
        assert_eq!(targets(&r, &Map::new()), ["openai/gpt-4o-mini"]);
        // Every model the route could reach, whatever the metadata.
        let walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
        let mut all: Vec<String> = walk
            .targets()
            .iter()
            .map(|t| format!("{}/{}", t.provider, t.model))
            .collect();
        all.sort();
        assert_eq!(
            all,
            [
                "anthropic/claude-sonnet-4-5",
                "openai/gpt-4o",
                "openai/gpt-4o-mini"
            ]
        );
    }

    #[test]
    fn percentage_splits_by_weight_and_rate_nodes_overflow_to_their_fallback() {
        let r = routing(vec![
            RouteNode {
                next: Some("split".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                branches: vec![
                    WeightedBranch {
                        weight: 3,
                        next: "a".into(),
                    },
                    WeightedBranch {
                        weight: 1,
                        next: "b".into(),
                    },
                ],
                ..node("split", RouteNodeType::Percentage)
            },
            model("a", "openai", "a", Some("e")),
            model("b", "openai", "b", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        let picks: Vec<String> = (0..4000).flat_map(|_| targets(&r, &Map::new())).collect();
        let a = picks.iter().filter(|p| *p == "openai/a").count();
        assert!((2700..=3300).contains(&a), "{a} of 4000 to the 75% branch");

        let r = routing(vec![
            RouteNode {
                next: Some("cap".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                limit: Some("2".into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(3600)),
                next: Some("main".into()),
                fallback: Some("overflow".into()),
                ..node("cap", RouteNodeType::Rate)
            },
            model("main", "openai", "main", Some("e")),
            model("overflow", "openai", "cheap", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        let got: Vec<String> = (0..3).flat_map(|_| targets(&r, &Map::new())).collect();
        assert_eq!(got, ["openai/main", "openai/main", "openai/cheap"]);
        // A walk whose request was not sent upstream (refused, a cache hit) is not counted.
        let r = capped_at_one();
        for _ in 0..2 {
            let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
            assert!(next(&mut walk, &Map::new()).is_some());
        }
        // One let past and still waiting (for the cache, for its checks) holds its slot: the
        // requests that come meanwhile take the fallback (`end` here); dropped unsent, it gives
        // the slot back.
        let mut waiting = r.walk("dynamic/r").expect("dynamic").expect("exists");
        assert_eq!(
            next(&mut waiting, &Map::new()).map(|t| t.model.as_str()),
            Some("main")
        );
        assert!(targets(&r, &Map::new()).is_empty());
        drop(waiting);
        assert_eq!(targets(&r, &Map::new()), ["openai/main"]);
        // One waiting for an identical request's answer gives its slot back meanwhile; sent
        // after all (that request failed), it is counted again.
        let r = capped_at_one();
        let mut follower = r.walk("dynamic/r").expect("dynamic").expect("exists");
        assert!(next(&mut follower, &Map::new()).is_some());
        follower.set_aside();
        assert_eq!(targets(&r, &Map::new()), ["openai/main"]);
        follower.sent();
        drop(follower);
        let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
        // Over the limit, leading to `end` before any target: the node's 429.
        assert!(
            next(&mut walk, &Map::new()).is_none(),
            "two counted, over the one"
        );
        let e = walk.limit_error().expect("limited");
        assert_eq!((e.status().as_u16(), e.code()), (429, 2003), "{e}");
    }

    /// A route whose rate node allows one request per hour, then leads to `end`.
    fn capped_at_one() -> Routing {
        routing(vec![
            RouteNode {
                next: Some("cap".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                limit: Some("1".into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(3600)),
                next: Some("main".into()),
                fallback: Some("e".into()),
                ..node("cap", RouteNodeType::Rate)
            },
            model("main", "openai", "main", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid")
    }

    #[test]
    fn a_reload_keeps_the_counts_of_the_nodes_still_there() {
        let capped_per = |limit: &str, id: &str, secs: u64| {
            routing(vec![
                RouteNode {
                    next: Some(id.into()),
                    ..node("s", RouteNodeType::Start)
                },
                RouteNode {
                    limit: Some(limit.into()),
                    interval: Some(sidegate_crds::units::Duration::from_secs(secs)),
                    next: Some("main".into()),
                    fallback: Some("overflow".into()),
                    ..node(id, RouteNodeType::Rate)
                },
                model("main", "openai", "main", Some("e")),
                model("overflow", "openai", "cheap", Some("e")),
                node("e", RouteNodeType::End),
            ])
            .expect("valid")
        };
        let capped = |limit: &str, id: &str| capped_per(limit, id, 3600);
        let old = capped("2", "cap");
        assert_eq!(targets(&old, &Map::new()), ["openai/main"]);
        assert_eq!(targets(&old, &Map::new()), ["openai/main"]);
        // The same node after a reload: its window is spent.
        let mut new = capped("2", "cap");
        new.keep_counters(&old);
        assert_eq!(targets(&new, &Map::new()), ["openai/cheap"]);
        // A node of another id starts afresh.
        let mut other = capped("2", "cap2");
        other.keep_counters(&old);
        assert_eq!(targets(&other, &Map::new()), ["openai/main"]);
        // A new interval: new windows, counting from zero; the old config's (still held by the
        // requests admitted under it) are left as they are.
        let mut longer = capped_per("2", "cap", 7200);
        longer.keep_counters(&new);
        assert_eq!(targets(&longer, &Map::new()), ["openai/main"]);
        assert_eq!(targets(&new, &Map::new()), ["openai/cheap"]);
        assert_eq!(targets(&longer, &Map::new()), ["openai/main"]);
        assert_eq!(targets(&longer, &Map::new()), ["openai/cheap"]);
        // And a reload that keeps that interval keeps them.
        let mut again = capped_per("3", "cap", 7200);
        again.keep_counters(&longer);
        assert_eq!(targets(&again, &Map::new()), ["openai/main"]);
        assert_eq!(targets(&again, &Map::new()), ["openai/cheap"]);
    }

    /// A route whose `kind` node (`limit`, per hour, `key`) leads to `main`, over it to
    /// `overflow`.
    fn keyed(kind: RouteNodeType, limit: &str, key: Option<&str>) -> Routing {
        routing(vec![
            RouteNode {
                next: Some("cap".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                limit: Some(limit.into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(3600)),
                key: key.map(Into::into),
                next: Some("main".into()),
                fallback: Some("overflow".into()),
                ..node("cap", kind)
            },
            model("main", "openai", "main", Some("e")),
            model("overflow", "openai", "cheap", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid")
    }

    #[test]
    fn a_keyed_rate_node_counts_each_metadata_value_in_its_own_window() {
        let r = keyed(RouteNodeType::Rate, "1", Some("metadata.user"));
        let user = |u: &str| meta(serde_json::json!({"user": u, "plan": "free"}));
        assert_eq!(targets(&r, &user("alice")), ["openai/main"]);
        assert_eq!(targets(&r, &user("bob")), ["openai/main"]);
        assert_eq!(targets(&r, &user("alice")), ["openai/cheap"]);
        assert_eq!(targets(&r, &user("bob")), ["openai/cheap"]);
        // Requests without the field share one window of their own.
        let anonymous = meta(serde_json::json!({"plan": "free"}));
        assert_eq!(targets(&r, &anonymous), ["openai/main"]);
        assert_eq!(targets(&r, &Map::new()), ["openai/cheap"]);
        assert_eq!(targets(&r, &user("carol")), ["openai/main"]);
        // Over the limit, leading to `end`: the 429 says the limit is per value.
        let r = routing(vec![
            RouteNode {
                next: Some("cap".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                limit: Some("1".into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(3600)),
                key: Some("metadata.user".into()),
                next: Some("main".into()),
                fallback: Some("e".into()),
                ..node("cap", RouteNodeType::Rate)
            },
            model("main", "openai", "main", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        assert_eq!(targets(&r, &user("alice")), ["openai/main"]);
        let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
        assert!(next(&mut walk, &user("alice")).is_none());
        let e = walk.limit_error().expect("limited").to_string();
        assert!(e.contains("for each value of metadata.user"), "{e}");
        assert!(!e.contains("alice"), "{e}");
    }

    #[test]
    fn a_keyed_budget_node_charges_each_metadata_value_apart() {
        let r = keyed(RouteNodeType::Budget, "0.50", Some("metadata.team"));
        let team = |t: &str| meta(serde_json::json!({"team": t}));
        let mut served = Vec::new();
        for t in ["red", "red", "blue", "red", "blue"] {
            let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
            let target = next(&mut walk, &team(t)).expect("a target");
            served.push(format!("{t}:{}", target.model));
            for b in walk.take_budget_charges() {
                b.charge(0.30);
            }
        }
        assert_eq!(
            served,
            [
                "red:main",
                "red:main",
                "blue:main",
                "red:cheap",
                "blue:main"
            ]
        );
    }

    #[test]
    fn a_reload_keeps_per_value_counts_when_the_limit_changes_not_when_the_key_does() {
        let user = |u: &str| meta(serde_json::json!({"user": u}));
        let old = keyed(RouteNodeType::Rate, "1", Some("metadata.user"));
        assert_eq!(targets(&old, &user("alice")), ["openai/main"]);
        // Raised to 2: alice has one more, bob his two.
        let mut raised = keyed(RouteNodeType::Rate, "2", Some("metadata.user"));
        raised.keep_counters(&old);
        assert_eq!(targets(&raised, &user("alice")), ["openai/main"]);
        assert_eq!(targets(&raised, &user("alice")), ["openai/cheap"]);
        assert_eq!(targets(&raised, &user("bob")), ["openai/main"]);
        // Counting by another field is another set of windows.
        let mut by_team = keyed(RouteNodeType::Rate, "2", Some("metadata.team"));
        by_team.keep_counters(&raised);
        assert_eq!(targets(&by_team, &user("alice")), ["openai/main"]);
        // A budget node of the same id does not take over a rate node's counts.
        let mut budget = keyed(RouteNodeType::Budget, "2", Some("metadata.user"));
        budget.keep_counters(&raised);
        assert_eq!(
            budget.counters[&("r".to_owned(), "cap".to_owned())]
                .windows
                .values(),
            0
        );
    }

    #[test]
    fn budget_nodes_take_their_fallback_once_the_requests_through_them_spent_the_limit() {
        let r = routing(vec![
            RouteNode {
                next: Some("cap".into()),
                ..node("s", RouteNodeType::Start)
            },
            RouteNode {
                limit: Some("0.50".into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(3600)),
                next: Some("main".into()),
                fallback: Some("overflow".into()),
                ..node("cap", RouteNodeType::Budget)
            },
            model("main", "openai", "main", Some("e")),
            model("overflow", "openai", "cheap", Some("e")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        let mut served = Vec::new();
        for cost in [0.30, 0.30, 0.30] {
            let mut walk = r.walk("dynamic/r").expect("dynamic").expect("exists");
            let t = next(&mut walk, &Map::new()).expect("a target");
            served.push(t.model.clone());
            for w in walk.take_budget_charges() {
                w.charge(cost);
            }
        }
        // 0.30, then 0.60 >= 0.50: the third request overflows (and is not charged here).
        assert_eq!(served, ["main", "main", "cheap"]);
        // A new window starts empty.
        let cap = &r.compiled.routes["r"].nodes["cap"];
        let Some((Window::Pod(w), s, now)) = r.node_window(("r", "cap"), cap, &Map::new(), None)
        else {
            panic!("a budget node counting on this pod");
        };
        assert_eq!(s.limit, usd_units(0.50));
        assert_eq!(s.interval, Duration::from_secs(3600));
        assert!(w.room(&s, now).is_err());
        assert_eq!(w.room(&s, now + Duration::from_secs(3600)), Ok(()));
    }

    #[test]
    fn bad_routes_are_refused_naming_the_node() {
        let start = RouteNode {
            next: Some("m".into()),
            ..node("s", RouteNodeType::Start)
        };
        let end = node("e", RouteNodeType::End);
        let refused = |nodes: Vec<RouteNode>| routing(nodes).expect_err("refused");
        let err = refused(vec![
            start.clone(),
            model("m", "nope", "x", Some("e")),
            end.clone(),
        ]);
        assert!(err.contains("spec.routes[0].nodes[1].provider"), "{err}");
        let err = refused(vec![
            start.clone(),
            model("m", "openai", "x", Some("gone")),
            end.clone(),
        ]);
        assert!(err.contains("\"gone\""), "{err}");
        let err = refused(vec![
            start.clone(),
            RouteNode {
                limit: Some("ten".into()),
                interval: Some(sidegate_crds::units::Duration::from_secs(60)),
                next: Some("e".into()),
                fallback: Some("e".into()),
                ..node("m", RouteNodeType::Budget)
            },
            end.clone(),
        ]);
        assert!(
            err.contains("nodes[1].limit") && err.contains("USD"),
            "{err}"
        );
        for retries in [5, 6, 50] {
            let err = refused(vec![
                start.clone(),
                RouteNode {
                    retries: Some(retries),
                    ..model("m", "openai", "x", Some("e"))
                },
                end.clone(),
            ]);
            assert!(
                err.contains("nodes[1].retries must be 0 to 4 retries"),
                "{err}"
            );
        }
        let err = refused(vec![model("m", "openai", "x", Some("e")), end.clone()]);
        assert!(err.contains("no start node"), "{err}");
        let bad_cond = RouteNode {
            condition: Some("plan == 'paid'".into()),
            then_: Some("m".into()),
            else_: Some("m".into()),
            ..node("c", RouteNodeType::Conditional)
        };
        let err = refused(vec![
            start.clone(),
            bad_cond,
            model("m", "openai", "x", Some("e")),
            end.clone(),
        ]);
        assert!(
            err.contains("nodes[1].condition") && err.contains("metadata.<key>"),
            "{err}"
        );
        let err = refused(vec![start.clone(), model("m", "openai", "x", None), end]);
        assert!(err.contains("nodes[1].next is required"), "{err}");
        let err = refused(vec![start, model("m", "openai", "x", Some("m"))]);
        assert!(err.contains("no end node"), "{err}");
    }

    #[test]
    fn loops_end_after_a_bounded_number_of_hops() {
        let r = routing(vec![
            RouteNode {
                next: Some("m".into()),
                ..node("s", RouteNodeType::Start)
            },
            model("m", "openai", "x", Some("m")),
            node("e", RouteNodeType::End),
        ])
        .expect("valid");
        assert_eq!(targets(&r, &Map::new()).len(), MAX_TARGETS);
    }

    #[test]
    fn chains_are_their_targets_in_order() {
        let r = Routing::from_policy(
            &[],
            &[Fallback {
                name: "f".into(),
                targets: vec![
                    ModelTarget {
                        provider: "openai".into(),
                        model: "a".into(),
                    },
                    ModelTarget {
                        provider: "anthropic".into(),
                        model: "b".into(),
                    },
                ],
            }],
            |_| true,
        )
        .expect("valid");
        let mut w = r.walk("fallback/f").expect("chain").expect("exists");
        assert_eq!(w.targets().len(), 2);
        let m = Map::new();
        assert_eq!(next(&mut w, &m).map(|t| t.model.as_str()), Some("a"));
        assert_eq!(next(&mut w, &m).map(|t| t.model.as_str()), Some("b"));
        assert_eq!(next(&mut w, &m), None);
        assert!(r.walk("fallback/none").expect("chain").is_err());
        assert!(r.walk("openai/gpt-4o").is_none());
    }
}
