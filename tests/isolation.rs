//! Filter isolation through the real binary: the blast radius of a failing
//! filter is the request it was serving. Uses the `isolation` fixture
//! (tests/wasm/isolation): `x-trap: 1` traps in `on_http_request_headers`,
//! any other request gets `x-filtered: 1` on the request and the response;
//! its config can slow `on_configure` down and ask for a 1 ms tick with a
//! heavy `on_tick`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

const TARGET: &str = "wasm32-wasip1";

fn req(proxy: SocketAddr, path: &str, trap: bool) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(format!("http://{proxy}{path}")).header("host", "app");
    if trap {
        b = b.header("x-trap", "1");
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// One worker; listener `inbound` on `port` runs `iso` (fail policy `fail`,
/// `extra` TOML lines in its table); listener `plain` on `plain_port` runs
/// no filter.
fn config(port: u16, plain_port: u16, app: SocketAddr, fail: &str, extra: &str) -> String {
    format!(
        r#"
[proxy]
workers = 1

[filters.iso]
module = "isolation.wasm"
fail = "{fail}"
{extra}

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["iso"]
  [[listeners.routes]]
  cluster = "app"

[[listeners]]
name = "plain"
bind = "127.0.0.1:{plain_port}"
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#
    )
}

/// The `instances` object of filter `name` in `/filters`.
fn instances(wasp: &Wasp, name: &str) -> serde_json::Value {
    let (_, body) = wasp.admin_get("/filters");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v.get("filters").and_then(|f| f.as_array().cloned()))
        .unwrap_or_default();
    list.into_iter()
        .find(|e| e["name"] == name)
        .map(|e| e["instances"].clone())
        .unwrap_or_default()
}

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// 8 clean requests in flight to a slow upstream while one request on the
/// same worker traps: all 8 are answered 200 with the filter's effect; the
/// trapping one by the policy.
///
/// Also with `limits.instances = 2`, far below the 8 in flight: a busy
/// worker builds past what it keeps rather than make strangers share an
/// instance (and so share its failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_its_own_request() {
    let app = TestUpstream::start("app").await;
    for (fail, extra) in [
        ("closed", ""),
        ("open", ""),
        ("closed", "limits = { instances = 2 }"),
        ("open", "limits = { instances = 2 }"),
    ] {
        let dir = with_fixtures(TARGET, &["isolation"]);
        let (port, plain) = (free_port(), free_port());
        let wasp = Wasp::start_in(dir, &config(port, plain, app.addr, fail, extra), &[]);
        let proxy = loopback(port);
        let client = h1_client();
        // The filter is warm on the worker.
        let r = send(&client, req(proxy, "/", false)).await;
        assert_eq!(r.status, 200, "{fail}: {r:?}");

        let before = app.requests();
        let clean: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { send(&client, req(proxy, "/slow?ms=1500", false)).await })
            })
            .collect();
        // All 8 are in flight (they reached the upstream) before the trap.
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.requests() < before + 8 {
            assert!(
                Instant::now() < deadline,
                "{fail}: clean requests never reached the app"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = send(&client, req(proxy, "/", true)).await;
        match fail {
            "closed" => {
                assert_eq!(t.status, 503, "{fail}: {t:?}");
                assert_eq!(t.header("x-wasp-error"), Some("filter_failed"), "{t:?}");
            }
            _ => {
                assert_eq!(t.status, 200, "{fail}: {t:?}");
                assert_eq!(t.header("x-filtered"), None, "{fail}: skipped: {t:?}");
            }
        }
        for c in clean {
            let r = c.await.unwrap();
            assert_eq!(r.status, 200, "{fail}: {r:?}\n{}", wasp.log_text());
            assert_eq!(r.header("x-filtered"), Some("1"), "{fail}: {r:?}");
            assert!(r.body.contains("slow 1500ms done"), "{fail}: {r:?}");
        }
        let i = instances(&wasp, "iso");
        assert_eq!(count(&i, "failed"), 1, "{fail}: {i}");
        // The next request runs the filter.
        let r = send(&client, req(proxy, "/", false)).await;
        assert_eq!(r.header("x-filtered"), Some("1"), "{fail}: {r:?}");
    }
}

