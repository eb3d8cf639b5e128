//! One worker's connections to one cluster's endpoints, on hyper's
//! connection API (`hyper::client::conn`): HTTP/1.1 connections kept alive
//! and reused one request at a time, and one multiplexed HTTP/2 connection
//! per endpoint.
//!
//! Idle HTTP/1.1 connections wait in a list per endpoint (at most the
//! cluster's `pool_max_idle`, each for at most `pool_idle_timeout`, the
//! most recently used first). A connection goes back to the list when its
//! response body has been read to the end, not before (hyper cannot send
//! the next request on it until then); a response dropped early, or one
//! that switched protocols (101), closes its connection instead. HTTP/2
//! (`protocol = "http2"`: h2c, or TLS whose ALPN offers only `h2`) uses
//! one connection per endpoint for every request. It is in the pool from
//! the moment it is dialed, TLS and ALPN included, so requests that come
//! while it opens wait for that one handshake (and share its failure)
//! instead of each dialing its own. An HTTP/1.1 cluster's TLS offers only
//! `http/1.1`, so a connection dialed for one request is never HTTP/2.
//!
//! An HTTP/1.1 connection whose response ended before its request body was
//! all sent (an early 401/413) cannot take the next request until that
//! body is out: it waits off the pool (at most `pool_idle_timeout`) and
//! joins the list only once hyper says it is ready, so a request never
//! waits behind another client's body on a pooled connection.
//!
//! The pool is the worker's own (each worker builds its [`super::Upstream`]s),
//! so its lock is never contended: it is there because the request futures
//! must be `Send`, not for other threads. The lists are keyed by endpoint
//! address with a cheap hash (no SipHash per request). A sweeper task per
//! pool, running while the pool holds any connection, closes idle HTTP/1.1
//! connections and HTTP/2 connections with no request in flight once they
//! outstay `pool_idle_timeout`.
//!
//! A request that meets a reused connection closing under it is sent on
//! another one (it never left: hyper gives it back); any other failure goes
//! to [`super::send`], which decides whose fault it was.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared as SharedFuture};
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::balance::now_nanos;
use super::connector::{Counted, CountingConnector};
use super::send::SendBody;
use super::BoxError;
use crate::tls::UpstreamConn;

/// Why the pool could not get an answer.
#[derive(Debug)]
pub enum PoolError {
    /// No connection: the dial, the TLS handshake or the cluster's
    /// connection limit (the connector's error).
    Connect(BoxError),
    /// The request failed on an open connection.
    Send(hyper::Error),
}

/// Settings of one pool (from the cluster's).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub h2_only: bool,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

#[derive(Debug)]
pub struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    connector: CountingConnector,
    settings: PoolSettings,
    /// A std Mutex, not a lock-free cell: the pool is one worker's, so it
    /// is never contended, but the request futures holding it must be `Send`.
    idle: Mutex<HashMap<SocketAddr, Idle, BuildHasherDefault<AddrHasher>>>,
    sweeping: AtomicBool,
    /// Numbers the HTTP/2 connections, so a request that found its
    /// connection closed forgets that one and not its replacement.
    next_h2: AtomicU64,
}

/// An HTTP/2 connection being opened, or open: every request to the
/// endpoint awaits the same one.
type H2Conn = SharedFuture<Pin<Box<dyn Future<Output = Result<H2Open, ConnectFailed>> + Send>>>;

/// An open HTTP/2 connection: its sender, and what filters may read of it.
type H2Open = (http2::SendRequest<SendBody>, Arc<UpstreamConn>);

/// An HTTP/1.1 connection that can take a request, and what filters may
/// read of it (the response carries it: `upstream.*`).
struct H1 {
    tx: http1::SendRequest<SendBody>,
    info: Arc<UpstreamConn>,
}

/// A failed connect, shared by every request that waited for it. Its
/// source is the connector's error itself, so the verdict is the same as
/// for a connect of one's own.
#[derive(Debug, Clone)]
pub struct ConnectFailed(Arc<BoxError>);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

/// An endpoint's HTTP/2 connection.
struct H2Slot {
    id: u64,
    conn: H2Conn,
    activity: Arc<H2Activity>,
}

impl H2Slot {
    /// Whether requests may still go on it (open, or still opening).
    fn usable(&self) -> bool {
        match self.conn.peek() {
            None => true,
            Some(Ok((tx, _))) => !tx.is_closed(),
            Some(Err(_)) => false,
        }
    }
}

