//! The gRPC server the callout tests talk to: Python `grpcio` running
//! tests/grpc/server.py (installed by scripts/test.sh), which prints the
//! port it bound and a line per thing it saw.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::{Cluster, Config, Filter, Listener};
use super::upstream::TestUpstream;
use super::{loopback, with_fixtures, Wasp};

/// The Python gRPC server, its stdout lines collected as they come.
pub struct GrpcServer {
    child: Child,
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl GrpcServer {
    pub fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/grpc/server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs tests/grpc/server.py (pip install grpcio)");
        let stdout = child.stdout.take().expect("server stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("PORT ") {
                    let _ = tx.send(port.trim().parse::<u16>().ok());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .expect("the gRPC server printed its port (is grpcio installed?)");
        GrpcServer {
            child,
            addr: loopback(port),
            lines,
        }
    }

    /// Whether the server printed `line` so far.
    pub fn saw(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    /// Waits (bounded) until the server printed `line`.
    pub fn wait_for(&self, line: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.saw(line) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every gRPC callout test runs: the `app` upstream, the gRPC server
/// as cluster `auth` (HTTP/2), and wasp with the `grpc-call` fixture as
/// filter `grpc` on listener `inbound`, whose only route goes to `app`.
pub struct GrpcCalloutProxy {
    pub app: TestUpstream,
    pub server: GrpcServer,
    pub wasp: Wasp,
    /// The listener's address.
    pub proxy: SocketAddr,
}

impl GrpcCalloutProxy {
    /// Starts all three; `fixtures` (of wasm32-wasip1) go into
    /// `filters.d`, and `edit` changes the config above for the test.
    pub async fn start(fixtures: &[&str], edit: impl FnOnce(Config) -> Config) -> Self {
        let app = TestUpstream::start("app").await;
        let server = GrpcServer::start();
        let dir = with_fixtures("wasm32-wasip1", fixtures);
        let (app_addr, auth) = (app.addr, server.addr);
        let (wasp, proxy) = Wasp::start_on_free_port(dir, |port| {
            let config = Config::new()
                .filter(Filter::new("grpc", "grpc-call.wasm"))
                .listener(
                    Listener::http("inbound", port)
                        .pipeline(&["grpc"])
                        .to("app"),
                )
                .cluster(Cluster::new("app", [app_addr]))
                .cluster(Cluster::new("auth", [auth]).with(r#"protocol = "http2""#));
            edit(config).toml()
        });
        Self {
            app,
            server,
            wasp,
            proxy,
        }
    }

    /// The app upstream, the gRPC server, wasp and its listener's address.
    pub fn parts(&self) -> (&TestUpstream, &GrpcServer, &Wasp, SocketAddr) {
        (&self.app, &self.server, &self.wasp, self.proxy)
    }
}
