//! A snapshot: one immutable generation of everything the request path
//! reads (config, route tables, pre-resolved metric series). Built on the
//! control thread, published with `arc-swap`, loaded once per request.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::config::Config;
use crate::filter::FilterSet;
use crate::telemetry::{ListenerStats, Metrics, RequestStats, TcpStats};

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    /// Same order as `config.listeners`.
    pub listeners: Vec<ListenerRuntime>,
    /// The loaded filters every pipeline of this generation uses.
    pub filters: Arc<FilterSet>,
    cluster_ids: HashMap<Arc<str>, usize>,
}

#[derive(Debug)]
pub struct ListenerRuntime {
    pub stats: ListenerStats,
    /// Per route (config order): the series for each cluster it may pick.
    pub route_stats: Vec<Vec<(usize, RequestStats)>>,
    /// Requests that matched no route.
    pub unrouted: RequestStats,
    /// Requests a capture listener sent to their original destination
    /// because no route claimed them (route "", cluster "passthrough").
    pub passthrough: Option<RequestStats>,
    /// Open connections across all workers, for `max_connections`.
    pub open_connections: Arc<AtomicUsize>,
    /// L4 series (tcp and capture listeners only): per route (config
    /// order) and cluster, then the unrouted passthrough last.
    pub tcp_stats: Vec<Vec<(usize, TcpStats)>>,
    pub tcp_passthrough: Option<TcpStats>,
}

/// A cluster id's name for metric labels (the built-in passthrough too).
fn cluster_name(config: &Config, id: usize) -> &str {
    if id == crate::route::PASSTHROUGH {
        return crate::route::PASSTHROUGH_NAME;
    }
    config.clusters.get(id).map_or("", |c| &*c.name)
}

impl Snapshot {
    pub fn build(
        generation: u64,
        config: Arc<Config>,
        filters: Arc<FilterSet>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let listeners =
            config
                .listeners
                .iter()
                .map(|l| ListenerRuntime {
                    stats: metrics.listener_stats(&l.name),
                    route_stats: l
                        .routes
                        .routes()
                        .iter()
                        .map(|r| {
                            // With filters, any cluster may be picked (wasp.cluster).
                            let clusters = if l.pipeline.is_empty() {
                                r.clusters()
                            } else {
                                (0..config.clusters.len()).collect()
                            };
                            clusters
                                .into_iter()
                                .map(|c| {
                                    let cluster = cluster_name(&config, c);
                                    (c, metrics.request_stats(&l.name, &r.name, cluster))
                                })
                                .collect()
                        })
                        .collect(),
                    unrouted: metrics.request_stats(&l.name, "", ""),
                    passthrough: l.l4.capture.is_some().then(|| {
                        metrics.request_stats(&l.name, "", crate::route::PASSTHROUGH_NAME)
                    }),
                    open_connections: Arc::new(AtomicUsize::new(0)),
                    tcp_stats: if l.l4.is_tcp() || l.l4.capture.is_some() {
                        let table = if l.l4.is_tcp() {
                            &l.routes
                        } else {
                            &l.l4.tcp_routes
                        };
                        table
                            .routes()
                            .iter()
                            .map(|r| {
                                r.clusters()
                                    .into_iter()
                                    .map(|c| {
                                        let name = cluster_name(&config, c);
                                        (c, metrics.tcp_stats(&l.name, &r.name, name))
                                    })
                                    .collect()
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    tcp_passthrough: (l.l4.is_tcp() || l.l4.capture.is_some())
                        .then(|| metrics.tcp_stats(&l.name, "", crate::route::PASSTHROUGH_NAME)),
                })
                .collect();
        let cluster_ids = config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Self {
            generation,
            config,
            listeners,
            filters,
            cluster_ids,
        }
    }

    /// The generation after `prev`: listener connection counts carry over
    /// (connections opened under `prev` still count against the limits).
    pub fn next(
        prev: &Snapshot,
        generation: u64,
        config: Arc<Config>,
        filters: Arc<FilterSet>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let mut next = Self::build(generation, config, filters, metrics);
        for (l, runtime) in next.config.listeners.iter().zip(next.listeners.iter_mut()) {
            if let Some(i) = prev.config.listeners.iter().position(|p| p.name == l.name) {
                runtime.open_connections = prev.listeners[i].open_connections.clone();
            }
        }
        next
    }

    /// Position of the listener named `name` in this generation. Listeners
    /// are found by name, not by position, because a reload may add or
    /// remove others around a listener that keeps serving (a handful of
    /// short names: a scan costs less than hashing).
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.config.listeners.iter().position(|l| *l.name == *name)
    }

    pub fn cluster_id(&self, name: &str) -> Option<usize> {
        self.cluster_ids.get(name).copied()
    }
}
