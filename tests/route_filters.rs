//! Per-route filter pipelines through the real binary: a route's own
//! `pipeline` (replace), `pipeline_append` (extend) and
//! `filters.NAME.config` (a per-route config in a root context of its own,
//! on the same instances), chosen from the route the client's request
//! matched; a filter that reroutes a request cannot skip the filters of the
//! route it lands on; reload swaps a route's chain; a trap on one route
//! leaves the others serving.
//!
//! The fixture is `headers` (tests/wasm/headers): each filter declared from
//! it adds the request headers its config names, so the upstream (which
//! echoes the headers it got) shows which filters ran, with which config.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::config::{Cluster, Config, Filter, Listener, Route};
use support::upstream::TestUpstream;
use support::*;

const TARGET: &str = "wasm32-wasip1";

/// `[filters.NAME]` of the headers fixture adding `header: value` to requests.
fn adds(name: &str, header: &str, value: &str) -> Filter {
    Filter::new(name, "headers.wasm").config(&format!(
        r#"{{ request = {{ add = {{ {header} = "{value}" }} }} }}"#
    ))
}

/// The filters and clusters every test here uses, and `listener`.
fn config(listener: Listener, app: SocketAddr) -> Config {
    Config::new()
        .filter(adds("x", "x-ran-x", "base"))
        .filter(adds("y", "x-ran-y", "1"))
        .filter(adds("z", "x-ran-z", "1"))
        .filter(Filter::new("trap", "isolation.wasm"))
        .listener(listener)
        .cluster(Cluster::new("app", [app]))
}

