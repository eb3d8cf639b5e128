//! One loaded filter of one generation: the compiled module pre-linked
//! (`InstancePre`), its spec, and the process-wide state it shares with every
//! other generation of the same filter name (shared data, metrics, stats).
//!
//! Built on the control thread by `FilterRuntime::load`; read-only afterwards
//! and shared (`Arc`) by every worker's VMs of this generation.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::{Engine, InstancePre};

use super::abi::shared_data::SharedData;
use super::abi::shared_queue::SharedQueues;
use super::engine::Ticker;
use super::host::Host;
use super::metrics::{FilterStats, MetricStore};
use super::{FailPolicy, FilterSpec, HostLimits, HttpCallouts};

/// What a VM's host functions need to know about their filter.
pub(crate) struct PluginShared {
    pub name: Arc<str>,
    pub config: Bytes,
    pub vm_config: Bytes,
    pub shared: Arc<SharedData>,
    pub queues: Arc<SharedQueues>,
    pub metrics: Arc<MetricStore>,
    pub stats: Arc<FilterStats>,
    pub callouts: Arc<dyn HttpCallouts>,
    /// Caps on host calls (from the spec).
    pub limits: HostLimits,
    /// A body a filter rewrites may not grow past this (from the spec).
    pub max_body_bytes: u64,
}

/// A filter of one generation.
pub(crate) struct Plugin {
    pub spec: FilterSpec,
    pub shared: Arc<PluginShared>,
    pub engine: Engine,
    pub pre: InstancePre<Host>,
    pub sha256: String,
    pub generation: u64,
    /// Epoch ticks of one callback's deadline.
    pub deadline_ticks: u64,
    /// VMs of this generation that failed and are not rebuilt yet (all workers).
    pub failed_vms: AtomicI64,
    /// The last attempt to rebuild a VM of this generation failed.
    pub rebuild_failing: AtomicBool,
    /// The last VM failure or rebuild error of this generation.
    pub last_error: Mutex<Option<String>>,
    /// Keeps the epoch ticker running while this generation can run code.
    pub _ticker: Arc<Ticker>,
}

impl Plugin {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    pub(crate) fn fail_policy(&self) -> FailPolicy {
        self.spec.fail
    }

    pub(crate) fn note_failure(&self, error: &str) {
        tracing::warn!(filter = %self.shared.name, error, "wasm filter VM failed");
        let mut g = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(error.to_string());
    }

    pub(crate) fn state(&self) -> &'static str {
        if self.failed_vms.load(Ordering::Relaxed) == 0 {
            "ok"
        } else if self.rebuild_failing.load(Ordering::Relaxed) {
            "failed"
        } else {
            "rebuilding"
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
