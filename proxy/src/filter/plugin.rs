//! One loaded filter of one generation: the compiled module pre-linked
//! (`InstancePre`), its spec, and the process-wide state it shares with every
//! other generation of the same filter name (shared data, metrics, stats).
//!
//! Built on the control thread by `FilterRuntime::load`; read-only afterwards
//! (but for its counters) and shared (`Arc`) by every worker's instances of
//! this generation and by the builder threads.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use wasmtime::{Engine, InstancePre};

use super::abi::shared_data::SharedData;
use super::abi::shared_queue::SharedQueues;
use super::engine::Ticker;
use super::host::Host;
use super::metrics::{FilterStats, MetricStore};
use super::worker::Builder;
use super::{FailPolicy, FilterSpec, HostLimits, HttpCallouts};

/// What a VM's host functions need to know about their filter.
pub(crate) struct PluginShared {
    pub name: Arc<str>,
    pub config: Bytes,
    /// Per-route configs (`FilterSpec::route_configs`); config `k` (1..)
    /// belongs to root context `ROOT_ID + k`.
    pub route_configs: Vec<Bytes>,
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
    /// `http_call`s of this filter in flight (all threads; `limits.callouts`).
    pub callouts_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Request-body bytes of those callouts (all threads).
    pub callout_bytes_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The filter was told once (in the log) that it changed a header map
    /// whose head had gone on.
    pub late_header_edit_logged: AtomicBool,
    /// The module exports `proxy_on_request_body` / `proxy_on_response_body`
    /// (request, response): only then can it change a body's length, and
    /// only then does the core hold a head with `content-length` for it.
    pub body_callbacks: [bool; 2],
}

impl PluginShared {
    /// The plugin configuration of config `variant` (0: `[filters.NAME]
    /// config`; k: the k-th per-route one). `None` past the last: never
    /// the filter's own instead, which could be a laxer one.
    pub(crate) fn config_of(&self, variant: u32) -> Option<&Bytes> {
        match variant.checked_sub(1) {
            None => Some(&self.config),
            Some(k) => self.route_configs.get(usize::try_from(k).ok()?),
        }
    }
}

/// The compiler a module's machine code came from (each has its own
/// engine: the compiler is an engine setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Compiler {
    Winch,
    Cranelift,
}

impl Compiler {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compiler::Winch => "winch",
            Compiler::Cranelift => "cranelift",
        }
    }
}

/// A filter's module compiled by one compiler and pre-linked.
pub(crate) struct Code {
    pub engine: Engine,
    pub pre: InstancePre<Host>,
    pub compiler: Compiler,
}

/// Where a generation's background move to Cranelift stands
/// (`[proxy] wasm_compiler = "auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum TierUp {
    /// One compiler only: nothing to do.
    Off = 0,
    Pending = 1,
    Done = 2,
    /// Cranelift failed or rejected the module: Winch keeps serving.
    Failed = 3,
}

impl TierUp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TierUp::Off => "off",
            TierUp::Pending => "pending",
            TierUp::Done => "done",
            TierUp::Failed => "failed",
        }
    }
}

/// Consecutive failed builds from the tiered-up code after which a
/// generation goes back to the code it was loaded with.
pub(crate) const TIERED_FAILURES_FALLBACK: u32 = 3;

/// A filter of one generation.
pub(crate) struct Plugin {
    pub spec: FilterSpec,
    pub shared: Arc<PluginShared>,
    /// The code it was loaded with (and validated on).
    pub code: Code,
    /// The Cranelift code the background tier-up built; set once, after
    /// which new instances come from it (see `worker::Pool::tier_over`).
    pub tiered: OnceLock<Code>,
    /// A [`TierUp`].
    pub tier_up: AtomicU8,
    /// How long the tier-up took (compile or cache load, link, validation).
    pub tier_up_ms: AtomicU64,
    /// Consecutive failed instance builds from the tiered-up code; at
    /// [`TIERED_FAILURES_FALLBACK`] new instances come from `code` again.
    pub tiered_failures: AtomicU32,
    pub sha256: String,
    pub generation: u64,
    /// Epoch ticks of one callback's deadline.
    pub deadline_ticks: u64,
    /// Worker pools of this generation whose last build failed (all workers).
    pub failed_vms: AtomicI64,
    /// The last attempt to build an instance of this generation failed.
    pub rebuild_failing: AtomicBool,
    /// The last VM failure or rebuild error of this generation.
    pub last_error: Mutex<Option<String>>,
    /// Keeps the epoch ticker running while this generation can run code.
    pub _ticker: Arc<Ticker>,
    /// Builds this generation's instances off the request path.
    pub builder: Arc<Builder>,
    /// Instance counts of this generation, all workers together.
    pub counts: InstanceCounts,
}

