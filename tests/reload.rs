//! Hot reload under load: swapping a filter's module file (in place, by
//! rename, written slowly), broken modules, config edits, SIGHUP and
//! `POST /reload`: zero failed requests, and the new version shows up fast.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::*;

/// v1 (the headers fixture) answers with `x-v: 1`; v2 (the order fixture)
/// appends its config to `x-order`. Both accept the same config.
const SWAP_CONFIG: &str = r#"{ response = { add = { x-v = "1" } } }"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    V1,
    V2,
}

fn version_of(r: &Answer) -> Option<Version> {
    match (r.header("x-v"), r.header("x-order")) {
        (Some("1"), None) => Some(Version::V1),
        (None, Some(o)) if o.contains("response") => Some(Version::V2),
        _ => None,
    }
}

fn install(dir: &Path, bytes: &[u8], mode: usize) {
    let target = dir.join("swap.wasm");
    match mode % 3 {
        // Replaced in place.
        0 => std::fs::write(&target, bytes).unwrap(),
        // Written beside it, then renamed over it (what deploy tools do).
        1 => {
            let tmp = dir.join(".swap.wasm.tmp");
            std::fs::write(&tmp, bytes).unwrap();
            std::fs::rename(&tmp, &target).unwrap();
        }
        // Written slowly, in chunks: a half-written module must not be taken.
        _ => {
            use std::io::Write;
            let mut f = std::fs::File::create(&target).unwrap();
            for chunk in bytes.chunks(bytes.len() / 4 + 1) {
                f.write_all(chunk).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_a_filter_under_load_fails_nothing() {
    let app = TestUpstream::start("app").await;
    let v1 = std::fs::read(fixture("wasm32-wasip1", "headers")).unwrap();
    let v2 = std::fs::read(fixture("wasm32-wasip1", "order")).unwrap();
    let dir = TempDir::new("reload");
    let filters = dir.path().join("filters.d");
    std::fs::create_dir_all(&filters).unwrap();
    std::fs::write(filters.join("swap.wasm"), &v1).unwrap();
    let port = free_port();
    let config = format!(
        // The CPU deadline is wall-clock (epoch) based: on a starved CI
        // machine a debug-build callback can exceed the 50 ms default, which
        // is a filter failure this test is not about.
        "[proxy]\nworkers = 2\n[filters.swap]\nmodule = \"swap.wasm\"\nlimits = {{ cpu = \"2s\" }}\nconfig = {SWAP_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"swap\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    );
    let wasp = Wasp::start_in(dir, &config, &[]);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mixed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (stop, ok, failed, mixed) = (stop.clone(), ok.clone(), failed.clone(), mixed.clone());
        clients.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{proxy}/"))
                    .header("host", "app")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        let headers = resp.headers().clone();
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        let a = Answer {
                            status,
                            headers,
                            body: String::new(),
                        };
                        if status != 200 {
                            eprintln!("failed: {status} {:?}", a.headers.get("x-wasp-error"));
                            failed.fetch_add(1, Ordering::Relaxed);
                        } else if version_of(&a).is_none() {
                            mixed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Err(e)) => {
                        eprintln!("failed: client error {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        eprintln!("failed: no answer within 5 s");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let probe = h1_client();
    let mut delays = Vec::new();
    let filters_dir = wasp.dir.path().join("filters.d");
    for swap in 0..20 {
        let (bytes, want) = if swap % 2 == 0 {
            (&v2, Version::V2)
        } else {
            (&v1, Version::V1)
        };
        install(&filters_dir, bytes, swap);
        let written = Instant::now();
        loop {
            let r = get(&probe, proxy, "app", "/").await;
            if version_of(&r) == Some(want) {
                delays.push(written.elapsed());
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "swap {swap} to {want:?} not seen in 5 s:\n{}",
                wasp.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    delays.sort();
    let (ok, failed, mixed) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        mixed.load(Ordering::Relaxed),
    );
    println!(
        "20 swaps under 32 keep-alive clients: {ok} ok, {failed} failed, {mixed} without exactly one version; write-to-new-version median {:?}, max {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert_eq!(
        failed,
        0,
        "failed requests during swaps:\n{}",
        wasp.log_text()
    );
    assert_eq!(mixed, 0);
    assert!(ok > 100, "load too small to mean anything: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_modules_and_configs_change_nothing() {
    let app = TestUpstream::start("app").await;
    let other = TestUpstream::start("other").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "swap")]);
    let filters = dir.path().join("filters.d");
    let port = free_port();
    let config = |cluster: &str| {
        format!(
            "[filters.swap]\nmodule = \"swap.wasm\"\nconfig = {SWAP_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"swap\"]\n  [[listeners.routes]]\n  cluster = \"{cluster}\"\n[clusters.app]\nendpoints = [\"{}\"]\n[clusters.other]\nendpoints = [\"{}\"]\n",
            app.addr, other.addr
        )
    };
    let wasp = Wasp::start_in(dir, &config("app"), &[]);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let reload = || {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-X",
                "POST",
                "-H",
                "x-wasp-admin: 1",
                &format!("http://{}/reload", wasp.admin),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap()
    };
    let failures =
        || metric_value(&wasp.metrics(), "wasp_reload_failures_total", &[]).unwrap_or(-1.0);

    // A module that is not Wasm at all.
    std::fs::write(filters.join("swap.wasm"), b"definitely not wasm").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "broken module not reported:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(&client, proxy, "app", "/").await;
    assert_eq!(
        (r.status, version_of(&r)),
        (200, Some(Version::V1)),
        "old version keeps serving"
    );
    let (_, status) = wasp.admin_get("/filters");
    assert!(
        status.contains("\"last_error\"") && status.contains("swap"),
        "{status}"
    );
    assert!(
        !status.contains("\"last_error\": null"),
        "/filters must show the error: {status}"
    );

    // A module whose on_configure says no.
    std::fs::copy(
        fixture("wasm32-wasip1", "configure-false"),
        filters.join("swap.wasm"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures() < 2.0 {
        assert!(
            Instant::now() < deadline,
            "configure=false not reported:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        version_of(&get(&client, proxy, "app", "/").await),
        Some(Version::V1)
    );

    // Put a good module back, then change the route by editing the config.
    std::fs::copy(
        fixture("wasm32-wasip1", "headers"),
        filters.join("swap.wasm"),
    )
    .unwrap();
    let cfg_path = wasp.dir.path().join("wasp.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("cluster = \"app\"", "cluster = \"other\""),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&client, proxy, "app", "/").await;
        if r.header("x-upstream") == Some("other") {
            assert_eq!(version_of(&r), Some(Version::V1));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "route change not applied:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken config: rejected whole, with its position; the old one serves.
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        good.replace("cluster = \"other\"", "cluster = \"nowhere\""),
    )
    .unwrap();
    let answer = reload();
    assert!(
        answer.contains("reload rejected") && answer.contains("unknown cluster \"nowhere\""),
        "{answer}"
    );
    assert!(
        answer.contains("wasp.toml:"),
        "the error names the file and line: {answer}"
    );
    assert_eq!(
        get(&client, proxy, "app", "/").await.header("x-upstream"),
        Some("other")
    );
    let (_, cfg) = wasp.admin_get("/config");
    assert!(
        cfg.contains("unknown cluster"),
        "/config reports the last reload error: {cfg}"
    );

    // Fixed again, applied by SIGHUP.
    std::fs::write(
        &cfg_path,
        good.replace("cluster = \"other\"", "cluster = \"app\""),
    )
    .unwrap();
    wasp.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&client, proxy, "app", "/").await.header("x-upstream") != Some("app") {
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload not applied:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reload().starts_with("reloaded: generation"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_config_beside_its_module_reloads() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "swap")]);
    let filters = dir.path().join("filters.d");
    let port = free_port();
    let config = format!(
        "[filters.swap]\nmodule = \"swap.wasm\"\nconfig = {SWAP_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"swap\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    );
    let wasp = Wasp::start_in(dir, &config, &[]);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    assert_eq!(
        get(&client, proxy, "app", "/").await.header("x-v"),
        Some("1")
    );

    // swap.toml beside swap.wasm replaces the inline config.
    std::fs::write(filters.join("swap.toml"), "[response.add]\nx-v = \"2\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&client, proxy, "app", "/").await.header("x-v") != Some("2") {
        assert!(
            Instant::now() < deadline,
            "swap.toml not applied:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken one changes nothing and says where.
    std::fs::write(filters.join("swap.toml"), "[response.add\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&wasp.metrics(), "wasp_reload_failures_total", &[]).unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "broken swap.toml not reported:\n{}",
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&client, proxy, "app", "/").await.header("x-v"),
        Some("2")
    );
    let (_, status) = wasp.admin_get("/reload");
    assert!(status.contains("swap.toml"), "{status}");
}

// === Listeners on reload ===

/// A `[[listeners]]` table routing everything to `cluster`.
fn listener(name: &str, addr: SocketAddr, cluster: &str) -> String {
    format!(
        "[[listeners]]\nname = \"{name}\"\nbind = \"{addr}\"\n  [[listeners.routes]]\n  cluster = \"{cluster}\"\n"
    )
}

/// The two upstreams the listener tests route to ("app" and "other"),
/// and configs that name them.
struct Apps {
    app: TestUpstream,
    other: TestUpstream,
}

impl Apps {
    async fn start() -> Self {
        Self {
            app: TestUpstream::start("app").await,
            other: TestUpstream::start("other").await,
        }
    }

    /// `listeners`, then the clusters `app` and `other`.
    fn config(&self, listeners: &[String]) -> String {
        format!(
            "{}[clusters.app]\nendpoints = [\"{}\"]\n[clusters.other]\nendpoints = [\"{}\"]\n",
            listeners.concat(),
            self.app.addr,
            self.other.addr
        )
    }

    /// wasp (2 workers) serving `listeners`.
    fn wasp(&self, listeners: &[String]) -> Wasp {
        Wasp::start(&format!(
            "[proxy]\nworkers = 2\n\n{}",
            self.config(listeners)
        ))
    }

    /// Rewrites the config to `listeners` and reloads; the answer of
    /// `POST /reload`.
    fn reload(&self, wasp: &Wasp, listeners: &[String]) -> String {
        reconfigure(wasp, &self.config(listeners))
    }
}

/// Rewrites the config (keeping the admin table the harness wrote) and asks
/// for a reload; returns the answer of `POST /reload`.
fn reconfigure(wasp: &Wasp, body: &str) -> String {
    let text = format!(
        "[admin]\nbind = \"{}\"\n\n[proxy]\nworkers = 2\n\n{body}",
        wasp.admin
    );
    std::fs::write(wasp.dir.path().join("wasp.toml"), text).unwrap();
    post_reload(wasp.admin, Duration::from_secs(10))
}

/// One HTTP/1.1 connection, kept alive, whose local port the test knows.
async fn one_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    SocketAddr,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    (send, local)
}

async fn send_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    path: &str,
) -> Result<Answer, String> {
    send.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let req = http::Request::get(path)
        .header("host", "app")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_config_and_kept_connections_survive() {
    let apps = Apps::start().await;
    let main = loopback(free_port());
    let added = loopback(free_port());
    let wasp = apps.wasp(&[listener("main", main, "app")]);
    let (mut kept, local) = one_connection(main).await;
    let first = send_on(&mut kept, "/").await.unwrap();
    assert_eq!(first.header("x-upstream"), Some("app"));

    // Add a listener *before* the kept one (so the kept one's position in
    // the list changes) and send the kept one's routes elsewhere.
    let answer = apps.reload(
        &wasp,
        &[
            listener("added", added, "app"),
            listener("main", main, "other"),
        ],
    );
    assert!(answer.contains("reloaded: generation"), "{answer}");

    let client = h1_client();
    let r = get(&client, added, "app", "/").await;
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("app")),
        "the added listener serves"
    );
    // The same connection (same local port, never reconnected) still works
    // and takes the new routes.
    let again = send_on(&mut kept, "/").await.unwrap_or_else(|e| {
        panic!(
            "kept connection broken by the reload: {e}\n{}",
            wasp.log_text()
        )
    });
    assert_eq!(again.header("x-upstream"), Some("other"));
    assert!(!kept.is_closed(), "connection from {local} was closed");
    let (_, cfg) = wasp.admin_get("/config");
    assert!(
        cfg.contains("\"added\"") && cfg.contains(&added.to_string()),
        "/config shows the new listener: {cfg}"
    );
    assert_eq!(wasp.admin_get("/ready").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_refuses_new_connections_and_finishes_in_flight() {
    let apps = Apps::start().await;
    let app = &apps.app;
    let main = loopback(free_port());
    let leaving = loopback(free_port());
    // Never connected to: its serve loops have nothing to drain.
    let unused = loopback(free_port());
    let wasp = apps.wasp(&[
        listener("leaving", leaving, "app"),
        listener("main", main, "app"),
        listener("unused", unused, "app"),
    ]);
    let (mut slow_conn, _) = one_connection(leaving).await;
    // A warm-up request, so the connection is a kept-alive one.
    assert_eq!(send_on(&mut slow_conn, "/").await.unwrap().status, 200);
    let arrived = app.requests();
    let slow = tokio::spawn(async move {
        let r = send_on(&mut slow_conn, "/slow?ms=1500").await;
        (r, slow_conn)
    });
    // The reload must find the slow request in flight: wait until the
    // upstream has it.
    app_got_one_more(app, arrived).await;

    let answer = apps.reload(&wasp, &[listener("main", main, "app")]);
    assert!(answer.contains("reloaded: generation"), "{answer}");
    for gone in [leaving, unused] {
        let refused = tokio::net::TcpStream::connect(gone).await;
        assert!(
            refused.is_err(),
            "a removed listener must not accept new connections"
        );
    }
    let (r, slow_conn) = slow.await.unwrap();
    let r = r.unwrap_or_else(|e| panic!("in-flight request failed: {e}\n{}", wasp.log_text()));
    assert_eq!((r.status, r.body.as_str()), (200, "slow 1500ms done\n"));
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "a draining connection closes after its current request"
    );
    drop(slow_conn);
    // The kept listener is untouched, on every worker (fresh connections
    // spread over both).
    for _ in 0..8 {
        let r = http_get_blocking(main, "/").map(|(status, _)| status);
        assert_eq!(r, Some(200), "{}", wasp.log_text());
    }
    assert!(!wasp.log_text().contains("panicked"), "{}", wasp.log_text());
}

/// Waits (up to 10 s) until `app` has seen more than `arrived` requests:
/// the slow request a test started is in flight there.
async fn app_got_one_more(app: &TestUpstream, arrived: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.requests() == arrived {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The drain timeout is a deadline: what is still open on a removed
/// listener when it passes (a long request, a WebSocket) is closed, not
/// left serving on a listener that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_closes_what_outlives_the_drain_timeout() {
    use tokio::io::AsyncReadExt;
    let apps = Apps::start().await;
    let app = &apps.app;
    let main = loopback(free_port());
    let leaving = loopback(free_port());
    let drain = "drain_timeout = \"300ms\"\n\n";
    let wasp = Wasp::start(&format!(
        "[proxy]\nworkers = 2\n{drain}{}",
        apps.config(&[
            listener("leaving", leaving, "app"),
            listener("main", main, "app"),
        ])
    ));
    let mut tunnel = websocket(leaving).await;
    echo(&mut tunnel, b"ping").await.unwrap();
    let (mut slow_conn, _) = one_connection(leaving).await;
    let arrived = app.requests();
    let slow = tokio::spawn(async move { send_on(&mut slow_conn, "/slow?ms=8000").await });
    app_got_one_more(app, arrived).await;

    let answer = reconfigure(
        &wasp,
        &format!("{drain}{}", apps.config(&[listener("main", main, "app")])),
    );
    assert!(answer.contains("reloaded: generation"), "{answer}");
    let removed = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .unwrap_or_else(|_| panic!("the slow request still runs 5 s after the reload"))
        .unwrap();
    assert!(
        r.is_err(),
        "the slow request finished on a removed listener: {r:?}"
    );
    // The tunnel (which hyper handed over long ago) ends with it.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the tunnel outlived the drain timeout");
    assert!(
        removed.elapsed() < Duration::from_secs(4),
        "closed {:?} after the reload",
        removed.elapsed()
    );
    assert!(
        wasp.log_text().contains("drain timeout of 300ms reached"),
        "{}",
        wasp.log_text()
    );
    // The kept listener serves on.
    assert_eq!(http_get_blocking(main, "/").map(|(s, _)| s), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_port_is_taken_changes_nothing() {
    let apps = Apps::start().await;
    let main = loopback(free_port());
    let wasp = apps.wasp(&[listener("main", main, "app")]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();

    // A new listener on a taken port, and a route change in the same file.
    let answer = apps.reload(
        &wasp,
        &[
            listener("main", main, "other"),
            listener("blocked", taken_addr, "app"),
        ],
    );
    assert!(
        answer.contains("reload rejected")
            && answer.contains("listener \"blocked\"")
            && answer.contains(&format!("cannot bind {taken_addr}")),
        "{answer}"
    );
    let r = get(&h1_client(), main, "app", "/").await;
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("app")),
        "nothing of the rejected config applies"
    );
    let (_, status) = wasp.admin_get("/reload");
    assert!(status.contains("cannot bind"), "{status}");
    let (_, cfg) = wasp.admin_get("/config");
    assert!(!cfg.contains("\"blocked\""), "{cfg}");
    // No series of the rejected config: a series once shown is never removed.
    let rejected = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| {
                l.contains("listener=\"blocked\"")
                    || (l.contains("listener=\"main\"") && l.contains("cluster=\"other\""))
            })
            .map(str::to_string)
            .collect()
    };
    let metrics = wasp.metrics();
    assert!(
        metrics.contains("wasp_downstream_connections_open{listener=\"main\"}"),
        "{metrics}"
    );
    assert_eq!(rejected(&metrics), Vec::<String>::new());

    // Once the port is free, the same file applies.
    drop(taken);
    let answer = post_reload(wasp.admin, Duration::from_secs(10));
    assert!(answer.contains("reloaded: generation"), "{answer}");
    let metrics = wasp.metrics();
    assert!(
        metrics.contains("wasp_downstream_connections_open{listener=\"blocked\"}"),
        "{metrics}"
    );
    assert!(!rejected(&metrics).is_empty(), "{metrics}");
    let r = get(&h1_client(), taken_addr, "app", "/").await;
    assert_eq!(r.header("x-upstream"), Some("app"));
    let r = get(&h1_client(), main, "app", "/").await;
    assert_eq!(r.header("x-upstream"), Some("other"));
}

/// A reload rejected because a new listener's port is taken leaves the
/// filters as they were: the old settings keep serving and `/filters` does
/// not report a version that never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_leaves_the_filters_as_they_were() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "swap")]);
    let main = loopback(free_port());
    let with = |settings: &str, extra: &str| {
        format!(
            "[filters.swap]\nmodule = \"swap.wasm\"\nconfig = {settings}\n\n[[listeners]]\nname = \"main\"\nbind = \"{main}\"\npipeline = [\"swap\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n{extra}[clusters.app]\nendpoints = [\"{}\"]\n",
            app.addr
        )
    };
    let wasp = Wasp::start_in(dir, &with(SWAP_CONFIG, ""), &[]);
    let client = h1_client();
    assert_eq!(
        get(&client, main, "app", "/").await.header("x-v"),
        Some("1")
    );
    let generation = |wasp: &Wasp| -> u64 {
        let (_, body) = wasp.admin_get("/filters");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/filters is JSON");
        let found = v
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == "swap"))
            .or_else(|| v.get("swap"))
            .unwrap_or_else(|| panic!("no swap filter in {body}"));
        found["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("{body}"))
    };
    let before = generation(&wasp);

    // New filter settings and a listener on a taken port, in one file.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let answer = reconfigure(
        &wasp,
        &with(
            r#"{ response = { add = { x-v = "2" } } }"#,
            &listener("blocked", taken_addr, "app"),
        ),
    );
    assert!(answer.contains("cannot bind"), "{answer}");
    assert_eq!(
        get(&client, main, "app", "/").await.header("x-v"),
        Some("1")
    );
    assert_eq!(
        generation(&wasp),
        before,
        "/filters reports a filter version from a rejected reload"
    );
}

/// A reload that adds a filter that loads (`aaa`) and one whose
/// `proxy_on_configure` refuses (`zzz`) is rejected, and `/filters` then
/// shows what it showed before, plus the error of `zzz` the docs promise:
/// no entry for `aaa`, which never served (its shared data, metric store
/// and stats are not created either). `aaa` sorts before `zzz`, so it is
/// prepared before the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_registers_none_of_its_new_filters() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as(
        "wasm32-wasip1",
        &[("noop", "old"), ("noop", "aaa"), ("configure-false", "zzz")],
    );
    let main = loopback(free_port());
    let with = |filters: &[&str]| {
        let decls: String = filters
            .iter()
            .map(|f| format!("[filters.{f}]\nmodule = \"{f}.wasm\"\n\n"))
            .collect();
        let pipeline = filters
            .iter()
            .map(|f| format!("\"{f}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{decls}[[listeners]]\nname = \"main\"\nbind = \"{main}\"\npipeline = [{pipeline}]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
            app.addr
        )
    };
    let wasp = Wasp::start_in(dir, &with(&["old"]), &[]);
    let client = h1_client();
    assert_eq!(get(&client, main, "app", "/").await.status, 200);
    // What identifies each entry (instance counts move as requests run).
    let filters = |wasp: &Wasp| -> Vec<serde_json::Value> {
        let (_, body) = wasp.admin_get("/filters");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/filters is JSON");
        v.as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f["name"],
                    "module": f["module"],
                    "sha256": f["sha256"],
                    "generation": f["generation"],
                    "state": f["state"],
                    "last_error": f["last_error"],
                })
            })
            .collect()
    };
    let before = filters(&wasp);
    assert_eq!(before.len(), 1, "{before:?}");

    let answer = reconfigure(&wasp, &with(&["old", "aaa", "zzz"]));
    assert!(answer.contains("zzz"), "{answer}");
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(get(&client, main, "app", "/").await.status, 200);

    let mut after = filters(&wasp);
    let failed = after
        .iter()
        .position(|f| f["name"] == "zzz")
        .map(|i| after.remove(i))
        .unwrap_or_else(|| panic!("the failed filter's error is not on /filters: {after:?}"));
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("proxy_on_configure")),
        "{failed}"
    );
    assert_eq!(
        after, before,
        "/filters changed by a rejected reload (beyond the failed filter's error)"
    );

    // Taken out of the config, the filter that never loaded is no longer
    // reported as failed.
    let answer = reconfigure(&wasp, &with(&["old"]));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let cleared = filters(&wasp);
    assert!(
        cleared.iter().all(|f| f["name"] != "zzz"),
        "a removed filter that never loaded is still shown: {cleared:?}"
    );
}

