//! The compile step: turns a validated [`Config`] (plain data) into the
//! [`Snapshot`] the workers serve from, one immutable generation of
//! everything the request path reads: per listener its compiled routes
//! (matcher, allow list, metric series), on `tcp` and capture listeners
//! its TCP routes (with their L4 series) and the passthrough route, TLS
//! material and counters; per cluster its resolved endpoints, TLS
//! material and live state.
//!
//! [`compile`] does the blocking work (name resolution, certificate and
//! discovery files): callers run it on a plain thread or `spawn_blocking`,
//! never on an async runtime's own threads. A cluster whose
//! [`ClusterConfig`] equals the previous generation's keeps its live state
//! (discovered endpoints, health, ejections, counters, running tasks).
//! Problems found here are config problems with the file position the
//! config kept for them.
//!
//! Compiling registers no metric series: a compiled config may still be
//! rejected (a taken port, a filter that fails to load), and a series once
//! registered is never removed. [`Snapshot::new`] attaches them, once the
//! reload is accepted.
//!
//! Built on the control thread, published with `arc-swap`, loaded once per
//! request.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::FailMode;
use crate::config::{
    ClusterConfig, Config, ConfigError, Discovery, Endpoint, ListenerConfig, Problem,
};
use crate::filter::{FailPolicy, FilterSet, FilterSpec};
use crate::route::{self, Route, RouteTable, TcpMatch, TcpRoute, PASSTHROUGH, PASSTHROUGH_NAME};
use crate::telemetry::{ListenerStats, Metrics, RequestStats, TcpStats};
use crate::tls::{ClientTls, ServerTls};
use crate::upstream::{discovery, Cluster, ClusterState, RetryBudget};

/// The current generation, published with `arc-swap`: the control thread
/// stores, everyone else loads (once per request on the workers).
pub type Snapshots = ArcSwap<Snapshot>;

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    /// Config order; found by name (see [`Snapshot::listener`]).
    pub listeners: Vec<ListenerSnapshot>,
    /// Indexed by cluster id (config order).
    pub clusters: Vec<Cluster>,
    /// The loaded filters every pipeline of this generation uses.
    pub filters: Arc<FilterSet>,
    cluster_ids: HashMap<Arc<str>, usize>,
}

/// One listener of a generation: its settings, compiled routes (each with
/// its allow list and metric series), TLS material and counters. Reads as
/// its [`ListenerConfig`] for the settings it does not compile.
#[derive(Debug)]
pub struct ListenerSnapshot {
    pub config: ListenerConfig,
    pub routes: RouteTable,
    /// TLS termination. Holds the current certificates, which its file
    /// watcher swaps in place.
    pub tls: Option<Arc<ServerTls>>,
    pub stats: ListenerStats,
    /// Requests that matched no route.
    pub unrouted: RequestStats,
    /// A capture listener's route for the requests no route claims: to
    /// their original destination (route "passthrough", series with route
    /// "" and cluster "passthrough"). `None` on other listeners.
    pub passthrough: Option<Route>,
    /// The TCP routes of a `tcp` or capture listener, in config order,
    /// each with its match and L4 series; empty on other listeners.
    pub tcp_routes: Vec<TcpRoute>,
    /// The L4 series of a captured connection no TCP route claims (sent
    /// to its original destination).
    pub tcp_passthrough: Option<TcpStats>,
    /// Open connections across all workers, for `max_connections`; carried
    /// over to the next generation of a listener of the same name.
    pub open_connections: Arc<AtomicUsize>,
    /// The filter chain of each route and of the unrouted requests.
    pub chains: Chains,
}

impl Deref for ListenerSnapshot {
    type Target = ListenerConfig;

    fn deref(&self) -> &ListenerConfig {
        &self.config
    }
}

/// A config compiled, waiting for its filters (and its metric series) to
/// make a [`Snapshot`].
#[derive(Debug)]
pub struct Compiled {
    pub config: Arc<Config>,
    pub listeners: Vec<CompiledListener>,
    pub clusters: Vec<Cluster>,
}

/// A listener compiled, without its metric series yet (its routes' `stats`
/// are empty until [`Snapshot::new`]).
#[derive(Debug)]
pub struct CompiledListener {
    pub config: ListenerConfig,
    pub routes: Vec<Route>,
    /// A `tcp` or capture listener's TCP routes with their matches.
    pub tcp_routes: Vec<(Route, TcpMatch)>,
    /// A capture listener's route to the original destination.
    pub passthrough: Option<Route>,
    pub tls: Option<Arc<ServerTls>>,
    pub open_connections: Arc<AtomicUsize>,
}

