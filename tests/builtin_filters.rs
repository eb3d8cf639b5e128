//! The built-in filters (filters/, written on wasp-sdk) in the real proxy:
//! access-log fields, RED metrics on /metrics, W3C trace context across two
//! sidecars, the canary router's split, and a filter scaffolded by
//! `wasp filter new` that builds and loads.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

const FILTERS: &str = r#"
[filters.trace]
module = "trace_context.wasm"
config = { sample_ratio = 1.0, b3 = true }
[filters.access_log]
module = "access_log.wasm"
[filters.metrics]
module = "metrics.wasm"
"#;

fn request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(format!("http://{addr}{path}")).header("host", "app");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// `traceparent` as the upstream saw it (the test upstream echoes headers).
fn seen_traceparent(body: &str) -> Option<(String, String, String)> {
    let line = body.lines().find_map(|l| l.strip_prefix("traceparent: "))?;
    let parts: Vec<&str> = line.split('-').collect();
    (parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16).then(
        || {
            (
                parts[1].to_string(),
                parts[2].to_string(),
                parts[3].to_string(),
            )
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_and_metrics() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let config = format!(
        "{FILTERS}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"trace\", \"access_log\", \"metrics\"]\n  [[listeners.routes]]\n  name = \"main\"\n  match = {{ prefix = \"/ok\" }}\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        app.addr
    );
    let wasp = Wasp::start_in(
        with_builtin_filters(&["trace_context", "access_log", "metrics"]),
        &config,
        &[],
    );
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let n = 12;
    for i in 0..n {
        let r = send(
            &client,
            request(
                proxy,
                &format!("/ok/{i}"),
                &[("x-request-id", &format!("req-{i}"))],
            ),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = send(&client, request(proxy, "/missing", &[])).await;
    assert_eq!(r.status, 404);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // One JSON line per request, with every field.
    let log = wasp.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("\"method\""))
        .filter_map(|l| serde_json::from_str(&l[l.find('{')?..=l.rfind('}')?]).ok())
        .collect();
    assert_eq!(lines.len(), n + 1, "{log}");
    let first = lines
        .iter()
        .find(|l| l["request_id"] == "req-0")
        .expect("line of req-0");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/ok/0");
    assert_eq!(first["authority"], "app");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "main");
    assert_eq!(first["cluster"], "app");
    assert_eq!(first["upstream"], app.addr.to_string());
    assert!(first["bytes_out"].as_u64().unwrap_or(0) > 0, "{first}");
    assert!(
        first["duration_ms"].as_f64().unwrap_or(-1.0) >= 0.0,
        "{first}"
    );
    assert_eq!(
        first["trace_id"].as_str().map(str::len),
        Some(32),
        "{first}"
    );
    let missing = lines
        .iter()
        .find(|l| l["path"] == "/missing")
        .expect("404 line");
    assert_eq!(missing["error"], "no_route", "{missing}");
    assert_eq!(missing["status"], 404, "{missing}");

    // RED metrics with real labels and a histogram family.
    let m = wasp.metrics();
    let labels = [
        "filter=\"metrics\"",
        "listener=\"inbound\"",
        "route=\"main\"",
        "cluster=\"app\"",
    ];
    let mut with_class = labels.to_vec();
    with_class.push("code_class=\"2xx\"");
    assert_eq!(
        metric_value(&m, "wasp_http_requests_total", &with_class),
        Some(n as f64),
        "{m}"
    );
    assert!(
        m.contains("# TYPE wasp_http_request_duration_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "wasp_http_request_duration_seconds_count", &labels),
        Some(n as f64),
        "{m}"
    );
    let mut inf = labels.to_vec();
    inf.push("le=\"+Inf\"");
    assert_eq!(
        metric_value(&m, "wasp_http_request_duration_seconds_bucket", &inf),
        Some(n as f64),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_continues_across_two_sidecars() {
    let app = TestUpstream::start("reviews").await;
    let (outbound, inbound) = (free_port(), free_port());
    // Sidecar B: inbound in front of the app.
    let _b = Wasp::start_in(
        with_builtin_filters(&["trace_context", "access_log", "metrics"]),
        &format!(
            "{FILTERS}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{inbound}\"\npipeline = [\"trace\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
            app.addr
        ),
        &[],
    );
    // Sidecar A: the caller's outbound, routing to B.
    let _a = Wasp::start_in(
        with_builtin_filters(&["trace_context", "access_log", "metrics"]),
        &format!(
            "{FILTERS}\n[[listeners]]\nname = \"outbound\"\nbind = \"127.0.0.1:{outbound}\"\npipeline = [\"trace\"]\n  [[listeners.routes]]\n  match = {{ host = \"app\" }}\n  cluster = \"reviews\"\n[clusters.reviews]\nendpoints = [\"127.0.0.1:{inbound}\"]\n"
        ),
        &[],
    );
    let proxy: SocketAddr = format!("127.0.0.1:{outbound}").parse().unwrap();
    let client = h1_client();

    // An incoming trace is continued: same trace id, a new span, sampled kept.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let r = send(
        &client,
        request(
            proxy,
            "/",
            &[("traceparent", &format!("00-{trace}-{parent}-01"))],
        ),
    )
    .await;
    let (t, span, flags) =
        seen_traceparent(&r.body).unwrap_or_else(|| panic!("no traceparent upstream: {}", r.body));
    assert_eq!(t, trace);
    assert_ne!(span, parent, "each hop makes a new span");
    assert_eq!(flags, "01");
    assert!(r.body.contains("x-request-id: "), "{}", r.body);

    // No trace: one is started, and both sidecars agree on it.
    let r = send(&client, request(proxy, "/", &[])).await;
    let (t1, _, _) = seen_traceparent(&r.body).expect("started trace");
    assert_ne!(t1, "0".repeat(32));
    let r = send(&client, request(proxy, "/", &[])).await;
    let (t2, _, _) = seen_traceparent(&r.body).expect("started trace");
    assert_ne!(t1, t2, "each request starts its own trace");

    // Malformed: replaced by a new, valid trace.
    let r = send(
        &client,
        request(proxy, "/", &[("traceparent", "00-nothex-xyz-01")]),
    )
    .await;
    let (t3, _, _) = seen_traceparent(&r.body).expect("valid trace after a malformed one");
    assert!(t3.chars().all(|c| c.is_ascii_hexdigit()));

    // B3 single header is understood when b3 = true.
    let r = send(
        &client,
        request(proxy, "/", &[("b3", &format!("{trace}-{parent}-1"))]),
    )
    .await;
    let (t4, _, _) = seen_traceparent(&r.body).expect("trace from b3");
    assert_eq!(t4, trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_router_splits_sticky_by_user() {
    let v1 = TestUpstream::start("reviews-v1").await;
    let v2 = TestUpstream::start("reviews-v2").await;
    let port = free_port();
    let config = format!(
        r#"
[filters.canary]
module = "router.wasm"
config = {{ rules = [
  {{ header = "x-canary", equals = "1", cluster = "reviews-v2" }},
  {{ split = {{ cluster = "reviews-v2", percent = 10, key_header = "x-user" }} }},
] }}

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
pipeline = ["canary"]
  [[listeners.routes]]
  match = {{ host = "app" }}
  cluster = "reviews"

[clusters.reviews]
endpoints = ["{}"]
[clusters.reviews-v2]
endpoints = ["{}"]
"#,
        v1.addr, v2.addr
    );
    let _wasp = Wasp::start_in(with_builtin_filters(&["router"]), &config, &[]);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let users = 400;
    let mut to_v2 = Vec::new();
    for i in 0..users {
        let user = format!("user-{i}");
        let r = send(&client, request(proxy, "/", &[("x-user", &user)])).await;
        assert_eq!(r.status, 200);
        if r.header("x-upstream") == Some("reviews-v2") {
            to_v2.push(user);
        }
    }
    println!(
        "canary split: {} of {users} users to reviews-v2 (expected 40)",
        to_v2.len()
    );
    // Binomial(400, 0.1): sd 6; allow 4 sd.
    assert!(
        (16..=64).contains(&to_v2.len()),
        "{} users went to v2",
        to_v2.len()
    );
    // Sticky: the same users land on the same side again.
    for user in to_v2.iter().take(10) {
        let r = send(&client, request(proxy, "/", &[("x-user", user)])).await;
        assert_eq!(r.header("x-upstream"), Some("reviews-v2"), "{user} moved");
    }
    let r = send(
        &client,
        request(proxy, "/", &[("x-canary", "1"), ("x-user", "user-0")]),
    )
    .await;
    assert_eq!(r.header("x-upstream"), Some("reviews-v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffolded_filter_builds_and_loads() {
    let work = TempDir::new("scaffold");
    let crate_dir = work.path().join("hello-filter");
    wasp_ok([
        "filter".as_ref(),
        "new".as_ref(),
        "hello-filter".as_ref(),
        "--dir".as_ref(),
        crate_dir.as_os_str(),
    ]);
    for f in ["Cargo.toml", "src/lib.rs", "README.md", "filter-test.toml"] {
        let text = std::fs::read_to_string(crate_dir.join(f)).unwrap();
        assert!(!text.contains("{{"), "{f} still has placeholders");
    }
    // Build it as a user would, sharing the workspace's target dir for speed.
    let target_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/scaffold"));
    let build = Command::new("cargo")
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip1",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "scaffolded filter does not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let wasm = target_dir.join("wasm32-wasip1/release/hello_filter.wasm");
    // The scaffolded fixture file passes against the scaffolded filter.
    let tested = wasp_ok([
        "filter".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        crate_dir.join("filter-test.toml").as_os_str(),
    ]);
    let out = String::from_utf8_lossy(&tested.stdout);
    assert!(out.contains("2 cases, 2 ok, 0 failed"), "{out}");
    let dir = TempDir::new("scaffold-run");
    std::fs::create_dir_all(dir.path().join("filters.d")).unwrap();
    std::fs::copy(&wasm, dir.path().join("filters.d/hello_filter.wasm")).unwrap();
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start_in(
        dir,
        &format!(
            "[filters.hello_filter]\nmodule = \"hello_filter.wasm\"\nconfig = {{ header = \"x-hello\", value = \"from-template\" }}\n[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"hello_filter\"]\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
            app.addr
        ),
        &[],
    );
    let r = send(
        &h1_client(),
        request(format!("127.0.0.1:{port}").parse().unwrap(), "/", &[]),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("x-hello: from-template"),
        "the upstream saw: {}",
        r.body
    );
}
