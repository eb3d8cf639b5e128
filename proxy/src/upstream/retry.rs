//! Retries: the policy (per route), the budget (per cluster), and the
//! loop that sends a request once or again under them
//! ([`Upstream::send_with_retries`], on the worker, inside the request's
//! future).
//!
//! Only replayable requests are retried ([`Replay`]): the caller keeps the
//! body (empty, or small and read whole first). Idempotent methods are
//! retried on every condition the route names; other methods (POST,
//! PATCH) only on `connect-failure`, when the request certainly never
//! left. A retry goes to a different endpoint when the cluster has one,
//! after a jittered exponential backoff, and only while the cluster's
//! retry budget allows, so retries cannot multiply the load of a cluster
//! that is failing everywhere. Each try is one [`Upstream::send_once`].
//!
//! The budget is shared by every worker (relaxed atomics, no lock). It
//! counts requests and retries in one-second windows: a retry is allowed
//! while the retries of the current window stay under `min_per_second +
//! ratio × requests` of that window, so however many clients retry,
//! retries add at most `ratio` to the load of a failing cluster (plus a
//! trickle for quiet clusters). A coarser cousin of Finagle's and
//! Linkerd's token buckets: cheaper, and the one-second reset is fine at
//! the rates where retry storms matter. The reset at a window edge is not
//! atomic across the two counters, so a retry or two may slip through
//! there: a budget, not an exact quota.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ResponseBody;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};

use super::balance::{fast_random, now_nanos, PickContext};
use super::send::SendError;
use super::{Picked, ProxyBody, Upstream};

use crate::config::schema::RetryBudgetDecl;

pub use crate::config::cluster::RetryPolicy;

impl RetryPolicy {
    /// Whether an answer with this status is worth another try.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        (self.five_xx && status.is_server_error())
            || (self.gateway_error && matches!(status.as_u16(), 502..=504))
    }

    pub fn retries_timeout(&self) -> bool {
        self.five_xx || self.gateway_error
    }

    /// The pause before retry `n` (1-based): full jitter over an
    /// exponential ceiling, capped at 10 × the base.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let base = self.backoff.as_micros().max(1) as u64;
        let ceiling = (base << n.saturating_sub(1).min(16)).min(base * 10);
        Duration::from_micros(random % ceiling.max(1) + 1)
    }
}