// === Benchmark helper (bench/reload.sh runs it in release) ===

/// The marker the `versioned` fixture answers with in `x-module-version`.
const VERSION_MARKER: &[u8] = b"wasp-version:";

/// The `versioned` fixture with its 16-character version replaced.
fn versioned(base: &[u8], version: &str) -> Vec<u8> {
    assert_eq!(version.len(), 16);
    let at = base
        .windows(VERSION_MARKER.len())
        .position(|w| w == VERSION_MARKER)
        .expect("the versioned fixture carries its marker")
        + VERSION_MARKER.len();
    let mut out = base.to_vec();
    out[at..at + 16].copy_from_slice(version.as_bytes());
    out
}

/// Writes `bytes` as the watched module, in place or by rename; returns when
/// the final write is closed.
fn deploy(dir: &Path, bytes: &[u8], by_rename: bool) -> Instant {
    let target = dir.join("swap.wasm");
    if by_rename {
        let tmp = dir.join(".swap.wasm.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
    } else {
        std::fs::write(&target, bytes).unwrap();
    }
    Instant::now()
}

/// Polls one keep-alive connection until a response carries `version`;
/// returns the time since `since`.
async fn until_version(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    version: &str,
    since: Instant,
) -> Duration {
    loop {
        let r = send_on(send, "/").await.unwrap();
        if r.header("x-module-version") == Some(version) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "version {version} not served within 10 s"
        );
    }
}

