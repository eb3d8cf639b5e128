//! The request path's phases on hand-built snapshots and requests: a config
//! parsed from TOML, the snapshot and worker pools built from it the way
//! the server builds them (filters loaded by the engine from the fixtures
//! in `tests/wasm/`, built by `scripts/build-wasm.sh`), and real upstreams
//! on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

use super::phases;
use super::{Activity, Ctx, InFlight, ProxyError, RequestLog};
use crate::errors::ErrorCode;
use crate::filter::{FilterRuntime, FilterSet};
use crate::snapshot::{compile, filter_specs, Snapshot};
use crate::telemetry::Metrics;
use crate::upstream::Upstreams;

/// A snapshot and one worker's pools, as `server` builds them.
struct World {
    metrics: Arc<Metrics>,
    snapshot: Snapshot,
    upstreams: Upstreams,
    activity: Arc<Activity>,
    drain: tokio::sync::watch::Receiver<bool>,
    watchdog: super::Watchdog,
    _drain_tx: tokio::sync::watch::Sender<bool>,
}

fn world(toml: &str) -> World {
    let config = crate::config::parse(Path::new("/etc/wasp/wasp.toml"), toml, |_| None)
        .unwrap_or_else(|p| panic!("test config: {p:?}"));
    let metrics = Metrics::new();
    let specs = filter_specs(&config).unwrap();
    let filters = if specs.is_empty() {
        Arc::new(FilterSet::new(0, Vec::new()))
    } else {
        filter_runtime().load(specs).unwrap()
    };
    let compiled =
        compile(Arc::new(config), None).unwrap_or_else(|p| panic!("test config compiles: {p:?}"));
    let snapshot = Snapshot::new(1, compiled, filters, &metrics).unwrap();
    let upstreams = Upstreams::build(&snapshot.clusters, &metrics, None);
    let (tx, rx) = tokio::sync::watch::channel(false);
    World {
        metrics,
        snapshot,
        upstreams,
        activity: Arc::default(),
        drain: rx,
        watchdog: Default::default(),
        _drain_tx: tx,
    }
}

/// The engine the filtered worlds load their filters with. Callouts are
/// not attached: a filter's `http_call` fails.
fn filter_runtime() -> Arc<FilterRuntime> {
    static RT: OnceLock<Arc<FilterRuntime>> = OnceLock::new();
    RT.get_or_init(|| {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/.cache");
        let callouts = Arc::new(crate::upstream::Callouts::default());
        FilterRuntime::new(Some(cache), callouts).unwrap()
    })
    .clone()
}

