//! gRPC callouts from Wasm filters (`proxy_grpc_call`, `proxy_grpc_stream`
//! and friends) against a real gRPC server: Python `grpcio`
//! (tests/grpc/server.py, installed by scripts/test.sh), through the real
//! `wasp` binary, with the `grpc-call` fixture built from source with the
//! community `proxy-wasm` crate.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::config::{Cluster, Filter};
use support::grpc::GrpcCalloutProxy;
use support::upstream::TestUpstream;
use support::*;

fn request(proxy: SocketAddr, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(format!("http://{proxy}/x")).header("host", "app");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_grpc_call_allows_denies_times_out_and_names_unknown_services() {
    let callouts = GrpcCalloutProxy::start(&["grpc-call"], |config| config).await;
    let (app, _, wasp, proxy) = callouts.parts();
    let client = h1_client();

    // Allow: the answer message reaches the upstream as a header, and the
    // metadata the filter set reached the gRPC server.
    let r = send(
        &client,
        request(proxy, &[("x-grpc", "call"), ("x-token", "allow-alice")]),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    assert!(
        r.body
            .contains("x-grpc-answer: ok-allow-alice-allow-alice\n"),
        "{}",
        r.body
    );

    // Deny: the server's status and (percent-decoded) message, read by the
    // guest with get_grpc_status in on_grpc_call_response.
    let before = app.requests();
    let r = send(
        &client,
        request(proxy, &[("x-grpc", "call"), ("x-token", "mallory")]),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-grpc-status"), Some("7"), "PERMISSION_DENIED");
    assert_eq!(r.header("x-grpc-message"), Some("token denied: mallory"));
    assert_eq!(
        app.requests(),
        before,
        "a denied request never goes upstream"
    );

    // Timeout: the guest's 300 ms, DEADLINE_EXCEEDED; the server is slower.
    let started = Instant::now();
    let r = send(
        &client,
        request(
            proxy,
            &[
                ("x-grpc", "call"),
                ("x-token", "slow"),
                ("x-grpc-timeout-ms", "300"),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-grpc-status"),
        Some("4"),
        "DEADLINE_EXCEEDED: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered at the guest's deadline, not the server's 3 s"
    );

    // A service the server does not have: its UNIMPLEMENTED (Trailers-Only).
    let r = send(
        &client,
        request(
            proxy,
            &[
                ("x-grpc", "call"),
                ("x-token", "allow-bob"),
                ("x-grpc-service", "wasp.test.Nope"),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-grpc-status"),
        Some("12"),
        "UNIMPLEMENTED: {r:?}"
    );

    // A cluster the proxy does not have: the dispatch fails with a status
    // the SDK accepts (no trap), and the filter answers for itself.
    let r = send(
        &client,
        request(
            proxy,
            &[
                ("x-grpc", "call"),
                ("x-token", "allow"),
                ("x-grpc-cluster", "nope"),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.header("x-grpc-error"), Some("InternalFailure"));

    // Nothing above trapped the filter (the SDK panics on a status it does
    // not expect for a call).
    assert_eq!(traps(wasp), 0.0, "{}", wasp.log_text());
}

/// Traps of the `grpc` filter, all phases.
fn traps(wasp: &Wasp) -> f64 {
    wasp.metrics()
        .lines()
        .filter(|l| l.starts_with("wasp_filter_traps_total{") && l.contains("filter=\"grpc\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_deliver_metadata_messages_close_and_cancel() {
    let callouts = GrpcCalloutProxy::start(&["grpc-call"], |config| config).await;
    let (_, server, wasp, proxy) = callouts.parts();
    let client = h1_client();

    let r = send(
        &client,
        request(
            proxy,
            &[("x-grpc", "stream"), ("x-words", "alpha,beta,gamma")],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    for line in [
        // The last, empty message is the fixture's `send(None, end_stream)`:
        // Envoy sends it as a message too (tests/differential.rs).
        "x-grpc-stream: ALPHA,BETA,GAMMA,\n",
        "x-grpc-initial: hello\n",
        "x-grpc-trailing: bye\n",
        "x-grpc-close: 0\n",
    ] {
        assert!(r.body.contains(line), "{line:?} in {}", r.body);
    }

    // Cancel: the guest cancels when the server's initial metadata arrives;
    // the server sees the reset, and the guest hears nothing more (its
    // close callback would have added x-grpc-close).
    let r = send(&client, request(proxy, &[("x-grpc", "cancel")])).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    assert!(r.body.contains("x-grpc-cancelled: yes\n"), "{}", r.body);
    assert!(!r.body.contains("x-grpc-close"), "{}", r.body);
    assert!(
        server.wait_for("HOLD-CANCELLED", Duration::from_secs(5)),
        "the server saw the stream reset: {:?}",
        server.lines.lock().unwrap()
    );
    assert!(!server.saw("HOLD-ENDED"));
    assert_eq!(traps(wasp), 0.0, "{}", wasp.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callouts_respect_the_clusters_circuit_breakers_and_end_with_their_stream() {
    let callouts = GrpcCalloutProxy::start(&["grpc-call"], |config| {
        config.edit_cluster("auth", |auth| auth.with("limits = { max_requests = 1 }"))
    })
    .await;
    let (_, server, wasp, proxy) = callouts.parts();
    let client = h1_client();

    // One slow call holds the cluster's only request slot...
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            send(
                &client,
                request(
                    proxy,
                    &[
                        ("x-grpc", "call"),
                        ("x-token", "slow"),
                        ("x-grpc-timeout-ms", "1500"),
                    ],
                ),
            )
            .await
        })
    };
    assert!(server.wait_for("CHECK slow", Duration::from_secs(5)));
    // ...so a second one is refused by the breaker: UNAVAILABLE, at once.
    let r = send(
        &client,
        request(proxy, &[("x-grpc", "call"), ("x-token", "allow-carol")]),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.header("x-grpc-status"), Some("14"), "UNAVAILABLE: {r:?}");
    assert!(
        r.header("x-grpc-message")
            .is_some_and(|m| m.contains("max_requests")),
        "{r:?}"
    );
    let slow = slow.await.unwrap();
    assert_eq!(slow.header("x-grpc-status"), Some("4"), "{slow:?}");

    // Once the slow call is over (timed out: the task dropped it), the
    // slot is free again.
    a_call_passes_again(&client, proxy, "allow-dave").await;
}

/// Calls as `token` until one call is allowed again (a callout slot came
/// back); fails the test if none is within 5 s.
async fn a_call_passes_again(client: &TestClient, proxy: SocketAddr, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(
            client,
            request(proxy, &[("x-grpc", "call"), ("x-token", token)]),
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never given back: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn post(
    proxy: SocketAddr,
    headers: &[(&str, &str)],
    body: &'static str,
) -> http::Request<Full<Bytes>> {
    // `/count` answers only after the whole body (with its length).
    let mut b = http::Request::post(format!("http://{proxy}/count")).header("host", "app");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// proxy-wasm-rust-sdk#66: a filter that pauses at the end of the request
/// body for a callout (gRPC or HTTP) is resumed by the answer, and the
/// whole body then reaches the upstream; a denial answers instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_paused_for_a_callout_resumes_when_it_answers() {
    let authz = TestUpstream::start("authz").await;
    let callouts = GrpcCalloutProxy::start(&["grpc-call", "body-callout"], |config| {
        config
            .edit_listener("inbound", |l| l.pipeline(&["grpc", "approve"]))
            .filter(Filter::new("approve", "body-callout.wasm"))
            .cluster(Cluster::new("authz", [authz.addr]))
    })
    .await;
    let (_, server, wasp, proxy) = callouts.parts();
    let client = h1_client();

    // The HTTP callout filter alone (the gRPC one lets bodies through
    // without `x-grpc: body`): approved, the upstream gets the whole body.
    let r = send(&client, post(proxy, &[], "alice")).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.body, "5", "the upstream got the whole body");
    let r = send(&client, post(proxy, &[], "mallory")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "body denied\n");

    // Both: the gRPC filter waits on the body, is resumed by the gRPC
    // answer, then the HTTP one waits on the same body and is resumed too.
    let r = send(&client, post(proxy, &[("x-grpc", "body")], "alice")).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.body, "5", "the whole body went on");
    assert!(
        server.wait_for("CHECK alice", Duration::from_secs(5)),
        "{:?}",
        server.lines.lock().unwrap()
    );
    // gRPC approves, the HTTP callout denies: the second filter saw the body.
    let r = send(&client, post(proxy, &[("x-grpc", "body")], "allow-x")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "body denied\n");
    // Denied by the gRPC filter: its answer, with the gRPC status.
    let r = send(&client, post(proxy, &[("x-grpc", "body")], "eve")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-grpc-status"), Some("7"), "{r:?}");
    assert_eq!(traps(wasp), 0.0, "{}", wasp.log_text());
}

/// PAUSE on request trailers while a gRPC call is pending holds them (and
/// so the end of the request) until the answer: allowed, the request ends
/// upstream; denied, the filter's answer replaces the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_paused_for_a_grpc_call_wait_for_its_answer() {
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let callouts = GrpcCalloutProxy::start(&["grpc-call"], |config| config).await;
    let (_, server, wasp, proxy) = callouts.parts();
    let client: Client<_, BoxBody<Bytes, std::convert::Infallible>> =
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let with_trailer = |token: &'static str| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-token", http::HeaderValue::from_static(token));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        http::Request::post(format!("http://{proxy}/count"))
            .header("host", "app")
            .header("x-grpc", "trailers")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap()
    };
    let answer = |r: http::Response<hyper::body::Incoming>| async move {
        let status = r.status().as_u16();
        let grpc = r
            .headers()
            .get("x-grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let body = r.into_body().collect().await.map(|b| b.to_bytes());
        (status, grpc, body.ok())
    };

    let r = client.request(with_trailer("allow-t")).await.unwrap();
    let (status, _, body) = answer(r).await;
    assert_eq!(status, 200, "{}", wasp.log_text());
    assert_eq!(
        body.as_deref(),
        Some(&b"5"[..]),
        "the upstream got the body"
    );
    assert!(server.wait_for("CHECK allow-t", Duration::from_secs(5)));

    let r = client.request(with_trailer("mallory")).await.unwrap();
    let (status, grpc, _) = answer(r).await;
    assert_eq!(status, 403, "held until the denial: {}", wasp.log_text());
    assert_eq!(grpc.as_deref(), Some("7"));
    // A slow server: the upstream could answer at once, but the request
    // cannot end before the filter's 2 s deadline does, so the client gets
    // the filter's DEADLINE_EXCEEDED, not the upstream's 200.
    let r = client.request(with_trailer("slow-t")).await.unwrap();
    let (status, grpc, _) = answer(r).await;
    assert_eq!(status, 403, "{}", wasp.log_text());
    assert_eq!(grpc.as_deref(), Some("4"));
    assert_eq!(traps(wasp), 0.0, "{}", wasp.log_text());
}

/// An open gRPC stream holds one of the filter's `limits.callouts` slots
/// (shared with `http_call`): past it a call fails with a status the SDK
/// accepts. When the HTTP request that opened the stream goes away, the
/// stream is reset (the server sees the cancel) and the slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_hold_callout_slots_and_end_with_their_request() {
    let callouts = GrpcCalloutProxy::start(&["grpc-call"], |config| {
        config.edit_filter("grpc", |grpc| grpc.with("limits = { callouts = 1 }"))
    })
    .await;
    let (_, server, wasp, proxy) = callouts.parts();
    let client = h2_client();

    let holder = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, request(proxy, &[("x-grpc", "hold")])).await })
    };
    assert!(server.wait_for("HOLD-START", Duration::from_secs(5)));
    let r = send(
        &client,
        request(proxy, &[("x-grpc", "call"), ("x-token", "allow-z")]),
    )
    .await;
    assert_eq!(r.status, 500, "{r:?}\n{}", wasp.log_text());
    assert_eq!(r.header("x-grpc-error"), Some("InternalFailure"));
    let limits = metric_value(
        &wasp.metrics(),
        "wasp_filter_limit_exceeded_total",
        &["filter=\"grpc\"", "limit=\"callouts\""],
    );
    assert_eq!(limits, Some(1.0), "{}", wasp.metrics());

    // The client gives up on the held request: its stream is reset.
    holder.abort();
    assert!(
        server.wait_for("HOLD-CANCELLED", Duration::from_secs(5)),
        "{:?}",
        server.lines.lock().unwrap()
    );
    a_call_passes_again(&client, proxy, "allow-z").await;
    assert_eq!(traps(wasp), 0.0, "{}", wasp.log_text());
}
