//! Listeners: binding the sockets and serving connections on a worker.
//!
//! Every worker gets its own listening socket per listener, bound with
//! `SO_REUSEPORT` so the kernel spreads connections across workers and no
//! accept lock is shared. Sockets are bound on the control thread before
//! the workers start, so a bind error stops start-up with a clear message.
//! Each connection serves HTTP/1.1 and prior-knowledge HTTP/2 on the same
//! port (hyper-util's auto builder reads the preface), with upgrades.
//!
//! A listener with `tls` terminates TLS first (rustls; ALPN offers h2 and
//! http/1.1, and the auto builder still tells them apart by the preface).
//! The handshake runs in the connection's task with the header timeout as
//! its deadline; a failure is logged once with its reason and counted. The
//! peer's certificate identity rides along in [`ConnCtx::principal`].
//!
//! A `protocol = "tcp"` listener hands each connection to `crate::l4`; a
//! capture listener reads the original destination and lets
//! `crate::capture::classify` decide, in the connection's own task, between
//! the HTTP path here (bytes untouched: detection only peeks) and `l4`.
//!
//! A serve loop knows its listener by name and reads the listener's settings
//! (limits, TLS, routes) from the current snapshot at each accept, so a
//! reload that keeps the listener changes them for new connections without
//! touching the socket. Reloads add and remove whole listeners through
//! [`ListenerSet`].
//!
//! Deadlines: the guard times heads, idle connections and busy connections
//! on which nothing moves (`stream_idle_timeout`); each request's stream
//! has its own deadlines in `forward::deadline`; HTTP/2 connections send
//! keepalive pings so a vanished peer is found.
//!
//! A connection's slot (open-connection count and gauge) lives in its
//! [`Guarded`] socket wrapper, so it is given back when the socket closes,
//! not when hyper lets go of it: an upgraded connection (WebSocket) still
//! counts, and is still drained, while its tunnel runs. Draining waits for
//! every socket up to the drain timeout, then closes whatever is left.

mod guard;
mod head;
mod set;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::errors::ErrorCode;
use crate::forward::{self, Activity, ConnCtx};
use crate::lifecycle::Lifecycle;
use crate::snapshot::Snapshots;
use crate::telemetry::Metrics;
use crate::upstream::WorkerPools;
use guard::Guarded;
pub use set::{ListenerSet, Plan, Retire, Serve, WorkerListeners};

/// TCP keepalive on every accepted connection: a peer that vanished without
/// a FIN (NAT timeout, pulled cable) is found within about two minutes. It
/// matters most for upgrade tunnels, which no idle timeout closes.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// Binds `workers` sockets on `addr` with `SO_REUSEPORT`. With port 0 the
/// first socket picks the port and the others share it. Accepted sockets
/// inherit `TCP_NODELAY` and the keepalive settings from these (Linux), so
/// accepting costs no extra system calls.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nodelay(true)?;
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES),
        )?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Accepts and serves connections until the listener drains (shutdown) or
/// is retired (removed by a reload), then drains: no new connections, open
/// ones close after their current request, in-flight requests finish and
/// tunnels end, up to the drain timeout; then the rest are closed.
/// What one worker's serve loops work with: the published snapshots, the
/// drain signals, the metrics and the worker's own upstream pools.
#[derive(Clone, Debug)]
pub struct Worker {
    pub snapshots: Arc<Snapshots>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<Metrics>,
    pub pools: Arc<WorkerPools>,
}

