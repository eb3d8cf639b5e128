//! Power of two choices: draw two endpoints (by weight), send to the one
//! with the lower cost divided by its weight.
//!
//! - `least_request`: cost = requests in flight.
//! - `peak_ewma`: cost = latency estimate × (in flight + 1), as Linkerd and
//!   Finagle do. The estimate jumps up to any slower sample and decays
//!   toward faster ones (and toward zero while an endpoint gets no
//!   traffic) with time constant `decay`, so a slow endpoint loses its
//!   traffic within one request and earns it back gradually once it is
//!   fast again. Endpoints with no sample use the worker's cluster average
//!   ("neutral"), so new endpoints are tried without being flooded.
//!
//! P2C rather than "pick the cheapest": it needs two reads instead of n,
//! and it does not herd every worker onto the same endpoint between
//! updates.

use std::time::Duration;

use super::{now_nanos, Balancer, Candidate, PickContext, Weights};

/// Draws two distinct indexes by weight (the same index twice only when
/// one endpoint holds all the weight).
fn two(weights: &Weights, candidates: &[Candidate]) -> Option<(usize, usize)> {
    let a = weights.draw()?;
    let len = candidates.len();
    if len < 2 {
        return Some((a, a));
    }
    for _ in 0..4 {
        let b = weights.draw()?;
        if b != a {
            return Some((a, b));
        }
    }
    // Unlucky or skewed weights: the next endpoint that has any weight.
    let b = (1..len)
        .map(|k| (a + k) % len)
        .find(|&i| candidates[i].weight > 0)
        .unwrap_or(a);
    Some((a, b))
}

#[derive(Debug)]
pub struct LeastRequest {
    candidates: Vec<Candidate>,
    weights: Weights,
}

impl LeastRequest {
    pub fn new(candidates: Vec<Candidate>) -> Self {
        Self {
            weights: Weights::new(&candidates),
            candidates,
        }
    }

    fn cost(&self, i: usize) -> f64 {
        let c = &self.candidates[i];
        f64::from(c.load.in_flight()) / f64::from(c.weight.max(1))
    }
}

impl Balancer for LeastRequest {
    fn pick(&self, _ctx: &PickContext) -> Option<usize> {
        let (a, b) = two(&self.weights, &self.candidates)?;
        Some(if self.cost(b) < self.cost(a) { b } else { a })
    }
}

#[derive(Debug)]
pub struct PeakEwma {
    candidates: Vec<Candidate>,
    weights: Weights,
    decay: Duration,
}

impl PeakEwma {
    pub fn new(candidates: Vec<Candidate>, decay: Duration) -> Self {
        Self {
            weights: Weights::new(&candidates),
            candidates,
            decay,
        }
    }

    fn cost(&self, i: usize, now: u64) -> f64 {
        let c = &self.candidates[i];
        let load = &c.load;
        load.estimate(now, self.decay) * f64::from(load.in_flight() + 1)
            / f64::from(c.weight.max(1))
    }
}

impl Balancer for PeakEwma {
    fn pick(&self, _ctx: &PickContext) -> Option<usize> {
        let (a, b) = two(&self.weights, &self.candidates)?;
        if a == b {
            return Some(a);
        }
        let now = now_nanos();
        Some(if self.cost(b, now) < self.cost(a, now) {
            b
        } else {
            a
        })
    }
}
