//! Weighted random: each pick draws an endpoint with probability
//! proportional to its weight. Stateless, so it needs no feedback; worse
//! than the P2C balancers when endpoints differ in speed.

use super::{Balancer, Candidate, PickContext, Weights};

#[derive(Debug)]
pub struct Random {
    weights: Weights,
}

impl Random {
    pub fn new(candidates: &[Candidate]) -> Self {
        Self {
            weights: Weights::new(candidates),
        }
    }
}

impl Balancer for Random {
    fn pick(&self, _ctx: &PickContext) -> Option<usize> {
        self.weights.draw()
    }
}