/// The listener of the pipeline test: its own pipeline is `["z"]`; route
/// "a" gets what `route_a` adds.
fn routes_listener(port: u16, route_a: impl FnOnce(Route) -> Route) -> Listener {
    let route = |name: &str, prefix: &str| {
        Route::to("app")
            .named(name)
            .matching(&format!(r#"prefix = "{prefix}""#))
    };
    Listener::http("inbound", port)
        .pipeline(&["z"])
        .route(route_a(route("a", "/a")))
        .route(route("b", "/b").pipeline(&["x", "y"]))
        .route(
            route("c", "/c")
                .pipeline_append(&["x"])
                .filter_config("x", OVERRIDE),
        )
        .route(route("d", "/d"))
        .route(
            Route::to("app")
                .named("guarded")
                .matching(r#"prefix = "/open", headers = { x-ran-z = "1" }"#)
                .pipeline_append(&["y"]),
        )
        .route(route("open", "/open").pipeline(&["z"]))
        .route(
            Route::to("app")
                .named("after-z")
                .matching(r#"prefix = "/u", headers = { x-ran-z = "1" }"#),
        )
}

/// Route c's config for x.
const OVERRIDE: &str = r#"{ request = { add = { x-ran-x = "override" } } }"#;

/// Starts wasp with the `headers` and `isolation` fixtures on [`config`]
/// around the listener `listener` makes for a free port; returns it with
/// the listener's address.
fn start(app: &TestUpstream, listener: impl FnOnce(u16) -> Listener) -> (Wasp, SocketAddr) {
    let dir = with_fixtures(TARGET, &["headers", "isolation"]);
    Wasp::start_on_free_port(dir, |port| config(listener(port), app.addr).toml())
}

/// Which of the test filters ran on a request the upstream echoed, as
/// `x=<value>,y,z` (absent ones left out).
fn ran(r: &Answer) -> String {
    let mut out = Vec::new();
    for line in r.body.lines() {
        if let Some(v) = line.strip_prefix("x-ran-x: ") {
            out.push(format!("x={v}"));
        }
    }
    if r.body.lines().any(|l| l == "x-ran-y: 1") {
        out.push("y".into());
    }
    if r.body.lines().any(|l| l == "x-ran-z: 1") {
        out.push("z".into());
    }
    out.join(",")
}

async fn get_with(
    client: &TestClient,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = http::Request::get(format!("http://{proxy}{path}")).header("host", "app");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_pipelines_replace_extend_override_and_guard_reroutes() {
    let app = TestUpstream::start("app").await;
    let (wasp, proxy) = start(&app, |port| routes_listener(port, |a| a.pipeline(&["x"])));
    let client = h1_client();

    // Replace, replace with two, extend with a per-route config, default.
    for (path, want) in [
        ("/a", "x=base"),
        ("/b", "x=base,y"),
        ("/c", "x=override,z"),
        ("/d", "z"),
        // Again, interleaved: the override stays on its route only.
        ("/a", "x=base"),
        ("/c", "x=override,z"),
    ] {
        let r = get(&client, proxy, "app", path).await;
        assert_eq!(r.status, 200, "{path}: {r:?}\n{}", wasp.log_text());
        assert_eq!(ran(&r), want, "{path}: {}", r.body);
    }

    // No route matches as sent: the listener's pipeline runs, and its
    // filter's header then routes the request (to a route without filter
    // settings, so nothing is skipped).
    let r = get(&client, proxy, "app", "/u/1").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(ran(&r), "z", "{}", r.body);

    // Matched "open" (pipeline ["z"]) as sent; z's header then makes it
    // match "guarded", whose "y" did not run: refused, not skipped.
    let before = app.requests();
    let r = get(&client, proxy, "app", "/open").await;
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.header("x-wasp-error"), Some("reroute_denied"), "{r:?}");
    assert!(
        r.body.contains("\"guarded\"") && r.body.contains('y'),
        "{}",
        r.body
    );
    assert_eq!(app.requests(), before, "a refused reroute goes nowhere");
    // Sent to "guarded" directly: its whole chain runs.
    let r = get_with(&client, proxy, "/open", &[("x-ran-z", "1")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(ran(&r), "y,z", "{}", r.body);
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["code=\"reroute_denied\""]
        ),
        Some(1.0),
        "{metrics}"
    );

    // The per-route config is a root context in the filter's instances,
    // not instances of its own: x (two configs) has as many instances as
    // y (one), on this one worker serving one request at a time.
    let (status, filters) = wasp.admin_get("/filters");
    assert_eq!(status, 200, "{filters}");
    let list: serde_json::Value = serde_json::from_str(&filters).unwrap();
    let created = |name: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|f| f["name"] == name))
            .map(|f| f["instances"]["created"].clone())
    };
    assert!(created("x").is_some(), "{filters}");
    assert_eq!(created("x"), created("y"), "{filters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_a_routes_pipeline() {
    let app = TestUpstream::start("app").await;
    let (wasp, proxy) = start(&app, |port| routes_listener(port, |a| a.pipeline(&["x"])));
    let client = h1_client();
    let r = get(&client, proxy, "app", "/a").await;
    assert_eq!(ran(&r), "x=base", "{}", r.body);

    // Route "a" gets x back with a config of its own, ahead of route c's
    // in the file: the per-route configs are numbered again.
    let route_a = |a: Route| {
        a.pipeline(&["y", "z", "x"])
            .filter_config("x", r#"{ request = { add = { x-ran-x = "a2" } } }"#)
    };
    wasp.rewrite_config(&config(routes_listener(proxy.port(), route_a), app.addr).toml());
    wasp.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&client, proxy, "app", "/a").await;
        assert_eq!(r.status, 200, "{r:?}");
        if ran(&r) == "x=a2,y,z" {
            break;
        }
        assert_eq!(ran(&r), "x=base", "old or new chain only: {}", r.body);
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other routes kept theirs (the override too, now the second
    // per-route config of x), and x's own config is still its own.
    for (path, want) in [
        ("/c", "x=override,z"),
        ("/b", "x=base,y"),
        ("/a", "x=a2,y,z"),
    ] {
        let r = get(&client, proxy, "app", path).await;
        assert_eq!(ran(&r), want, "{path}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_on_one_route_leaves_the_others_serving() {
    let app = TestUpstream::start("app").await;
    // "t" runs the trapping filter (x-trap: 1 makes it panic) and x with a
    // per-route config; "s" runs x with its own config, in the same
    // instances.
    let listener = |port| {
        Listener::http("inbound", port)
            .route(
                Route::to("app")
                    .named("t")
                    .matching(r#"prefix = "/t""#)
                    .pipeline(&["trap", "x"])
                    .filter_config("x", r#"{ request = { add = { x-ran-x = "t" } } }"#),
            )
            .route(
                Route::to("app")
                    .named("s")
                    .matching(r#"prefix = "/s""#)
                    .pipeline(&["x"]),
            )
    };
    let (wasp, proxy) = start(&app, listener);
    let client = h1_client();
    for round in 0..3 {
        let r = get_with(&client, proxy, "/t", &[("x-trap", "1")]).await;
        assert_eq!(r.status, 503, "round {round}: {r:?}");
        assert_eq!(r.header("x-wasp-error"), Some("filter_failed"), "{r:?}");
        let r = get(&client, proxy, "app", "/s").await;
        assert_eq!(r.status, 200, "round {round}: {r:?}\n{}", wasp.log_text());
        assert_eq!(ran(&r), "x=base", "round {round}: {}", r.body);
        let r = get(&client, proxy, "app", "/t").await;
        assert_eq!(r.status, 200, "round {round}: {r:?}");
        assert_eq!(ran(&r), "x=t", "round {round}: {}", r.body);
    }
    // Without a route, no filter (the listener has no pipeline).
    let r = get_with(&client, proxy, "/nowhere", &[("x-trap", "1")]).await;
    assert_eq!(r.header("x-wasp-error"), Some("no_route"), "{r:?}");
}

#[test]
fn check_shows_route_chains_and_a_refused_route_config_stops_the_start() {
    let dir = with_fixtures(TARGET, &["headers", "isolation"]);
    let port = free_port();
    let admin = free_port();
    let app = loopback(free_port());
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:{admin}\"\n\n{}",
        config(routes_listener(port, |a| a.pipeline(&["x"])), app)
    );
    let path = dir.path().join("wasp.toml");
    std::fs::write(&path, &text).unwrap();
    let out = wasp_ok(["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("route b -> app  pipeline: [x, y]"), "{out}");
    assert!(out.contains("route c -> app  pipeline: [z, x*]"), "{out}");
    assert!(out.contains("route d -> app\n"), "{out}");

    // The headers fixture refuses a configuration that is not JSON: a
    // route's config is checked at load like the filter's own.
    let bad = text.replace(
        &format!("filters.x.config = {OVERRIDE}"),
        "filters.x.config = \"not json\"",
    );
    assert_ne!(bad, text);
    std::fs::write(&path, &bad).unwrap();
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let mut child = std::process::Command::new(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wasp started with a refused route config");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("filter \"x\"") && err.contains("with a route's filters.NAME.config"),
        "{err}"
    );
}

/// The callout fixture as `authz` on the listener (it asks the cluster its
/// config names, `authz`), and `/strict` giving it `strict_config`; the
/// clusters `app`, `authz` and `strict` are those upstreams.
fn callout_config(
    port: u16,
    strict_config: &str,
    [app, authz, strict]: [&TestUpstream; 3],
) -> Config {
    Config::new()
        .filter(Filter::new("authz", "callout.wasm").config(r#""authz""#))
        .listener(
            Listener::http("inbound", port)
                .pipeline(&["authz"])
                .route(
                    Route::to("app")
                        .matching(r#"prefix = "/strict""#)
                        .filter_config("authz", strict_config),
                )
                .to("app"),
        )
        .cluster(Cluster::new("app", [app.addr]))
        .cluster(Cluster::new("authz", [authz.addr]))
        .cluster(Cluster::new("strict", [strict.addr]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_config_steers_a_filters_callouts() {
    let app = TestUpstream::start("app").await;
    let authz = TestUpstream::start("authz").await;
    let strict = TestUpstream::start("strict").await;
    // The callout fixture asks the cluster its config names; "/strict"
    // gives it another one. The listener's pipeline has it everywhere.
    let (wasp, proxy) = Wasp::start_on_free_port(with_fixtures(TARGET, &["callout"]), |port| {
        callout_config(port, r#""strict""#, [&app, &authz, &strict]).toml()
    });
    let client = h1_client();
    for (path, user, status, via_strict) in [
        ("/", "alice", 200, false),
        ("/strict", "alice", 200, true),
        ("/strict", "mallory", 403, true),
        ("/", "mallory", 403, false),
        ("/strict/x", "alice", 200, true),
    ] {
        let (a, s) = (authz.requests(), strict.requests());
        let r = get_with(&client, proxy, path, &[("x-user", user)]).await;
        assert_eq!(
            r.status,
            status,
            "{path} {user}: {r:?}\n{}",
            wasp.log_text()
        );
        let asked = (authz.requests() - a, strict.requests() - s);
        let want = if via_strict { (0, 1) } else { (1, 0) };
        assert_eq!(asked, want, "{path} {user}: callouts to (authz, strict)");
    }
}

/// A listener whose pipeline (`z`, standing for authz) every route keeps
/// but `public`, which replaces it with nothing.
fn edge_listener(port: u16) -> Listener {
    Listener::http("edge", port)
        .pipeline(&["z"])
        .route(
            Route::to("app")
                .named("admin")
                .matching(r#"host = "admin.example""#),
        )
        .route(
            Route::to("app")
                .named("public")
                .matching(r#"prefix = "/public""#)
                .pipeline(&[]),
        )
        .route(Route::to("app").named("rest").matching(r#"prefix = "/""#))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_or_host_spelled_differently_cannot_skip_the_listeners_filters() {
    let app = TestUpstream::start("app").await;
    let (wasp, proxy) = start(&app, edge_listener);
    let client = h1_client();

    // (host, path as sent, filters that ran, path the upstream got)
    for (host, path, want, upstream_path) in [
        ("app", "/public/x", "", "/public/x"),
        ("app", "/public/../admin", "z", "/admin"),
        ("app", "/public/%2e%2e/admin", "z", "/admin"),
        ("app", "/public/.%2E/admin?q=1", "z", "/admin?q=1"),
        ("app", "//public//x", "", "/public/x"),
        ("admin.example.", "/public/x", "z", "/public/x"),
        ("admin.example.:80", "/public/x", "z", "/public/x"),
    ] {
        let r = get(&client, proxy, host, path).await;
        assert_eq!(r.status, 200, "{host} {path}: {r:?}\n{}", wasp.log_text());
        assert_eq!(ran(&r), want, "{host} {path}: {}", r.body);
        assert_eq!(
            r.header("x-seen-path"),
            Some(upstream_path),
            "{host} {path}: the upstream gets the path the route saw"
        );
    }
    // The host the upstream gets is the one the route saw.
    let r = get(&client, proxy, "admin.example.", "/x").await;
    assert!(
        r.body.lines().any(|l| l == "host: admin.example"),
        "{}",
        r.body
    );

    // Spellings an upstream could read as another path: refused.
    let before = app.requests();
    for path in [
        "/public%2F..%2Fadmin",
        "/public%2f..",
        "/public%5C..%5Cadmin",
        "/public/../../admin",
        "/%2e%2e/admin",
    ] {
        let r = get(&client, proxy, "app", path).await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert_eq!(r.header("x-wasp-error"), Some("bad_request"), "{path}");
    }
    assert_eq!(app.requests(), before, "a refused path goes nowhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_picking_a_cluster_cannot_skip_the_filters_of_its_routes() {
    let app = TestUpstream::start("app").await;
    let v2 = TestUpstream::start("reviews-v2").await;
    // `canary` (the properties fixture) sets wasp.cluster = reviews-v2,
    // whose route keeps the listener's `z` (standing for authz).
    let config = |port| {
        Config::new()
            .filter(adds("z", "x-ran-z", "1"))
            .filter(Filter::new("canary", "properties.wasm"))
            .listener(
                Listener::http("edge", port)
                    .pipeline(&["z"])
                    .route(
                        Route::to("reviews-v2")
                            .named("reviews")
                            .matching(r#"prefix = "/reviews""#),
                    )
                    .route(
                        Route::to("app")
                            .named("open")
                            .matching(r#"prefix = "/open""#)
                            .pipeline(&["canary"]),
                    )
                    .route(
                        Route::to("app")
                            .named("both")
                            .matching(r#"prefix = "/both""#)
                            .pipeline(&["z", "canary"]),
                    ),
            )
            .cluster(Cluster::new("app", [app.addr]))
            .cluster(Cluster::new("reviews-v2", [v2.addr]))
            .toml()
    };
    let (wasp, proxy) =
        Wasp::start_on_free_port(with_fixtures(TARGET, &["headers", "properties"]), config);
    let client = h1_client();

    let (a, b) = (app.requests(), v2.requests());
    let r = get(&client, proxy, "app", "/open").await;
    assert_eq!(r.status, 500, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.header("x-wasp-error"), Some("reroute_denied"), "{r:?}");
    assert!(
        r.body.contains("reviews-v2") && r.body.contains('z'),
        "{}",
        r.body
    );
    assert_eq!(
        (app.requests(), v2.requests()),
        (a, b),
        "refused: sent nowhere"
    );

    // With the cluster's routes' filters in the chain, the pick stands.
    let r = get(&client, proxy, "app", "/both").await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    assert_eq!(ran(&r), "z", "{}", r.body);
    assert_eq!(v2.requests(), b + 1, "the filter's cluster got it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_route_roots_callout_is_answered_on_that_root() {
    let app = TestUpstream::start("app").await;
    let authz = TestUpstream::start("authz").await;
    let strict = TestUpstream::start("strict").await;
    // "root:strict" makes the per-route root context of "/strict" call
    // the strict cluster from proxy_on_configure (in every instance and
    // in the root instance); its answer must come back to that root,
    // which logs the plugin configuration it sees.
    let (wasp, proxy) = Wasp::start_on_free_port(with_fixtures(TARGET, &["callout"]), |port| {
        callout_config(port, r#""root:strict""#, [&app, &authz, &strict]).toml()
    });
    let client = h1_client();
    // Streams on both roots, so stream instances exist and answer too.
    for path in ["/", "/strict"] {
        let r = get_with(&client, proxy, path, &[("x-user", "alice")]).await;
        assert_eq!(r.status, 200, "{path}: {r:?}\n{}", wasp.log_text());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let want = "root callout answered (ok-root) under config root:strict";
    while !wasp.log_text().contains(want) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = wasp.log_text();
    assert!(log.contains(want), "{log}");
    assert!(
        !log.contains("root callout answered (ok-root) under config authz"),
        "an answer went to root 1: {log}"
    );
    assert!(strict.requests() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_moving_a_request_off_every_route_gets_no_route() {
    let app = TestUpstream::start("app").await;
    // `rw` moves every request it sees to a path no route matches.
    let rw = Filter::new("rw", "headers.wasm")
        .config(r#"{ request = { replace = { ":path" = "/nowhere" } } }"#);
    let listener = |port| {
        Listener::http("edge", port).pipeline(&["z"]).route(
            Route::to("app")
                .named("moved")
                .matching(r#"prefix = "/moved""#)
                .pipeline(&["rw"]),
        )
    };
    let (wasp, proxy) =
        Wasp::start_on_free_port(with_fixtures(TARGET, &["headers", "isolation"]), |port| {
            config(listener(port), app.addr).filter(rw).toml()
        });
    let client = h1_client();
    // Nothing would be forwarded, so nothing is skipped: 404, not 500.
    let r = get(&client, proxy, "app", "/moved").await;
    assert_eq!(r.status, 404, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.header("x-wasp-error"), Some("no_route"), "{r:?}");
    assert_eq!(app.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_route_root_cannot_change_the_filters_ticks() {
    let app = TestUpstream::start("app").await;
    // The route's config asks for no ticks from its root context's
    // on_configure (after root 1 asked for 10ms): ignored.
    let config = |port| {
        Config::new()
            .filter(Filter::new("tick", "timer.wasm"))
            .listener(
                Listener::http("inbound", port)
                    .pipeline(&["tick"])
                    .route(
                        Route::to("app")
                            .matching(r#"prefix = "/quiet""#)
                            .filter_config("tick", r#""no-ticks""#),
                    )
                    .to("app"),
            )
            .cluster(Cluster::new("app", [app.addr]))
            .toml()
    };
    let (wasp, proxy) = Wasp::start_on_free_port(with_fixtures(TARGET, &["timer"]), config);
    let client = h1_client();
    let ticks = |r: &Answer| -> u64 {
        r.header("x-ticks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let first = get(&client, proxy, "app", "/quiet").await;
    assert_eq!(first.status, 200, "{first:?}\n{}", wasp.log_text());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut later = ticks(&first);
    while later < ticks(&first) + 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        later = ticks(&get(&client, proxy, "app", "/").await);
    }
    assert!(
        later >= ticks(&first) + 5,
        "the filter's own ticks stopped: {} -> {later}",
        ticks(&first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_under_a_per_route_root_spares_the_filters_concurrent_streams() {
    let app = TestUpstream::start("app").await;
    // The trapping filter itself has a per-route config on "t"; "s" runs
    // it with its own config, in the same instances, at the same time.
    let listener = |port| {
        Listener::http("inbound", port)
            .pipeline(&["trap"])
            .route(
                Route::to("app")
                    .named("t")
                    .matching(r#"prefix = "/t""#)
                    .filter_config("trap", "{ configure_ms = 0 }"),
            )
            .route(Route::to("app").named("s").matching(r#"prefix = "/s""#))
    };
    let (wasp, proxy) = start(&app, listener);
    let mut tasks = Vec::new();
    for i in 0..40 {
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let trap = i % 4 == 0;
            let path = if trap { "/t" } else { "/s" };
            let headers: &[(&str, &str)] = if trap { &[("x-trap", "1")] } else { &[] };
            (trap, get_with(&client, proxy, path, headers).await)
        }));
    }
    for t in tasks {
        let (trap, r) = t.await.unwrap();
        if trap {
            assert_eq!(r.status, 503, "{r:?}");
            assert_eq!(r.header("x-wasp-error"), Some("filter_failed"), "{r:?}");
        } else {
            assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
            assert_eq!(r.header("x-filtered"), Some("1"), "{r:?}");
        }
    }
    // The per-route root is rebuilt with the instances: "t" serves again.
    let r = get(&h1_client(), proxy, "app", "/t").await;
    assert_eq!(r.status, 200, "{r:?}");
}
