//! [`FilterRuntime`]: the process-wide part of the engine. One wasmtime
//! `Engine` per compiler in use (pooling allocator sized from workers x
//! filters x instances x generations, copy-on-write memory images, epoch
//! interruption): Winch, and with `[proxy] wasm_compiler = "auto"` a
//! Cranelift one that filters tier up to in the background. Also the epoch
//! ticker thread, the instance builder threads, the tier-up thread, the
//! module caches, and the per-filter-name registry of state that outlives
//! generations (shared data, guest metrics, call statistics, generation
//! counter, last error).
//!
//! Runs on the control thread (`load`, `render_metrics`, `status_json`); the
//! ticker is its own thread ("wasp-epoch"), one relaxed atomic add per
//! engine per millisecond; the tier-up is its own thread ("wasp-tierup"),
//! one module at a time. Workers never touch the locks here.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig,
};

pub use crate::config::schema::WasmCompiler;

use super::abi;
use super::abi::shared_data::SharedData;
use super::abi::shared_queue::SharedQueues;
use super::cache;
use super::compile::{self, CompileMode};
use super::host::Host;
use super::metrics::{self, FilterStats, MetricStore};
use super::plugin::{Code, Compiler, Plugin, PluginShared, TierUp};
use super::set::FilterSet;
use super::vm::{Failure, Vm};
use super::worker::Builder;
use super::{FilterSpec, HttpCallouts};

/// Epoch tick: the granularity of CPU deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Generations whose instances may be alive at once (the serving one and
/// the ones in-flight requests still finish on, during reloads).
const GENERATIONS: u64 = 3;
/// Least instance slots in the pool (room for filters added by reloads).
const MIN_POOL_INSTANCES: u64 = 1024;
/// Most instance slots (each reserves `POOL_MAX_MEMORY` of address space).
const MAX_POOL_INSTANCES: u64 = 16_384;
/// Slots beyond the computed need: validation instances of `load` and
/// instances on their way from the builder threads.
const POOL_SLACK: u64 = 16;
/// Largest linear memory any VM may reach (per-filter caps are lower).
const POOL_MAX_MEMORY: usize = 1 << 30;

/// State of one filter name that survives reloads.
struct FilterEntry {
    shared: Arc<SharedData>,
    metrics: Arc<MetricStore>,
    stats: Arc<FilterStats>,
    generation: u64,
    latest: Weak<Plugin>,
    module_path: PathBuf,
    sha256: String,
    load_error: Option<String>,
}

impl FilterEntry {
    fn new() -> Self {
        FilterEntry {
            shared: Arc::default(),
            metrics: Arc::default(),
            stats: Arc::default(),
            generation: 0,
            latest: Weak::new(),
            module_path: PathBuf::new(),
            sha256: String::new(),
            load_error: None,
        }
    }
}

/// Stops the epoch ticker when the runtime and every plugin built by it are
/// gone (a deadline must keep firing while any VM can still run).
#[derive(Debug)]
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Times the tier-up's validation instance is retried when the instance
/// pool is full (backing off 0.4-3.2 s): a transient shortage must not
/// keep a filter on Winch for its generation's life.
const TIER_POOL_FULL_RETRIES: u32 = 4;

/// The engines, made together by the first load.
#[derive(Clone)]
struct Engines {
    /// The engine filters load on (and are validated on).
    main: Engine,
    main_compiler: Compiler,
    /// The Cranelift engine filters tier up to (`auto` only).
    tier: Option<Engine>,
    /// Module-cache keys of these engines (entries of others are pruned).
    cache_keys: Vec<String>,
}

/// A generation's module waiting for its Cranelift compile.
/// A filter set loaded and validated but not published yet
/// ([`FilterRuntime::prepare_set`]). Dropped unpublished, it leaves no
/// trace but the module caches (disk, and memory until the next publish
/// prunes it) and what its filters' `proxy_on_configure` wrote into the
/// shared data of a filter already serving (the new version shares it).
#[must_use = "a prepared set serves nothing until published"]
pub struct PreparedSet {
    runtime: Arc<FilterRuntime>,
    set: Arc<FilterSet>,
    tier_jobs: Vec<TierJob>,
}

impl PreparedSet {
    /// The set, to build a snapshot with before publishing it.
    pub fn set(&self) -> &Arc<FilterSet> {
        &self.set
    }

    /// Names the set's filters as the latest versions (registry, module
    /// cache, tier-up). Cannot fail: the last step of a reload.
    pub fn publish(self) -> Arc<FilterSet> {
        self.runtime.publish(&self.set, self.tier_jobs);
        self.set
    }
}

struct TierJob {
    plugin: Weak<Plugin>,
    bytes: Vec<u8>,
    /// How its load compiled (a reload's limits apply to its tier-up).
    mode: CompileMode,
}

/// The tier-up thread's work: at most one job per filter name (the latest
/// generation's; a reload replaces a waiting job, so a reload loop or
/// filters.d churn cannot pile up copies of modules), in load order.
#[derive(Default)]
struct TierQueue {
    jobs: Vec<(Arc<str>, TierJob)>,
    started: bool,
    /// Shutdown: the thread ends after the job it is on.
    stop: bool,
}

