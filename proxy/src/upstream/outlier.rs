//! Passive outlier detection: endpoints that fail `consecutive_failures`
//! times in a row (5xx answers, connect failures, resets, timeouts) are
//! ejected for `base_ejection × n`, n being how often the endpoint has been
//! ejected (as Envoy does), capped at [`MAX_EJECTION`]; at most
//! `max_ejection_percent` of the endpoints (and at least one) are out at once.
//!
//! [`record`] runs on the worker at the end of each try (atomics only); the
//! ejection ends on the control thread ([`expire`], run by a ticker), which
//! bumps the cluster version so workers rebuild their balancers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cluster::{ClusterState, EndpointState};

/// Longest single ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

pub use crate::config::cluster::OutlierSettings;

/// Records a try's outcome; ejects the endpoint when it crosses the
/// threshold. Returns true when this call ejected it.
pub fn record(cluster: &ClusterState, ep: &EndpointState, ok: bool, now: u64) -> bool {
    if ok {
        if ep.consecutive_failures.load(Ordering::Relaxed) != 0 {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
        }
        return false;
    }
    let Some(settings) = cluster.settings.outlier else {
        return false;
    };
    let failures = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < settings.consecutive_failures || ep.ejected(now) {
        return false;
    }
    let set = cluster.endpoints();
    let total = set.endpoints.len();
    let ejected = set.endpoints.iter().filter(|e| e.ejected(now)).count();
    let cap = (total * settings.max_ejection_percent as usize / 100).max(1);
    if ejected >= cap {
        return false;
    }
    let n = ep.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let time = settings.base_ejection.saturating_mul(n).min(MAX_EJECTION);
    let until = now
        .saturating_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX))
        .max(1);
    ep.set_ejected_until(until);
    ep.consecutive_failures.store(0, Ordering::Relaxed);
    cluster.counters.ejections.fetch_add(1, Ordering::Relaxed);
    cluster.bump();
    tracing::warn!(
        cluster = %cluster.name,
        endpoint = %ep.addr,
        failures,
        ejection = n,
        "endpoint ejected for {time:?} after {failures} consecutive failures"
    );
    true
}

/// Ends the ejections that are over (control thread).
pub fn expire(cluster: &ClusterState, now: u64) {
    let mut changed = false;
    for ep in &cluster.endpoints().endpoints {
        let until = ep.ejected_until();
        if until != 0 && now >= until {
            ep.set_ejected_until(0);
            changed = true;
            tracing::info!(cluster = %cluster.name, endpoint = %ep.addr, "ejection over: endpoint back in the balancer");
        }
    }
    if changed {
        cluster.bump();
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::Endpoint;
    use crate::upstream::cluster::{ClusterSettings, Limits};
    use crate::upstream::discovery::Discovery;

    fn cluster(n: u16) -> ClusterState {
        let eps: Vec<Endpoint> = (0..n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                weight: 1,
            })
            .collect();
        ClusterState::new(
            "c".into(),
            ClusterSettings {
                discovery: Discovery::Static,
                hash_key: None,
                health: None,
                outlier: Some(OutlierSettings {
                    consecutive_failures: 3,
                    base_ejection: Duration::from_secs(1),
                    max_ejection_percent: 50,
                }),
                limits: Limits::default(),
                decay: Duration::from_secs(10),
            },
            &eps,
            None,
        )
    }

    #[test]
    fn ejects_after_threshold_and_grows() {
        let c = cluster(4);
        let ep = c.endpoints().endpoints[0].clone();
        let v = c.version();
        assert!(!record(&c, &ep, false, 10));
        assert!(!record(&c, &ep, false, 10));
        assert!(record(&c, &ep, false, 10));
        assert!(c.version() > v);
        assert!(ep.ejected(10));
        assert_eq!(ep.ejected_until(), 10 + 1_000_000_000);
        assert_eq!(c.pickable(10).0.len(), 3);
        expire(&c, 10 + 1_000_000_000);
        assert!(!ep.ejected(10 + 1_000_000_000));
        // Second ejection lasts twice as long.
        let t = 2_000_000_000;
        for _ in 0..3 {
            record(&c, &ep, false, t);
        }
        assert_eq!(ep.ejected_until(), t + 2_000_000_000);
    }

    #[test]
    fn success_resets_the_streak() {
        let c = cluster(2);
        let ep = c.endpoints().endpoints[0].clone();
        record(&c, &ep, false, 1);
        record(&c, &ep, false, 1);
        record(&c, &ep, true, 1);
        record(&c, &ep, false, 1);
        assert!(!ep.ejected(1));
    }

    #[test]
    fn caps_the_ejected_share_and_panics() {
        let c = cluster(3);
        let eps = c.endpoints().endpoints.clone();
        for ep in &eps {
            for _ in 0..3 {
                record(&c, ep, false, 5);
            }
        }
        let out = eps.iter().filter(|e| e.ejected(5)).count();
        assert_eq!(out, 1, "50% of 3 is one endpoint");
        // Health checks take two more down: below half, so panic mode.
        eps[1].set_healthy(false);
        let (pickable, panic) = c.pickable(5);
        assert!(panic);
        assert_eq!(pickable.len(), 3);
    }
}
