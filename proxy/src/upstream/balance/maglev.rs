//! Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's
//! `MAGLEV`, with its weighted population): a lookup table of a prime size
//! filled by each endpoint's permutation in turn, so a pick is one hash and
//! one array read, and an endpoint change remaps about 1/n of the keys.
//!
//! The table has 65537 entries (Envoy's default), so the build costs a few
//! hundred microseconds and is done off the request path when the endpoint
//! set changes.

use super::hash::{endpoint_hash, hash_bytes};
use super::{Balancer, Candidate, PickContext, Weights};

/// A prime; should be much larger than the number of endpoints.
const TABLE_SIZE: u64 = 65537;

#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
    weights: Weights,
}

impl Maglev {
    pub fn new(candidates: &[Candidate]) -> Self {
        let weights = Weights::new(candidates);
        Self {
            table: build(candidates, TABLE_SIZE),
            weights,
        }
    }
}

/// Fills the table; weighted as Envoy does: each round, an endpoint takes
/// its next preferred slot only while its share stays within its weight.
fn build(candidates: &[Candidate], m: u64) -> Vec<u32> {
    let live: Vec<(usize, u64, u64, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.weight > 0)
        .map(|(i, c)| {
            let offset = endpoint_hash(&c.addr, 0, 0x4f46_4653) % m;
            let skip = endpoint_hash(&c.addr, 0, 0x534b_4950) % (m - 1) + 1;
            (i, offset, skip, f64::from(c.weight))
        })
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let max_weight = live.iter().map(|l| l.3).fold(0.0, f64::max);
    let mut table = vec![u32::MAX; m as usize];
    let mut next = vec![0u64; live.len()];
    let mut target = vec![0f64; live.len()];
    let mut filled = 0u64;
    while filled < m {
        for (j, (i, offset, skip, weight)) in live.iter().enumerate() {
            target[j] += weight / max_weight;
            if target[j] < 1.0 {
                continue;
            }
            target[j] -= 1.0;
            loop {
                let slot = (offset + next[j] * skip) % m;
                next[j] += 1;
                if table[slot as usize] == u32::MAX {
                    table[slot as usize] = *i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

impl Balancer for Maglev {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        let Some(key) = ctx.hash_key else {
            return self.weights.draw();
        };
        if self.table.is_empty() {
            return None;
        }
        let slot = hash_bytes(key) % self.table.len() as u64;
        self.table.get(slot as usize).map(|&i| i as usize)
    }
}
