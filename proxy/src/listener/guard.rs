//! The connection guard: deadlines hyper does not enforce the way a proxy
//! needs, and head checks, applied at the byte level of one downstream
//! connection (a worker's task; nothing here blocks or locks).
//!
//! - Header timeout: once the first byte of an HTTP/1 request head arrives,
//!   the whole head must arrive within `header_timeout`, else the client
//!   gets `408` with `x-wasp-error: header_timeout` and the connection closes
//!   (hyper's own timeout closes without a response).
//! - Idle timeout: a connection with no request in flight for
//!   `idle_timeout` is closed (read side reports end of stream, so hyper
//!   closes cleanly). For h1 idleness counts from the last bytes; for h2
//!   from the last stream's end (keepalive pings are bytes, not activity).
//! - Busy connections: no bytes either way for `stream_idle_timeout` while
//!   a request is in flight (or while a write is blocked) fails every read
//!   and write, so hyper drops the connection and everything its requests
//!   held; counted as `stream_idle_timeout`. A peer that stopped reading is
//!   cut `stream_idle_timeout` after its writes stopped going through,
//!   whatever it still sends (h2 PINGs would otherwise keep it); a request that stalled otherwise is answered 408
//!   by the request path (`forward::deadline`) at the same deadline, so the
//!   guard waits half as long again before it closes as the backstop.
//! - Head checks (`head.rs`, pure functions): every HTTP/1 head, CRLF or
//!   bare LF, including heads pipelined behind a request in flight (the
//!   scanner follows the bodies between them). A refused first head of a
//!   connection is answered 400/431 here and never given to hyper; any
//!   other (behind a request in flight, behind complete requests in the
//!   same read, or after an earlier response) is replaced by a NUL byte, which hyper's
//!   parser refuses wherever it lands, so hyper answers 400 in order after
//!   the response ahead of it, and the guard labels that 400.
//! - hyper answers malformed heads itself (400, 431, 414) before any service
//!   runs; the guard adds `x-wasp-error` to those answers so they say why
//!   like every other response the proxy makes.
//!
//! "Waiting for a head" means no request of this connection is in flight,
//! as counted by [`Activity`]. HTTP/2 connections (seen by their preface,
//! which may arrive over several reads) get the idle and stream idle
//! timeouts and no head checks: hyper's h2 handles framing, and each h2
//! stream's own deadlines are in `forward::deadline`. An automatic answer
//! is told from a proxied
//! one by the request count: hyper drops a response's body (ending the
//! request) before it writes it, so "nothing in flight" alone would also
//! label an upstream's own 400; only an answer written while no request
//! was dispatched since the current head began arriving is hyper's.
//!
//! Once the connection switched protocols (`Activity::upgraded`, set when
//! the upstream answers 101) the guard is a plain passthrough: the bytes are
//! a tunnel, with no heads, deadlines or answers of its own. It still holds
//! the connection's slot in the listener (dropped with the socket, so a
//! tunnel counts as open until it ends); the tunnel's own task ends it when
//! the listener's drain deadline passes (`forward::upgrade`).
//!
//! The guard wraps a plain TCP stream or a TLS stream (it sees the
//! decrypted bytes either way). Its own answers (408, 400) are written with
//! one non-blocking write and flush from inside the read that decides them:
//! the socket's buffer is empty at that point, and a client this slow or
//! this wrong does not get to apply backpressure.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::head::{Refusal, Scanner};
use crate::errors::ErrorCode;
use crate::forward::{later, Activity};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

