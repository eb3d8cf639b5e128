//! Load balancers: given a cluster's available endpoints, pick one for a
//! request.
//!
//! Runs on the worker. Each worker owns its own balancer per cluster, built
//! from the cluster's current endpoint set (minus unhealthy and ejected
//! endpoints) and rebuilt lazily when that set's version changes. So the
//! balancer itself is immutable: the only state that moves is each
//! endpoint's [`Load`] (in-flight count and latency estimate), which lives
//! in per-worker atomics that outlive rebuilds and are only ever touched by
//! the owning worker (relaxed ordering; no contention, no locks).
//!
//! `pick` is on the request path: it must not allocate or lock. The caller
//! records the outcome of each request through a [`Load`] handle it keeps
//! until the response headers arrive or the request is dropped, so
//! cancelled requests still count (as Linkerd's handles do).
//!
//! | algorithm | work per pick | state read | ns, 3 / 1000 endpoints |
//! |---|---|---|---|
//! | `round_robin` | one relaxed add | none | 11 / 12 |
//! | `random` | one random number, binary search on weights | none | 7 / 20 |
//! | `least_request` | two weighted random draws | in-flight | 36 / 44 |
//! | `peak_ewma` | two draws, a clock read, one `exp` each | in-flight, latency | 81 / 101 |
//! | `ring_hash` | hash of the key, binary search on the ring | none | 27 / 43 |
//! | `maglev` | hash of the key, one table lookup | none | 9 / 8 |
//!
//! (Criterion medians, `cargo bench -p wasp --bench balance`, on the 2-core
//! development machine; `round_robin` is the baseline. Peak EWMA's extra
//! cost is the monotonic clock read and the two `exp` calls.)

mod hash;
mod maglev;
mod p2c;
mod random;
mod ring_hash;
mod round_robin;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use hash::hash_bytes;
pub use maglev::Maglev;
pub use p2c::{LeastRequest, PeakEwma};
pub use random::Random;
pub use ring_hash::RingHash;
pub use round_robin::RoundRobin;

use crate::config::Balance;

/// Default time constant of the peak-EWMA latency estimate (as Linkerd).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// What a balancer may look at when picking.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickContext<'a> {
    /// The request's hash key (header value, cookie value or source IP
    /// bytes) for `ring_hash` and `maglev`; `None` picks at random.
    pub hash_key: Option<&'a [u8]>,
}

/// One endpoint as a balancer sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// Relative share of traffic; 0 is never picked.
    pub weight: u32,
    pub load: Arc<Load>,
}

pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The index (into the candidates it was built with) of the endpoint
    /// for the next request, or `None` when there is none.
    fn pick(&self, ctx: &PickContext) -> Option<usize>;
}

/// Tuning shared by the balancers that need it.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Peak-EWMA time constant.
    pub decay: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            decay: DEFAULT_DECAY,
        }
    }
}

/// The balancer a cluster's config asks for, over `candidates`.
pub fn for_cluster(kind: Balance, candidates: Vec<Candidate>, tuning: Tuning) -> Box<dyn Balancer> {
    match kind {
        Balance::RoundRobin => Box::new(RoundRobin::new(&candidates)),
        Balance::Random => Box::new(Random::new(&candidates)),
        Balance::LeastRequest => Box::new(LeastRequest::new(candidates)),
        Balance::PeakEwma => Box::new(PeakEwma::new(candidates, tuning.decay)),
        Balance::RingHash => Box::new(RingHash::new(&candidates)),
        Balance::Maglev => Box::new(Maglev::new(&candidates)),
    }
}

// === Load ===

/// Nanoseconds since the first call in this process: a monotonic clock
/// that fits in an atomic.
pub fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One worker's view of one endpoint's load: requests in flight and the
/// peak-EWMA latency estimate. Only the owning worker writes it.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    /// f64 bits: latency estimate in nanoseconds; NaN = no sample yet.
    estimate: AtomicU64,
    /// When `estimate` was last updated ([`now_nanos`]).
    updated: AtomicU64,
    /// The worker's cluster-wide estimate, used for endpoints with no
    /// sample yet so they are neither starved nor flooded.
    neutral: Arc<Neutral>,
}

/// A cluster-wide (per worker) latency average: the neutral estimate.
#[derive(Debug)]
pub struct Neutral(AtomicU64);

