//! File watching for reload: the config file's directory and the filters
//! directory, with events filtered down to the files that matter and sent to
//! the reload loop. notify calls back on its own thread; the channel carries
//! the events onto the control runtime.
//!
//! Events say whether a file is complete: closed after writing (inotify's
//! `IN_CLOSE_WRITE`) or renamed into place means the writer is done, so the
//! reload can start at once; any other change may be a writer still at
//! work, and waits for the file to settle.

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::{Requests, Trigger};

pub struct Watcher {
    _inner: RecommendedWatcher,
}

pub fn start(config: &Path, filters_dir: &Path, tx: Requests) -> Option<Watcher> {
    let config_file = config
        .canonicalize()
        .unwrap_or_else(|_| config.to_path_buf());
    let filters_dir = filters_dir
        .canonicalize()
        .unwrap_or_else(|_| filters_dir.to_path_buf());
    let watched_filters = filters_dir.clone();
    let cfg = config_file.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        for path in event.paths {
            let relevant = path == cfg
                || (path.parent() == Some(watched_filters.as_path())
                    && matches!(
                        path.extension().and_then(|e| e.to_str()),
                        Some("wasm" | "toml")
                    ));
            if !relevant {
                continue;
            }
            let trigger = match event.kind {
                // Renamed into place: complete.
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                    if path.exists() =>
                {
                    Trigger::FileWritten(path)
                }
                // Closed after writing: complete for a module or its
                // NAME.toml. The config file still settles, since tools
                // write it in several open/close steps (`cat a > f; cat b
                // >> f`) and a valid prefix could drop listeners.
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    if path.exists() && path != cfg =>
                {
                    Trigger::FileWritten(path)
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write)) if path == cfg => {
                    Trigger::FileChanged(path)
                }
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) if !path.exists() => {
                    Trigger::FileRemoved(path)
                }
                // Possibly still being written.
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => {
                    Trigger::FileChanged(path)
                }
                _ => continue,
            };
            let _ = tx.send(trigger);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cannot watch files, reload only on SIGHUP and POST /reload: {e}");
            return None;
        }
    };
    let dirs: Vec<PathBuf> = [
        config_file.parent().map(Path::to_path_buf),
        Some(filters_dir),
    ]
    .into_iter()
    .flatten()
    .collect();
    for dir in dirs {
        if !dir.is_dir() {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), "cannot create a watched directory: {e}");
                continue;
            }
        }
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
        }
    }
    Some(Watcher { _inner: watcher })
}