pub async fn serve(job: Serve, worker: Worker) {
    let Serve {
        name,
        outbound,
        socket,
        retire,
    } = job;
    let mut shutdown = worker.lifecycle.drain_signal(outbound);
    let Retire {
        signal: mut retired,
        ack,
    } = retire;
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %name, "cannot register a listening socket: {e}");
            return;
        }
    };
    let local = listener.local_addr().ok();
    let graceful = GracefulShutdown::new();
    // Turns true when the drain timeout passes: every connection of this
    // loop (and every tunnel it became) closes.
    let (close, close_rx) = watch::channel(false);
    // Never sent on: each connection's slot holds a clone, so `recv` gives
    // `None` once every socket of this loop is closed.
    let (tracker, mut sockets) = mpsc::channel::<()>(1);
    // Rebuilt when a reload changes the snapshot (limits may have changed).
    let mut http: Option<(u64, auto::Builder<BoxingExecutor>)> = None;
    let mut was_retired = false;
    // Once draining starts, the connections the kernel has already
    // accepted (the backlog) are taken and served before the socket
    // closes: their clients see a connection that succeeded, and closing
    // the socket would reset them.
    let mut closing = false;
    loop {
        let accepted = if closing {
            match accept_queued(&listener) {
                Some(a) => a,
                None => break,
            }
        } else {
            tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => {
                    closing = true;
                    continue;
                }
                // Only a real retirement: if the reload task that owns the
                // sender is gone (it panicked), this listener keeps serving.
                Ok(_) = retired.wait_for(|s| *s) => {
                    was_retired = true;
                    closing = true;
                    continue;
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let snapshot = worker.snapshots.load();
        let Some(cfg) = snapshot.listener(&name) else {
            // Removed by a reload that is about to retire this loop.
            tracing::info!(listener = %name, %peer, "connection closed: its listener was removed by a reload");
            continue;
        };
        let runtime = cfg;
        let builder = match &mut http {
            Some((generation, b)) if *generation == snapshot.generation => b,
            slot => {
                &mut slot
                    .insert((snapshot.generation, http_builder(cfg.limits)))
                    .1
            }
        };
        let open = runtime.open_connections.fetch_add(1, Ordering::AcqRel);
        if open >= cfg.limits.max_connections {
            runtime.open_connections.fetch_sub(1, Ordering::AcqRel);
            runtime.stats.error(ErrorCode::Overflow);
            // A TLS client cannot read a plaintext answer, nor can a TCP
            // one: just close.
            if cfg.tls.is_none() && !cfg.l4.below_http() {
                reject_overflow(stream, cfg.limits.max_connections);
            }
            continue;
        }
        runtime.stats.accepted.inc();
        runtime.stats.open.inc();
        let done = Closed {
            counter: runtime.open_connections.clone(),
            stats: runtime.stats.clone(),
            _tracker: tracker.clone(),
        };
        let limits = cfg.limits;
        // The address this connection arrived on: on a listener bound to
        // 0.0.0.0/[::] that is a real address, not the wildcard.
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        if cfg.l4.below_http() {
            // Detection (and TCP routing) run in the connection's own task.
            let original = cfg
                .l4
                .capture
                .and_then(|mode| crate::capture::original_dst(&stream, mode, &snapshot.config));
            let below = BelowHttp {
                worker: worker.clone(),
                name: name.clone(),
                stream,
                addrs: (peer, local),
                original,
                done,
                watcher: graceful.watcher(),
                builder: builder.clone(),
                close: close_rx.clone(),
            };
            tokio::spawn(below.serve());
            continue;
        }
        let Some(tls) = cfg.tls.clone() else {
            let ctx = conn_ctx(
                &worker,
                &name,
                (peer, local),
                ("http", None, None),
                None,
                &close_rx,
            );
            let io = Guarded::new(stream, ctx.activity.clone(), &limits).tied(done);
            let service = service_fn(move |req| forward::handle(req, ctx.clone()));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(until_closed(conn, close_rx.clone(), peer));
            continue;
        };
        // TLS: the handshake runs in the connection's own task, bounded by
        // the header timeout, so a slow client never holds up the accept loop.
        tls.start(&worker.metrics);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let worker = worker.clone();
        let name = name.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let (config, local_certs) = tls.config_and_certs();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let accepted =
                tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tls.handshake_failed(peer, &e);
                    return;
                }
                Err(_) => {
                    tls.handshake_timed_out(peer, limits.header_timeout);
                    return;
                }
            };
            done.stats.tls_handshakes.inc();
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                done.stats.tls_resumed.inc();
            }
            let facts = Arc::new(crate::tls::ConnTls::of(stream.get_ref().1, &local_certs));
            let principal = facts.principal.clone();
            let ctx = conn_ctx(
                &worker,
                &name,
                (peer, local),
                ("https", principal, Some(facts)),
                None,
                &close_rx,
            );
            let io = Guarded::new(stream, ctx.activity.clone(), &limits).tied(done);
            let service = service_fn(move |req| forward::handle(req, ctx.clone()));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            until_closed(watcher.watch(conn), close_rx, peer).await;
        });
    }
    drop(listener);
    drop(tracker);
    // hyper closes a connection that is idle when graceful shutdown reaches
    // it, and one accepted a moment ago may not have read its first request
    // yet: give those tasks a few turns (each a run of the worker) first.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    let timeout = worker.snapshots.load().config.drain_timeout;
    let all_closed = async move {
        graceful.shutdown().await;
        // hyper's connections are done, but a tunnel outlives its hyper
        // connection: wait for the sockets themselves.
        while sockets.recv().await.is_some() {}
    };
    let mut drained = std::pin::pin!(tokio::time::timeout(timeout, all_closed));
    let mut outcome = None;
    if was_retired {
        // The first poll signals every connection (idle keep-alive ones
        // close, busy ones close after their current request); yielding
        // lets their tasks act on it before the reload swaps the snapshot.
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(r) = std::future::Future::poll(drained.as_mut(), cx) {
                outcome = Some(r);
            }
            std::task::Poll::Ready(())
        })
        .await;
        tokio::task::yield_now().await;
        let _ = ack.send(());
    }
    drop(ack);
    // (A future that already finished must not be polled again.)
    let outcome = match outcome {
        Some(r) => r,
        None => drained.await,
    };
    if outcome.is_err() {
        tracing::warn!(
            listener = %name,
            "drain timeout of {timeout:?} reached with connections still open; closing them"
        );
        // Their tasks (and tunnels) may outlive this loop on a worker that
        // keeps running (a reload): close them rather than let them serve on.
        close.send_replace(true);
    }
}