/// For 3 s one client sends only trapping requests while others send clean
/// ones: every clean request is 200 and carries the filter's effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_stream_never_fails_or_skips_clean_requests() {
    let app = TestUpstream::start("app").await;
    for fail in ["closed", "open"] {
        let dir = with_fixtures(TARGET, &["isolation"]);
        let (port, plain) = (free_port(), free_port());
        let wasp = Wasp::start_in(dir, &config(port, plain, app.addr, fail, ""), &[]);
        let proxy = loopback(port);
        let stop = Arc::new(AtomicBool::new(false));
        let poisoned = Arc::new(AtomicUsize::new(0));
        let poison = {
            let (stop, poisoned) = (stop.clone(), poisoned.clone());
            let fail = fail.to_string();
            tokio::spawn(async move {
                let client = h1_client();
                while !stop.load(Ordering::Relaxed) {
                    let r = send(&client, req(proxy, "/", true)).await;
                    let expected = if fail == "closed" { 503 } else { 200 };
                    assert_eq!(r.status, expected, "{fail}: {r:?}");
                    assert_eq!(r.header("x-filtered"), None, "{fail}: {r:?}");
                    poisoned.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let clean: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                let fail = fail.to_string();
                tokio::spawn(async move {
                    let client = h1_client();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let r = send(&client, req(proxy, "/", false)).await;
                        assert_eq!(r.status, 200, "{fail}: clean request {n}: {r:?}");
                        assert_eq!(r.header("x-filtered"), Some("1"), "{fail}: {n}: {r:?}");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        poison.await.unwrap();
        let mut served = 0;
        for c in clean {
            served += c.await.unwrap();
        }
        let poisoned = poisoned.load(Ordering::Relaxed);
        assert!(served > 20, "{fail}: only {served} clean requests");
        assert!(poisoned > 20, "{fail}: only {poisoned} poison requests");
        let i = instances(&wasp, "iso");
        assert!(count(&i, "failed") >= poisoned as u64, "{fail}: {i}");
        assert_eq!(count(&i, "build_failures"), 0, "{fail}: {i}");
    }
}

/// A filter whose `on_configure` takes ~0.5 s: after a trap, its
/// replacement is built off the worker, so the worker keeps answering (a
/// request without filters and a clean filtered request both finish before
/// the replacement instance is ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_up_does_not_stall_the_worker() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures(TARGET, &["isolation"]);
    let (port, plain) = (free_port(), free_port());
    let cfg = config(
        port,
        plain,
        app.addr,
        "closed",
        "config = { configure_ms = 500 }",
    );
    let wasp = Wasp::start_in(dir, &cfg, &[]);
    let proxy = loopback(port);
    let client = h1_client();
    let r = send(&client, req(proxy, "/", false)).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Wait until the worker holds a spare instance besides the one used.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&instances(&wasp, "iso"), "idle") < 2 {
        assert!(Instant::now() < deadline, "{}", instances(&wasp, "iso"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let created = count(&instances(&wasp, "iso"), "created");

    let t = send(&client, req(proxy, "/", true)).await;
    assert_eq!(t.status, 503, "{t:?}");
    let plain_done = {
        let client = client.clone();
        tokio::spawn(async move {
            let r = get(&client, loopback(plain), "app", "/").await;
            assert_eq!(r.status, 200);
            Instant::now()
        })
    };
    let filtered_done = {
        let client = client.clone();
        tokio::spawn(async move {
            let r = send(&client, req(proxy, "/", false)).await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.header("x-filtered"), Some("1"), "{r:?}");
            Instant::now()
        })
    };
    // The replacement instance (0.5 s of on_configure) becomes ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&instances(&wasp, "iso"), "created") <= created {
        assert!(Instant::now() < deadline, "{}", instances(&wasp, "iso"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rebuilt = Instant::now();
    let plain_done = plain_done.await.unwrap();
    let filtered_done = filtered_done.await.unwrap();
    assert!(
        plain_done < rebuilt,
        "a request without filters waited for the rebuild"
    );
    assert!(
        filtered_done < rebuilt,
        "a clean request waited for the rebuild"
    );
}

/// A filter asking for a 1 ms tick with a 45 ms `on_tick`: ticks are held to
/// `limits.tick_min` and the root CPU budget, and the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_fast_tick_is_capped() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures(TARGET, &["isolation"]);
    let (port, plain) = (free_port(), free_port());
    let cfg = config(
        port,
        plain,
        app.addr,
        "closed",
        "config = { tick_ms = 1, tick_work_ms = 45 }\nlimits = { cpu = \"500ms\" }",
    );
    let wasp = Wasp::start_in(dir, &cfg, &[]);
    let proxy = loopback(port);
    let client = h1_client();
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let r = send(&client, req(proxy, "/", false)).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = get(&client, loopback(plain), "app", "/").await;
        assert_eq!(r.status, 200, "{r:?}");
        served += 1;
    }
    let elapsed = started.elapsed();
    let r = send(&client, req(proxy, "/", false)).await;
    let ticks: u64 = r.header("x-ticks").unwrap_or("0").parse().unwrap_or(0);
    // Without the floor: ~one tick per 46 ms (65 in 3 s); the floor alone
    // allows one per 100 ms (30); the default budget (100 ms of root CPU per
    // second) about three 45 ms ticks per second.
    let floor_cap = elapsed.as_millis() as u64 / 100 + 2;
    assert!(ticks >= 1, "the filter never ticked");
    assert!(ticks <= floor_cap, "{ticks} ticks in {elapsed:?}");
    let i = instances(&wasp, "iso");
    assert!(count(&i, "ticks_skipped") >= 1, "{i}");
    assert!(served > 10, "only {served} rounds served in {elapsed:?}");
}

/// 16 workers, 3 filters, reloads while requests run: the instance pool is
/// sized for it, so no request fails and no reload is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_workers_filters_and_reloads_fit_the_pool() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as(
        TARGET,
        &[("isolation", "a"), ("isolation", "b"), ("isolation", "c")],
    );
    let port = free_port();
    let cfg = |generation: u32| {
        format!(
            r#"
[proxy]
workers = 16

[filters.a]
module = "a.wasm"
limits = {{ cpu = "2s" }}
config = {{ generation = {generation} }}
[filters.b]
module = "b.wasm"
limits = {{ cpu = "2s" }}
[filters.c]
module = "c.wasm"
limits = {{ cpu = "2s" }}

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["a", "b", "c"]
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
            app.addr
        )
    };
    let wasp = Wasp::start_in(dir, &cfg(0), &[]);
    let proxy = loopback(port);
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..16)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    // A new connection each time spreads requests over workers.
                    let client = h1_client();
                    let r = send(&client, req(proxy, "/slow?ms=50", false)).await;
                    assert_eq!(r.status, 200, "{r:?}");
                    assert_eq!(r.header("x-filtered"), Some("1"), "{r:?}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let config_path = wasp.dir.path().join("wasp.toml");
    let admin_line = std::fs::read_to_string(&config_path)
        .unwrap()
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    for generation in 1..=4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        std::fs::write(&config_path, format!("{admin_line}\n{}", cfg(generation))).unwrap();
        let answer = post_reload(wasp.admin, Duration::from_secs(20));
        assert!(answer.contains("reloaded"), "reload {generation}: {answer}");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for l in loaders {
        served += l.await.unwrap();
    }
    assert!(served > 50, "only {served} requests");
    let log = wasp.log_text();
    assert!(!log.contains("pool full"), "{log}");
}
