//! OpenTelemetry spans exported over OTLP by the real binary, received by a
//! real collector endpoint in this process: one trace across two sidecars
//! with server/client links and HTTP semconv attributes, parent-based
//! sampling, proxy errors as error spans, the trace-context filter's trace
//! continued, OTLP/HTTP, and an unreachable collector that costs nothing
//! but a counter.

#[path = "support/otlp.rs"]
mod otlp;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use otlp::{Collector, Received, KIND_CLIENT, KIND_SERVER, STATUS_ERROR};
use support::upstream::TestUpstream;
use support::*;

/// Batches leave every 100 ms, so spans arrive quickly.
const FAST_EXPORT: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "100")];
const ARRIVAL: Duration = Duration::from_secs(15);

fn tracing_table(collector: SocketAddr, protocol: &str, service: &str) -> String {
    format!(
        "[tracing]\notlp_endpoint = \"http://{collector}\"\nprotocol = \"{protocol}\"\nsample_ratio = 1.0\nservice_name = \"{service}\"\n"
    )
}

/// Sidecar B: inbound listener in front of the app.
fn sidecar_b(tracing: &str, inbound: u16, app: SocketAddr) -> Wasp {
    Wasp::start_with_env(
        &format!(
            "{tracing}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{inbound}\"\n  [[listeners.routes]]\n  name = \"to-app\"\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{app}\"]\n"
        ),
        FAST_EXPORT,
    )
}

/// Sidecar A's outbound listener: host `reviews` goes to sidecar B.
fn outbound_config(tracing: &str, outbound: u16, inbound: u16, pipeline: &str) -> String {
    format!(
        "{tracing}\n[[listeners]]\nname = \"outbound\"\nbind = \"127.0.0.1:{outbound}\"\npipeline = [{pipeline}]\n  [[listeners.routes]]\n  name = \"to-reviews\"\n  match = {{ host = \"reviews\" }}\n  cluster = \"reviews\"\n[clusters.reviews]\nendpoints = [\"127.0.0.1:{inbound}\"]\n"
    )
}

fn request(
    addr: SocketAddr,
    host: &str,
    path: &str,
    traceparent: Option<&str>,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(format!("http://{addr}{path}")).header("host", host);
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// `traceparent` as the app saw it (the test upstream echoes its headers).
fn seen_traceparent(body: &str) -> Option<String> {
    body.lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .map(str::to_string)
}

fn one<'a>(spans: &'a [Received], service: &str, kind: i32) -> &'a Received {
    let found: Vec<&Received> = spans
        .iter()
        .filter(|s| s.service == service && s.span.kind == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {service} span of kind {kind}: {spans:#?}"
    );
    found[0]
}

/// client -> sidecar A (outbound) -> sidecar B (inbound) -> app, both
/// sidecars exporting to one gRPC collector.
struct TwoSidecars {
    collector: Collector,
    app: TestUpstream,
    _a: Wasp,
    _b: Wasp,
    /// Sidecar A's outbound listener.
    proxy: SocketAddr,
    /// Sidecar B's inbound port.
    inbound: u16,
}