impl Default for Neutral {
    fn default() -> Self {
        Self(AtomicU64::new(f64::NAN.to_bits()))
    }
}

impl Neutral {
    /// The average latency seen so far, or 1 ms before any sample.
    pub fn get(&self) -> f64 {
        let v = f64::from_bits(self.0.load(Ordering::Relaxed));
        if v.is_nan() {
            1e6
        } else {
            v
        }
    }

    fn observe(&self, rtt: f64) {
        let v = f64::from_bits(self.0.load(Ordering::Relaxed));
        let next = if v.is_nan() { rtt } else { v * 0.9 + rtt * 0.1 };
        self.0.store(next.to_bits(), Ordering::Relaxed);
    }
}

impl Load {
    pub fn new(neutral: Arc<Neutral>) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            estimate: AtomicU64::new(f64::NAN.to_bits()),
            updated: AtomicU64::new(now_nanos()),
            neutral,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends one request that took `rtt_ns`, updating the estimate.
    pub fn finish(&self, rtt_ns: f64, decay: Duration, now: u64) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let old = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let updated = self.updated.load(Ordering::Relaxed);
        let next = peak_ewma_update(old, updated, rtt_ns, now, decay);
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated.store(now, Ordering::Relaxed);
        self.neutral.observe(rtt_ns);
    }

    /// The latency estimate in nanoseconds at `now`, decayed toward zero
    /// for the time since the last sample (so an endpoint that was slow
    /// and has been left alone gets tried again), or the neutral estimate
    /// when there is no sample.
    pub fn estimate(&self, now: u64, decay: Duration) -> f64 {
        let est = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        if est.is_nan() {
            return self.neutral.get();
        }
        let elapsed = now.saturating_sub(self.updated.load(Ordering::Relaxed)) as f64;
        est * decay_factor(elapsed, decay)
    }

    /// Whether this endpoint has had a sample.
    pub fn known(&self) -> bool {
        !f64::from_bits(self.estimate.load(Ordering::Relaxed)).is_nan()
    }
}

/// `exp(-elapsed / decay)`.
fn decay_factor(elapsed_ns: f64, decay: Duration) -> f64 {
    let tau = decay.as_nanos().max(1) as f64;
    (-elapsed_ns / tau).exp()
}

/// The peak-EWMA rule: a slower sample replaces the estimate at once; a
/// faster one pulls it down with weight `1 - exp(-elapsed / decay)`.
pub fn peak_ewma_update(old: f64, updated: u64, rtt: f64, now: u64, decay: Duration) -> f64 {
    if old.is_nan() || rtt > old {
        return rtt;
    }
    let w = decay_factor(now.saturating_sub(updated) as f64, decay);
    old * w + rtt * (1.0 - w)
}

/// Cumulative weights for weighted random draws; zero-weight endpoints
/// take no range.
#[derive(Debug, Default)]
pub(crate) struct Weights {
    cumulative: Vec<u64>,
}

impl Weights {
    pub(crate) fn new(candidates: &[Candidate]) -> Self {
        let mut total = 0u64;
        let cumulative = candidates
            .iter()
            .map(|c| {
                total += u64::from(c.weight);
                total
            })
            .collect();
        Self { cumulative }
    }

    pub(crate) fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The index owning point `x` in `0..total`.
    pub(crate) fn index(&self, x: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= x)
    }

    /// A weighted random index, or `None` when every weight is 0.
    pub(crate) fn draw(&self) -> Option<usize> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        Some(self.index(fast_random() % total))
    }
}

/// A random index in `0..n` (0 when `n` is 0).
pub fn fast_random_index(n: usize) -> usize {
    (fast_random() % (n.max(1) as u64)) as usize
}

/// A fast per-thread random number (xorshift64*, seeded once per thread).
pub(crate) fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn cands(weights: &[u32]) -> Vec<Candidate> {
        let neutral = Arc::new(Neutral::default());
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Candidate {
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                weight: *w,
                load: Arc::new(Load::new(neutral.clone())),
            })
            .collect()
    }

    pub fn counts(b: &dyn Balancer, n: usize, len: usize) -> Vec<usize> {
        let mut out = vec![0; len];
        for _ in 0..n {
            out[b.pick(&PickContext::default()).unwrap()] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests;
