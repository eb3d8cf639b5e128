//! Every stream has a deadline, forwarded headers follow the listener's
//! trust, and the connection guard's head checks cover bare-LF and
//! pipelined heads: the real binary, real sockets on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::upstream::TestUpstream;
use support::*;

fn status_and_code(answer: &str) -> (u16, String) {
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let code = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-wasp-error: ")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, code)
}

fn errors(wasp: &Wasp, code: &str) -> f64 {
    metric_value(
        &wasp.metrics(),
        "wasp_proxy_errors_total",
        &[&format!("code=\"{code}\"")],
    )
    .unwrap_or(0.0)
}

fn open_connections(wasp: &Wasp) -> Option<f64> {
    metric_value(
        &wasp.metrics(),
        "wasp_downstream_connections_open",
        &["listener=\"inbound\""],
    )
}

/// Reads what the server sends until it closes or `limit` passes.
async fn read_all(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// 100 clients that send a head with `Content-Length: 1000000`, a few
/// bytes, then nothing hold every slot of `max_connections = 100` (and of
/// the cluster's `max_requests = 100`); the stream idle timeout cuts them
/// (408) and a fresh client gets through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_clients_are_cut_and_give_their_slots_back() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { max_connections = 100, stream_idle_timeout = "1s" }"#,
        "limits = { max_requests = 100 }",
    ));
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(loopback(port)).await.unwrap();
        s.write_all(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nabc")
            .await
            .unwrap();
        stalled.push(s);
    }
    let started = Instant::now();
    // Served within a bounded wait: the slots come back after ~1 s.
    let client = h1_client();
    let served = loop {
        let req = http::Request::get(format!("http://{}/fresh", loopback(port)))
            .header("host", "a")
            .body(Full::new(Bytes::new()))
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
            Ok(Ok(resp)) if resp.status() == 200 => break started.elapsed(),
            _ if started.elapsed() > Duration::from_secs(15) => {
                panic!("no fresh client served within 15 s\n{}", wasp.log_text())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut answered_408 = 0;
    for s in &mut stalled {
        let answer = read_all(s, Duration::from_secs(5)).await;
        if answer.is_empty() {
            continue; // closed without an answer: allowed
        }
        assert_eq!(
            status_and_code(&answer),
            (408, "stream_idle_timeout".to_string()),
            "{answer}"
        );
        answered_408 += 1;
    }
    assert!(answered_408 > 0, "no stalled client got its 408");
    assert!(
        errors(&wasp, "stream_idle_timeout") >= f64::from(answered_408),
        "{}",
        wasp.metrics()
    );
    eprintln!("fresh client served after {served:?}; {answered_408} of 100 got 408");
    // Every stalled connection is closed and uncounted (and the fresh
    // client's pooled one once the client goes).
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_connections(&wasp) != Some(0.0) {
        assert!(Instant::now() < deadline, "{}", wasp.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request that trickles its body (a byte every 300 ms: never idle for
/// the 1 s stream idle timeout) is cut by `request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_by_request_timeout() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { stream_idle_timeout = "1s", request_timeout = "1500ms" }"#,
        "",
    ));
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while start.elapsed() < Duration::from_secs(10) {
        let _ = s.write_all(b"x").await;
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(
        status_and_code(&answer),
        (408, "request_timeout".to_string()),
        "after {:?}: {answer}\n{}",
        start.elapsed(),
        wasp.log_text()
    );
}

/// An HTTP/2 stream that sends its headers without END_STREAM, one data
/// frame, then nothing, is answered 408 on that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_stream_is_cut() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { stream_idle_timeout = "1s" }"#,
        "",
    ));
    let tcp = TcpStream::connect(loopback(port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
        Bytes::from_static(b"some"),
    ))]);
    let body = StreamBody::new(futures_util::StreamExt::chain(
        first,
        futures_util::stream::pending(),
    ))
    .boxed();
    let req = http::Request::post(format!("http://{}/count", loopback(port)))
        .header("host", "a")
        .body(body)
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("the stalled stream was never answered")
        .expect("the stream failed instead of being answered");
    assert_eq!(resp.status(), 408, "{}", wasp.log_text());
    assert_eq!(resp.headers()["x-wasp-error"], "stream_idle_timeout");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // The connection itself is still good for other streams.
    let req = http::Request::get(format!("http://{}/after", loopback(port)))
        .header("host", "a")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Serves an endless body (64 KiB chunks) on every request and notes when