impl Deref for CompiledListener {
    type Target = ListenerConfig;

    fn deref(&self) -> &ListenerConfig {
        &self.config
    }
}

/// Compiles `config` against the generation before it (blocking: resolves
/// names, reads certificate and discovery files). Every problem found is
/// reported, each with its position in the file.
pub fn compile(config: Arc<Config>, previous: Option<&Snapshot>) -> Result<Compiled, ConfigError> {
    let mut problems = Vec::new();
    let clusters: Vec<Cluster> = config
        .clusters
        .iter()
        .filter_map(|c| cluster(c, previous, &mut problems))
        .collect();
    let listeners: Vec<CompiledListener> = config
        .listeners
        .iter()
        .filter_map(|l| listener(l, previous, &mut problems))
        .collect();
    if !problems.is_empty() {
        return Err(config.error(problems));
    }
    Ok(Compiled {
        config,
        listeners,
        clusters,
    })
}

fn cluster(
    c: &ClusterConfig,
    previous: Option<&Snapshot>,
    problems: &mut Vec<Problem>,
) -> Option<Cluster> {
    let before = problems.len();
    let mut endpoints = Vec::with_capacity(c.endpoints.len());
    for ep in &c.endpoints {
        match resolve(&ep.addr) {
            Ok(addr) => endpoints.push(Endpoint {
                addr,
                weight: ep.weight,
            }),
            Err(e) => problems.push(c.sites.endpoints.problem(format!(
                "cluster \"{}\": endpoint \"{}\": {e}",
                c.name, ep.addr
            ))),
        }
    }
    if let Discovery::File(path) = &c.settings.discovery {
        match discovery::read_endpoints_file(path) {
            Ok(list) => endpoints = list,
            Err(e) => problems.push(
                c.sites
                    .discovery
                    .problem(format!("cluster \"{}\": discovery: {e}", c.name)),
            ),
        }
    }
    // An unchanged cluster keeps its endpoints, health, ejections and TLS
    // material: that TLS's watcher already follows its files, and a new
    // one per reload would start another watcher.
    let kept = previous.and_then(|p| p.clusters.iter().find(|prev| prev.config == *c));
    let tls = match (&c.tls, kept) {
        (Some(_), Some(prev)) if prev.tls.is_some() => prev.tls.clone(),
        (Some(settings), _) => match ClientTls::load(settings.clone()) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                problems.push(
                    c.sites
                        .tls
                        .problem(format!("cluster \"{}\": tls: {e}", c.name)),
                );
                None
            }
        },
        (None, _) => None,
    };
    if problems.len() > before {
        return None;
    }
    let state = kept.map(|prev| prev.state.clone()).unwrap_or_else(|| {
        Arc::new(ClusterState::new(
            c.name.clone(),
            c.settings.clone(),
            &endpoints,
            c.retry_budget.as_ref().map(RetryBudget::new),
        ))
    });
    Some(Cluster {
        config: c.clone(),
        endpoints,
        tls,
        state,
    })
}

fn listener(
    l: &ListenerConfig,
    previous: Option<&Snapshot>,
    problems: &mut Vec<Problem>,
) -> Option<CompiledListener> {
    let before = previous.and_then(|p| p.listener(&l.name));
    let tls = match (&l.tls, before) {
        // Same TLS settings: the loaded material and its file watcher
        // carry over (the watcher already follows the files).
        (Some(settings), Some(prev)) if prev.config.tls.as_ref() == Some(settings) => {
            prev.tls.clone()
        }
        (Some(settings), _) => match ServerTls::load(settings.clone()) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                problems.push(
                    l.tls_site
                        .problem(format!("listener \"{}\": tls: {e}", l.name)),
                );
                return None;
            }
        },
        (None, _) => None,
    };
    let mut routes = Vec::with_capacity(l.routes.len());
    for r in &l.routes {
        if let Some(route) = compile_route(l, r, problems) {
            routes.push(route);
        }
    }
    // A `tcp` or capture listener's TCP routes; their series come with
    // the snapshot (see `series`).
    let mut tcp_routes = Vec::new();
    if l.l4.below_http() {
        let table = l.l4.routes(&l.routes);
        for (r, matcher) in table.iter().zip(&l.l4.matches) {
            if let Some(route) = compile_route(l, r, problems) {
                tcp_routes.push((route, matcher.clone()));
            }
        }
    }
    let passthrough =
        l.l4.capture
            .and_then(|_| compile_route(l, &crate::config::l4::passthrough_route(), problems));
    // Connections opened under the previous generation still count.
    let open_connections = before.map_or_else(Arc::default, |p| p.open_connections.clone());
    Some(CompiledListener {
        config: l.clone(),
        routes,
        tls,
        tcp_routes,
        passthrough,
        open_connections,
    })
}

