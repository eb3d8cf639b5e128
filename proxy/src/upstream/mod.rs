//! Upstreams: clusters, their endpoint sets, per-worker connection pools
//! and balancers.
//!
//! Two halves:
//! - Shared, per cluster ([`ClusterState`], made when a snapshot is
//!   compiled and kept across generations while the cluster's config is
//!   equal; owned by the control thread): the current endpoint set in an `ArcSwap`, each
//!   endpoint's health, ejection and counters, the circuit-breaker counts
//!   and retry budget. [`discovery`], [`health`] and the ejection timer
//!   ([`control`]) update it on the control thread.
//! - Per worker ([`Upstreams`], built from each snapshot by the worker that
//!   uses it, cached in its [`WorkerPools`]): its connection pool (module
//!   `pool`, on hyper's connection API) and the balancer.
//!   The balancer is rebuilt lazily, on the worker, when the cluster's
//!   version moves (endpoints changed, an endpoint was ejected or marked
//!   unhealthy); the pool is kept, so connections to endpoints that stay
//!   are reused and in-flight requests on ones that left finish.
//!
//! Sending is owned here too: the endpoint choice is made before the pool
//! sees the request, and [`Upstream::send_once`] (module `send`) rewrites
//! the request's URI to the endpoint address, sends it, and classifies a
//! failure ([`SendError`]); [`Upstream::send_with_retries`] (module
//! [`retry`]) repeats it under the route's policy. A try is tracked by an
//! [`Attempt`] guard that records latency, in-flight and the outcome when
//! dropped, so a cancelled request still counts. Cluster counters change
//! only in this module's methods.

pub mod balance;
mod callout;
pub mod cluster;
mod connector;
pub mod control;
pub mod discovery;
pub mod health;
pub mod outlier;
mod pool;
mod report;
pub mod retry;
mod send;

pub use callout::{Callouts, ClusterLookup};
pub use cluster::{ClusterSettings, ClusterState, EndpointState, HashKey, Limits};
pub use report::{clusters_json, discovery_name as discovery_label, render_metrics};
pub use retry::{Replay, RetryBudget, RetryPolicy};
pub use send::{error_chain, find_cause, SendError};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{Balance, ClusterConfig, Endpoint, UpstreamProtocol};
use crate::telemetry::Metrics;
use crate::tls::ClientTls;
use balance::{now_nanos, Balancer, Candidate, Load, Neutral, PickContext, Tuning};
use connector::CountingConnector;

pub use connector::ConnectionOverflow;
pub use pool::ResponseBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type requests are sent upstream with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// One cluster of a snapshot: its settings, the endpoints it started
/// with, the TLS material towards them and its live state. Reads as its
/// [`ClusterConfig`] for the settings.
#[derive(Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    /// The static list resolved, or the first answer of file discovery;
    /// DNS clusters start empty. The live set is in `state`.
    pub endpoints: Vec<Endpoint>,
    /// TLS towards the endpoints (current client config swapped in place
    /// by its file watcher).
    pub tls: Option<Arc<ClientTls>>,
    /// Discovery, health, outlier and circuit-breaker state and the live
    /// endpoint set, shared by the control thread and the workers; the
    /// same `Arc` across generations while the cluster's config is equal.
    pub state: Arc<ClusterState>,
}

impl std::ops::Deref for Cluster {
    type Target = ClusterConfig;

    fn deref(&self) -> &ClusterConfig {
        &self.config
    }
}

/// One worker's upstream pools, for the snapshot generation they were built
/// from: made by `server` for each worker thread and handed to its
/// listeners, so a request finds its worker's pools without a lookup.
/// Only its own worker touches it; the `ArcSwap` is for `Sync`, not for
/// contention.
#[derive(Debug)]
pub struct WorkerPools {
    metrics: Arc<Metrics>,
    current: arc_swap::ArcSwapOption<Pools>,
}

#[derive(Debug)]
struct Pools {
    generation: u64,
    upstreams: Arc<Upstreams>,
}

thread_local! {
    /// The pools of the worker running on this thread, for callouts, which
    /// the filter engine makes without a connection at hand.
    static CURRENT: std::cell::RefCell<Option<Arc<WorkerPools>>> = const { std::cell::RefCell::new(None) };
}

