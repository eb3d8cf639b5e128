//! Forwarding one request: route it, pick an endpoint, send it upstream,
//! and bring the response back.
//!
//! Runs on the worker that accepted the connection and never leaves it. One
//! snapshot load per request; after that, no locks. Bodies stream in both
//! directions. Every failure becomes a [`ProxyError`] with its
//! `x-wasp-error` code, in [`respond_error`], the one place that maps
//! errors to responses, metrics and the log line.

mod body;
pub mod error;
mod headers;
mod upgrade;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use error::{local_response, ProxyError};

use crate::server::{Shared, Snapshot};
use crate::telemetry::RequestStats;
use crate::upstream::balance::PickContext;
use crate::upstream::{self, ProxyBody, Upstream, Upstreams};
use body::{downstream_cause, RequestBody, Tracked};

const VIA_H1: &str = "1.1 wasp";
const VIA_H2: &str = "2.0 wasp";

/// What a request needs to know about the connection it came on.
#[derive(Debug)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    /// Index of the listener in the snapshot's config.
    pub listener: usize,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    pub activity: Arc<Activity>,
}

/// Requests started and finished on one connection; the connection guard
/// reads these to tell "waiting for a request head" from "busy".
#[derive(Debug, Default)]
pub struct Activity {
    pub started: AtomicU64,
    pub finished: AtomicU64,
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
pub async fn handle(req: Request<Incoming>, conn: Arc<ConnCtx>) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    conn.activity.started.fetch_add(1, Ordering::Release);
    let in_flight = InFlight(conn.activity.clone());
    let start = Instant::now();
    let snapshot = conn.shared.snapshot.load_full();
    let upstreams = crate::server::worker_upstreams(&conn.shared, &snapshot);
    let mut outcome = forward(req, &conn, &snapshot, &upstreams).await;
    let stats = outcome.stats.take();
    let resp = match outcome.result {
        Ok(resp) => resp,
        Err(err) => respond_error(&conn, &snapshot, &outcome.route, &outcome.cluster, err),
    };
    let status = resp.status().as_u16();
    let elapsed = start.elapsed().as_secs_f64();
    let stats = stats.unwrap_or_else(|| snapshot.listeners[conn.listener].unrouted.clone());
    stats.record(status, elapsed);
    // The connection counts as busy until hyper has finished with the body.
    let (parts, body) = resp.into_parts();
    let body = Tracked::new(body, move |_| drop(in_flight)).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

struct Outcome {
    result: Result<Response<ProxyBody>, ProxyError>,
    stats: Option<RequestStats>,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
}

async fn forward(
    mut req: Request<Incoming>,
    conn: &ConnCtx,
    snapshot: &Snapshot,
    upstreams: &Upstreams,
) -> Outcome {
    let mut out = Outcome {
        result: Err(ProxyError::BadRequest(String::new())),
        stats: None,
        route: None,
        cluster: None,
    };
    let listener = &snapshot.config.listeners[conn.listener];
    let runtime = &snapshot.listeners[conn.listener];

    if let Err(e) = check_framing(&req, listener.limits.max_body_bytes) {
        out.result = Err(e);
        return out;
    }
    let host = authority(&req).unwrap_or_default();
    let path = req.uri().path().to_string();
    let Some((route_index, route)) = listener
        .routes
        .find(&host, &path, req.method(), req.headers())
    else {
        out.result = Err(ProxyError::NoRoute {
            listener: listener.name.to_string(),
            host,
            path,
        });
        return out;
    };
    out.route = Some(route.name.clone());
    let cluster_id = route.pick_cluster(rand::random());
    let Some(upstream) = upstreams.get(cluster_id) else {
        out.result = Err(ProxyError::UnknownCluster(cluster_id.to_string()));
        return out;
    };
    out.cluster = Some(upstream.name.clone());
    out.stats = runtime.route_stats[route_index]
        .iter()
        .find(|(c, _)| *c == cluster_id)
        .map(|(_, s)| s.clone());
    let Some(endpoint) = upstream.pick(&PickContext::default()) else {
        out.result = Err(ProxyError::NoEndpoint(upstream.name.to_string()));
        return out;
    };

    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let downstream_version = req.version();
    let (mut parts, body) = req.into_parts();

    // Build the upstream request in place: new URI, clean headers.
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let upstream_path = route.rewrite_path(path_and_query);
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query(upstream_path.as_ref())
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            out.result = Err(ProxyError::BadRequest(format!("cannot rewrite the path: {e}")));
            return out;
        }
    };
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::EXPECT);
    let host_value = match &route.rewrite_host {
        Some(h) => Some(h.clone()),
        None => HeaderValue::from_str(&host).ok(),
    };
    if let Some(h) = host_value {
        parts.headers.insert(header::HOST, h);
    }
    let via = if downstream_version == Version::HTTP_2 { VIA_H2 } else { VIA_H1 };
    headers::add_forwarding(&mut parts.headers, conn.peer.ip(), conn.scheme, via);
    parts.version = match upstream.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    let body = RequestBody::new(body, listener.limits.max_body_bytes).boxed_unsync();
    let upstream_req = Request::from_parts(parts, body);

    let timeout = route.timeout.or(upstream.timeout);
    out.result = send(upstream, endpoint, upstream_req, timeout).await.map(|mut resp| {
        if let Some(down) = downstream_upgrade {
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                upgrade::tunnel(down, hyper::upgrade::on(&mut resp));
            }
        }
        let keep_upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(resp.headers_mut(), keep_upgrade);
        headers::append_via(resp.headers_mut(), via);
        resp.map(|b| b.map_err(upstream::BoxError::from).boxed_unsync())
    });
    out
}

async fn send(
    upstream: &Upstream,
    endpoint: SocketAddr,
    req: Request<ProxyBody>,
    timeout: Option<std::time::Duration>,
) -> Result<Response<Incoming>, ProxyError> {
    let sent = upstream.send(req);
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    cluster: upstream.name.to_string(),
                    addr: endpoint,
                    after: t,
                })
            }
        },
        None => sent.await,
    };
    result.map_err(|e| classify(upstream, endpoint, &e))
}

/// Maps a client error to whose fault it was and what to answer.
fn classify(upstream: &Upstream, addr: SocketAddr, err: &hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(d) = downstream_cause(err) {
        return d.to_proxy_error();
    }
    let reason = error_chain(err);
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
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT tunnels are not supported".into()));
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
fn authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// The one place a [`ProxyError`] becomes a response, a counter and a log line.
fn respond_error(
    conn: &ConnCtx,
    snapshot: &Snapshot,
    route: &Option<Arc<str>>,
    cluster: &Option<Arc<str>>,
    err: ProxyError,
) -> Response<ProxyBody> {
    let listener = &snapshot.config.listeners[conn.listener];
    snapshot.listeners[conn.listener].stats.error(err.code());
    tracing::warn!(
        listener = %listener.name,
        route = %route.as_deref().unwrap_or("-"),
        cluster = %cluster.as_deref().unwrap_or("-"),
        peer = %conn.peer,
        code = %err.code(),
        status = err.status().as_u16(),
        "{err}"
    );
    err.to_response()
}
