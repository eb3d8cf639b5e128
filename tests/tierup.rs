//! Background tier-up (`[proxy] wasm_compiler`): a filter loads on Winch
//! and moves to Cranelift without a request noticing; `winch` never moves;
//! a reload during a pending tier-up serves the new module, never the
//! stale compile; the CPU deadline still stops a looping filter on the
//! Cranelift engine. The real binary, real sockets, real fixtures.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::*;

/// The `headers` fixture adds `x-v: 1` to responses (`order`, as v2 in
/// the reload test, appends its config to `x-order` instead).
const HEADERS_CONFIG: &str = r#"{ response = { add = { x-v = "1" } } }"#;

fn config(port: u16, app: SocketAddr, compiler: &str, module: &str, extra: &str) -> String {
    format!(
        "[proxy]\nworkers = 2\nwasm_compiler = \"{compiler}\"\n\n[filters.f]\nmodule = \"{module}\"\nlimits = {{ cpu = \"2s\" }}\n{extra}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"f\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{app}\"]\n"
    )
}

/// Filter `f`'s entry of the admin listing.
fn status(wasp: &Wasp) -> serde_json::Value {
    let (code, body) = wasp.admin_get("/filters");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("/filters is JSON");
    list.as_array()
        .and_then(|l| l.iter().find(|f| f["name"] == "f"))
        .cloned()
        .unwrap_or_else(|| panic!("no filter f in {body}"))
}

