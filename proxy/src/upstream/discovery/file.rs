//! File discovery: a TOML (`endpoints = [...]`) or JSON (`[...]` or
//! `{"endpoints": [...]}`) file of `"ip:port"` or `{ address, weight }`
//! entries, watched with `notify` (its directory, so renames over it are
//! seen) and polled every second as a fallback.

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use serde::Deserialize;

use crate::config::schema::EndpointDecl;
use crate::config::Endpoint;
use crate::upstream::cluster::ClusterState;

const POLL: Duration = Duration::from_secs(1);
const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listed {
    endpoints: Vec<EndpointDecl>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonFile {
    List(Vec<EndpointDecl>),
    Table(Listed),
}

/// Reads and parses an endpoints file.
pub fn read_endpoints_file(path: &Path) -> Result<Vec<Endpoint>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Endpoint>, String> {
    let json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with(['[', '{']);
    let decls = if json {
        match serde_json::from_str::<JsonFile>(text) {
            Ok(JsonFile::List(l)) => l,
            Ok(JsonFile::Table(t)) => t.endpoints,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    } else {
        toml::from_str::<Listed>(text)
            .map_err(|e| format!("{}: {}", path.display(), e.message().trim()))?
            .endpoints
    };
    decls
        .iter()
        .map(|d| {
            let (address, weight) = match d {
                EndpointDecl::Address(a) => (a.as_str(), 1),
                EndpointDecl::Weighted { address, weight } => (address.as_str(), *weight),
            };
            address
                .parse()
                .map(|addr| Endpoint { addr, weight })
                .map_err(|_| {
                    format!(
                        "{}: endpoint \"{address}\" is not an ip:port address",
                        path.display()
                    )
                })
        })
        .collect()
}

/// Watches `path` until the cluster is dropped.
pub async fn run(cluster: Weak<ClusterState>, path: PathBuf) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _watcher = watch(&path, tx);
    let mut last: Option<String> = None;
    loop {
        let Some(state) = cluster.upgrade() else {
            return;
        };
        match std::fs::read_to_string(&path) {
            Ok(text) if last.as_deref() != Some(text.as_str()) => {
                match parse(&path, &text) {
                    Ok(endpoints) => {
                        state.discovery_error.store(None);
                        if state.set_endpoints(&endpoints) {
                            tracing::info!(cluster = %state.name, file = %path.display(), endpoints = endpoints.len(), "file discovery: endpoint set changed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(cluster = %state.name, "file discovery: keeping the last endpoints: {e}");
                        state.discovery_error.store(Some(std::sync::Arc::new(e)));
                        state
                            .counters
                            .discovery_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                last = Some(text);
            }
            Ok(_) => {}
            Err(e) => {
                state
                    .discovery_error
                    .store(Some(std::sync::Arc::new(format!(
                        "cannot read {}: {e}",
                        path.display()
                    ))));
            }
        }
        drop(state);
        // Wake on a change (then let the writer finish) or at the poll.
        if let Ok(Some(())) = tokio::time::timeout(POLL, rx.recv()).await {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
        }
    }
}

fn watch(
    path: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .ok()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .ok()?;
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_shapes() {
        let t = parse(
            Path::new("e.toml"),
            "endpoints = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", weight = 3 }]",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].weight, 3);
        let j = parse(
            Path::new("e.json"),
            r#"[{"address": "[::1]:8080", "weight": 2}]"#,
        )
        .unwrap();
        assert_eq!(j[0].addr.port(), 8080);
        let j = parse(Path::new("e"), r#"{"endpoints": ["10.0.0.1:80"]}"#).unwrap();
        assert_eq!(j.len(), 1);
        assert!(parse(Path::new("e.toml"), "endpoints = [\"nope\"]").is_err());
    }
}
