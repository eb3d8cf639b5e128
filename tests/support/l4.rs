//! Raw TCP for the L4 tests: upstreams that echo or speak first, a real
//! TLS ClientHello, bounded reads, and a Redis server (Debian's
//! `redis-server`, driven with `redis-cli`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::free_port;

/// Echoes each connection until the client's end, then closes.
pub async fn echo_server() -> SocketAddr {
    counting_echo_server().await.0
}

/// Echoes like [`echo_server`] and counts the connections it accepted.
pub async fn counting_echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// How many connections a [`counting_echo_server`] accepted so far.
pub fn accepted(count: &AtomicUsize) -> usize {
    count.load(Ordering::SeqCst)
}

/// Speaks first: writes `hello from <name>` on accept, then reads the
/// first chunk the client sends and answers `<name> got <n> bytes starting
/// <hex byte>`.
pub async fn banner_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind banner");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("hello from {name}\n").as_bytes()).await;
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = s.read(&mut buf).await {
                    let first = buf.first().copied().unwrap_or(0);
                    let _ = s
                        .write_all(
                            format!("{name} got {n} bytes starting {first:02x}\n").as_bytes(),
                        )
                        .await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A real TLS ClientHello for `sni`, as rustls writes it.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("client hello");
    out
}

/// The certificates of a PEM file (as `wasp certs` writes them).
pub fn pem_certs(path: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .map(|c| c.expect("cert"))
        .collect()
}

/// Connects to `addr` and sends `bytes`.
pub async fn connect_sending(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s
}

/// One line (without its `\n`), or what came before the peer closed or
/// 5 s passed.
pub async fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut one = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut one)).await {
            Ok(Ok(1)) if one[0] == b'\n' => break,
            Ok(Ok(1)) => out.push(one[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `want` bytes arrived (or the peer closed / 5 s passed).
pub async fn read_n(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < want && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

/// Reads until the peer closes (or `limit` passes): whether the end came
/// in time (a close or a reset), and the bytes read until then.
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (bool, Vec<u8>) {
    let mut back = Vec::new();
    let ended = tokio::time::timeout(limit, s.read_to_end(&mut back)).await;
    (ended.is_ok(), back)
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-cli` against `127.0.0.1:port`: its trimmed stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Redis server on a free port, answering PING.
pub fn start_redis() -> (Killed, u16) {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("redis-server is missing: scripts/test.sh installs Debian's redis-server");
    }
    let redis_port = free_port();
    let redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(redis_port, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (redis, redis_port)
}
