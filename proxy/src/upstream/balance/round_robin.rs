//! Weighted round robin.
//!
//! Weights are honoured by interleaving: the schedule is built once with the
//! smooth weighted round-robin method (as nginx does), so an endpoint of
//! weight 3 next to one of weight 1 is picked a, a, b, a rather than a, a,
//! a, b, which would send bursts to one endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Candidate, PickContext};

/// Longest schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub struct RoundRobin {
    /// Candidate indexes in visiting order.
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(endpoints: &[Candidate]) -> Self {
        Self {
            schedule: smooth_schedule(endpoints),
            next: AtomicUsize::new(0),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _ctx: &PickContext) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        // Only this worker touches the counter, so Relaxed is enough.
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule
            .get(i % self.schedule.len())
            .map(|&i| i as usize)
    }
}

fn smooth_schedule(endpoints: &[Candidate]) -> Vec<u32> {
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
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_util::cands;
    use super::*;

    fn picks(rr: &RoundRobin, n: usize) -> Vec<usize> {
        (0..n)
            .filter_map(|_| rr.pick(&PickContext::default()))
            .collect()
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = RoundRobin::new(&cands(&[1, 1]));
        assert_eq!(picks(&rr, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn weights_interleave() {
        let rr = RoundRobin::new(&cands(&[3, 1]));
        let p = picks(&rr, 8);
        assert_eq!(p.iter().filter(|p| **p == 0).count(), 6);
        assert_ne!(&p[..3], &[0, 0, 0], "smooth schedule must not burst: {p:?}");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let rr = RoundRobin::new(&cands(&[0, 1]));
        assert!(picks(&rr, 5).iter().all(|p| *p == 1));
    }
}
