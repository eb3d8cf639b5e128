//! HTTP behaviour through the real binary: h1 and h2c both ways, streaming
//! without buffering, WebSocket tunnels (past the listener's timeouts, and
//! counted as open connections), gRPC-shaped trailers, `Expect:
//! 100-continue`, and which 4xx answers are labelled as the proxy's own.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::upstream::TestUpstream;
use support::*;

fn config(port: u16, cluster_addr: std::net::SocketAddr, protocol: &str) -> String {
    one_route_config(
        port,
        cluster_addr,
        "",
        &format!("protocol = \"{protocol}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_h2c_both_ways() {
    let app = TestUpstream::start("app").await;
    for upstream_protocol in ["http1", "http2"] {
        let port = free_port();
        let _wasp = Wasp::start(&config(port, app.addr, upstream_protocol));
        let proxy = format!("127.0.0.1:{port}").parse().unwrap();
        for (client, down) in [(h1_client(), "HTTP/1.1"), (h2_client(), "HTTP/2")] {
            let r = get(&client, proxy, "app.local", "/v").await;
            assert_eq!(r.status, 200, "{down} -> {upstream_protocol}: {r:?}");
            let want = if upstream_protocol == "http2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            };
            assert_eq!(
                r.header("x-seen-version"),
                Some(want),
                "{down} -> {upstream_protocol}"
            );
            // h1: the Host header; h2: the :authority (which wins over a host header).
            let want_host = if down == "HTTP/2" {
                format!("127.0.0.1:{port}")
            } else {
                "app.local".into()
            };
            assert_eq!(
                r.header("x-seen-host"),
                Some(want_host.as_str()),
                "{down} -> {upstream_protocol}: host kept"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_streams_without_buffering() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let mut cfg = config(port, app.addr, "http1");
    cfg = cfg.replace(
        "name = \"inbound\"",
        "name = \"inbound\"\nlimits = { max_body_bytes = \"1GiB\" }",
    );
    let wasp = Wasp::start(&cfg);
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 256; // 256 MiB through a proxy whose RSS must stay far below that
    let chunks = (0..CHUNKS)
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; CHUNK]))));
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{proxy}/count"))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("upload timed out")
        .expect("upload failed");
    assert_eq!(resp.status(), 200);
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&counted),
        (CHUNK * CHUNKS).to_string()
    );

    let status = std::fs::read_to_string(format!("/proc/{}/status", wasp.child.id())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    println!(
        "peak RSS of wasp after streaming 256 MiB: {} MiB",
        hwm_kb / 1024
    );
    assert!(
        hwm_kb < 64 * 1024,
        "peak RSS {hwm_kb} KiB: the body was buffered"
    );

    // And the other direction: a streamed echo of 32 MiB comes back whole.
    let chunks = (0..32)
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![1u8; CHUNK]))));
    let req = http::Request::post(format!("http://{proxy}/echo"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.request(req).await.expect("echo");
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(back.len(), 32 * CHUNK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&config(port, app.addr, "http1"));
    let mut s = websocket(loopback(port)).await;
    for msg in [&b"hello through wasp"[..], b"second frame"] {
        echo(&mut s, msg).await.unwrap();
    }
}

/// Accepted connections carry TCP keepalive (inherited from the listening
/// socket), so a tunnel whose peer vanished without a FIN is found. Read off
/// the kernel's socket table: timer 2 is the keepalive timer.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_use_tcp_keepalive() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&config(port, app.addr, "http1"));
    let mut s = websocket(loopback(port)).await;
    echo(&mut s, b"hello").await.unwrap();
    let client_port = s.local_addr().unwrap().port();
    // local_address rem_address st tx:rx tr:when ... of wasp's side. While
    // its last bytes await an ACK the retransmit timer (1) shows instead.
    let mut ours = Vec::new();
    for _ in 0..60 {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        ours = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| {
                f.len() > 5
                    && f[1].ends_with(&format!(":{port:04X}"))
                    && f[2].ends_with(&format!(":{client_port:04X}"))
            })
            .unwrap_or_else(|| panic!("wasp's side of :{client_port} not in:\n{table}"));
        if !ours[5].starts_with("01:") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (timer, when) = ours[5].split_once(':').unwrap();
    let when = u64::from_str_radix(when, 16).unwrap();
    assert_eq!(
        timer, "02",
        "no keepalive timer on the accepted socket: {ours:?}"
    );
    // Clock ticks (100 per second) until the first probe: about 60 s.
    assert!(when > 30 * 100, "keepalive fires in {when} ticks: {ours:?}");
}