/// a response body is dropped (the proxy let go of it).
async fn endless_upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, d) = (started.clone(), dropped.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (s, d) = (s.clone(), d.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    s.fetch_add(1, Ordering::SeqCst);
                    let flag = Flag(d.clone());
                    let chunks = futures_util::stream::repeat_with(move || {
                        let _ = &flag;
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
                            b'x';
                            65536
                        ])))
                    });
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(
                            chunks,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, started, dropped)
}

/// A client that asks for a large response and never reads it: once the
/// buffers are full nothing moves, and `stream_idle_timeout` closes the
/// connection and lets go of the upstream response and of the request's
/// filter context (its `on_done` runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut() {
    let (app, started, dropped) = endless_upstream().await;
    let port = free_port();
    let config = format!(
        "[filters.noop]\nmodule = \"noop.wasm\"\n{}",
        one_route_config(
            port,
            app,
            "pipeline = [\"noop\"]\nlimits = { stream_idle_timeout = \"1s\" }",
            "",
        )
    );
    let wasp = Wasp::start_in(with_fixtures("wasm32-wasip1", &["noop"]), &config, &[]);
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled response is still held (started {})\n{}",
            started.load(Ordering::SeqCst),
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while open_connections(&wasp) != Some(0.0) {
        assert!(Instant::now() < deadline, "{}", wasp.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        errors(&wasp, "stream_idle_timeout") >= 1.0,
        "{}",
        wasp.metrics()
    );
    // The request's context was ended (logged), not left behind.
    let logged = metric_value(
        &wasp.metrics(),
        "wasp_filter_calls_total",
        &["filter=\"noop\"", "phase=\"log\""],
    );
    assert_eq!(logged, Some(1.0), "{}", wasp.metrics());
    drop(s);
}

/// A plaintext client cannot claim https or a made-up address:
/// `x-forwarded-proto` and `x-forwarded-for` from an untrusted peer are
/// replaced (and `x-forwarded-host` dropped); a peer in `trust_forwarded`
/// keeps them (its address appended to `x-forwarded-for`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_follow_the_listeners_trust() {
    let app = TestUpstream::start("app").await;
    let (untrusted, trusted) = (free_port(), free_port());
    let config = format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "untrusted"
bind = "127.0.0.1:{untrusted}"
trust_forwarded = ["10.0.0.0/8"]
  [[listeners.routes]]
  cluster = "app"

[[listeners]]
name = "trusted"
bind = "127.0.0.1:{trusted}"
trust_forwarded = ["127.0.0.1/32"]
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
        app.addr
    );
    let _wasp = Wasp::start(&config);
    let client = h1_client();
    let ask = |port: u16| {
        http::Request::get(format!("http://{}/", loopback(port)))
            .header("host", "a")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "bank.example")
            .header("x-forwarded-for", "6.6.6.6")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let seen = send(&client, ask(untrusted)).await.body;
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(!seen.contains("https"), "{seen}");
    assert!(!seen.contains("x-forwarded-host"), "{seen}");
    // Replaced: an app reading the first entry sees the real peer.
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    let seen = send(&client, ask(trusted)).await.body;
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: bank.example\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{seen}"
    );
}

/// An upstream that accepts, reads, and never answers.
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Without a route timeout the cluster's applies (here short; 15 s when
/// neither is set: a config unit test checks that default), answering 504;
/// `timeout = "0s"` turns the route's off, and the stream idle timeout
/// still bounds the wait (504 too: the request was whole, the upstream
/// silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeouts_default_and_turn_off() {
    let app = silent_upstream().await;
    let port = free_port();
    let config = format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
