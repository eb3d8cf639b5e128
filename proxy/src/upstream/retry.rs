//! Retry policy (per route) and retry budget (per cluster): pure logic and
//! atomics, no IO. The loop that uses them is `forward::retry`, on the
//! worker.
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};

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
