//! Forwarding one request: route it, pick an endpoint, send it upstream,
//! and bring the response back.
//!
//! Runs on the worker that accepted the connection and never leaves it. One
//! snapshot load per request, in [`handle`], which gathers what the request
//! path may read into a [`Ctx`]; after that, no locks. The path itself is
//! a chain of named phases (`phases`: precheck, request filters, route,
//! the upstream request, respond), generic over the client's body type so
//! they are unit-tested on hand-built requests. Sending, retries and the
//! verdict on a failed try belong to `upstream`. Bodies stream in both
//! directions. Every failure becomes a [`ProxyError`] with its
//! `x-wasp-error` code, in [`respond_error`], the one place that maps
//! errors to responses and the log line; every answer wasp makes (those,
//! and the filter chain's own) carries its code and is counted once, in
//! [`serve`]. Each request's stream
//! deadlines (`stream_idle_timeout`, `request_timeout`) live in
//! `deadline`; the response-header deadline is the route's timeout
//! (default 15 s, `config::route_timeout`).

mod body;
mod deadline;
pub mod error;
mod filtered;
mod headers;
mod phases;
#[cfg(test)]
mod tests;
mod upgrade;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub(crate) use deadline::later;
// `wasp filter test` applies the same header hygiene around a filter.
pub use error::{local_response, ProxyError};
pub(crate) use headers::{add_forwarding, append_via, strip_hop_by_hop};
pub(crate) use phases::VIA_H1;

use crate::errors::ErrorCode;
use crate::filter::StreamInfo;
use crate::snapshot::{ListenerSnapshot, Snapshot, Snapshots};
use crate::telemetry::RequestStats;
use crate::upstream::{self, ProxyBody, Upstreams};
use body::Tracked;
pub use deadline::Watchdog;
use deadline::{StreamClock, Watched};
use filtered::SharedChain;

/// What a request needs to know about the connection it came on.
#[derive(Debug)]
pub struct ConnCtx {
    pub snapshots: Arc<Snapshots>,
    /// The worker's upstream pools.
    pub pools: Arc<upstream::WorkerPools>,
    /// The listener's name. Each request finds it in its own snapshot, as a
    /// reload may add or remove listeners around it.
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    pub activity: Arc<Activity>,
    /// The peer's identity from its TLS client certificate (URI SAN, else
    /// DNS SAN); `None` without mTLS. Filters read it as `source.principal`.
    pub principal: Option<Arc<str>>,
    /// The connection's TLS facts for filters; `None` on plain text.
    pub tls: Option<Arc<crate::tls::ConnTls>>,
    /// The listener's "drain deadline passed" signal, for tasks that outlive
    /// the hyper connection (upgrade tunnels).
    pub drain_deadline: tokio::sync::watch::Receiver<bool>,
    /// Where the client meant to connect, on a capture listener (iptables
    /// redirected it here): a request no route claims, and routes to the
    /// built-in `passthrough` cluster, go there.
    pub original_dst: Option<SocketAddr>,
    /// The peer's address as an `X-Forwarded-For` value, made by the
    /// connection's first request (`headers::client_value`).
    pub forwarded_for: std::sync::OnceLock<HeaderValue>,
    /// Watches the connection's HTTP/2 response bodies (`deadline::Watched`).
    pub watchdog: Watchdog,
}

/// Requests started and finished on one connection; the connection guard
/// reads these to tell "waiting for a request head" from "busy".
#[derive(Debug, Default)]
pub struct Activity {
    pub started: AtomicU64,
    pub finished: AtomicU64,
    /// Set once the connection switched protocols (101): its bytes are a
    /// tunnel from then on, and the guard stops looking at them.
    pub upgraded: AtomicBool,
}

impl Activity {
    pub fn busy(&self) -> bool {
        self.started.load(Ordering::Acquire) != self.finished.load(Ordering::Acquire)
    }
}

/// Marks a request finished when dropped, whichever way it ends.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Release);
    }
}

