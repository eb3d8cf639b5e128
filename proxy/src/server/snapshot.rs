//! A snapshot: one immutable generation of everything the request path
//! reads (config, route tables, pre-resolved metric series). Built on the
//! control thread, published with `arc-swap`, loaded once per request.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::config::Config;
use crate::telemetry::{ListenerStats, Metrics, RequestStats};

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    /// Same order as `config.listeners`.
    pub listeners: Vec<ListenerRuntime>,
}

#[derive(Debug)]
pub struct ListenerRuntime {
    pub stats: ListenerStats,
    /// Per route (config order): the series for each cluster it may pick.
    pub route_stats: Vec<Vec<(usize, RequestStats)>>,
    /// Requests that matched no route.
    pub unrouted: RequestStats,
    /// Open connections across all workers, for `max_connections`.
    pub open_connections: Arc<AtomicUsize>,
}

impl Snapshot {
    pub fn build(generation: u64, config: Arc<Config>, metrics: &Arc<Metrics>) -> Self {
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRuntime {
                stats: metrics.listener_stats(&l.name),
                route_stats: l
                    .routes
                    .routes()
                    .iter()
                    .map(|r| {
                        r.clusters()
                            .into_iter()
                            .map(|c| {
                                let cluster = config.clusters.get(c).map_or("", |c| &*c.name);
                                (c, metrics.request_stats(&l.name, &r.name, cluster))
                            })
                            .collect()
                    })
                    .collect(),
                unrouted: metrics.request_stats(&l.name, "", ""),
                open_connections: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Self {
            generation,
            config,
            listeners,
        }
    }
}
