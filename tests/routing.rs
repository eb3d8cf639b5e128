//! Routing through the real binary: host, path, header and method matches,
//! weighted splits, prefix rewrite, forward-proxy (absolute-form) requests,
//! and upstream keep-alive.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use support::upstream::TestUpstream;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_header_and_method() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let d = TestUpstream::start("d").await;
    let port = free_port();
    let wasp = Wasp::start(&format!(
        r#"
[proxy]
workers = 2

[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  name = "by-header"
  match = {{ host = "reviews", headers = {{ x-canary = "1" }} }}
  cluster = "c"
  [[listeners.routes]]
  name = "by-method"
  match = {{ host = "reviews", method = "DELETE" }}
  cluster = "d"
  [[listeners.routes]]
  name = "api"
  match = {{ host = "reviews", prefix = "/api/" }}
  cluster = "b"
  rewrite_prefix = "/v2/"
  [[listeners.routes]]
  name = "exact"
  match = {{ path = "/exact" }}
  cluster = "b"
  [[listeners.routes]]
  name = "regex"
  match = {{ regex = "/items/[0-9]+" }}
  cluster = "c"
  [[listeners.routes]]
  name = "reviews"
  match = {{ host = "reviews" }}
  cluster = "a"

[clusters.a]
endpoints = ["{a}"]
[clusters.b]
endpoints = ["{b}"]
[clusters.c]
endpoints = ["{c}"]
[clusters.d]
endpoints = ["{d}"]
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr,
        d = d.addr
    ));
    let proxy = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();

    let r = get(&client, proxy, "reviews", "/anything").await;
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("a")),
        "{r:?}"
    );
    assert_eq!(r.header("x-seen-host"), Some("reviews"), "Host is kept");
    assert!(r.body.contains("x-forwarded-for: 127.0.0.1"), "{}", r.body);
    assert!(r.body.contains("x-forwarded-proto: http"), "{}", r.body);
    assert!(r.body.contains("via: 1.1 wasp"), "{}", r.body);
    assert!(
        r.header("via").unwrap_or("").contains("wasp"),
        "response via: {r:?}"
    );

    let r = get(&client, proxy, "reviews:9080", "/api/users?id=7").await;
    assert_eq!(r.header("x-upstream"), Some("b"));
    assert_eq!(
        r.header("x-seen-path"),
        Some("/v2/users?id=7"),
        "prefix rewritten"
    );

    let r = get(&client, proxy, "anyhost", "/exact").await;
    assert_eq!(r.header("x-upstream"), Some("b"));
    let r = get(&client, proxy, "anyhost", "/exact/not").await;
    assert_eq!(r.status, 404);

    let r = get(&client, proxy, "anyhost", "/items/42").await;
    assert_eq!(r.header("x-upstream"), Some("c"));

    let req = http::Request::get(format!("http://{proxy}/x"))
        .header("host", "reviews")
        .header("x-canary", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.header("x-upstream"), Some("c"));

    let req = http::Request::delete(format!("http://{proxy}/x"))
        .header("host", "reviews")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.header("x-upstream"), Some("d"));

    // No route: 404 naming the listener, host and path.
    let r = get(&client, proxy, "ratings", "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-wasp-error"), Some("no_route"));
    assert!(
        r.body.contains("\"outbound\"")
            && r.body.contains("\"ratings\"")
            && r.body.contains("\"/nope\""),
        "{}",
        r.body
    );
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_requests_total",
            &["route=\"reviews\"", "code_class=\"2xx\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "wasp_proxy_errors_total", &["code=\"no_route\""]),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_weights() {
    let v1 = TestUpstream::start("v1").await;
    let v2 = TestUpstream::start("v2").await;
    let port = free_port();
    let _wasp = Wasp::start(&format!(
        r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "ratings" }}
  clusters = [ {{ name = "v1", weight = 80 }}, {{ name = "v2", weight = 20 }} ]

[clusters.v1]
endpoints = ["{}"]
[clusters.v2]
endpoints = ["{}"]
"#,
        v1.addr, v2.addr
    ));
    let proxy = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let n = 400;
    let mut to_v2 = 0;
    for _ in 0..n {
        let r = get(&client, proxy, "ratings", "/").await;
        assert_eq!(r.status, 200);
        if r.header("x-upstream") == Some("v2") {
            to_v2 += 1;
        }
    }
    // Binomial(400, 0.2): mean 80, sd 8; allow 4 sd either way.
    println!("weighted split: {to_v2}/{n} to v2 (expected 80)");
    assert!((48..=112).contains(&to_v2), "{to_v2} of {n} went to v2");
    assert_eq!(v1.requests() + v2.requests(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_work_as_http_proxy() {
    let app = TestUpstream::start("reviews").await;
    let port = free_port();
    let _wasp = Wasp::start(&format!(
        r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "reviews" }}
  cluster = "reviews"

[clusters.reviews]
endpoints = ["{}"]
"#,
        app.addr
    ));
    // curl with a proxy sends absolute-form: GET http://reviews/path HTTP/1.1
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-x",
            &format!("http://127.0.0.1:{port}"),
            "http://reviews/books/1",
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-upstream: reviews"), "{text}");
    assert!(text.contains("x-seen-path: /books/1"), "{text}");
    assert!(text.contains("x-seen-host: reviews"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(port, app.addr, "", ""));
    let proxy = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    for _ in 0..50 {
        assert_eq!(get(&client, proxy, "app", "/").await.status, 200);
    }
    let accepted = app.accepted.load(std::sync::atomic::Ordering::SeqCst);
    println!("50 sequential requests used {accepted} upstream connection(s)");
    assert_eq!(app.requests(), 50);
    assert!(
        accepted <= 2,
        "keep-alive not used: {accepted} connections for 50 requests"
    );
    let m = wasp.metrics();
    assert!(
        metric_value(&m, "wasp_upstream_connections_total", &["cluster=\"app\""]).unwrap_or(0.0)
            <= 2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "wasp_upstream_connections_open", &["cluster=\"app\""]),
        Some(accepted as f64),
        "{m}"
    );
}

/// `Connection` may name end-to-end headers as hop-by-hop, but not take the
/// request id the logs use away from the upstream; every `X-Forwarded-For`
/// line from a trusted peer is kept, in order, with the peer appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_survives_connection_and_forwarded_for_lines_join() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    // Only a trusted peer's forwarded lines are kept.
    let _wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"trust_forwarded = ["127.0.0.1"]"#,
        "",
    ));
    let proxy = format!("127.0.0.1:{port}").parse().unwrap();
    let answer = raw_exchange(
        proxy,
        b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close, x-request-id\r\nX-Request-Id: abc-123\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 10.0.0.5\r\n\r\n",
        std::time::Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-request-id: abc-123\n"), "{answer}");
    assert!(
        answer.contains("x-forwarded-for: 6.6.6.6, 10.0.0.5, 127.0.0.1\n"),
        "{answer}"
    );
}
