//! A lock-free histogram for the request path.
//!
//! prometheus-client's own histogram takes a write lock on every observation;
//! this one is a fixed array of relaxed atomics, so workers recording into the
//! same series never wait on each other. Readers (a scrape) may see a count
//! and a sum from slightly different instants, which Prometheus tolerates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds in seconds: 0.5 ms to 10 s, roughly doubling.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Cheap to clone: clones share the same counts.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Non-cumulative counts; the last slot is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum in nanoseconds, so it stays an integer atomic.
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe_secs(&self, secs: f64) {
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.inner.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.inner
            .sum_nanos
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, c) in self.inner.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            buckets.push((bound, cumulative));
        }
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
