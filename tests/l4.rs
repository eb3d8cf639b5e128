//! L4 listeners (`protocol = "tcp"`) through the real binary: TCP routes by
//! TLS server name (passthrough: the upstream gets the ClientHello as the
//! client sent it), an echo with half-close, a server-speaks-first banner,
//! a dead endpoint skipped at connect, the idle timeout, per-route TCP
//! metrics and access log lines, and Redis (Debian `redis-server`, driven
//! with `redis-cli`) proxied unchanged.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::config::{tcp_proxy, Cluster, Config, Filter, Listener, Route};
use support::l4::*;
use support::{free_port, loopback, metric_value, Wasp};

const FIVE_S: Duration = Duration::from_secs(5);

#[tokio::test]
async fn tcp_routes_by_sni_and_port_with_half_close_and_idle_timeout() {
    let a = banner_server("a").await;
    let b = banner_server("b").await;
    let echo = echo_server().await;
    // An endpoint that refuses: connects fail there and move on to the live one.
    let dead = loopback(free_port());
    let port = free_port();
    let idle_port = free_port();
    let config = Config::new()
        .listener(
            Listener::tcp("tcp", port)
                .route(
                    Route::to("a")
                        .named("to-a")
                        .matching(r#"sni = "a.example""#),
                )
                .route(
                    Route::to("b")
                        .named("to-b")
                        .matching(r#"sni = "*.b.example""#),
                )
                .route(
                    Route::to("echo")
                        .named("plain")
                        .matching(&format!(r#"port = {port}, cidr = "127.0.0.0/8""#)),
                ),
        )
        .listener(
            Listener::tcp("idle", idle_port)
                .limits(r#"tcp_idle_timeout = "300ms""#)
                .to("echo"),
        )
        .cluster(Cluster::new("a", [a]))
        .cluster(Cluster::new("b", [b]))
        .cluster(Cluster::new("echo", [dead, echo]));
    let wasp = Wasp::start(&config.toml());
    let listener = loopback(port);

    // TLS passthrough: the route is chosen by the ClientHello's name, and
    // the upstream receives the ClientHello itself (0x16: a TLS record).
    for (sni, name) in [("a.example", "a"), ("db.b.example", "b")] {
        let hello = client_hello(sni);
        let mut s = connect_sending(listener, &hello).await;
        assert_eq!(read_line(&mut s).await, format!("hello from {name}"));
        let got = read_line(&mut s).await;
        assert_eq!(
            got,
            format!("{name} got {} bytes starting 16", hello.len()),
            "{sni}"
        );
    }

    // Plain bytes match the port route; half-close: the client ends its
    // side and still reads the whole answer.
    for _ in 0..4 {
        let mut s = connect_sending(listener, b"ping over tcp").await;
        s.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back, b"ping over tcp");
    }

    // The idle timeout closes a connection on which nothing moves.
    let mut s = connect_sending(loopback(idle_port), b"x").await;
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.expect("echo");
    let started = Instant::now();
    let (closed, _) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "idle connection not closed");
    assert!(started.elapsed() >= Duration::from_millis(250));

    let metrics = wasp.metrics();
    let conns = |route: &str, cluster: &str| {
        metric_value(
            &metrics,
            "wasp_tcp_connections_total",
            &[
                "listener=\"tcp\"",
                &format!("route=\"{route}\""),
                &format!("cluster=\"{cluster}\""),
            ],
        )
    };
    assert_eq!(conns("to-a", "a"), Some(1.0), "{metrics}");
    assert_eq!(conns("to-b", "b"), Some(1.0), "{metrics}");
    assert_eq!(conns("plain", "echo"), Some(4.0), "{metrics}");
    let up = metric_value(
        &metrics,
        "wasp_tcp_bytes_total",
        &["route=\"plain\"", "direction=\"upstream\""],
    );
    assert_eq!(up, Some(52.0), "{metrics}");
    let log = wasp.log_text();
    assert!(log.contains("tcp connection"), "no access log line:\n{log}");
    assert!(log.contains("idle_timeout"), "{log}");
}

#[tokio::test]
async fn a_tcp_listener_without_a_matching_route_closes_and_counts_it() {
    let echo = echo_server().await;
    let port = free_port();
    let config = Config::new()
        .listener(
            Listener::tcp("tcp", port).route(Route::to("echo").matching(r#"sni = "only.example""#)),
        )
        .cluster(Cluster::new("echo", [echo]));
    let wasp = Wasp::start(&config.toml());
    let mut s = connect_sending(loopback(port), b"not tls").await;
    let (_, back) = read_to_close(&mut s, FIVE_S).await;
    assert!(back.is_empty());
    let metrics = wasp.metrics();
    let count = metric_value(
        &metrics,
        "wasp_proxy_errors_total",
        &["listener=\"tcp\"", "code=\"no_route\""],
    );
    assert_eq!(count, Some(1.0), "{metrics}");
}

/// On a listener bound to 0.0.0.0 a connection's destination is the
/// address it arrived on (here 127.0.0.1), not the wildcard, so a `cidr`
/// match sees it.
#[tokio::test]
async fn a_wildcard_listener_routes_by_the_address_a_connection_arrived_on() {
    let echo = echo_server().await;
    let port = free_port();
    let config =
        Config::new()
            .listener(Listener::tcp_on("tcp", &format!("0.0.0.0:{port}")).route(
                Route::to("echo").matching(&format!(r#"cidr = "127.0.0.1/32", port = {port}"#)),
            ))
            .cluster(Cluster::new("echo", [echo]));
    let wasp = Wasp::start(&config.toml());
    let mut s = connect_sending(loopback(port), b"ping").await;
    s.shutdown().await.expect("shutdown");
    let (_, back) = read_to_close(&mut s, FIVE_S).await;
    assert_eq!(back, b"ping", "log:\n{}", wasp.log_text());
}

#[test]
fn redis_through_a_tcp_listener() {
    let (_redis, redis_port) = start_redis();
    let port = free_port();
    let config = Config::new()
        .listener(Listener::tcp("redis", port).route(Route::to("redis").named("redis")))
        .cluster(
            Cluster::new("redis", [loopback(redis_port)]).with(r#"balance = "least_request""#),
        );
    let wasp = Wasp::start(&config.toml());
    assert_eq!(redis_cli(port, &["PING"]), "PONG");
    assert_eq!(redis_cli(port, &["SET", "wasp", "l4"]), "OK");
    assert_eq!(redis_cli(port, &["GET", "wasp"]), "l4");
    // Straight at Redis: the value went there.
    assert_eq!(redis_cli(redis_port, &["GET", "wasp"]), "l4");
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_tcp_connections_total",
            &["listener=\"redis\"", "cluster=\"redis\""]
        ),
        Some(3.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_community_sdk_network_filter_counts_and_rewrites_bytes() {
    let echo = echo_server().await;
    let port = free_port();
    let broken_port = free_port();
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite", "noop"]);
    let config = Config::new()
        .filter(Filter::new("tcprw", "tcp-rewrite.wasm"))
        // An HTTP filter put on a TCP listener: its SDK traps on the first
        // network callback, which must fail that connection only.
        .filter(Filter::new("http_only", "noop.wasm").with(r#"fail = "closed""#))
        .listener(Listener::tcp("tcp", port).pipeline(&["tcprw"]).to("echo"))
        .listener(
            Listener::tcp("broken", broken_port)
                .pipeline(&["http_only"])
                .to("echo"),
        )
        .cluster(Cluster::new("echo", [echo]));
    let wasp = Wasp::start_in(dir, &config.toml(), &[]);
    let listener = loopback(port);

    // Rewritten both ways: upper-cased to the upstream, prefixed back.
    let mut s = connect_sending(listener, b"hello").await;
    assert_eq!(read_n(&mut s, 11).await, b"[wasm]HELLO");
    s.shutdown().await.expect("half-close");
    let (_, rest) = read_to_close(&mut s, FIVE_S).await;
    assert!(rest.is_empty(), "{rest:?}");

    // PAUSE holds the bytes until the filter lets them go.
    let mut s = connect_sending(listener, b"hold on").await;
    let mut early = [0u8; 64];
    let held = tokio::time::timeout(Duration::from_millis(300), s.read(&mut early)).await;
    assert!(held.is_err(), "held bytes went through: {held:?}");
    s.write_all(b"!").await.expect("write");
    assert_eq!(read_n(&mut s, 14).await, b"[wasm]HOLD ON!");
    drop(s);

    // The filter closes the connection.
    let mut s = connect_sending(listener, b"please close").await;
    let (_, back) = read_to_close(&mut s, FIVE_S).await;
    assert!(back.is_empty(), "{back:?}");

    // A filter that fails closes its own connection and nothing else.
    let mut b = TcpStream::connect(loopback(broken_port))
        .await
        .expect("connect");
    let _ = b.write_all(b"x").await;
    let (_, back) = read_to_close(&mut b, FIVE_S).await;
    assert!(
        back.is_empty(),
        "a trapping filter let bytes through: {back:?}"
    );
    let mut s = connect_sending(listener, b"still").await;
    assert_eq!(read_n(&mut s, 11).await, b"[wasm]STILL");
    drop(s);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = wasp.metrics();
        let down = metric_value(
            &metrics,
            "tcp_rewrite_downstream_bytes",
            &["filter=\"tcprw\""],
        );
        let up = metric_value(
            &metrics,
            "tcp_rewrite_upstream_bytes",
            &["filter=\"tcprw\""],
        );
        if down == Some(18.0) && up == Some(18.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "filter counters: down {down:?} up {up:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = wasp.log_text();
    assert!(
        log.contains("tcp-rewrite: opened=true down=5 up=5"),
        "no on_log line:\n{log}"
    );
    assert!(log.contains("filter_closed"), "{log}");
}

/// A client chunk sent while a later network filter buffers still passes
/// every filter before it (as in Envoy): `redact` masks `secret`, then
/// `line` holds the client's bytes until a newline. The secret comes in
/// later writes, after `line` paused on the first one; the echo upstream
/// sends back exactly what it got, and it never got the word.
#[tokio::test]
async fn a_chunk_sent_while_a_later_network_filter_buffers_passes_the_ones_before_it() {
    let echo = echo_server().await;
    let port = free_port();
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite"]);
    let config = Config::new()
        .filter(Filter::new("redact", "tcp-rewrite.wasm").config(r#""redact""#))
        .filter(Filter::new("line", "tcp-rewrite.wasm").config(r#""line""#))
        .listener(
            Listener::tcp("tcp", port)
                .pipeline(&["redact", "line"])
                .to("echo"),
        )
        .cluster(Cluster::new("echo", [echo]));
    let _wasp = Wasp::start_in(dir, &config.toml(), &[]);

    let mut s = connect_sending(loopback(port), b"user=ann ").await;
    let mut early = [0u8; 64];
    let held = tokio::time::timeout(Duration::from_millis(300), s.read(&mut early)).await;
    assert!(
        held.is_err(),
        "bytes went on before the line ended: {held:?}"
    );
    s.write_all(b"password=secret ").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"and secret again\n").await.expect("write");
    let want = b"user=ann password=****** and ****** again\n";
    let back = read_n(&mut s, want.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&back),
        String::from_utf8_lossy(want),
        "the upstream saw bytes the first filter never inspected"
    );
    s.shutdown().await.expect("half-close");
    let (_, rest) = read_to_close(&mut s, FIVE_S).await;
    assert!(!rest.windows(6).any(|w| w == b"secret"), "{rest:?}");
}

#[tokio::test]
async fn draining_keeps_open_tcp_connections_until_the_drain_timeout() {
    let echo = echo_server().await;
    let port = free_port();
    let config = tcp_proxy("tcp", port, "echo", echo).proxy(r#"drain_timeout = "1500ms""#);
    let mut wasp = Wasp::start(&config.toml());
    let mut s = connect_sending(loopback(port), b"before").await;
    assert_eq!(read_n(&mut s, 6).await, b"before");
    wasp.signal("TERM");
    // New connections are refused once the listener has closed...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = match TcpStream::connect(loopback(port)).await {
            Err(_) => true,
            Ok(mut c) => {
                let mut b = [0u8; 1];
                let _ = c.write_all(b"x").await;
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await,
                    Ok(Ok(0) | Err(_))
                )
            }
        };
        if refused {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...while the open one keeps working until the drain timeout.
    s.write_all(b"during").await.expect("write while draining");
    assert_eq!(read_n(&mut s, 6).await, b"during");
    let (closed, _) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "not closed at the drain timeout");
    assert_eq!(wasp.wait_exit(Duration::from_secs(10)), Some(0));
    let log = wasp.log_text();
    assert!(log.contains("end=\"drained\""), "{log}");
}

/// Network filters run before the upstream connect (as Envoy's do): a
/// filter that refuses in `proxy_on_new_connection`, or pauses there and
/// closes on the client's first bytes, leaves the upstream without a
/// single accept; with no filter asking to wait, a silent client (server
/// speaks first) is connected at once, not after `detect_timeout`.
#[tokio::test]
async fn network_filters_decide_before_the_upstream_is_connected() {
    let (echo, upstream_accepts) = counting_echo_server().await;
    let banner = banner_server("db").await;
    let deny_port = free_port();
    let port = free_port();
    let banner_port = free_port();
    let wait_port = free_port();
    let waitclose_port = free_port();
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite"]);
    let config = Config::new()
        .filter(Filter::new("deny", "tcp-rewrite.wasm").config(r#""deny""#))
        .filter(Filter::new("tcprw", "tcp-rewrite.wasm"))
        .filter(waits_for_first_bytes())
        .listener(
            Listener::tcp("wait", wait_port)
                .pipeline(&["wait"])
                .limits(r#"detect_timeout = "100ms""#)
                .to("banner"),
        )
        .listener(
            Listener::tcp("waitclose", waitclose_port)
                .pipeline(&["wait"])
                .to("echo"),
        )
        .listener(
            Listener::tcp("deny", deny_port)
                .pipeline(&["deny"])
                .to("echo"),
        )
        .listener(Listener::tcp("tcp", port).pipeline(&["tcprw"]).to("echo"))
        .listener(
            Listener::tcp("banner", banner_port)
                .pipeline(&["tcprw"])
                // Not waited for: no filter paused.
                .limits(r#"detect_timeout = "30s""#)
                .to("banner"),
        )
        .cluster(Cluster::new("echo", [echo]))
        .cluster(Cluster::new("banner", [banner]));
    let wasp = Wasp::start_in(dir, &config.toml(), &[]);
    let closed_at_once = |addr: SocketAddr, send: &'static [u8]| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(send).await;
        let (closed, back) = read_to_close(&mut s, FIVE_S).await;
        assert!(closed, "connection not closed");
        assert!(back.is_empty(), "{back:?}");
    };
    for _ in 0..3 {
        closed_at_once(loopback(deny_port), b"let me in").await;
    }
    // Paused, then closed by the filter on the first chunk: no connect
    // either.
    closed_at_once(loopback(waitclose_port), b"please close").await;
    assert_eq!(
        accepted(&upstream_accepts),
        0,
        "the upstream saw a connect for a connection a filter closed\n{}",
        wasp.log_text()
    );

    // An allowed connection: the first chunk went through the filter
    // before the connect, and is the first thing the upstream gets.
    let mut s = connect_sending(loopback(port), b"hello").await;
    assert_eq!(read_n(&mut s, 11).await, b"[wasm]HELLO");
    s.write_all(b"again").await.expect("write");
    assert_eq!(read_n(&mut s, 11).await, b"[wasm]AGAIN");
    drop(s);
    assert_eq!(accepted(&upstream_accepts), 1);

    // Server speaks first: the silent client is connected at once (well
    // before the 30 s detect_timeout; read_line gives up after 5 s).
    let mut s = TcpStream::connect(loopback(banner_port))
        .await
        .expect("connect");
    assert_eq!(read_line(&mut s).await, "[wasm]hello from db");

    // A filter that paused in proxy_on_new_connection: no connect (so no
    // banner) until the client sends, well past detect_timeout.
    let mut s = TcpStream::connect(loopback(wait_port))
        .await
        .expect("connect");
    let mut early = [0u8; 64];
    let silent = tokio::time::timeout(Duration::from_millis(600), s.read(&mut early)).await;
    assert!(
        silent.is_err(),
        "connected before the client sent: {silent:?}"
    );
    s.write_all(b"x").await.expect("write");
    assert_eq!(read_line(&mut s).await, "[wasm]hello from db");

    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["listener=\"deny\"", "code=\"filter_closed_stream\""]
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["listener=\"waitclose\"", "code=\"filter_closed_stream\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let log = wasp.log_text();
    assert!(log.contains("tcp-rewrite: denied a connection"), "{log}");
    assert!(
        log.contains("tcp connection closed before connecting upstream"),
        "{log}"
    );
}

/// An upstream that resets mid-copy: the access log line still has the
/// bytes that went each way, the end (`reset`) and the failing side.
#[tokio::test]
async fn a_reset_mid_copy_keeps_its_byte_counts_in_the_access_log() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut got = [0u8; 5];
            if s.read_exact(&mut got).await.is_err() {
                continue;
            }
            let _ = s.write_all(b"12345678").await;
            // Give the bytes time to leave before the reset (a reset
            // discards what is still queued).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let port = free_port();
    let wasp = Wasp::start(&tcp_proxy("tcp", port, "resets", upstream).toml());
    let mut s = connect_sending(loopback(port), b"hello").await;
    assert_eq!(read_n(&mut s, 8).await, b"12345678");
    let _ = read_to_close(&mut s, FIVE_S).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = wasp.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("tcp connection") && l.contains("end=\"reset\""));
        if let Some(line) = line {
            assert!(line.contains("to_upstream=5"), "{line}");
            assert!(line.contains("to_client=8"), "{line}");
            assert!(
                line.contains("error=\"upstream: connection reset"),
                "{line}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reset access log line:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const FRONT: &str = "spiffe://mesh.local/ns/default/sa/front";
const REVIEWS: &str = "spiffe://mesh.local/ns/default/sa/reviews";

/// Opaque TCP between two sidecars over mTLS: the app's sidecar sends
/// Redis to the other's inbound `tcp` listener over TLS with its client
/// certificate (the cluster's `tls`, as for HTTP); the inbound listener
/// terminates it, checks the caller's SPIFFE ID against `tls.allow`, and
/// hands the plain bytes to the local Redis. A caller with another
/// identity, a plaintext client and an upstream with the wrong identity
/// are all refused.
#[test]
fn redis_over_mtls_between_two_sidecars() {
    let (_redis, redis_port) = start_redis();
    let certs = support::TempDir::new("l4-mtls");
    let dir = certs.path().display().to_string();
    support::wasp_ok(["certs", "--out", &dir, "--service", "front,reviews,other"]);
    let p = |f: &str| certs.path().join(f).display().to_string();
    let inbound_port = free_port();
    let inbound = Wasp::start(
        &tcp_proxy("inbound", inbound_port, "local_redis", loopback(redis_port))
            .edit_listener("inbound", |l| {
                l.tls(&format!(
                    r#"cert = "{cert}", key = "{key}", client_ca = "{ca}", allow = ["{FRONT}"]"#,
                    cert = p("reviews.pem"),
                    key = p("reviews-key.pem"),
                    ca = p("mesh-ca.pem"),
                ))
            })
            .toml(),
    );
    let (port, intruder_port, wrong_port) = (free_port(), free_port(), free_port());
    // To the inbound sidecar over mTLS as `who`, expecting `expect` there.
    let to_inbound = |cluster: &str, who: &str, expect: &str| {
        Cluster::new(cluster, [loopback(inbound_port)]).tls(&format!(
            r#"ca = "{ca}", cert = "{cert}", key = "{key}", sni = "reviews", expect_identity = "{expect}""#,
            ca = p("mesh-ca.pem"),
            cert = p(&format!("{who}.pem")),
            key = p(&format!("{who}-key.pem")),
        ))
    };
    let config = Config::new()
        .listener(Listener::tcp("redis", port).to("reviews"))
        .listener(Listener::tcp("intruder", intruder_port).to("as_other"))
        .listener(Listener::tcp("wrong", wrong_port).to("wrong_identity"))
        .cluster(to_inbound("reviews", "front", REVIEWS))
        .cluster(to_inbound("as_other", "other", REVIEWS))
        .cluster(to_inbound(
            "wrong_identity",
            "front",
            "spiffe://mesh.local/ns/default/sa/someone-else",
        ));
    let outbound = Wasp::start(&config.toml());
    assert_eq!(
        redis_cli(port, &["PING"]),
        "PONG",
        "{}",
        outbound.log_text()
    );
    assert_eq!(redis_cli(port, &["SET", "hop", "mtls"]), "OK");
    assert_eq!(redis_cli(port, &["GET", "hop"]), "mtls");
    assert_eq!(redis_cli(redis_port, &["GET", "hop"]), "mtls");

    // Refused: another identity, plaintext, the wrong upstream identity.
    assert_ne!(redis_cli(intruder_port, &["PING"]), "PONG");
    assert_ne!(redis_cli(inbound_port, &["PING"]), "PONG");
    assert_ne!(redis_cli(wrong_port, &["PING"]), "PONG");

    let metrics = inbound.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["listener=\"inbound\"", "code=\"unauthorized_peer\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_tcp_connections_total",
            &["listener=\"inbound\"", "cluster=\"local_redis\""]
        ),
        Some(3.0),
        "{metrics}"
    );
    let metrics = outbound.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["listener=\"wrong\"", "code=\"upstream_tls\""]
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A client that sends the start of a ClientHello (or of a request line)
/// and then ends its side, on a listener that peeks for the server name:
/// the detection must see the end, not look at the same byte forever. With
/// one worker, a detection that spins would leave every later connection
/// unanswered and the drain unfinished.
#[tokio::test]
async fn a_client_ending_inside_a_prefix_does_not_hang_the_worker() {
    let a = banner_server("a").await;
    let echo = echo_server().await;
    let port = free_port();
    let config = Config::new()
        .proxy(r#"drain_timeout = "2s""#)
        .listener(
            Listener::tcp("tcp", port)
                .route(
                    Route::to("a")
                        .named("to-a")
                        .matching(r#"sni = "a.example""#),
                )
                .route(
                    Route::to("echo")
                        .named("plain")
                        .matching(&format!("port = {port}")),
                ),
        )
        .cluster(Cluster::new("a", [a]))
        .cluster(Cluster::new("echo", [echo]));
    let mut wasp = Wasp::start(&config.toml());
    let listener = loopback(port);
    for prefix in [&b"\x16"[..], b"G", b"\x16\x03\x01"] {
        let mut s = connect_sending(listener, prefix).await;
        s.shutdown().await.expect("half-close");
        // Undecided, so no `sni` route: the plain route echoes it back.
        let (closed, back) = read_to_close(&mut s, FIVE_S).await;
        assert!(closed, "{prefix:?} then FIN: not closed");
        assert_eq!(back, prefix, "{prefix:?}");
        // The worker still serves the next client.
        let hello = client_hello("a.example");
        let mut s = connect_sending(listener, &hello).await;
        assert_eq!(
            read_line(&mut s).await,
            "hello from a",
            "after {prefix:?} then FIN\n{}",
            wasp.log_text()
        );
    }
    // And drains: a hung worker would never let the process exit.
    let mut s = connect_sending(listener, b"\x16").await;
    s.shutdown().await.expect("half-close");
    wasp.signal("TERM");
    assert_eq!(wasp.wait_exit(Duration::from_secs(10)), Some(0));
}

/// The client's own TLS routed by `sni` to a cluster with `tls`: passed
/// through as the client sent it (the upstream gets the very ClientHello),
/// never wrapped in a second TLS of wasp's.
#[tokio::test]
async fn a_client_hello_routed_by_sni_is_not_wrapped_in_the_clusters_tls() {
    let a = banner_server("a").await;
    let port = free_port();
    let config = Config::new()
        .listener(Listener::tcp("tcp", port).route(Route::to("a").matching(r#"sni = "a.example""#)))
        .cluster(Cluster::new("a", [a]).tls(r#"sni = "a.example""#));
    let wasp = Wasp::start(&config.toml());
    let hello = client_hello("a.example");
    let mut s = connect_sending(loopback(port), &hello).await;
    assert_eq!(
        read_line(&mut s).await,
        "hello from a",
        "{}",
        wasp.log_text()
    );
    assert_eq!(
        read_line(&mut s).await,
        format!("a got {} bytes starting 16", hello.len())
    );
}

/// A client gone before the upstream connect, while a network filter
/// waits for its first bytes (it reset; it sent nothing within the wait):
/// logged with that end like any connection, not counted as a filter that
/// closed the stream.
#[tokio::test]
async fn a_client_gone_before_the_connect_is_its_end_not_a_filter_code() {
    let (echo, upstream_accepts) = counting_echo_server().await;
    let port = free_port();
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite"]);
    let config = Config::new()
        .filter(waits_for_first_bytes())
        .listener(
            Listener::tcp("wait", port)
                .pipeline(&["wait"])
                .limits(r#"tcp_idle_timeout = "300ms""#)
                .to("echo"),
        )
        .cluster(Cluster::new("echo", [echo]));
    let wasp = Wasp::start_in(dir, &config.toml(), &[]);
    // Reset before sending anything.
    let s = TcpStream::connect(loopback(port)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
    // Silent past the wait.
    let mut s = TcpStream::connect(loopback(port)).await.expect("connect");
    let (closed, _) = read_to_close(&mut s, FIVE_S).await;
    assert!(closed, "a silent client was not closed");

    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = wasp.log_text();
        let lines = log.lines().filter(|l| l.contains("tcp connection"));
        let reset = lines
            .clone()
            .any(|l| l.contains("end=\"reset\"") && l.contains("error=\"client: connection reset"));
        let idle = lines.clone().any(|l| l.contains("end=\"idle_timeout\""));
        if reset && idle {
            break log;
        }
        assert!(Instant::now() < deadline, "no reset and idle lines:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        log.contains("tcp-rewrite: opened=true down=0 up=0"),
        "the filter saw no end:\n{log}"
    );
    let metrics = wasp.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "wasp_proxy_errors_total",
            &["listener=\"wait\"", "code=\"filter_closed_stream\""]
        ),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(accepted(&upstream_accepts), 0);
}

/// A filter paused in `proxy_on_new_connection` waits for the client's
/// first bytes at most the listener's `header_timeout` (not the hour of
/// `tcp_idle_timeout`), and a client still silent when the drain deadline
/// passes is closed, not connected upstream for nothing.
#[tokio::test]
async fn a_paused_wait_for_first_bytes_is_bounded_and_ends_at_the_drain() {
    let (echo, upstream_accepts) = counting_echo_server().await;
    let (port, drain_port) = (free_port(), free_port());
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite"]);
    let config = Config::new()
        .proxy(r#"drain_timeout = "500ms""#)
        .filter(waits_for_first_bytes())
        .listener(
            Listener::tcp("wait", port)
                .pipeline(&["wait"])
                .limits(r#"header_timeout = "300ms""#)
                .to("echo"),
        )
        .listener(
            Listener::tcp("drain", drain_port)
                .pipeline(&["wait"])
                .to("echo"),
        )
        .cluster(Cluster::new("echo", [echo]));
    let mut wasp = Wasp::start_in(dir, &config.toml(), &[]);
    let mut s = TcpStream::connect(loopback(port)).await.expect("connect");
    let (closed, _) = read_to_close(&mut s, FIVE_S).await;
    assert!(closed, "a silent client waited past header_timeout");

    let mut s = TcpStream::connect(loopback(drain_port))
        .await
        .expect("connect");
    // Accepted and waiting before the drain starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    wasp.signal("TERM");
    let (closed, _) = read_to_close(&mut s, FIVE_S).await;
    assert!(closed, "not closed at the drain deadline");
    assert_eq!(wasp.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(
        accepted(&upstream_accepts),
        0,
        "connected upstream for a client that never sent\n{}",
        wasp.log_text()
    );
    let log = wasp.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tcp connection"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("listener=wait") && l.contains("end=\"idle_timeout\"")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("listener=drain") && l.contains("end=\"drained\"")),
        "{log}"
    );
}

/// TLS at L4 carries no HTTP ALPN: a client naming its own protocol
/// (Postgres direct SSL sends `postgresql`) is not refused by a `tcp`
/// listener with `tls`, and an upstream that requires its own protocol
/// name is not refused by wasp's connect with a cluster's `tls`.
#[tokio::test]
async fn l4_tls_offers_and_requires_no_http_alpn() {
    use rustls::pki_types::pem::PemObject;
    let certs = support::TempDir::new("l4-alpn");
    let dir = certs.path().display().to_string();
    support::wasp_ok(["certs", "--out", &dir, "--service", "db"]);
    let p = |f: &str| certs.path().join(f).display().to_string();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&p("mesh-ca.pem")) {
        roots.add(c).expect("ca");
    }

    // An upstream speaking TLS that insists on ALPN "postgresql", then echoes.
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            pem_certs(&p("db.pem")),
            rustls::pki_types::PrivateKeyDer::from_pem_file(p("db-key.pem")).expect("key"),
        )
        .expect("server config");
    server.alpn_protocols = vec![b"postgresql".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });

    let (inbound, outbound) = (free_port(), free_port());
    let config = Config::new()
        .listener(
            Listener::tcp("inbound", inbound)
                .tls(&format!(
                    r#"cert = "{}", key = "{}""#,
                    p("db.pem"),
                    p("db-key.pem")
                ))
                .to("db_plain"),
        )
        .listener(Listener::tcp("outbound", outbound).to("db_tls"))
        .cluster(Cluster::new("db_plain", [echo_server().await]))
        .cluster(
            Cluster::new("db_tls", [upstream])
                .tls(&format!(r#"ca = "{}", sni = "db""#, p("mesh-ca.pem"))),
        );
    let wasp = Wasp::start(&config.toml());

    // A client offering only "postgresql" to the terminating listener.
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = TcpStream::connect(loopback(inbound))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("db").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("handshake refused: {e}\n{}", wasp.log_text()));
    tls.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got, b"ping");

    // wasp's own TLS to an upstream that requires "postgresql".
    let mut s = connect_sending(loopback(outbound), b"pong").await;
    assert_eq!(read_n(&mut s, 4).await, b"pong", "{}", wasp.log_text());

    // No client_ca: anyone who completes a handshake gets in; said at
    // start-up and by `wasp check`.
    let warning = "tcp with tls but no tls.client_ca";
    assert!(wasp.log_text().contains(warning), "{}", wasp.log_text());
    let path = wasp.config_path();
    let out = support::wasp_ok(["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(warning),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `tcp` listener that terminates TLS routes by the handshake's server
/// name (its certificate chosen by SNI too): each upstream gets the plain
/// bytes of the connections for its name.
#[tokio::test]
async fn a_tls_listener_routes_by_the_handshakes_server_name() {
    let certs = support::TempDir::new("l4-tls-sni");
    let dir = certs.path().display().to_string();
    support::wasp_ok(["certs", "--out", &dir, "--service", "alpha,beta"]);
    let p = |f: &str| certs.path().join(f).display().to_string();
    let (alpha, beta) = (banner_server("alpha").await, banner_server("beta").await);
    let port = free_port();
    let config = Config::new()
        .listener(
            Listener::tcp("tls", port)
                .tls(&format!(
                    r#"cert = "{a_cert}", key = "{a_key}", certs = [ {{ sni = "beta", cert = "{b_cert}", key = "{b_key}" }} ]"#,
                    a_cert = p("alpha.pem"),
                    a_key = p("alpha-key.pem"),
                    b_cert = p("beta.pem"),
                    b_key = p("beta-key.pem"),
                ))
                .route(Route::to("alpha").matching(r#"sni = "alpha""#))
                .route(Route::to("beta").matching(r#"sni = "beta""#)),
        )
        .cluster(Cluster::new("alpha", [alpha]))
        .cluster(Cluster::new("beta", [beta]));
    let wasp = Wasp::start(&config.toml());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&p("mesh-ca.pem")) {
        roots.add(c).expect("ca");
    }
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    for name in ["alpha", "beta"] {
        let tcp = TcpStream::connect(loopback(port)).await.expect("connect");
        let server_name = rustls::pki_types::ServerName::try_from(name).expect("name");
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(server_name, tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", wasp.log_text()));
        let (r, mut w) = tokio::io::split(tls);
        let mut r = tokio::io::BufReader::new(r);
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt;
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("banner in time")
            .expect("banner");
        assert_eq!(line.trim_end(), format!("hello from {name}"));
        // The upstream gets the plain bytes (not a TLS record: 0x16).
        w.write_all(b"plain").await.expect("write");
        line.clear();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("answer in time")
            .expect("answer");
        assert_eq!(line.trim_end(), format!("{name} got 5 bytes starting 70"));
    }
}

/// A connection whose filter waits for its first bytes holds no snapshot
/// meanwhile: a reload during the wait is served by the new generation
/// (the route's cluster looked up again by name, its new endpoint dialled).
#[tokio::test]
async fn a_reload_during_the_first_bytes_wait_is_served_by_the_new_generation() {
    let (old, old_count) = counting_echo_server().await;
    let (new, new_count) = counting_echo_server().await;
    let port = free_port();
    let dir = support::with_fixtures("wasm32-wasip1", &["tcp-rewrite"]);
    let config = |endpoint: SocketAddr| {
        tcp_proxy("wait", port, "echo", endpoint)
            .filter(waits_for_first_bytes())
            .edit_listener("wait", |l| l.pipeline(&["wait"]))
            .toml()
    };
    let wasp = Wasp::start_in(dir, &config(old), &[]);
    let mut s = TcpStream::connect(loopback(port)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    wasp.rewrite_config(&config(new));
    let answer = {
        use std::io::{Read, Write};
        let mut a = std::net::TcpStream::connect(wasp.admin).expect("admin");
        a.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            a,
            "POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nx-wasp-admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("post");
        let mut out = String::new();
        let _ = a.read_to_string(&mut out);
        out
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s.write_all(b"after").await.expect("write");
    assert_eq!(read_n(&mut s, 11).await, b"[wasm]AFTER");
    assert_eq!(accepted(&old_count), 0);
    assert_eq!(accepted(&new_count), 1);
}

/// The `tcp-rewrite` fixture as `wait`: it pauses in
/// `proxy_on_new_connection` until the client's first bytes.
fn waits_for_first_bytes() -> Filter {
    Filter::new("wait", "tcp-rewrite.wasm").config(r#""wait""#)
}