pub struct Guarded<S = TcpStream> {
    inner: S,
    activity: Arc<Activity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// No bytes either way for this long while a request is in flight cuts
    /// the connection (see "Busy connections" above).
    stream_idle_timeout: Option<Duration>,
    /// Requests started as of the last read, to notice a request completing.
    seen_started: u64,
    /// Requests finished as of the last look (h2 idleness counts from the
    /// last stream's end, not from the last bytes: pings are bytes too).
    seen_finished: u64,
    /// When bytes last moved either way.
    last_io: Instant,
    /// The last write did not go through: the peer is not reading.
    write_blocked: bool,
    /// When writes stopped going through (the first blocked write since
    /// the last one that did). A peer that stopped reading is cut by this,
    /// not by `last_io`: frames it keeps sending (h2 PINGs, PRIORITY) are
    /// reads, and must not keep a connection whose writes are stuck.
    blocked_since: Instant,
    /// A deadline passed while busy: every read and write fails from now on.
    cut: bool,
    /// When the current request head began arriving.
    head_started: Option<Instant>,
    /// `activity.started` when the current head began arriving: a request
    /// dispatched since then makes a 4xx a proxied answer, not hyper's.
    head_seq: Option<u64>,
    idle_since: Instant,
    timer: Pin<Box<Sleep>>,
    /// How much of the h2 preface the connection's bytes have matched while
    /// they are still a strict prefix of it; `None` once decided.
    preface_seen: Option<usize>,
    h2: bool,
    /// A rewritten automatic error response still being written.
    rewrite: Option<(Vec<u8>, usize, usize)>,
    /// Follows the HTTP/1 bytes head by head and checks each head.
    scanner: Scanner,
    /// A refused head arrived behind a request in flight and was replaced
    /// with bytes hyper refuses: hyper's 400 for it, written in order after
    /// the earlier response, is labelled `bad_request`.
    poisoned: bool,
    /// The connection's slot in its listener (open-connection count, gauge,
    /// drain tracking), given back when the socket is dropped; its stats
    /// count the guard's own answers.
    slot: Option<super::Closed>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    pub fn new(inner: S, activity: Arc<Activity>, limits: &crate::config::ListenerLimits) -> Self {
        let now = Instant::now();
        let idle_timeout = limits.idle_timeout;
        Self {
            inner,
            activity,
            header_timeout: limits.header_timeout,
            idle_timeout,
            stream_idle_timeout: limits.stream_idle_timeout,
            seen_started: 0,
            seen_finished: 0,
            last_io: now,
            write_blocked: false,
            blocked_since: now,
            cut: false,
            head_started: None,
            head_seq: None,
            idle_since: now,
            timer: Box::pin(tokio::time::sleep_until(later(now, idle_timeout))),
            preface_seen: Some(0),
            h2: false,
            rewrite: None,
            scanner: Scanner::new(limits.max_header_bytes),
            poisoned: false,
            slot: None,
        }
    }

    /// Ties the connection to its listener: `slot` is held as long as the
    /// socket, through an upgrade too.
    pub(super) fn tied(mut self, slot: super::Closed) -> Self {
        self.slot = Some(slot);
        self
    }

