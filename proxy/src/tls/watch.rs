//! Watching certificate files: one `wasp-tls-watch` thread per TLS owner
//! (a listener or a cluster), fed by `notify` and backed by a slow poll.
//!
//! The parent directories are watched, not the files, so an atomic rename
//! (write a temp file, `mv` it over) and Kubernetes' symlink swap of a
//! mounted secret are both seen. Events are debounced until the directory
//! has been quiet for [`DEBOUNCE`], because a cert and its key are usually
//! written one after the other. The poll every [`POLL`] catches what inotify
//! cannot (network filesystems, an exhausted watch limit); the owner hashes
//! the files first, so a poll that finds nothing new costs a few small reads
//! and no parsing.
//! The thread ends at the first wake-up after its owner is dropped.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

const DEBOUNCE: Duration = Duration::from_millis(150);
const POLL: Duration = Duration::from_secs(2);

/// Keeps the file watch alive; dropping it stops the notifications (the
/// thread then ends at its next poll, when the owner is gone too).
pub(super) struct Watch {
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

/// Calls `on_change` after the files may have changed; it returns false
/// when its owner is gone, which ends the thread.
pub(super) fn spawn(
    what: String,
    files: &[PathBuf],
    on_change: impl FnMut() -> bool + Send + 'static,
) -> Watch {
    let (tx, rx) = mpsc::channel::<()>();
    let notify_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        if relevant {
            let _ = notify_tx.send(());
        }
    });
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    let watcher = match watcher {
        Ok(mut w) => {
            for dir in &dirs {
                if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        "{what}: cannot watch {} for certificate changes ({e}); polling every {POLL:?}",
                        dir.display()
                    );
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!("{what}: no file watcher ({e}); polling certificates every {POLL:?}");
            None
        }
    };
    let spawned = std::thread::Builder::new()
        .name("wasp-tls-watch".into())
        .spawn(move || run(rx, tx, on_change));
    if let Err(e) = spawned {
        tracing::warn!("{what}: cannot start the certificate watcher thread: {e}");
    }
    Watch { _watcher: watcher }
}

fn run(rx: mpsc::Receiver<()>, _keep: mpsc::Sender<()>, mut on_change: impl FnMut() -> bool) {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(()) => {
                // Quiet for DEBOUNCE, but never wait more than a second in
                // a directory that is always busy.
                let until = std::time::Instant::now() + Duration::from_secs(1);
                while std::time::Instant::now() < until && rx.recv_timeout(DEBOUNCE).is_ok() {}
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if !on_change() {
            return;
        }
    }
}