/// A connection already waiting in the listener's backlog, without
/// waiting for one: a plain non-blocking `accept`, as tokio's readiness
/// may not have seen the newest ones yet. `None` when the backlog is empty
/// (or accepting fails: draining goes on without it).
fn accept_queued(
    listener: &TcpListener,
) -> Option<std::io::Result<(tokio::net::TcpStream, SocketAddr)>> {
    let (socket, addr) = match socket2::SockRef::from(listener).accept() {
        Ok(pair) => pair,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
        Err(e) => {
            tracing::debug!("accepting the backlog while draining: {e}");
            return None;
        }
    };
    let stream: std::net::TcpStream = socket.into();
    let adopted = stream.set_nonblocking(true).and_then(|()| {
        let peer = addr.as_socket().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP peer")
        })?;
        Ok((tokio::net::TcpStream::from_std(stream)?, peer))
    });
    Some(adopted)
}

/// Runs one connection until it ends, or until its listener's drain
/// timeout passes: then dropping it closes the socket, whatever it was
/// doing (a tunnel it became ends on the same signal in its own task).
async fn until_closed<E: std::fmt::Display>(
    conn: impl std::future::Future<Output = Result<(), E>>,
    close: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    tokio::select! {
        ended = conn => {
            if let Err(e) = ended {
                tracing::debug!(%peer, "connection ended with an error: {e}");
            }
        }
        () = crate::lifecycle::drain_deadline_passed(close) => {
            tracing::debug!(%peer, "connection closed: the listener's drain timeout passed");
        }
    }
}

/// Gives a connection's slot back when the connection ends, however it ends.
/// Held by the connection's socket wrapper, so an upgrade keeps it.
struct Closed {
    counter: Arc<std::sync::atomic::AtomicUsize>,
    stats: crate::telemetry::ListenerStats,
    /// Keeps the serve loop's drain waiting for this socket.
    _tracker: mpsc::Sender<()>,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
        self.stats.open.dec();
    }
}

/// A connection on a `tcp` or capture listener, on its way to L4 or (when
/// detection finds HTTP) to the HTTP path, bytes untouched either way.
struct BelowHttp {
    worker: Worker,
    name: Arc<str>,
    stream: tokio::net::TcpStream,
    /// (peer, local)
    addrs: (SocketAddr, SocketAddr),
    original: Option<SocketAddr>,
    done: Closed,
    watcher: hyper_util::server::graceful::Watcher,
    builder: auto::Builder<BoxingExecutor>,
    close: watch::Receiver<bool>,
}