/// What the request path reads about the running proxy and the connection.
/// Built in one place ([`handle`]), from the snapshot and the worker's
/// pools; the phases see nothing else.
pub(crate) struct Ctx<'a> {
    /// The listener's settings (through `Deref`), routes and series.
    pub listener: &'a ListenerSnapshot,
    /// The generation's filters and cluster names.
    pub snapshot: &'a Snapshot,
    /// This worker's pools and balancers.
    pub upstreams: &'a Upstreams,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    pub principal: Option<&'a Arc<str>>,
    pub tls: Option<&'a Arc<crate::tls::ConnTls>>,
    pub activity: &'a Activity,
    pub drain_deadline: &'a tokio::sync::watch::Receiver<bool>,
    /// The connection's watchdog over h2 response bodies.
    pub watchdog: &'a Watchdog,
    /// The connection's original destination (capture listeners).
    pub original_dst: Option<SocketAddr>,
    /// The peer's address as an `X-Forwarded-For` value (`None`: made
    /// when needed).
    pub forwarded_for: Option<&'a HeaderValue>,
}

/// What the request's log line, metrics and trace need, filled in by the
/// phases as they learn it. Owned by the caller, so it survives a phase
/// that fails.
#[derive(Default)]
pub(crate) struct RequestLog {
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    /// The route and cluster's series; `None` counts as unrouted.
    pub stats: Option<RequestStats>,
    /// The stream's deadlines, for the h2 watchdog around the response.
    pub clock: Option<Arc<StreamClock>>,
    /// Whose filter chain the request runs (`phases::client_chain`): the
    /// route at this index, or the listener's (`None`). An index, not the
    /// chain's `Arc`: no shared counter touched per request.
    pub client_route: Option<usize>,
}

/// Serves one request. Never fails: errors become local responses.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    conn.activity.started.fetch_add(1, Ordering::Release);
    let in_flight = InFlight(conn.activity.clone());
    let start = Instant::now();
    // The running proxy, read once per request.
    let snapshot = conn.snapshots.load_full();
    let Some(listener) = snapshot.listener(&conn.listener) else {
        // A reload removed the listener while this request's head was
        // arriving; its connection is closing.
        tracing::info!(
            listener = %conn.listener,
            peer = %conn.peer,
            "request answered 503 listener_removed: its listener was removed by a reload"
        );
        return Ok(listener_removed(&conn.listener));
    };
    let upstreams = conn
        .pools
        .upstreams(snapshot.generation, &snapshot.clusters);
    let ctx = Ctx {
        listener,
        snapshot: &snapshot,
        upstreams: &upstreams,
        peer: conn.peer,
        local: conn.local,
        scheme: conn.scheme,
        principal: conn.principal.as_ref(),
        tls: conn.tls.as_ref(),
        activity: &conn.activity,
        drain_deadline: &conn.drain_deadline,
        watchdog: &conn.watchdog,
        original_dst: conn.original_dst,
        forwarded_for: Some(
            conn.forwarded_for
                .get_or_init(|| headers::client_value(conn.peer.ip())),
        ),
    };
    Ok(serve(req, &ctx, start, in_flight).await)
}