    fn upgraded(&self) -> bool {
        self.activity
            .upgraded
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Follows the h2 preface across reads: decides h2 once all of it has
    /// arrived, h1 at the first byte that differs.
    fn detect(&mut self, got: &[u8]) {
        let Some(seen) = self.preface_seen else {
            return;
        };
        let want = &H2_PREFACE[seen..];
        let n = want.len().min(got.len());
        if got[..n] != want[..n] {
            self.preface_seen = None;
        } else if seen + n == H2_PREFACE.len() {
            self.preface_seen = None;
            self.h2 = true;
        } else {
            self.preface_seen = Some(seen + n);
        }
    }

    /// Notices requests dispatched or finished since the last look: a
    /// request head completed, so the next one has not started yet, and
    /// idleness counts from now (for h2, only from a stream's end: pings
    /// and settings are bytes too, but not activity).
    fn sync_requests(&mut self) {
        use std::sync::atomic::Ordering::Acquire;
        let finished = self.activity.finished.load(Acquire);
        if finished != self.seen_finished {
            self.seen_finished = finished;
            if self.h2 {
                self.idle_since = Instant::now();
            }
        }
        let started = self.activity.started.load(Acquire);
        if started != self.seen_started {
            self.seen_started = started;
            self.head_started = None;
            self.head_seq = None;
            self.idle_since = Instant::now();
        }
    }

    fn deadline(&self) -> Instant {
        match self.head_started {
            Some(t) if !self.h2 => later(t, self.header_timeout),
            _ => later(self.idle_since, self.idle_timeout),
        }
    }

    /// Counts an answer the guard made (or labelled) in
    /// `wasp_proxy_errors_total`, like every other proxy-made response.
    fn count(&self, code: ErrorCode) {
        if let Some(slot) = &self.slot {
            slot.stats.error(code);
        }
    }

    /// Answers 408 (see [`Self::say`]).
    fn send_408(&mut self, cx: &mut Context<'_>) {
        self.count(ErrorCode::HeaderTimeout);
        let resp = ErrorCode::HeaderTimeout.raw_http1(&format!(
            "request head not received within {:?}",
            self.header_timeout
        ));
        self.say(cx, &resp);
        tracing::info!(
            "closing a connection whose request head did not arrive within {:?}",
            self.header_timeout
        );
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// Writes the guard's own answer without waiting: whatever the stream
    /// takes now (all of it, for an idle socket), then one flush.
    fn say(&mut self, cx: &mut Context<'_>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, bytes) {
                Poll::Ready(Ok(n)) if n > 0 => bytes = &bytes[n..],
                _ => break,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
    }

    /// Replaces the bytes from `from` (a refused head, or its tail when it
    /// began in an earlier read) with a NUL, which hyper's parser refuses
    /// wherever it lands in a head; returns the new end of the filled
    /// bytes.
    fn poison(&mut self, buf: &mut ReadBuf<'_>, from: usize, end: usize) -> usize {
        self.poisoned = true;
        match buf.filled_mut().get_mut(from..end) {
            Some([first, ..]) => {
                *first = 0;
                from + 1
            }
            _ => end,
        }
    }

    fn reject(&mut self, cx: &mut Context<'_>, refusal: Refusal) {
        let (code, reason) = match refusal {
            Refusal::Framing(problem) => (ErrorCode::BadRequest, format!("bad request: {problem}")),
            Refusal::TooLarge => (
                ErrorCode::HeaderTooLarge,
                "request head is larger than the listener's max_header_bytes".to_string(),
            ),
        };
        self.count(code);
        self.say(cx, &code.raw_http1(&reason));
        tracing::info!(code = code.as_str(), "rejected a request head: {reason}");
    }
}

/// Whether bytes read between requests can begin a request line: optional
/// empty lines, then a method token of letters up to a space (or the end of
/// what has arrived). The rest of a body hyper drains after an early answer
/// almost never does.
fn starts_like_head(got: &[u8]) -> bool {
    let Some(rest) = after_empty_lines(got) else {
        return true;
    };
    let method = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    method > 0 && method <= 16 && rest.get(method).is_none_or(|b| *b == b' ')
}

/// `bytes` after the empty lines a client may send between requests (hyper
/// skips them); `None` when that is all there is.
fn after_empty_lines(bytes: &[u8]) -> Option<&[u8]> {
    let start = bytes.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    Some(&bytes[start..])
}

/// What reads and writes fail with once a stream deadline cut the
/// connection.
fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no bytes moved either way within stream_idle_timeout",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// When a connection busy with a request (or blocked writing) is cut:
    /// no bytes either way for `stream_idle_timeout`. A peer that stopped
    /// reading is the guard's to cut; a request that stalled otherwise is
    /// answered by the request path (408, `forward::deadline`) at the same
    /// deadline, so the guard waits half as long again before it closes
    /// the connection as the backstop.
    fn stream_deadline(&self) -> Option<Instant> {
        let idle = self.stream_idle_timeout?;
        Some(if self.write_blocked {
            later(self.blocked_since, idle)
        } else {
            later(self.last_io, idle.saturating_add(idle / 2))
        })
    }

    /// A write (or flush) did not go through.
    fn blocked(&mut self) {
        if !self.write_blocked {
            self.write_blocked = true;
            self.blocked_since = Instant::now();
        }
    }

    /// An I/O call on a busy (or write-blocked) connection is pending:
    /// fails it once the stream deadline passed, else arms the timer.
    fn poll_stream_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.upgraded() {
            return Poll::Pending;
        }
        let Some(deadline) = self.stream_deadline() else {
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            if !self.cut {
                self.cut = true;
                self.count(ErrorCode::StreamIdleTimeout);
                tracing::info!(
                    code = ErrorCode::StreamIdleTimeout.as_str(),
                    blocked_writing = self.write_blocked,
                    "closing a connection on which no bytes moved for {:?}",
                    self.stream_idle_timeout.unwrap_or_default()
                );
            }
            return Poll::Ready(Err(cut_error()));
        }
        // Also wake at the idle deadline still ahead, to look again once
        // the request is done (hyper may not read again by itself).
        let idle = later(self.idle_since, self.idle_timeout);
        let wake = if idle > Instant::now() {
            idle.min(deadline)
        } else {
            deadline
        };
        self.arm(cx, wake);
        Poll::Pending
    }

