//! Per-route filter chains: which filters, with which of their configs, a
//! request runs, chosen from the route its headers match as the client
//! sent them (Envoy's route cache), and the check that a filter moving a
//! request to another route cannot skip that route's filters.
//!
//! Each distinct `filters.NAME.config` of the file becomes one per-route
//! config of filter NAME (`FilterSpec::route_configs`, numbered from 1 in
//! file order); a chain entry names the filter and that number, so every
//! route with the same override shares one root context per instance. An
//! override whose bytes (as the guest receives them: JSON for a table) are
//! the filter's own config is config 0, the filter's own root context:
//! no extra root, and no gap between routes with and without it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::{Config, ListenerConfig};
use crate::filter::PipelineEntry;

/// A listener's chains: its own `pipeline` (for the requests no route
/// claims) and each HTTP route's, by route index.
#[derive(Debug, Default)]
pub struct Chains {
    pub listener: Arc<[PipelineEntry]>,
    /// One per route of the listener's `RouteTable`, in the same order;
    /// a route without filter settings shares the listener's `Arc`.
    pub routes: Vec<Arc<[PipelineEntry]>>,
    /// Some route has a chain of its own (else the lookup before the
    /// filters can be skipped: every request runs the listener's).
    pub per_route: bool,
    /// For each cluster some route of the listener sends to: every filter
    /// (with its config) of those routes' chains. A filter that picks the
    /// cluster itself (`wasp.cluster`) must have run with all of them, so
    /// it cannot reach a cluster past the filters its routes ask for.
    /// Empty when no route has a chain of its own.
    pub by_cluster: Vec<(usize, Vec<PipelineEntry>)>,
}

impl Chains {
    /// The chain of the route at `index` (`None`: no route, the listener's).
    pub fn of(&self, index: Option<usize>) -> &Arc<[PipelineEntry]> {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.listener)
    }

    /// The filters of every route of the listener sending to `cluster`
    /// (none when no route does, or no route has a chain of its own).
    pub fn of_cluster(&self, cluster: usize) -> &[PipelineEntry] {
        self.by_cluster
            .iter()
            .find(|(c, _)| *c == cluster)
            .map_or(&[], |(_, union)| union.as_slice())
    }

    /// Whether running `ran` ran every filter of `wanted` with the same
    /// config, so a request whose filters rerouted it to `wanted`'s route
    /// has been through everything that route asks for.
    pub fn covers(ran: &Arc<[PipelineEntry]>, wanted: &Arc<[PipelineEntry]>) -> bool {
        Arc::ptr_eq(ran, wanted) || wanted.iter().all(|w| ran.contains(w))
    }

    /// The filters of `wanted` that `ran` did not run (for the error).
    pub fn missing(ran: &[PipelineEntry], wanted: &[PipelineEntry]) -> Vec<Arc<str>> {
        wanted
            .iter()
            .filter(|w| !ran.contains(w))
            .map(|w| w.name.clone())
            .collect()
    }
}

/// Each filter's own config (variant 0), as the guest receives it.
pub type OwnConfigs = BTreeMap<Arc<str>, Bytes>;

/// Every filter's per-route configs, as the guest receives them (JSON for
/// a table), distinct, in file order, leaving out those equal to the
/// filter's own config in `own` (they run on its own root context).
pub fn route_configs(config: &Config, own: &OwnConfigs) -> BTreeMap<Arc<str>, Vec<Bytes>> {
    let mut out: BTreeMap<Arc<str>, Vec<Bytes>> = BTreeMap::new();
    let overrides = config
        .listeners
        .iter()
        .flat_map(|l| l.routes.iter())
        .filter_map(|r| r.filters.as_ref())
        .flat_map(|f| f.configs.iter());
    for (name, value) in overrides {
        let bytes = super::config_bytes(Some(value));
        if own.get(name) == Some(&bytes) {
            continue;
        }
        let list = out.entry(name.clone()).or_default();
        if !list.contains(&bytes) {
            list.push(bytes);
        }
    }
    out
}

/// A loaded filter's configs as its root contexts have them: its own
/// (config 0) and its per-route ones (config k is `routes[k - 1]`), taken
/// from the `FilterSpec` the filter was loaded with, so chains and root
/// contexts are numbered from one source.
#[derive(Debug, Default, Clone)]
pub struct Variants {
    pub own: Bytes,
    pub routes: Vec<Bytes>,
}

/// Each loaded filter's [`Variants`], by name.
pub type ConfigVariants = BTreeMap<Arc<str>, Variants>;

/// The config number a route's `filters.NAME.config` (as `bytes`) runs
/// on: 0 only when the bytes are the filter's own config, k when they are
/// its k-th per-route config. Anything else is an error: running the
/// route on another config (the filter's own, say) would skip what the
/// route's config asks for.
fn variant_of(name: &str, bytes: &Bytes, variants: &ConfigVariants) -> Result<u32, String> {
    let Some(v) = variants.get(name) else {
        return Err(format!(
            "filter \"{name}\" has a per-route config but is not loaded"
        ));
    };
    if *bytes == v.own {
        return Ok(0);
    }
    v.routes
        .iter()
        .position(|b| b == bytes)
        .and_then(|k| u32::try_from(k).ok()?.checked_add(1))
        .ok_or_else(|| {
            format!(
                "a per-route config of filter \"{name}\" is neither its own config nor among the {} it was loaded with",
                v.routes.len()
            )
        })
}

/// The chains of listener `l`, numbering each route's configs as the
/// loaded filters number their root contexts (`variants`).
pub fn chains(l: &ListenerConfig, variants: &ConfigVariants) -> Result<Chains, String> {
    let own = |name: &Arc<str>| PipelineEntry {
        name: name.clone(),
        config: 0,
    };
    let listener: Arc<[PipelineEntry]> = l.pipeline.iter().map(own).collect();
    let mut routes: Vec<Arc<[PipelineEntry]>> = Vec::with_capacity(l.routes.len());
    for (index, r) in l.routes.iter().enumerate() {
        let Some(f) = &r.filters else {
            routes.push(listener.clone());
            continue;
        };
        let mut chain = Vec::with_capacity(f.pipeline.len());
        for name in &f.pipeline {
            let config = match f.configs.get(name) {
                None => 0,
                Some(v) => {
                    variant_of(name, &super::config_bytes(Some(v)), variants).map_err(|e| {
                        format!(
                            "listener \"{}\", route {}: {e}",
                            l.name,
                            index.saturating_add(1)
                        )
                    })?
                }
            };
            chain.push(PipelineEntry {
                name: name.clone(),
                config,
            });
        }
        routes.push(chain.into());
    }
    let per_route = l.routes.iter().any(|r| r.filters.is_some());
    let mut by_cluster: Vec<(usize, Vec<PipelineEntry>)> = Vec::new();
    if per_route {
        for (r, chain) in l.routes.iter().zip(&routes) {
            let clusters = match &r.target {
                crate::config::route::Target::One(c) => vec![*c],
                crate::config::route::Target::Weighted(list) => {
                    list.iter().map(|(c, _)| *c).collect()
                }
            };
            for c in clusters {
                let at = match by_cluster.iter().position(|(have, _)| *have == c) {
                    Some(at) => at,
                    None => {
                        by_cluster.push((c, Vec::new()));
                        by_cluster.len() - 1
                    }
                };
                if let Some((_, union)) = by_cluster.get_mut(at) {
                    for e in chain.iter() {
                        if !union.contains(e) {
                            union.push(e.clone());
                        }
                    }
                }
            }
        }
    }
    Ok(Chains {
        listener,
        routes,
        per_route,
        by_cluster,
    })
}
