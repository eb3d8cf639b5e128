//! Forwarding one request: route it, pick an endpoint, send it upstream,
//! and bring the response back.
//!
//! Runs on the worker that accepted the connection and never leaves it. One
//! snapshot load per request; after that, no locks. Bodies stream in both
//! directions. Every failure becomes a [`ProxyError`] with its
//! `x-wasp-error` code, in [`respond_error`], the one place that maps
//! errors to responses, metrics and the log line. Each request's stream
//! deadlines (`stream_idle_timeout`, `request_timeout`) live in
//! `deadline`; the response-header deadline is the route's timeout
//! (default 15 s, `config::route_timeout`).

mod body;
mod deadline;
pub mod error;
mod filtered;
mod headers;
mod retry;
mod upgrade;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub(crate) use deadline::later;
pub use error::{local_response, ProxyError};

use crate::errors::ErrorCode;
use crate::filter::{StreamInfo, Verdict};
use crate::server::{Shared, Snapshot};
use crate::telemetry::RequestStats;
use crate::upstream::balance::PickContext;
use crate::upstream::{self, ProxyBody, Upstream, Upstreams};
use body::{DownstreamBodyError, RequestBody, Tracked};
use deadline::{Cut, StreamClock, Timed, Watched};
use filtered::{FilteredBody, SharedChain, Side};

const VIA_H1: &str = "1.1 wasp";
const VIA_H2: &str = "2.0 wasp";

/// What a request needs to know about the connection it came on.
#[derive(Debug)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
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
    /// The listener's "drain deadline passed" signal, for tasks that outlive
    /// the hyper connection (upgrade tunnels).
    pub drain_deadline: tokio::sync::watch::Receiver<bool>,
    /// Where the client meant to connect, on a capture listener (iptables
    /// redirected it here): a request no route claims, and routes to the
    /// built-in `passthrough` cluster, go there.
    pub original_dst: Option<SocketAddr>,
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

/// Serves one request. Never fails: errors become local responses.
pub async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    conn.activity.started.fetch_add(1, Ordering::Release);
    let in_flight = InFlight(conn.activity.clone());
    let start = Instant::now();
    let h2 = req.version() == Version::HTTP_2;
    let snapshot = conn.shared.snapshot.load_full();
    let Some(li) = snapshot.listener_index(&conn.listener) else {
        // A reload removed the listener while this request's head was
        // arriving; its connection is closing.
        tracing::info!(
            listener = %conn.listener,
            peer = %conn.peer,
            "request answered 503 listener_removed: its listener was removed by a reload"
        );
        return Ok(listener_removed(&conn.listener));
    };
    let upstreams = crate::server::worker_upstreams(&conn.shared, &snapshot);
    // One id for the request everywhere: upstream header, filters, logs.
    let request_id = ensure_request_id(req.headers_mut());
    // Spans (when tracing is on) start their clock here.
    let mut trace = crate::telemetry::trace::begin(&req, conn.peer, conn.local, conn.scheme);
    let chain = start_chain(&req, &conn, &snapshot, li, &request_id);
    let mut outcome = forward(
        req,
        &conn,
        li,
        &snapshot,
        &upstreams,
        chain.as_ref(),
        trace.as_mut(),
    )
    .await;
    let stats = outcome.stats.take();
    let clock = outcome.clock.take();
    let resp = match outcome.result {
        Ok(resp) => resp,
        Err(err) => {
            if let Some(t) = &mut trace {
                t.error(err.code().as_str());
            }
            let code = err.code().as_str();
            let names = (&outcome.route, &outcome.cluster);
            let resp = respond_error(&conn, li, &snapshot, names, &request_id, err);
            if let Some(c) = &chain {
                c.with(|c| c.set_local_reply(code, &resp));
            }
            resp
        }
    };
    let status = resp.status().as_u16();
    if let Some(t) = trace {
        t.finish(status, outcome.route.as_ref());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = stats.unwrap_or_else(|| snapshot.listeners[li].unrouted.clone());
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
    let body = match clock {
        Some(clock) if h2 && !body.is_end_stream() => {
            Watched::wrap(body, clock, snapshot.listeners[li].stats.clone())
        }
        _ => body,
    };
    Ok(Response::from_parts(parts, body))
}