fn summary(name: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{name}\t{}\t{:.1}\t{:.1}\t{:.1}",
        d.len(),
        ms(d[d.len() / 2]),
        ms(d[d.len() - 1]),
        ms(d[0])
    )
}

/// Time from a module's final write to the first response served by it:
/// SWAPS cold swaps (a version never seen: new hash, empty cache) and SWAPS
/// cached swaps (alternating two versions compiled before). Prints one
/// tab-separated line per case: name, swaps, median ms, max ms, min ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/reload.sh runs it with --release"]
async fn reload_latency() {
    let swaps: usize = std::env::var("SWAPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let app = TestUpstream::start("app").await;
    let base = std::fs::read(fixture("wasm32-wasip1", "versioned")).unwrap();
    let dir = TempDir::new("reload-latency");
    let filters = dir.path().join("filters.d");
    std::fs::create_dir_all(&filters).unwrap();
    std::fs::write(
        filters.join("swap.wasm"),
        versioned(&base, "0000000000000000"),
    )
    .unwrap();
    let port = free_port();
    let config = format!(
        "[proxy]\nworkers = {workers}\nmodule_cache = \"cache\"\n[log]\nlevel = \"warn\"\n[filters.swap]\nmodule = \"swap.wasm\"\nconfig = {SWAP_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"swap\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    );
    let wasp = Wasp::start_in(dir, &config, &[]);
    let filters = wasp.dir.path().join("filters.d");
    let (mut conn, _) = one_connection(loopback(port)).await;
    println!(
        "module: versioned fixture, {} bytes, {workers} workers",
        base.len()
    );

    // Cold: every version is new (its own hash), so nothing is cached.
    let mut cold = Vec::new();
    for i in 0..swaps {
        let version = format!("{:016x}", 0xc01d_0000_0000_0000u64 + i as u64 + 1);
        let written = deploy(&filters, &versioned(&base, &version), i % 2 == 1);
        cold.push(until_version(&mut conn, &version, written).await);
        // Let the debounce window of this swap pass before the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Cached: two versions compiled once, then swapped back and forth.
    let pair = ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"];
    for v in pair {
        let written = deploy(&filters, &versioned(&base, v), false);
        until_version(&mut conn, v, written).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut cached = Vec::new();
    for i in 0..swaps {
        let v = pair[i % 2];
        let written = deploy(&filters, &versioned(&base, v), i % 4 >= 2);
        cached.push(until_version(&mut conn, v, written).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("case\tswaps\tmedian_ms\tmax_ms\tmin_ms");
    println!("{}", summary("cold", cold));
    println!("{}", summary("cached", cached));
    let failures = metric_value(&wasp.metrics(), "wasp_reload_failures_total", &[]);
    assert_eq!(failures, Some(0.0), "{}", wasp.log_text());
}

/// A reload that leaves a cluster's section alone keeps that cluster's
/// pooled upstream connections on every worker: a route edit must not
/// make each worker reconnect to every upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_cluster_keeps_its_upstream_connections_across_reloads() {
    let apps = Apps::start().await;
    let app = &apps.app;
    let main = loopback(free_port());
    let wasp = apps.wasp(&[listener("main", main, "app")]);
    // One client connection (so one worker serves it all), sequential
    // requests with a pause so each upstream connection is back in the
    // pool before the next request.
    let (mut conn, _) = one_connection(main).await;
    for _ in 0..5 {
        assert_eq!(paced(&mut conn, "/").await.status, 200);
    }
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );

    // A new route in front of the old one; cluster "app" is untouched.
    let routes = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{main}\"\n  [[listeners.routes]]\n  match = {{ prefix = \"/other\" }}\n  cluster = \"other\"\n  [[listeners.routes]]\n  cluster = \"app\"\n"
    );
    for round in 0..3 {
        let answer = apps.reload(&wasp, std::slice::from_ref(&routes));
        assert!(answer.contains("reloaded: generation"), "{answer}");
        let r = paced(&mut conn, "/other").await;
        assert_eq!(
            r.header("x-upstream"),
            Some("other"),
            "round {round}: new route"
        );
        for _ in 0..3 {
            let r = paced(&mut conn, "/").await;
            assert_eq!(r.header("x-upstream"), Some("app"));
        }
    }
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        1,
        "the reloads reconnected to an unchanged cluster"
    );
}

/// [`send_on`], then a pause, so the upstream connection is back in the
/// proxy's pool before the next request.
async fn paced(
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    path: &str,
) -> Answer {
    let r = send_on(conn, path).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_to_another_port_is_re_bound() {
    let apps = Apps::start().await;
    let before = loopback(free_port());
    let after = loopback(free_port());
    let wasp = apps.wasp(&[listener("main", before, "app")]);
    let (mut open, _) = one_connection(before).await;
    assert_eq!(send_on(&mut open, "/").await.unwrap().status, 200);

    let answer = apps.reload(&wasp, &[listener("main", after, "other")]);
    assert!(answer.contains("reloaded: generation"), "{answer}");
    let r = get(&h1_client(), after, "app", "/").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("other")));
    assert!(
        tokio::net::TcpStream::connect(before).await.is_err(),
        "the old address no longer accepts"
    );
    // The idle connection on the old socket was closed by the drain.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !open.is_closed() {
        assert!(Instant::now() < deadline, "idle connection not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
