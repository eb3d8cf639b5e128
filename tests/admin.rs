//! Config input and the admin API against the real binary: a malformed
//! duration or size in any key is an error with its position (never a
//! panic), also through `POST /reload`; the admin API answers probes to
//! anyone, and guarded endpoints only to loopback (or to the token), never
//! to a browser-shaped request or a foreign `Host`.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::{free_port, h1_client, send, TempDir, Wasp, WASP};

/// A response to a raw admin request.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn error_code(&self) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("x-wasp-error: "))
            .map(str::trim)
    }
}

/// One HTTP/1.1 request with exactly these headers (`Host` included, so a
/// test can send a foreign one); `None` when the connection failed.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(text.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some(Reply {
        status: head.get(9..12)?.parse().ok()?,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

fn must(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(addr, method, path, headers)
        .unwrap_or_else(|| panic!("{method} {path} to {addr}: no answer"))
}

/// This machine's own non-loopback IPv4 address, if it has one: the source
/// address a UDP socket would use (nothing is sent), else `ip -4 addr`.
fn own_address() -> Option<IpAddr> {
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    routed.or_else(|| {
        let out = Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let addr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            let ip: IpAddr = addr.split('/').next()?.parse().ok()?;
            (!ip.is_loopback()).then_some(ip)
        })
    })
}

