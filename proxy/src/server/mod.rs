//! The process: wires the control thread, the workers, snapshots and
//! shutdown together, and owns nothing else.
//!
//! The control thread (the main thread, a current-thread tokio runtime) owns
//! the admin server and signals, and publishes [`Snapshot`]s through
//! `arc-swap` ([`Snapshots`]). Each worker is a thread with its own
//! current-thread runtime, its own listening sockets and its own upstream
//! pools ([`Worker`], handed to every serve loop); workers read the snapshot
//! once per request and otherwise share nothing. Each part gets only the
//! handles it uses: `admin` an [`crate::admin::Context`], `reload` a
//! [`crate::reload::Context`], listeners a [`Worker`], and all of them the
//! process's [`Lifecycle`].
//!
//! Shutdown ordering (SIGTERM, SIGINT or `POST /shutdown`): `/ready` fails
//! at once; inbound listeners keep serving for `drain_delay` so load
//! balancers notice, then stop accepting and drain; the outbound listener
//! (the app's HTTP proxy) keeps working until the app has exited (wrapper
//! mode) so the app can finish its own calls, then drains too. In-flight
//! requests get up to `drain_timeout`. The process exits 0, or with the
//! app's exit code in wrapper mode.

mod app;

use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;

pub use app::AppSpec;

/// For the CLI's default value.
pub const fn app_default_proxy_listener() -> &'static str {
    app::DEFAULT_PROXY_LISTENER
}

use crate::config::Config;
use crate::filter::FilterRuntime;
use crate::lifecycle::Lifecycle;
use crate::listener::Worker;
use crate::reload::ReloadHandle;
use crate::snapshot::{filter_specs, Compiled, Snapshot, Snapshots};
use crate::telemetry::logging::LevelHandle;
use crate::telemetry::Metrics;
use crate::upstream::{ClusterLookup, WorkerPools};

/// Runs the proxy until it is shut down, and the app too in wrapper mode.
/// Returns the exit code once drained.
///
/// `compiled` is the first generation's config; its series go to `metrics`.
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
    filters.set_compiler(config.wasm_compiler);
    filters.set_compile_mode(compile_mode(&config));
    let filter_set = filters.load(filter_specs(&config)?)?;
    let snapshot = Snapshot::new(1, compiled, filter_set, &metrics)
        .map_err(|e| anyhow::anyhow!("cannot build the serving snapshot: {e}"))?;
    // Certificate watchers and expiry gauges from the start, not from the
    // first connection.
    snapshot.start_tls(&metrics);
    let snapshots: Arc<Snapshots> = Arc::new(ArcSwap::from_pointee(snapshot));
    let lifecycle = Arc::new(Lifecycle::default());
    let reload = ReloadHandle::new(1);
    callouts.attach(callout_lookup(&snapshots, &metrics));

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
    for w in crate::l4::access_warnings(&config) {
        tracing::warn!("{w}");
    }

    let mut threads = Vec::with_capacity(workers);
    for (w, sockets) in per_worker.into_iter().enumerate() {
        let worker = Worker {
            snapshots: snapshots.clone(),
            lifecycle: lifecycle.clone(),
            metrics: metrics.clone(),
            pools: WorkerPools::new(metrics.clone()),
        };
        let handle = std::thread::Builder::new()
            .name(format!("wasp-worker-{w}"))
            .spawn(move || worker_main(w, sockets, worker))
            .context("cannot start a worker thread")?;
        threads.push(handle);
    }

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    let code = control.block_on(async {
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            Arc::new(crate::admin::Context {
                snapshots: snapshots.clone(),
                lifecycle: lifecycle.clone(),
                reload: reload.clone(),
                filters: filters.clone(),
                metrics: metrics.clone(),
                log_level,
            }),
        ));
        // Discovery, health checks and ejection expiry for every cluster.
        let current = snapshots.clone();
        tokio::spawn(crate::upstream::control::run(move || {
            let snapshot = current.load();
            snapshot.clusters.iter().map(|c| c.state.clone()).collect()
        }));
        let reloads = crate::reload::start(
            crate::reload::Context {
                snapshots: snapshots.clone(),
                lifecycle: lifecycle.clone(),
                filters: filters.clone(),
                metrics: metrics.clone(),
                handle: reload.clone(),
            },
            listener_set,
        );
        tokio::spawn(reload_on_sighup(reloads));
        lifecycle.set_ready();
        tracing::info!(workers, admin = %config.admin.bind, "wasp is ready");
        // Only now, with every listener bound, may the app start calling out.
        let mut child = match app {
            Some(spec) => Some(app::spawn(&spec, outbound_addr)?),
            None => None,
        };
        // No tier-up compiles or runs start-up callbacks during the drain.
        let mut shutdown = lifecycle.shutdown_requested();
        let tiering = filters.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            tiering.stop_tier_up();
        });
        let code = drain_sequence(&lifecycle, &config, child.as_mut()).await;
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