/// The request's filter chain, when its listener has a pipeline.
fn start_chain(
    req: &Request<Incoming>,
    conn: &ConnCtx,
    snapshot: &Snapshot,
    li: usize,
    request_id: &HeaderValue,
) -> Option<SharedChain> {
    let listener = &snapshot.config.listeners[li];
    if listener.pipeline.is_empty() {
        return None;
    }
    // The same id as the logs and the upstream, even when the client's is
    // not UTF-8.
    let request_id = Arc::from(String::from_utf8_lossy(request_id.as_bytes()));
    let info = StreamInfo {
        listener: listener.name.clone(),
        source: conn.peer,
        destination: conn.local,
        scheme: conn.scheme,
        protocol: if req.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        request_id,
        start: std::time::SystemTime::now(),
        principal: conn.principal.clone(),
    };
    Some(SharedChain::new(
        snapshot.filters.stream(&listener.pipeline, info),
    ))
}

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

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
fn ensure_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        return v.clone();
    }
    let v = HeaderValue::from_bytes(&request_id_hex()).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID, v.clone());
    v
}

/// Turns a filter's local answer into a response of the proxy's body type.
fn local_answer(resp: Response<bytes::Bytes>) -> Response<ProxyBody> {
    error::boxed(resp)
}

struct Outcome {
    result: Result<Response<ProxyBody>, ProxyError>,
    stats: Option<RequestStats>,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    /// The stream's deadlines, for the h2 watchdog around the response.
    clock: Option<Arc<StreamClock>>,
}

