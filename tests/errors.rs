//! Malformed requests, limits and proxy-made errors: each gets the right
//! status, an `x-wasp-error` code and a reason, and none reaches the app
//! when it should not.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::upstream::{rude_upstream, TestUpstream};
use support::*;

fn proxy_config(port: u16, app: SocketAddr, extra_listener: &str) -> String {
    one_route_config(port, app, extra_listener, "")
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_are_rejected_with_400() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&proxy_config(port, app.addr, ""));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cases: [(&str, &[u8]); 9] = [
        (
            "CL then TE",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "TE then CL",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        ),
        (
            "invalid chunk size",
            b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n"),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX-Evil: 1\r\n\r\n"),
        // The route would see one name and the upstream maybe the other.
        (
            "two Host headers",
            b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: admin.internal\r\n\r\n",
        ),
        ("HTTP/1.1 without Host", b"GET /echo HTTP/1.1\r\n\r\n"),
        // Pipelined behind a valid GET in one write: hyper would take the
        // second head from its buffer and drop its Content-Length. The GET
        // is answered first (it is a valid request), then the refused head.
        (
            "pipelined TE then CL",
            b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (name, bytes) in cases {
        let answer = raw_exchange(proxy, bytes, Duration::from_secs(5));
        // The last answer on the connection is the refusal.
        let last = answer
            .rfind("\nHTTP/1.1 ")
            .map_or(&answer[..], |i| &answer[i + 1..]);
        let (status, code) = status_and_code(last);
        assert_eq!(status, 400, "{name}: {answer}");
        assert_eq!(code, "bad_request", "{name}: {answer}");
    }
    // Only the invalid-chunk request and the GET ahead of the pipelined
    // refusal had valid heads, so only they may have reached the app;
    // nothing smuggled did.
    assert!(app.requests() <= 2, "app saw {} requests", app.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_431_413_408_and_close_idle() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let limits = r#"limits = { max_header_bytes = "8KiB", max_body_bytes = "1KiB", header_timeout = "300ms", idle_timeout = "400ms" }"#;
    let wasp = Wasp::start(&proxy_config(port, app.addr, limits));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(16 << 10)
    );
    let (status, code) =
        status_and_code(&raw_exchange(proxy, big.as_bytes(), Duration::from_secs(5)));
    assert_eq!((status, code.as_str()), (431, "header_too_large"));

    let declared = format!(
        "POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n{}",
        "x".repeat(2048)
    );
    let answer = raw_exchange(proxy, declared.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        status_and_code(&answer),
        (413, "body_too_large".into()),
        "{answer}"
    );

    let mut chunked =
        String::from("POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        chunked.push_str(&format!("200\r\n{}\r\n", "y".repeat(512)));
    }
    chunked.push_str("0\r\n\r\n");
    let answer = raw_exchange(proxy, chunked.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        status_and_code(&answer),
        (413, "body_too_large".into()),
        "{answer}"
    );

    // A head that never finishes: 408 after the header timeout.
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert_eq!(
        status_and_code(&answer),
        (408, "header_timeout".into()),
        "{answer}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "408 came too early"
    );
    // The answers the connection guard makes count like every other
    // proxy-made error.
    let m = wasp.metrics();
    for code in ["header_too_large", "header_timeout"] {
        let labels = [r#"listener="inbound""#, &format!(r#"code="{code}""#)];
        assert_eq!(
            metric_value(&m, "wasp_proxy_errors_total", &labels),
            Some(1.0),
            "{code}: {m}"
        );
    }

    // An idle keep-alive connection is closed after the idle timeout.
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest).is_ok();
    assert!(closed, "connection not closed by the proxy");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
}

/// hyper's own head buffer cannot be smaller than 8 KiB, so a smaller
/// `max_header_bytes` is the guard's to enforce: 431, and the app never
/// sees the request; a head under the limit still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_bytes_below_8k_answers_431() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let _wasp = Wasp::start(&proxy_config(
        port,
        app.addr,
        r#"limits = { max_header_bytes = "2KiB" }"#,
    ));
    let proxy = loopback(port);
    let head = |filler: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
            "f".repeat(filler)
        )
    };
    let answer = raw_exchange(proxy, head(4000).as_bytes(), Duration::from_secs(5));
    assert_eq!(
        status_and_code(&answer),
        (431, "header_too_large".into()),
        "{answer}"
    );
    // Split over several writes, the limit holds as well.
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let big = head(4000);
    for part in big.as_bytes().chunks(1000) {
        if s.write_all(part).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert_eq!(
        status_and_code(&answer),
        (431, "header_too_large".into()),
        "{answer}"
    );
    assert_eq!(app.requests(), 0, "an oversized head reached the app");
    let answer = raw_exchange(proxy, head(1000).as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A body read whole for retries holds a cluster admission while it
/// arrives: a client that trickles it gets 408 instead of holding the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_retry_body_answers_408_body_timeout() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let config = proxy_config(port, app.addr, r#"limits = { header_timeout = "300ms" }"#).replace(
        "  cluster = \"app\"",
        "  cluster = \"app\"\n  retry = { on = [\"5xx\"], attempts = 1 }",
    );
    let _wasp = Wasp::start(&config);
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // One byte of a declared thousand, then silence.
    let answer = raw_exchange(
        proxy,
        b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nA",
        Duration::from_secs(5),
    );
    assert_eq!(
        status_and_code(&answer),
        (408, "body_timeout".into()),
        "{answer}"
    );
    assert_eq!(app.requests(), 0, "the app saw the unfinished request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_503_overflow() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let wasp = Wasp::start(&proxy_config(
        port,
        app.addr,
        "limits = { max_connections = 2 }",
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let answer = raw_exchange(
        proxy,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(
        status_and_code(&answer),
        (503, "overflow".into()),
        "{answer}"
    );
    assert!(answer.contains("limit of 2 connections"), "{answer}");
    drop(held);
    // Once the held connections close, new ones are served again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = raw_exchange(
            proxy,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        metric_value(
            &wasp.metrics(),
            "wasp_proxy_errors_total",
            &["code=\"overflow\""]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_have_distinct_codes() {
    let app = TestUpstream::start("app").await;
    let (rude, _task) = rude_upstream().await;
    let closed_port = free_port();
    let port = free_port();
    let wasp = Wasp::start(&format!(
        r#"
[[listeners]]
name = "outbound"
bind = "127.0.0.1:{port}"
  [[listeners.routes]]
  match = {{ host = "slow" }}
  cluster = "app"
  timeout = "200ms"
  [[listeners.routes]]
  match = {{ host = "down" }}
  cluster = "down"
  [[listeners.routes]]
  match = {{ host = "rude" }}
  cluster = "rude"

[clusters.app]
endpoints = ["{app}"]
[clusters.down]
endpoints = ["127.0.0.1:{closed_port}"]
connect_timeout = "500ms"
[clusters.rude]
endpoints = ["{rude}"]
"#,
        app = app.addr
    ));
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = h1_client();
    let cases = [
        ("slow", "/slow?ms=3000", 504, "upstream_timeout"),
        ("down", "/", 502, "upstream_connect"),
        ("rude", "/", 502, "upstream_reset"),
        ("nowhere", "/", 404, "no_route"),
    ];
    for (host, path, status, code) in cases {
        let r = get(&client, proxy, host, path).await;
        assert_eq!(r.status, status, "{host}: {r:?}");
        assert_eq!(r.header("x-wasp-error"), Some(code), "{host}: {r:?}");
        assert_eq!(r.body.lines().count(), 1, "one-line reason: {:?}", r.body);
        assert!(r
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"));
    }
    // The log line of a proxy-made error carries the request id.
    let req = http::Request::get(format!("http://{proxy}/"))
        .header("host", "nowhere")
        .header("x-request-id", "trace-me-42")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.status, 404);
    let log = wasp.log_text();
    assert!(log.contains("request_id=trace-me-42"), "{log}");
    for (_, _, _, code) in cases {
        assert!(
            log.contains(&format!("code=\"{code}\"")) || log.contains(&format!("code={code}")),
            "no log line for {code}:\n{log}"
        );
    }
}
