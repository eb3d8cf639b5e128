//! Metric handles: [`Counter`], [`Gauge`], [`Histogram`].
//!
//! Define each metric once, in [`Filter::configure`](crate::Filter::configure)
//! (one `proxy_define_metric` per name), keep the handle in your state, and
//! update it per request: an update is one host call with two integers, no
//! strings. Handles are `Copy`. Updates never fail the request: an error from
//! the host is ignored (metrics are best effort).
//!
//! Proxy-Wasm metrics have no labels. wasp's convention is to put them in the
//! name: `base;label=value;label=value` (see [`labeled`]); wasp's `/metrics`
//! renders that as `base{label="value",...}`. Other hosts show the raw name.
//!
//! Values are integers, while Prometheus wants base units (seconds, bytes).
//! The reserved label `__scale=N` tells wasp the integer holds N units per
//! exported unit: a counter `lat_seconds_sum;__scale=1000000` that is fed
//! microseconds shows on `/metrics` as seconds, without the `__scale` label.
//!
//! ```
//! use wasp_sdk::metrics::{Counter, labeled};
//! let name = labeled("shop_checkouts_total", &[("region", "eu")]);
//! assert_eq!(name, "shop_checkouts_total;region=eu");
//! let c = Counter::define(&name).unwrap();
//! c.inc();
//! ```

use crate::abi::MetricType;
use crate::{host, HostError};

fn define(kind: MetricType, name: &str) -> Result<u32, HostError> {
    host::with(|h| h.define_metric(kind, name))
        .map_err(|s| HostError::new("proxy_define_metric", s))
}

/// Builds a name with labels in wasp's `base;k=v;k=v` convention. `;`, `=`
/// and newlines in values are replaced by `_` so the name stays parseable.
pub fn labeled(base: &str, labels: &[(&str, &str)]) -> String {
    let mut s = String::with_capacity(base.len() + labels.len() * 16);
    s.push_str(base);
    for (k, v) in labels {
        s.push(';');
        s.push_str(k);
        s.push('=');
        s.extend(v.chars().map(|c| match c {
            ';' | '=' | '\n' | '\r' => '_',
            c => c,
        }));
    }
    s
}

/// A monotonically increasing count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    id: u32,
}

impl Counter {
    /// Defines (or finds) the counter `name`.
    pub fn define(name: &str) -> Result<Self, HostError> {
        define(MetricType::Counter, name).map(|id| Self { id })
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        let delta = i64::try_from(n).unwrap_or(i64::MAX);
        let _ = host::with(|h| h.increment_metric(self.id, delta));
    }

    /// The current value as the host sees it.
    pub fn value(&self) -> Option<u64> {
        host::with(|h| h.metric(self.id)).ok()
    }
}

/// A value that goes up and down.
///
/// ```
/// let g = wasp_sdk::metrics::Gauge::define("inflight").unwrap();
/// g.add(1);
/// g.add(-1);
/// g.set(7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauge {
    id: u32,
}

impl Gauge {
    /// Defines (or finds) the gauge `name`.
    pub fn define(name: &str) -> Result<Self, HostError> {
        define(MetricType::Gauge, name).map(|id| Self { id })
    }

    /// Sets the value.
    pub fn set(&self, value: u64) {
        let _ = host::with(|h| h.record_metric(self.id, value));
    }

    /// Adds `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        let _ = host::with(|h| h.increment_metric(self.id, delta));
    }

    /// The current value as the host sees it.
    pub fn value(&self) -> Option<u64> {
        host::with(|h| h.metric(self.id)).ok()
    }
}

/// A distribution; the host chooses the buckets. (For buckets of your own,
/// as the built-in `metrics` filter does, use one [`Counter`] per bucket.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    id: u32,
}

impl Histogram {
    /// Defines (or finds) the histogram `name`.
    pub fn define(name: &str) -> Result<Self, HostError> {
        define(MetricType::Histogram, name).map(|id| Self { id })
    }

    /// Records one observation.
    pub fn record(&self, value: u64) {
        let _ = host::with(|h| h.record_metric(self.id, value));
    }
}