#[derive(Default)]
struct TierJobs {
    queue: Mutex<TierQueue>,
    ready: Condvar,
}

impl TierJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, TierQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks for the next job; `None` once stopped.
    fn next(&self) -> Option<TierJob> {
        let mut q = self.lock();
        loop {
            if q.stop {
                return None;
            }
            if !q.jobs.is_empty() {
                return Some(q.jobs.remove(0).1);
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stopped(&self) -> bool {
        self.lock().stop
    }
}

/// The process-wide filter engine.
pub struct FilterRuntime {
    /// Created on first use, so a proxy without filters never pays for the
    /// compiler's set-up, its code pages or the epoch ticker's wake-ups.
    /// Only loads and the tier-up thread use it, so a lock is no cost here.
    engines: Mutex<Option<Engines>>,
    /// `[proxy] wasm_compiler` (`WASP_WASM_COMPILER` overrides it); read
    /// when the engines are made.
    compiler: Mutex<WasmCompiler>,
    /// In this process (default) or in a child (`wasp run`); read by each
    /// load, so a reload's `[proxy] wasm_compile_*` limits apply to it.
    compile_mode: Mutex<CompileMode>,
    cache_dir: Option<PathBuf>,
    callouts: Arc<dyn HttpCallouts>,
    /// Compiled modules by sha256 and compiler: the versions serving and
    /// those they replaced (see `load`).
    modules: Mutex<HashMap<(String, Compiler), Module>>,
    /// Feeds the tier-up thread (started by the first load that needs it).
    tier_jobs: Arc<TierJobs>,
    queues: Arc<SharedQueues>,
    filters: Mutex<BTreeMap<String, FilterEntry>>,
    /// Names that never loaded: the module path and error of their last
    /// failed load, for `/filters`. Kept apart from `filters` so a failed
    /// load or reload creates no entry (shared data, metric store, stats)
    /// for a filter that never served. Locked after `filters`.
    never_loaded: Mutex<BTreeMap<String, (PathBuf, String)>>,
    next_set: AtomicU64,
    ticker: Arc<Ticker>,
    /// Worker threads that keep instances (sizes the pool).
    workers: AtomicUsize,
    /// Instance slots of the engine's pool, fixed when the engine is created.
    capacity: AtomicU64,
    /// Builds instances off the request path; started with the engine.
    builder: Mutex<Option<Arc<Builder>>>,
}

impl std::fmt::Debug for FilterRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterRuntime")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// Instance slots a filter set needs on `workers` workers at once: each
/// worker keeps up to `limits.instances` stream instances and one root
/// instance of every filter.
pub(crate) fn instances_needed(specs: &[FilterSpec], workers: usize) -> u64 {
    let per_worker: u64 = specs
        .iter()
        .map(|s| u64::from(s.instances.max(1)) + 1)
        .sum();
    per_worker.saturating_mul(workers.max(1) as u64)
}

/// Pool slots for a first load needing `need` at once: room for
/// [`GENERATIONS`] of it, and never less than [`MIN_POOL_INSTANCES`].
fn pool_capacity(need: u64) -> u64 {
    need.saturating_mul(GENERATIONS)
        .saturating_add(POOL_SLACK)
        .clamp(
            min_pool_instances().min(MAX_POOL_INSTANCES),
            MAX_POOL_INSTANCES,
        )
}

/// [`MIN_POOL_INSTANCES`], or `WASP_WASM_POOL_MIN_INSTANCES` from the
/// environment. Each slot reserves address space (not memory) for a
/// filter's largest linear memory, so the default reserves about half a
/// TiB: fine on Linux, too much where the address space is capped, e.g.
/// under valgrind (bench/instructions.sh sets it to 1; the pool is then
/// sized from the config alone, and reloads that add filters past it fail).
fn min_pool_instances() -> u64 {
    std::env::var("WASP_WASM_POOL_MIN_INSTANCES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(MIN_POOL_INSTANCES)
}

pub(crate) fn engine_config(instances: u32, compiler: Compiler) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(instances)
        .total_memories(instances)
        .total_tables(instances)
        .max_memory_size(POOL_MAX_MEMORY);
    let mut cfg = Config::new();
    // Winch, wasmtime's baseline compiler, compiles in one pass: a 190 KB
    // module takes ~40 ms where Cranelift (opt level `speed`) takes ~300 ms
    // (2 loaded cores; `compile_cost` in the tests). That is the cold part
    // of a hot reload, so filters load on Winch; Cranelift's code saves
    // ~2k instructions per filter per request (docs/benchmarks.md), so
    // with `auto` they move to it once a background compile is done. The
    // compiler is an engine setting: one engine (and pool) per compiler.
    // wasmtime is built without `parallel-compilation`: a compile runs on
    // the calling thread alone, which keeps the tier-up to one core and
    // its peak memory to one function's compile at a time.
    cfg.strategy(match compiler {
        Compiler::Winch => wasmtime::Strategy::Winch,
        Compiler::Cranelift => wasmtime::Strategy::Cranelift,
    });
    // Copy-on-write memory images (wasmtime's default, stated because the
    // per-stream instances rely on it): instantiating maps the module's
    // initial memory instead of copying it, so a new instance costs ~tens
    // of microseconds and only the pages a guest writes become its own.
    cfg.memory_init_cow(true);
    cfg.epoch_interruption(true)
        .memory_reservation(POOL_MAX_MEMORY as u64)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    cfg
}

/// `configured`, unless `WASP_WASM_COMPILER` (`auto`, `winch` or
/// `cranelift`) says otherwise: benches compare compilers with one config
/// (bench/instructions.sh).
/// Logs the compiler in effect and where it came from (`/config` shows the
/// file's value), and warns on an unknown `WASP_WASM_COMPILER`.
fn effective_compiler(configured: WasmCompiler) -> WasmCompiler {
    let name = |c: WasmCompiler| match c {
        WasmCompiler::Auto => "auto",
        WasmCompiler::Winch => "winch",
        WasmCompiler::Cranelift => "cranelift",
    };
    let env = std::env::var("WASP_WASM_COMPILER").ok();
    let from_env = match env.as_deref() {
        None => None,
        Some("auto") => Some(WasmCompiler::Auto),
        Some("winch") => Some(WasmCompiler::Winch),
        Some("cranelift") => Some(WasmCompiler::Cranelift),
        Some(other) => {
            tracing::warn!(
                value = other,
                configured = name(configured),
                "WASP_WASM_COMPILER is not auto, winch or cranelift: ignored"
            );
            None
        }
    };
    match from_env {
        Some(c) => {
            tracing::info!(
                compiler = name(c),
                configured = name(configured),
                "wasm compiler from WASP_WASM_COMPILER (overrides [proxy] wasm_compiler)"
            );
            c
        }
        None => {
            tracing::info!(
                compiler = name(configured),
                "wasm compiler from [proxy] wasm_compiler"
            );
            configured
        }
    }
}

/// `WASP_WASM_TIER_UP_DELAY_MS`: a test knob, not a setting: the tier-up
/// thread waits this long before each job, so tests can reload while a
/// tier-up is pending (and benches can count Winch and Cranelift in one
/// run). Zero by default; logged when set.
fn tier_up_delay() -> Duration {
    std::env::var("WASP_WASM_TIER_UP_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |ms| {
            tracing::info!(
                ms,
                "WASP_WASM_TIER_UP_DELAY_MS (test knob) delays each tier-up"
            );
            Duration::from_millis(ms)
        })
}

/// The module-cache keys of both compilers' engines of this build, whichever
/// this process runs: pruning by them keeps another process's artefacts
/// (an `auto` server's Cranelift code, seen from `wasp filter test` or a
/// `winch` server sharing the cache) and drops only other wasmtime
/// versions or settings. Empty (prune nothing) if a key cannot be made.
fn cache_keys(main: &Engine, main_compiler: Compiler, tier: Option<&Engine>) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    for compiler in [Compiler::Winch, Compiler::Cranelift] {
        let engine = if compiler == main_compiler {
            Some(main.clone())
        } else if let Some(t) = tier {
            Some(t.clone())
        } else {
            // The pool's size is not part of the key (a one-slot pool
            // reserves next to nothing).
            Engine::new(&engine_config(1, compiler)).ok()
        };
        match engine {
            Some(e) => keys.push(cache::engine_key(&e)),
            None => return Vec::new(),
        }
    }
    keys
}

