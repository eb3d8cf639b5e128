//! # metrics: RED metrics per listener, route, cluster and status class
//!
//! At the end of each stream (`on_log`) this filter counts the request and
//! records its duration in a histogram with the configured buckets.
//!
//! ```toml
//! [filters.metrics]
//! module = "metrics.wasm"
//! config = { buckets_ms = [5, 10, 25, 50, 100, 250, 500, 1000] }   # optional
//! ```
//!
//! ## Metric names (the label convention)
//!
//! Proxy-Wasm metrics have no labels, so labels travel in the name as
//! `base;label=value;label=value` (the convention of
//! [`wasp_sdk::metrics::labeled`]); wasp's `/metrics` renders that as
//! `base{label="value",...}`. Label order is fixed. Per label set this filter
//! defines, lazily on first use:
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `wasp_http_requests_total;listener=L;route=R;cluster=C;code_class=2xx` | counter | requests (`code_class`: `1xx`..`5xx`, or `none` when no response was sent) |
//! | `wasp_http_request_duration_seconds_bucket;listener=L;route=R;cluster=C;le=B` | counter | cumulative histogram bucket, one per configured bound `B` (in seconds) plus `le=+Inf` |
//! | `wasp_http_request_duration_seconds_sum;listener=L;route=R;cluster=C;__scale=1000000` | counter | total duration in microseconds, exported in seconds |
//! | `wasp_http_request_duration_seconds_count;listener=L;route=R;cluster=C` | counter | observations |
//!
//! The histogram is kept in counters rather than the ABI's histogram type so
//! the buckets are the configured ones and the series are exactly
//! Prometheus's `_bucket`/`_sum`/`_count`. Durations are exported in seconds,
//! Prometheus's base unit: bounds are configured in milliseconds and printed
//! in seconds (`buckets_ms = [2.5, 5]` gives `le="0.0025"`, `le="0.005"`),
//! and the sum, an integer count of microseconds in the ABI, carries wasp's
//! reserved `__scale` label so `/metrics` divides it into seconds (and drops
//! the label). Label values are the properties `listener_name`,
//! `route_name`, `cluster_name` (empty when absent, e.g. no route matched);
//! `;`, `=` and newlines in values become `_`.
//!
//! Cardinality is bounded: after `max_label_sets` distinct
//! (listener, route, cluster) sets, new ones are counted under
//! `route=other;cluster=other`.
//!
//! Cost per request: three property reads, then 3 + (buckets at or above the
//! duration) counter increments, each a single host call with integers.

#![warn(missing_docs)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use wasp_sdk::metrics::{labeled, Counter};
use wasp_sdk::{props, ConfigError, Filter, HostError, Log, Root};

/// Base name of the request counter.
pub const REQUESTS_TOTAL: &str = "wasp_http_requests_total";
/// Base name of the duration histogram (`_bucket`, `_sum`, `_count`).
pub const DURATION: &str = "wasp_http_request_duration_seconds";
/// The sum is kept in microseconds; this label makes `/metrics` show seconds.
const MICROS: (&str, &str) = ("__scale", "1000000");

/// The filter's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Histogram bucket upper bounds in milliseconds, strictly increasing.
    #[serde(default = "default_buckets")]
    pub buckets_ms: Vec<f64>,
    /// Distinct (listener, route, cluster) sets before folding into `other`.
    #[serde(default = "default_max_label_sets")]
    pub max_label_sets: usize,
}

fn default_buckets() -> Vec<f64> {
    vec![
        1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ]
}

fn default_max_label_sets() -> usize {
    1000
}

/// The status class label for a status code.
///
/// ```
/// assert_eq!(metrics::code_class(Some(204)), "2xx");
/// assert_eq!(metrics::code_class(Some(503)), "5xx");
/// assert_eq!(metrics::code_class(None), "none");
/// ```
pub fn code_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Metric handles of one (listener, route, cluster) set.
struct Series {
    labels: String,
    requests: [Option<Counter>; 6],
    buckets: Vec<Counter>,
    inf: Counter,
    /// Microseconds.
    sum: Counter,
    count: Counter,
}

/// Plugin-wide state: bucket bounds and the lazily defined series.
pub struct State {
    bounds_us: Vec<u64>,
    bound_labels: Vec<String>,
    max_sets: usize,
    series: RefCell<HashMap<(String, String, String), Series>>,
}

impl State {
    fn define_series(
        &self,
        listener: &str,
        route: &str,
        cluster: &str,
    ) -> Result<Series, HostError> {
        let base = [
            ("listener", listener),
            ("route", route),
            ("cluster", cluster),
        ];
        let labels = labeled("", &base);
        let with = |name: &str, extra: Option<(&str, &str)>| {
            let mut l: Vec<(&str, &str)> = base.to_vec();
            l.extend(extra);
            Counter::define(&labeled(name, &l))
        };
        let bucket = format!("{DURATION}_bucket");
        let mut buckets = Vec::with_capacity(self.bound_labels.len());
        for le in &self.bound_labels {
            buckets.push(with(&bucket, Some(("le", le)))?);
        }
        Ok(Series {
            labels,
            requests: [None; 6],
            buckets,
            inf: with(&bucket, Some(("le", "+Inf")))?,
            sum: with(&format!("{DURATION}_sum"), Some(MICROS))?,
            count: with(&format!("{DURATION}_count"), None)?,
        })
    }