/// What the idle sweep needs to know of an HTTP/2 connection.
#[derive(Default)]
struct H2Activity {
    in_flight: AtomicUsize,
    /// When the last request on it ended ([`now_nanos`]).
    last_used: AtomicU64,
}

/// A request's hold on an HTTP/2 connection, from taking it until the
/// response body is dropped: the sweep closes only connections none hold.
struct H2Use(Arc<H2Activity>);

impl H2Use {
    fn new(activity: &Arc<H2Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for H2Use {
    fn drop(&mut self) {
        self.0.last_used.store(now_nanos(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint's reusable connections.
#[derive(Default)]
struct Idle {
    /// Idle HTTP/1.1 connections with when they went idle
    /// ([`now_nanos`]); the last is the most recently used.
    h1: Vec<(u64, H1)>,
    /// The endpoint's HTTP/2 connection, shared by all requests.
    h2: Option<H2Slot>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("h1", &self.h1.len())
            .field("h2", &self.h2.is_some())
            .finish()
    }
}

/// A connection taken for one request.
enum Taken {
    H1(H1),
    H2 {
        id: u64,
        conn: H2Conn,
        using: H2Use,
        /// Dialed for this request (not reused): its failure is the
        /// request's, not a reason to try another connection.
        fresh: bool,
    },
}

impl Pool {
    pub fn new(connector: CountingConnector, settings: PoolSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                settings,
                idle: Mutex::new(HashMap::default()),
                sweeping: AtomicBool::new(false),
                next_h2: AtomicU64::new(0),
            }),
        }
    }

    /// Sends `req` to `addr` on a pooled connection, or a new one.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<SendBody>,
    ) -> Result<Response<ResponseBody>, PoolError> {
        // Reused connections first; one that closed before taking the
        // request gives it back, and the next one (or a new one) gets it.
        while let Some(taken) = self.take(addr) {
            match taken {
                Taken::H2 {
                    id,
                    conn,
                    using,
                    fresh,
                } => {
                    let (mut tx, info) = conn.await.map_err(|e| PoolError::Connect(Box::new(e)))?;
                    if tx.ready().await.is_err() {
                        self.forget_h2(addr, id);
                        if fresh {
                            return Err(PoolError::Connect(
                                "the new HTTP/2 connection closed".into(),
                            ));
                        }
                        continue;
                    }
                    origin_form(&mut req, true);
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|b| ResponseBody::h2(b, using, info))),
                        Err(mut e) => match e.take_message() {
                            Some(back) if !fresh => {
                                self.forget_h2(addr, id);
                                req = back;
                            }
                            _ => return Err(PoolError::Send(e.into_error())),
                        },
                    }
                }
                // Only connections that were ready when pooled are taken,
                // and none is awaited: one that is not ready any more
                // gives the request back at once.
                Taken::H1(H1 { mut tx, info }) => {
                    origin_form(&mut req, false);
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(self.lease(addr, H1 { tx, info }, resp)),
                        Err(mut e) => match e.take_message() {
                            Some(back) => req = back,
                            None => return Err(PoolError::Send(e.into_error())),
                        },
                    }
                }
            }
        }
        // HTTP/1.1 here: an HTTP/2 cluster's requests all went through
        // `take`, and an HTTP/1.1 cluster's TLS offers only `http/1.1` by
        // ALPN, so its connections cannot turn out to be HTTP/2.
        let io = dial(&self.shared.connector, addr).await?;
        let info = io.info();
        let (mut tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        origin_form(&mut req, false);
        let resp = tx.send_request(req).await.map_err(PoolError::Send)?;
        Ok(self.lease(addr, H1 { tx, info }, resp))
    }

    /// An open connection to `addr`, if the pool has one; for an HTTP/2
    /// cluster, the endpoint's connection, dialed now if there is none.
    fn take(&self, addr: SocketAddr) -> Option<Taken> {
        let mut idle = self.shared.lock();
        if self.shared.settings.h2_only {
            let slot = idle.entry(addr).or_default();
            if let Some(h2) = slot.h2.as_ref().filter(|h2| h2.usable()) {
                return Some(Taken::H2 {
                    id: h2.id,
                    conn: h2.conn.clone(),
                    using: H2Use::new(&h2.activity),
                    fresh: false,
                });
            }
            let connector = self.shared.connector.clone();
            let conn: H2Conn = async move {
                let io = dial(&connector, addr).await?;
                let info = io.info();
                Ok((handshake_h2(io).await?, info))
            }
            .map(|r: Result<H2Open, PoolError>| {
                r.map_err(|e| ConnectFailed(Arc::new(e.into_box())))
            })
            .boxed()
            .shared();
            let activity = Arc::new(H2Activity::default());
            activity.last_used.store(now_nanos(), Ordering::Relaxed);
            let id = self.shared.next_h2.fetch_add(1, Ordering::Relaxed);
            let using = H2Use::new(&activity);
            slot.h2 = Some(H2Slot {
                id,
                conn: conn.clone(),
                activity,
            });
            drop(idle);
            self.shared.watch();
            return Some(Taken::H2 {
                id,
                conn,
                using,
                fresh: true,
            });
        }
        // An HTTP/1.1 cluster's slots hold no HTTP/2 connection (its TLS
        // offers only `http/1.1`), so only its idle HTTP/1.1 ones are looked at.
        let slot = idle.get_mut(&addr)?;
        let oldest = now_nanos().saturating_sub(self.idle_nanos());
        while let Some((since, h1)) = slot.h1.pop() {
            if since >= oldest && h1.tx.is_ready() {
                return Some(Taken::H1(h1));
            }
        }
        None
    }

    /// Drops `addr`'s HTTP/2 connection `id` (not a newer one): it would
    /// not take a request, so the next one dials a new connection (rather
    /// than loop on this one).
    fn forget_h2(&self, addr: SocketAddr, id: u64) {
        if let Some(slot) = self.shared.lock().get_mut(&addr) {
            if slot.h2.as_ref().is_some_and(|h2| h2.id == id) {
                slot.h2 = None;
            }
        }
    }

    fn idle_nanos(&self) -> u64 {
        u64::try_from(self.shared.settings.idle_timeout.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The response, holding its HTTP/1.1 connection until its body ends.
    fn lease(&self, addr: SocketAddr, h1: H1, resp: Response<Incoming>) -> Response<ResponseBody> {
        // A connection that switched protocols is the tunnel's now.
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return resp.map(|b| ResponseBody::plain(b, h1.info));
        }
        let conn = h1.info.clone();
        let lease = Lease {
            pool: Arc::downgrade(&self.shared),
            addr,
            h1,
        };
        let (parts, body) = resp.into_parts();
        let mut body = ResponseBody {
            inner: body,
            lease: Some(lease),
            _using: None,
            conn,
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        Response::from_parts(parts, body)
    }
}

/// A new connection to `addr`.
async fn dial(connector: &CountingConnector, addr: SocketAddr) -> Result<Counted, PoolError> {
    // The connector dials `http://ip:port` (TLS is the cluster's
    // setting, not the scheme's).
    let uri = http::Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(addr.to_string())
        .path_and_query("/")
        .build()
        .map_err(|e| PoolError::Connect(Box::new(e)))?;
    let mut connector = connector.clone();
    tower_service::Service::<http::Uri>::call(&mut connector, uri)
        .await
        .map_err(PoolError::Connect)
}

/// The HTTP/2 handshake on a new connection, whose driver runs as its own
/// task until every sender is dropped.
async fn handshake_h2(io: Counted) -> Result<http2::SendRequest<SendBody>, PoolError> {
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(crate::config::H2_KEEPALIVE_INTERVAL))
        .keep_alive_timeout(crate::config::H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .map_err(|e| PoolError::Connect(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(tx)
}

impl PoolError {
    fn into_box(self) -> BoxError {
        match self {
            Self::Connect(e) => e,
            Self::Send(e) => Box::new(e),
        }
    }
}

impl Shared {
    /// The lists. A panic while they were held leaves them consistent (no
    /// code under the lock can leave a half-made entry), so a poisoned
    /// lock is used as is rather than disabling the pool.
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Idle, BuildHasherDefault<AddrHasher>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the sweeper if it is not running.
    fn watch(self: &Arc<Self>) {
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Puts an HTTP/1.1 connection whose response is over back in its
    /// list, once it can take the next request.
    fn put(self: &Arc<Self>, addr: SocketAddr, mut h1: H1) {
        if h1.tx.is_closed() || self.settings.max_idle == 0 {
            return;
        }
        if !h1.tx.is_ready() {
            // The request body may still be going out (the upstream
            // answered early): hyper takes the next request only after it.
            // Waits here, not in the next request, at most the idle
            // timeout; a connection that never gets ready is closed.
            let pool = Arc::downgrade(self);
            let within = self.settings.idle_timeout;
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(within, h1.tx.ready()).await {
                    if let Some(pool) = pool.upgrade() {
                        pool.keep(addr, h1);
                    }
                }
            });
            return;
        }
        self.keep(addr, h1);
    }

    /// Adds a ready HTTP/1.1 connection to `addr`'s list.
    fn keep(self: &Arc<Self>, addr: SocketAddr, h1: H1) {
        let mut idle = self.lock();
        let slot = idle.entry(addr).or_default();
        if slot.h1.len() >= self.settings.max_idle && !slot.h1.is_empty() {
            // Full: the oldest goes.
            slot.h1.remove(0);
        }
        slot.h1.push((now_nanos(), h1));
        drop(idle);
        self.watch();
    }

    /// Closes connections idle for longer than the timeout (HTTP/2 ones
    /// with no request in flight); true while some are left to watch.
    fn sweep(&self) -> bool {
        let limit = u64::try_from(self.settings.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let oldest = now_nanos().saturating_sub(limit);
        let mut idle = self.lock();
        idle.retain(|_, slot| {
            slot.h1
                .retain(|(since, h1)| *since >= oldest && !h1.tx.is_closed());
            if let Some(h2) = &slot.h2 {
                let unused = h2.activity.in_flight.load(Ordering::Relaxed) == 0
                    && h2.activity.last_used.load(Ordering::Relaxed) < oldest;
                if unused || !h2.usable() {
                    slot.h2 = None;
                }
            }
            !slot.h1.is_empty() || slot.h2.is_some()
        });
        let left = !idle.is_empty();
        if !left {
            self.sweeping.store(false, Ordering::Relaxed);
        }
        left
    }
}

/// Runs while the pool holds connections, every idle timeout
/// (at least each second, so a long timeout still frees closed ones).
async fn sweep(pool: Weak<Shared>) {
    loop {
        let every = match pool.upgrade() {
            Some(p) => p
                .settings
                .idle_timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(30)),
            None => return,
        };
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) if p.sweep() => {}
            _ => return,
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange.
struct Lease {
    pool: Weak<Shared>,
    addr: SocketAddr,
    h1: H1,
}

/// An upstream response's body. Over HTTP/1.1 it holds the connection
/// until the body ends, then gives it back to the pool.
pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
    /// Over HTTP/2, the hold that keeps the connection from the idle sweep.
    _using: Option<H2Use>,
    /// What filters may read of the connection it came on (`upstream.*`):
    /// one reference count per response, nothing allocated.
    conn: Arc<UpstreamConn>,
}

impl ResponseBody {
    fn plain(inner: Incoming, conn: Arc<UpstreamConn>) -> Self {
        Self {
            inner,
            lease: None,
            _using: None,
            conn,
        }
    }

    fn h2(inner: Incoming, using: H2Use, conn: Arc<UpstreamConn>) -> Self {
        Self {
            inner,
            lease: None,
            _using: Some(using),
            conn,
        }
    }

    /// The facts of the connection this response came on.
    pub fn conn(&self) -> &Arc<UpstreamConn> {
        &self.conn
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Some(pool) = lease.pool.upgrade() {
                pool.put(lease.addr, lease.h1);
            }
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("pooled", &self.lease.is_some())
            .finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // A failed body leaves the connection unusable: dropped.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/1.1 sends the origin form (`/path?query`), with the Host header
/// `rewrite` set; HTTP/2 the absolute form, from which hyper takes
/// `:scheme` and `:authority`. Each connection speaks its own version.
fn origin_form(req: &mut Request<SendBody>, h2: bool) {
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        return;
    }
    if req.version() == Version::HTTP_2 {
        *req.version_mut() = Version::HTTP_11;
    }
    if req.uri().scheme().is_some() {
        if !req.headers().contains_key(http::header::HOST) {
            if let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(http::header::HOST, host);
            }
        }
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(path);
    }
}

/// FxHash-style hashing of a socket address: the pool looks one up per
/// request, and the keys are ours, not an attacker's choice.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}
