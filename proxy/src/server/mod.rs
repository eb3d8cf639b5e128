//! The process: the control thread, the workers, snapshots and shutdown.
//!
//! The control thread (the main thread, a current-thread tokio runtime) owns
//! the admin server and signals, and publishes [`Snapshot`]s through
//! `arc-swap`. Each worker is a thread with its own current-thread runtime,
//! its own listening sockets and its own upstream pools; workers read the
//! snapshot once per request and otherwise share nothing.
//!
//! Shutdown: SIGTERM, SIGINT or `POST /shutdown` mark the proxy not ready,
//! tell every worker to stop accepting, let in-flight requests finish up to
//! `drain_timeout`, and exit 0.

mod snapshot;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use snapshot::{ListenerRuntime, Snapshot};

use crate::config::Config;
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
    pub shutdown: watch::Sender<bool>,
    pub log_level: Option<LevelHandle>,
    pub started: std::time::Instant,
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
            _ => {
                let ups = Arc::new(Upstreams::build(&snapshot.config, &shared.metrics));
                *slot = Some((snapshot.generation, ups.clone()));
                ups
            }
        }
    })
}

/// Runs the proxy until it is shut down. Returns once drained.
pub fn run(config: Config, log_level: Option<LevelHandle>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let config = Arc::new(config);
    let snapshot = Snapshot::build(1, config.clone(), &metrics);
    let (shutdown, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        metrics,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        shutdown,
        log_level,
        started: std::time::Instant::now(),
    });

    // Bind everything before starting anything, so a taken port is a clean
    // start-up error.
    let workers = config.workers;
    let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, l) in config.listeners.iter().enumerate() {
        let sockets = crate::listener::bind(l.bind, workers)
            .with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
        tracing::info!(listener = %l.name, bind = %l.bind, workers, "listening");
        for (w, s) in sockets.into_iter().enumerate() {
            per_worker[w].push((i, s));
        }
    }
    let admin = std::net::TcpListener::bind(config.admin)
        .with_context(|| format!("admin: cannot bind {}", config.admin))?;
    admin.set_nonblocking(true)?;

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
    control.block_on(async {
        let admin_task = tokio::spawn(crate::admin::serve(admin, shared.clone()));
        shared.ready.store(true, Ordering::Release);
        tracing::info!(workers, admin = %config.admin, "wasp is ready");
        wait_for_shutdown(&shared).await;
        // Workers drain on their own threads; wait for them off the runtime.
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        admin_task.abort();
    });
    tracing::info!("drained; bye");
    Ok(())
}

fn worker_main(index: usize, sockets: Vec<(usize, std::net::TcpListener)>, shared: Arc<Shared>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, "cannot start the worker runtime: {e}");
            shared.begin_shutdown("a worker failed to start");
            return;
        }
    };
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (listener, socket) in sockets {
            let rx = shared.shutdown.subscribe();
            tasks.push(tokio::spawn(crate::listener::serve(listener, socket, shared.clone(), rx)));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

async fn wait_for_shutdown(shared: &Shared) {
    let mut rx = shared.shutdown.subscribe();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
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
