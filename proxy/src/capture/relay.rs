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
//! (drain). However it ends, it says how many bytes went each way: a
//! connection reset mid-copy still has its byte counts in the access log,
//! beside the error and the side that failed.
//!
//! Runs on a worker, one task per connection; nothing is shared.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    // An IPv4 connection on a dual-stack ([::]) socket has a v4-mapped
    // local address, and its NAT entry is an IPv4 one.
    let local = canonical(local);
    let sock = socket2::SockRef::from(stream);
    let addr = if local.is_ipv4() {
        sock.original_dst()
    } else {
        sock.original_dst_ipv6()
    };
    let addr = canonical(addr.ok()?.as_socket()?);
    // Without a NAT entry the kernel answers with the local address.
    (addr != local).then_some(addr)
}

/// `addr` with a v4-mapped IPv6 address as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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
    /// A tap (network filter) closed the connection.
    ClosedByTap,
    /// Reading from or writing to `peer` failed (a reset, a broken pipe).
    Failed { peer: Peer, kind: io::ErrorKind },
}

/// One end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Client,
    Upstream,
}

impl Peer {
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Client => "client",
            Peer::Upstream => "upstream",
        }
    }
}

impl RelayEnd {
    /// The access log's `end` value.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Idle => "idle_timeout",
            RelayEnd::Stopped => "drained",
            RelayEnd::ClosedByTap => "filter_closed",
            RelayEnd::Failed { .. } => "reset",
        }
    }
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
///
/// The two directions are separate futures, so a write blocked on a peer
/// that stopped reading stalls only its own direction, and the idle
/// deadline and `stop` are watched beside both (a blocked write makes no
/// progress, so it ends at the idle timeout too).
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    relay_metered(client, upstream, idle, stop, |_| {}, |_| {}).await
}

/// [`relay`], telling `up` and `down` each chunk's size as it is written
/// (metrics that move while a long connection lasts).
pub async fn relay_metered<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
    on_up: impl Fn(u64),
    on_down: impl Fn(u64),
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let pass = |_: &[u8], _: bool| Tapped::Pass;
    relay_tapped(client, upstream, idle, stop, (on_up, on_down), (pass, pass)).await
}

/// What a tap makes of one chunk read (network filters).
#[derive(Debug, PartialEq, Eq)]
pub enum Tapped {
    /// Write the chunk as read.
    Pass,
    /// Write these bytes instead (may be empty).
    Replace(bytes::Bytes),
    /// Write nothing now (the tap keeps the bytes).
    Hold,
    /// End the whole relay: the connection is closed.
    Close,
}

