//! Shared harness for the end-to-end tests: the real `wasp` binary on
//! loopback, real upstream servers (hyper), real clients.
//!
//! Everything binds 127.0.0.1 only, every wait is bounded, and every child
//! process is killed when its handle drops.
//!
//! By concern: `config` builds a test's `wasp.toml` (listeners, routes,
//! filters, clusters); `upstream` the HTTP upstreams; `l4` raw TCP
//! upstreams, reads and Redis; `netns` network namespaces for the capture
//! tests; `grpc` the Python gRPC server and the callout proxy around it.
//! (`otlp.rs`, a trace collector, is included by tests/tracing.rs alone.)

#![allow(dead_code)]

pub mod config;
pub mod grpc;
pub mod l4;
pub mod netns;
pub mod upstream;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const WASP: &str = env!("CARGO_BIN_EXE_wasp");

/// A free loopback port (bound, then released for the test to use).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 by default): a port
    // the kernel hands out for `:0` can be taken again as the local port of
    // another test's outgoing connection before wasp binds it, which made
    // start-ups fail now and then with "address in use". Each test process
    // starts at its own offset and never hands a port out twice.
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + n % SPAN).expect("port range fits u16");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wasp-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `wasp run` process.
pub struct Wasp {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: TempDir,
    pub log: PathBuf,
}

impl Wasp {
    /// Writes `config` (with `{admin}` replaced by a free admin address) and
    /// starts the proxy, waiting until `/ready` answers 200.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(TempDir::new("wasp"), config, env)
    }

    /// Starts in a prepared directory (e.g. with a `filters.d` already filled).
    pub fn start_in(dir: TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = format!("[admin]\nbind = \"{admin}\"\n\n{config}");
        let path = dir.path().join("wasp.toml");
        std::fs::write(&path, text).expect("write config");
        let log = dir.path().join("wasp.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(WASP);
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn wasp");
        let mut wasp = Self {
            child,
            admin,
            dir,
            log,
        };
        wasp.wait_ready(Duration::from_secs(20));
        wasp
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wasp exited early with {status}; log:\n{}", self.log_text());
            }
            if let Some((200, _)) = http_get_blocking(self.admin, "/ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("wasp not ready within {limit:?}; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get_blocking(self.admin, path).unwrap_or((0, String::new()))
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    /// Sends a signal to the proxy.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Wasp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `scripts/build-wasm.sh` puts the compatibility fixtures.
pub fn fixture(target: &str, name: &str) -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/wasm-fixtures"
    ))
    .join(target)
    .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-wasm.sh first",
        p.display()
    );
    p
}

/// Where `scripts/build-wasm.sh` puts the built-in filters (`filters/*`).
pub fn builtin_filter(name: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/filters"))
        .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-wasm.sh first",
        p.display()
    );
    p
}

/// The AssemblyScript example filter (examples/filters/assemblyscript),
/// built from its npm packages by `scripts/build-assemblyscript.sh` (which
/// `scripts/build-wasm.sh` runs); built here when missing or older than its
/// sources. `None` only when the build was opted out of
/// (`WASP_BUILD_ASSEMBLYSCRIPT=0`): the caller returns early and the skip is
/// written to the terminal, not to the captured output. A failed build
/// (no node, node older than 20, no npm) fails the test.
pub fn assemblyscript_filter(test: &str) -> Option<PathBuf> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if std::env::var("WASP_BUILD_ASSEMBLYSCRIPT").as_deref() == Ok("0") {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: WASP_BUILD_ASSEMBLYSCRIPT=0 (the AssemblyScript filter is not built)"
        );
        return None;
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let p = root.join("target/wasm-fixtures/assemblyscript/as_filter.wasm");
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let src = root.join("examples/filters/assemblyscript");
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
    let stale = match built {
        None => true,
        Some(at) => {
            newest(&src.join("assembly")).is_some_and(|t| t > at)
                || ["asconfig.json", "package.json", "package-lock.json"]
                    .iter()
                    .filter_map(|f| {
                        std::fs::metadata(src.join(f))
                            .and_then(|m| m.modified())
                            .ok()
                    })
                    .any(|t| t > at)
        }
    };
    if stale {
        let out = Command::new(root.join("scripts/build-assemblyscript.sh"))
            .output()
            .expect("run scripts/build-assemblyscript.sh");
        assert!(
            out.status.success(),
            "building the AssemblyScript filter failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(p.exists(), "{} is missing after the build", p.display());
    Some(p)
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut latest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        latest = latest.max(t);
    }
    latest
}

