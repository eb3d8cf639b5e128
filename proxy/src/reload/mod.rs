//! Hot reload: the config file and the filters directory are watched, and a
//! change becomes a new snapshot generation without failing a request.
//!
//! Runs on the control thread. Triggers: a file event (notify), `SIGHUP`,
//! and `POST /reload`. A file closed after writing or renamed into place is
//! complete, and the reload starts at once (a few milliseconds gather a
//! module and its `NAME.toml` copied together). Other changes may come from
//! a writer still at work: they are debounced, and a file is only read once
//! its size and modification time have stopped changing, so a module written
//! slowly in chunks or copied over a slow link is taken whole. A module that
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
//! from the new snapshot. `[proxy] workers`, `[admin] bind` and
//! `[admin] probes` still need a restart, and a reload that changes them is
//! refused (`[admin] token` applies at once).

mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config};
use crate::filter::FilterRuntime;
use crate::lifecycle::Lifecycle;
use crate::listener::ListenerSet;
use crate::snapshot::{self, filter_specs, Snapshot, Snapshots};
use crate::telemetry::Metrics;

/// Why a reload was asked for.
#[derive(Debug)]
pub enum Trigger {
    /// A file changed under the config file's name or in the filters dir,
    /// and may still be being written.
    FileChanged(PathBuf),
    /// Such a file was closed after writing, or renamed into place.
    FileWritten(PathBuf),
    /// A watched module file was deleted.
    FileRemoved(PathBuf),
    Signal,
    Admin(oneshot::Sender<Result<u64, String>>),
}

/// The handle the admin API and signal handler use to ask for a reload.
pub type Requests = mpsc::UnboundedSender<Trigger>;

/// What the reload loop works with: the published snapshots, the process's
/// lifecycle (no reload once draining), the Wasm engine and the metrics.
#[derive(Clone)]
pub struct Context {
    pub snapshots: Arc<Snapshots>,
    pub lifecycle: Arc<Lifecycle>,
    pub filters: Arc<FilterRuntime>,
    pub metrics: Arc<Metrics>,
    pub handle: Arc<ReloadHandle>,
}

/// How `/reload` and `/config` ask for a reload and read its outcome.
#[derive(Debug, Default)]
pub struct ReloadHandle {
    /// Last reload outcome (control thread).
    status: std::sync::Mutex<Status>,
    failures: std::sync::atomic::AtomicU64,
    /// Set once the reload loop runs.
    requests: std::sync::OnceLock<Requests>,
}

impl ReloadHandle {
    pub fn new(generation: u64) -> Arc<Self> {
        Arc::new(Self {
            status: std::sync::Mutex::new(Status {
                generation,
                last_error: None,
            }),
            ..Self::default()
        })
    }

    /// The reload loop's request channel; `None` until it runs.
    pub fn requests(&self) -> Option<&Requests> {
        self.requests.get()
    }

    /// The last outcome.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Rejected reloads since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn succeeded(&self, generation: u64) {
        if let Ok(mut s) = self.status.lock() {
            s.generation = generation;
            s.last_error = None;
        }
    }

    fn failed(&self, error: &str) {
        tracing::error!("reload rejected, the previous configuration keeps serving: {error}");
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.status.lock() {
            s.last_error = Some(error.to_string());
        }
    }
}

/// How long a file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(60);
/// Quiet time that ends a burst of file events while a file may still be
/// being written.
const DEBOUNCE: Duration = Duration::from_millis(40);
/// Quiet time that ends a burst once every file in it is complete (closed
/// or renamed into place): just long enough to take a module and its
/// `NAME.toml` copied together in one reload. Written further apart, they
/// make two reloads (the module with the old settings first), each checked
/// on its own.
const DEBOUNCE_COMPLETE: Duration = Duration::from_millis(3);
/// How long a module that fails to load is watched for further writes before
/// the failure is reported.
const RETRY_WINDOW: Duration = Duration::from_millis(500);

/// Starts the watchers and the reload loop. Returns the request handle.
pub fn start(shared: Context, listeners: ListenerSet) -> Requests {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = shared.handle.requests.set(tx.clone());
    let snapshot = shared.snapshots.load();
    let watcher = watch::start(
        &snapshot.config.path,
        &snapshot.config.filters_dir,
        tx.clone(),
    );
    tokio::spawn(run(shared, listeners, rx, watcher));
    tx
}

