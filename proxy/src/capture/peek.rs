//! Protocol detection on a live socket: peeks (never reads) the first bytes
//! a client sends until [`super::detect::detect`] decides, so whichever path
//! wins gets the connection with every byte still in it.

use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::detect::{detect, Detection, MAX_CLIENT_HELLO};

/// First peek buffer: enough for a request line, a preface or most
/// ClientHellos; grown up to [`MAX_CLIENT_HELLO`] when a ClientHello is
/// larger.
const FIRST: usize = 2048;

/// What the client's first bytes are, waiting at most `limit` for them. A
/// client that stays silent (server-speaks-first protocols), closes before
/// sending, or sends something no detector recognises is `Opaque`. Bytes
/// that are still a prefix of HTTP, h2 or TLS when time (or the buffer)
/// runs out, or when the client ends its side after them, are `NeedMore`,
/// which callers must not take for opaque.
///
/// Never polls: it sleeps on the socket's readability and wakes when bytes
/// arrive, so a client that sends at once is decided on its first segment
/// with no added delay, and one whose first bytes are undecided (a
/// ClientHello split across segments) is looked at again only when more
/// arrive.
pub async fn sniff(stream: &TcpStream, limit: Duration) -> Detection {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; FIRST];
    // Bytes queued at the last look (all of them undecided so far).
    let mut seen = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, more_than(stream, seen)).await {
            Ok(Ok(Queued::More)) => {}
            // The client ended (FIN) inside an undecided prefix: nothing
            // more will come, so it stays undecided (callers treat it as
            // they treat a prefix at the deadline), now, not at the limit.
            Ok(Ok(Queued::Ended)) if seen > 0 => return Detection::NeedMore,
            // End of stream before any byte, or a failed socket.
            Ok(_) => return Detection::Opaque,
            Err(_) if seen > 0 => return Detection::NeedMore,
            Err(_) => return Detection::Opaque,
        }
        // The bytes are queued: this peek answers at once.
        let n = match stream.peek(&mut buf).await {
            Ok(got) if got > 0 => got,
            _ => return Detection::Opaque,
        };
        seen = n;
        let decided = detect(buf.get(..n).unwrap_or_default());
        if decided != Detection::NeedMore {
            return decided;
        }
        if n == buf.len() {
            if buf.len() >= MAX_CLIENT_HELLO + 5 {
                return Detection::NeedMore;
            }
            let grown = (buf.len() * 2).min(MAX_CLIENT_HELLO + 5);
            buf.resize(grown, 0);
        }
    }
}

/// What [`more_than`] found queued.
enum Queued {
    /// More bytes than seen so far.
    More,
    /// The client has ended its side and nothing new arrived: the bytes
    /// queued (possibly none) are all there will ever be.
    Ended,
}

/// Waits until more than `seen` bytes are queued on `stream`, or the
/// client has ended its side. Peeking leaves the socket readable, so
/// waiting for readability alone would spin on bytes already seen: a look
/// that finds nothing new clears the readiness (`try_io` with
/// `WouldBlock`), and the next wake-up is the kernel's next arrival. The
/// clearing keeps an arrival that raced with it (tokio clears only the
/// readiness it observed), so no segment is missed.
///
/// tokio never clears "read closed": after the client's FIN the socket is
/// ready for good, so a look that finds only the seen bytes with the read
/// side closed is the end, not a reason to look again (that loop never
/// yields and would hold the worker forever). The budget is spent per
/// look as well, so even a readiness that stays set can only delay this
/// task's timers, never stop them or starve the worker's other tasks.
async fn more_than(stream: &TcpStream, seen: usize) -> std::io::Result<Queued> {
    // Room for one byte more than seen is enough to tell "more arrived".
    let mut probe = vec![std::mem::MaybeUninit::<u8>::uninit(); seen.saturating_add(1)];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let looked = stream.try_io(Interest::READABLE, || {
            let n = socket2::SockRef::from(stream).peek(&mut probe)?;
            if n == 0 {
                Ok(Queued::Ended)
            } else if n > seen {
                Ok(Queued::More)
            } else if ready.is_read_closed() {
                Ok(Queued::Ended)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match looked {
            Ok(q) => return Ok(q),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        tokio::task::coop::consume_budget().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tests::pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// A ClientHello trickling in a few bytes at a time: each arrival wakes
    /// the detection again (readiness cleared after every undecided look
    /// must not lose the next segment).
    #[tokio::test]
    async fn a_client_hello_in_many_segments_is_still_read_whole() {
        let hello = super::super::detect::tests::client_hello_bytes("db.example", &["h2"]);
        let (mut client, server) = pair().await;
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7) {
                client
                    .write_all(piece)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        });
        match sniff(&server, Duration::from_secs(10)).await {
            Detection::Tls(h) => assert_eq!(h.sni.as_deref(), Some("db.example")),
            other => panic!("{other:?}"),
        }
        drop(writer.await);
    }

    /// A client that sends a prefix ("\x16", "G", ...) and then ends its
    /// side: the end is final (tokio never clears "read closed"), so the
    /// detection answers at once instead of looking again forever. Run on
    /// a thread of its own: a detection that spins never yields, so only
    /// another thread can notice.
    #[test]
    fn a_prefix_then_the_clients_end_is_decided_at_once() {
        for prefix in [&b"\x16"[..], b"G", b"PRI * HTTP/2", b""] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("{e}"));
                rt.block_on(async {
                    let (mut client, server) = pair().await;
                    client
                        .write_all(prefix)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    client.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
                    let _ = tx.send(sniff(&server, Duration::from_secs(60)).await);
                    drop(client);
                });
            });
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{prefix:?} then FIN: no decision within 10 s"));
            let want = if prefix.is_empty() {
                Detection::Opaque
            } else {
                Detection::NeedMore
            };
            assert_eq!(got, want, "{prefix:?}");
        }
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