/// Starts `wasp run` on a config written as is (its own `[admin]` table),
/// waiting until `ready_at` answers `/ready`.
fn start_raw(text: &str, ready_at: SocketAddr, env: &[(&str, &str)]) -> Wasp {
    let dir = TempDir::new("admin");
    let path = dir.path().join("wasp.toml");
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("wasp.log");
    let mut cmd = Command::new(WASP);
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut wasp = Wasp {
        child: cmd.spawn().unwrap(),
        admin: ready_at,
        dir,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = wasp.child.try_wait() {
            panic!("wasp exited early with {status}; log:\n{}", wasp.log_text());
        }
        if request(ready_at, "GET", "/ready", &[]).is_some_and(|r| r.status == 200) {
            return wasp;
        }
        assert!(
            Instant::now() < deadline,
            "not ready; log:\n{}",
            wasp.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(wasp: &mut Wasp) -> bool {
    matches!(wasp.child.try_wait(), Ok(None))
}

// === Config input ===

/// The reported issue: an overflowing duration reloaded through the admin
/// API used to abort the process. Now: 400 naming line and column, and the
/// previous config keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_duration_on_reload_is_a_400_with_its_position_and_the_proxy_keeps_serving() {
    let app = TestUpstream::start("app").await;
    let port = free_port();
    let config = |connect_timeout: &str| {
        format!(
            "[proxy]\nworkers = 1\n\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:{port}\"\n  [[listeners.routes]]\n  cluster = \"app\"\n\n[clusters.app]\nendpoints = [\"{}\"]\nconnect_timeout = \"{connect_timeout}\"\n",
            app.addr
        )
    };
    let mut wasp = Wasp::start(&config("1s"));
    let url = format!("http://127.0.0.1:{port}/");
    let get = || http::Request::get(&url).body(Default::default()).unwrap();
    assert_eq!(send(&h1_client(), get()).await.status, 200);

    let bad = format!(
        "[admin]\nbind = \"{}\"\n\n{}",
        wasp.admin,
        config("99999999999999999999s")
    );
    let line = bad
        .lines()
        .position(|l| l.starts_with("connect_timeout"))
        .unwrap()
        + 1;
    let column = "connect_timeout = ".len() + 1;
    std::fs::write(wasp.dir.path().join("wasp.toml"), &bad).unwrap();
    let admin = wasp.admin;
    let reply = tokio::task::spawn_blocking(move || {
        must(
            admin,
            "POST",
            "/reload",
            &[("Host", "127.0.0.1"), ("x-wasp-admin", "1")],
        )
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.error_code(), Some("reload_rejected"), "{reply:?}");
    assert!(
        reply.body.contains(&format!("wasp.toml:{line}:{column}"))
            && reply.body.contains("too long"),
        "the answer names the key's line and column: {}",
        reply.body
    );
    assert!(
        alive(&mut wasp),
        "the process lives; log:\n{}",
        wasp.log_text()
    );
    assert_eq!(
        send(&h1_client(), get()).await.status,
        200,
        "the old config serves"
    );
    assert_eq!(wasp.admin_get("/ready").0, 200);
    let (_, status) = wasp.admin_get("/reload");
    assert!(status.contains("too long"), "{status}");
}

/// Every duration and size key, as a `{name}` hole in one config that is
/// otherwise valid; each malformed value must make `wasp check` exit 2
/// with the key's position, never panic.
const EVERY_UNIT_KEY: &str = r#"[proxy]
workers = 1
drain_timeout = {drain_timeout}
drain_delay = {drain_delay}

[filters.f]
module = "f.wasm"
limits = { cpu = {cpu}, memory = {memory} }

[[listeners]]
name = "inbound"
bind = "127.0.0.1:15006"
pipeline = ["f"]
  [listeners.limits]
  max_header_bytes = {max_header_bytes}
  max_body_bytes = {max_body_bytes}
  header_timeout = {header_timeout}
  idle_timeout = {idle_timeout}
  [[listeners.routes]]
  cluster = "a"
  timeout = {route_timeout}
  retry = { on = ["5xx"], per_try_timeout = {per_try_timeout}, backoff = {backoff} }

[clusters.a]
endpoints = ["127.0.0.1:9"]
decay = {decay}
connect_timeout = {connect_timeout}
timeout = {cluster_timeout}
pool_idle_timeout = {pool_idle_timeout}
health = { path = "/h", interval = {health_interval}, timeout = {health_timeout} }
outlier = { base_ejection = {base_ejection} }

[clusters.b]
discovery = { dns = "localhost", port = 80, refresh = {refresh}, min_refresh = {min_refresh}, max_refresh = {max_refresh} }
"#;

const DURATION_KEYS: &[&str] = &[
    "drain_timeout",
    "drain_delay",
    "cpu",
    "header_timeout",
    "idle_timeout",
    "route_timeout",
    "per_try_timeout",
    "backoff",
    "decay",
    "connect_timeout",
    "cluster_timeout",
    "pool_idle_timeout",
    "health_interval",
    "health_timeout",
    "base_ejection",
    "refresh",
    "min_refresh",
    "max_refresh",
];
const SIZE_KEYS: &[&str] = &["memory", "max_header_bytes", "max_body_bytes"];

const BAD_DURATIONS: &[&str] = &[
    r#""99999999999999999999s""#,
    r#""8761h""#,
    r#""-1s""#,
    r#""1e400s""#,
    r#""NaNs""#,
    r#""5""#,
    r#""""#,
    "5",
    "-5",
    "nan",
    "inf",
];
const BAD_SIZES: &[&str] = &[
    r#""99999999999999999999""#,
    r#""18446744073709551615GiB""#,
    r#""2048GiB""#,
    r#""-1""#,
    r#""1.5MiB""#,
    r#""5 parsecs""#,
    "-1",
    "9223372036854775807",
    "99999999999999999999",
    "nan",
    "1.5",
];

fn render(hole: &str, value: &str) -> String {
    let mut text = EVERY_UNIT_KEY.to_string();
    for key in DURATION_KEYS {
        let v = if *key == hole { value } else { "\"2s\"" };
        text = text.replace(&format!("{{{key}}}"), v);
    }
    for key in SIZE_KEYS {
        let v = if *key == hole { value } else { "\"64KiB\"" };
        text = text.replace(&format!("{{{key}}}"), v);
    }
    text
}

fn check(dir: &Path, text: &str) -> std::process::Output {
    let path = dir.join("wasp.toml");
    std::fs::write(&path, text).unwrap();
    Command::new(WASP)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn a_malformed_value_in_any_duration_or_size_key_is_an_error_with_its_position() {
    let dir = TempDir::new("units");
    let good = check(dir.path(), &render("", ""));
    assert!(
        good.status.success(),
        "the template itself is valid: {}",
        String::from_utf8_lossy(&good.stderr)
    );
    let cases = DURATION_KEYS
        .iter()
        .flat_map(|k| BAD_DURATIONS.iter().map(move |v| (*k, *v)))
        .chain(
            SIZE_KEYS
                .iter()
                .flat_map(|k| BAD_SIZES.iter().map(move |v| (*k, *v))),
        );
    let mut checked = 0;
    for (key, value) in cases {
        let text = render(key, value);
        let marker = EVERY_UNIT_KEY
            .lines()
            .position(|l| l.contains(&format!("{{{key}}}")))
            .unwrap();
        let out = check(dir.path(), &text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{key} = {value}: a config error (exit 2), not a crash:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("wasp.toml:{}:", marker + 1)),
            "{key} = {value}: the error names line {}:\n{stderr}",
            marker + 1
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        DURATION_KEYS.len() * BAD_DURATIONS.len() + SIZE_KEYS.len() * BAD_SIZES.len()
    );
}

#[test]
fn counts_and_weights_that_make_no_sense_are_errors_not_clamps() {
    let dir = TempDir::new("counts");
    let base = |extra: &str, cluster: &str| {
        format!(
            "[proxy]\nworkers = 1\n{extra}\n[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:15006\"\n  [[listeners.routes]]\n  clusters = [{{ name = \"a\", weight = 4294967295 }}, {{ name = \"a\", weight = {cluster} }}]\n\n[clusters.a]\nendpoints = [\"127.0.0.1:9\"]\n"
        )
    };
    assert!(check(dir.path(), &base("", "0")).status.success());
    for (text, expect) in [
        (base("", "1"), "add up to more than"),
        (base("[admin]\ntoken = \"short\"\n", "0"), "at least 16"),
        (
            base("[admin]\nprobes = \"nonsense\"\n", "0"),
            "not an ip:port",
        ),
        (
            base("", "0").replace("workers = 1", "workers = 1000000"),
            "more than 1024",
        ),
        (
            base("", "0") + "outlier = { max_ejection_percent = 500 }\n",
            "max_ejection_percent = 500",
        ),
        (
            base("", "0").replace(
                "[[listeners.routes]]",
                "limits = { max_connections = 9223372036854775807 }\n  [[listeners.routes]]",
            ),
            "max_connections",
        ),
    ] {
        let out = check(dir.path(), &text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{stderr}");
        assert!(stderr.contains(expect), "{expect}: {stderr}");
    }
}

// === Admin API ===

/// A non-loopback peer reaches only the probes; a loopback one is refused
/// when the request is browser-shaped or names a foreign Host.
#[test]
fn without_a_token_guarded_endpoints_answer_only_loopback_and_only_non_simple_requests() {
    let Some(own) = own_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback IPv4 address to call from");
        return;
    };
    let port = free_port();
    let text = format!("[admin]\nbind = \"0.0.0.0:{port}\"\n\n[proxy]\nworkers = 1\n");
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = SocketAddr::new(own, port);
    let mut wasp = start_raw(&text, local, &[]);
    let host = format!("{own}:{port}");
    let remote_host = [("Host", host.as_str()), ("x-wasp-admin", "1")];

    // From the machine's own address: probes are open, the rest refused.
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(
            must(remote, "GET", path, &[("Host", &host)]).status,
            200,
            "{path}"
        );
    }
    for (method, path) in [
        ("POST", "/shutdown"),
        ("POST", "/reload"),
        ("PUT", "/logging?level=trace"),
        ("GET", "/config"),
        ("GET", "/filters"),
        ("GET", "/clusters"),
    ] {
        let r = must(remote, method, path, &remote_host);
        assert_eq!(
            (r.status, r.error_code()),
            (403, Some("admin_forbidden")),
            "{method} {path}: {r:?}"
        );
        assert!(r.body.contains("loopback"), "{}", r.body);
    }
    assert!(
        alive(&mut wasp),
        "a refused /shutdown leaves the process running"
    );

    // Loopback, but shaped like a cross-origin form post from a browser.
    let r = must(
        local,
        "POST",
        "/shutdown",
        &[("Host", "127.0.0.1"), ("Content-Type", "text/plain")],
    );
    assert_eq!(
        (r.status, r.error_code()),
        (403, Some("admin_forbidden")),
        "{r:?}"
    );
    assert!(
        r.body.contains("x-wasp-admin"),
        "the refusal says what to send: {}",
        r.body
    );
    // Loopback, but a DNS-rebinding name.
    for (method, path) in [("GET", "/config"), ("POST", "/shutdown")] {
        let r = must(
            local,
            method,
            path,
            &[("Host", "evil.example"), ("x-wasp-admin", "1")],
        );
        assert_eq!(
            (r.status, r.error_code()),
            (403, Some("admin_forbidden")),
            "{r:?}"
        );
        assert!(r.body.contains("evil.example"), "{}", r.body);
    }
    assert!(alive(&mut wasp));

    // Loopback and well-formed: served.
    let ok = [("Host", "localhost"), ("x-wasp-admin", "1")];
    assert_eq!(
        must(local, "GET", "/config", &[("Host", "127.0.0.1")]).status,
        200
    );
    assert_eq!(must(local, "PUT", "/logging?level=debug", &ok).status, 200);

    // `wasp check` says that this admin address is exposed with no token.
    let out = Command::new(WASP)
        .args(["check", "--config"])
        .arg(wasp.dir.path().join("wasp.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("warning") && stderr.contains("no [admin] token"),
        "{stderr}"
    );

    let r = must(local, "POST", "/shutdown", &ok);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(wasp.wait_exit(Duration::from_secs(15)), Some(0));
}

/// With a token, every caller needs it (loopback too); with it, a remote
/// caller may shut down. The probes address serves only the probes.
#[test]
fn with_a_token_every_caller_needs_it_and_the_probes_address_serves_only_probes() {
    let Some(own) = own_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback IPv4 address to call from");
        return;
    };
    let token = "s3cret-token-0123456789abcdef";
    let (port, probes_port) = (free_port(), free_port());
    let text = format!(
        "[admin]\nbind = \"0.0.0.0:{port}\"\nprobes = \"0.0.0.0:{probes_port}\"\ntoken = \"${{WASP_ADMIN_TOKEN}}\"\n\n[proxy]\nworkers = 1\n"
    );
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = SocketAddr::new(own, port);
    let probes = SocketAddr::new(own, probes_port);
    let mut wasp = start_raw(&text, probes, &[("WASP_ADMIN_TOKEN", token)]);
    let host = format!("{own}:{port}");
    let bearer = format!("Bearer {token}");

    // The probes address: the three open endpoints, nothing else.
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(must(probes, "GET", path, &[]).status, 200, "{path}");
    }
    for (method, path) in [
        ("GET", "/config"),
        ("POST", "/shutdown"),
        ("POST", "/reload"),
    ] {
        let r = must(
            probes,
            method,
            path,
            &[("Authorization", &bearer), ("x-wasp-admin", "1")],
        );
        assert_eq!(
            r.status, 404,
            "{method} {path} on the probes address: {r:?}"
        );
        assert!(r.body.contains("probes"), "{}", r.body);
    }

    // No token, a wrong one, or loopback without one: refused.
    for (addr, auth) in [
        (remote, None),
        (remote, Some("Bearer s3cret-token-0123456789abcdeX")),
        (remote, Some("Basic czNjcmV0")),
        (local, None),
    ] {
        let mut headers = vec![("Host", host.as_str()), ("x-wasp-admin", "1")];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = must(addr, "POST", "/shutdown", &headers);
        assert_eq!(
            (r.status, r.error_code()),
            (403, Some("admin_forbidden")),
            "{addr} {auth:?}: {r:?}"
        );
        assert!(r.body.contains("token"), "{}", r.body);
    }
    assert!(
        alive(&mut wasp),
        "refused shutdowns leave the process running"
    );
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(
            must(remote, "GET", path, &[("Host", &host)]).status,
            200,
            "{path}"
        );
    }

    // With the token: /config is served, and does not show the token.
    let authed = [
        ("Host", "wasp-admin.example:9901"),
        ("Authorization", bearer.as_str()),
    ];
    let r = must(remote, "GET", "/config", &authed);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.contains(token) && r.body.contains("<redacted>"),
        "{}",
        r.body
    );

    let r = must(remote, "POST", "/shutdown", &authed);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        wasp.wait_exit(Duration::from_secs(15)),
        Some(0),
        "drains and exits 0"
    );
}

