//! Weighted round robin.
//!
//! Weights are honoured by interleaving: the schedule is built once with the
//! smooth weighted round-robin method (as nginx does), so an endpoint of
//! weight 3 next to one of weight 1 is picked a, a, b, a rather than a, a,
//! a, b, which would send bursts to one endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, PickContext};
use crate::config::Endpoint;

/// Longest schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(endpoints: &[Endpoint]) -> Self {
        Self {
            schedule: smooth_schedule(endpoints),
            next: AtomicUsize::new(0),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _ctx: &PickContext) -> Option<SocketAddr> {
        if self.schedule.is_empty() {
            return None;
        }
        // Only this worker touches the counter, so Relaxed is enough.
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule.get(i % self.schedule.len()).copied()
    }
}

fn smooth_schedule(endpoints: &[Endpoint]) -> Vec<SocketAddr> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let weights: Vec<i64> = endpoints
        .iter()
        .map(|e| (u64::from(e.weight) / scale).max(u64::from(e.weight > 0)) as i64)
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; endpoints.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..endpoints.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(endpoints[best].addr);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
        }
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = RoundRobin::new(&[ep(1, 1), ep(2, 1)]);
        let ports: Vec<u16> = (0..4).map(|_| rr.pick(&PickContext::default()).unwrap().port()).collect();
        assert_eq!(ports, [1, 2, 1, 2]);
    }

    #[test]
    fn weights_interleave() {
        let rr = RoundRobin::new(&[ep(1, 3), ep(2, 1)]);
        let ports: Vec<u16> = (0..8).map(|_| rr.pick(&PickContext::default()).unwrap().port()).collect();
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 6);
        assert_ne!(&ports[..3], &[1, 1, 1], "smooth schedule must not burst: {ports:?}");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let rr = RoundRobin::new(&[ep(1, 0), ep(2, 1)]);
        assert!((0..5).all(|_| rr.pick(&PickContext::default()).unwrap().port() == 2));
    }
}