/// How filter callouts find a cluster: by name in the current snapshot,
/// through the calling worker's pools. Weak: the snapshot holds the
/// filters, which hold the callouts.
fn callout_lookup(snapshots: &Arc<Snapshots>, metrics: &Arc<Metrics>) -> ClusterLookup {
    let snapshots = Arc::downgrade(snapshots);
    let metrics = metrics.clone();
    Box::new(move |cluster: &str| {
        let snapshot = snapshots.upgrade()?.load_full();
        let id = snapshot.cluster_id(cluster)?;
        let pools = WorkerPools::current(&metrics);
        Some((id, pools.upstreams(snapshot.generation, &snapshot.clusters)))
    })
}

/// Waits for the reason to stop, then drains in order (see the module docs).
async fn drain_sequence(
    shared: &Lifecycle,
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
    shared.start_drain(false);
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
    shared.start_drain(true);
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

/// Keeps the worker's timer driver waking at least once a second. tokio's
/// time driver wakes its own runtime through the I/O driver (a `write` to
/// an eventfd, then another trip through `epoll_wait`) whenever a timer is
/// registered to fire before the wake-up the driver last parked for. On
/// an h2c connection only long timers are pending between requests
/// (keep-alive ping at 60 s, the guard's idle timeout), so every request's
/// response deadline (the route timeout, 15 s by default) was such a
/// timer: one extra system call per request on a sequential connection
/// (strace: `write` 1.0 per request; none on HTTP/1, where the guard's
/// shorter head deadline is pending). A one-second tick keeps the parked
/// wake-up sooner than any deadline of a second or more, at about two
/// wake-ups a second per idle worker (tokio's timer wheel cascades a
/// one-second timer through a coarser level first). This leans on how
/// tokio's driver parks: bench/instructions.sh's h2c `write` count per
/// request is what shows if a tokio upgrade undoes it.
async fn timer_heartbeat() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

fn worker_main(index: usize, listeners: crate::listener::WorkerListeners, worker: Worker) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, "cannot start the worker runtime: {e}");
            worker.lifecycle.begin_shutdown("a worker failed to start");
            return;
        }
    };
    FilterRuntime::init_worker_thread();
    worker.pools.enter();
    let (sockets, mut added) = listeners;
    rt.block_on(async {
        // Detached: it ends with the runtime.
        tokio::spawn(timer_heartbeat());
        let mut tasks = tokio::task::JoinSet::new();
        for job in sockets {
            tasks.spawn(crate::listener::serve(job, worker.clone()));
        }
        // Listeners added by reloads arrive until the last drain starts.
        let mut last_drain = worker.lifecycle.drain_signal(true);
        loop {
            tokio::select! {
                job = added.recv() => match job {
                    Some(job) => {
                        tasks.spawn(crate::listener::serve(job, worker.clone()));
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

async fn wait_for_shutdown(shared: &Lifecycle) {
    let mut rx = shared.shutdown_requested();
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

/// How the server compiles filter modules: always in a child process of
/// this binary, with the config's limits (see `filter::compile`).
pub(crate) fn compile_mode(config: &crate::config::Config) -> crate::filter::CompileMode {
    crate::filter::CompileMode::Child(crate::filter::ChildLimits {
        timeout: config.wasm_compile_timeout,
        memory: config.wasm_compile_memory,
    })
}
