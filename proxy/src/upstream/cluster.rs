//! A cluster's shared state: its current endpoint set, each endpoint's
//! health, ejection and counters, the cluster's circuit-breaker counts and
//! retry budget.
//!
//! One [`ClusterState`] per cluster per config generation, shared by the
//! control thread (discovery, health checks and the ejection timer write
//! it) and every worker (which read it and record outcomes in it). Only
//! atomics and one `ArcSwap` for the endpoint set: no locks. Every change
//! that alters which endpoints may be picked bumps [`ClusterState::version`];
//! workers compare it on each pick and rebuild their balancer when it moved,
//! so the control thread never rebuilds a whole config snapshot for an
//! endpoint change, and in-flight requests keep the endpoint (and pooled
//! connection) they started with.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::header::{HeaderMap, COOKIE};

use super::retry::RetryBudget;
use crate::config::Endpoint;

pub use crate::config::cluster::{ClusterSettings, HashKey, Limits};

/// Cluster-wide counters, summed over workers.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub retries: AtomicU64,
    pub budget_exhausted: AtomicU64,
    pub overflows: AtomicU64,
    pub ejections: AtomicU64,
    pub discovery_updates: AtomicU64,
    pub discovery_errors: AtomicU64,
}

#[derive(Debug)]
pub struct ClusterState {
    pub name: Arc<str>,
    pub settings: ClusterSettings,
    endpoints: ArcSwap<EndpointSet>,
    version: AtomicU64,
    /// Requests to this cluster in flight (until the response body ends).
    pub in_flight: AtomicUsize,
    /// Requests waiting for the response headers.
    pub pending: AtomicUsize,
    /// Connections connecting or open (all workers), counted only when
    /// `limits.max_connections` is set. A place is taken before dialling,
    /// not once the connection is up, so a burst on a cold pool cannot
    /// overshoot the limit (the open-connections gauge counts too late).
    pub connections: AtomicUsize,
    pub counters: ClusterCounters,
    pub budget: Option<RetryBudget>,
    /// The last discovery failure (cleared by the next success).
    pub discovery_error: ArcSwapOption<String>,
    started: AtomicBool,
    /// False until DNS discovery has answered once (true for the others).
    discovered: AtomicBool,
    /// Wakes requests that arrived before the first DNS answer.
    first_answer: tokio::sync::Notify,
}

/// One version of a cluster's endpoints.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Arc<EndpointState>>,
}

/// One endpoint, shared by all workers and the control thread.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once: every request to this
    /// endpoint names it, and formatting a socket address per request
    /// shows up in profiles.
    pub authority: http::uri::Authority,
    weight: AtomicU32,
    /// Active health checks' verdict (true until checks say otherwise).
    healthy: AtomicBool,
    /// Consecutive check results (control thread only).
    pub(crate) check_streak_ok: AtomicU32,
    pub(crate) check_streak_failed: AtomicU32,
    /// [`super::balance::now_nanos`] when the ejection ends; 0: not ejected.
    ejected_until: AtomicU64,
    pub(crate) ejections: AtomicU32,
    pub(crate) consecutive_failures: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub latency_ns_total: AtomicU64,
    /// All workers together.
    pub in_flight: AtomicI64,
    /// The latest peak-EWMA estimate any worker computed, in ns.
    pub estimate_ns: AtomicU64,
}

// === impl ClusterState ===

impl ClusterState {
    pub fn new(
        name: Arc<str>,
        settings: ClusterSettings,
        initial: &[Endpoint],
        budget: Option<RetryBudget>,
    ) -> Self {
        let settings_discovery_is_dns =
            matches!(settings.discovery, crate::config::Discovery::Dns(_));
        let state = Self {
            name,
            settings,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            version: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            counters: ClusterCounters::default(),
            budget,
            discovery_error: ArcSwapOption::empty(),
            started: AtomicBool::new(false),
            discovered: AtomicBool::new(!settings_discovery_is_dns),
            first_answer: tokio::sync::Notify::new(),
        };
        state.set_endpoints(initial);
        state
    }

    /// Changes whenever the set of pickable endpoints may have changed.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub(crate) fn bump(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Publishes a new endpoint list (control thread). Endpoints that stay
    /// keep their state (health, ejection, counters); returns whether
    /// anything changed. An address listed twice (two DNS names, a file
    /// that repeats it) counts once, with its first weight.
    pub fn set_endpoints(&self, list: &[Endpoint]) -> bool {
        // Deduplicated before comparing: compared by length and membership,
        // [a, a] would pass for [a, b] and b would never be removed.
        let mut seen = HashSet::with_capacity(list.len());
        let unique: Vec<&Endpoint> = list.iter().filter(|e| seen.insert(e.addr)).collect();
        let current = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<EndpointState>> =
            current.endpoints.iter().map(|s| (s.addr, s)).collect();
        let same = by_addr.len() == unique.len()
            && unique
                .iter()
                .all(|e| by_addr.get(&e.addr).is_some_and(|s| s.weight() == e.weight));
        if same {
            return false;
        }
        let mut next = Vec::with_capacity(unique.len());
        for e in unique {
            let state = match by_addr.get(&e.addr) {
                Some(s) => {
                    s.weight.store(e.weight, Ordering::Relaxed);
                    Arc::clone(s)
                }
                None => Arc::new(EndpointState::new(e.addr, e.weight)),
            };
            next.push(state);
        }
        self.endpoints
            .store(Arc::new(EndpointSet { endpoints: next }));
        self.counters
            .discovery_updates
            .fetch_add(1, Ordering::Relaxed);
        self.bump();
        true
    }

