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

fn parsed(text: &str) -> Config {
    let c = crate::config::parse(Path::new("/etc/wasp/wasp.toml"), text, |_| None);
    c.expect("valid config")
}

fn config(text: &str) -> Arc<Config> {
    Arc::new(parsed(text))
}

fn snapshot(text: &str, previous: Option<&Snapshot>, metrics: &Arc<Metrics>) -> Snapshot {
    let compiled = compile(config(text), previous).expect("compiles");
    Snapshot::new(
        previous.map_or(1, |p| p.generation + 1),
        compiled,
        Arc::new(FilterSet::new(0, Vec::new())),
        metrics,
    )
    .expect("builds")
}

fn rendered(metrics: &Metrics) -> String {
    let mut out = String::new();
    metrics.render(&mut out);
    out
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
    let err = compile(config(text), None).expect_err("cannot compile");
    let at: Vec<(usize, usize)> = err.problems.iter().map(|p| (p.line, p.column)).collect();
    assert_eq!(at, vec![(2, 13), (5, 13)], "{err}");
    assert!(err.problems[0].message.contains("cannot resolve"), "{err}");
    assert!(err.problems[1].message.contains("discovery"), "{err}");
}

/// A compiled config may still be rejected (a taken port, a filter that
/// fails to load), and a series is never removed: compiling registers none.
#[test]
fn series_are_registered_by_the_snapshot_not_by_compiling() {
    let metrics = Metrics::new();
    let compiled = compile(config(TEXT), None).expect("compiles");
    let before = rendered(&metrics);
    assert!(!before.contains("listener=\"outbound\""), "{before}");
    let snap = Snapshot::new(
        1,
        compiled,
        Arc::new(FilterSet::new(0, Vec::new())),
        &metrics,
    )
    .expect("builds");
    let after = rendered(&metrics);
    assert!(
        after.contains("wasp_downstream_connections_open{listener=\"outbound\"}"),
        "{after}"
    );
    let route = &snap.listener("outbound").expect("listener").routes.routes()[0];
    assert_eq!(route.stats.len(), 1);
}