/// Waits until `f`'s generation `generation` serves Cranelift code.
fn wait_tiered(wasp: &Wasp, generation: u64, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(wasp);
        if s["generation"] == generation && s["compiler"] == "cranelift" {
            return s;
        }
        assert!(
            s["tier_up"] != "failed",
            "tier-up failed: {s}\n{}",
            wasp.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no tier-up within {limit:?}: {s}\n{}",
            wasp.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_flow_through_the_tier_up_with_the_filter_applied() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures("wasm32-wasip1", &["headers"]);
    let port = free_port();
    let extra = format!("config = {HEADERS_CONFIG}");
    // The tier-up waits a little, so load is running when it lands.
    let wasp = Wasp::start_in(
        dir,
        &config(port, app.addr, "auto", "headers.wasm", &extra),
        &[("WASP_WASM_TIER_UP_DELAY_MS", "500")],
    );
    let proxy = loopback(port);
    let before = status(&wasp);
    assert_eq!(before["compiler"], "winch", "{before}");
    assert_eq!(before["tier_up"], "pending", "{before}");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        clients.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                let r =
                    tokio::time::timeout(Duration::from_secs(5), get(&client, proxy, "app", "/"))
                        .await;
                match r {
                    Ok(a) if a.status == 200 && a.header("x-v") == Some("1") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => {
                        eprintln!("bad answer: {} {:?}", a.status, a.headers);
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        eprintln!("no answer within 5 s");
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let waited = Instant::now();
    let served_before = loop {
        let n = ok.load(Ordering::Relaxed);
        if n > 0 || waited.elapsed() > Duration::from_secs(5) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let s = tokio::task::block_in_place(|| wait_tiered(&wasp, 1, Duration::from_secs(60)));
    let at_tier_up = ok.load(Ordering::Relaxed);
    // Long enough for every worker's pump to move its pool over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    let after = status(&wasp);
    println!(
        "tier-up after {} ms; {ok} ok ({served_before} before it started, {at_tier_up} when it landed), {bad} bad; {after}",
        s["tier_up_ms"]
    );
    assert_eq!(bad, 0, "failed or unfiltered answers:\n{}", wasp.log_text());
    assert!(served_before > 0, "load never started before the tier-up");
    assert!(ok > at_tier_up, "nothing served after the tier-up");
    assert_eq!(after["tier_up"], "done", "{after}");
    // The warm Winch instances were freed and Cranelift ones serve.
    assert!(
        after["instances"]["retired_after_tier_up"].as_u64() >= Some(1),
        "{after}"
    );
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_filter_compiler",
            &["filter=\"f\"", "compiler=\"cranelift\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(wasp.log_text().contains("filter tiered up to Cranelift"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winch_only_never_tiers_up() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures("wasm32-wasip1", &["headers"]);
    let port = free_port();
    let extra = format!("config = {HEADERS_CONFIG}");
    let wasp = Wasp::start_in(
        dir,
        &config(port, app.addr, "winch", "headers.wasm", &extra),
        &[],
    );
    let client = h1_client();
    // Longer than a debug-build tier-up of this module takes (~0.3 s).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let r = get(&client, loopback(port), "app", "/").await;
        assert_eq!((r.status, r.header("x-v")), (200, Some("1")));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&wasp);
    assert_eq!(
        (&s["compiler"], &s["tier_up"]),
        (&"winch".into(), &"off".into()),
        "{s}"
    );
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_filter_compiler",
            &["filter=\"f\"", "compiler=\"winch\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(!wasp.log_text().contains("tiered up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_pending_tier_up_serves_the_new_module() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "swap")]);
    let port = free_port();
    let extra = format!("config = {HEADERS_CONFIG}");
    let wasp = Wasp::start_in(
        dir,
        &config(port, app.addr, "auto", "swap.wasm", &extra),
        &[("WASP_WASM_TIER_UP_DELAY_MS", "1500")],
    );
    let proxy = loopback(port);
    let s = status(&wasp);
    assert_eq!(
        (&s["generation"], &s["tier_up"]),
        (&1.into(), &"pending".into()),
        "{s}"
    );

    // v2 (`order`) while v1's tier-up still waits its turn.
    let v2 = std::fs::read(fixture("wasm32-wasip1", "order")).unwrap();
    let filters = wasp.dir.path().join("filters.d");
    let tmp = filters.join(".swap.wasm.tmp");
    std::fs::write(&tmp, &v2).unwrap();
    std::fs::rename(&tmp, filters.join("swap.wasm")).unwrap();

    let client = h1_client();
    let is_v2 = |a: &Answer| a.header("x-v").is_none() && a.header("x-order").is_some();
    let written = Instant::now();
    loop {
        let r = get(&client, proxy, "app", "/").await;
        assert_eq!(r.status, 200);
        if is_v2(&r) {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "v2 not served within 10 s:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = status(&wasp);
    assert_eq!(s["generation"], 2, "{s}");
    // From here on only v2 answers, across its own tier-up.
    let stop_at = Instant::now() + Duration::from_secs(60);
    loop {
        let r = get(&client, proxy, "app", "/").await;
        assert_eq!(r.status, 200);
        assert!(is_v2(&r), "v1 answered after v2: {:?}", r.headers);
        let s = status(&wasp);
        if s["compiler"] == "cranelift" {
            assert_eq!(s["generation"], 2, "{s}");
            break;
        }
        assert!(Instant::now() < stop_at, "no tier-up of v2: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A few more on the Cranelift instances.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        let r = get(&client, proxy, "app", "/").await;
        assert!(r.status == 200 && is_v2(&r), "{:?}", r.headers);
    }
    let log = wasp.log_text();
    assert!(
        log.contains("tier-up dropped"),
        "v1's stale tier-up was not dropped:\n{log}"
    );
    let tiered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("filter tiered up to Cranelift"))
        .collect();
    assert!(
        tiered.len() == 1 && tiered[0].contains("generation=2"),
        "{tiered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_is_still_stopped_on_cranelift() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures("wasm32-wasip1", &["loop"]);
    let port = free_port();
    let wasp = Wasp::start_in(
        dir,
        &config(port, app.addr, "auto", "loop.wasm", "").replace("cpu = \"2s\"", "cpu = \"100ms\""),
        &[],
    );
    tokio::task::block_in_place(|| wait_tiered(&wasp, 1, Duration::from_secs(60)));
    // Let the pumps move the pools over to Cranelift instances.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let client = h1_client();
    for round in 0..3 {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            get(&client, loopback(port), "app", "/loop"),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the loop was not stopped"));
        assert_eq!(
            (r.status, r.header("x-wasp-error")),
            (503, Some("filter_failed")),
            "round {round}"
        );
        println!("round {round}: stopped after {:?}", started.elapsed());
        let r = get(&client, loopback(port), "app", "/fine").await;
        assert_eq!(
            r.status, 200,
            "round {round}: a clean request after the loop"
        );
    }
    let s = status(&wasp);
    assert_eq!(s["compiler"], "cranelift", "{s}");
    assert!(s["instances"]["failed"].as_u64() >= Some(3), "{s}");
}

/// A stream holding a Winch instance across the tier-up does not let the
/// filter grow past its cap (`limits.instances` x 8 per worker): Winch,
/// Cranelift and instances being built all count. More concurrent clients
/// than the cap keep every Cranelift instance busy at each pump round,
/// when the move used to build one more each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_instance_cap_holds_across_the_tier_up() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures("wasm32-wasip1", &["headers"]);
    let port = free_port();
    let cfg = format!(
        "[proxy]\nworkers = 1\nwasm_compiler = \"auto\"\n\n[filters.f]\nmodule = \"headers.wasm\"\nlimits = {{ cpu = \"2s\", instances = 1 }}\nconfig = {HEADERS_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"f\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    );
    let wasp = Wasp::start_in(dir, &cfg, &[("WASP_WASM_TIER_UP_DELAY_MS", "1500")]);
    let proxy = loopback(port);
    assert_eq!(status(&wasp)["tier_up"], "pending");
    // The long stream leases a Winch instance and holds it to the end.
    let long = tokio::spawn(async move { get(&h1_client(), proxy, "app", "/slow?ms=8500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..24 {
        let (stop, bad) = (stop.clone(), bad.clone());
        clients.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    get(&client, proxy, "app", "/slow?ms=200"),
                )
                .await;
                if !matches!(&r, Ok(a) if a.status == 200 && a.header("x-v") == Some("1")) {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::task::block_in_place(|| wait_tiered(&wasp, 1, Duration::from_secs(60)));
    // Pump rounds under load, with the long stream still on Winch.
    let mut most = 0;
    for _ in 0..30 {
        let live = status(&wasp)["instances"]["live"].as_i64().unwrap_or(-1);
        most = most.max(live);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let after = status(&wasp);
    assert!(
        most <= 8,
        "{most} live instances past the cap of 8: {after}"
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "{}", wasp.log_text());
    let a = long.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-v"), Some("1"));
}