impl World {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            listener: &self.snapshot.listeners[0],
            snapshot: &self.snapshot,
            upstreams: &self.upstreams,
            peer: "10.1.2.3:40000".parse().unwrap(),
            local: "127.0.0.1:15006".parse().unwrap(),
            scheme: "http",
            principal: None,
            tls: None,
            activity: &self.activity,
            drain_deadline: &self.drain,
            watchdog: &self.watchdog,
            original_dst: None,
            forwarded_for: None,
        }
    }

    fn cluster(&self, name: &str) -> &crate::upstream::Upstream {
        self.upstreams.by_name(name).unwrap()
    }

    /// Endpoint failures counted for outlier detection in `cluster`.
    fn failures(&self, cluster: &str) -> u64 {
        self.cluster(cluster)
            .state
            .endpoints()
            .endpoints
            .iter()
            .map(|e| e.failures.load(Ordering::Relaxed))
            .sum()
    }

    /// The listener's `wasp_proxy_errors_total` for `code`, as rendered.
    fn errors(&self, code: &str) -> u64 {
        let mut text = String::new();
        self.metrics.render(&mut text);
        let series = format!("wasp_proxy_errors_total{{listener=\"in\",code=\"{code}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// All of the listener's `wasp_proxy_errors_total`, whatever the code.
    fn all_errors(&self) -> u64 {
        let mut text = String::new();
        self.metrics.render(&mut text);
        text.lines()
            .filter_map(|l| l.strip_prefix("wasp_proxy_errors_total{listener=\"in\","))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// One request through `serve`, the whole path as `handle` runs it.
    async fn serve<B>(&self, req: Request<B>) -> Response<crate::upstream::ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<crate::upstream::BoxError>,
    {
        self.activity.started.fetch_add(1, Ordering::Release);
        let in_flight = InFlight(self.activity.clone());
        super::serve(req, &self.ctx(), std::time::Instant::now(), in_flight).await
    }
}

/// One listener "in" whose routes are `routes` (TOML), and `clusters`.
fn config(routes: &str, clusters: &str) -> String {
    format!(
        "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:15006\"\nlimits = {{ max_body_bytes = 100 }}\n{routes}\n{clusters}\n"
    )
}

/// As [`config`], with the listener's pipeline the one filter `fixture`
/// (a module of `target/wasm-fixtures/wasm32-wasip1`), closed on failure.
fn filtered_config(fixture: &str, routes: &str, clusters: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-fixtures/wasm32-wasip1");
    let module = dir.join(format!("{fixture}.wasm"));
    assert!(
        module.is_file(),
        "missing wasm fixture {}: run scripts/build-wasm.sh first",
        module.display()
    );
    format!(
        "[proxy]\nfilters_dir = \"{}\"\n[filters.f]\nmodule = \"{fixture}.wasm\"\nfail = \"closed\"\n[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:15006\"\npipeline = [\"f\"]\nlimits = {{ max_body_bytes = 100 }}\n{routes}\n{clusters}\n",
        dir.display()
    )
}

fn get(uri: &str, host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// An upstream (HTTP/1.1, or HTTP/2 with prior knowledge) that reads the
/// whole request, then answers 200 with
/// "<method> <uri> host=<host> xff=<x-forwarded-for>".
async fn echo_upstream() -> SocketAddr {
    counting_upstream().await.0
}

/// [`echo_upstream`], and how many request heads it has received.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let head = format!(
                            "{} {} host={} xff={}",
                            req.method(),
                            req.uri(),
                            header("host"),
                            header("x-forwarded-for")
                        );
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(head))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (addr, heads)
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn text(resp: Response<crate::upstream::ProxyBody>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[test]
fn precheck_refuses_framing_a_proxy_must_not_pass_on() {
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]",
    ));
    let ctx = w.ctx();
    let code = |req: Request<Full<Bytes>>| {
        phases::precheck(&req, &ctx, &mut RequestLog::default())
            .err()
            .map(|e| e.code())
    };
    let mut both = get("/", "a");
    both.headers_mut()
        .insert("content-length", "3".parse().unwrap());
    both.headers_mut()
        .insert("transfer-encoding", "chunked".parse().unwrap());
    assert_eq!(code(both), Some(ErrorCode::BadRequest));
    let mut big = get("/", "a");
    big.headers_mut()
        .insert("content-length", "101".parse().unwrap());
    assert_eq!(code(big), Some(ErrorCode::BodyTooLarge));
    let mut two_hosts = get("/", "a");
    two_hosts.headers_mut().append("host", "b".parse().unwrap());
    assert_eq!(code(two_hosts), Some(ErrorCode::BadRequest));
    let no_host = Request::builder()
        .uri("/")
        .version(Version::HTTP_11)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(code(no_host), Some(ErrorCode::BadRequest));
    let connect = Request::builder()
        .method("CONNECT")
        .uri("a:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(code(connect), Some(ErrorCode::BadRequest));
    assert_eq!(code(get("/", "a")), None);
}

#[test]
fn route_names_the_route_and_cluster_in_the_log() {
    let w = world(&config(
        "[[listeners.routes]]\nname = \"api\"\nmatch = { prefix = \"/api\" }\ncluster = \"app\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]",
    ));
    let ctx = w.ctx();
    let mut log = RequestLog::default();
    let (mut parts, _) = get("/api/x", "svc").into_parts();
    let routed = phases::route(&mut parts, &ctx, None, &mut log).unwrap();
    assert_eq!(&*routed.route.name, "api");
    assert_eq!(&*routed.upstream.name, "app");
    assert_eq!(routed.host, "svc");
    assert_eq!(log.route.as_deref(), Some("api"));
    assert_eq!(log.cluster.as_deref(), Some("app"));
    assert!(log.stats.is_some());

    let mut log = RequestLog::default();
    let (mut parts, _) = get("/other", "svc").into_parts();
    let err = phases::route(&mut parts, &ctx, None, &mut log)
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::NoRoute);
    assert!(err.to_string().contains("\"/other\""), "{err}");
    assert!(log.route.is_none() && log.stats.is_none());
}