limits = {{ stream_idle_timeout = "1500ms" }}
  [[listeners.routes]]
  match = {{ prefix = "/off" }}
  cluster = "app"
  timeout = "0s"
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
timeout = "400ms"
"#
    );
    let wasp = Wasp::start(&config);
    let client = h1_client();
    let start = Instant::now();
    let r = get(&client, loopback(port), "a", "/x").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (504, Some("upstream_timeout"))
    );
    assert!(
        start.elapsed() < Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    // The whole request arrived: the upstream is the one not answering.
    let start = Instant::now();
    let r = get(&client, loopback(port), "a", "/off").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (504, Some("upstream_timeout")),
        "{}",
        wasp.log_text()
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
}

/// An upstream that accepts, reads, and never answers, noting when it
/// first accepted.
async fn silent_upstream_noting() -> (SocketAddr, Arc<std::sync::Mutex<Option<Instant>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Arc::new(std::sync::Mutex::new(None));
    let noted = first.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            noted.lock().unwrap().get_or_insert_with(Instant::now);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, first)
}

/// A retry moved the request to another endpoint, and the route's timeout
/// passed while that one was silent (the first try's per-try timeout at
/// 600 ms, the route's at 1 s), or, with the route's timeout off, the
/// stream's idle timeout did (1 s): the 504 names that endpoint, not the
/// first one tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_names_the_endpoint_that_timed_out() {
    for (route_timeout, idle) in [("1s", "5m"), ("0s", "1s")] {
        let (a, a_at) = silent_upstream_noting().await;
        let (b, b_at) = silent_upstream_noting().await;
        let port = free_port();
        let config = format!(
            r#"
[proxy]
workers = 1

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
limits = {{ stream_idle_timeout = "{idle}" }}
  [[listeners.routes]]
  cluster = "app"
  timeout = "{route_timeout}"
  retry = {{ on = ["5xx"], attempts = 1, per_try_timeout = "600ms" }}

[clusters.app]
endpoints = ["{a}", "{b}"]
"#
        );
        let wasp = Wasp::start(&config);
        let client = h1_client();
        let r = get(&client, loopback(port), "a", "/x").await;
        assert_eq!(
            (r.status, r.header("x-wasp-error")),
            (504, Some("upstream_timeout")),
            "timeout {route_timeout}: {}",
            wasp.log_text()
        );
        let (ta, tb) = (*a_at.lock().unwrap(), *b_at.lock().unwrap());
        let (Some(ta), Some(tb)) = (ta, tb) else {
            panic!(
                "both endpoints were tried: {ta:?} {tb:?}\n{}",
                wasp.log_text()
            );
        };
        let (first, second) = if ta < tb { (a, b) } else { (b, a) };
        assert!(
            r.body
                .contains(&format!("{second} in cluster \"app\" did not answer")),
            "timeout {route_timeout}: names {second} (tried second), not {first}: {}",
            r.body
        );
    }
}

