//! The process: the control thread, the workers, snapshots and shutdown.
//!
//! The control thread (the main thread, a current-thread tokio runtime) owns
//! the admin server and signals, and publishes [`Snapshot`]s through
//! `arc-swap`. Each worker is a thread with its own current-thread runtime,
//! its own listening sockets and its own upstream pools; workers read the
//! snapshot once per request and otherwise share nothing.
//!
//! Shutdown ordering (SIGTERM, SIGINT or `POST /shutdown`): `/ready` fails
//! at once; inbound listeners keep serving for `drain_delay` so load
//! balancers notice, then stop accepting and drain; the outbound listener
//! (the app's HTTP proxy) keeps working until the app has exited (wrapper
//! mode) so the app can finish its own calls, then drains too. In-flight
//! requests get up to `drain_timeout`. The process exits 0, or with the
//! app's exit code in wrapper mode.

mod app;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use app::AppSpec;

/// For the CLI's default value.
pub const fn app_default_proxy_listener() -> &'static str {
    app::DEFAULT_PROXY_LISTENER
}
pub use crate::snapshot::Snapshot;

use crate::config::{Config, FailMode};
use crate::filter::{FailPolicy, FilterRuntime, FilterSpec};
use crate::snapshot::Compiled;
use crate::telemetry::logging::LevelHandle;
use crate::telemetry::Metrics;
use crate::upstream::Upstreams;

/// State shared by the control thread and every worker.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    /// Listeners bound and everything loaded; false again once draining.
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Turns true when a shutdown starts (signal or admin); the control
    /// thread then runs the drain sequence.
    pub shutdown: watch::Sender<bool>,
    /// Tell inbound / outbound listeners to stop accepting and drain.
    pub drain_inbound: watch::Sender<bool>,
    pub drain_outbound: watch::Sender<bool>,
    pub log_level: Option<LevelHandle>,
    pub started: std::time::Instant,
    /// The Wasm engine: compiled modules, filter metrics and status.
    pub filters: Arc<FilterRuntime>,
    /// Last reload outcome, for `/reload` and `/config` (control thread).
    pub reload_status: std::sync::Mutex<crate::reload::Status>,
    pub reload_failures: std::sync::atomic::AtomicU64,
    /// Asks the reload loop for a reload (set once the loop runs).
    pub reload: std::sync::OnceLock<crate::reload::Requests>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("generation", &self.snapshot.load().generation)
            .finish()
    }
}

impl Shared {
    /// Starts a graceful shutdown; safe to call more than once.
    pub fn begin_shutdown(&self, why: &str) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("shutting down ({why}): draining in-flight requests");
            self.ready.store(false, Ordering::Release);
            self.shutdown.send_replace(true);
        }
    }
}

thread_local! {
    /// This worker's pools, for the snapshot generation they were built from.
    static UPSTREAMS: RefCell<Option<(u64, Arc<Upstreams>)>> = const { RefCell::new(None) };
}

/// The calling worker's upstream pools for `snapshot`, built on first use.
pub fn worker_upstreams(shared: &Shared, snapshot: &Snapshot) -> Arc<Upstreams> {
    UPSTREAMS.with(|cell| {
        let mut slot = cell.borrow_mut();
        match &*slot {
            Some((generation, ups)) if *generation == snapshot.generation => ups.clone(),
            prev => {
                let prev = prev.as_ref().map(|(_, ups)| &**ups);
                let ups = Arc::new(Upstreams::build(&snapshot.clusters, &shared.metrics, prev));
                *slot = Some((snapshot.generation, ups.clone()));
                ups
            }
        }
    })
}

/// Runs the proxy until it is shut down, and the app too in wrapper mode.
/// Returns the exit code once drained.
///
/// `compiled` is the first generation's config, compiled with `metrics`.
pub fn run(
    compiled: Compiled,
    metrics: Arc<Metrics>,
    log_level: Option<LevelHandle>,
    app: Option<AppSpec>,
) -> anyhow::Result<u8> {
    let config = compiled.config.clone();
    // Before any worker serves: requests read the tracer without a lock.
    // Dropped last, outside the runtimes, so queued spans are flushed.
    let _tracing = crate::telemetry::trace::init(config.tracing.as_ref())?;
    // Filters load before anything binds: a filter that cannot load stops
    // start-up with its reason, and /ready means "filters loaded" too.
    let callouts = Arc::new(crate::upstream::Callouts::default());
    let filters = FilterRuntime::new(Some(config.module_cache.clone()), callouts.clone())
        .context("cannot start the Wasm engine")?;
    // Sizes the instance pool: every worker keeps instances of every filter.
    filters.set_workers(config.workers);
    let filter_set = filters.load(filter_specs(&config)?)?;
    let snapshot = Snapshot::new(1, compiled, filter_set);
    // Certificate watchers and expiry gauges from the start, not from the
    // first connection.
    snapshot.start_tls(&metrics);
    let (shutdown, _) = watch::channel(false);
    let (drain_inbound, _) = watch::channel(false);
    let (drain_outbound, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        metrics,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        shutdown,
        drain_inbound,
        drain_outbound,
        log_level,
        started: std::time::Instant::now(),
        filters,
        reload_status: std::sync::Mutex::new(crate::reload::Status {
            generation: 1,
            last_error: None,
        }),
        reload_failures: std::sync::atomic::AtomicU64::new(0),
        reload: std::sync::OnceLock::new(),
    });
    callouts.attach(&shared);

    // Bind everything before starting anything, so a taken port is a clean
    // start-up error.
    let workers = config.workers;
    let outbound_name = app
        .as_ref()
        .map_or(app::DEFAULT_PROXY_LISTENER, |a| a.proxy_listener.as_str());
    let outbound_addr = config
        .listeners
        .iter()
        .find(|l| *l.name == *outbound_name)
        .map(|l| l.bind);
    let (mut listener_set, per_worker) =
        crate::listener::ListenerSet::bind(&config, outbound_name)?;
    if app.is_some() {
        listener_set.pin_outbound();
    }
    let admin = crate::admin::bind(&config.admin)?;
    for w in crate::admin::exposure_warnings(&config.admin) {
        tracing::warn!("{w}");
    }

    let mut threads = Vec::with_capacity(workers);
    for (w, sockets) in per_worker.into_iter().enumerate() {
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("wasp-worker-{w}"))
            .spawn(move || worker_main(w, sockets, shared))
            .context("cannot start a worker thread")?;
        threads.push(handle);
    }

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    let code = control.block_on(async {
        let admin_task = tokio::spawn(crate::admin::serve(admin, shared.clone()));
        // Discovery, health checks and ejection expiry for every cluster.
        let snapshots = shared.clone();
        tokio::spawn(crate::upstream::control::run(move || {
            let snapshot = snapshots.snapshot.load();
            snapshot.clusters.iter().map(|c| c.state.clone()).collect()
        }));
        let reloads = crate::reload::start(shared.clone(), listener_set);
        let _ = shared.reload.set(reloads.clone());
        tokio::spawn(reload_on_sighup(reloads));
        shared.ready.store(true, Ordering::Release);
        tracing::info!(workers, admin = %config.admin.bind, "wasp is ready");
        // Only now, with every listener bound, may the app start calling out.
        let mut child = match app {
            Some(spec) => Some(app::spawn(&spec, outbound_addr)?),
            None => None,
        };
        let code = drain_sequence(&shared, &config, child.as_mut()).await;
        // Workers drain on their own threads; wait for them off the runtime.
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        admin_task.abort();
        anyhow::Ok(code)
    })?;
    tracing::info!("drained; bye");
    Ok(code)
}