/// Instance counters and gauges of one generation (shown on `/filters`).
#[derive(Debug, Default)]
pub(crate) struct InstanceCounts {
    /// Instances built (stream and root).
    pub created: AtomicU64,
    /// Instances discarded after a trap, deadline, memory cap or `proc_exit`.
    pub failed: AtomicU64,
    /// Builds that failed (instantiation, start-up callbacks).
    pub build_failures: AtomicU64,
    /// Stream instances alive.
    pub live: AtomicI64,
    /// Stream instances serving at least one stream (refreshed by each
    /// worker every 250 ms).
    pub in_use: AtomicI64,
    /// Streams that shared an instance because the cap was reached.
    pub shared_leases: AtomicU64,
    /// Idle instances of the Winch code freed after the tier-up.
    pub retired: AtomicU64,
    /// Ticks run and ticks skipped for the root CPU budget.
    pub ticks: AtomicU64,
    pub ticks_skipped: AtomicU64,
}

impl InstanceCounts {
    pub(crate) fn json(&self) -> serde_json::Value {
        let live = self.live.load(Ordering::Relaxed).max(0);
        let in_use = self.in_use.load(Ordering::Relaxed).clamp(0, live);
        serde_json::json!({
            "created": self.created.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "build_failures": self.build_failures.load(Ordering::Relaxed),
            "live": live,
            "in_use": in_use,
            "idle": live - in_use,
            "shared_leases": self.shared_leases.load(Ordering::Relaxed),
            "retired_after_tier_up": self.retired.load(Ordering::Relaxed),
            "ticks": self.ticks.load(Ordering::Relaxed),
            "ticks_skipped": self.ticks_skipped.load(Ordering::Relaxed),
        })
    }
}

impl Plugin {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The code new instances are built from: the tiered-up one once ready
    /// (unless its builds kept failing: see [`Plugin::note_tiered_build`]).
    pub(crate) fn serving(&self) -> &Code {
        match self.tiered.get() {
            Some(t) if self.tiered_failures.load(Ordering::Relaxed) < TIERED_FAILURES_FALLBACK => t,
            _ => &self.code,
        }
    }

    /// Counts an instance build from the tiered-up code: after
    /// [`TIERED_FAILURES_FALLBACK`] failures in a row (a full pool is not
    /// the code's fault and does not count) the generation goes back to
    /// the code it was loaded with, for good, with a warning.
    pub(crate) fn note_tiered_build(&self, ok: bool) {
        if ok {
            if self.tiered_failures.load(Ordering::Relaxed) < TIERED_FAILURES_FALLBACK {
                self.tiered_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self
            .tiered_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n == TIERED_FAILURES_FALLBACK {
            self.set_tier_up(TierUp::Failed);
            tracing::warn!(
                filter = %self.name(),
                generation = self.generation,
                failures = n,
                "instances of the Cranelift code keep failing to build; back to Winch"
            );
        }
    }

    pub(crate) fn tier_up(&self) -> TierUp {
        match self.tier_up.load(Ordering::Relaxed) {
            1 => TierUp::Pending,
            2 => TierUp::Done,
            3 => TierUp::Failed,
            _ => TierUp::Off,
        }
    }

    pub(crate) fn set_tier_up(&self, state: TierUp) {
        self.tier_up.store(state as u8, Ordering::Relaxed);
    }

    pub(crate) fn fail_policy(&self) -> FailPolicy {
        self.spec.fail
    }

    pub(crate) fn note_failure(&self, error: &str) {
        tracing::warn!(filter = %self.shared.name, error, "wasm filter instance failed");
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
