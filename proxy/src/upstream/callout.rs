//! HTTP callouts for filters: `proxy_http_call` to a named cluster.
//!
//! The engine calls [`Callouts::call`] from inside a host call on a worker,
//! so it only builds the future; the request then uses that worker's own
//! pools and balancer, exactly like proxied traffic: it is admitted under
//! the cluster's circuit breakers (`limits.max_requests` / `max_pending`;
//! over them the guest's answer is a failure and the overflow is counted),
//! and it is sent by the same [`super::Upstream::send_once`] as proxied
//! traffic, so its outcome feeds load balancing and outlier detection.
//!
//! One difference: a callout *timeout* counts against the endpoint only if
//! the guest's timeout was at least [`MIN_COUNTED_TIMEOUT`] and at least
//! the cluster's `connect_timeout`. The timeout is the guest's choice, so
//! a filter asking for 1 ms answers cannot make healthy endpoints look
//! failed and get them ejected.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};

use crate::filter::{CalloutFuture, HttpCallouts};
use crate::upstream::balance::PickContext;
use crate::upstream::{SendError, Upstreams};

/// Largest callout answer a filter can receive.
const MAX_CALLOUT_BODY: usize = 4 << 20;

/// Shortest guest-chosen timeout whose expiry counts as an endpoint failure
/// (see the module docs; the cluster's `connect_timeout` applies if longer).
pub const MIN_COUNTED_TIMEOUT: Duration = Duration::from_millis(100);

/// Finds a cluster by name in the current snapshot: its id and the calling
/// worker's pools for that snapshot.
pub type ClusterLookup = Box<dyn Fn(&str) -> Option<(usize, Arc<Upstreams>)> + Send + Sync>;

#[derive(Default)]
pub struct Callouts {
    /// Set once the first snapshot exists (it holds the filters, which
    /// hold these callouts).
    lookup: OnceLock<ClusterLookup>,
}

impl std::fmt::Debug for Callouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callouts")
            .field("attached", &self.lookup.get().is_some())
            .finish()
    }
}

impl Callouts {
    /// Connects the callouts to the running proxy; before that they fail.
    pub fn attach(&self, lookup: ClusterLookup) {
        let _ = self.lookup.set(lookup);
    }
}

impl HttpCallouts for Callouts {
    fn call(&self, cluster: &str, req: Request<Bytes>, timeout: Duration) -> Option<CalloutFuture> {
        let (id, upstreams) = (self.lookup.get()?)(cluster)?;
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
            let req = req.map(|body| {
                Full::new(body)
                    .map_err(|never| match never {})
                    .boxed_unsync()
            });
            // A timeout that must not count against the endpoint cancels
            // the try from outside: counted for load, no verdict.
            let sent = if counts_timeout {
                upstream.send_once(picked, req, Some(timeout)).await
            } else {
                tokio::time::timeout(timeout, upstream.send_once(picked, req, None))
                    .await
                    .unwrap_or(Err(SendError::Timeout {
                        cluster: upstream.name.clone(),
                        addr: endpoint,
                        after: timeout,
                    }))
            };
            let resp = match sent {
                Ok(resp) => resp,
                Err(SendError::Timeout { .. }) => {
                    return Err(format!(
                        "callout to \"{cluster}\" timed out after {timeout:?}"
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "callout to \"{cluster}\" at {endpoint} failed: {e}"
                    ));
                }
            };
            admission.headers_received();
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