/// One request from head to response: the phases ([`phases::forward`]),
/// then the one place a failure becomes the response, and the metrics,
/// trace and filter log that close every request.
async fn serve<B>(
    mut req: Request<B>,
    ctx: &Ctx<'_>,
    start: Instant,
    in_flight: InFlight,
) -> Response<ProxyBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<upstream::BoxError>,
{
    let h2 = req.version() == Version::HTTP_2;
    // One id for the request everywhere: upstream header, filters, logs.
    let request_id = ensure_request_id(req.headers_mut());
    // Spans (when tracing is on) start their clock here.
    let mut trace = crate::telemetry::trace::begin(&req, ctx.peer, ctx.local, ctx.scheme);
    let mut log = RequestLog::default();
    let (chain, result) = match phases::client_chain(&mut req, ctx) {
        Ok(index) => {
            log.client_route = index;
            let filters = ctx.listener.chains.of(index);
            let chain = start_chain(&req, ctx, &request_id, filters);
            let result = phases::forward(req, ctx, chain.as_ref(), trace.as_mut(), &mut log).await;
            (chain, result)
        }
        // A path the routes cannot judge: no filter has run on it.
        Err(e) => (None, Err(e)),
    };
    let (resp, logged) = match result {
        Ok(resp) => (resp, false),
        Err(err) => (respond_error(ctx, &log, &request_id, err), true),
    };
    // Every answer wasp made instead of forwarding, whichever phase made
    // it (a failure above, or the filter chain's own: a filter that
    // failed closed, a body over a filter's buffer): counted once, here,
    // and shown to the trace and to `on_log` (`wasp.error`, and the
    // status the client got although no response callback ran).
    if let Some(code) = ErrorCode::of_response(&resp) {
        ctx.listener.stats.error(code);
        if !logged {
            tracing::warn!(
                listener = %ctx.listener.name,
                route = %log.route.as_deref().unwrap_or("-"),
                cluster = %log.cluster.as_deref().unwrap_or("-"),
                peer = %ctx.peer,
                code = %code,
                status = resp.status().as_u16(),
                request_id = %request_id.to_str().unwrap_or("-"),
                "the filter chain answered for wasp instead of forwarding"
            );
        }
        if let Some(t) = &mut trace {
            t.error(code.as_str());
        }
        if let Some(c) = &chain {
            c.with(|c| c.set_local_reply(code.as_str(), &resp));
        }
    }
    let status = resp.status().as_u16();
    if let Some(t) = trace {
        t.finish(status, log.route.as_ref());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = log.stats.unwrap_or_else(|| ctx.listener.unrouted.clone());
    stats.record(status, elapsed);
    // The connection counts as busy until hyper has finished with the body.
    let (parts, body) = resp.into_parts();
    let body = Tracked::new(body, move |bytes| {
        if let Some(c) = chain {
            c.finish(bytes);
        }
        drop(in_flight)
    })
    .boxed_unsync();
    // hyper polls an h2 body only while the client's window has room: the
    // watchdog ends a stream the client stopped taking (`deadline::Watched`).
    let body = match log.clock {
        Some(clock) if h2 && !body.is_end_stream() => {
            Watched::wrap(body, clock, ctx.listener.stats.clone(), ctx.watchdog)
        }
        _ => body,
    };
    Response::from_parts(parts, body)
}

/// The request's filter chain through `filters` (its route's pipeline, or
/// its listener's), when that is not empty.
fn start_chain<B>(
    req: &Request<B>,
    ctx: &Ctx<'_>,
    request_id: &HeaderValue,
    filters: &[crate::filter::PipelineEntry],
) -> Option<SharedChain> {
    let listener = ctx.listener;
    if filters.is_empty() {
        return None;
    }
    // The same id as the logs and the upstream, even when the client's is
    // not UTF-8 (checked a word at a time first: ids are ASCII).
    let request_id: Arc<str> = match request_id.to_str() {
        Ok(id) => Arc::from(id),
        Err(_) => Arc::from(String::from_utf8_lossy(request_id.as_bytes())),
    };
    let info = StreamInfo {
        listener: listener.name.clone(),
        source: ctx.peer,
        destination: ctx.local,
        scheme: ctx.scheme,
        protocol: if req.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        request_id,
        start: std::time::SystemTime::now(),
        principal: ctx.principal.cloned(),
        tls: ctx.tls.cloned(),
    };
    Some(SharedChain::new(
        ctx.snapshot.filters.route_stream(filters, info),
    ))
}

pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// 128 random bits as 32 lowercase hex digits, formatted on the stack.
fn request_id_hex() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    out
}

/// The request's `x-request-id`, added when the client sent none.
pub(crate) fn ensure_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        return v.clone();
    }
    let v = HeaderValue::from_bytes(&request_id_hex()).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID, v.clone());
    v
}

/// A request on a listener a reload has just removed: 503, and the
/// connection closes.
fn listener_removed(name: &str) -> Response<ProxyBody> {
    let mut resp = error::local_response(
        ErrorCode::ListenerRemoved,
        &format!("listener \"{name}\" was removed by a reload"),
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The one place a [`ProxyError`] becomes a response and a log line
/// (`serve` counts it, as every answer wasp makes).
fn respond_error(
    ctx: &Ctx<'_>,
    log: &RequestLog,
    request_id: &HeaderValue,
    err: ProxyError,
) -> Response<ProxyBody> {
    tracing::warn!(
        listener = %ctx.listener.name,
        route = %log.route.as_deref().unwrap_or("-"),
        cluster = %log.cluster.as_deref().unwrap_or("-"),
        peer = %ctx.peer,
        principal = %ctx.principal.map_or("-", |p| &**p),
        code = %err.code(),
        status = err.status().as_u16(),
        request_id = %request_id.to_str().unwrap_or("-"),
        "{err}"
    );
    err.to_response()
}
