//! Running as a sidecar: wrapper mode (the app starts only once the proxy
//! is ready, gets SIGTERM forwarded, and its exit code becomes wasp's),
//! shutdown ordering under load, `wasp await`, and the Kubernetes manifests.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::*;

fn sidecar_config(inbound: u16, outbound: u16, app: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[proxy]
workers = 1
{extra}

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{inbound}"
  [[listeners.routes]]
  cluster = "app"

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{outbound}"
  [[listeners.routes]]
  match = {{ host = "reviews" }}
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
"#
    )
}

/// Starts `wasp run --config ... -- sh -c SCRIPT` without waiting for ready
/// (the point is that wasp itself orders start-up).
fn start_wrapped(config: &str, script: &str, dir: &TempDir) -> (std::process::Child, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = dir.path().join("wasp.toml");
    std::fs::write(&path, format!("[admin]\nbind = \"{admin}\"\n{config}")).unwrap();
    let log = std::fs::File::create(dir.path().join("wasp.log")).unwrap();
    let child = Command::new(WASP)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .arg("--")
        .args(["sh", "-c", script])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, admin)
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapper_mode_app_calls_out_at_once_and_its_exit_code_wins() {
    let app = TestUpstream::start("reviews").await;
    let dir = TempDir::new("wrap");
    let out = dir.path().join("first-call.txt");
    // The app's very first action is an outbound call through HTTP_PROXY.
    let script = format!(
        "curl -sS -o {out} -w '%{{http_code}}' http://reviews/first > {out}.code; echo \"$HTTP_PROXY\" > {out}.proxy; exit 3",
        out = out.display()
    );
    let (inbound, outbound) = (free_port(), free_port());
    let (mut child, _) = start_wrapped(
        &sidecar_config(inbound, outbound, app.addr, ""),
        &script,
        &dir,
    );
    let code = wait_exit(&mut child, Duration::from_secs(20));
    let log = std::fs::read_to_string(dir.path().join("wasp.log")).unwrap_or_default();
    assert_eq!(
        code,
        Some(3),
        "wasp must exit with the app's code; log:\n{log}"
    );
    let status = std::fs::read_to_string(format!("{}.code", out.display())).unwrap();
    assert_eq!(status, "200", "first outbound call failed; log:\n{log}");
    let proxy = std::fs::read_to_string(format!("{}.proxy", out.display())).unwrap();
    assert_eq!(proxy.trim(), format!("http://127.0.0.1:{outbound}"));
    assert_eq!(app.requests(), 1);
    assert!(log.contains("the app exited with code 3"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_and_outbound_outlives_the_app() {
    let app = TestUpstream::start("reviews").await;
    let dir = TempDir::new("wrap-term");
    let marker = dir.path().join("term.txt");
    // On SIGTERM the app still makes one outbound call (after inbound has
    // started draining), records it, and exits 0.
    let script = format!(
        "trap 'sleep 0.5; curl -sS -o /dev/null -w \"%{{http_code}}\" http://reviews/after-term > {m}; exit 0' TERM; \
         while true; do sleep 0.05; done",
        m = marker.display()
    );
    let (inbound, outbound) = (free_port(), free_port());
    let config = sidecar_config(inbound, outbound, app.addr, "drain_delay = \"200ms\"");
    let (mut child, admin) = start_wrapped(&config, &script, &dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get_blocking(admin, "/ready").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(20));
    let log = std::fs::read_to_string(dir.path().join("wasp.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("forwarded"), "SIGTERM not forwarded:\n{log}");
    let after = std::fs::read_to_string(&marker).unwrap_or_default();
    assert_eq!(
        after, "200",
        "the app's call during shutdown failed; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_fails_no_in_flight_request() {
    let app = TestUpstream::start("app").await;
    let (inbound, outbound) = (free_port(), free_port());
    let mut wasp = Wasp::start(&sidecar_config(
        inbound,
        outbound,
        app.addr,
        "drain_delay = \"300ms\"\ndrain_timeout = \"10s\"",
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (ok, refused, failed) = (ok.clone(), refused.clone(), failed.clone());
        clients.push(std::thread::spawn(move || {
            while Instant::now() < stop_at {
                // A fresh connection per request: a refused connect is "not
                // accepted"; anything after acceptance must succeed.
                let Ok(mut s) =
                    std::net::TcpStream::connect_timeout(&proxy, Duration::from_millis(200))
                else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(
                    b"GET /slow?ms=50 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
                );
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    wasp.signal("TERM");
    // During drain_delay the inbound listener still serves, but /ready fails.
    std::thread::sleep(Duration::from_millis(100));
    assert_ne!(wasp.admin_get("/ready").0, 200);
    for c in clients {
        c.join().unwrap();
    }
    let code = wasp.wait_exit(Duration::from_secs(10));
    let (ok, refused, failed) = (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!("shutdown under load: {ok} served, {refused} refused after close, {failed} failed");
    assert_eq!(failed, 0, "accepted requests failed during shutdown");
    assert!(ok > 20 && refused > 0, "ok={ok} refused={refused}");
    assert_eq!(code, Some(0));
}

#[test]
fn await_waits_for_ready_and_times_out_clearly() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(TestUpstream::start("app"));
    let (inbound, outbound) = (free_port(), free_port());
    let wasp = Wasp::start(&sidecar_config(inbound, outbound, app.addr, ""));
    let out = wasp_ok([
        "await",
        "--admin",
        &wasp.admin.to_string(),
        "--timeout",
        "5s",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is ready"));

    let nowhere = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = Command::new(WASP)
        .args(["await", "--admin", &nowhere, "--timeout", "500ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("wasp at {nowhere} is not ready after 500ms")),
        "{err}"
    );
    assert!(err.contains("cannot connect"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn kubernetes_manifests_validate_and_embed_a_valid_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kubernetes");
    let files: Vec<String> = ["configmap.yaml", "deployment.yaml", "service.yaml"]
        .iter()
        .map(|f| format!("{dir}/{f}"))
        .collect();
    let out = Command::new("kubernetes-validate")
        .args(["-k", "1.30.0", "--strict"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/test.sh does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    assert_eq!(text.matches("passed").count(), 4, "{text}");

    // The sidecar config inside the ConfigMap must pass `wasp check`.
    let yaml = std::fs::read_to_string(&files[0]).unwrap();
    let toml: String = yaml
        .split_once("wasp.toml: |\n")
        .expect("wasp.toml key")
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        // DNS names of the cluster do not resolve here; check the rest.
        .replace("reviews.default.svc.cluster.local:15006", "127.0.0.1:15006");
    let tmp = TempDir::new("k8s");
    let path = tmp.path().join("wasp.toml");
    std::fs::write(&path, toml).unwrap();
    let out = wasp_ok(["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("inbound on 0.0.0.0:15006")
            && summary.contains("outbound on 127.0.0.1:15001"),
        "{summary}"
    );
    // Probes and Prometheus use the probes port; the admin API stays on
    // loopback, so `wasp check` has nothing to warn about.
    assert!(
        summary.contains("admin: 127.0.0.1:9901  probes: 0.0.0.0:15021"),
        "{summary}"
    );
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(!warnings.contains("warning"), "{warnings}");
    let deployment = std::fs::read_to_string(&files[1]).unwrap();
    assert!(
        deployment.contains("containerPort: 15021")
            && !deployment.contains("9901")
            && deployment.matches("port: probes").count() == 3,
        "every probe and the scrape annotation use the probes port:\n{deployment}"
    );
}

/// The app was started with the outbound listener's address as
/// `HTTP_PROXY`: a reload may change that listener's routes but not move or
/// remove it (that would silently cut the app's egress).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapper_mode_reload_keeps_the_apps_proxy_listener_in_place() {
    let app = TestUpstream::start("reviews").await;
    let dir = TempDir::new("wrap-reload");
    let script = "trap 'exit 0' TERM; while true; do sleep 0.05; done";
    let (inbound, outbound) = (free_port(), free_port());
    let (mut child, admin) = start_wrapped(
        &sidecar_config(inbound, outbound, app.addr, ""),
        script,
        &dir,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get_blocking(admin, "/ready").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reload = |config: String| {
        std::fs::write(
            dir.path().join("wasp.toml"),
            format!("[admin]\nbind = \"{admin}\"\n{config}"),
        )
        .unwrap();
        raw_exchange(
            admin,
            b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nx-wasp-admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
    };
    let proxy: SocketAddr = format!("127.0.0.1:{outbound}").parse().unwrap();
    let client = h1_client();

    let moved = reload(sidecar_config(inbound, free_port(), app.addr, ""));
    assert!(
        moved.contains("HTTP_PROXY") && moved.contains("needs a restart"),
        "moving the app's proxy listener must be refused: {moved}"
    );
    let r = get(&client, proxy, "reviews", "/still-here").await;
    assert_eq!(r.status, 200, "the app's proxy listener keeps serving");

    // Its routes may change: an extra route on the same listener applies.
    let config = sidecar_config(inbound, outbound, app.addr, "").replace(
        "  match = { host = \"reviews\" }",
        "  match = { host = \"ratings\" }\n  cluster = \"app\"\n  [[listeners.routes]]\n  match = { host = \"reviews\" }",
    );
    let routed = reload(config);
    assert!(routed.contains("reloaded: generation"), "{routed}");
    let r = get(&client, proxy, "ratings", "/new-route").await;
    assert_eq!(r.status, 200, "the new route serves");

    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(20)), Some(0));
}

/// The transparent-capture example (`examples/kubernetes/transparent.yaml`):
/// valid manifests, an init container running `wasp iptables` with the UID
/// wasp runs as, and an embedded config `wasp check` accepts with both
/// capture listeners.
#[test]
fn transparent_capture_manifest_validates_and_embeds_a_valid_config() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/kubernetes/transparent.yaml"
    );
    let out = Command::new("kubernetes-validate")
        .args(["-k", "1.30.0", "--strict", file])
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/test.sh does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    assert_eq!(text.matches("passed").count(), 2, "{text}");
    let yaml = std::fs::read_to_string(file).unwrap();
    assert!(yaml.contains("--proxy-uid=1337") && yaml.contains("runAsUser: 1337"));
    assert!(
        !yaml.contains("name: HTTP_PROXY"),
        "the app must be unmodified"
    );
    let toml: String = yaml
        .split_once("wasp.toml: |\n")
        .expect("wasp.toml key")
        .1
        .split("\n---")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = TempDir::new("k8s-transparent");
    let path = tmp.path().join("wasp.toml");
    std::fs::write(&path, toml).unwrap();
    let out = wasp_ok(["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("outbound on 0.0.0.0:15001 (capture outbound)")
            && summary.contains("inbound on 0.0.0.0:15006 (capture inbound)"),
        "{summary}"
    );
}
