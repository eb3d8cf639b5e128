//! The process from outside: `wasp check`, config errors with positions,
//! `${VAR}` interpolation, the admin API, and graceful drain on SIGTERM and
//! `POST /shutdown`.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::*;

fn check(config: &str) -> (i32, String, String) {
    let dir = TempDir::new("check");
    let path = dir.path().join("wasp.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(WASP)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run wasp check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_flag() {
    let out = Command::new(WASP).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("wasp {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_prints_a_summary() {
    let (code, out, err) = check(
        r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:15001"
  [[listeners.routes]]
  name = "ratings"
  match = { host = "ratings" }
  clusters = [ { name = "v1", weight = 90 }, { name = "v2", weight = 10 } ]

[clusters.v1]
endpoints = ["127.0.0.1:9101"]
[clusters.v2]
endpoints = [{ address = "127.0.0.1:9201", weight = 2 }]
"#,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("outbound on 127.0.0.1:15001"), "{out}");
    assert!(out.contains("route ratings -> v1 | v2"), "{out}");
    assert!(out.contains("127.0.0.1:9201 (weight 2)"), "{out}");
}

#[test]
fn config_errors_name_file_line_and_column() {
    let (code, _, err) = check("[proxy]\nworkers = 1\nwrokers = 2\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("wasp.toml:3:1: unknown field `wrokers`"),
        "{err}"
    );

    let (code, _, err) = check(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  cluster = \"ghost\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("wasp.toml:5:13: listener \"a\", route 1: unknown cluster \"ghost\""),
        "{err}"
    );

    let (code, _, err) = check("[proxy]\ndrain_timeout = \"soon\"\n");
    assert_eq!(code, 2);
    assert!(err.contains("wasp.toml:2:17"), "{err}");

    // `run` refuses a broken file the same way, before binding anything.
    let dir = TempDir::new("run-bad");
    let path = dir.path().join("wasp.toml");
    std::fs::write(&path, "[admin]\nbind = \"${WASP_TEST_UNSET_VAR}\"\n").unwrap();
    let out = Command::new(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("WASP_TEST_UNSET_VAR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("wasp.toml:2:9: environment variable WASP_TEST_UNSET_VAR is not set"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_interpolation_and_admin_api() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start_with_env(
        r#"
[[listeners]]
name = "inbound"
bind = "127.0.0.1:${INBOUND_PORT}"
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["${APP_ADDR}"]
"#,
        &[
            ("INBOUND_PORT", &port.to_string()),
            ("APP_ADDR", &app.addr.to_string()),
        ],
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        get(&h1_client(), proxy, "x", "/")
            .await
            .header("x-upstream"),
        Some("app")
    );

    assert_eq!(wasp.admin_get("/live").0, 200);
    assert_eq!(wasp.admin_get("/ready").0, 200);
    let (status, config) = wasp.admin_get("/config");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&config).expect("config is JSON");
    assert_eq!(
        json["clusters"]["app"]["endpoints"][0],
        app.addr.to_string(),
        "{config}"
    );
    assert_eq!(
        json["listeners"][0]["limits"]["idle_timeout"], "60s",
        "{config}"
    );

    let metrics = wasp.metrics();
    for name in [
        "wasp_requests_total",
        "wasp_request_duration_seconds_bucket",
        "wasp_downstream_connections_open",
        "wasp_upstream_connections_total",
        "wasp_build_info",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(!metrics.contains("# EOF"));

    // Runtime log level.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "PUT",
            "-H",
            "x-wasp-admin: 1",
            &format!("http://{}/logging?level=debug", wasp.admin),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "log level set to debug"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let mut wasp = Wasp::start(&format!(
        r#"
[proxy]
drain_timeout = "10s"

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
        app.addr
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { get(&client, proxy, "x", "/slow?ms=1500").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    wasp.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New connections are refused while the slow one drains.
    let refused = std::net::TcpStream::connect_timeout(&proxy, Duration::from_millis(500)).is_err();
    assert!(refused, "listener still accepting after SIGTERM");
    // Readiness fails with its reason; liveness holds while draining.
    let (status, body) = wasp.admin_get("/ready");
    assert_eq!(status, 503, "/ready while draining: {body}");
    assert!(body.starts_with("draining"), "{body}");
    assert_eq!(wasp.admin_get("/live").0, 200, "/live while draining");

    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request failed: {r:?}");
    assert_eq!(r.body, "slow 1500ms done\n");
    let started = Instant::now();
    let code = wasp.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "exit after drain; log:\n{}", wasp.log_text());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Polls `/ready` from the moment the process starts: it never answers 200
/// before the filters are loaded and the listener accepts, and a request
/// sent the instant it does goes through the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_filters_are_loaded_and_listeners_bound() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let dir = with_fixtures("wasm32-wasip1", &["headers", "noop", "metrics"]);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = dir.path().join("wasp.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[admin]
bind = "{admin}"

[filters.hdr]
module = "headers.wasm"
config = {{ response = {{ add = {{ x-filtered = "yes" }} }} }}
[filters.noop]
module = "noop.wasm"
[filters.metrics]
module = "metrics.wasm"

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["noop", "metrics", "hdr"]
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
            app.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("wasp.log");
    let mut child = KillOnDrop(
        Command::new(WASP)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut not_ready = 0;
    let outcome = loop {
        if Instant::now() > deadline {
            break Err("not ready within 20s".to_string());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            break Err(format!("exited early with {status}"));
        }
        match http_get_blocking(admin, "/ready") {
            // The admin port is not served until start-up is done.
            None => std::thread::sleep(Duration::from_millis(2)),
            Some((503, body)) if body.starts_with("starting") => not_ready += 1,
            Some((200, _)) => {
                let accepts =
                    std::net::TcpStream::connect_timeout(&proxy, Duration::from_millis(500));
                let filters = http_get_blocking(admin, "/filters");
                break Ok((accepts.is_ok(), filters));
            }
            other => break Err(format!("unexpected /ready answer {other:?}")),
        }
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (accepts, filters) = match outcome {
        Ok(v) => v,
        Err(e) => panic!("{e}; log:\n{text}"),
    };
    assert!(accepts, "ready but the listener refuses connections");
    let (status, filters) = filters.expect("/filters answers");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&filters).expect("/filters is JSON");
    let states: Vec<(&str, &str)> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (
                        f["name"].as_str().unwrap_or(""),
                        f["state"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(states.len(), 3, "{filters}");
    assert!(states.iter().all(|(_, s)| *s == "ok"), "{filters}");
    let r = get(&h1_client(), proxy, "x", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-filtered"), Some("yes"));
    println!("/ready answered 503 starting {not_ready} times before 200");
}

/// A child process killed when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shutdown_exits_cleanly() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let mut wasp = Wasp::start(&format!(
        "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:{port}\"\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    ));
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "x-wasp-admin: 1",
            &format!("http://{}/shutdown", wasp.admin),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "shutting down");
    assert_eq!(wasp.wait_exit(Duration::from_secs(10)), Some(0));
}