    fn arm(&mut self, cx: &mut Context<'_>, at: Instant) {
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    /// Bookkeeping after a write: progress, or a peer not reading.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.last_io = Instant::now();
                self.write_blocked = false;
                if !self.activity.busy() && !self.upgraded() {
                    // The tail of a response, written after its request
                    // ended: idleness counts from here, and the timer must
                    // say so even if hyper does not read again.
                    self.sync_requests();
                    let at = self.deadline();
                    self.arm(cx, at);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if !self.upgraded() => {
                self.blocked();
                self.poll_stream_deadline(cx)
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.upgraded() {
            // A tunnel: bytes pass untouched, with no deadline.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.cut {
            return Poll::Ready(Err(cut_error()));
        }
        if this.poisoned {
            // hyper stops at the poisoned head; nothing after it is read.
            return Poll::Ready(Ok(()));
        }
        let started = this
            .activity
            .started
            .load(std::sync::atomic::Ordering::Acquire);
        let busy = this.activity.busy();
        this.sync_requests();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    this.last_io = Instant::now();
                    this.detect(got);
                }
                // Bytes after an early answer (a 404 before the body came)
                // are the rest of that body, which hyper drains: they start
                // no head, so no head deadline and no head check.
                let head_like = this.head_started.is_some() || this.h2 || starts_like_head(got);
                if !got.is_empty() && !busy {
                    let now = Instant::now();
                    if this.head_started.is_none() && head_like {
                        this.head_started = Some(now);
                        this.head_seq = Some(started);
                    }
                    if !this.h2 {
                        this.idle_since = now;
                    }
                }
                if got.is_empty() || this.h2 {
                    return Poll::Ready(Ok(()));
                }
                if let Some((at, refusal)) = this.scanner.feed(got) {
                    // Answered here only when it is the connection's first
                    // head and the first bytes of this read: nothing could be
                    // lost or interleaved. Behind complete requests in this
                    // read, a request in flight, or a response hyper may not
                    // have flushed yet, hyper must answer the earlier ones
                    // first, so the refused head becomes bytes hyper itself
                    // refuses, answered in order.
                    if busy || at > 0 || started > 0 {
                        let len = got.len();
                        let end = this.poison(buf, before + at, before + len);
                        buf.set_filled(end);
                        tracing::info!(
                            code = ErrorCode::BadRequest.as_str(),
                            "refused a request head pipelined behind another: {refusal:?}"
                        );
                    } else {
                        buf.set_filled(before);
                        this.reject(cx, refusal);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if busy {
                    return this.poll_stream_deadline(cx);
                }
                let deadline = this.deadline();
                if Instant::now() >= deadline {
                    if this.head_started.is_some() && !this.h2 {
                        this.send_408(cx);
                    }
                    // End of stream: hyper closes the connection.
                    return Poll::Ready(Ok(()));
                }
                this.timer.as_mut().reset(deadline);
                if this.timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// If hyper is writing its own error answer to a malformed head, returns
    /// the same bytes with `x-wasp-error` added after the status line, and
    /// the code. Pure: a caller may ask more than once for the same bytes.
    fn rewrite_auto_error(&self, buf: &[u8]) -> Option<(Vec<u8>, ErrorCode)> {
        if self.h2 || self.activity.busy() || !buf.starts_with(b"HTTP/1.1 4") {
            return None;
        }
        // Not busy is not enough: a proxied response is written after its
        // body (and so its request) ended. hyper's own answer is the one
        // written while the head that began arriving was never dispatched.
        let started = self
            .activity
            .started
            .load(std::sync::atomic::Ordering::Acquire);
        // A poisoned head's 400 comes once the request ahead of it is done.
        if (self.head_seq != Some(started) && !self.poisoned) || self.upgraded() {
            return None;
        }
        // Every response the proxy made or passed on carries `via` or
        // `x-wasp-error`; hyper's own answer carries neither. This tells a
        // proxied 4xx written ahead of a poisoned head's 400 from that 400.
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(buf.len());
        if buf[..head_end].split(|b| *b == b'\n').any(|line| {
            let line = line.trim_ascii_start();
            line.len() > 4
                && (line[..4].eq_ignore_ascii_case(b"via:")
                    || line
                        .get(..crate::errors::HEADER.len() + 1)
                        .is_some_and(|n| {
                            n[..n.len() - 1].eq_ignore_ascii_case(crate::errors::HEADER.as_bytes())
                                && n[n.len() - 1] == b':'
                        }))
        }) {
            return None;
        }
        let code = ErrorCode::of_hyper_status(buf.get(9..12)?)?;
        let line_end = buf.windows(2).position(|w| w == b"\r\n")? + 2;
        let mut out = Vec::with_capacity(buf.len() + 40);
        out.extend_from_slice(&buf[..line_end]);
        out.extend_from_slice(crate::errors::HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(code.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&buf[line_end..]);
        Some((out, code))
    }

    fn drain_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, written, claimed)) = &mut self.rewrite {
            if *written == bytes.len() {
                let n = *claimed;
                self.rewrite = None;
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.rewrite.is_none() {
            if let Some((bytes, code)) = self.rewrite_auto_error(buf) {
                self.count(code);
                tracing::info!(code = code.as_str(), "rejected a malformed request head");
                self.rewrite = Some((bytes, 0, buf.len()));
            }
        }
        if self.rewrite.is_some() {
            return self.drain_rewrite(cx);
        }
        if self.cut {
            return Poll::Ready(Err(cut_error()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty());
        if let Some(first) = first {
            if self.rewrite.is_some() || self.rewrite_auto_error(first).is_some() {
                let first: &[u8] = first;
                return self.poll_write(cx, first);
            }
        }
        if self.cut {
            return Poll::Ready(Err(cut_error()));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut {
            return Poll::Ready(Err(cut_error()));
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            // (A TLS stream flushes its buffered records here.)
            Poll::Pending if !self.upgraded() => {
                self.blocked();
                self.poll_stream_deadline(cx)
            }
            Poll::Ready(Ok(())) => {
                // Everything buffered went out: the peer is reading.
                self.write_blocked = false;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const HEADER_TIMEOUT: Duration = Duration::from_millis(50);

    #[test]
    fn what_can_begin_a_head() {
        for head in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\nPOST /x",
            b"G",
            b"DELETE",
            b"PRI * HTTP/2.0",
        ] {
            assert!(starts_like_head(head), "{}", String::from_utf8_lossy(head));
        }
        for body in [
            &b"{\"a\":1}"[..],
            b"a=1&b=2",
            b"/x HTTP/1.1",
            b"\x00\x01",
            b" GET",
        ] {
            assert!(!starts_like_head(body), "{}", String::from_utf8_lossy(body));
        }
    }

    fn guarded() -> (DuplexStream, Guarded<DuplexStream>) {
        guarded_with(Duration::from_secs(30))
    }

    fn guarded_with(stream_idle: Duration) -> (DuplexStream, Guarded<DuplexStream>) {
        let (client, server) = tokio::io::duplex(4096);
        let activity = Arc::new(Activity::default());
        let limits = crate::config::ListenerLimits {
            max_connections: 1,
            max_header_bytes: 8192,
            max_body_bytes: 1 << 20,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: Duration::from_secs(30),
            stream_idle_timeout: Some(stream_idle),
            request_timeout: None,
            h2_keepalive_interval: None,
            h2_keepalive_timeout: Duration::from_secs(60),
        };
        let guard = Guarded::new(server, activity, &limits);
        (client, guard)
    }

    /// A busy connection whose peer stopped reading: once the buffers are
    /// full nothing moves, and the stream idle timeout fails the write.
    #[tokio::test]
    async fn a_peer_that_stops_reading_is_cut() {
        let idle = Duration::from_millis(100);
        let (_client, mut guard) = guarded_with(idle);
        guard
            .activity
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let chunk = [b'x'; 1024];
        let mut blocked_at = None;
        let err = loop {
            let write = guard.write(&chunk);
            match tokio::time::timeout(Duration::from_millis(20), write).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => break e,
                Err(_) => {
                    blocked_at.get_or_insert_with(Instant::now);
                }
            }
            assert!(
                blocked_at.is_none_or(|t| t.elapsed() < Duration::from_secs(5)),
                "the blocked write was never cut"
            );
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = blocked_at.map(|t| t.elapsed()).unwrap_or_default();
        assert!(waited >= idle - Duration::from_millis(25), "{waited:?}");
        // Reads fail too: hyper drops the connection.
        let mut buf = [0u8; 8];
        assert!(guard.read(&mut buf).await.is_err());
    }

    /// A peer that stopped reading but keeps sending (h2 PINGs, PRIORITY
    /// frames) is still cut: the deadline counts from the write that
    /// blocked, not from the last bytes read.
    #[tokio::test]
    async fn a_peer_that_stops_reading_but_keeps_sending_is_cut() {
        let idle = Duration::from_millis(150);
        let (mut client, mut guard) = guarded_with(idle);
        guard
            .activity
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let chunk = [b'x'; 1024];
        let mut blocked_at = None;
        let mut buf = [0u8; 64];
        let err = loop {
            match tokio::time::timeout(Duration::from_millis(20), guard.write(&chunk)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => break e,
                Err(_) => {
                    blocked_at.get_or_insert_with(Instant::now);
                }
            }
            // A frame from the peer, read through the guard.
            client.write_all(b"p").await.unwrap();
            let read = tokio::time::timeout(Duration::from_millis(20), guard.read(&mut buf)).await;
            if let Ok(Err(e)) = read {
                break e;
            }
            assert!(
                blocked_at.is_none_or(|t| t.elapsed() < Duration::from_secs(3)),
                "a peer that sends but never reads was never cut"
            );
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = blocked_at.map(|t| t.elapsed()).unwrap_or_default();
        assert!(waited >= idle - Duration::from_millis(25), "{waited:?}");
    }

    /// A refused head behind complete requests in the same read, on an
    /// idle connection, does not take those requests with it: they reach
    /// hyper, and the refused head becomes bytes hyper refuses after them.
    #[tokio::test]
    async fn a_refused_head_keeps_the_requests_before_it() {
        let (mut client, mut guard) = guarded();
        let first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
        let bad = b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut both = first.to_vec();
        both.extend_from_slice(bad);
        client.write_all(&both).await.unwrap();
        let mut buf = [0u8; 512];
        let n = guard.read(&mut buf).await.unwrap();
        assert!(n > first.len(), "{:?}", String::from_utf8_lossy(&buf[..n]));
        assert_eq!(&buf[..first.len()], first);
        assert_eq!(buf[first.len()], 0, "the refused head was not poisoned");
        assert!(guard.poisoned);
        // No answer of the guard's own interleaved with hyper's.
        let said = tokio::time::timeout(Duration::from_millis(50), client.read(&mut buf)).await;
        assert!(said.is_err(), "the guard answered: {said:?}");
    }

    /// A proxied 4xx written ahead of a poisoned head's 400 is passed on
    /// as it is: only hyper's own answer is labelled.
    #[tokio::test]
    async fn a_proxied_4xx_ahead_of_a_poisoned_head_is_not_relabelled() {
        let (mut client, mut guard) = guarded();
        guard.poisoned = true;
        let proxied = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nvia: 1.1 wasp\r\n\r\n";
        guard.write_all(proxied).await.unwrap();
        let hyper_own =
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        guard.write_all(hyper_own).await.unwrap();
        let mut buf = vec![0u8; 512];
        let mut got = Vec::new();
        while got.len() < proxied.len() + hyper_own.len() + 20 {
            let n = client.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with(std::str::from_utf8(proxied).unwrap()),
            "{got}"
        );
        assert!(
            got.ends_with("HTTP/1.1 400 Bad Request\r\nx-wasp-error: bad_request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"),
            "{got}"
        );
    }

    /// A busy connection on which nothing moves either way is closed as
    /// the backstop, half the timeout again after the request path's own
    /// deadline.
    #[tokio::test]
    async fn a_busy_connection_with_nothing_moving_is_cut() {
        let idle = Duration::from_millis(100);
        let (_client, mut guard) = guarded_with(idle);
        guard
            .activity
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), guard.read(&mut buf)).await;
        let err = read.expect("never cut").expect_err("a read succeeded");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= idle + idle / 2, "{:?}", start.elapsed());
        // Not busy: no stream deadline, only the idle timeout.
        let (_client, mut guard) = guarded_with(idle);
        let read = tokio::time::timeout(idle * 3, guard.read(&mut buf)).await;
        assert!(read.is_err(), "an idle connection was cut: {read:?}");
    }

    /// Writes `parts` one at a time, each read through the guard on its own.
    async fn arrive(client: &mut DuplexStream, guard: &mut Guarded<DuplexStream>, parts: &[&[u8]]) {
        let mut buf = [0u8; 64];
        for part in parts {
            client.write_all(part).await.unwrap();
            let n = guard.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], *part);
        }
    }

    /// An h2c preface split over reads is still h2: once idle, the
    /// connection waits for the idle timeout, with no HTTP/1.1 408.
    #[tokio::test]
    async fn a_split_h2_preface_is_still_h2() {
        let (mut client, mut guard) = guarded();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        arrive(
            &mut client,
            &mut guard,
            &[&preface[..5], &preface[5..12], &preface[12..]],
        )
        .await;
        let mut buf = [0u8; 64];
        let idle = tokio::time::timeout(HEADER_TIMEOUT * 6, guard.read(&mut buf)).await;
        assert!(idle.is_err(), "closed as an h1 head: {idle:?}");
        let said = tokio::time::timeout(Duration::from_millis(10), client.read(&mut buf)).await;
        assert!(said.is_err(), "the guard answered: {said:?}");
    }

    /// Bytes that only start like the preface ("P" of "POST") are h1 once
    /// they differ: a head that stalls still gets its 408.
    #[tokio::test]
    async fn a_head_that_starts_like_the_preface_is_h1() {
        let (mut client, mut guard) = guarded();
        arrive(
            &mut client,
            &mut guard,
            &[b"P", b"OST / HTTP/1.1\r\nHost: a\r\n"],
        )
        .await;
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(HEADER_TIMEOUT * 20, guard.read(&mut buf)).await;
        assert!(matches!(ended, Ok(Ok(0))), "{ended:?}");
        let mut said = vec![0u8; 64];
        let n = client.read(&mut said).await.unwrap();
        assert!(
            said[..n].starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&said[..n])
        );
    }
}