async fn forward(
    mut req: Request<Incoming>,
    conn: &ConnCtx,
    li: usize,
    snapshot: &Snapshot,
    upstreams: &Upstreams,
    chain: Option<&SharedChain>,
    mut trace: Option<&mut crate::telemetry::trace::RequestTrace>,
) -> Outcome {
    let mut out = Outcome {
        result: Err(ProxyError::BadRequest(String::new())),
        stats: None,
        route: None,
        cluster: None,
        clock: None,
    };
    let listener = &snapshot.config.listeners[li];
    let runtime = &snapshot.listeners[li];

    if let Err(e) = check_framing(&req, listener.limits.max_body_bytes) {
        out.result = Err(e);
        return out;
    }
    let clock = StreamClock::new(
        listener.limits.stream_idle_timeout,
        listener.limits.request_timeout,
    );
    out.clock = clock.clone();
    if let Some(allow) = &listener.allow {
        if !allow.permits(conn.principal.as_deref()) {
            out.result = Err(ProxyError::UnauthorizedPeer {
                scope: format!("listener \"{}\"", listener.name),
                principal: conn.principal.clone(),
            });
            return out;
        }
    }
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let downstream_version = req.version();
    let (mut parts, body) = req.into_parts();

    // Request-header filters run before routing, so they can steer it.
    if let Some(chain) = chain {
        if let Some(mut filters) = chain.take() {
            let verdict = filters
                .request_headers(&mut parts, body.is_end_stream())
                .await;
            chain.put(filters);
            if let Verdict::Respond(resp) = verdict {
                out.result = Ok(local_answer(resp));
                return out;
            }
        }
    }

    let host = authority(&parts).unwrap_or_default();
    let found = listener
        .routes
        .find(&host, parts.uri.path(), &parts.method, &parts.headers)
        // Captured: what no route claims goes where the app sent it.
        .or_else(|| {
            conn.original_dst
                .map(|_| (usize::MAX, crate::route::passthrough_route()))
        });
    let Some((route_index, route)) = found else {
        out.result = Err(ProxyError::NoRoute {
            listener: listener.name.to_string(),
            host,
            path: parts.uri.path().to_string(),
        });
        return out;
    };
    out.route = Some(route.name.clone());
    if let Some(Some(allow)) = listener.route_allow.get(route_index) {
        if !allow.permits(conn.principal.as_deref()) {
            out.result = Err(ProxyError::UnauthorizedPeer {
                scope: format!("route \"{}\"", route.name),
                principal: conn.principal.clone(),
            });
            return out;
        }
    }
    let mut cluster_id = route.pick_cluster(rand::random());
    // A filter may pick the cluster (e.g. a canary router).
    if let Some(name) = chain.and_then(|c| c.with(|c| c.property("wasp.cluster")).flatten()) {
        let name = String::from_utf8_lossy(&name);
        match snapshot.cluster_id(&name) {
            Some(id) => cluster_id = id,
            None => {
                out.result = Err(ProxyError::UnknownCluster(name.into_owned()));
                return out;
            }
        }
    }
    let Some(upstream) = upstreams.get(cluster_id) else {
        out.result = Err(ProxyError::UnknownCluster(cluster_id.to_string()));
        return out;
    };
    out.cluster = Some(upstream.name.clone());
    out.stats = runtime
        .route_stats
        .get(route_index)
        .and_then(|r| r.iter().find(|(c, _)| *c == cluster_id))
        .map(|(_, s)| s.clone())
        .or_else(|| {
            (route_index == usize::MAX)
                .then(|| runtime.passthrough.clone())
                .flatten()
        });
    // Circuit breakers, then the balancer (hash key from the request).
    let Some(mut admission) = upstream.admit() else {
        out.result = Err(ProxyError::Overflow(format!(
            "cluster \"{}\" is at its request limits (limits.max_requests / max_pending)",
            upstream.name
        )));
        return out;
    };
    let mut key_buf = [0u8; 16];
    let hash_key = upstream
        .state
        .hash_key(&parts.headers, conn.peer.ip(), &mut key_buf);
    let picked = if cluster_id == crate::route::PASSTHROUGH {
        conn.original_dst.map(|dst| upstream.direct(dst))
    } else {
        upstream.pick_first(&PickContext { hash_key }).await
    };
    let Some(picked) = picked else {
        out.result = Err(ProxyError::NoEndpoint(upstream.name.to_string()));
        return out;
    };
    let endpoint = picked.addr;
    let endpoint_authority = picked.authority();
    if let Some(chain) = chain {
        chain.with(|c| {
            c.set_route(route.name.clone(), upstream.name.clone());
            c.set_upstream(endpoint);
        });
    }

    // Build the upstream request in place: new URI, clean headers.
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let upstream_path = route.rewrite_path(path_and_query);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(endpoint_authority);
    uri.path_and_query = match upstream_path {
        // Unchanged: reuse the parsed value instead of parsing it again.
        std::borrow::Cow::Borrowed(_) => Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        ),
        std::borrow::Cow::Owned(p) => p.parse().ok(),
    };
    parts.uri = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(e) => {
            out.result = Err(ProxyError::BadRequest(format!(
                "cannot rewrite the path: {e}"
            )));
            return out;
        }
    };
    // `Connection: x-request-id` must not take away the id the logs use
    // (`handle` has made sure there is one).
    let request_id = parts.headers.get(&REQUEST_ID).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(id) = request_id {
        parts.headers.entry(REQUEST_ID).or_insert(id);
    }
    parts.headers.remove(header::EXPECT);
    let host_value = match &route.rewrite_host {
        Some(h) => Some(h.clone()),
        // Usually the Host header is already right: keep it as it is.
        None if parts
            .headers
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes() == host.as_bytes()) =>
        {
            None
        }
        None => HeaderValue::from_str(&host).ok(),
    };
    if let Some(h) = host_value {
        parts.headers.insert(header::HOST, h);
    }
    let via = if downstream_version == Version::HTTP_2 {
        VIA_H2
    } else {
        VIA_H1
    };
    let trusted = listener.trust_forwarded.trusts(conn.peer.ip());
    headers::add_forwarding(
        &mut parts.headers,
        conn.peer.ip(),
        conn.scheme,
        via,
        trusted,
    );
    parts.version = match upstream.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    // Retries need the body again: empty, or small and read whole first.
    let empty = body.is_end_stream() && !upgrade;
    let policy = route.retry.as_deref();
    let mut kept = empty.then(bytes::Bytes::new);
    let body = RequestBody::new(body, listener.limits.max_body_bytes, clock.clone());
    let body = if retry::should_keep_body(policy, &parts, empty, upgrade, chain.is_some()) {
        // The cluster admission is already held: a client that trickles its
        // body must not keep it for longer than it may take to send a head.
        let limit = listener.limits.header_timeout;
        let Ok(collected) = tokio::time::timeout(limit, body.collect()).await else {
            out.result = Err(ProxyError::BodyTimeout { after: limit });
            return out;
        };
        match collected {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                kept = Some(bytes.clone());
                http_body_util::Full::new(bytes)
                    .map_err(|never| match never {})
                    .boxed_unsync()
            }
            Err(e) => {
                out.result = Err(retry::body_error(&*e));
                return out;
            }
        }
    } else {
        match chain {
            Some(c) => FilteredBody::new(body, c.clone(), Side::Request).boxed_unsync(),
            None => body.boxed_unsync(),
        }
    };
    if let Some(t) = &mut trace {
        // The client span's context goes upstream as `traceparent`.
        t.upstream_start(
            &mut parts.headers,
            &route.name,
            &upstream.name,
            endpoint,
            &parts.uri,
        );
    }
    let replay = retry::Replay::capture(policy, &parts, kept);
    let upstream_req = Request::from_parts(parts, body);

    let timeout = crate::config::route_timeout(route.timeout, upstream.timeout);
    let sending = retry::send(upstream, picked, upstream_req, replay, timeout, chain);
    let sent = match &clock {
        // Nothing moving either way while the upstream thinks counts as
        // idle too; the request body's own timer covers a stalled upload.
        Some(clock) => tokio::select! {
            sent = sending => sent,
            cut = clock.expired() => Err(match cut {
                // The whole request arrived: the upstream is the one not
                // answering.
                Cut::Idle(after) if clock.request_done() => ProxyError::UpstreamTimeout {
                    cluster: upstream.name.to_string(),
                    addr: endpoint,
                    after,
                },
                cut => ProxyError::Cut(cut),
            }),
        },
        None => sending.await,
    };
    if let Some(t) = &mut trace {
        t.upstream_end(
            sent.as_ref()
                .map(|r| r.status().as_u16())
                .map_err(|e| e.code().as_str()),
        );
    }
    let mut resp = match sent {
        Ok(resp) => {
            // Envoy stops request_timeout once the response starts: a
            // bidirectional stream or an upload answered early is timed by
            // stream_idle_timeout alone from here.
            if let Some(clock) = &clock {
                clock.response_started();
            }
            resp
        }
        Err(e) => {
            // A filter that answered mid-body aborted the upstream request.
            out.result = match chain.and_then(SharedChain::take_local) {
                Some(local) => Ok(local_answer(local)),
                None => Err(e),
            };
            return out;
        }
    };
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    if let Some(down) = downstream_upgrade {
        if switching {
            conn.activity.upgraded.store(true, Ordering::Release);
            upgrade::tunnel(
                down,
                hyper::upgrade::on(&mut resp),
                conn.drain_deadline.clone(),
            );
        }
    }
    headers::strip_hop_by_hop(resp.headers_mut(), switching);
    headers::append_via(resp.headers_mut(), via);
    let (mut parts, body) = resp.into_parts();
    // The request counts against max_requests until its response ends.
    admission.headers_received();
    let body = Tracked::new(body, move |_| drop(admission));
    let body = match chain {
        Some(chain) if !switching => {
            if let Some(mut filters) = chain.take() {
                let verdict = filters
                    .response_headers(&mut parts, body.is_end_stream())
                    .await;
                chain.put(filters);
                if let Verdict::Respond(resp) = verdict {
                    out.result = Ok(local_answer(resp));
                    return out;
                }
            }
            FilteredBody::new(body, chain.clone(), Side::Response).boxed_unsync()
        }
        _ => body.map_err(upstream::BoxError::from).boxed_unsync(),
    };
    let body = match clock {
        Some(clock) if !switching => Timed::new(body, clock, runtime.stats.clone()).boxed_unsync(),
        _ => body,
    };
    out.result = Ok(Response::from_parts(parts, body));
    out
}

