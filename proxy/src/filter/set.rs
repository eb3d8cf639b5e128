//! [`FilterSet`]: one immutable generation of loaded filters, held by the
//! core's config snapshot and by every stream started on it.
//!
//! Built on the control thread by `FilterRuntime::load`; read by workers.
//! Its instances live in each worker's thread-local pools (see `worker`)
//! and are freed once the set is gone.

use std::collections::HashMap;
use std::sync::Arc;

use super::plugin::Plugin;
use super::stream::StreamFilters;
use super::StreamInfo;

/// One filter of a route's chain: its name, and which of its configs the
/// route's streams get (0: `[filters.NAME] config`; k: the k-th of the
/// filter's per-route configs, `FilterSpec::route_configs[k - 1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineEntry {
    pub name: Arc<str>,
    pub config: u32,
}

/// Up to this many filters, a stream finds its filters by a linear scan.
const SCAN_MAX: usize = 8;

/// An immutable generation of loaded filters.
pub struct FilterSet {
    pub(crate) id: u64,
    pub(crate) plugins: Vec<Arc<Plugin>>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for FilterSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterSet")
            .field("id", &self.id)
            .field("filters", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FilterSet {
    pub(crate) fn new(id: u64, plugins: Vec<Arc<Plugin>>) -> Self {
        let by_name = plugins
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name().to_string(), i))
            .collect();
        FilterSet {
            id,
            plugins,
            by_name,
        }
    }

    /// Whether a filter of that name is loaded in this set.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Filter names in this set.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().map(|p| &**p.name())
    }

    /// Builds this worker's instances of the set now rather than on its
    /// first stream (`wasp filter test`, so callouts made while an
    /// instance starts can be answered before a request arrives). Call on
    /// the worker's runtime.
    pub fn prepare_worker(self: &Arc<Self>) -> bool {
        super::worker::prepare(self)
    }

    /// Whether an instance of the set is still being built for this worker.
    pub fn building_on_worker(&self) -> bool {
        super::worker::building(self.id)
    }

    /// Starts a stream through `pipeline` (names in request order; unknown
    /// names are skipped with a warning, the core validates them first).
    /// An empty pipeline gives a no-op stream that allocates nothing.
    pub fn stream(self: &Arc<Self>, pipeline: &[Arc<str>], info: StreamInfo) -> StreamFilters {
        self.stream_with(pipeline.iter().map(|name| (name, 0)), info)
    }

    /// Starts a stream through a route's own chain: each filter with the
    /// config its entry names (a per-route one runs in a root context of its
    /// own on the same instances as the filter's other streams).
    pub fn route_stream(
        self: &Arc<Self>,
        pipeline: &[PipelineEntry],
        info: StreamInfo,
    ) -> StreamFilters {
        let entries = pipeline.iter().map(|e| (&e.name, e.config));
        self.stream_with(entries, info)
    }

    fn stream_with<'a>(
        self: &Arc<Self>,
        entries: impl Iterator<Item = (&'a Arc<str>, u32)>,
        info: StreamInfo,
    ) -> StreamFilters {
        // Resolved straight into the stream's inline slots: no index list
        // of its own per stream.
        let idx = entries.filter_map(|(name, config)| match self.index_of(name) {
            Some(i) => Some((i, config)),
            None => {
                tracing::warn!(filter = %name, "pipeline names a filter not in this set; skipped");
                None
            }
        });
        StreamFilters::new(self.clone(), idx, info)
    }

    /// The position of filter `name` in the set. A handful of filters is
    /// scanned (a few short string compares, per filter and stream) rather
    /// than hashed with SipHash; the map serves large sets.
    fn index_of(&self, name: &str) -> Option<usize> {
        if self.plugins.len() <= SCAN_MAX {
            return self.plugins.iter().position(|p| &**p.name() == name);
        }
        self.by_name.get(name).copied()
    }

    /// A TCP connection's network filter chain (L4 listeners).
    pub fn network(
        self: &Arc<Self>,
        pipeline: &[Arc<str>],
        info: StreamInfo,
    ) -> super::network::NetworkFilters {
        let idx = pipeline
            .iter()
            .filter_map(|name| {
                let i = self.by_name.get(&**name).copied();
                if i.is_none() {
                    tracing::warn!(filter = %name, "pipeline names a filter not in this set; skipped");
                }
                i
            })
            .collect();
        super::network::NetworkFilters::new(self.clone(), idx, info)
    }
}