    /// Marks discovery as having answered (or given up) once, waking the
    /// requests that were waiting for it (control thread).
    pub(crate) fn discovered(&self) {
        if !self.discovered.swap(true, Ordering::AcqRel) {
            self.first_answer.notify_waiters();
        }
    }

    /// Waits (at most `limit`) for discovery's first answer: only requests
    /// that arrive before DNS has answered once ever wait here.
    pub async fn first_answer(&self, limit: Duration) {
        let notified = self.first_answer.notified();
        if self.discovered.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, notified).await;
    }

    /// True the first time only: the control thread starts this cluster's
    /// discovery and health tasks once.
    pub(crate) fn claim_start(&self) -> bool {
        !self.started.swap(true, Ordering::AcqRel)
    }

    /// The endpoints a worker should balance over at `now`: the healthy,
    /// non-ejected ones, or all of them (panic mode) when fewer than half
    /// are, since sending to a maybe-bad endpoint beats refusing outright.
    pub fn pickable(&self, now: u64) -> (Vec<Arc<EndpointState>>, bool) {
        let set = self.endpoints.load();
        let ok: Vec<_> = set
            .endpoints
            .iter()
            .filter(|e| e.available(now))
            .cloned()
            .collect();
        if ok.is_empty() || ok.len() * 2 < set.endpoints.len() {
            (set.endpoints.clone(), !set.endpoints.is_empty())
        } else {
            (ok, false)
        }
    }

    /// The request's hash key per `hash_key`, into `buf` for the source IP.
    pub fn hash_key<'a>(
        &self,
        headers: &'a HeaderMap,
        peer: IpAddr,
        buf: &'a mut [u8; 16],
    ) -> Option<&'a [u8]> {
        match self.settings.hash_key.as_ref()? {
            HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes()),
            HashKey::Cookie(name) => headers.get_all(COOKIE).iter().find_map(|v| {
                v.to_str().ok()?.split(';').find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then_some(v.as_bytes())
                })
            }),
            HashKey::SourceIp => {
                let len = match peer {
                    IpAddr::V4(v4) => {
                        buf[..4].copy_from_slice(&v4.octets());
                        4
                    }
                    IpAddr::V6(v6) => {
                        buf.copy_from_slice(&v6.octets());
                        16
                    }
                };
                Some(&buf[..len])
            }
        }
    }
}

// === impl EndpointState ===

impl EndpointState {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        let authority = http::uri::Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| http::uri::Authority::from_static("invalid.endpoint"));
        Self {
            addr,
            authority,
            weight: AtomicU32::new(weight),
            healthy: AtomicBool::new(true),
            check_streak_ok: AtomicU32::new(0),
            check_streak_failed: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_ns_total: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            estimate_ns: AtomicU64::new(0),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets the health-check verdict; true when it changed.
    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub fn ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && now < until
    }

    /// When the current ejection ends (0: none).
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Acquire)
    }

    pub(crate) fn set_ejected_until(&self, until: u64) {
        self.ejected_until.store(until, Ordering::Release);
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn available(&self, now: u64) -> bool {
        self.healthy() && !self.ejected(now)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::{ClusterSettings, ClusterState, Limits};
    use crate::config::Endpoint;
    use crate::upstream::discovery::Discovery;

    fn ep(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
        }
    }

    fn cluster(initial: &[Endpoint]) -> ClusterState {
        let settings = ClusterSettings {
            discovery: Discovery::Static,
            hash_key: None,
            health: None,
            outlier: None,
            limits: Limits::default(),
            decay: Duration::from_secs(10),
        };
        ClusterState::new("c".into(), settings, initial, None)
    }

    fn published(c: &ClusterState) -> Vec<(u16, u32)> {
        c.endpoints()
            .endpoints
            .iter()
            .map(|e| (e.addr.port(), e.weight()))
            .collect()
    }

    #[test]
    fn a_duplicate_does_not_stand_in_for_an_endpoint_that_left() {
        let c = cluster(&[ep(1, 1), ep(2, 1)]);
        let v = c.version();
        assert!(c.set_endpoints(&[ep(1, 1), ep(1, 1)]));
        assert_eq!(published(&c), [(1, 1)]);
        assert!(c.version() > v);
    }

    #[test]
    fn endpoint_lists_compare_as_sets() {
        let c = cluster(&[ep(1, 1), ep(2, 1)]);
        let v = c.version();
        assert!(!c.set_endpoints(&[ep(2, 1), ep(1, 1), ep(2, 1)]));
        assert_eq!(c.version(), v);
        // The first mention of an address wins, weight included.
        assert!(c.set_endpoints(&[ep(3, 2), ep(1, 1), ep(3, 5)]));
        assert_eq!(published(&c), [(3, 2), (1, 1)]);
        assert!(!c.set_endpoints(&[ep(1, 1), ep(3, 2), ep(1, 7)]));
    }
}
