//! Sending a request upstream: one try, or several under the route's
//! `retry` policy, within the route's overall `timeout`.
//!
//! Runs on the worker, inside the request's future. Only replayable
//! requests are retried: the body must be empty, or declared at most
//! [`REPLAY_LIMIT`] bytes and not seen by a filter, in which case it is
//! read whole before the first try and kept (larger bodies stream through
//! and cannot be sent twice). Idempotent methods are retried on every
//! condition the route names; other methods (POST, PATCH) only on
//! `connect-failure`, when the request certainly never left. A retry goes to a different endpoint when the cluster has one,
//! after a jittered exponential backoff, and only while the cluster's
//! retry budget allows, so retries cannot multiply the load of a cluster
//! that is failing everywhere. Each try is an [`Attempt`]: its latency and
//! outcome feed the balancer and outlier detection whether it succeeds,
//! fails or is cancelled.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::filtered::SharedChain;
use super::{classify, ProxyError};
use crate::upstream::balance::{fast_random, now_nanos, PickContext};
use crate::upstream::{retry, Attempt, Picked, ProxyBody, RetryPolicy, Upstream};

/// Request bodies up to this size are kept for retries.
pub(super) const REPLAY_LIMIT: u64 = 64 << 10;

/// Whether to read the request body whole before the first try, so it
/// can be sent again: the route retries, the body is declared small, and
/// no filter reads it (filters see the body as it streams).
pub(super) fn should_keep_body(
    policy: Option<&RetryPolicy>,
    parts: &http::request::Parts,
    empty: bool,
    upgrade: bool,
    filtered: bool,
) -> bool {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    policy.is_some_and(|p| p.attempts > 0)
        && !empty
        && !upgrade
        && !filtered
        && declared.is_some_and(|n| n <= REPLAY_LIMIT)
}

/// The error to answer when reading a kept body failed.
pub(super) fn body_error(err: &(dyn std::error::Error + 'static)) -> ProxyError {
    match super::find_cause::<super::body::DownstreamBodyError>(err) {
        Some(d) => d.to_proxy_error(),
        None => ProxyError::BadRequest(format!("cannot read the request body: {err}")),
    }
}

/// What is needed to send the request again.
pub(super) struct Replay<'a> {
    policy: &'a RetryPolicy,
    /// Not idempotent: retried on connect failures only.
    connect_only: bool,
    body: Bytes,
    method: Method,
    path_and_query: String,
    version: Version,
    headers: HeaderMap,
}

impl<'a> Replay<'a> {
    /// `Some` when `policy` exists and the request can be replayed with
    /// `body` (`None`: the body streams and cannot be).
    pub(super) fn capture(
        policy: Option<&'a RetryPolicy>,
        parts: &http::request::Parts,
        body: Option<Bytes>,
    ) -> Option<Self> {
        let policy = policy?;
        let body = body?;
        if policy.attempts == 0 {
            return None;
        }
        let connect_only = !retry::idempotent(&parts.method);
        if connect_only && !policy.connect_failure {
            return None;
        }
        Some(Self {
            policy,
            connect_only,
            body,
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    fn request(&self, authority: http::uri::Authority) -> Result<Request<ProxyBody>, ProxyError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(self.path_and_query.as_str())
            .build()
            .map_err(|e| {
                ProxyError::BadRequest(format!("cannot rebuild the request to retry it: {e}"))
            })?;
        let body = if self.body.is_empty() {
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync()
        } else {
            Full::new(self.body.clone())
                .map_err(|never| match never {})
                .boxed_unsync()
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Ok(req)
    }

    fn retryable(&self, result: &Result<Response<Incoming>, ProxyError>) -> bool {
        let p = self.policy;
        if self.connect_only {
            return p.connect_failure && matches!(result, Err(ProxyError::UpstreamConnect { .. }));
        }
        match result {
            Ok(resp) => p.retries_status(resp.status()),
            Err(ProxyError::UpstreamConnect { .. }) => p.connect_failure,
            Err(ProxyError::UpstreamReset { .. }) => p.reset,
            Err(ProxyError::UpstreamTimeout { .. }) => p.retries_timeout(),
            Err(_) => false,
        }
    }
}

/// Sends `req` to `first`, retrying per `replay`, all within `timeout`.
pub(super) async fn send(
    upstream: &Upstream,
    first: Picked,
    req: Request<ProxyBody>,
    replay: Option<Replay<'_>>,
    timeout: Option<Duration>,
    chain: Option<&SharedChain>,
) -> Result<Response<Incoming>, ProxyError> {
    let addr = first.addr;
    let work = tries(upstream, first, req, replay, chain);
    match timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::UpstreamTimeout {
                cluster: upstream.name.to_string(),
                addr,
                after: t,
            }),
        },
        None => work.await,
    }
}

async fn tries(
    upstream: &Upstream,
    first: Picked,
    req: Request<ProxyBody>,
    replay: Option<Replay<'_>>,
    chain: Option<&SharedChain>,
) -> Result<Response<Incoming>, ProxyError> {
    let budget = upstream.state.budget.as_ref();
    if let Some(b) = budget {
        b.deposit(now_nanos());
    }
    let per_try = replay.as_ref().and_then(|r| r.policy.per_try_timeout);
    let mut last = first.addr;
    let mut result = once(upstream, upstream.start(first), req, per_try).await;
    let Some(replay) = replay else { return result };
    let mut n = 0;
    while n < replay.policy.attempts && replay.retryable(&result) {
        if let Some(b) = budget {
            if !b.withdraw(now_nanos()) {
                upstream
                    .state
                    .counters
                    .budget_exhausted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return result;
            }
        }
        n += 1;
        upstream
            .state
            .counters
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(replay.policy.backoff(n, fast_random())).await;
        let Some(picked) = upstream.pick(&PickContext::default(), Some(last)) else {
            return result;
        };
        if let Some(c) = chain {
            c.with(|c| c.set_upstream(picked.addr));
        }
        last = picked.addr;
        let req = replay.request(picked.authority())?;
        result = once(upstream, upstream.start(picked), req, per_try).await;
    }
    result
}

/// One try; the attempt records its outcome when it is dropped here, at
/// the response headers (or the failure).
async fn once(
    upstream: &Upstream,
    mut attempt: Attempt,
    req: Request<ProxyBody>,
    per_try: Option<Duration>,
) -> Result<Response<Incoming>, ProxyError> {
    let addr = attempt.addr();
    let sent = upstream.send(req);
    let result = match per_try {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r.map_err(|e| classify(upstream, addr, &e)),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                cluster: upstream.name.to_string(),
                addr,
                after: t,
            }),
        },
        None => sent.await.map_err(|e| classify(upstream, addr, &e)),
    };
    match &result {
        Ok(resp) if resp.status().is_server_error() => attempt.failed(),
        Ok(_) => attempt.succeeded(),
        Err(
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamTls { .. },
        ) => attempt.failed(),
        // The client's fault or a local limit: no verdict on the endpoint.
        Err(_) => {}
    }
    result
}
