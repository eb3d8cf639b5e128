//! Protocol detection on a live socket: peeks (never reads) the first bytes
//! a client sends until [`super::detect::detect`] decides, so whichever path
//! wins gets the connection with every byte still in it.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::detect::{detect, Detection, MAX_CLIENT_HELLO};

/// First peek buffer: enough for a request line, a preface or most
/// ClientHellos; grown up to [`MAX_CLIENT_HELLO`] when a ClientHello is
/// larger.
const FIRST: usize = 2048;

/// How often a connection whose bytes cannot decide yet is peeked again:
/// `peek` returns at once while bytes are queued, so waiting for more is a
/// short sleep (this is the rare case: a ClientHello split across segments).
const AGAIN: Duration = Duration::from_millis(5);

/// What the client's first bytes are, waiting at most `limit` for them. A
/// client that stays silent (server-speaks-first protocols), closes before
/// sending, or sends something no detector recognises is `Opaque`. Bytes
/// that are still a prefix of HTTP, h2 or TLS when time (or the buffer)
/// runs out are `NeedMore`, which callers must not take for opaque.
pub async fn sniff(stream: &TcpStream, limit: Duration) -> Detection {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; FIRST];
    // Whether some bytes already arrived (all of them undecided so far).
    let mut partial = false;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            // A peek only answers 0 or fails when nothing is queued.
            Ok(_) => return Detection::Opaque,
            Err(_) if partial => return Detection::NeedMore,
            Err(_) => return Detection::Opaque,
        };
        partial = true;
        let seen = detect(buf.get(..n).unwrap_or_default());
        if seen != Detection::NeedMore {
            return seen;
        }
        if n == buf.len() {
            if buf.len() >= MAX_CLIENT_HELLO + 5 {
                return Detection::NeedMore;
            }
            let grown = (buf.len() * 2).min(MAX_CLIENT_HELLO + 5);
            buf.resize(grown, 0);
            continue;
        }
        if Instant::now() + AGAIN >= deadline {
            return Detection::NeedMore;
        }
        tokio::time::sleep(AGAIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    async fn detection_leaves_the_bytes_for_the_winner() {
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = sniff(&server, Duration::from_secs(5)).await;
        assert_eq!(seen, Detection::Http1);
        let mut first = [0u8; 16];
        server
            .read_exact(&mut first)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&first, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_split_preface_waits_and_a_silent_client_is_opaque() {
        let (mut client, server) = pair().await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client
                .write_all(b"\r\nSM\r\n\r\n")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            client
        });
        assert_eq!(
            sniff(&server, Duration::from_secs(5)).await,
            Detection::Http2
        );
        drop(later.await);
        let (_silent, server) = pair().await;
        let started = std::time::Instant::now();
        assert_eq!(
            sniff(&server, Duration::from_millis(100)).await,
            Detection::Opaque
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_prefix_still_undecided_at_the_deadline_is_not_opaque() {
        for prefix in [&b"G"[..], b"\r\n", b"PRI * HTTP/2", b"\x16\x03\x01"] {
            let (mut client, server) = pair().await;
            client
                .write_all(prefix)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                sniff(&server, Duration::from_millis(100)).await,
                Detection::NeedMore,
                "{prefix:?}"
            );
        }
    }
}
