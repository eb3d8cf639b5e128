//! Hot reload: the config file and the filters directory are watched, and a
//! change becomes a new snapshot generation without failing a request.
//!
//! Runs on the control thread. Triggers: a file event (notify), `SIGHUP`,
//! and `POST /reload`. Events are debounced and a file is only read once its
//! size and modification time have stopped changing, so a module written
//! slowly in chunks or copied over a slow link is taken whole; a module that
//! fails to load while it is still changing is retried, not reported.
//!
//! Applying is all or nothing: the new config is parsed and validated, every
//! filter it names is compiled (or found in the module cache) and validated
//! (`proxy_on_vm_start`, `proxy_on_configure`), and only then is the new
//! snapshot published. New requests take it at once; in-flight requests
//! finish on the snapshot, pools and VMs they started with. On any error
//! nothing changes, the error is logged once, counted, and shown on
//! `/reload` and `/config`.
//!
//! Listeners follow the config too (see [`ListenerSet`]): added ones are
//! bound on every worker before anything changes, so a taken port rejects
//! the reload whole; removed ones stop accepting just before the swap and
//! drain; a listener with the same name and address keeps its sockets and
//! connections and takes its new routes, pipeline, limits and TLS settings
//! from the new snapshot. `[proxy] workers` and `[admin] bind` still need a
//! restart, and a reload that changes them is refused.

mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config};
use crate::listener::ListenerSet;
use crate::server::{filter_specs, Shared, Snapshot};

/// Why a reload was asked for.
#[derive(Debug)]
pub enum Trigger {
    /// A file changed under the config file's name or in the filters dir.
    FileChanged(PathBuf),
    /// A watched module file was deleted.
    FileRemoved(PathBuf),
    Signal,
    Admin(oneshot::Sender<Result<u64, String>>),
}

/// The handle the admin API and signal handler use to ask for a reload.
pub type Requests = mpsc::UnboundedSender<Trigger>;

/// How long a file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(60);
/// Quiet time that ends a burst of file events.
const DEBOUNCE: Duration = Duration::from_millis(40);
/// How long a module that fails to load is watched for further writes before
/// the failure is reported.
const RETRY_WINDOW: Duration = Duration::from_millis(500);

/// Starts the watchers and the reload loop. Returns the request handle.
pub fn start(shared: Arc<Shared>, listeners: ListenerSet) -> Requests {
    let (tx, rx) = mpsc::unbounded_channel();
    let snapshot = shared.snapshot.load();
    let watcher = watch::start(
        &snapshot.config.path,
        &snapshot.config.filters_dir,
        tx.clone(),
    );
    tokio::spawn(run(shared, listeners, rx, watcher));
    tx
}

async fn run(
    shared: Arc<Shared>,
    mut listeners: ListenerSet,
    mut rx: mpsc::UnboundedReceiver<Trigger>,
    _watcher: Option<watch::Watcher>,
) {
    while let Some(first) = rx.recv().await {
        let mut triggers = vec![first];
        // Gather the rest of a burst (an editor's save, a copy in chunks).
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(t)) => triggers.push(t),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let mut replies = Vec::new();
        let mut files = Vec::new();
        let mut wanted = false;
        for t in triggers {
            match t {
                Trigger::Admin(reply) => {
                    replies.push(reply);
                    wanted = true;
                }
                Trigger::Signal => wanted = true,
                Trigger::FileChanged(p) => {
                    files.push(p);
                    wanted = true;
                }
                Trigger::FileRemoved(p) => tracing::warn!(
                    file = %p.display(),
                    "a filter module was deleted; the loaded version keeps serving (remove the filter from the config to stop using it)"
                ),
            }
        }
        if !wanted {
            continue;
        }
        let outcome = reload_settled(&shared, &mut listeners, &files).await;
        for r in replies {
            let _ = r.send(outcome.clone());
        }
    }
}

/// Waits for the changed files to settle, then reloads; a failure while a
/// file is still being written is retried.
async fn reload_settled(
    shared: &Shared,
    listeners: &mut ListenerSet,
    files: &[PathBuf],
) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + RETRY_WINDOW;
    loop {
        settle(files).await;
        let before = stamps(files);
        match reload(shared, listeners).await {
            Ok(generation) => return Ok(generation),
            Err(e) => {
                // Still being written? Then this was not the final content.
                tokio::time::sleep(SETTLE).await;
                if stamps(files) != before && tokio::time::Instant::now() < deadline {
                    tracing::debug!("reload failed while a file was still changing; retrying: {e}");
                    continue;
                }
                shared.reload_failed(&e);
                return Err(e);
            }
        }
    }
}

/// Waits until none of `files` changes size or mtime for [`SETTLE`].
async fn settle(files: &[PathBuf]) {
    if files.is_empty() {
        return;
    }
    let mut last = stamps(files);
    for _ in 0..100 {
        tokio::time::sleep(SETTLE).await;
        let now = stamps(files);
        if now == last {
            return;
        }
        last = now;
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(u64, std::time::SystemTime)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

/// Builds and publishes the next generation from the files on disk.
async fn reload(shared: &Shared, listeners: &mut ListenerSet) -> Result<u64, String> {
    if shared.draining.load(Ordering::Acquire) {
        return Err("shutting down: reloads are no longer applied".to_string());
    }
    let current = shared.snapshot.load_full();
    let path = current.config.path.clone();
    let mut config = config::load(&path).map_err(|e| e.to_string().trim_end().to_string())?;
    check_restart_only(&current.config, &config)?;
    // Unchanged clusters keep their endpoints, health and ejections.
    crate::upstream::adopt_states(&current.config, &mut config);
    let filters = shared
        .filters
        .load(filter_specs(&config).map_err(|e| format!("{e:#}"))?)
        .map_err(|e| format!("{e:#}"))?;
    // Last, because it binds sockets: every check that can fail came first.
    let plan = listeners.plan(&config)?;
    let generation = current.generation + 1;
    let next = Snapshot::next(
        &current,
        generation,
        Arc::new(config),
        filters,
        &shared.metrics,
    );
    if !plan.is_empty() {
        listeners.retire(&plan).await;
    }
    shared.snapshot.store(Arc::new(next));
    listeners.start(plan);
    shared.reload_succeeded(generation);
    tracing::info!(generation, "reloaded {}", shown(&path));
    Ok(generation)
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// The worker threads and the admin socket live as long as the process.
fn check_restart_only(old: &Config, new: &Config) -> Result<(), String> {
    if old.workers != new.workers || old.admin != new.admin {
        return Err(format!(
            "{}: [proxy] workers and [admin] bind need a restart (nothing was applied)",
            shown(&new.path)
        ));
    }
    // The exporter and its thread are set up once (telemetry::trace::init).
    if old.tracing != new.tracing {
        return Err(format!(
            "{}: [tracing] needs a restart (nothing was applied)",
            shown(&new.path)
        ));
    }
    Ok(())
}

impl Shared {
    fn reload_succeeded(&self, generation: u64) {
        if let Ok(mut s) = self.reload_status.lock() {
            s.generation = generation;
            s.last_error = None;
        }
    }

    fn reload_failed(&self, error: &str) {
        tracing::error!("reload rejected, the previous configuration keeps serving: {error}");
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.reload_status.lock() {
            s.last_error = Some(error.to_string());
        }
    }
}

/// What `/reload` and `/config` report.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub generation: u64,
    pub last_error: Option<String>,
}
