//! Traffic capture with `wasp iptables`, in network namespaces this test
//! creates (never the host's own tables): an app process under another UID,
//! with no proxy settings, calls a service address with plain `curl` and
//! Python `urllib`; the kernel redirects the connection to wasp's outbound
//! listener, wasp (running as its own UID, so its upstream connection is
//! not captured again) routes it by `Host`, and the upstream sees wasp's
//! `via` and `x-forwarded-for`. `--cleanup` leaves the tables as they were.
//!
//! Needs root, `ip netns` and the iptables package (scripts/test.sh
//! installs it); where the kernel refuses namespaces, the tests say so and
//! skip.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::config::{Cluster, Config, Listener, Route};
use support::netns::{pod, pod_and_service, PYTHON};
use support::{loopback, metric_value, TempDir, WASP};

const PROXY_UID: &str = "1337";
const APP_UID: &str = "65534";

/// An upstream (Python's http.server, in the namespace) that answers each
/// request with one line per header it received, and prints a line per
/// request on stdout.
const UPSTREAM: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items()).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print("request", self.path, flush=True)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"#;

#[test]
fn outbound_capture_sends_an_unmodified_apps_calls_through_wasp() {
    let Some(mut ns) = pod() else { return };
    let before = ns.rules();

    let dir = TempDir::new("capture");
    let config = Config::new()
        .listener(
            Listener::http_on("outbound", "0.0.0.0:15001")
                .route(
                    Route::to("reviews")
                        .named("reviews")
                        .matching(r#"host = "reviews""#),
                )
                .route(
                    Route::to("reviews")
                        .named("by-address")
                        .matching(r#"host = "10.77.0.2""#),
                ),
        )
        .cluster(Cluster::new("reviews", [loopback(18080)]));

    ns.start_python(UPSTREAM, &["18080"]);
    ns.start_wasp(Some(PROXY_UID), &dir, &config.toml());

    let installed = ns.ok(&[WASP, "iptables", "--proxy-uid", PROXY_UID, "--ipv6", "auto"]);
    drop(installed);
    // Running it twice leaves one copy of each rule.
    let once = ns.rules();
    ns.ok(&[WASP, "iptables", "--proxy-uid", PROXY_UID, "--ipv6", "auto"]);
    assert_eq!(once, ns.rules(), "a second run changed the rules");
    assert!(once.contains("-A OUTPUT -p tcp -j WASP_OUTPUT"), "{once}");

    // curl, as the app's user, with no proxy settings: the kernel sends the
    // connection to wasp, which routes it by Host.
    let out = ns
        .as_uid(
            Some(APP_UID),
            &[
                "curl",
                "-s",
                "-m",
                "5",
                "--noproxy",
                "*",
                "-H",
                "Host: reviews",
                "http://10.77.0.2:8080/from-curl",
            ],
        )
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .expect("curl");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {seen}");
    assert!(
        seen.contains("via: 1.1 wasp"),
        "upstream did not see wasp's via:\n{seen}"
    );
    assert!(
        seen.contains("x-forwarded-for: "),
        "no x-forwarded-for:\n{seen}"
    );
    // Exactly one hop: wasp's own upstream connection was not captured again.
    assert_eq!(seen.matches("via:").count(), 1, "{seen}");

    // Python's urllib, likewise unaware of any proxy, by the service address.
    let py = "import urllib.request as u; print(u.build_opener(u.ProxyHandler({})).open('http://10.77.0.2:8080/from-python', timeout=5).read().decode())";
    let out = ns
        .as_uid(Some(APP_UID), &[PYTHON, "-c", py])
        .output()
        .expect("python");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && seen.contains("via: 1.1 wasp"),
        "urllib call not proxied: {seen}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let metrics = ns.admin_get("/metrics", Duration::from_secs(5));
    for route in ["route=\"reviews\"", "route=\"by-address\""] {
        let served = metric_value(
            &metrics,
            "wasp_requests_total",
            &["listener=\"outbound\"", route, "code_class=\"2xx\""],
        );
        assert_eq!(served, Some(1.0), "wasp's count for {route}:\n{metrics}");
    }

    ns.ok(&[WASP, "iptables", "--cleanup", "--ipv6", "auto"]);
    assert_eq!(before, ns.rules(), "--cleanup did not restore the tables");
    // And with the rules gone, the same call no longer reaches anything.
    let out = ns
        .as_uid(
            Some(APP_UID),
            &["curl", "-s", "-m", "2", "http://10.77.0.2:8080/"],
        )
        .output()
        .expect("curl");
    assert!(!out.status.success(), "still captured after --cleanup");
}

#[test]
fn dry_run_prints_the_rules_without_touching_the_tables() {
    let Some(ns) = pod() else { return };
    let before = ns.rules();
    let text = ns.ok(&[
        WASP,
        "iptables",
        "--dry-run",
        "--exclude-inbound-ports",
        "15021,9901",
        "--exclude-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
    ]);
    for line in [
        "-A WASP_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A WASP_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A WASP_OUTPUT -d 10.0.0.0/8 -j RETURN",
        "-A WASP_OUTPUT -d fd00::/8 -j RETURN",
        "-A PREROUTING -p tcp -j WASP_INBOUND",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    assert_eq!(before, ns.rules(), "--dry-run changed the tables");
    let bad = ns.output(&[
        WASP,
        "iptables",
        "--dry-run",
        "--exclude-outbound-cidrs",
        "10.0.0.0/40",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("prefix"));
}

/// Speaks first (`220 banner`), then answers the first chunk it reads
/// with its size and first byte.
const BANNER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"220 %s\n" % (sys.argv[3] if len(sys.argv) > 3 else "banner").encode())
    data = c.recv(65536)
    c.sendall(b"got %d bytes starting %02x\n" % (len(data), data[0] if data else 0))
    c.close()
"#;

/// The app's banner client: prints the banner, how long it took, and the answer.
const BANNER_CLIENT: &str = r#"
import socket, time
t = time.time()
c = socket.create_connection(("10.77.0.2", 2525), timeout=5)
banner = c.recv(100).decode().strip()
waited = time.time() - t
c.sendall(b"hi\n")
print(banner, "|", c.recv(100).decode().strip(), "|", "%.3f" % waited)
"#;

/// The app opening TLS: a real ClientHello for `argv[1]` (Python's ssl),
/// sent raw, so the test sees what reaches the server.
const TLS_CLIENT: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context()
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inc, out, server_hostname=sys.argv[1])
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
c = socket.create_connection(("10.77.0.2", 8443), timeout=5)
c.sendall(hello)
data = b""
while data.count(b"\n") < 2:
    more = c.recv(100)
    if not more:
        break
    data += more
print(len(hello), "|", " / ".join(data.decode().strip().split("\n")))
"#;

#[test]
fn capture_listeners_detect_http_and_pass_everything_else_through() {
    let Some((mut ns, mut svc)) = pod_and_service() else {
        return;
    };
    let before = ns.rules();
    let dir = TempDir::new("capture-l4");
    let config = Config::new()
        .listener(
            Listener::http_on("outbound", "0.0.0.0:15001")
                .with(r#"capture = "outbound""#)
                .with("opaque_ports = [2525]")
                .limits(r#"detect_timeout = "3s""#)
                .route(
                    Route::to("reviews")
                        .named("reviews")
                        .matching(r#"host = "reviews""#),
                )
                // TLS the app opens, routed by its server name (never terminated).
                .route(Route::to("tls").named("tls").matching(r#"sni = "tls.svc""#)),
        )
        .listener(Listener::http_on("inbound", "0.0.0.0:15006").with(r#"capture = "inbound""#))
        .cluster(Cluster::new("reviews", [loopback(18080)]))
        // Its `tls` is for HTTP routed here; the app's own TLS passed
        // through at L4 is never wrapped in it.
        .cluster(Cluster::new("tls", [loopback(18443)]).tls(r#"sni = "tls.svc""#));

    // In the pod: the routed upstream and the app's own server (inbound).
    ns.start_python(UPSTREAM, &["18080"]);
    ns.start_python(BANNER, &["127.0.0.1", "18443", "routed-tls"]);
    ns.start_python(UPSTREAM, &["9000", "0.0.0.0"]);

    // In the service namespace: what the app calls directly.
    svc.start_python(UPSTREAM, &["8080", "10.77.0.2"]);
    for port in ["2525", "8443"] {
        svc.start_python(BANNER, &["10.77.0.2", port]);
    }
    let mut redis = svc.cmd(&[
        "redis-server",
        "--bind",
        "10.77.0.2",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]);
    redis.stdout(Stdio::null()).stderr(Stdio::null());
    svc.spawn(redis);

    let log = ns.start_wasp(Some(PROXY_UID), &dir, &config.toml());
    ns.ok(&[WASP, "iptables", "--proxy-uid", PROXY_UID, "--ipv6", "off"]);
    let app_run = |argv: &[&str]| {
        let out = ns
            .as_uid(Some(APP_UID), argv)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .expect("app command");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };

    // A client that ends its side inside an undecided prefix (the start of
    // a ClientHello, of a request line) is decided at its end: the one
    // worker is not left looking at the same byte, and serves every step
    // below.
    for (port, prefix) in [("8443", "\\x16"), ("8080", "G")] {
        let py = format!(
            "import socket\ns = socket.create_connection(('10.77.0.2', {port}), timeout=5)\ns.sendall(b'{prefix}')\ns.shutdown(socket.SHUT_WR)\ntry:\n    while s.recv(100):\n        pass\nexcept ConnectionResetError:\n    pass\nprint('closed')"
        );
        let (ok, seen) = app_run(&[PYTHON, "-c", &py]);
        assert!(ok && seen.contains("closed"), "{prefix} then FIN: {seen}");
    }

    // HTTP that a route claims, by Host.
    let (ok, seen) = app_run(&[
        "curl",
        "-s",
        "-m",
        "5",
        "-H",
        "Host: reviews",
        "http://10.77.0.2:8080/routed",
    ]);
    assert!(ok && seen.contains("via: 1.1 wasp"), "routed: {seen}");
    // HTTP/2 with prior knowledge: detected by its preface, routed the same.
    let (ok, seen) = app_run(&[
        "curl",
        "-s",
        "-m",
        "5",
        "--http2-prior-knowledge",
        "-H",
        "Host: reviews",
        "http://10.77.0.2:8080/routed-h2",
    ]);
    assert!(ok && seen.contains("via: 2.0 wasp"), "routed h2: {seen}");
    // HTTP no route claims: to the original destination, through wasp.
    let (ok, seen) = app_run(&["curl", "-s", "-m", "5", "http://10.77.0.2:8080/unrouted"]);
    assert!(ok, "unrouted: {seen}");
    assert!(
        seen.contains("via: 1.1 wasp"),
        "unrouted not through wasp: {seen}"
    );
    assert!(seen.contains("host: 10.77.0.2:8080"), "{seen}");

    // Redis: opaque TCP (detected at its first bytes) to where it was going.
    let (_, pong) = app_run(&["redis-cli", "-h", "10.77.0.2", "PING"]);
    assert_eq!(
        pong.trim(),
        "PONG",
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (_, set) = app_run(&["redis-cli", "-h", "10.77.0.2", "SET", "k", "captured"]);
    assert_eq!(set.trim(), "OK");
    let (_, got) = app_run(&["redis-cli", "-h", "10.77.0.2", "GET", "k"]);
    assert_eq!(got.trim(), "captured");

    // Server speaks first on an opaque port: no detection wait (3 s here).
    let (ok, seen) = app_run(&[PYTHON, "-c", BANNER_CLIENT]);
    assert!(ok, "banner client: {seen}");
    let parts: Vec<&str> = seen.trim().split(" | ").collect();
    assert_eq!(parts.first(), Some(&"220 banner"), "{seen}");
    assert_eq!(parts.get(1), Some(&"got 3 bytes starting 68"), "{seen}");
    let waited: f64 = parts.get(2).and_then(|w| w.parse().ok()).unwrap_or(99.0);
    assert!(waited < 1.5, "the banner waited for detection: {waited}s");

    // TLS the app opens is never terminated: a TCP route claims it by its
    // server name, else it goes to its original destination; either server
    // gets the ClientHello, byte count and all; wasp logs the SNI.
    for (sni, server) in [("tls.svc", "routed-tls"), ("other.svc", "banner")] {
        let (ok, seen) = app_run(&[PYTHON, "-c", TLS_CLIENT, sni]);
        assert!(ok, "tls client: {seen}");
        let (len, answer) = seen.trim().split_once(" | ").unwrap_or(("", ""));
        assert_eq!(
            answer,
            format!("220 {server} / got {len} bytes starting 16"),
            "{sni}: {seen}"
        );
    }

    // Inbound: the other namespace calls the pod; wasp's inbound listener
    // takes it and hands it to the app on the original port.
    let out = svc.output(&["curl", "-s", "-m", "5", "http://10.77.0.1:9000/inbound"]);
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && seen.contains("via: 1.1 wasp"),
        "inbound not through wasp: {seen}"
    );

    let metrics = ns.admin_get("/metrics", Duration::from_secs(5));
    let tcp = metric_value(
        &metrics,
        "wasp_tcp_connections_total",
        &["listener=\"outbound\"", "cluster=\"passthrough\""],
    );
    assert_eq!(tcp, Some(5.0), "3 redis, banner, other.svc:\n{metrics}");
    let by_sni = metric_value(
        &metrics,
        "wasp_tcp_connections_total",
        &["listener=\"outbound\"", "route=\"tls\"", "cluster=\"tls\""],
    );
    assert_eq!(by_sni, Some(1.0), "{metrics}");
    let inbound = metric_value(
        &metrics,
        "wasp_requests_total",
        &[
            "listener=\"inbound\"",
            "cluster=\"passthrough\"",
            "code_class=\"2xx\"",
        ],
    );
    assert_eq!(inbound, Some(1.0), "{metrics}");
    let unrouted = metric_value(
        &metrics,
        "wasp_requests_total",
        &[
            "listener=\"outbound\"",
            "cluster=\"passthrough\"",
            "code_class=\"2xx\"",
        ],
    );
    assert_eq!(unrouted, Some(1.0), "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("tls.svc"),
        "no SNI in the access log:\n{text}"
    );

    ns.ok(&[WASP, "iptables", "--cleanup", "--ipv6", "off"]);
    assert_eq!(before, ns.rules(), "--cleanup did not restore the tables");
}

/// A plain `protocol = "tcp"` listener behind the host's own REDIRECT
/// (443 -> 8443) is not a capture listener: a connection no route claims is
/// closed and counted, never passed to its original destination (which
/// the same rule would send straight back into wasp, over and over).
#[test]
fn a_tcp_listener_behind_a_redirect_does_not_pass_through() {
    let Some(mut ns) = pod() else { return };
    let dir = TempDir::new("redirect");
    let config = Config::new()
        .listener(
            Listener::tcp_on("tcp", "0.0.0.0:8443")
                .route(Route::to("elsewhere").matching("port = 9999")),
        )
        .cluster(Cluster::new("elsewhere", [loopback(9)]));
    ns.start_wasp(None, &dir, &config.toml());
    ns.ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.77.0.1",
        "--dport",
        "443",
        "-j",
        "REDIRECT",
        "--to-ports",
        "8443",
    ]);
    // Closed either way: EOF, or a reset when the close finds the byte
    // sent unread (which of the two depends on timing).
    let py = "import socket\ns = socket.create_connection(('10.77.0.1', 443), timeout=5)\ns.sendall(b'x')\ntry:\n    print(len(s.recv(100)))\nexcept ConnectionResetError:\n    print(0)";
    let out = ns.output(&[PYTHON, "-c", py]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "not closed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = ns.admin_get("/metrics", Duration::from_secs(5));
    let refused = metric_value(
        &metrics,
        "wasp_proxy_errors_total",
        &["listener=\"tcp\"", "code=\"no_route\""],
    );
    assert_eq!(refused, Some(1.0), "{metrics}");
}