/// The guard refuses `Content-Length` with `Transfer-Encoding` in every
/// head shape hyper parses: CRLF, bare LF, and pipelined behind a request
/// that is still in flight. Nothing smuggled reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_heads_are_refused_in_every_shape() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(port, app.addr, "", ""));
    let smuggle_crlf: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let smuggle_lf: &[u8] = b"POST /a HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nContent-Length: 6\n\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let smuggle_mixed: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\nContent-Length: 6\r\nTransfer-Encoding: chunked\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    for (name, bytes) in [
        ("CRLF", smuggle_crlf),
        ("bare LF", smuggle_lf),
        ("mixed", smuggle_mixed),
    ] {
        let answer = raw_exchange(loopback(port), bytes, Duration::from_secs(5));
        assert_eq!(
            status_and_code(&answer),
            (400, "bad_request".to_string()),
            "{name}: {answer}"
        );
    }
    assert_eq!(app.requests(), 0);
    // Behind a slow request: the bad head arrives while the first is busy.
    for (name, bad) in [("CRLF", smuggle_crlf), ("bare LF", smuggle_lf)] {
        let before = app.requests();
        let mut s = TcpStream::connect(loopback(port)).await.unwrap();
        s.write_all(b"GET /slow?ms=600 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.requests() == before {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.write_all(bad).await.unwrap();
        let answer = read_all(&mut s, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
        assert!(answer.contains("slow 600ms done"), "{name}: {answer}");
        let second = answer
            .match_indices("HTTP/1.1 ")
            .nth(1)
            .map(|(i, _)| &answer[i..])
            .unwrap_or_default();
        assert_eq!(
            status_and_code(second),
            (400, "bad_request".to_string()),
            "{name}: {answer}\n{}",
            wasp.log_text()
        );
        assert_eq!(
            app.requests(),
            before + 1,
            "{name}: the smuggled request got through"
        );
    }
    assert!(errors(&wasp, "bad_request") >= 5.0, "{}", wasp.metrics());
}

/// An HTTP/2 HEADERS frame without END_HEADERS, then nothing: the header
/// block never completes, no stream is dispatched, and the connection is
/// closed by the idle timeout (the keepalive PING would end it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_header_block_is_closed() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { idle_timeout = "1s", stream_idle_timeout = "1s" }"#,
        "",
    ));
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
                                                            // HEADERS on stream 1, no END_HEADERS: GET, http, / (static table).
    frames.extend_from_slice(&[0, 0, 3, 1, 0, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
    s.write_all(&frames).await.unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the stalled connection is still open after 10 s"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(app.requests(), 0);
}

/// An HTTP/2 client that holds its flow-control window at 0 (and keeps the
/// connection lively with PINGs) is never sent a body byte, so hyper never
/// polls the response bodies: the per-stream watchdog still drops them at
/// `stream_idle_timeout`, giving back the cluster's `max_requests` slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_with_a_closed_window_gives_its_streams_back() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { stream_idle_timeout = "1s" }"#,
        "limits = { max_requests = 2 }",
    ));
    let tcp = TcpStream::connect(loopback(port)).await.unwrap();
    let (client, mut conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let mut pings = conn.ping_pong().expect("ping_pong");
    tokio::spawn(conn);
    // Frames from the client every 200 ms: the connection is never idle.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                break;
            }
        }
    });
    let mut client = client.ready().await.unwrap();
    let mut streams = Vec::new();
    for i in 0..2 {
        let req = http::Request::get(format!("http://a/held{i}"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        streams.push(resp);
        client = client.ready().await.unwrap();
    }
    let mut bodies = Vec::new();
    for resp in streams {
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("no response headers")
            .unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    // Both slots are held by streams the client takes nothing from.
    let h1 = h1_client();
    let r = get(&h1, loopback(port), "a", "/third").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (503, Some("overflow")),
        "{}",
        r.body
    );
    let start = Instant::now();
    let freed = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = get(&h1, loopback(port), "a", "/third").await;
        if r.status == 200 {
            break true;
        }
        if start.elapsed() > Duration::from_secs(8) {
            break false;
        }
    };
    assert!(
        freed,
        "the stalled streams kept their slots: {}",
        wasp.log_text()
    );
    assert!(
        errors(&wasp, "stream_idle_timeout") >= 2.0,
        "{}",
        wasp.metrics()
    );
    drop(bodies);
}

/// `request_timeout` stops once the response has started (as in Envoy): an
/// upload the upstream answers early and echoes back runs past it while
/// bytes keep moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_stops_when_the_response_starts() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app.addr,
        r#"limits = { stream_idle_timeout = "2s", request_timeout = "800ms" }"#,
        "",
    ));
    let tcp = TcpStream::connect(loopback(port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Eight chunks, 250 ms apart: 2 s in all, well past request_timeout.
    let chunks = futures_util::stream::unfold(0u8, |i| async move {
        if i == 8 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'a' + i; 100]))),
            i + 1,
        ))
    });
    let req = http::Request::post(format!("http://{}/echo", loopback(port)))
        .header("host", "a")
        .body(StreamBody::new(chunks).boxed())
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("no response")
        .expect("the stream failed");
    assert_eq!(resp.status(), 200, "{}", wasp.log_text());
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the echo never ended")
        .unwrap_or_else(|e| panic!("the echo was cut: {e}\n{}", wasp.log_text()))
        .to_bytes();
    assert_eq!(body.len(), 800, "{}", wasp.log_text());
    assert!(start.elapsed() >= Duration::from_millis(1700));
    assert_eq!(errors(&wasp, "request_timeout"), 0.0);
}

