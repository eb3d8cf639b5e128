use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::filter::FilterSet;

const TEXT: &str = r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:15001"
  [[listeners.routes]]
  match = { host = "a" }
  cluster = "a"

[clusters.a]
endpoints = ["127.0.0.1:1", { address = "127.0.0.1:2", weight = 3 }]
health = { path = "/healthz", interval = "2s", timeout = "500ms", unhealthy = 3, healthy = 2 }
retry_budget = { ratio = 0.2, min_per_second = 10 }

[clusters.b]
discovery = { dns = "b.example", port = 80, refresh = "5s", nameserver = "127.0.0.1:5353" }
balance = "maglev"
hash_key = { cookie = "session" }
"#;

fn config(text: &str) -> Arc<Config> {
    let c = crate::config::parse(Path::new("/etc/wasp/wasp.toml"), text, |_| None);
    Arc::new(c.expect("valid config"))
}

fn snapshot(text: &str, previous: Option<&Snapshot>, metrics: &Arc<Metrics>) -> Snapshot {
    let compiled = compile(config(text), previous, metrics).expect("compiles");
    Snapshot::new(
        previous.map_or(1, |p| p.generation + 1),
        compiled,
        Arc::new(FilterSet::new(0, Vec::new())),
    )
}

#[test]
fn an_unchanged_cluster_keeps_its_state_and_a_changed_one_starts_fresh() {
    let metrics = Metrics::new();
    let old = snapshot(TEXT, None, &metrics);
    assert_eq!(old.clusters[0].state.endpoints().endpoints.len(), 2);
    assert!(
        old.clusters[1].state.endpoints().endpoints.is_empty(),
        "DNS starts empty"
    );
    let new = snapshot(
        &TEXT.replace("b.example", "c.example"),
        Some(&old),
        &metrics,
    );
    assert!(
        Arc::ptr_eq(&old.clusters[0].state, &new.clusters[0].state),
        "unchanged: kept"
    );
    assert!(
        !Arc::ptr_eq(&old.clusters[1].state, &new.clusters[1].state),
        "changed: fresh"
    );
}

#[test]
fn a_listener_keeps_its_connection_count_and_routes_carry_allow_and_stats() {
    let metrics = Metrics::new();
    let old = snapshot(TEXT, None, &metrics);
    let l = old.listener("outbound").expect("listener");
    l.open_connections
        .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    let route = &l.routes.routes()[0];
    assert_eq!(route.stats.len(), 1, "one series for its one cluster");
    assert!(route.allow.is_none());
    let new = snapshot(TEXT, Some(&old), &metrics);
    let l = new.listener("outbound").expect("listener");
    assert_eq!(
        l.open_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert!(new.listener("nope").is_none());
    assert_eq!(new.cluster_id("b"), Some(1));
}

#[test]
fn problems_found_compiling_point_into_the_file() {
    let text = "[clusters.a]\nendpoints = [\"no-such-host.invalid:80\"]\n\n[clusters.f]\ndiscovery = { file = \"missing-endpoints.toml\" }\n";
    let err = compile(config(text), None, &Metrics::new()).expect_err("cannot compile");
    let at: Vec<(usize, usize)> = err.problems.iter().map(|p| (p.line, p.column)).collect();
    assert_eq!(at, vec![(2, 13), (5, 13)], "{err}");
    assert!(err.problems[0].message.contains("cannot resolve"), "{err}");
    assert!(err.problems[1].message.contains("discovery"), "{err}");
}