#[tokio::test]
async fn admission_over_the_cluster_limit_is_overflow_and_counted() {
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]\nlimits = { max_requests = 1 }",
    ));
    let ctx = w.ctx();
    let (mut parts, _) = get("/", "a").into_parts();
    let routed = phases::route(&mut parts, &ctx, None, &mut RequestLog::default()).unwrap();
    let held = phases::admit_and_pick(&routed, &parts, &ctx, None)
        .await
        .unwrap();
    let err = phases::admit_and_pick(&routed, &parts, &ctx, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), ErrorCode::Overflow);
    let counters = &w.cluster("app").state.counters;
    assert_eq!(counters.overflows.load(Ordering::Relaxed), 1);
    drop(held);
    assert!(phases::admit_and_pick(&routed, &parts, &ctx, None)
        .await
        .is_ok());
}

#[tokio::test]
async fn rewrite_points_at_the_endpoint_and_cleans_the_head() {
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/api\" }\ncluster = \"app\"\nrewrite_prefix = \"/v2\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]\nprotocol = \"http2\"",
    ));
    let ctx = w.ctx();
    let mut req = get("/api/x?y=1", "svc");
    let h = req.headers_mut();
    h.insert("x-request-id", "abc".parse().unwrap());
    h.insert("connection", "x-request-id, x-hop".parse().unwrap());
    h.insert("x-hop", "1".parse().unwrap());
    h.insert("expect", "100-continue".parse().unwrap());
    let (mut parts, _) = req.into_parts();
    let routed = phases::route(&mut parts, &ctx, None, &mut RequestLog::default()).unwrap();
    let (_admission, picked) = phases::admit_and_pick(&routed, &parts, &ctx, None)
        .await
        .unwrap();
    phases::rewrite(&mut parts, &routed, &picked, &ctx, false, "1.1 wasp").unwrap();
    assert_eq!(parts.uri.to_string(), "http://127.0.0.1:9/v2/x?y=1");
    assert_eq!(parts.version, Version::HTTP_2);
    let h = &parts.headers;
    assert_eq!(h["x-request-id"], "abc");
    assert!(h.get("x-hop").is_none() && h.get("connection").is_none());
    assert!(h.get("expect").is_none());
    assert_eq!(h["host"], "svc");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    assert_eq!(h["via"], "1.1 wasp");
}

#[tokio::test]
async fn forward_sends_upstream_and_brings_the_answer_back() {
    let up = echo_upstream().await;
    let w = world(&config(
        "[[listeners.routes]]\nname = \"r\"\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        &format!("[clusters.app]\nendpoints = [\"{up}\"]"),
    ));
    let ctx = w.ctx();
    let mut log = RequestLog::default();
    let resp = phases::forward(get("/p?q=1", "svc"), &ctx, None, None, &mut log)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["via"], "1.1 wasp");
    assert_eq!(text(resp).await, "GET /p?q=1 host=svc xff=10.1.2.3");
    assert_eq!(log.cluster.as_deref(), Some("app"));
}

#[tokio::test]
async fn a_retry_on_connect_failure_goes_to_the_other_endpoint() {
    let up = echo_upstream().await;
    let down = closed_port().await;
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"\nretry = { on = [\"connect-failure\"], attempts = 1, backoff = \"1ms\" }",
        &format!("[clusters.app]\nendpoints = [\"{down}\", \"{up}\"]\nbalance = \"round_robin\""),
    ));
    let ctx = w.ctx();
    // Round robin: whichever endpoint the first try takes, every request
    // ends on the live one, and each first try at the dead one is retried.
    for _ in 0..4 {
        let resp = phases::forward(get("/", "a"), &ctx, None, None, &mut RequestLog::default())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let state = &w.cluster("app").state;
    let retries = state.counters.retries.load(Ordering::Relaxed);
    let dead = state
        .endpoints()
        .endpoints
        .iter()
        .find(|e| e.addr == down)
        .map(|e| e.failures.load(Ordering::Relaxed))
        .unwrap();
    assert!(retries >= 1, "{retries}");
    assert_eq!(retries, dead);
}

#[tokio::test]
async fn an_endpoint_that_refuses_is_upstream_connect() {
    let down = closed_port().await;
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        &format!("[clusters.app]\nendpoints = [\"{down}\"]"),
    ));
    let ctx = w.ctx();
    let err = phases::forward(get("/", "a"), &ctx, None, None, &mut RequestLog::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ProxyError::UpstreamConnect { addr, .. } if *addr == down),
        "{err:?}"
    );
}