/// [`relay_metered`] with a tap per direction (upstream-bound, then
/// client-bound), called with each chunk read and once with an empty chunk
/// and `true` at that side's end, before the half-close is passed on.
pub async fn relay_tapped<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
    (on_up, on_down): (impl Fn(u64), impl Fn(u64)),
    (tap_up, tap_down): (
        impl FnMut(&[u8], bool) -> Tapped,
        impl FnMut(&[u8], bool) -> Tapped,
    ),
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let base = Instant::now();
    // Milliseconds since `base` of the last byte moved either way.
    let last = AtomicU64::new(0);
    let to_upstream = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let progress = |moved: &AtomicU64, n: usize| {
        moved.fetch_add(n as u64, Ordering::Relaxed);

        let ms = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    };
    let up = copy_one_way(
        (&mut cr, Peer::Client),
        (&mut uw, Peer::Upstream),
        |n| {
            progress(&to_upstream, n);
            on_up(n as u64);
        },
        tap_up,
    );
    let down = copy_one_way(
        (&mut ur, Peer::Upstream),
        (&mut cw, Peer::Client),
        |n| {
            progress(&to_client, n);
            on_down(n as u64);
        },
        tap_down,
    );
    let idle_watch = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let due = base + since + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let end = tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => RelayEnd::Closed,
            Err(end) => end,
        },
        () = idle_watch => RelayEnd::Idle,
        () = stop => RelayEnd::Stopped,
    };
    Relayed {
        to_upstream: to_upstream.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to`'s write side
/// (half-close: the other side sees the end and may still answer). An
/// error names the peer whose read or write failed.
async fn copy_one_way<R, W>(
    (from, from_peer): (&mut R, Peer),
    (to, to_peer): (&mut W, Peer),
    moved: impl Fn(usize),
    mut tap: impl FnMut(&[u8], bool) -> Tapped,
) -> Result<(), RelayEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let failed = |peer: Peer| {
        move |e: io::Error| RelayEnd::Failed {
            peer,
            kind: e.kind(),
        }
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await.map_err(failed(from_peer))?;
        let chunk = buf.get(..n).unwrap_or_default();
        let eos = n == 0;
        match tap(chunk, eos) {
            Tapped::Pass if !eos => {
                to.write_all(chunk).await.map_err(failed(to_peer))?;
                moved(n);
            }
            Tapped::Replace(bytes) if !bytes.is_empty() => {
                to.write_all(&bytes).await.map_err(failed(to_peer))?;
                moved(bytes.len());
            }
            Tapped::Close => {
                let _ = to.shutdown().await;
                return Err(RelayEnd::ClosedByTap);
            }
            Tapped::Pass | Tapped::Replace(_) | Tapped::Hold => {}
        }
        if eos {
            // The peer may already be gone; its end is what we report.
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
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
        let done = relay.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            done,
            Relayed {
                to_upstream: 8,
                to_client: 6,
                end: RelayEnd::Closed
            }
        );
    }

    /// An upstream that resets mid-copy: the relay still says how many
    /// bytes went each way, and which side failed.
    #[tokio::test]
    async fn a_reset_mid_copy_keeps_the_byte_counts() {
        let (mut app, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            client_side,
            upstream_side,
            Duration::from_secs(5),
            std::future::pending(),
        ));
        app.write_all(b"abc")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 3];
        server
            .read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .write_all(b"xy")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut back = [0u8; 2];
        app.read_exact(&mut back)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Linger 0: closing sends a reset instead of a FIN.
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap_or_else(|e| panic!("{e}"));
        drop(server);
        let done = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            done,
            Relayed {
                to_upstream: 3,
                to_client: 2,
                end: RelayEnd::Failed {
                    peer: Peer::Upstream,
                    kind: io::ErrorKind::ConnectionReset
                }
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
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.end, RelayEnd::Idle);
        assert_eq!(done.to_upstream, 6);
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_at_the_idle_timeout() {
        let (mut app, client_side) = pair().await;
        let (upstream_side, _server_never_reads) = pair().await;
        let relay = tokio::spawn(relay(
            client_side,
            upstream_side,
            Duration::from_millis(300),
            std::future::pending(),
        ));
        // Far more than the socket buffers hold: the relay's write blocks.
        let chunk = vec![7u8; 64 * 1024];
        let writer = tokio::spawn(async move {
            for _ in 0..512 {
                if app.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let done = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .unwrap_or_else(|e| panic!("relay stuck on a blocked write: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.end, RelayEnd::Idle);
        writer.abort();
    }

    #[tokio::test]
    async fn a_plain_connection_has_no_original_destination() {
        let (a, b) = pair().await;
        assert_eq!(original_dst(&a), None);
        assert_eq!(original_dst(&b), None);
        // IPv4 on a dual-stack socket (when the host has IPv6 at all).
        let Ok(l) = TcpListener::bind("[::]:0").await else {
            return;
        };
        let port = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
        let (a, b) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), l.accept());
        let (Ok(_a), Ok((b, _))) = (a, b) else {
            return;
        };
        assert!(b
            .local_addr()
            .is_ok_and(|l| l.ip().to_canonical().is_ipv4() && l.is_ipv6()));
        assert_eq!(original_dst(&b), None);
    }

    #[test]
    fn v4_mapped_addresses_are_plain_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(canonical(mapped).is_ipv4());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(canonical(v6), v6);
    }
}