/// A temp dir with `filters.d/` holding the named built-in filters.
pub fn with_builtin_filters(names: &[&str]) -> TempDir {
    let dir = TempDir::new("builtin");
    let fd = dir.path().join("filters.d");
    std::fs::create_dir_all(&fd).unwrap();
    for n in names {
        std::fs::copy(builtin_filter(n), fd.join(format!("{n}.wasm"))).unwrap();
    }
    dir
}

/// Runs the `wasp` CLI with `args` and returns its output, failing the test
/// (with the command's stdout and stderr) unless it exited 0.
pub fn wasp_ok<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    let out = Command::new(WASP).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A temp dir with `filters.d/` holding the named fixtures of `target`.
pub fn with_fixtures(target: &str, names: &[&str]) -> TempDir {
    let named: Vec<(&str, &str)> = names.iter().map(|n| (*n, *n)).collect();
    with_fixtures_as(target, &named)
}

/// A temp dir with `filters.d/` holding fixtures of `target` under other
/// names: each `(fixture, file)` is copied to `filters.d/{file}.wasm`.
pub fn with_fixtures_as(target: &str, named: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new("filters");
    let fd = dir.path().join("filters.d");
    std::fs::create_dir_all(&fd).unwrap();
    for (fixture_name, file) in named {
        std::fs::copy(
            fixture(target, fixture_name),
            fd.join(format!("{file}.wasm")),
        )
        .unwrap();
    }
    dir
}

/// A minimal blocking HTTP/1.1 GET for the admin API (no client crate needed
/// outside a runtime).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.get(9..12)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Sends raw bytes and returns everything the server answers until it
/// closes (or `limit` passes).
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn h1_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(client: &TestClient, req: http::Request<Full<Bytes>>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET `http://{addr}{path}` with a Host header.
pub async fn get(client: &TestClient, addr: SocketAddr, host: &str, path: &str) -> Answer {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(client, req).await
}

/// Reads one counter or gauge value from a Prometheus exposition; the
/// series must contain every `labels` fragment.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One worker, one listener `inbound` on `port` whose only route goes to
/// the cluster `app` at `app`; `listener_extra` and `cluster_extra` are
/// TOML lines added to the listener's and the cluster's tables.
pub fn one_route_config(
    port: u16,
    app: SocketAddr,
    listener_extra: &str,
    cluster_extra: &str,
) -> String {
    format!(
        r#"
[proxy]
workers = 1

[[listeners]]
name = "inbound"
bind = "127.0.0.1:{port}"
{listener_extra}
  [[listeners.routes]]
  cluster = "app"

[clusters.app]
endpoints = ["{app}"]
{cluster_extra}
"#
    )
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Opens a WebSocket to the test upstream's `/ws` echo through `addr`;
/// returns the stream right after the 101's head.
pub async fn websocket(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s
}

/// Sends `msg` on a tunnel and expects the upstream's echo of it.
pub async fn echo(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await {
        Err(_) => Err("no echo within 5 s".into()),
        // What came instead (a 408 written into the tunnel, say).
        Ok(Err(e)) => Err(format!(
            "read: {e}; got {:?}",
            String::from_utf8_lossy(&back)
        )),
        Ok(Ok(_)) if back != msg => Err(format!("got {:?}", String::from_utf8_lossy(&back))),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `POST /reload` on the admin API; the raw answer (head and body), read
/// until the server closes or `read_timeout` passes.
pub fn post_reload(admin: SocketAddr, read_timeout: Duration) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    write!(
        s,
        "POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nx-wasp-admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