/// Maps a client error to whose fault it was and what to answer.
fn classify(
    upstream: &Upstream,
    addr: SocketAddr,
    err: &hyper_util::client::legacy::Error,
) -> ProxyError {
    if let Some(d) = find_cause::<DownstreamBodyError>(err) {
        return d.to_proxy_error();
    }
    if let Some(o) = find_cause::<crate::upstream::ConnectionOverflow>(err) {
        upstream
            .state
            .counters
            .overflows
            .fetch_add(1, Ordering::Relaxed);
        return ProxyError::Overflow(format!("cluster \"{}\": {o}", upstream.name));
    }
    let reason = error_chain(err);
    // A failed handshake, or a TLS alert after it (TLS 1.3 servers reject
    // a client certificate after the client thinks the handshake is done).
    if find_cause::<crate::tls::UpstreamTlsError>(err).is_some()
        || crate::tls::rustls_cause(err).is_some()
    {
        return ProxyError::UpstreamTls {
            cluster: upstream.name.to_string(),
            addr,
            reason,
        };
    }
    if err.is_connect() {
        ProxyError::UpstreamConnect {
            cluster: upstream.name.to_string(),
            addr,
            reason,
        }
    } else {
        ProxyError::UpstreamReset {
            cluster: upstream.name.to_string(),
            addr,
            reason,
        }
    }
}