/// One HTTP/2 frame: 9-byte header, then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HTTP/2 client that opens its windows wide, asks for an endless
/// response, never reads a byte, and sends a PING every 200 ms: its frames
/// do not keep the connection, which is cut `stream_idle_timeout` after
/// wasp's writes stopped going through, letting go of the upstream. (hyper's
/// h2 also stops reading while it cannot write, so the PINGs may not even
/// reach the guard; the guard's unit test
/// `a_peer_that_stops_reading_but_keeps_sending_is_cut` covers the case
/// where they do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_pings_but_never_reads_is_cut() {
    let (app, started, dropped) = endless_upstream().await;
    let port = free_port();
    let wasp = Wasp::start(&one_route_config(
        port,
        app,
        r#"limits = { stream_idle_timeout = "1s" }"#,
        "",
    ));
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31-1, and the connection window too.
    hello.extend(h2_frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(h2_frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    // GET http://a/ (HPACK: :method GET, :scheme http, :path /,
    // :authority "a"), END_STREAM | END_HEADERS.
    hello.extend(h2_frame(1, 0x5, 1, &[0x82, 0x86, 0x84, 0x41, 0x01, b'a']));
    s.write_all(&hello).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Acknowledge the server's SETTINGS (sent first thing) without reading.
    s.write_all(&h2_frame(4, 0x1, 0, &[])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0u64;
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the unread response is still held (started {})\n{}",
            started.load(Ordering::SeqCst),
            wasp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        n += 1;
        if s.write_all(&h2_frame(6, 0, 0, &n.to_be_bytes()))
            .await
            .is_err()
        {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "{}", wasp.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert!(
        errors(&wasp, "stream_idle_timeout") >= 1.0,
        "{}",
        wasp.metrics()
    );
}

/// An upstream that answers the first connection it (or its sibling, which
/// shares `seen`) gets with a 503, and every later one with a head that
/// declares 10 bytes of body and then nothing. Notes which address sent the
/// stalled head.
async fn fails_first_then_stalls(
    seen: Arc<AtomicUsize>,
    stalled_on: Arc<std::sync::Mutex<Option<SocketAddr>>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            let stalled_on = stalled_on.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if first {
                    let _ = s
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        .await;
                } else {
                    *stalled_on.lock().unwrap() = Some(addr);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
                        .await;
                }
                // Keep the connection open and silent.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A retry moved the request on, and the endpoint it moved to sent a head
/// with a declared length and then stalled while a filter's body callback
/// held that head: the 504 names the endpoint that stalled, not the one
/// that failed first (the held head's errors used the endpoint picked
/// before the retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_response_after_a_retry_names_the_endpoint_that_stalled() {
    let seen = Arc::new(AtomicUsize::new(0));
    let stalled_on = Arc::new(std::sync::Mutex::new(None));
    let a = fails_first_then_stalls(seen.clone(), stalled_on.clone()).await;
    let b = fails_first_then_stalls(seen.clone(), stalled_on.clone()).await;
    let port = free_port();
    let config = format!(
        r#"
[proxy]
workers = 1

[filters.noop]
module = "noop.wasm"

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
pipeline = ["noop"]
limits = {{ stream_idle_timeout = "1s" }}
  [[listeners.routes]]
  cluster = "app"
  retry = {{ on = ["5xx"], attempts = 1 }}

[clusters.app]
endpoints = ["{a}", "{b}"]
"#
    );
    let wasp = Wasp::start_in(with_fixtures("wasm32-wasip1", &["noop"]), &config, &[]);
    let client = h1_client();
    let r = get(&client, loopback(port), "a", "/x").await;
    assert_eq!(
        (r.status, r.header("x-wasp-error")),
        (504, Some("upstream_timeout")),
        "{}",
        wasp.log_text()
    );
    let stalled = stalled_on
        .lock()
        .unwrap()
        .expect("the retry reached the other endpoint");
    assert!(
        r.body
            .contains(&format!("{stalled} in cluster \"app\" did not answer")),
        "names {stalled} (which stalled): {}",
        r.body
    );
}