async fn run(
    shared: Context,
    mut listeners: ListenerSet,
    mut rx: mpsc::UnboundedReceiver<Trigger>,
    _watcher: Option<watch::Watcher>,
) {
    while let Some(first) = rx.recv().await {
        let mut burst = Burst::default();
        burst.add(first);
        // Gather the rest of a burst (an editor's save, a copy in chunks);
        // short once every file in it is complete.
        loop {
            let quiet = if burst.complete() {
                DEBOUNCE_COMPLETE
            } else {
                DEBOUNCE
            };
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(t)) => burst.add(t),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if !burst.wanted {
            continue;
        }
        let (files, complete): (Vec<PathBuf>, Vec<bool>) = burst.files.into_iter().unzip();
        let settled = complete.iter().all(|c| *c);
        let outcome = reload_settled(&shared, &mut listeners, &files, settled).await;
        let replies = burst.replies;
        for r in replies {
            let _ = r.send(outcome.clone());
        }
    }
}

/// The triggers of one burst.
#[derive(Default)]
struct Burst {
    replies: Vec<oneshot::Sender<Result<u64, String>>>,
    /// Each changed file once, and whether its last event said complete.
    files: Vec<(PathBuf, bool)>,
    wanted: bool,
}

impl Burst {
    fn add(&mut self, t: Trigger) {
        let (path, complete) = match t {
            Trigger::Admin(reply) => {
                self.replies.push(reply);
                self.wanted = true;
                return;
            }
            Trigger::Signal => {
                self.wanted = true;
                return;
            }
            Trigger::FileRemoved(p) => {
                let what = match p.extension().and_then(|e| e.to_str()) {
                    Some("wasm") => "a filter module was deleted; the loaded version keeps serving (remove the filter from the config to stop using it)",
                    _ => "a watched config file was deleted or moved away; the loaded configuration keeps serving",
                };
                tracing::warn!(file = %p.display(), "{what}");
                return;
            }
            Trigger::FileChanged(p) => (p, false),
            Trigger::FileWritten(p) => (p, true),
        };
        self.wanted = true;
        match self.files.iter_mut().find(|(p, _)| *p == path) {
            Some(entry) => entry.1 = complete,
            None => self.files.push((path, complete)),
        }
    }

    /// No file in the burst may still be being written.
    fn complete(&self) -> bool {
        self.files.iter().all(|(_, c)| *c)
    }
}

/// Waits for the changed files to settle (unless every writer is known to
/// be done), then reloads; a failure while a file is still being written
/// is retried.
async fn reload_settled(
    shared: &Context,
    listeners: &mut ListenerSet,
    files: &[PathBuf],
    complete: bool,
) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + RETRY_WINDOW;
    let mut complete = complete;
    loop {
        if !complete {
            settle(files).await;
        }
        // A retry means a writer was not done after all.
        complete = false;
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
                shared.handle.failed(&e);
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
async fn reload(shared: &Context, listeners: &mut ListenerSet) -> Result<u64, String> {
    not_draining(&shared.lifecycle)?;
    let current = shared.snapshots.load_full();
    let path = current.config.path.clone();
    let config = config::load(&path).map_err(|e| e.to_string().trim_end().to_string())?;
    check_restart_only(&current.config, &config)?;
    // Names, certificates and discovery files, off the control runtime
    // (which also serves admin). Unchanged clusters keep their endpoints,
    // health and ejections.
    let compiled = {
        let previous = current.clone();
        off_thread(&shared.lifecycle, move || {
            snapshot::compile(Arc::new(config), Some(&previous))
        })
        .await?
        .map_err(|e| e.to_string().trim_end().to_string())?
    };
    let config = compiled.config.clone();
    // Everything that can fail comes before anything is swapped in: the
    // added listeners are bound (a plan dropped on a later error closes
    // the sockets it bound), the filters compiled and validated (their
    // new versions not yet published), the snapshot built. A failure at
    // any of these leaves the running config, filters and registry as
    // they were.
    let plan = listeners.plan(&config)?;
    // The new `[proxy] wasm_compile_*` limits apply to this load; a
    // reload rejected at any later step (or dropped) puts the serving
    // config's back.
    let specs = filter_specs(&config).map_err(|e| format!("{e:#}"))?;
    let mut compile_mode = CompileModeGuard {
        filters: &shared.filters,
        previous: Some(crate::server::compile_mode(&current.config)),
    };
    shared
        .filters
        .set_compile_mode(crate::server::compile_mode(&config));
    let filters = shared
        .filters
        .prepare_set(specs)
        .map_err(|e| format!("{e:#}"))?;
    // Fails only on a per-route config its filter was not loaded with (a
    // bug: both come from `filter_specs` of this config), checked before
    // any metric series is registered. Its series (never removed) are
    // then registered; only a shutdown beginning below rejects the reload
    // after that, when the process is going away anyway.
    let generation = current.generation + 1;
    let next = Snapshot::new(generation, compiled, filters.set().clone(), &shared.metrics)?;
    if !plan.is_empty() {
        listeners.retire(&plan).await;
        // Shutdown may have begun while the workers were answering; they no
        // longer take new listeners then, so none are handed over.
        not_draining(&shared.lifecycle)?;
    }
    // The swap: nothing below fails.
    filters.publish();
    next.start_tls(&shared.metrics);
    compile_mode.keep();
    shared.snapshots.store(Arc::new(next));
    listeners.start(plan);
    shared.handle.succeeded(generation);
    tracing::info!(generation, "reloaded {}", shown(&path));
    Ok(generation)
}

/// Restores the serving generation's compile mode when dropped, unless
/// the reload that changed it was published (`keep`).
struct CompileModeGuard<'a> {
    filters: &'a FilterRuntime,
    previous: Option<crate::filter::CompileMode>,
}