impl TwoSidecars {
    async fn start() -> Self {
        let collector = Collector::grpc().await;
        let app = TestUpstream::start("app").await;
        let (outbound, inbound) = (free_port(), free_port());
        let _b = sidecar_b(
            &tracing_table(collector.addr, "grpc", "sidecar-b"),
            inbound,
            app.addr,
        );
        let _a = Wasp::start_with_env(
            &outbound_config(
                &tracing_table(collector.addr, "grpc", "sidecar-a"),
                outbound,
                inbound,
                "",
            ),
            FAST_EXPORT,
        );
        let proxy = SocketAddr::from(([127, 0, 0, 1], outbound));
        Self {
            collector,
            app,
            _a,
            _b,
            proxy,
            inbound,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_sidecars() {
    let mesh = TwoSidecars::start().await;
    let (collector, app, proxy, inbound) = (&mesh.collector, &mesh.app, mesh.proxy, mesh.inbound);
    let client = h1_client();

    // The caller's trace is continued.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = send(
        &client,
        request(
            proxy,
            "reviews",
            "/books/7",
            Some(&format!("00-{trace}-{caller_span}-01")),
        ),
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("app")),
        "{r:?}"
    );

    let spans = collector.wait_trace(trace, 4, ARRIVAL).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let a_server = one(&spans, "sidecar-a", KIND_SERVER);
    let a_client = one(&spans, "sidecar-a", KIND_CLIENT);
    let b_server = one(&spans, "sidecar-b", KIND_SERVER);
    let b_client = one(&spans, "sidecar-b", KIND_CLIENT);
    assert_eq!(a_server.parent_id(), caller_span);
    assert_eq!(a_client.parent_id(), a_server.span_id());
    assert_eq!(b_server.parent_id(), a_client.span_id());
    assert_eq!(b_client.parent_id(), b_server.span_id());
    // The app got B's client span as its parent.
    assert_eq!(
        seen_traceparent(&r.body).as_deref(),
        Some(format!("00-{trace}-{}-01", b_client.span_id()).as_str()),
        "{}",
        r.body
    );

    // Server span: HTTP server semconv.
    assert_eq!(a_server.span.name, "GET to-reviews");
    for (key, want) in [
        ("http.request.method", "GET".to_string()),
        ("http.route", "to-reviews".into()),
        ("url.path", "/books/7".into()),
        ("url.scheme", "http".into()),
        ("server.address", "reviews".into()),
        ("server.port", "80".into()),
        ("client.address", "127.0.0.1".into()),
        ("network.peer.address", "127.0.0.1".into()),
        ("network.protocol.version", "1.1".into()),
        ("http.response.status_code", "200".into()),
    ] {
        assert_eq!(a_server.attr(key), Some(want), "{key} on {a_server:#?}");
    }
    assert!(a_server.attr("network.peer.port").is_some());
    assert_ne!(
        a_server.span.status.as_ref().map_or(0, |s| s.code),
        STATUS_ERROR
    );
    // Client span: the upstream endpoint and the cluster.
    assert_eq!(a_client.span.name, "GET to-reviews");
    for (key, want) in [
        ("http.request.method", "GET".to_string()),
        ("server.address", "127.0.0.1".into()),
        ("server.port", inbound.to_string()),
        ("network.peer.address", "127.0.0.1".into()),
        ("wasp.cluster", "reviews".into()),
        ("url.full", format!("http://127.0.0.1:{inbound}/books/7")),
        ("http.response.status_code", "200".into()),
    ] {
        assert_eq!(a_client.attr(key), Some(want), "{key} on {a_client:#?}");
    }
    assert_eq!(b_server.span.name, "GET to-app");
    assert_eq!(b_server.attr("http.route").as_deref(), Some("to-app"));
    assert_eq!(b_server.attr("server.address").as_deref(), Some("reviews"));
    assert_eq!(b_client.attr("wasp.cluster").as_deref(), Some("app"));
    assert_eq!(
        b_client.attr("server.port"),
        Some(app.addr.port().to_string())
    );
    // Spans nest in time too.
    assert!(a_server.span.start_time_unix_nano <= a_client.span.start_time_unix_nano);
    assert!(a_client.span.end_time_unix_nano <= a_server.span.end_time_unix_nano);

    // No traceparent: A starts a trace (a root span) and B continues it.
    let r = send(&client, request(proxy, "reviews", "/", None)).await;
    assert_eq!(r.status, 200);
    let tp = seen_traceparent(&r.body).expect("a traceparent reaches the app");
    let root_trace = tp.split('-').nth(1).unwrap().to_string();
    let spans = collector.wait_trace(&root_trace, 4, ARRIVAL).await;
    let a_server = one(&spans, "sidecar-a", KIND_SERVER);
    assert_eq!(a_server.parent_id(), "", "a new trace starts at A");
    let b_server = one(&spans, "sidecar-b", KIND_SERVER);
    assert_eq!(
        b_server.parent_id(),
        one(&spans, "sidecar-a", KIND_CLIENT).span_id()
    );

    // A response the proxy makes itself is an error span with its code.
    let err_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = send(
        &client,
        request(
            proxy,
            "nowhere",
            "/x",
            Some(&format!("00-{err_trace}-b7ad6b7169203331-01")),
        ),
    )
    .await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (404, Some("no_route"))
    );
    let spans = collector.wait_trace(err_trace, 1, ARRIVAL).await;
    assert_eq!(spans.len(), 1, "no route: no client span: {spans:#?}");
    let s = &spans[0];
    assert_eq!(
        (s.service.as_str(), s.span.kind),
        ("sidecar-a", KIND_SERVER)
    );
    assert_eq!(s.span.name, "GET");
    assert_eq!(s.parent_id(), "b7ad6b7169203331");
    assert_eq!(s.attr("error.type").as_deref(), Some("no_route"));
    assert_eq!(s.attr("http.response.status_code").as_deref(), Some("404"));
    assert_eq!(s.span.status.as_ref().map(|st| st.code), Some(STATUS_ERROR));
    assert_eq!(s.attr("http.route"), None, "no route matched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_parent_makes_no_spans() {
    let mesh = TwoSidecars::start().await;
    let (collector, proxy) = (&mesh.collector, mesh.proxy);
    let client = h1_client();

    let unsampled = "11111111111111111111111111111111";
    for _ in 0..5 {
        let r = send(
            &client,
            request(
                proxy,
                "reviews",
                "/",
                Some(&format!("00-{unsampled}-2222222222222222-00")),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "traffic flows whatever the sampling");
        let tp = seen_traceparent(&r.body).expect("context still propagates");
        assert!(
            tp.starts_with(&format!("00-{unsampled}-")) && tp.ends_with("-00"),
            "same trace, still not sampled: {tp}"
        );
    }
    // A sampled request afterwards: once its spans from both sidecars are
    // in, anything queued before them has been exported too.
    let sampled = "33333333333333333333333333333333";
    let r = send(
        &client,
        request(
            proxy,
            "reviews",
            "/",
            Some(&format!("00-{sampled}-4444444444444444-01")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    collector.wait_trace(sampled, 4, ARRIVAL).await;
    let leaked: Vec<Received> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id() == unsampled)
        .collect();
    assert!(
        leaked.is_empty(),
        "unsampled parent, yet spans: {leaked:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_started_by_the_filter_is_continued() {
    let collector = Collector::grpc().await;
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let dir = with_builtin_filters(&["trace_context"]);
    let config = format!(
        "{}\n[filters.trace]\nmodule = \"trace_context.wasm\"\nconfig = {{ sample_ratio = 1.0 }}\n\n[[listeners]]\nname = \"outbound\"\nbind = \"127.0.0.1:{port}\"\npipeline = [\"trace\"]\n  [[listeners.routes]]\n  name = \"app\"\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
        tracing_table(collector.addr, "grpc", "with-filter"),
        app.addr
    );
    let _w = Wasp::start_in(dir, &config, FAST_EXPORT);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // The client sends no trace context: the filter starts one, and the
    // server span is its child rather than a new root.
    let r = send(&h1_client(), request(proxy, "app", "/", None)).await;
    assert_eq!(r.status, 200);
    let tp = seen_traceparent(&r.body).expect("traceparent upstream");
    let trace = tp.split('-').nth(1).unwrap().to_string();
    let spans = collector.wait_trace(&trace, 2, ARRIVAL).await;
    let server = one(&spans, "with-filter", KIND_SERVER);
    let client = one(&spans, "with-filter", KIND_CLIENT);
    assert_eq!(
        server.parent_id().len(),
        16,
        "parent is the filter's span: {server:#?}"
    );
    assert_ne!(server.parent_id(), "0".repeat(16));
    assert_eq!(client.parent_id(), server.span_id());
    assert!(tp.contains(&client.span_id()), "{tp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_http() {
    let collector = Collector::http().await;
    let app = TestUpstream::start("app").await;
    let inbound = free_port();
    let _w = sidecar_b(
        &tracing_table(collector.addr, "http", "over-http"),
        inbound,
        app.addr,
    );
    let proxy: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let r = send(
        &h1_client(),
        request(
            proxy,
            "app.local:8080",
            "/over-http",
            Some(&format!("00-{trace}-00f067aa0ba902b8-01")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = collector.wait_trace(trace, 2, ARRIVAL).await;
    let server = one(&spans, "over-http", KIND_SERVER);
    let client = one(&spans, "over-http", KIND_CLIENT);
    assert_eq!(server.parent_id(), "00f067aa0ba902b8");
    assert_eq!(client.parent_id(), server.span_id());
    assert_eq!(server.attr("server.address").as_deref(), Some("app.local"));
    assert_eq!(server.attr("server.port").as_deref(), Some("8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_is_counted_not_felt() {
    let app = TestUpstream::start("app").await;
    let inbound = free_port();
    // A loopback port nothing listens on.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let wasp = sidecar_b(&tracing_table(closed, "grpc", "nowhere"), inbound, app.addr);
    let proxy: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let client = h1_client();
    for i in 0..20 {
        let r = get(&client, proxy, "app", &format!("/{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let deadline = Instant::now() + ARRIVAL;
    let failures = loop {
        let m = wasp.metrics();
        let failures = metric_value(&m, "wasp_trace_export_failures_total", &[]).unwrap_or(0.0);
        if failures >= 1.0 {
            let lost = metric_value(&m, "wasp_trace_spans_lost_total", &[]).unwrap_or(0.0);
            assert!(lost >= 1.0, "{m}");
            assert_eq!(
                metric_value(&m, "wasp_trace_spans_exported_total", &[]),
                Some(0.0)
            );
            let ended = metric_value(&m, "wasp_trace_spans_ended_total", &[]).unwrap_or(0.0);
            assert!(ended >= 40.0, "20 requests, 2 spans each: {m}");
            break failures;
        }
        assert!(Instant::now() < deadline, "no export failure counted: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(failures >= 1.0);
    // Still serving while exports fail.
    let r = get(&client, proxy, "app", "/after").await;
    assert_eq!(r.status, 200);
    assert!(
        wasp.log_text().contains("OTLP export failed"),
        "{}",
        wasp.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_flushed_on_shutdown() {
    let collector = Collector::grpc().await;
    let app = TestUpstream::start("app").await;
    let inbound = free_port();
    // Batches would wait a minute: only the shutdown flush can send them.
    let mut wasp = Wasp::start_with_env(
        &format!(
            "{}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{inbound}\"\n  [[listeners.routes]]\n  name = \"to-app\"\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
            tracing_table(collector.addr, "grpc", "flushed"),
            app.addr
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    );
    let proxy: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let r = send(
        &h1_client(),
        request(
            proxy,
            "app",
            "/",
            Some(&format!("00-{trace}-00f067aa0ba902b9-01")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        collector.exports(),
        0,
        "nothing exported before the shutdown"
    );
    wasp.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = wasp.wait_exit(Duration::from_secs(20));
        (code, wasp)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "{}", code.1.log_text());
    let spans = collector.wait_trace(trace, 2, Duration::from_secs(2)).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_changes_need_a_restart() {
    let collector = Collector::grpc().await;
    let app = TestUpstream::start("app").await;
    let inbound = free_port();
    let listener = |tracing: &str| {
        format!(
            "{tracing}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{inbound}\"\n  [[listeners.routes]]\n  cluster = \"app\"\n[clusters.app]\nendpoints = [\"{}\"]\n",
            app.addr
        )
    };
    let wasp = Wasp::start_with_env(
        &listener(&tracing_table(collector.addr, "grpc", "first")),
        FAST_EXPORT,
    );
    let changed = listener(&tracing_table(collector.addr, "grpc", "second"));
    std::fs::write(
        wasp.dir.path().join("wasp.toml"),
        format!("[admin]\nbind = \"{}\"\n\n{changed}", wasp.admin),
    )
    .unwrap();
    let req = http::Request::post(format!("http://{}/reload", wasp.admin))
        .header("x-wasp-admin", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(&h1_client(), req).await;
    assert!(
        answer.body.contains("[tracing] needs a restart"),
        "{answer:?}"
    );
    // The running exporter keeps its service name.
    let proxy: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let trace = "7bf92f3577b34da6a3ce929d0e0e4739";
    let r = send(
        &h1_client(),
        request(
            proxy,
            "app",
            "/",
            Some(&format!("00-{trace}-00f067aa0ba902ba-01")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = collector.wait_trace(trace, 2, ARRIVAL).await;
    assert!(spans.iter().all(|s| s.service == "first"), "{spans:#?}");
}