/// The first error of type `E` in `err`'s cause chain.
pub(super) fn find_cause<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Rejects shapes of request that hyper lets through but a proxy must not
/// pass on, and bodies that declare a length over the limit.
fn check_framing<B>(req: &Request<B>, max_body: u64) -> Result<(), ProxyError> {
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding are set".into(),
        ));
    }
    // RFC 9112 section 3.2: more than one Host, or an HTTP/1.1 request
    // without one, is a 400. Two Hosts would let the route see one name and
    // the upstream another.
    let mut hosts = h.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    if req.version() == Version::HTTP_11
        && req.uri().authority().is_none()
        && !h.contains_key(header::HOST)
    {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        ));
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT tunnels are not supported".into(),
        ));
    }
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max_body {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
    }
    Ok(())
}

/// The authority the client addressed: from an absolute-form URI (forward
/// proxy use), else `:authority`, else `Host`.
fn authority(req: &http::request::Parts) -> Option<String> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_string());
    }
    req.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
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

/// The one place a [`ProxyError`] becomes a response, a counter and a log line.
fn respond_error(
    conn: &ConnCtx,
    li: usize,
    snapshot: &Snapshot,
    (route, cluster): (&Option<Arc<str>>, &Option<Arc<str>>),
    request_id: &HeaderValue,
    err: ProxyError,
) -> Response<ProxyBody> {
    let listener = &snapshot.config.listeners[li];
    snapshot.listeners[li].stats.error(err.code());
    tracing::warn!(
        listener = %listener.name,
        route = %route.as_deref().unwrap_or("-"),
        cluster = %cluster.as_deref().unwrap_or("-"),
        peer = %conn.peer,
        principal = %conn.principal.as_deref().unwrap_or("-"),
        code = %err.code(),
        status = err.status().as_u16(),
        request_id = %request_id.to_str().unwrap_or("-"),
        "{err}"
    );
    err.to_response()
}