fn compile_route(
    l: &ListenerConfig,
    r: &route::RouteConfig,
    problems: &mut Vec<Problem>,
) -> Option<Route> {
    match route::compile(r, Vec::new()) {
        Ok(route) => Some(route),
        Err(e) => {
            problems.push(
                r.site
                    .problem(format!("listener \"{}\", route {}: {e}", l.name, r.name)),
            );
            None
        }
    }
}

/// A cluster id's name for metric labels (the built-in passthrough too).
fn cluster_name(config: &Config, id: usize) -> &str {
    if id == PASSTHROUGH {
        return PASSTHROUGH_NAME;
    }
    config.clusters.get(id).map_or("", |c| &*c.name)
}

fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    if !address.contains(':') {
        return Err("expected host:port".into());
    }
    address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".into())
}

impl Snapshot {
    /// Generation `generation` from a compiled config and its filters, with
    /// the metric series of its listeners and routes (registered here, once
    /// nothing can reject the generation any more: a series is never
    /// removed). Fails only when a route's per-route filter config is not
    /// among the configs its filter was loaded with (a bug, but one that
    /// would otherwise run the route on another config): checked before any
    /// series is registered.
    pub fn new(
        generation: u64,
        compiled: Compiled,
        filters: Arc<FilterSet>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let config = &compiled.config;
        // The configs the loaded filters' root contexts run on, numbered as
        // their instances number them (`filter_specs` made them: a
        // `NAME.toml` beside included).
        let variants: chains::ConfigVariants = filters
            .plugins
            .iter()
            .map(|p| {
                let v = chains::Variants {
                    own: p.spec.config.clone(),
                    routes: p.spec.route_configs.clone(),
                };
                (Arc::from(p.spec.name.as_str()), v)
            })
            .collect();
        let chains = compiled
            .listeners
            .iter()
            .map(|l| chains::chains(&l.config, &variants))
            .collect::<Result<Vec<_>, String>>()?;
        let listeners = compiled
            .listeners
            .into_iter()
            .zip(chains)
            .map(|(l, chains)| series(config, chains, l, metrics))
            .collect();
        let cluster_ids = compiled
            .config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Ok(Self {
            generation,
            config: compiled.config,
            listeners,
            clusters: compiled.clusters,
            filters,
            cluster_ids,
        })
    }

    /// The listener named `name` in this generation. Listeners are found by
    /// name, not by position, because a reload may add or remove others
    /// around a listener that keeps serving (a handful of short names: a
    /// scan costs less than hashing).
    pub fn listener(&self, name: &str) -> Option<&ListenerSnapshot> {
        self.listeners.iter().find(|l| *l.name == *name)
    }

    pub fn cluster_id(&self, name: &str) -> Option<usize> {
        self.cluster_ids.get(name).copied()
    }

    /// Starts the certificate watchers and publishes the expiry gauges of
    /// every TLS listener and cluster; cheap and idempotent (each starts
    /// once).
    pub fn start_tls(&self, metrics: &Metrics) {
        for tls in self.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            tls.start(metrics);
        }
        for tls in self.clusters.iter().filter_map(|c| c.tls.as_ref()) {
            tls.start(metrics);
        }
    }
}

