//! Consistent hashing on a ring (Karger et al., as Envoy's `RING_HASH`):
//! each endpoint owns points on a 64-bit ring in proportion to its weight;
//! a key goes to the first point at or after its hash. Adding or removing
//! an endpoint moves only the keys of its own arcs.
//!
//! Ring size: 256 points for an endpoint of the smallest weight, more in
//! proportion for heavier ones, scaled down to at most 131072 points in
//! all; the build is O(points · log points), done off the request path when
//! the endpoint set changes. A pick is one binary search.

use super::hash::{endpoint_hash, hash_bytes};
use super::{Balancer, Candidate, PickContext, Weights};

/// Points of an endpoint of the smallest weight.
const POINTS_PER_WEIGHT: u64 = 256;
const MAX_RING: u64 = 1 << 17;

#[derive(Debug)]
pub struct RingHash {
    /// (point, candidate index), sorted by point.
    ring: Vec<(u64, u32)>,
    /// For requests without a key.
    weights: Weights,
}

impl RingHash {
    pub fn new(candidates: &[Candidate]) -> Self {
        let weights = Weights::new(candidates);
        let total = weights.total();
        let mut ring = Vec::new();
        if total > 0 {
            // A fixed number of points per unit of weight, so one endpoint
            // coming or going does not move the points of the others;
            // scaled down only when the ring would grow past MAX_RING.
            let min_weight = candidates
                .iter()
                .map(|c| c.weight)
                .filter(|w| *w > 0)
                .min()
                .unwrap_or(1);
            let wanted: u64 = candidates
                .iter()
                .map(|c| POINTS_PER_WEIGHT * u64::from(c.weight) / u64::from(min_weight))
                .sum();
            let scale = if wanted > MAX_RING {
                MAX_RING as f64 / wanted as f64
            } else {
                1.0
            };
            for (i, c) in candidates.iter().enumerate() {
                if c.weight == 0 {
                    continue;
                }
                let points = ((POINTS_PER_WEIGHT * u64::from(c.weight) / u64::from(min_weight))
                    as f64
                    * scale)
                    .max(1.0) as u64;
                for p in 0..points {
                    ring.push((endpoint_hash(&c.addr, p, 0x5249_4e47), i as u32));
                }
            }
            ring.sort_unstable();
        }
        Self { ring, weights }
    }
}

impl Balancer for RingHash {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        let Some(key) = ctx.hash_key else {
            return self.weights.draw();
        };
        if self.ring.is_empty() {
            return None;
        }
        let h = hash_bytes(key);
        let at = self.ring.partition_point(|(p, _)| *p < h);
        let (_, i) = self.ring.get(at).or(self.ring.first())?;
        Some(*i as usize)
    }
}