impl CompileModeGuard<'_> {
    fn keep(&mut self) {
        self.previous = None;
    }
}

impl Drop for CompileModeGuard<'_> {
    fn drop(&mut self) {
        if let Some(mode) = self.previous.take() {
            self.filters.set_compile_mode(mode);
        }
    }
}

/// Runs `work` (blocking) off the control runtime. Shutdown may begin
/// meanwhile, and a reload must not be applied once it has: checked again
/// after the wait.
async fn off_thread<T: Send + 'static>(
    lifecycle: &Lifecycle,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let out = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("compiling the configuration failed: {e}"))?;
    not_draining(lifecycle)?;
    Ok(out)
}

fn not_draining(lifecycle: &Lifecycle) -> Result<(), String> {
    if lifecycle.is_draining() {
        return Err("shutting down: reloads are no longer applied".to_string());
    }
    Ok(())
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// The worker threads and the admin socket live as long as the process,
/// and so does the trace exporter (telemetry::trace::init); `[admin]
/// token` is read per admin request, so it may change.
fn check_restart_only(old: &Config, new: &Config) -> Result<(), String> {
    let (was, now) = (old.restart_only(), new.restart_only());
    if was == now {
        return Ok(());
    }
    let only_tracing = config::RestartOnly {
        tracing: None,
        ..was
    } == config::RestartOnly {
        tracing: None,
        ..now
    };
    let what = if only_tracing {
        "[tracing] needs"
    } else {
        "[proxy] workers, [proxy] wasm_compiler, [admin] bind and [admin] probes need"
    };
    Err(format!(
        "{}: {what} a restart (nothing was applied)",
        shown(&new.path)
    ))
}

/// What `/reload` and `/config` report.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub generation: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[proxy]\nworkers = 2\n[admin]\nbind = \"127.0.0.1:9901\"\n";

    fn config(text: &str) -> Config {
        config::parse(Path::new("/etc/wasp/wasp.toml"), text, |_| None).expect("valid config")
    }

    #[test]
    fn restart_only_settings_are_compared_whole() {
        let old = config(BASE);
        assert!(check_restart_only(&old, &config(BASE)).is_ok());
        // A token is read per admin request: it may change.
        let token = format!("{BASE}token = \"0123456789abcdef0123\"\n");
        assert!(check_restart_only(&old, &config(&token)).is_ok());
        let workers = config(&BASE.replace("workers = 2", "workers = 3"));
        let e = check_restart_only(&old, &workers).expect_err("workers need a restart");
        assert!(e.contains("[proxy] workers"), "{e}");
        let tracing = config(&format!(
            "{BASE}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n"
        ));
        let e = check_restart_only(&old, &tracing).expect_err("tracing needs a restart");
        assert!(e.contains("[tracing] needs a restart"), "{e}");
    }

    #[tokio::test]
    async fn a_shutdown_begun_while_compiling_stops_the_reload() {
        let lifecycle = Arc::new(Lifecycle::default());
        let during = lifecycle.clone();
        let out = off_thread(&lifecycle, move || during.begin_shutdown("test")).await;
        let e = out.expect_err("shutdown began during the work");
        assert!(e.contains("shutting down"), "{e}");
        let fine = off_thread(&Arc::new(Lifecycle::default()), || 7).await;
        assert_eq!(fine, Ok(7));
    }

    #[test]
    fn the_handle_keeps_the_last_outcome() {
        let h = ReloadHandle::new(1);
        assert!(h.requests().is_none(), "no loop yet");
        h.failed("bad file");
        assert_eq!(h.failures(), 1);
        assert_eq!(h.status().last_error.as_deref(), Some("bad file"));
        h.succeeded(2);
        assert_eq!(h.status().generation, 2);
        assert!(h.status().last_error.is_none());
        assert_eq!(h.failures(), 1, "failures count since start");
    }
}