/// A compiled listener with its series: the listener's, the unrouted
/// requests', and each route's per cluster it may pick.
fn series(
    config: &Config,
    chains: Chains,
    l: CompiledListener,
    metrics: &Arc<Metrics>,
) -> ListenerSnapshot {
    let name = &l.config.name;
    let filtered = !chains.listener.is_empty() || chains.routes.iter().any(|c| !c.is_empty());
    let mut routes = l.routes;
    for r in &mut routes {
        // With filters, any cluster may be picked (wasp.cluster).
        let clusters = if !filtered {
            r.clusters()
        } else {
            (0..config.clusters.len()).collect()
        };
        r.stats = clusters
            .into_iter()
            .map(|c| {
                (
                    c,
                    metrics.request_stats(name, &r.name, cluster_name(config, c)),
                )
            })
            .collect();
    }
    let tcp_routes = l
        .tcp_routes
        .into_iter()
        .map(|(route, matcher)| {
            let stats = route
                .clusters()
                .into_iter()
                .map(|c| {
                    (
                        c,
                        metrics.tcp_stats(name, &route.name, cluster_name(config, c)),
                    )
                })
                .collect();
            TcpRoute {
                route,
                matcher,
                stats,
            }
        })
        .collect();
    let passthrough = l.passthrough.map(|mut route| {
        route.stats = vec![(
            PASSTHROUGH,
            metrics.request_stats(name, "", PASSTHROUGH_NAME),
        )];
        route
    });
    let tcp_passthrough = l
        .config
        .l4
        .below_http()
        .then(|| metrics.tcp_stats(name, "", PASSTHROUGH_NAME));
    ListenerSnapshot {
        stats: metrics.listener_stats(name),
        unrouted: metrics.request_stats(name, "", ""),
        routes: RouteTable::new(routes),
        passthrough,
        tcp_routes,
        tcp_passthrough,
        tls: l.tls,
        open_connections: l.open_connections,
        config: l.config,
        chains,
    }
}

/// The engine's view of every `[filters.NAME]` section. A `NAME.toml` in
/// the filters directory, when present, replaces the section's `config`, so
/// a filter's settings can ship (and hot-reload) beside its module.
pub fn filter_specs(config: &Config) -> anyhow::Result<Vec<FilterSpec>> {
    let mut specs = Vec::with_capacity(config.file.filters.len());
    for (name, decl) in &config.file.filters {
        let mut spec = FilterSpec::new(name.clone(), config.filters_dir.join(&decl.module));
        let beside = config.filters_dir.join(format!("{name}.toml"));
        spec.config = match std::fs::read_to_string(&beside) {
            Ok(text) => {
                let table: toml::Table = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("filter \"{name}\": {}: {e}", beside.display()))?;
                config_bytes(Some(&toml::Value::Table(table)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                config_bytes(decl.config.as_ref())
            }
            Err(e) => anyhow::bail!("filter \"{name}\": cannot read {}: {e}", beside.display()),
        };
        spec.vm_config = config_bytes(decl.vm_config.as_ref());
        spec.fail = match decl.fail {
            FailMode::Open => FailPolicy::Open,
            FailMode::Closed => FailPolicy::Closed,
        };
        spec.cpu_limit = decl.limits.cpu.0;
        spec.memory_limit = decl.limits.memory.0;
        spec.instances = decl.limits.instances;
        spec.tick_min = decl.limits.tick_min.0;
        spec.root_cpu = decl.limits.root_cpu.0;
        spec.max_body_bytes = config
            .listeners
            .iter()
            .map(|l| l.limits.max_body_bytes)
            .max()
            .unwrap_or(FilterSpec::DEFAULT_MAX_BODY_BYTES);
        spec.host_limits = decl.limits.host_limits();
        specs.push(spec);
    }
    // Only now are the filters' own configs known (a `NAME.toml` beside
    // replaces the section's): a per-route config equal to one is no
    // extra root context.
    let own: chains::OwnConfigs = specs
        .iter()
        .map(|s| (Arc::from(s.name.as_str()), s.config.clone()))
        .collect();
    let mut route_configs = chains::route_configs(config, &own);
    for spec in &mut specs {
        spec.route_configs = route_configs.remove(spec.name.as_str()).unwrap_or_default();
        // The file's check counts against the section's config; a
        // `NAME.toml` beside can make one more override distinct.
        if spec.route_configs.len() > crate::config::route::MAX_ROUTE_CONFIGS {
            anyhow::bail!(
                "filter \"{}\": more than {} distinct per-route configs (each is one more root context in every instance of it)",
                spec.name,
                crate::config::route::MAX_ROUTE_CONFIGS
            );
        }
    }
    Ok(specs)
}

/// A TOML table reaches the guest as JSON; a string as its raw bytes.
fn config_bytes(value: Option<&toml::Value>) -> bytes::Bytes {
    match value {
        None => bytes::Bytes::new(),
        Some(toml::Value::String(s)) => bytes::Bytes::from(s.clone()),
        Some(v) => serde_json::to_vec(v)
            .map(bytes::Bytes::from)
            .unwrap_or_default(),
    }
}

mod chains;
pub use chains::Chains;

#[cfg(test)]
mod tests;