/// A tunnel is not a connection waiting for its next request head: neither
/// the header timeout nor the idle timeout may end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_outlives_the_header_and_idle_timeouts() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let cfg = config(port, app.addr, "http1").replace(
        "name = \"inbound\"",
        "name = \"inbound\"\nlimits = { header_timeout = \"300ms\", idle_timeout = \"400ms\" }",
    );
    let wasp = Wasp::start(&cfg);
    let mut s = websocket(loopback(port)).await;
    let opened = std::time::Instant::now();
    // Each pause outlasts both timeouts; the whole exchange takes ~1.5 s.
    for (i, msg) in [&b"first"[..], b"after a pause", b"and another"]
        .into_iter()
        .enumerate()
    {
        if let Err(e) = echo(&mut s, msg).await {
            panic!(
                "message {i} after {:?}: {e}\n{}",
                opened.elapsed(),
                wasp.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An open tunnel holds its connection's slot: the gauge (and the
/// connection limit) count it until it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_counts_as_an_open_connection() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&config(port, app.addr, "http1"));
    let open = |wasp: &Wasp| {
        metric_value(
            &wasp.metrics(),
            "wasp_downstream_connections_open",
            &["listener=\"inbound\""],
        )
    };
    let mut s = websocket(loopback(port)).await;
    echo(&mut s, b"hello").await.unwrap();
    assert_eq!(open(&wasp), Some(1.0), "{}", wasp.metrics());
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open(&wasp) != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed tunnel still counts: {}",
            wasp.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many `x-wasp-error` lines a raw answer has.
fn wasp_error_lines(answer: &str) -> usize {
    answer
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-wasp-error:"))
        .count()
}

/// The upstream's own 400, 414 and 431 pass through as they are; only the
/// answers the proxy makes say `x-wasp-error`, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_4xx_is_not_labelled_as_the_proxys() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&config(port, app.addr, "http1"));
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    for code in [400u16, 414, 431] {
        let r = get(&client, proxy, "app", &format!("/status/{code}")).await;
        assert_eq!(r.status, code, "{r:?}");
        assert_eq!(r.header("x-upstream"), Some("app"), "{r:?}");
        assert_eq!(r.header("x-wasp-error"), None, "{code}: {r:?}");
    }
    // The same on a raw connection, read byte for byte.
    let answer = raw_exchange(
        proxy,
        b"GET /status/400 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(wasp_error_lines(&answer), 0, "{answer}");
    // hyper's own answer to a malformed head, and wasp's own 400: labelled once.
    for (name, bytes) in [
        (
            "malformed head",
            &b"GET / HTTP/1.1\r\nHost: a\rX-Evil: 1\r\n\r\n"[..],
        ),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
    ] {
        let answer = raw_exchange(proxy, bytes, Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 400"), "{name}: {answer}");
        assert_eq!(wasp_error_lines(&answer), 1, "{name}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("x-wasp-error: bad_request"),
            "{name}: {answer}"
        );
    }
    assert!(!wasp.log_text().contains("panicked"), "{}", wasp.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shaped_request_keeps_trailers() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&config(port, app.addr, "http2"));
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = http::Request::post(format!("http://127.0.0.1:{port}/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message.clone()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echoed");
    assert_eq!(collected.to_bytes(), message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&config(port, app.addr, "http1"));
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &"x".repeat(4096),
            &format!("http://127.0.0.1:{port}/count"),
        ])
        .output()
        .expect("curl");
    let err = String::from_utf8_lossy(&out.stderr);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    assert_eq!(body, "4096");
}