/// A client body over the listener's limit, without a declared length:
/// the client's fault (413), and no verdict on the endpoint, over either
/// upstream protocol (hyper's HTTP/2 client reports the body's failure as
/// a reset of the stream).
#[tokio::test]
async fn a_body_over_the_limit_is_the_clients_fault() {
    for protocol in ["http1", "http2"] {
        let up = echo_upstream().await;
        let w = world(&config(
            "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
            &format!("[clusters.app]\nendpoints = [\"{up}\"]\nprotocol = \"{protocol}\""),
        ));
        let ctx = w.ctx();
        let chunks = (0..3).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 60]))));
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let req = Request::builder()
            .method("POST")
            .uri("/")
            .header("host", "a")
            .body(body)
            .unwrap();
        let err = phases::forward(req, &ctx, None, None, &mut RequestLog::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), ErrorCode::BodyTooLarge, "{protocol}: {err}");
        assert_eq!(w.failures("app"), 0, "{protocol}");
    }
}

/// A failure becomes its response in one place (`serve`): the code's
/// status and `x-wasp-error`, the listener's error counter; the request
/// counts as in flight until its body is done.
#[tokio::test]
async fn serve_answers_a_failure_with_its_code() {
    let w = world(&config(
        "[[listeners.routes]]\nmatch = { prefix = \"/api\" }\ncluster = \"app\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]",
    ));
    assert_eq!(w.errors("no_route"), 0);
    let resp = w.serve(get("/nope", "a")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-wasp-error"], "no_route");
    assert_eq!(w.errors("no_route"), 1);
    assert_eq!(w.all_errors(), 1);
    assert!(w.activity.busy());
    assert!(text(resp).await.contains("no route on listener \"in\""));
    assert!(!w.activity.busy());
}

/// A filter's answer to the request headers ends the path before the
/// route: the client gets the filter's response, the upstream sees
/// nothing, and it is no proxy error. Other requests pass the filter.
#[tokio::test]
async fn a_filter_answering_the_request_headers_is_the_response() {
    let (up, heads) = counting_upstream().await;
    let w = world(&filtered_config(
        "local-reply",
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        &format!("[clusters.app]\nendpoints = [\"{up}\"]"),
    ));
    let resp = w.serve(get("/deny/x", "a")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-local"], "1");
    assert!(resp.headers().get("x-wasp-error").is_none());
    assert_eq!(text(resp).await, "denied by filter\n");
    assert_eq!(heads.load(Ordering::SeqCst), 0);

    let resp = w.serve(get("/ok", "a")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "GET /ok host=a xff=10.1.2.3");
    assert_eq!(heads.load(Ordering::SeqCst), 1);
    assert_eq!(w.all_errors(), 0);
}

/// A filter that answers in the middle of the request body abandons the
/// upstream request: the client gets the filter's answer; the failed try
/// is the body's (`SendError::Body`), so the route's `retry on reset`
/// does not send the request again (which would bypass the filter) and
/// the endpoint is not counted failed. Over HTTP/1 and HTTP/2 (where
/// hyper reports the body's failure as a reset of the stream).
#[tokio::test]
async fn a_filter_answering_mid_body_is_neither_retried_nor_blamed() {
    for protocol in ["http1", "http2"] {
        let (up, heads) = counting_upstream().await;
        let w = world(&filtered_config(
            "body-deny",
            "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"\nretry = { on = [\"reset\"], attempts = 2, backoff = \"1ms\" }",
            &format!("[clusters.app]\nendpoints = [\"{up}\"]\nprotocol = \"{protocol}\""),
        ));
        // The second chunk, which the filter answers, only once the
        // upstream has the request: the answer comes mid-body.
        let seen = heads.clone();
        let first = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
            Bytes::from_static(b"hello "),
        ))]);
        let second = futures_util::stream::once(async move {
            for _ in 0..500 {
                if seen.load(Ordering::SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Frame::data(Bytes::from_static(b"deny")))
        });
        let body = StreamBody::new(futures_util::StreamExt::chain(first, second));
        let req = Request::builder()
            .method("PUT")
            .uri("/upload")
            .header("host", "a")
            .body(body)
            .unwrap();
        let resp = w.serve(req).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{protocol}");
        assert_eq!(resp.headers()["x-body-deny"], "1", "{protocol}");
        assert_eq!(text(resp).await, "body denied by filter\n", "{protocol}");
        assert_eq!(heads.load(Ordering::SeqCst), 1, "{protocol}");
        let counters = &w.cluster("app").state.counters;
        assert_eq!(counters.retries.load(Ordering::Relaxed), 0, "{protocol}");
        assert_eq!(w.failures("app"), 0, "{protocol}");
        assert_eq!(w.all_errors(), 0, "{protocol}");
    }
}

/// A waker that says whether it was woken.
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One request's chain through the world's listener pipeline, as `serve`
/// makes it, past its request-header phase.
async fn started_chain(w: &World) -> super::filtered::SharedChain {
    let info = crate::filter::StreamInfo {
        listener: Arc::from("in"),
        source: "10.1.2.3:40000".parse().unwrap(),
        destination: "127.0.0.1:15006".parse().unwrap(),
        scheme: "http",
        protocol: "HTTP/1.1",
        request_id: Arc::from("req-1"),
        start: std::time::SystemTime::now(),
        principal: None,
        tls: None,
    };
    let filters = w.snapshot.listeners[0].chains.of(None);
    let chain = super::filtered::SharedChain::new(w.snapshot.filters.route_stream(filters, info));
    let (mut parts, ()) = Request::builder()
        .method("PUT")
        .uri("/upload")
        .header("host", "a")
        .body(())
        .unwrap()
        .into_parts();
    chain.request_headers(&mut parts, false).await;
    chain
}

fn body_deny_world() -> World {
    world(&filtered_config(
        "body-deny",
        "[[listeners.routes]]\nmatch = { prefix = \"/\" }\ncluster = \"app\"",
        "[clusters.app]\nendpoints = [\"127.0.0.1:9\"]",
    ))
}

/// While a header phase holds the chain (a slow response-header callback
/// while the request body still comes), a request body frame waits for it
/// instead of passing the filters unseen, and is woken when the phase lets
/// go: the chunk `body-deny` answers is answered; trailers wait too.
#[tokio::test]
async fn a_body_frame_waits_while_a_header_phase_holds_the_chain() {
    use super::filtered::{FilteredBody, Side};
    use http_body::Body as _;
    let w = body_deny_world();
    let chain = started_chain(&w).await;
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
        Bytes::from_static(b"deny"),
    ))]);
    let mut body = std::pin::pin!(FilteredBody::new(
        StreamBody::new(frames),
        chain.clone(),
        Side::Request
    ));
    let flag = Arc::new(Flag(Default::default()));
    let waker = std::task::Waker::from(flag.clone());
    let held = chain.hold().await;
    let polled = body
        .as_mut()
        .poll_frame(&mut std::task::Context::from_waker(&waker));
    assert!(
        polled.is_pending(),
        "passed while the chain was out: {polled:?}"
    );
    assert!(!flag.0.load(Ordering::SeqCst));
    drop(held);
    assert!(
        flag.0.load(Ordering::SeqCst),
        "not woken when the phase let go"
    );
    let out = body.frame().await.expect("a frame");
    assert!(out.is_err(), "the filter's answer ends the body: {out:?}");
    let answer = chain.take_local().expect("body-deny answered");
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);

    // Trailers alone: they wait for the chain as data does.
    let chain = started_chain(&w).await;
    let mut t = http::HeaderMap::new();
    t.insert("x-t", http::HeaderValue::from_static("1"));
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::trailers(t))]);
    let mut body = std::pin::pin!(FilteredBody::new(
        StreamBody::new(frames),
        chain.clone(),
        Side::Request
    ));
    let held = chain.hold().await;
    let polled = body
        .as_mut()
        .poll_frame(&mut std::task::Context::from_waker(&waker));
    assert!(
        polled.is_pending(),
        "passed while the chain was out: {polled:?}"
    );
    drop(held);
    let out = body.frame().await.expect("a frame").expect("trailers");
    assert_eq!(
        out.trailers_ref().map(|t| &t["x-t"]),
        Some(&http::HeaderValue::from_static("1"))
    );
    assert!(body.frame().await.is_none());
}

/// What is known of the chain without taking it: whether a filter has a
/// body callback (which decides holding a head) does not depend on a
/// header phase having the chain, and the upstream facts recorded
/// meanwhile reach the filters when it lets go.
#[tokio::test]
async fn chain_facts_do_not_depend_on_the_chain_being_free() {
    use super::filtered::{Fact, Side};
    let w = body_deny_world();
    let chain = started_chain(&w).await;
    let addr: SocketAddr = "10.9.8.7:8080".parse().unwrap();
    let held = chain.hold().await;
    // (The proxy-wasm SDK exports both body callbacks.)
    assert!(chain.has_body_callback(Side::Request));
    assert!(chain.has_body_callback(Side::Response));
    chain.record(Fact::Upstream(addr));
    assert!(chain.with(|_| ()).is_none(), "held");
    drop(held);
    let seen = chain.with(|c| c.property("upstream.address")).flatten();
    assert_eq!(seen.as_deref(), Some(addr.to_string().as_bytes()));
}