/// Reloading an unchanged TLS listener or cluster keeps its loaded TLS (and
/// so its one file watcher); a changed one loads anew.
#[test]
fn unchanged_tls_is_kept_across_generations() {
    let dir = std::env::temp_dir().join(format!("wasp-snapshot-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = crate::certs::Ca::new("t", 10).expect("ca");
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = ca
        .issue(&crate::certs::Leaf {
            common_name: "t".into(),
            uris: vec![],
            dns: vec!["localhost".into()],
            ips: vec![],
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(2),
        })
        .expect("leaf");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    let text = format!(
        "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:15006\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n  [[listeners.routes]]\n  cluster = \"a\"\n\n[clusters.a]\nendpoints = [\"127.0.0.1:1\"]\ntls = {{ sni = \"a.example\" }}\n",
        cert_path.display(),
        key_path.display()
    );
    let metrics = Metrics::new();
    let tls = |s: &Snapshot| {
        let l = s
            .listener("in")
            .and_then(|l| l.tls.clone())
            .expect("listener tls");
        let c = s.clusters[0].tls.clone().expect("cluster tls");
        (l, c)
    };
    let first = snapshot(&text, None, &metrics);
    let second = snapshot(&text, Some(&first), &metrics);
    let (l1, c1) = tls(&first);
    let (l2, c2) = tls(&second);
    assert!(Arc::ptr_eq(&l1, &l2), "unchanged listener TLS: kept");
    assert!(Arc::ptr_eq(&c1, &c2), "unchanged cluster TLS: kept");

    let changed = text
        .replace("a.example", "b.example")
        .replace(" }\n  [[", ", min_version = \"1.3\" }\n  [[");
    let third = snapshot(&changed, Some(&second), &metrics);
    let (l3, c3) = tls(&third);
    assert!(!Arc::ptr_eq(&l2, &l3), "changed listener TLS: loaded anew");
    assert!(!Arc::ptr_eq(&c2, &c3), "changed cluster TLS: loaded anew");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A route that fails to compile is reported at its `[[listeners.routes]]`.
#[test]
fn a_route_that_fails_to_compile_points_at_the_route() {
    let mut config = parsed(TEXT);
    // Validation compiles the same regex, so a pattern it accepted cannot
    // fail here in practice: put one in by hand.
    config.listeners[0].routes[0].path = crate::config::route::PathMatch::Regex("(".into());
    let err = compile(Arc::new(config), None).expect_err("cannot compile");
    let at: Vec<(usize, usize)> = err.problems.iter().map(|p| (p.line, p.column)).collect();
    assert_eq!(at, vec![(5, 3)], "{err}");
    assert!(err.problems[0].message.contains("invalid regex"), "{err}");
}

#[test]
fn routes_with_the_same_filter_config_share_one_root_context() {
    let c = parsed(
        r#"
[filters.authz]
module = "authz.wasm"
config = { mode = "audit" }
[filters.trace]
module = "trace.wasm"
[clusters.app]
endpoints = ["127.0.0.1:1"]
[[listeners]]
name = "in"
bind = "127.0.0.1:2"
pipeline = ["trace", "authz"]
  [[listeners.routes]]
  match = { prefix = "/a" }
  cluster = "app"
  filters.authz.config = { mode = "strict" }
  [[listeners.routes]]
  match = { prefix = "/b" }
  cluster = "app"
  pipeline = ["authz"]
  filters.authz.config = { mode = "off" }
  [[listeners.routes]]
  match = { prefix = "/c" }
  cluster = "app"
  filters.authz.config = { mode = "strict" }
  [[listeners.routes]]
  match = { prefix = "/d" }
  cluster = "app"
  filters.authz.config = { mode = "audit" }
  [[listeners.routes]]
  match = { prefix = "/e" }
  cluster = "app"
  filters.trace.config = ""
  [[listeners.routes]]
  cluster = "app"
"#,
    );
    let specs = filter_specs(&c).unwrap();
    let authz = specs.iter().find(|s| s.name == "authz").unwrap();
    assert_eq!(
        authz.route_configs,
        vec![
            bytes::Bytes::from(r#"{"mode":"strict"}"#),
            bytes::Bytes::from(r#"{"mode":"off"}"#)
        ]
    );
    assert_eq!(authz.config, bytes::Bytes::from(r#"{"mode":"audit"}"#));
    // `/d` repeats authz's own config and `/e` trace's (none: empty
    // bytes, as the guest receives it): no extra root context for either.
    let trace = specs.iter().find(|s| s.name == "trace").unwrap();
    assert!(trace.route_configs.is_empty(), "{:?}", trace.route_configs);
    let variants: chains::ConfigVariants = specs
        .iter()
        .map(|s| {
            let v = chains::Variants {
                own: s.config.clone(),
                routes: s.route_configs.clone(),
            };
            (Arc::from(s.name.as_str()), v)
        })
        .collect();
    let chains = chains::chains(&c.listeners[0], &variants).unwrap();
    let of = |i: usize| -> Vec<(String, u32)> {
        chains.routes[i]
            .iter()
            .map(|e| (e.name.to_string(), e.config))
            .collect()
    };
    let entry = |n: &str, k: u32| (n.to_string(), k);
    assert_eq!(of(0), vec![entry("trace", 0), entry("authz", 1)]);
    assert_eq!(of(1), vec![entry("authz", 2)]);
    assert_eq!(of(2), of(0), "the same config, the same root context");
    assert_eq!(of(3), vec![entry("trace", 0), entry("authz", 0)]);
    assert_eq!(of(4), vec![entry("trace", 0), entry("authz", 0)]);
    assert!(Arc::ptr_eq(&chains.routes[5], &chains.listener));
    // The same entries as the listener's: moving between them skips nothing.
    assert!(Chains::covers(&chains.listener, &chains.routes[3]));
    // Moving from /c's chain to /a's skips nothing; from the listener's
    // to /a's would run authz with the wrong config.
    assert!(Chains::covers(&chains.routes[2], &chains.routes[0]));
    assert!(!Chains::covers(&chains.listener, &chains.routes[0]));
    assert_eq!(
        Chains::missing(&chains.listener, &chains.routes[1]),
        vec![Arc::<str>::from("authz")]
    );
}

/// Config text with filter `f` (the noop fixture, own config `{ mode =
/// "audit" }`) on listener "in", and `routes` under it.
fn noop_config(routes: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/wasm32-wasip1");
    assert!(
        dir.join("noop.wasm").is_file(),
        "missing wasm fixture: run scripts/build-wasm.sh first"
    );
    format!(
        "[proxy]\nfilters_dir = \"{}\"\n[filters.f]\nmodule = \"noop.wasm\"\nconfig = {{ mode = \"audit\" }}\n[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:2\"\npipeline = [\"f\"]\n{routes}",
        dir.display()
    )
}

fn noop_runtime() -> Arc<crate::filter::FilterRuntime> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/.cache");
    let callouts = Arc::new(crate::upstream::Callouts::default());
    crate::filter::FilterRuntime::new(Some(cache), callouts).unwrap()
}

const NOOP_ROUTES: &str = r#"
[[listeners.routes]]
match = { prefix = "/own" }
cluster = "app"
filters.f.config = { mode = "audit" }
[[listeners.routes]]
match = { prefix = "/strict" }
cluster = "app"
filters.f.config = { mode = "strict" }
"#;

/// The chains `Snapshot::new` builds number a route's config as the loaded
/// filter numbers its root contexts: the filter's own config is 0, the one
/// extra config 1, and the filter has exactly one extra root.
#[test]
fn snapshot_numbers_route_configs_as_the_loaded_filters_do() {
    let c = parsed(&noop_config(NOOP_ROUTES));
    let filters = noop_runtime().load(filter_specs(&c).unwrap()).unwrap();
    assert_eq!(filters.plugins[0].spec.route_configs.len(), 1);
    let metrics = Metrics::new();
    let compiled = compile(Arc::new(c), None).expect("compiles");
    let snap = Snapshot::new(1, compiled, filters, &metrics).expect("builds");
    let chains = &snap.listener("in").unwrap().chains;
    let configs = |i: usize| {
        chains.routes[i]
            .iter()
            .map(|e| e.config)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        configs(0),
        vec![0],
        "equal to the filter's own: its own root"
    );
    assert_eq!(configs(1), vec![1]);
}

/// A route's config that the loaded filter has no root context for (the
/// filters were loaded from another config) fails the snapshot: it never
/// runs on the filter's own config instead.
#[test]
fn a_route_config_the_filter_was_not_loaded_with_fails_the_snapshot() {
    let loaded_from = parsed(&noop_config(""));
    let filters = noop_runtime()
        .load(filter_specs(&loaded_from).unwrap())
        .unwrap();
    let c = parsed(&noop_config(NOOP_ROUTES));
    let metrics = Metrics::new();
    let compiled = compile(Arc::new(c), None).expect("compiles");
    let Err(err) = Snapshot::new(1, compiled, filters, &metrics) else {
        panic!("a config the filter has no root for is an error");
    };
    assert!(err.contains("per-route config of filter \"f\""), "{err}");
    assert!(err.contains("route 2"), "{err}");
}

/// An override equal to the section's config is no extra root context, so
/// it does not count toward `MAX_ROUTE_CONFIGS`.
#[test]
fn overrides_equal_to_the_own_config_do_not_count_toward_the_limit() {
    let mut routes = String::new();
    for k in 0..crate::config::route::MAX_ROUTE_CONFIGS {
        routes.push_str(&format!(
            "[[listeners.routes]]\nmatch = {{ prefix = \"/{k}\" }}\ncluster = \"app\"\nfilters.f.config = {{ mode = \"m{k}\" }}\n"
        ));
    }
    routes.push_str(
        "[[listeners.routes]]\ncluster = \"app\"\nfilters.f.config = { mode = \"audit\" }\n",
    );
    let text = noop_config(&routes);
    let c = crate::config::parse(Path::new("/etc/wasp/wasp.toml"), &text, |_| None);
    let c = c.unwrap_or_else(|p| panic!("the limit counts only extra roots: {p:?}"));
    let specs = filter_specs(&c).unwrap();
    assert_eq!(
        specs[0].route_configs.len(),
        crate::config::route::MAX_ROUTE_CONFIGS
    );
}
