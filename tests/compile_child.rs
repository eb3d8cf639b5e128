//! Filter modules compile in a child process of the wasp binary
//! (`[proxy] wasm_compile_timeout`, `wasm_compile_memory`): a compile that
//! exceeds a limit is a compile error naming the filter and the reason; on
//! a reload the reload is rejected and the serving filters keep serving; at
//! start-up the filter does not load. The timeout cannot fire in-process
//! (an in-process compile has no timeout), so these tests also prove the
//! compile happens in a child. The real binary, real sockets, real fixtures.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::upstream::TestUpstream;
use support::*;

/// The `headers` fixture adds `x-v: 1` to responses.
const HEADERS_CONFIG: &str = r#"{ response = { add = { x-v = "1" } } }"#;

fn config(port: u16, app: SocketAddr, proxy_extra: &str) -> String {
    format!(
        "[proxy]\nworkers = 1\nwasm_compiler = \"winch\"\n{proxy_extra}\n\n[filters.f]\nmodule = \"f.wasm\"\nconfig = {HEADERS_CONFIG}\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"f\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{app}\"]\n"
    )
}

/// Writes `config` as the proxy's config file (keeping its admin address).
fn rewrite(wasp: &Wasp, config: &str) {
    let text = format!("[admin]\nbind = \"{}\"\n\n{config}", wasp.admin);
    std::fs::write(wasp.dir.path().join("wasp.toml"), text).unwrap();
}

/// Replaces `filters.d/f.wasm` with another module (one not in the module
/// cache, so the reload must compile it).
fn swap_module(wasp: &Wasp, fixture_name: &str) {
    let filters = wasp.dir.path().join("filters.d");
    let tmp = filters.join(".f.wasm.tmp");
    std::fs::copy(fixture("wasm32-wasip1", fixture_name), &tmp).unwrap();
    std::fs::rename(&tmp, filters.join("f.wasm")).unwrap();
}

async fn assert_v1_serves(proxy: SocketAddr, wasp: &Wasp) {
    let client = h1_client();
    for _ in 0..10 {
        let r = get(&client, proxy, "app", "/").await;
        assert_eq!(r.status, 200, "{}", wasp.log_text());
        assert_eq!(r.header("x-v"), Some("1"), "{:?}", r.headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_compile_times_out_is_rejected_and_the_old_filter_serves() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "f")]);
    let port = free_port();
    let wasp = Wasp::start_in(dir, &config(port, app.addr, ""), &[]);
    let proxy = loopback(port);
    assert_v1_serves(proxy, &wasp).await;
    assert!(
        wasp.log_text()
            .contains("module compiled in a child process"),
        "the start-up compile did not run in a child:\n{}",
        wasp.log_text()
    );

    // A new module and a compile timeout no process can meet.
    rewrite(
        &wasp,
        &config(port, app.addr, "wasm_compile_timeout = \"1ms\""),
    );
    swap_module(&wasp, "order");
    let answer = tokio::task::block_in_place(|| post_reload(wasp.admin, Duration::from_secs(30)));
    assert!(
        answer.contains("reload rejected")
            && answer.contains("filter \"f\"")
            && answer.contains("timed out after 1ms"),
        "{answer}\n{}",
        wasp.log_text()
    );
    assert_v1_serves(proxy, &wasp).await;
    let (_, cfg) = wasp.admin_get("/config");
    assert!(cfg.contains("timed out after 1ms"), "{cfg}");

    // Back to the default limit: the same module compiles and serves.
    rewrite(&wasp, &config(port, app.addr, ""));
    let answer = tokio::task::block_in_place(|| post_reload(wasp.admin, Duration::from_secs(30)));
    assert!(answer.contains("reloaded: generation"), "{answer}");
    let client = h1_client();
    let r = get(&client, proxy, "app", "/").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("x-v").is_none() && r.header("x-order").is_some(),
        "{:?}",
        r.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_compile_runs_out_of_memory_is_rejected() {
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "f")]);
    let port = free_port();
    // The child must not inherit this: its message would carry
    // "skipping backtrace printing".
    let wasp = Wasp::start_in(
        dir,
        &config(port, app.addr, ""),
        &[("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")],
    );
    let proxy = loopback(port);
    assert_v1_serves(proxy, &wasp).await;

    // Winch needs ~8 MiB of heap for this module (`ulimit -d`).
    rewrite(
        &wasp,
        &config(port, app.addr, "wasm_compile_memory = \"4MiB\""),
    );
    swap_module(&wasp, "order");
    let answer = tokio::task::block_in_place(|| post_reload(wasp.admin, Duration::from_secs(30)));
    assert!(
        answer.contains("reload rejected") && answer.contains("filter \"f\""),
        "{answer}\n{}",
        wasp.log_text()
    );
    assert!(answer.contains("out of memory"), "{answer}");
    assert!(!answer.contains("backtrace"), "{answer}");
    assert_v1_serves(proxy, &wasp).await;
}

#[test]
fn a_start_up_whose_compile_times_out_fails_naming_the_filter() {
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "f")]);
    let app: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let path = dir.path().join("wasp.toml");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:{}\"\n\n{}",
        free_port(),
        config(free_port(), app, "wasm_compile_timeout = \"1ms\"")
    );
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("wasp.log");
    let mut child = std::process::Command::new(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // An in-process compile has no timeout: wasp would start and serve.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("filter \"f\"") && stderr.contains("timed out after 1ms"),
        "{stderr}"
    );
}

/// A wasp whose own hard limits are below `wasm_compile_timeout` +2 s of
/// CPU and `wasm_compile_memory` (systemd `LimitCPU=`, container ulimits)
/// cannot raise them without CAP_SYS_RESOURCE: the child's limits are
/// capped at the process's own, so it starts (empty module cache: the
/// filter must compile) and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasp_under_lower_hard_limits_still_compiles_and_serves() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: util-linux prlimit is not installed");
        return;
    }
    let app = TestUpstream::start("app").await;
    let dir = with_fixtures_as("wasm32-wasip1", &[("headers", "f")]);
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = dir.path().join("wasp.toml");
    let text = format!(
        "[admin]\nbind = \"{admin}\"\n\n{}",
        config(port, app.addr, "")
    );
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("wasp.log");
    // Defaults: 60 s timeout (CPU 62 s) and 1 GiB heap, both above these.
    let mut child = std::process::Command::new("prlimit")
        .arg("--cpu=30:30")
        .arg("--data=900000000:900000000")
        .arg(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Err(format!("wasp exited with {s}"));
        }
        if let Some((200, _)) = http_get_blocking(admin, "/ready") {
            break Ok(());
        }
        if std::time::Instant::now() > deadline {
            break Err("wasp not ready within 20s".to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{e}; log:\n{text}");
    }
    let client = h1_client();
    let r = get(&client, loopback(port), "app", "/").await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(r.status, 200, "{text}");
    assert_eq!(r.header("x-v"), Some("1"), "{:?}", r.headers);
    assert!(
        text.contains("module compiled in a child process"),
        "the filter was not compiled (cache not empty?):\n{text}"
    );
}
