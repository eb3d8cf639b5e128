//! Wasm filters in the real proxy: compatibility fixtures built from source
//! with the community `proxy-wasm` crate (tests/wasm), for both guest
//! targets, driven through the `wasp` binary with real clients and servers.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

const TARGETS: [&str; 2] = ["wasm32-wasip1", "wasm32-unknown-unknown"];

fn post(addr: SocketAddr, path: &str, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("host", "app")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn listener(port: u16, pipeline: &str) -> String {
    format!(
        "[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [{pipeline}]\n  [[listeners.routes]]\n  name = \"main\"\n  cluster = \"app\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_chain_order_local_reply_and_body_rewrite() {
    let app = TestUpstream::start("app").await;
    for target in TARGETS {
        let dir = with_fixtures(target, &["headers", "order", "local-reply", "body-rewrite"]);
        let port = free_port();
        let config = format!(
            r#"
[filters.hdr]
module = "headers.wasm"
config = {{ request = {{ add = {{ x-added = "yes" }}, replace = {{ x-replace = "new" }}, remove = ["x-drop"] }}, response = {{ add = {{ x-resp = "r" }}, remove = ["x-upstream"] }} }}
[filters.one]
module = "order.wasm"
config = "one"
[filters.two]
module = "order.wasm"
config = "two"
[filters.three]
module = "order.wasm"
config = "three"
[filters.deny]
module = "local-reply.wasm"
[filters.rewrite]
module = "body-rewrite.wasm"

{}
[clusters.app]
endpoints = ["{}"]
"#,
            listener(port, r#""hdr", "one", "two", "three", "deny", "rewrite""#),
            app.addr
        );
        let wasp = Wasp::start_in(dir, &config, &[]);
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let client = h1_client();

        let req = http::Request::get(format!("http://{proxy}/h"))
            .header("host", "app")
            .header("x-drop", "secret")
            .header("x-replace", "old")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status, 200, "{target}: {r:?}\n{}", wasp.log_text());
        // The upstream echoes the headers it got in the body.
        assert!(r.body.contains("x-added: yes"), "{target}: {}", r.body);
        assert!(r.body.contains("x-replace: new"), "{target}: {}", r.body);
        assert!(!r.body.contains("x-drop"), "{target}: {}", r.body);
        assert!(
            r.body.contains("x-order: onetwothree\n"),
            "{target}: request order: {}",
            r.body
        );
        // Response side runs in reverse order.
        let order = r.header("x-order").unwrap_or("");
        assert_eq!(order, "threetwoone", "{target}: {r:?}");
        assert_eq!(r.header("x-resp"), Some("r"), "{target}");
        assert_eq!(
            r.header("x-upstream"),
            None,
            "{target}: response header removed"
        );

        let before = app.requests();
        let r = get(&client, proxy, "app", "/deny/this").await;
        assert_eq!(r.status, 403, "{target}: {r:?}");
        assert_eq!(
            app.requests(),
            before,
            "{target}: a local reply must not go upstream"
        );

        let r = send(&client, post(proxy, "/echo", "say foo to the world")).await;
        assert_eq!(r.status, 200, "{target}: {r:?}");
        assert_eq!(
            r.body, "say bar to the wasm",
            "{target}: both bodies rewritten"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callout_pauses_then_allows_or_denies() {
    let app = TestUpstream::start("app").await;
    let authz = TestUpstream::start("authz").await;
    for target in TARGETS {
        let dir = with_fixtures(target, &["callout"]);
        let port = free_port();
        let config = format!(
            "[filters.authz]\nmodule = \"callout.wasm\"\nconfig = \"authz\"\n\n{}\n[clusters.app]\nendpoints = [\"{}\"]\n[clusters.authz]\nendpoints = [\"{}\"]\n",
            listener(port, "\"authz\""),
            app.addr,
            authz.addr
        );
        let wasp = Wasp::start_in(dir, &config, &[]);
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let client = h1_client();
        for (user, status) in [("alice", 200), ("mallory", 403)] {
            let req = http::Request::get(format!("http://{proxy}/x"))
                .header("host", "app")
                .header("x-user", user)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = send(&client, req).await;
            assert_eq!(
                r.status,
                status,
                "{target} {user}: {r:?}\n{}",
                wasp.log_text()
            );
            if status == 200 {
                assert!(r.body.contains("x-authz: ok-alice"), "{target}: {}", r.body);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_metrics_shared_data_and_timers() {
    let app = TestUpstream::start("app").await;
    let v2 = TestUpstream::start("reviews-v2").await;
    let dir = with_fixtures(
        "wasm32-wasip1",
        &["properties", "metrics", "shared-data", "timer"],
    );
    let port = free_port();
    let config = format!(
        r#"
[proxy]
workers = 2

[filters.props]
module = "properties.wasm"
[filters.m]
module = "metrics.wasm"
[filters.shared]
module = "shared-data.wasm"
[filters.tick]
module = "timer.wasm"

{}
[clusters.app]
endpoints = ["{}"]
[clusters.reviews-v2]
endpoints = ["{}"]
"#,
        listener(port, r#""props", "m", "shared", "tick""#),
        app.addr,
        v2.addr
    );
    let wasp = Wasp::start_in(dir, &config, &[]);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let n = 20;
    let mut last_counter = 0;
    let mut conflicts = 0;
    for i in 0..n {
        // A new connection each time, so both workers serve requests.
        let client = h1_client();
        let r = get(&client, proxy, "app", &format!("/p/{i}?q=1")).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
        // The properties filter set wasp.cluster: the core honoured it.
        assert_eq!(r.header("x-upstream"), Some("reviews-v2"), "{r:?}");
        assert_eq!(
            r.header("x-prop-request.url_path"),
            Some(format!("/p/{i}").as_str())
        );
        assert_eq!(r.header("x-prop-request.method"), Some("GET"));
        assert_eq!(r.header("x-prop-listener_name"), Some("inbound"));
        assert_eq!(r.header("x-prop-route_name"), Some("main"));
        assert_eq!(r.header("x-prop-cluster_name"), Some("reviews-v2"));
        assert_eq!(r.header("x-prop-response.code"), Some("200"));
        assert_eq!(
            r.header("x-prop-upstream.address"),
            Some(v2.addr.to_string().as_str())
        );
        assert_eq!(r.header("x-prop-fixture.note"), Some("hello"));
        let counter: u64 = r
            .header("x-counter")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            counter > last_counter,
            "shared counter must grow across workers: {counter} after {last_counter}"
        );
        last_counter = counter;
        if r.header("x-cas-conflict") == Some("1") {
            conflicts += 1;
        }
    }
    assert_eq!(
        last_counter, n,
        "CAS increments from both workers all landed"
    );
    assert_eq!(
        conflicts, n,
        "the stale write is refused with CAS_MISMATCH every time"
    );
    let log = wasp.log_text();
    assert!(!log.contains("trap"), "no filter trapped:\n{log}");

    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(&metrics, "fixture_requests_total", &["filter=\"m\""]),
        Some(n as f64),
        "{metrics}"
    );
    assert!(metrics.contains("wasp_filter_calls_total"), "{metrics}");

    // Timers tick on their own.
    let first: u64 = get(&h1_client(), proxy, "app", "/t")
        .await
        .header("x-ticks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later: u64 = get(&h1_client(), proxy, "app", "/t")
        .await
        .header("x-ticks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(later >= first + 5, "ticks {first} -> {later}");

    let (status, filters) = wasp.admin_get("/filters");
    assert_eq!(status, 200);
    assert!(
        filters.contains("\"props\"") && filters.contains("sha256") || filters.contains("hash"),
        "{filters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filters_fail_only_their_requests() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures(
        "wasm32-wasip1",
        &["loop", "membomb", "trap-every-10th", "proc-exit"],
    );
    let (bad, good) = (free_port(), free_port());
    let config = format!(
        r#"
[filters.loop]
module = "loop.wasm"
limits = {{ cpu = "20ms" }}
[filters.bomb]
module = "membomb.wasm"
limits = {{ memory = "8MiB" }}
[filters.flaky]
module = "trap-every-10th.wasm"
fail = "open"
[filters.exit]
module = "proc-exit.wasm"

[[listeners]]
name = "hostile"
bind = "127.0.0.1:{bad}"
pipeline = ["loop", "bomb", "flaky", "exit"]
  [[listeners.routes]]
  cluster = "app"

[[listeners]]
name = "clean"
bind = "127.0.0.1:{good}"
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
        app.addr
    );
    let mut wasp = Wasp::start_in(dir, &config, &[]);
    let hostile: SocketAddr = format!("127.0.0.1:{bad}").parse().unwrap();
    let clean: SocketAddr = format!("127.0.0.1:{good}").parse().unwrap();
    let client = h1_client();
    for path in ["/loop", "/bomb", "/exit"] {
        let started = Instant::now();
        let r = get(&client, hostile, "app", path).await;
        assert_eq!(r.status, 503, "{path}: {r:?}");
        assert_eq!(r.header("x-wasp-error"), Some("filter_failed"), "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
        // Other listeners, and ordinary requests on this one, keep working.
        assert_eq!(
            get(&client, clean, "app", "/").await.status,
            200,
            "after {path}"
        );
        let mut ok = false;
        for _ in 0..50 {
            if get(&client, hostile, "app", "/fine").await.status == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            ok,
            "the VM was not rebuilt after {path}:\n{}",
            wasp.log_text()
        );
    }
    // fail = "open": the trapping filter is skipped, nobody sees an error.
    for i in 0..30 {
        let r = get(&client, hostile, "app", "/flaky").await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let metrics = wasp.metrics();
    assert!(
        metric_value(&metrics, "wasp_filter_traps_total", &["filter=\"flaky\""]).unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
    assert!(wasp.child.try_wait().unwrap().is_none(), "the proxy died");
}

#[test]
fn a_filter_whose_configure_fails_stops_startup_with_its_name() {
    let dir = with_fixtures("wasm32-wasip1", &["configure-false"]);
    let path = dir.path().join("wasp.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nbind = \"127.0.0.1:{}\"\n[filters.picky]\nmodule = \"configure-false.wasm\"\n{}\n[clusters.app]\nendpoints = [\"127.0.0.1:9\"]\n",
            free_port(),
            listener(free_port(), "\"picky\"")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("picky") && err.contains("proxy_on_configure"),
        "{err}"
    );
}