/// Waits for the reason to stop, then drains in order (see the module docs).
async fn drain_sequence(
    shared: &Shared,
    config: &Config,
    mut child: Option<&mut app::Child>,
) -> u8 {
    let mut app_code = None;
    tokio::select! {
        _ = wait_for_shutdown(shared) => {}
        code = app::wait(&mut child) => {
            tracing::info!("the app exited with code {code}; shutting down");
            app_code = Some(code);
            shared.begin_shutdown("the app exited");
        }
    }
    if app_code.is_none() {
        if let Some(c) = child.as_deref_mut() {
            c.forward(app::TERM);
        }
        // Inbound keeps serving a little so load balancers see /ready fail.
        if !config.drain_delay.is_zero() {
            tracing::info!(
                "inbound keeps serving for drain_delay = {:?}",
                config.drain_delay
            );
            tokio::time::sleep(config.drain_delay).await;
        }
    }
    shared.drain_inbound.send_replace(true);
    if app_code.is_none() && child.is_some() {
        // The app may still be finishing its own outbound calls.
        match tokio::time::timeout(config.drain_timeout, app::wait(&mut child)).await {
            Ok(code) => app_code = Some(code),
            Err(_) => {
                tracing::warn!("the app did not exit within drain_timeout; killing it");
                if let Some(c) = child.as_mut() {
                    c.kill().await;
                }
                app_code = Some(137);
            }
        }
    }
    shared.drain_outbound.send_replace(true);
    app_code.unwrap_or(0)
}

/// `SIGHUP` asks for a reload, as operators expect.
async fn reload_on_sighup(reloads: crate::reload::Requests) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            if reloads.send(crate::reload::Trigger::Signal).is_err() {
                return;
            }
        }
    }
}

/// The engine's view of every `[filters.NAME]` section. A `NAME.toml` in
/// the filters directory, when present, replaces the section's `config`, so
/// a filter's settings can ship (and hot-reload) beside its module.
pub(crate) fn filter_specs(config: &Config) -> anyhow::Result<Vec<FilterSpec>> {
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

fn worker_main(index: usize, listeners: crate::listener::WorkerListeners, shared: Arc<Shared>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, "cannot start the worker runtime: {e}");
            shared.begin_shutdown("a worker failed to start");
            return;
        }
    };
    FilterRuntime::init_worker_thread();
    let (sockets, mut added) = listeners;
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for job in sockets {
            tasks.spawn(crate::listener::serve(job, shared.clone()));
        }
        // Listeners added by reloads arrive until the last drain starts.
        let mut last_drain = shared.drain_outbound.subscribe();
        loop {
            tokio::select! {
                job = added.recv() => match job {
                    Some(job) => {
                        tasks.spawn(crate::listener::serve(job, shared.clone()));
                    }
                    None => break,
                },
                _ = last_drain.wait_for(|d| *d) => break,
                // Reap the serve loops of removed listeners as they finish.
                Some(done) = tasks.join_next(), if !tasks.is_empty() => report_serve_end(done),
            }
        }
        while let Some(done) = tasks.join_next().await {
            report_serve_end(done);
        }
    });
}

/// A serve loop that panicked stopped accepting on its listener: say so
/// (the other listeners and this worker's connections keep going).
fn report_serve_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("a listener's accept loop panicked and stopped: {e}");
        }
    }
}

async fn wait_for_shutdown(shared: &Shared) {
    let mut rx = shared.shutdown.subscribe();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = rx.wait_for(|s| *s).await;
            return;
        };
        tokio::select! {
            _ = term.recv() => shared.begin_shutdown("SIGTERM"),
            _ = int.recv() => shared.begin_shutdown("SIGINT"),
            _ = rx.wait_for(|s| *s) => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = rx.wait_for(|s| *s).await;
    }
}