/// More idle connections than the limit: the extra one is closed at once,
/// and the admin API answers again once they are gone.
#[test]
fn admin_connections_are_limited() {
    let port = free_port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let _wasp = start_raw(
        &format!("[admin]\nbind = \"{local}\"\n\n[proxy]\nworkers = 1\n"),
        local,
        &[],
    );
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(local).unwrap())
        .collect();
    // Give the control thread time to accept all of them.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(local).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = extra.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the connection over the limit is closed unanswered");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed at once, not timed out"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while request(local, "GET", "/live", &[]).map(|r| r.status) != Some(200) {
        assert!(Instant::now() < deadline, "the admin API answers again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One non-loopback peer holding many idle connections (any pod that can
/// reach a probes port) gets at most 8; loopback callers still get in.
#[test]
fn one_peer_cannot_take_every_admin_slot() {
    let Some(own) = own_address() else {
        eprintln!("SKIP: this machine has no non-loopback address");
        return;
    };
    let port = free_port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = SocketAddr::new(own, port);
    let _wasp = start_raw(
        &format!("[admin]\nbind = \"0.0.0.0:{port}\"\n\n[proxy]\nworkers = 1\n"),
        local,
        &[],
    );
    let held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(remote).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(remote).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut buf = [0u8; 64];
    assert_eq!(
        extra.read(&mut buf).unwrap_or(0),
        0,
        "the 9th from one peer is closed"
    );
    assert_eq!(
        must(local, "GET", "/live", &[("Host", "127.0.0.1")]).status,
        200
    );
    drop(held);
}

/// A request head that never completes is cut after the header timeout
/// (10 s), so a slow client cannot hold one of the few admin slots.
#[test]
fn a_stalled_admin_request_head_is_cut() {
    let port = free_port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let _wasp = start_raw(
        &format!("[admin]\nbind = \"{local}\"\n\n[proxy]\nworkers = 1\n"),
        local,
        &[],
    );
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(25),
        "closed after {waited:?}, expected about 10 s"
    );
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "never served"
    );
}

/// Out of file descriptors, accept fails with EMFILE until one is freed:
/// the admin loop must back off rather than spin the control thread, and
/// serve again once descriptors are back.
#[test]
fn accept_errors_back_off_instead_of_spinning() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    let port = free_port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let wasp = start_raw(
        &format!("[admin]\nbind = \"{local}\"\n\n[proxy]\nworkers = 1\n"),
        local,
        &[],
    );
    let pid = wasp.child.id().to_string();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let set_limit = |n: usize| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}:")])
            .status()
            .unwrap();
        assert!(status.success());
    };
    set_limit(open_fds);
    // Queued in the kernel's backlog; every accept now fails with EMFILE.
    let pending: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(local).unwrap()).collect();
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of stat(5).
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu() - before;
    // A spinning loop burns about 200 ticks (2 s of one core); backing
    // off, a handful (the machine may be busy, so the bound is loose).
    assert!(
        ticks < 50,
        "the control thread spent {ticks} ticks of CPU in 2 s while accept failed"
    );
    set_limit(1024);
    drop(pending);
    let deadline = Instant::now() + Duration::from_secs(5);
    while request(local, "GET", "/live", &[]).map(|r| r.status) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the admin API serves again once descriptors are back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
