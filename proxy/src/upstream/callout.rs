//! HTTP callouts for filters: `proxy_http_call` to a named cluster.
//!
//! The engine calls [`Callouts::call`] from inside a host call on a worker,
//! so it only builds the future; the request then uses that worker's own
//! pools and balancer, exactly like proxied traffic: it is admitted under
//! the cluster's circuit breakers (`limits.max_requests` / `max_pending`;
//! over them the guest's answer is a failure and the overflow is counted),
//! and its outcome feeds load balancing and outlier detection.
//!
//! One difference: a callout *timeout* counts against the endpoint only if
//! the guest's timeout was at least [`MIN_COUNTED_TIMEOUT`] and at least
//! the cluster's `connect_timeout`. The timeout is the guest's choice, so
//! a filter asking for 1 ms answers cannot make healthy endpoints look
//! failed and get them ejected.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};

use crate::filter::{CalloutFuture, HttpCallouts, StreamBody, StreamFuture};
use crate::server::{worker_upstreams, Shared};
use crate::upstream::balance::PickContext;

/// Largest callout answer a filter can receive.
const MAX_CALLOUT_BODY: usize = 4 << 20;

/// Shortest guest-chosen timeout whose expiry counts as an endpoint failure
/// (see the module docs; the cluster's `connect_timeout` applies if longer).
pub const MIN_COUNTED_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct Callouts {
    shared: OnceLock<Weak<Shared>>,
}

impl Callouts {
    /// Connects the callouts to the running proxy; before that they fail.
    pub fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }
}

/// `path` of a callout rewritten to name the picked endpoint.
fn endpoint_uri(uri: &Uri, endpoint: std::net::SocketAddr) -> Result<Uri, String> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query(path)
        .build()
        .map_err(|e| format!("bad callout path: {e}"))
}

impl HttpCallouts for Callouts {
    /// Streamed exchanges (gRPC) go through the same admission, balancing
    /// and outlier accounting as [`Callouts::call`]; the cluster's
    /// `max_requests` slot is held until the answer's body is dropped, so a
    /// long-lived stream counts as one request in flight for its lifetime.
    fn open(&self, cluster: &str, req: Request<StreamBody>) -> Option<StreamFuture> {
        let shared = self.shared.get()?.upgrade()?;
        let snapshot = shared.snapshot.load_full();
        let id = snapshot.cluster_id(cluster)?;
        let upstreams = worker_upstreams(&shared, &snapshot);
        let cluster = cluster.to_string();
        Some(Box::pin(async move {
            let upstream = upstreams.get(id).ok_or("cluster vanished")?;
            let Some(mut admission) = upstream.admit() else {
                return Err(format!(
                    "cluster \"{cluster}\" is at its request limits (limits.max_requests / max_pending)"
                ));
            };
            let picked = upstream
                .pick(&PickContext::default(), None)
                .ok_or_else(|| format!("cluster \"{cluster}\" has no endpoint"))?;
            let endpoint = picked.addr;
            let mut attempt = upstream.start(picked);
            let (mut parts, body) = req.into_parts();
            parts.uri = endpoint_uri(&parts.uri, endpoint)?;
            let sent = upstream.send(Request::from_parts(parts, body));
            let resp = match sent.await {
                Ok(resp) => resp,
                Err(e) => {
                    attempt.failed();
                    return Err(format!(
                        "callout to \"{cluster}\" at {endpoint} failed: {e}"
                    ));
                }
            };
            if resp.status().is_server_error() {
                attempt.failed();
            } else {
                attempt.succeeded();
            }
            admission.headers_received();
            drop(attempt);
            let (parts, body) = resp.into_parts();
            // The closure owns the admission: the circuit-breaker slot is
            // given back when the body is dropped (stream over or cancelled).
            let body = body
                .map_err(|e| -> crate::filter::StreamError { Box::new(e) })
                .map_frame(move |f| {
                    let _held = &admission;
                    f
                })
                .boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }))
    }

    fn call(&self, cluster: &str, req: Request<Bytes>, timeout: Duration) -> Option<CalloutFuture> {
        let shared = self.shared.get()?.upgrade()?;
        let snapshot = shared.snapshot.load_full();
        let id = snapshot.cluster_id(cluster)?;
        let upstreams = worker_upstreams(&shared, &snapshot);
        let cluster = cluster.to_string();
        Some(Box::pin(async move {
            let upstream = upstreams.get(id).ok_or("cluster vanished")?;
            // Held until the answer is read, as for proxied requests.
            let Some(mut admission) = upstream.admit() else {
                return Err(format!(
                    "cluster \"{cluster}\" is at its request limits (limits.max_requests / max_pending)"
                ));
            };
            let counts_timeout =
                timeout >= MIN_COUNTED_TIMEOUT && timeout >= upstream.connect_timeout();
            let picked = upstream
                .pick(&PickContext::default(), None)
                .ok_or_else(|| format!("cluster \"{cluster}\" has no endpoint"))?;
            let endpoint = picked.addr;
            // Counts for load, latency and outlier detection like proxied traffic.
            let mut attempt = upstream.start(picked);
            let (mut parts, body) = req.into_parts();
            parts.uri = endpoint_uri(&parts.uri, endpoint)?;
            let body = Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync();
            let sent = upstream.send(Request::from_parts(parts, body));
            let resp = match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    attempt.failed();
                    return Err(format!(
                        "callout to \"{cluster}\" at {endpoint} failed: {e}"
                    ));
                }
                Err(_) => {
                    if counts_timeout {
                        attempt.failed();
                    }
                    return Err(format!(
                        "callout to \"{cluster}\" timed out after {timeout:?}"
                    ));
                }
            };
            if resp.status().is_server_error() {
                attempt.failed();
            } else {
                attempt.succeeded();
            }
            admission.headers_received();
            drop(attempt);
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_CALLOUT_BODY)
                .collect()
                .await
                .map_err(|e| format!("callout answer from \"{cluster}\": {e}"))?
                .to_bytes();
            drop(admission);
            Ok(Response::from_parts(parts, body))
        }))
    }
}
