//! Opaque TCP: the original destination of a redirected connection, and the
//! byte relay between a client and an upstream.
//!
//! [`original_dst`] reads where the app meant to connect before iptables'
//! REDIRECT (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`). [`relay`] copies
//! both ways with half-close (one side's end of stream becomes a shutdown
//! of the other's write side, so request/response protocols that close
//! their sending half still get their answer) and an idle timeout that any
//! byte in either direction resets; it ends when both directions have
//! ended, on the first error, at the idle timeout, or when `stop` fires
//! (drain).
//!
//! Runs on a worker, one task per connection; nothing is shared.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes each relay direction reads at once.
const CHUNK: usize = 16 * 1024;

/// Where the client meant to connect, if iptables redirected it here.
/// `None` for a connection made to this address directly.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let addr = if local.is_ipv4() {
        sock.original_dst()
    } else {
        sock.original_dst_ipv6()
    };
    let addr = addr.ok()?.as_socket()?;
    // Without a NAT entry the kernel answers with the local address.
    (addr != local).then_some(addr)
}

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The proxy is draining.
    Stopped,
}

/// What a relay moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub to_upstream: u64,
    pub to_client: u64,
    pub end: RelayEnd,
}

/// Copies `client` <-> `upstream` until both directions end, one fails, no
/// byte moves for `idle`, or `stop` completes.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut up_buf = vec![0u8; CHUNK];
    let mut down_buf = vec![0u8; CHUNK];
    let mut out = Relayed {
        to_upstream: 0,
        to_client: 0,
        end: RelayEnd::Closed,
    };
    let (mut up_open, mut down_open) = (true, true);
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    tokio::pin!(stop);
    while up_open || down_open {
        tokio::select! {
            n = cr.read(&mut up_buf), if up_open => {
                let n = n?;
                if n == 0 {
                    up_open = false;
                    // Half-close: the upstream sees the client's end.
                    let _ = uw.shutdown().await;
                } else {
                    uw.write_all(up_buf.get(..n).unwrap_or_default()).await?;
                    out.to_upstream = out.to_upstream.saturating_add(n as u64);
                    deadline.as_mut().reset(Instant::now() + idle);
                }
            }
            n = ur.read(&mut down_buf), if down_open => {
                let n = n?;
                if n == 0 {
                    down_open = false;
                    let _ = cw.shutdown().await;
                } else {
                    cw.write_all(down_buf.get(..n).unwrap_or_default()).await?;
                    out.to_client = out.to_client.saturating_add(n as u64);
                    deadline.as_mut().reset(Instant::now() + idle);
                }
            }
            () = &mut deadline => {
                out.end = RelayEnd::Idle;
                return Ok(out);
            }
            () = &mut stop => {
                out.end = RelayEnd::Stopped;
                return Ok(out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")).0,
        )
    }

    #[tokio::test]
    async fn half_close_still_gets_the_answer() {
        // client_app <-> (client_side | relay | upstream_side) <-> server
        let (mut app, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            client_side,
            upstream_side,
            Duration::from_secs(5),
            std::future::pending(),
        ));
        app.write_all(b"question")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        app.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, b"question");
        server
            .write_all(b"answer")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let mut answer = Vec::new();
        app.read_to_end(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, b"answer");
        let done = relay
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            done,
            Relayed {
                to_upstream: 8,
                to_client: 6,
                end: RelayEnd::Closed
            }
        );
    }

    #[tokio::test]
    async fn idle_connections_end_and_traffic_keeps_them_alive() {
        let (mut app, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let idle = Duration::from_millis(300);
        let relay = tokio::spawn(relay(
            client_side,
            upstream_side,
            idle,
            std::future::pending(),
        ));
        // Bytes every 100 ms for 0.6 s: longer than the idle timeout in all.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            app.write_all(b"x").await.unwrap_or_else(|e| panic!("{e}"));
            let mut one = [0u8; 1];
            server
                .read_exact(&mut one)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(!relay.is_finished(), "cut while bytes were flowing");
        let done = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.end, RelayEnd::Idle);
        assert_eq!(done.to_upstream, 6);
    }

    #[tokio::test]
    async fn a_plain_connection_has_no_original_destination() {
        let (a, b) = pair().await;
        assert_eq!(original_dst(&a), None);
        assert_eq!(original_dst(&b), None);
    }
}