impl WorkerPools {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            current: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// Makes these the pools of the calling thread (a worker, at start).
    pub fn enter(self: &Arc<Self>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// The calling thread's pools; a thread that is not a worker gets its
    /// own on first use.
    pub fn current(metrics: &Arc<Metrics>) -> Arc<Self> {
        CURRENT.with(|c| {
            c.borrow_mut()
                .get_or_insert_with(|| Self::new(metrics.clone()))
                .clone()
        })
    }

    /// The pools for generation `generation` of `clusters`, built on first
    /// use from the previous generation's (see [`Upstreams::build`]).
    pub fn upstreams(&self, generation: u64, clusters: &[Cluster]) -> Arc<Upstreams> {
        let current = self.current.load();
        if let Some(p) = current.as_ref().filter(|p| p.generation == generation) {
            return p.upstreams.clone();
        }
        let prev = current.as_ref().map(|p| &*p.upstreams);
        let upstreams = Arc::new(Upstreams::build(clusters, &self.metrics, prev));
        self.current.store(Some(Arc::new(Pools {
            generation,
            upstreams: upstreams.clone(),
        })));
        upstreams
    }
}

/// One worker's view of every cluster, indexed by cluster id.
#[derive(Debug)]
pub struct Upstreams {
    clusters: Vec<Arc<Upstream>>,
    /// The built-in `passthrough` cluster (`route::PASSTHROUGH`): no
    /// endpoints of its own, each request or connection goes to its
    /// original destination ([`Upstream::direct`]).
    passthrough: Arc<Upstream>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub timeout: Option<Duration>,
    connect_timeout: Duration,
    pub state: Arc<ClusterState>,
    /// This worker's connections to the cluster's endpoints.
    pool: pool::Pool,
    balance: Balance,
    /// This worker's balancer over the pickable endpoints; replaced (by
    /// this worker only) when the cluster version moves.
    active: ArcSwap<Active>,
    neutral: Arc<Neutral>,
}

/// A balancer and the endpoints it was built over (same order).
#[derive(Debug)]
struct Active {
    version: u64,
    endpoints: Vec<Arc<EndpointState>>,
    loads: Vec<Arc<Load>>,
    balancer: Box<dyn Balancer>,
}

/// The endpoint chosen for one try.
#[derive(Clone, Debug)]
pub struct Picked {
    pub addr: SocketAddr,
    endpoint: Arc<EndpointState>,
    load: Arc<Load>,
}

impl Upstreams {
    /// This worker's upstreams for `config`. A cluster that `prev` (the
    /// worker's previous generation) already has, unchanged, is carried
    /// over with its pool: a reload that swaps a filter or edits a route
    /// must not cost every worker its warm upstream connections.
    /// "Unchanged" is the snapshot compiler's verdict: the new generation
    /// has the very same cluster state only if the cluster's config is equal.
    pub fn build(clusters: &[Cluster], metrics: &Metrics, prev: Option<&Upstreams>) -> Self {
        Self {
            clusters: clusters
                .iter()
                .map(|c| {
                    prev.and_then(|p| {
                        p.clusters
                            .iter()
                            .find(|u| Arc::ptr_eq(&u.state, &c.state))
                            .cloned()
                    })
                    .unwrap_or_else(|| Arc::new(Upstream::new(c, metrics)))
                })
                .collect(),
            passthrough: prev.map_or_else(
                || Arc::new(Upstream::new(&passthrough_cluster(), metrics)),
                |p| p.passthrough.clone(),
            ),
        }
    }

    pub fn get(&self, id: usize) -> Option<&Upstream> {
        if id == crate::route::PASSTHROUGH {
            return Some(&self.passthrough);
        }
        self.clusters.get(id).map(|u| &**u)
    }