/// Requests that can be sent again: idempotent methods (RFC 9110 9.2.2).
/// The caller also checks that the body is empty (bodies stream and are
/// not kept).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A cluster's retry budget. See the module docs.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u64,
    /// The window (whole seconds of [`crate::upstream::balance::now_nanos`])
    /// the counters belong to.
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub fn new(decl: &RetryBudgetDecl) -> Self {
        Self::with(decl.ratio, decl.min_per_second)
    }

    pub fn with(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio: ratio.max(0.0),
            min_per_second: u64::from(min_per_second),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    fn roll(&self, now_ns: u64) {
        let second = now_ns / 1_000_000_000;
        let seen = self.window.load(Ordering::Relaxed);
        if seen != second
            && self
                .window
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a first try.
    pub fn deposit(&self, now_ns: u64) {
        self.roll(now_ns);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget; false when it is spent.
    pub fn withdraw(&self, now_ns: u64) -> bool {
        self.roll(now_ns);
        let allowed =
            self.min_per_second as f64 + self.ratio * self.requests.load(Ordering::Relaxed) as f64;
        let taken = self.retries.fetch_add(1, Ordering::Relaxed);
        if (taken as f64) < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

/// What is needed to send a request again.
pub struct Replay<'a> {
    policy: &'a RetryPolicy,
    /// Not idempotent: retried on connect failures only.
    connect_only: bool,
    body: Bytes,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl<'a> Replay<'a> {
    /// `Some` when `policy` retries and the request can be replayed with
    /// `body` (`None`: the body streams and cannot be).
    pub fn capture(
        policy: Option<&'a RetryPolicy>,
        parts: &http::request::Parts,
        body: Option<Bytes>,
    ) -> Option<Self> {
        let policy = policy?;
        let body = body?;
        if policy.attempts == 0 {
            return None;
        }
        let connect_only = !idempotent(&parts.method);
        if connect_only && !policy.connect_failure {
            return None;
        }
        Some(Self {
            policy,
            connect_only,
            body,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    /// The request again; [`Upstream::send_once`] points it at the new
    /// endpoint.
    fn request(&self) -> Request<ProxyBody> {
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
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }

    fn retryable(&self, result: &Result<Response<ResponseBody>, SendError>) -> bool {
        let p = self.policy;
        if self.connect_only {
            return p.connect_failure && matches!(result, Err(SendError::Connect { .. }));
        }
        match result {
            Ok(resp) => p.retries_status(resp.status()),
            Err(SendError::Connect { .. }) => p.connect_failure,
            Err(SendError::Reset { .. }) => p.reset,
            Err(SendError::Timeout { .. }) => p.retries_timeout(),
            Err(_) => false,
        }
    }
}

impl Upstream {
    /// Sends `req` to `first`, again per `replay`, all within `timeout`.
    /// `on_retry` learns each new endpoint before it is tried.
    ///
    /// A request that cannot be replayed (the usual case) is one try with
    /// no loop around it; the retry loop's future, with its backoff timer
    /// and the kept request, is boxed, so the common request's future stays
    /// small (futures are moved whole, and every byte of one is copied).
    pub async fn send_with_retries(
        &self,
        first: Picked,
        req: Request<ProxyBody>,
        replay: Option<Box<Replay<'_>>>,
        timeout: Option<Duration>,
        mut on_retry: impl FnMut(SocketAddr),
    ) -> Result<Response<ResponseBody>, SendError> {
        // The endpoint being tried when the route's timeout passes: the
        // one the timeout names (a retry may have moved on from the first).
        let mut addr = first.addr;
        let Some(after) = timeout else {
            return match replay {
                None => self.once(first, req).await,
                Some(replay) => Box::pin(self.tries(first, req, replay, on_retry)).await,
            };
        };
        let sent = match replay {
            None => {
                // Pinned in place: `Timeout` holds a pointer, so whether
                // the compiler inlines `timeout` no longer decides if the
                // request's send future is copied into it (callgrind: two
                // copies, ~460 instructions per request, in builds where
                // it was not inlined).
                let once = std::pin::pin!(self.once(first, req));
                tokio::time::timeout(after, once).await
            }
            Some(replay) => {
                let on_retry = |next| {
                    addr = next;
                    on_retry(next);
                };
                tokio::time::timeout(after, Box::pin(self.tries(first, req, replay, on_retry)))
                    .await
            }
        };
        sent.unwrap_or_else(|_| {
            Err(SendError::Timeout {
                cluster: self.name.clone(),
                addr,
                after,
            })
        })
    }

    /// A request sent once: counted for the retry budget, no per-try
    /// timeout (that is a retry policy's).
    async fn once(
        &self,
        first: Picked,
        req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        if let Some(b) = self.state.budget.as_ref() {
            b.deposit(now_nanos());
        }
        self.send_once(first, req, None).await
    }

    async fn tries(
        &self,
        first: Picked,
        req: Request<ProxyBody>,
        replay: Box<Replay<'_>>,
        mut on_retry: impl FnMut(SocketAddr),
    ) -> Result<Response<ResponseBody>, SendError> {
        let budget = self.state.budget.as_ref();
        if let Some(b) = budget {
            b.deposit(now_nanos());
        }
        let per_try = replay.policy.per_try_timeout;
        let mut last = first.addr;
        let mut result = self.send_once(first, req, per_try).await;
        let mut n = 0;
        while n < replay.policy.attempts && replay.retryable(&result) {
            if let Some(b) = budget {
                if !b.withdraw(now_nanos()) {
                    self.state
                        .counters
                        .budget_exhausted
                        .fetch_add(1, Ordering::Relaxed);
                    return result;
                }
            }
            n += 1;
            self.state.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(replay.policy.backoff(n, fast_random())).await;
            let Some(picked) = self.pick(&PickContext::default(), Some(last)) else {
                return result;
            };
            on_retry(picked.addr);
            last = picked.addr;
            result = self.send_once(picked, replay.request(), per_try).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_retries_to_the_ratio_plus_minimum() {
        let b = RetryBudget::with(0.2, 10);
        let t = 5_000_000_000;
        for _ in 0..1000 {
            b.deposit(t);
        }
        let granted = (0..1000).filter(|_| b.withdraw(t)).count();
        assert_eq!(granted, 210);
        // A new second starts a new window.
        assert!(b.withdraw(t + 1_000_000_000));
    }

    #[test]
    fn quiet_clusters_get_the_minimum() {
        let b = RetryBudget::with(0.2, 3);
        let granted = (0..10).filter(|_| b.withdraw(1)).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetryPolicy {
            connect_failure: true,
            reset: true,
            five_xx: true,
            gateway_error: false,
            attempts: 3,
            per_try_timeout: None,
            backoff: Duration::from_millis(10),
        };
        for n in 1..8 {
            for r in [0u64, 7, 12_345, u64::MAX] {
                let d = p.backoff(n, r);
                assert!(
                    d <= Duration::from_millis(100) + Duration::from_micros(1),
                    "{d:?}"
                );
                assert!(d > Duration::ZERO);
            }
        }
        assert!(p.retries_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!p.retries_status(StatusCode::NOT_FOUND));
    }
}
