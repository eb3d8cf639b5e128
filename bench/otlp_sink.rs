//! The tracing bench's collector: the tests' OTLP/gRPC receiver
//! (`tests/support/otlp.rs`), counting spans and dropping them.
//!
//!   otlp-sink 127.0.0.1:4317
//!
//! Prints `spans N exports M` once a second while the count changes.

#[path = "../tests/support/otlp.rs"]
mod otlp;

use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4317)));
    let sink = otlp::Collector::grpc_on(addr, true).await;
    println!("listening {}", sink.addr);
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = sink.counted();
        if n != last {
            println!("spans {n} exports {}", sink.exports());
            last = n;
        }
    }
}