    /// Records one finished request.
    fn record(
        &self,
        listener: String,
        route: String,
        cluster: String,
        status: Option<u16>,
        us: Option<u64>,
    ) {
        let mut all = self.series.borrow_mut();
        let mut key = (listener, route, cluster);
        if !all.contains_key(&key) && all.len() >= self.max_sets {
            key.1 = "other".into();
            key.2 = "other".into();
        }
        if !all.contains_key(&key) {
            match self.define_series(&key.0, &key.1, &key.2) {
                Ok(s) => {
                    all.insert(key.clone(), s);
                }
                Err(e) => {
                    wasp_sdk::warn!("metrics: cannot define series: {e}");
                    return;
                }
            }
        }
        let Some(s) = all.get_mut(&key) else {
            return;
        };
        let class = code_class(status);
        let idx = CLASSES.iter().position(|c| *c == class).unwrap_or(5);
        let counter = match s.requests[idx] {
            Some(c) => c,
            None => {
                let name = format!("{REQUESTS_TOTAL}{};code_class={class}", s.labels);
                match Counter::define(&name) {
                    Ok(c) => {
                        s.requests[idx] = Some(c);
                        c
                    }
                    Err(e) => {
                        wasp_sdk::warn!("metrics: cannot define {name}: {e}");
                        return;
                    }
                }
            }
        };
        counter.inc();
        if let Some(us) = us {
            for (bound, c) in self.bounds_us.iter().zip(&s.buckets) {
                if us <= *bound {
                    c.inc();
                }
            }
            s.inf.inc();
            s.count.inc();
            s.sum.add(us);
        }
    }
}

/// Formats a bucket bound, whole microseconds, the way it appears in `le`:
/// seconds. (An integer divided by 10^6 is the double nearest the exact
/// decimal, so it prints without binary noise.)
///
/// ```
/// assert_eq!(metrics::format_bound(5_000), "0.005");
/// assert_eq!(metrics::format_bound(2_500), "0.0025");
/// assert_eq!(metrics::format_bound(10_000_000), "10");
/// ```
pub fn format_bound(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// The metrics filter.
pub struct Metrics {
    state: Rc<State>,
}

impl Filter for Metrics {
    type Config = Config;
    type State = State;

    fn configure(config: Config, _root: &mut Root) -> Result<State, ConfigError> {
        if config.buckets_ms.is_empty() || config.buckets_ms.len() > 64 {
            return Err("buckets_ms: give between 1 and 64 bounds".into());
        }
        for (i, b) in config.buckets_ms.iter().enumerate() {
            if !b.is_finite() || *b <= 0.0 {
                return Err(format!("buckets_ms[{i}]: {b} is not a positive number").into());
            }
            if i > 0 && *b <= config.buckets_ms[i - 1] {
                return Err(format!(
                    "buckets_ms[{i}]: {b} must be greater than the previous bound {}",
                    config.buckets_ms[i - 1]
                )
                .into());
            }
        }
        if config.max_label_sets == 0 {
            return Err("max_label_sets: must be at least 1".into());
        }
        let bounds_us: Vec<u64> = config
            .buckets_ms
            .iter()
            .map(|b| (b * 1000.0).round() as u64)
            .collect();
        // Bounds are kept in whole microseconds, so finer ones would collide.
        for (i, us) in bounds_us.iter().enumerate() {
            if *us == 0 || (i > 0 && *us == bounds_us[i - 1]) {
                return Err(format!(
                    "buckets_ms[{i}]: {} is not a whole microsecond above the previous bound",
                    config.buckets_ms[i]
                )
                .into());
            }
        }
        Ok(State {
            bound_labels: bounds_us.iter().map(|us| format_bound(*us)).collect(),
            bounds_us,
            max_sets: config.max_label_sets,
            series: RefCell::new(HashMap::new()),
        })
    }

    fn new(state: &Rc<State>) -> Self {
        Metrics {
            state: state.clone(),
        }
    }

    fn on_log(&mut self, log: &Log) {
        let listener = log.listener().unwrap_or_default();
        let route = props::get_string(props::ROUTE_NAME).unwrap_or_default();
        let cluster = props::get_string(props::CLUSTER_NAME).unwrap_or_default();
        let us = log
            .duration()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.state
            .record(listener, route, cluster, log.status(), us);
    }
}

wasp_sdk::register!(Metrics);

#[cfg(test)]
mod tests;