/// Pre-links `module` with the host functions (unknown imports stubbed).
fn link(module: &Module) -> anyhow::Result<InstancePre<Host>> {
    let mut linker: Linker<Host> = Linker::new(module.engine());
    abi::link(&mut linker).map_err(|e| anyhow!("linking host functions: {e:#}"))?;
    abi::stub_unknown(&mut linker, module).map_err(|e| anyhow!("linking: {e:#}"))?;
    linker
        .instantiate_pre(module)
        .map_err(|e| anyhow!("linking: {e:#}"))
}

impl FilterRuntime {
    /// Creates the engine and starts the epoch ticker. `cache_dir`: where
    /// compiled modules are kept (created on first write); `None` disables
    /// the disk cache.
    pub fn new(
        cache_dir: Option<PathBuf>,
        callouts: Arc<dyn HttpCallouts>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(FilterRuntime {
            engines: Mutex::new(None),
            // Embedders (`wasp filter test`, unit tests) get one compiler;
            // the server sets `[proxy] wasm_compiler`.
            compiler: Mutex::new(WasmCompiler::Winch),
            // Embedders' executables are not wasp: they compile here.
            compile_mode: Mutex::new(CompileMode::InProcess),
            cache_dir,
            callouts,
            modules: Mutex::new(HashMap::new()),
            tier_jobs: Arc::default(),
            queues: Arc::default(),
            filters: Mutex::new(BTreeMap::new()),
            never_loaded: Mutex::new(BTreeMap::new()),
            next_set: AtomicU64::new(1),
            ticker: Arc::new(Ticker {
                stop: Arc::new(AtomicBool::new(false)),
            }),
            workers: AtomicUsize::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
            capacity: AtomicU64::new(0),
            builder: Mutex::new(None),
        }))
    }

    /// How many worker threads will keep instances of every filter (the
    /// pool is sized from it at the first load). Defaults to the core count.
    pub fn set_workers(&self, workers: usize) {
        self.workers.store(workers.max(1), Ordering::Relaxed);
    }

    /// Which compiler(s) filters run on (`[proxy] wasm_compiler`). Takes
    /// effect at the first load, which makes the engines.
    pub fn set_compiler(&self, compiler: WasmCompiler) {
        *self.compiler.lock().unwrap_or_else(|e| e.into_inner()) = compiler;
    }

    /// Where loads from now on compile modules (the server: a child
    /// process with `[proxy] wasm_compile_*` limits). A tier-up compiles
    /// the way its generation's load did.
    pub fn set_compile_mode(&self, mode: CompileMode) {
        *self.compile_mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    fn compile_mode(&self) -> CompileMode {
        self.compile_mode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks that `specs` fit the engine's instance pool (sizing it on the
    /// first load): a config that cannot fit is an error now, not 503s later.
    fn check_capacity(&self, specs: &[FilterSpec]) -> anyhow::Result<()> {
        let workers = self.workers.load(Ordering::Relaxed);
        let need = instances_needed(specs, workers);
        let capacity = match self.capacity.load(Ordering::Relaxed) {
            0 => {
                let c = pool_capacity(need);
                self.capacity.store(c, Ordering::Relaxed);
                c
            }
            c => c,
        };
        if need.saturating_mul(GENERATIONS) > capacity {
            bail!(
                "the filters need up to {need} wasm instances at once ({workers} workers x the sum over filters of (limits.instances + 1 root)), {} with reloads in flight, but the instance pool holds {capacity} (sized at start-up{}); lower limits.instances or restart wasp to resize the pool",
                need.saturating_mul(GENERATIONS),
                if capacity >= MAX_POOL_INSTANCES { ", at its maximum" } else { "" },
            );
        }
        Ok(())
    }

    fn builder(&self) -> Arc<Builder> {
        let mut slot = self.builder.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| {
            // Two threads: a slow on_configure does not hold up every build,
            // and builds leave the cores to the workers.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
            Builder::start(threads)
        })
        .clone()
    }

    /// The engines, created (with their epoch ticker) by the first filter
    /// load. They are published only once the ticker runs: an engine
    /// without one would never interrupt a guest that loops.
    fn engines(&self) -> anyhow::Result<Engines> {
        let mut slot = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engines) = &*slot {
            return Ok(engines.clone());
        }
        let capacity = self.capacity.load(Ordering::Relaxed);
        let capacity = if capacity == 0 {
            min_pool_instances().max(1)
        } else {
            capacity
        };
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        let compiler = effective_compiler(*self.compiler.lock().unwrap_or_else(|e| e.into_inner()));
        let main_compiler = match compiler {
            WasmCompiler::Cranelift => Compiler::Cranelift,
            WasmCompiler::Auto | WasmCompiler::Winch => Compiler::Winch,
        };
        let main = Engine::new(&engine_config(capacity, main_compiler))
            .map_err(|e| anyhow!("creating the wasm engine: {e:#}"))?;
        // The second pool is sized as the first: after a tier-up every
        // instance of the first lives in the second. It costs address
        // space (a reservation per slot), not memory.
        let tier = match compiler {
            WasmCompiler::Auto => {
                match Engine::new(&engine_config(capacity, Compiler::Cranelift)) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the Cranelift engine; filters stay on Winch");
                        None
                    }
                }
            }
            WasmCompiler::Winch | WasmCompiler::Cranelift => None,
        };
        let ticking: Vec<Engine> = std::iter::once(main.clone()).chain(tier.clone()).collect();
        let stop = self.ticker.stop.clone();
        std::thread::Builder::new()
            .name("wasp-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for e in &ticking {
                        e.increment_epoch();
                    }
                }
            })
            .context("spawning the epoch ticker")?;
        let cache_keys = cache_keys(&main, main_compiler, tier.as_ref());
        Ok(slot
            .insert(Engines {
                main,
                main_compiler,
                tier,
                cache_keys,
            })
            .clone())
    }

    /// Call once on each worker thread before its first request, so the
    /// first wasm call does not pay wasmtime's thread-local setup.
    pub fn init_worker_thread() {
        Engine::tls_eager_initialize();
    }

    fn cached_module(&self, sha: &str, compiler: Compiler) -> Option<Module> {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(sha.to_string(), compiler))
            .cloned()
    }

    fn keep_module(&self, sha: &str, compiler: Compiler, module: &Module) {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sha.to_string(), compiler), module.clone());
    }

    /// With a tier-up, the module's Cranelift code if it is in memory or
    /// in the disk cache (never compiled here: loads stay on Winch's time).
    fn tiered_module(&self, engines: &Engines, sha: &str) -> Option<Module> {
        let engine = engines.tier.as_ref()?;
        if let Some(m) = self.cached_module(sha, Compiler::Cranelift) {
            return Some(m);
        }
        let m = cache::load_cached(engine, sha, self.cache_dir.as_deref()?)?;
        self.keep_module(sha, Compiler::Cranelift, &m);
        Some(m)
    }

    /// The module compiled by `engines.main` (memory, disk cache, compile).
    fn module(
        &self,
        engines: &Engines,
        bytes: &[u8],
        sha: &str,
        mode: &CompileMode,
    ) -> anyhow::Result<Module> {
        if let Some(m) = self.cached_module(sha, engines.main_compiler) {
            return Ok(m);
        }
        let m = cache::load_or_compile(
            &engines.main,
            bytes,
            sha,
            self.cache_dir.as_deref(),
            &engines.cache_keys,
            |engine, bytes| compile::compile(mode, engine, engines.main_compiler, bytes),
        )?;
        self.keep_module(sha, engines.main_compiler, &m);
        Ok(m)
    }

    /// Compiles (or loads from cache) and validates each spec by
    /// instantiating it once and running `proxy_on_context_create(root)`,
    /// `proxy_on_vm_start` and `proxy_on_configure`, then publishes the
    /// set ([`PreparedSet::publish`]). The error names the filter and says
    /// why; on error nothing is published.
    pub fn load(self: &Arc<Self>, specs: Vec<FilterSpec>) -> anyhow::Result<Arc<FilterSet>> {
        Ok(self.prepare_set(specs)?.publish())
    }

    /// As [`Self::load`] without publishing: the set can serve, but the
    /// registry (`/filters`, the versions a reload compares with, the
    /// per-name shared data and metrics of a name new to it) and the
    /// tier-up queue learn of it only when it is published, which cannot
    /// fail. A reload does every other step that can fail in between, so a
    /// failed reload leaves them as they were, apart from the error of the
    /// filter that failed to load (shown on `/filters`). The in-memory
    /// module cache is filled as modules compile (a retry of the same
    /// reload is then a map hit) and pruned to the serving versions by the
    /// next publish.
    pub fn prepare_set(self: &Arc<Self>, specs: Vec<FilterSpec>) -> anyhow::Result<PreparedSet> {
        self.check_capacity(&specs)?;
        let mut plugins: Vec<Arc<Plugin>> = Vec::with_capacity(specs.len());
        let mut tier_jobs: Vec<TierJob> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mode = self.compile_mode();
        for spec in specs {
            if !seen.insert(spec.name.clone()) {
                bail!("filter \"{}\" is declared twice", spec.name);
            }
            let name = spec.name.clone();
            let module_path = spec.module_path.clone();
            match self.prepare(spec, &mode) {
                Ok((p, bytes)) => {
                    if p.tier_up() == TierUp::Pending {
                        tier_jobs.push(TierJob {
                            plugin: Arc::downgrade(&p),
                            bytes,
                            mode: mode.clone(),
                        });
                    }
                    plugins.push(p);
                }
                Err(e) => {
                    let msg = format!("filter \"{name}\": {e:#}");
                    let mut reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
                    match reg.get_mut(&name) {
                        Some(e) => e.load_error = Some(msg.clone()),
                        None => {
                            self.never_loaded
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name, (module_path, msg.clone()));
                        }
                    }
                    return Err(anyhow!(msg));
                }
            }
        }
        let id = self.next_set.fetch_add(1, Ordering::Relaxed);
        Ok(PreparedSet {
            runtime: self.clone(),
            set: Arc::new(FilterSet::new(id, plugins)),
            tier_jobs,
        })
    }

    /// Names `set`'s filters as the latest versions, and queues their
    /// tier-up.
    fn publish(self: &Arc<Self>, set: &FilterSet, tier_jobs: Vec<TierJob>) {
        let plugins = &set.plugins;
        let mut reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        // Compiled modules stay in memory for the versions now serving and
        // the ones they replace (a quick roll-back is a map hit); older ones
        // are dropped and, if ever needed again, come back from the disk
        // cache in a few milliseconds.
        let mut keep: std::collections::HashSet<String> =
            reg.values().map(|e| e.sha256.clone()).collect();
        keep.extend(plugins.iter().map(|p| p.sha256.clone()));
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(sha, _), _| keep.contains(sha));
        // A published set is the whole config's (start-up or reload): a
        // name that failed before is now either loaded or no longer
        // configured, so no failure of a never-loaded filter stays shown.
        let mut never_loaded = self.never_loaded.lock().unwrap_or_else(|e| e.into_inner());
        never_loaded.clear();
        for p in plugins {
            // A name new to the registry keeps the state its plugin was
            // prepared with.
            let e = reg
                .entry(p.name().to_string())
                .or_insert_with(|| FilterEntry {
                    shared: p.shared.shared.clone(),
                    metrics: p.shared.metrics.clone(),
                    stats: p.shared.stats.clone(),
                    ..FilterEntry::new()
                });
            e.generation = p.generation;
            e.latest = Arc::downgrade(p);
            e.module_path = p.spec.module_path.clone();
            e.sha256 = p.sha256.clone();
            e.load_error = None;
        }
        drop(never_loaded);
        drop(reg);
        // Queued once the registry names these generations: the tier-up
        // drops a job whose generation is no longer the latest.
        for job in tier_jobs {
            let Some(name) = job.plugin.upgrade().map(|p| p.name().clone()) else {
                continue;
            };
            self.queue_tier_up(name, job);
        }
    }

    /// Hands `job` to the tier-up thread (started on first use), in place
    /// of a job of the same filter still waiting. A job that cannot be
    /// queued leaves its filter on Winch.
    fn queue_tier_up(self: &Arc<Self>, name: Arc<str>, job: TierJob) {
        let mut q = self.tier_jobs.lock();
        if q.stop {
            return;
        }
        if !q.started {
            let runtime = Arc::downgrade(self);
            let jobs = self.tier_jobs.clone();
            let spawned = std::thread::Builder::new()
                .name("wasp-tierup".into())
                .spawn(move || {
                    let delay = tier_up_delay();
                    while let Some(job) = jobs.next() {
                        if !delay.is_zero() {
                            std::thread::sleep(delay);
                        }
                        if jobs.stopped() {
                            return;
                        }
                        let Some(runtime) = runtime.upgrade() else {
                            return;
                        };
                        runtime.tier_up(job);
                    }
                });
            match spawned {
                Ok(_) => q.started = true,
                Err(e) => {
                    tracing::warn!("cannot start the tier-up thread: {e}; filters stay on Winch");
                    if let Some(p) = job.plugin.upgrade() {
                        p.set_tier_up(TierUp::Failed);
                    }
                    return;
                }
            }
        }
        if let Some(pos) = q.jobs.iter().position(|(n, _)| *n == name) {
            let (_, stale) = q.jobs.remove(pos);
            if let Some(p) = stale.plugin.upgrade() {
                tracing::info!(filter = %name, generation = p.generation, "tier-up dropped: superseded by a reload");
            }
        }
        q.jobs.push((name, job));
        self.tier_jobs.ready.notify_one();
    }

    /// Shutdown: no tier-up starts from now on (one running finishes; its
    /// result goes unused). Filters keep serving on the code they run.
    pub fn stop_tier_up(&self) {
        let mut q = self.tier_jobs.lock();
        q.stop = true;
        q.jobs.clear();
        self.tier_jobs.ready.notify_all();
    }

    /// Jobs waiting for the tier-up thread (not the one it runs).
    #[cfg(test)]
    pub(crate) fn tier_jobs_waiting(&self) -> usize {
        self.tier_jobs.lock().jobs.len()
    }

    /// Whether a newer generation of `plugin`'s filter was loaded since.
    fn superseded(&self, plugin: &Plugin) -> bool {
        let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        reg.get(&**plugin.name())
            .is_none_or(|e| e.generation != plugin.generation)
    }

    /// On the tier-up thread: compiles `job`'s module with Cranelift (or
    /// loads it from the caches), validates it with a throw-away instance
    /// as `load` does, and publishes it to the generation's pools. Never
    /// holds a lock while compiling, so loads and reloads do not wait for
    /// it; a generation superseded before or during the compile is dropped.
    fn tier_up(&self, job: TierJob) {
        let Some(plugin) = job.plugin.upgrade() else {
            tracing::info!("tier-up dropped: its generation is gone");
            return;
        };
        let name = plugin.name().clone();
        if self.superseded(&plugin) {
            tracing::info!(filter = %name, generation = plugin.generation, "tier-up dropped: superseded by a reload");
            return;
        }
        let engines = match self.engines() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(filter = %name, error = %e, "tier-up to Cranelift failed; Winch keeps serving");
                plugin.set_tier_up(TierUp::Failed);
                return;
            }
        };
        let Some(engine) = engines.tier.clone() else {
            plugin.set_tier_up(TierUp::Off);
            return;
        };
        let started = Instant::now();
        let sha = plugin.sha256.clone();
        // A compiler panic (a wasmtime bug) must not end the thread or
        // the process: the filter stays on Winch.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let module = match self.cached_module(&sha, Compiler::Cranelift) {
                Some(m) => m,
                None => {
                    let m = cache::load_or_compile(
                        &engine,
                        &job.bytes,
                        &sha,
                        self.cache_dir.as_deref(),
                        &engines.cache_keys,
                        |engine, bytes| {
                            compile::compile(&job.mode, engine, Compiler::Cranelift, bytes)
                        },
                    );
                    cache::return_freed_memory();
                    m?
                }
            };
            let pre = link(&module)?;
            if self.tier_jobs.stopped() {
                bail!("shutting down");
            }
            let code = Code {
                engine: engine.clone(),
                pre,
                compiler: Compiler::Cranelift,
            };
            // Validate as `load` does: a throw-away VM runs the whole
            // start-up sequence on the new code. A full instance pool is
            // no fault of the code: retry a few times, backing off.
            let mut attempt: u32 = 0;
            loop {
                match Vm::with_code(&plugin, &code, None) {
                    Ok(_) => break,
                    Err(Failure::PoolFull(msg)) if attempt < TIER_POOL_FULL_RETRIES => {
                        attempt += 1;
                        tracing::info!(filter = %plugin.name(), attempt, "tier-up validation: instance pool full ({msg}); retrying");
                        std::thread::sleep(Duration::from_millis(200u64 << attempt.min(4)));
                        if self.tier_jobs.stopped() || self.superseded(&plugin) {
                            bail!("shutting down or superseded");
                        }
                    }
                    Err(f) => bail!("{f}"),
                }
            }
            Ok::<_, anyhow::Error>((module, code))
        }))
        .unwrap_or_else(|_| Err(anyhow!("the compiler panicked")));
        let (module, code) = match built {
            Ok(b) => b,
            Err(_) if self.tier_jobs.stopped() => {
                tracing::info!(filter = %name, "tier-up dropped: shutting down");
                return;
            }
            Err(e) => {
                tracing::warn!(filter = %name, generation = plugin.generation, error = %format!("{e:#}"), "tier-up to Cranelift failed; Winch keeps serving");
                plugin.set_tier_up(TierUp::Failed);
                return;
            }
        };
        if self.superseded(&plugin) {
            tracing::info!(filter = %name, generation = plugin.generation, "tier-up dropped: superseded by a reload");
            return;
        }
        self.keep_module(&sha, Compiler::Cranelift, &module);
        if plugin.tiered.set(code).is_ok() {
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            plugin.tier_up_ms.store(ms, Ordering::Relaxed);
            plugin.set_tier_up(TierUp::Done);
            tracing::info!(filter = %name, generation = plugin.generation, ms, "filter tiered up to Cranelift");
        }
    }

    /// The plugin, and the module's bytes when a tier-up is to follow.
    fn prepare(
        &self,
        spec: FilterSpec,
        mode: &CompileMode,
    ) -> anyhow::Result<(Arc<Plugin>, Vec<u8>)> {
        let bytes = std::fs::read(&spec.module_path)
            .with_context(|| format!("reading {}", spec.module_path.display()))?;
        let sha = cache::sha256_hex(&bytes);
        let engines = self.engines()?;
        // Already tiered up once (a reload of an unchanged module, or a
        // restart with the disk cache): start on the Cranelift code.
        let tiered = self.tiered_module(&engines, &sha);
        let (module, compiler) = match tiered {
            Some(m) => (m, Compiler::Cranelift),
            None => (
                self.module(&engines, &bytes, &sha, mode)?,
                engines.main_compiler,
            ),
        };
        let has = |n: &str| module.get_export(n).is_some();
        if !has("proxy_abi_version_0_2_1") && !has("proxy_abi_version_0_2_0") {
            bail!(
                "{} exports neither proxy_abi_version_0_2_1 nor proxy_abi_version_0_2_0 (not a Proxy-Wasm 0.2 module)",
                spec.module_path.display()
            );
        }
        if !has("proxy_on_memory_allocate") && !has("malloc") {
            bail!("missing export proxy_on_memory_allocate (or malloc)");
        }
        let pre = link(&module)?;

        // A name already registered shares its state with the new version
        // (so its `proxy_on_configure` may write shared data the serving
        // version reads, even if this load fails); a new name gets its own,
        // registered only when published.
        let (shared_data, metric_store, stats, generation) = {
            let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
            match reg.get(&spec.name) {
                Some(e) => (
                    e.shared.clone(),
                    e.metrics.clone(),
                    e.stats.clone(),
                    e.generation.saturating_add(1),
                ),
                None => (Arc::default(), Arc::default(), Arc::default(), 1),
            }
        };
        let deadline_ticks =
            (spec.cpu_limit.as_micros() / EPOCH_TICK.as_micros().max(1)) as u64 + 1;
        let plugin = Arc::new(Plugin {
            shared: Arc::new(PluginShared {
                name: Arc::from(spec.name.as_str()),
                config: spec.config.clone(),
                route_configs: spec.route_configs.clone(),
                vm_config: spec.vm_config.clone(),
                shared: shared_data,
                queues: self.queues.clone(),
                metrics: metric_store,
                stats,
                callouts: self.callouts.clone(),
                limits: spec.host_limits.clone(),
                max_body_bytes: spec.max_body_bytes,
                callouts_in_flight: Arc::default(),
                callout_bytes_in_flight: Arc::default(),
                late_header_edit_logged: AtomicBool::new(false),
                body_callbacks: [has("proxy_on_request_body"), has("proxy_on_response_body")],
            }),
            code: Code {
                engine: module.engine().clone(),
                pre,
                compiler,
            },
            tiered: OnceLock::new(),
            tier_up: AtomicU8::new(if engines.tier.is_none() {
                TierUp::Off as u8
            } else if compiler == Compiler::Cranelift {
                TierUp::Done as u8
            } else {
                TierUp::Pending as u8
            }),
            tier_up_ms: AtomicU64::new(0),
            tiered_failures: AtomicU32::new(0),
            sha256: sha,
            generation,
            deadline_ticks: deadline_ticks.max(2),
            failed_vms: Default::default(),
            rebuild_failing: Default::default(),
            last_error: Mutex::new(None),
            _ticker: self.ticker.clone(),
            builder: self.builder(),
            counts: Default::default(),
            spec,
        });
        // Validate: a throw-away VM runs the whole start-up sequence.
        let vm = Vm::new(&plugin, None).map_err(|f| anyhow!("{f}"))?;
        drop(vm);
        let bytes = if plugin.tier_up() == TierUp::Pending {
            bytes
        } else {
            Vec::new()
        };
        Ok((plugin, bytes))
    }

    /// Prometheus text of guest-defined metrics and per filter+phase stats.
    pub fn render_metrics(&self, out: &mut String) {
        let list: Vec<_> = {
            let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
            reg.iter()
                .map(|(n, e)| (n.clone(), e.stats.clone(), e.metrics.clone()))
                .collect()
        };
        metrics::render(out, &list);
        self.render_compilers(out);
    }

    /// `wasp_filter_compiler{filter,compiler} 1`: the compiler whose code
    /// new instances of each loaded filter run.
    fn render_compilers(&self, out: &mut String) {
        use std::fmt::Write as _;
        let serving: Vec<(String, &'static str)> = {
            let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
            reg.iter()
                .filter_map(|(n, e)| {
                    let p = e.latest.upgrade()?;
                    Some((n.clone(), p.serving().compiler.name()))
                })
                .collect()
        };
        let name = "wasp_filter_compiler";
        let _ = writeln!(
            out,
            "# HELP {name} The compiler whose code new instances of the filter run (winch, or cranelift once tiered up)."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (filter, compiler) in serving {
            let f = metrics::label(&filter);
            let _ = writeln!(out, "{name}{{filter=\"{f}\",compiler=\"{compiler}\"}} 1");
        }
    }

    /// Each filter's name, module path, module sha256, generation, state
    /// (`ok` / `rebuilding` / `failed`; `failed` also when it never loaded),
    /// VMs currently down (`failed_vms`, all workers), fail policy and last
    /// error, as a JSON array.
    pub fn status_json(&self) -> serde_json::Value {
        let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let never_loaded: Vec<serde_json::Value> = self
            .never_loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(name, _)| !reg.contains_key(*name))
            .map(|(name, (module, error))| {
                serde_json::json!({
                    "name": name,
                    "module": module.display().to_string(),
                    "sha256": "",
                    "generation": 0,
                    "state": "failed",
                    "failed_vms": 0,
                    "fail": null,
                    "last_error": error,
                    "compiler": null,
                    "tier_up": null,
                    "tier_up_ms": null,
                    "instances": null,
                    "limits": null,
                })
            })
            .collect();
        let mut list: Vec<serde_json::Value> = reg
            .iter()
            .map(|(name, e)| {
                let plugin = e.latest.upgrade();
                let state = match &plugin {
                    Some(p) => p.state(),
                    None if e.load_error.is_some() => "failed",
                    None => "unloaded",
                };
                let last_error = e
                    .load_error
                    .clone()
                    .or_else(|| plugin.as_ref().and_then(|p| p.last_error()));
                serde_json::json!({
                    "name": name,
                    "module": e.module_path.display().to_string(),
                    "sha256": e.sha256,
                    "generation": e.generation,
                    "state": state,
                    "failed_vms": plugin
                        .as_ref()
                        .map(|p| p.failed_vms.load(Ordering::Relaxed).max(0))
                        .unwrap_or(0),
                    "fail": plugin.as_ref().map(|p| match p.fail_policy() {
                        super::FailPolicy::Open => "open",
                        super::FailPolicy::Closed => "closed",
                    }),
                    "last_error": last_error,
                    "compiler": plugin.as_ref().map(|p| p.serving().compiler.name()),
                    "tier_up": plugin.as_ref().map(|p| p.tier_up().name()),
                    "tier_up_ms": plugin.as_ref().and_then(|p| {
                        (p.tier_up() == TierUp::Done).then(|| p.tier_up_ms.load(Ordering::Relaxed))
                    }),
                    "instances": plugin.as_ref().map(|p| p.counts.json()),
                    "limits": plugin.as_ref().map(|p| serde_json::json!({
                        "instances": p.spec.instances.max(1),
                        "tick_min_ms": p.spec.tick_min.as_millis() as u64,
                        "root_cpu_ms": p.spec.root_cpu.as_millis() as u64,
                    })),
                })
            })
            .collect();
        list.extend(never_loaded);
        list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::Value::Array(list)
    }

    #[cfg(test)]
    pub(crate) fn stats_of(&self, name: &str) -> Option<Arc<FilterStats>> {
        let reg = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        reg.get(name).map(|e| e.stats.clone())
    }
}