    pub fn by_name(&self, name: &str) -> Option<&Upstream> {
        self.clusters
            .iter()
            .find(|c| &*c.name == name)
            .map(|u| &**u)
    }
}

/// How long a connection to an original destination may take.
pub const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The built-in `passthrough` cluster: plain HTTP/1.1 (what an app that
/// was captured spoke), no endpoints, no health or outlier state.
fn passthrough_cluster() -> Cluster {
    let settings = ClusterSettings {
        discovery: crate::config::Discovery::Static,
        hash_key: None,
        health: None,
        outlier: None,
        limits: Limits::default(),
        decay: Duration::from_secs(10),
    };
    let name: Arc<str> = Arc::from(crate::route::PASSTHROUGH_NAME);
    Cluster {
        state: Arc::new(ClusterState::new(name.clone(), settings.clone(), &[], None)),
        config: ClusterConfig {
            name,
            endpoints: Vec::new(),
            balance: Balance::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            connect_timeout: PASSTHROUGH_CONNECT_TIMEOUT,
            timeout: None,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 16,
            tls: None,
            settings,
            retry_budget: None,
            sites: crate::config::ClusterSites::default(),
        },
        endpoints: Vec::new(),
        tls: None,
    }
}

impl Upstream {
    /// An endpoint outside the cluster's set: a connection's original
    /// destination for the `passthrough` cluster. It has load and
    /// latency accounting of its own, none shared with picked endpoints.
    pub fn direct(&self, addr: SocketAddr) -> Picked {
        Picked {
            addr,
            endpoint: Arc::new(EndpointState::new(addr, 1)),
            load: Arc::new(Load::new(self.neutral.clone())),
        }
    }

    fn new(config: &Cluster, metrics: &Metrics) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.enforce_http(true);
        if let Some(tls) = &config.tls {
            tls.start(metrics);
        }
        let connector = CountingConnector::new(
            http,
            metrics.upstream_stats(&config.name),
            config.tls.clone(),
            config.connect_timeout,
        )
        .with_max_connections(&config.state);
        let pool = pool::Pool::new(
            connector,
            pool::PoolSettings {
                h2_only: config.protocol == UpstreamProtocol::Http2,
                idle_timeout: config.pool_idle_timeout,
                max_idle: config.pool_max_idle,
            },
        );
        let neutral = Arc::new(Neutral::default());
        let up = Self {
            name: config.name.clone(),
            protocol: config.protocol,
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            state: config.state.clone(),
            pool,
            balance: config.balance,
            active: ArcSwap::from_pointee(Active {
                version: 0,
                endpoints: Vec::new(),
                loads: Vec::new(),
                balancer: balance::for_cluster(config.balance, Vec::new(), Tuning::default()),
            }),
            neutral,
        };
        up.refresh();
        up
    }

    /// Rebuilds this worker's balancer if the cluster's version moved.
    fn refresh(&self) -> arc_swap::Guard<Arc<Active>> {
        let active = self.active.load();
        let version = self.state.version();
        if active.version == version {
            return active;
        }
        let (endpoints, _panic) = self.state.pickable(now_nanos());
        let old: HashMap<SocketAddr, &Arc<Load>> = active
            .endpoints
            .iter()
            .zip(&active.loads)
            .map(|(e, l)| (e.addr, l))
            .collect();
        let loads: Vec<Arc<Load>> = endpoints
            .iter()
            .map(|e| match old.get(&e.addr) {
                Some(l) => Arc::clone(l),
                None => Arc::new(Load::new(self.neutral.clone())),
            })
            .collect();
        let candidates = endpoints
            .iter()
            .zip(&loads)
            .map(|(e, l)| Candidate {
                addr: e.addr,
                weight: e.weight(),
                load: l.clone(),
            })
            .collect();
        let tuning = Tuning {
            decay: self.state.settings.decay,
        };
        let next = Arc::new(Active {
            version,
            balancer: balance::for_cluster(self.balance, candidates, tuning),
            endpoints,
            loads,
        });
        self.active.store(next);
        self.active.load()
    }

    /// Picks an endpoint; on a retry, `avoid` is the one that just failed
    /// and another is chosen when there is one.
    pub fn pick(&self, ctx: &PickContext, avoid: Option<SocketAddr>) -> Option<Picked> {
        let active = self.refresh();
        let n = active.endpoints.len();
        let mut i = active.balancer.pick(ctx)?;
        if let Some(avoid) = avoid {
            let mut tries = 0;
            while active.endpoints.get(i).map(|e| e.addr) == Some(avoid) && n > 1 {
                tries += 1;
                i = if tries < 4 && ctx.hash_key.is_none() {
                    active.balancer.pick(ctx)?
                } else {
                    (i + 1 + (balance::fast_random_index(n - 1))) % n
                };
            }
        }
        Some(Picked {
            addr: active.endpoints.get(i)?.addr,
            endpoint: active.endpoints.get(i)?.clone(),
            load: active.loads.get(i)?.clone(),
        })
    }

    /// [`Upstream::pick`], but a request that arrives before DNS discovery
    /// has answered once waits for that answer (at most the cluster's
    /// `connect_timeout`) instead of failing with `no_endpoint`.
    pub async fn pick_first(&self, ctx: &PickContext<'_>) -> Option<Picked> {
        if let Some(p) = self.pick(ctx, None) {
            return Some(p);
        }
        // Boxed: waiting for discovery is rare, its timer is not small.
        Box::pin(self.state.first_answer(self.connect_timeout)).await;
        self.pick(ctx, None)
    }

    /// Starts a try to `picked`: counts it in flight until the returned
    /// guard is dropped.
    pub fn start(&self, picked: Picked) -> Attempt {
        picked.load.start();
        picked.endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        picked.endpoint.requests.fetch_add(1, Ordering::Relaxed);
        Attempt {
            picked,
            cluster: self.state.clone(),
            started: now_nanos(),
            outcome: None,
        }
    }

    /// The cluster's `connect_timeout`.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Admits a request under the cluster's `max_requests` and
    /// `max_pending`; `None` means overflow (counted).
    pub fn admit(&self) -> Option<Admission> {
        let limits = self.state.settings.limits;
        let requests = self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let admission = Admission {
            state: self.state.clone(),
            pending: false,
        };
        if limits.max_requests.is_some_and(|max| requests >= max) {
            self.count_overflow();
            return None;
        }
        let pending = self.state.pending.fetch_add(1, Ordering::AcqRel);
        let mut admission = admission;
        admission.pending = true;
        if limits.max_pending.is_some_and(|max| pending >= max) {
            self.count_overflow();
            return None;
        }
        Some(admission)
    }
}

impl Picked {
    /// The endpoint as a URI authority (prebuilt; cloning is a refcount).
    pub fn authority(&self) -> http::uri::Authority {
        self.endpoint.authority.clone()
    }
}

// === Attempt ===

/// One try at one endpoint. Dropping it records the latency sample, ends
/// the in-flight count and feeds outlier detection with the outcome set
/// by [`Attempt::succeeded`] / [`Attempt::failed`] (none: cancelled, which
/// counts for load but not for ejection).
#[derive(Debug)]
pub struct Attempt {
    picked: Picked,
    cluster: Arc<ClusterState>,
    started: u64,
    outcome: Option<bool>,
}

impl Attempt {
    pub fn addr(&self) -> SocketAddr {
        self.picked.addr
    }

    pub fn succeeded(&mut self) {
        self.outcome = Some(true);
    }

    pub fn failed(&mut self) {
        self.outcome = Some(false);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let now = now_nanos();
        let rtt = now.saturating_sub(self.started);
        let decay = self.cluster.settings.decay;
        let load = &self.picked.load;
        load.finish(rtt as f64, decay, now);
        let ep = &self.picked.endpoint;
        ep.in_flight.fetch_sub(1, Ordering::Relaxed);
        ep.latency_ns_total.fetch_add(rtt, Ordering::Relaxed);
        ep.estimate_ns
            .store(load.estimate(now, decay) as u64, Ordering::Relaxed);
        if self.outcome == Some(false) {
            ep.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ok) = self.outcome {
            outlier::record(&self.cluster, ep, ok, now);
        }
    }
}

// === Admission ===

/// A request counted against the cluster's circuit breakers. Call
/// [`Admission::headers_received`] when the response headers arrive (ends
/// "pending"); drop it when the response is over.
#[derive(Debug)]
pub struct Admission {
    state: Arc<ClusterState>,
    pending: bool,
}

impl Admission {
    pub fn headers_received(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.state.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.headers_received();
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
