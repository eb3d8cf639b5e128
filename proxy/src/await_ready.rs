//! `wasp await`: block until a wasp admin endpoint says ready.
//!
//! For apps that cannot run under wrapper mode: put `wasp await && exec app`
//! in their entrypoint so their first outbound call never meets a proxy that
//! is still starting.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::units::parse_duration;

pub fn main(admin: &str, timeout: &str) -> ExitCode {
    let limit = match parse_duration(timeout) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --timeout: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = match admin.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => {
            eprintln!("error: --admin {admin:?} is not a host:port address");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + limit;
    loop {
        let last = match probe(addr) {
            Ok(200) => {
                println!("wasp at {admin} is ready");
                return ExitCode::SUCCESS;
            }
            Ok(status) => format!("/ready answered {status}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            eprintln!("wasp at {admin} is not ready after {timeout}: {last}");
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `GET /ready`; the status code, or why there was none.
fn probe(addr: SocketAddr) -> Result<u16, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: wasp\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    buf.get(9..12)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())
}