impl BelowHttp {
    async fn serve(self) {
        let (peer, local) = self.addrs;
        let snapshot = self.worker.snapshots.load_full();
        let Some(cfg) = snapshot.listener(&self.name) else {
            return;
        };
        let tcp = cfg.l4.is_tcp();
        // A `tcp` listener with `tls` terminates it in `l4`.
        if let Some(tls) = &cfg.tls {
            tls.start(&self.worker.metrics);
        }
        let class = if tcp {
            crate::capture::Class::Tcp { sni: None }
        } else {
            crate::capture::classify(&self.stream, self.original, &cfg.l4).await
        };
        let limits = cfg.limits;
        drop(snapshot);
        match class {
            crate::capture::Class::Http => {
                let ctx = conn_ctx(
                    &self.worker,
                    &self.name,
                    (peer, local),
                    ("http", None, None),
                    self.original,
                    &self.close,
                );
                let io = Guarded::new(self.stream, ctx.activity.clone(), &limits).tied(self.done);
                let service = service_fn(move |req| forward::handle(req, ctx.clone()));
                let conn = self
                    .builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                until_closed(self.watcher.watch(conn), self.close, peer).await;
            }
            crate::capture::Class::Tcp { sni } => {
                // The slot is held until the relay ends.
                let _slot = self.done;
                drop(self.watcher);
                let accepted = crate::l4::Accepted {
                    stream: self.stream,
                    peer,
                    dst: self.original.unwrap_or(local),
                    original_dst: self.original,
                    sni,
                    sniffed: !tcp,
                };
                crate::l4::proxy(
                    &self.worker.snapshots,
                    &self.worker.pools,
                    self.name,
                    accepted,
                    self.close,
                )
                .await;
            }
        }
    }
}

/// `(scheme, principal, tls)`: how the connection arrived, who the peer is
/// and the TLS facts filters may read.
fn conn_ctx(
    worker: &Worker,
    listener: &Arc<str>,
    (peer, local): (SocketAddr, SocketAddr),
    (scheme, principal, tls): ConnSecurity,
    original_dst: Option<SocketAddr>,
    close: &watch::Receiver<bool>,
) -> Arc<ConnCtx> {
    Arc::new(ConnCtx {
        snapshots: worker.snapshots.clone(),
        pools: worker.pools.clone(),
        listener: listener.clone(),
        peer,
        local,
        scheme,
        activity: Arc::new(Activity::default()),
        principal,
        tls,
        drain_deadline: close.clone(),
        original_dst,
        forwarded_for: Default::default(),
        watchdog: Default::default(),
    })
}

/// Spawns hyper's HTTP/2 stream tasks with their future boxed. A stream
/// task holds `forward::handle`'s future (the request path's state across
/// every await, several KiB), and tokio copies a task's future whole when
/// it is spawned (more than once on the way into the task cell) and again
/// when the task completes (`set_stage`); boxed, each of those copies is a
/// pointer, for one copy into the box and one allocation. Callgrind put
/// those copies at about 7k of the 73k instructions of an h2c request.
/// HTTP/1 connections run their request future in hyper's own per
/// connection box and are not affected; boxing the service's future
/// instead would have cost HTTP/1 about 2.7k per request.
#[derive(Clone, Copy, Debug, Default)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

type ConnSecurity = (
    &'static str,
    Option<Arc<str>>,
    Option<Arc<crate::tls::ConnTls>>,
);

fn http_builder(limits: crate::config::ListenerLimits) -> auto::Builder<BoxingExecutor> {
    let mut builder = auto::Builder::new(BoxingExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection guard enforces the head deadline and answers 408.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find a peer that vanished (or stopped reading) while its
        // streams wait; the guard does not count them as activity.
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    builder
}

/// Over the connection limit: answer 503 without reading and close.
fn reject_overflow(stream: tokio::net::TcpStream, limit: usize) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let resp = ErrorCode::Overflow
            .raw_http1(&format!("listener is at its limit of {limit} connections"));
        let mut stream = stream;
        let _ = stream.write_all(&resp).await;
        let _ = stream.shutdown().await;
    });
}
