//! Filter metrics: guest-defined metrics (`proxy_define_metric` & co.) and
//! the engine's own per filter+phase call statistics, rendered as Prometheus
//! text.
//!
//! Written by worker threads (relaxed atomics only; a lock is taken when a
//! guest *defines* a metric, which SDKs do once per VM), read by the control
//! thread at scrape time. Stores are keyed by filter name and outlive
//! generations, so counters survive reloads.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Metric kinds of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_abi(v: i32) -> Option<Self> {
        match v {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }

    fn prom(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Upper bounds of guest histogram buckets (the guest's own unit).
const GUEST_BUCKETS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 100_000,
];

/// Upper bounds of callback duration buckets, in microseconds.
const DURATION_BUCKETS_US: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 10_000, 50_000, 250_000,
];

/// A fixed-bucket histogram of relaxed atomics.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [u64],
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, v: u64) {
        if let Some(c) = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .and_then(|i| self.counts.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes `_bucket`, `_sum`, `_count` lines; `scale` divides bounds and sum.
    fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            let n = self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            cumulative = u64::wrapping_add(cumulative, n);
            let le = *b as f64 / scale;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum.load(Ordering::Relaxed) as f64 / scale;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One guest-defined metric, shared by every VM of the filter.
#[derive(Debug)]
pub(crate) struct GuestMetric {
    pub name: String,
    pub kind: MetricKind,
    value: AtomicI64,
    histogram: Option<Histogram>,
}

impl GuestMetric {
    /// `proxy_increment_metric`; false for histograms and for decrementing a counter.
    pub(crate) fn increment(&self, by: i64) -> bool {
        if self.kind == MetricKind::Histogram || (self.kind == MetricKind::Counter && by < 0) {
            return false;
        }
        self.value.fetch_add(by, Ordering::Relaxed);
        true
    }

    /// `proxy_record_metric`: sets counters and gauges, observes histograms.
    pub(crate) fn record(&self, v: u64) {
        match &self.histogram {
            Some(h) => h.record(v),
            None => self.value.store(v as i64, Ordering::Relaxed),
        }
    }

    /// `proxy_get_metric` (histograms answer their observation count).
    pub(crate) fn get(&self) -> u64 {
        match &self.histogram {
            Some(h) => h.count.load(Ordering::Relaxed),
            None => self.value.load(Ordering::Relaxed) as u64,
        }
    }
}

/// Outcome of a `proxy_define_metric`.
#[derive(Debug)]
pub(crate) enum Defined {
    /// Defined (or found) under this id.
    Metric(u32, Arc<GuestMetric>),
    /// Already defined with another kind.
    KindClash,
    /// The filter already defined `limits.metrics` metrics.
    Full,
    /// The name is wasp's own (`wasp_*`, `process_*`) or too long.
    Reserved,
}

/// Name prefixes of wasp's own families: a guest metric may not use them,
/// or a scrape could carry two families of one name and be rejected whole.
pub(crate) const RESERVED_PREFIXES: [&str; 2] = ["wasp_", "process_"];

/// Inside `wasp_`, the namespace of the built-in metrics filter
/// (`wasp_http_requests_total`, ...): open to guests, never used by the core.
pub(crate) const GUEST_NAMESPACE: &str = "wasp_http_";

/// Whether a (canonical) guest metric name is one wasp keeps for itself.
pub(crate) fn reserved_name(name: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) && !name.starts_with(GUEST_NAMESPACE)
}

/// Longest metric name (with its `;key=value` labels) a guest may define.
pub(crate) const MAX_METRIC_NAME_BYTES: usize = 1024;

/// Ids handed out for metrics that are not kept (over a limit, reserved
/// name, kind clash): `DISCARD_BASE + kind`. Updates to them answer OK and
/// go nowhere, so a filter over its limit keeps serving.
const DISCARD_BASE: u32 = 0xffff_ff00;

/// The guest metrics of one filter (all VMs, all workers, all generations).
#[derive(Debug)]
pub(crate) struct MetricStore {
    inner: Mutex<MetricStoreInner>,
    /// The sink behind every discard id (never rendered; a gauge, so any
    /// update answers OK).
    discard: Arc<GuestMetric>,
}

impl Default for MetricStore {
    fn default() -> Self {
        MetricStore {
            inner: Mutex::default(),
            discard: Arc::new(GuestMetric {
                name: String::new(),
                kind: MetricKind::Gauge,
                value: AtomicI64::new(0),
                histogram: None,
            }),
        }
    }
}

#[derive(Debug, Default)]
struct MetricStoreInner {
    by_name: HashMap<String, u32>,
    metrics: Vec<Arc<GuestMetric>>,
}

impl MetricStore {
    /// Defines (or finds) a metric; ids start at 1. At most `max` metrics.
    pub(crate) fn define(&self, kind: MetricKind, name: &str, max: usize) -> Defined {
        if name.len() > MAX_METRIC_NAME_BYTES {
            return Defined::Reserved;
        }
        let name = canonical(name);
        if reserved_name(&name) {
            return Defined::Reserved;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = g.by_name.get(&name).copied() {
            let Some(m) = g.metrics.get((id as usize).saturating_sub(1)).cloned() else {
                return Defined::KindClash;
            };
            return if m.kind == kind {
                Defined::Metric(id, m)
            } else {
                Defined::KindClash
            };
        }
        if g.metrics.len() >= max {
            return Defined::Full;
        }
        let m = Arc::new(GuestMetric {
            name: name.clone(),
            kind,
            value: AtomicI64::new(0),
            histogram: (kind == MetricKind::Histogram).then(|| Histogram::new(&GUEST_BUCKETS)),
        });
        g.metrics.push(m.clone());
        let id = u32::try_from(g.metrics.len()).unwrap_or(u32::MAX);
        g.by_name.insert(name, id);
        Defined::Metric(id, m)
    }

    /// The id of the sink for metrics of `kind` that are not kept.
    pub(crate) fn discard_id(kind: MetricKind) -> u32 {
        DISCARD_BASE
            + match kind {
                MetricKind::Counter => 0,
                MetricKind::Gauge => 1,
                MetricKind::Histogram => 2,
            }
    }

    /// Finds a metric defined by another VM of the same filter (or a sink).
    pub(crate) fn get(&self, id: u32) -> Option<Arc<GuestMetric>> {
        if id >= DISCARD_BASE {
            return Some(self.discard.clone());
        }
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.metrics.get((id as usize).checked_sub(1)?).cloned()
    }

    fn snapshot(&self) -> Vec<Arc<GuestMetric>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.metrics.clone()
    }
}

/// Callback phases with their own statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Start,
    ContextCreate,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    HttpCallResponse,
    /// `proxy_on_grpc_*` (metadata, message, close).
    GrpcCallback,
    Tick,
    Log,
    Done,
}

impl Phase {
    const ALL: [Phase; 13] = [
        Phase::Start,
        Phase::ContextCreate,
        Phase::RequestHeaders,
        Phase::RequestBody,
        Phase::RequestTrailers,
        Phase::ResponseHeaders,
        Phase::ResponseBody,
        Phase::ResponseTrailers,
        Phase::HttpCallResponse,
        Phase::GrpcCallback,
        Phase::Tick,
        Phase::Log,
        Phase::Done,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::ContextCreate => "context_create",
            Phase::RequestHeaders => "request_headers",
            Phase::RequestBody => "request_body",
            Phase::RequestTrailers => "request_trailers",
            Phase::ResponseHeaders => "response_headers",
            Phase::ResponseBody => "response_body",
            Phase::ResponseTrailers => "response_trailers",
            Phase::HttpCallResponse => "http_call_response",
            Phase::GrpcCallback => "grpc_callback",
            Phase::Tick => "tick",
            Phase::Log => "log",
            Phase::Done => "done",
        }
    }
}

/// How a callback ended, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallResult {
    Ok,
    Trap,
    Timeout,
    /// Memory cap, `proc_exit`, or another host-side error.
    Error,
}

#[derive(Debug)]
struct PhaseStats {
    calls: AtomicU64,
    errors: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    duration: Histogram,
}

/// A host-side cap of a filter (`[filters.NAME] limits`), as counted in
/// `wasp_filter_limit_exceeded_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Headers,
    HeaderBytes,
    LogBytes,
    SharedData,
    SharedDataKeys,
    Queues,
    QueueDepth,
    QueueBytes,
    Metrics,
    /// A metric name in wasp's own namespace (`wasp_*`, `process_*`).
    MetricName,
    Callouts,
    /// A body rewritten past `max_body_bytes`.
    BodyBytes,
    /// Properties set on one stream past [`MAX_PROPERTY_BYTES`](super::abi::properties::MAX_PROPERTY_BYTES).
    Properties,
}

impl Limit {
    const ALL: [Limit; 13] = [
        Limit::Headers,
        Limit::HeaderBytes,
        Limit::LogBytes,
        Limit::SharedData,
        Limit::SharedDataKeys,
        Limit::Queues,
        Limit::QueueDepth,
        Limit::QueueBytes,
        Limit::Metrics,
        Limit::MetricName,
        Limit::Callouts,
        Limit::BodyBytes,
        Limit::Properties,
    ];

    /// The config key (and metric label) of the limit.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Limit::Headers => "headers",
            Limit::HeaderBytes => "header_bytes",
            Limit::LogBytes => "log_bytes",
            Limit::SharedData => "shared_data",
            Limit::SharedDataKeys => "shared_data_keys",
            Limit::Queues => "queues",
            Limit::QueueDepth => "queue_depth",
            Limit::QueueBytes => "queue_bytes",
            Limit::Metrics => "metrics",
            Limit::MetricName => "metric_name",
            Limit::Callouts => "callouts",
            Limit::BodyBytes => "max_body_bytes",
            Limit::Properties => "properties",
        }
    }

    fn index(self) -> usize {
        Limit::ALL.iter().position(|l| *l == self).unwrap_or(0)
    }
}

/// Least time between two log lines about the same filter and limit.
const LIMIT_LOG_INTERVAL_MS: u64 = 10_000;

fn millis_since_start() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct LimitStats {
    exceeded: AtomicU64,
    /// `millis_since_start() + 1` of the last log line (0: never logged).
    logged_at: AtomicU64,
}

/// Per filter+phase statistics of the engine.
#[derive(Debug)]
pub(crate) struct FilterStats {
    phases: Vec<PhaseStats>,
    limits: Vec<LimitStats>,
    /// Bytes the host copied into guest memory (`copy_out`).
    copied_to_guest: AtomicU64,
    /// Bodies this filter resized after their head went with a
    /// `content-length` (`wasp_filter_misframed_bodies_total`).
    misframed: AtomicU64,
}

impl Default for FilterStats {
    fn default() -> Self {
        FilterStats {
            limits: Limit::ALL.iter().map(|_| LimitStats::default()).collect(),
            copied_to_guest: AtomicU64::new(0),
            misframed: AtomicU64::new(0),
            phases: Phase::ALL
                .iter()
                .map(|_| PhaseStats {
                    calls: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    traps: AtomicU64::new(0),
                    timeouts: AtomicU64::new(0),
                    duration: Histogram::new(&DURATION_BUCKETS_US),
                })
                .collect(),
        }
    }
}

impl FilterStats {
    pub(crate) fn record(&self, phase: Phase, took: Duration, result: CallResult) {
        // `ALL` lists the phases in declaration order (`phase_index_is_its_discriminant`).
        let idx = phase as usize;
        let Some(s) = self.phases.get(idx) else {
            return;
        };
        s.calls.fetch_add(1, Ordering::Relaxed);
        s.duration.record(took.as_micros() as u64);
        match result {
            CallResult::Ok => {}
            CallResult::Trap => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                s.traps.fetch_add(1, Ordering::Relaxed);
            }
            CallResult::Timeout => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                s.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            CallResult::Error => {
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a body the filter resized after its head went on with a
    /// `content-length` (the body is cut at that length, or ends short);
    /// the first one of the filter is logged.
    pub(crate) fn misframed(&self, filter: &str, body: &'static str) {
        if self.misframed.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                filter,
                body,
                "a filter changed the length of a body whose head had already gone on with content-length: the body is cut at that length or ends short; logged once per filter (wasp_filter_misframed_bodies_total)"
            );
        }
    }

    /// Counts a host call refused (or trimmed) by a limit and logs it, at
    /// most once per [`LIMIT_LOG_INTERVAL_MS`] per filter and limit.
    pub(crate) fn limit_exceeded(&self, filter: &str, limit: Limit, detail: &str) {
        let Some(s) = self.limits.get(limit.index()) else {
            return;
        };
        let total = s.exceeded.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let now = millis_since_start().saturating_add(1);
        let last = s.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LIMIT_LOG_INTERVAL_MS;
        if due
            && s.logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                filter,
                limit = limit.name(),
                times = total,
                "filter exceeded limits.{}: {detail} (logged at most every {}s)",
                limit.name(),
                LIMIT_LOG_INTERVAL_MS / 1000
            );
        }
    }

    pub(crate) fn limit_count(&self, limit: Limit) -> u64 {
        self.limits
            .get(limit.index())
            .map_or(0, |s| s.exceeded.load(Ordering::Relaxed))
    }

    pub(crate) fn copied_to_guest(&self, bytes: usize) {
        self.copied_to_guest
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn copied_to_guest_total(&self) -> u64 {
        self.copied_to_guest.load(Ordering::Relaxed)
    }

    /// Sum of the durations recorded for `phase`, in microseconds.
    #[cfg(test)]
    pub(crate) fn duration_sum_us(&self, phase: Phase) -> u64 {
        let idx = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases[idx].duration.sum.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn calls(&self, phase: Phase) -> u64 {
        let idx = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases[idx].calls.load(Ordering::Relaxed)
    }
}

/// Metric names from guests: `[a-zA-Z0-9_:]`, not starting with a digit.
pub(crate) fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders everything as Prometheus text. `filters`: (name, stats, guest metrics).
pub(crate) fn render(out: &mut String, filters: &[(String, Arc<FilterStats>, Arc<MetricStore>)]) {
    type Field = fn(&PhaseStats) -> &AtomicU64;
    let counters: [(&str, &str, Field); 4] = [
        ("wasp_filter_calls_total", "Filter callbacks run.", |s| {
            &s.calls
        }),
        (
            "wasp_filter_errors_total",
            "Filter callbacks that failed (any reason).",
            |s| &s.errors,
        ),
        (
            "wasp_filter_traps_total",
            "Filter callbacks that trapped.",
            |s| &s.traps,
        ),
        (
            "wasp_filter_timeouts_total",
            "Filter callbacks stopped by the CPU deadline.",
            |s| &s.timeouts,
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (filter, stats, _) in filters {
            for (i, p) in Phase::ALL.iter().enumerate() {
                let v = get(&stats.phases[i]).load(Ordering::Relaxed);
                if v > 0 {
                    let f = label(filter);
                    let _ = writeln!(out, "{name}{{filter=\"{f}\",phase=\"{}\"}} {v}", p.name());
                }
            }
        }
    }
    let name = "wasp_filter_limit_exceeded_total";
    let _ = writeln!(
        out,
        "# HELP {name} Host calls refused or trimmed by a filter's limits (see docs/filter-contract.md)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (filter, stats, _) in filters {
        for limit in Limit::ALL {
            let v = stats.limit_count(limit);
            if v > 0 {
                let f = label(filter);
                let _ = writeln!(
                    out,
                    "{name}{{filter=\"{f}\",limit=\"{}\"}} {v}",
                    limit.name()
                );
            }
        }
    }
    let name = "wasp_filter_misframed_bodies_total";
    let _ = writeln!(
        out,
        "# HELP {name} Bodies a filter resized after their head had gone on with content-length (cut there or ended short)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (filter, stats, _) in filters {
        let v = stats.misframed.load(Ordering::Relaxed);
        if v > 0 {
            let _ = writeln!(out, "{name}{{filter=\"{}\"}} {v}", label(filter));
        }
    }
    let name = "wasp_filter_guest_copy_bytes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Bytes the host copied into filter memory."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (filter, stats, _) in filters {
        let v = stats.copied_to_guest.load(Ordering::Relaxed);
        if v > 0 {
            let _ = writeln!(out, "{name}{{filter=\"{}\"}} {v}", label(filter));
        }
    }
    let name = "wasp_filter_callback_duration_seconds";
    let _ = writeln!(out, "# HELP {name} Duration of filter callbacks.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (filter, stats, _) in filters {
        for (i, p) in Phase::ALL.iter().enumerate() {
            let s = &stats.phases[i];
            if s.calls.load(Ordering::Relaxed) > 0 {
                let labels = format!("filter=\"{}\",phase=\"{}\"", label(filter), p.name());
                s.duration.render(out, name, &labels, 1e6);
            }
        }
    }

    // Guest metrics. Names may carry labels as `base;key=value;...` (the
    // wasp-sdk convention, since the ABI has none); they become real labels.
    // Counters named `X_bucket` (with `le`), `X_sum` and `X_count` form one
    // histogram family `X`, which is how the SDK exports custom buckets.
    // The reserved label `__scale=N` is not exported: it says the guest's
    // integer holds N units per exported unit (ABI values are integers, and
    // Prometheus wants base units: microseconds kept with `__scale=1000000`
    // are exported as seconds).
    let mut all: Vec<(&str, Arc<GuestMetric>)> = Vec::new();
    for (filter, _, store) in filters {
        for m in store.snapshot() {
            all.push((filter, m));
        }
    }
    let stems: std::collections::HashSet<String> = all
        .iter()
        .filter_map(|(_, m)| {
            let (base, labels) = split_name(&m.name);
            let stem = base.strip_suffix("_bucket")?;
            labels
                .iter()
                .any(|(k, _)| *k == "le")
                .then(|| stem.to_string())
        })
        .collect();
    // A histogram family `X` owns the sample names `X_bucket`, `X_sum` and
    // `X_count`: a gauge or plain counter of one of those names (from any
    // filter) would make a parser see a second TYPE for the family and
    // reject the whole scrape, so such a metric is not exported.
    let histogram_samples: std::collections::HashSet<String> = all
        .iter()
        .filter(|(_, m)| m.kind == MetricKind::Histogram)
        .map(|(_, m)| split_name(&m.name).0.to_string())
        .chain(stems.iter().cloned())
        .flat_map(|stem| ["_bucket", "_sum", "_count"].map(|suffix| format!("{stem}{suffix}")))
        .collect();
    let mut families: BTreeMap<String, (&'static str, String)> = BTreeMap::new();
    for (filter, m) in &all {
        let (base, labels) = split_name(&m.name);
        let mut rendered = format!("filter=\"{}\"", label(filter));
        let mut used: Vec<String> = vec!["filter".to_string()];
        let mut scale = None;
        for (k, v) in &labels {
            if *k == SCALE_LABEL {
                scale = v.parse::<u64>().ok().filter(|n| *n > 0);
                continue;
            }
            let k = label_name(k, m.kind);
            // A repeated label name would make the whole scrape invalid.
            if used.contains(&k) {
                continue;
            }
            rendered.push_str(&format!(",{k}=\"{}\"", label(v)));
            used.push(k);
        }
        let histogram_stem = (m.kind == MetricKind::Counter)
            .then(|| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| base.strip_suffix(suffix))
                    .filter(|stem| stems.contains(*stem))
            })
            .flatten();
        if histogram_stem.is_none() && histogram_samples.contains(base) {
            continue;
        }
        // A bucket's `le` must be a number (or +Inf), or the scrape is invalid.
        if histogram_stem.is_some() && base.ends_with("_bucket") {
            let le_ok = labels
                .iter()
                .find(|(k, _)| *k == "le")
                .is_some_and(|(_, v)| *v == "+Inf" || v.parse::<f64>().is_ok_and(|f| !f.is_nan()));
            if !le_ok {
                continue;
            }
        }
        let (family, kind) = match histogram_stem {
            Some(stem) => (stem.to_string(), "histogram"),
            None => (base.to_string(), m.kind.prom()),
        };
        let entry = families.entry(family).or_insert((kind, String::new()));
        if entry.0 != kind {
            continue;
        }
        match &m.histogram {
            Some(h) => h.render(&mut entry.1, base, &rendered, 1.0),
            None => {
                let v = m.value.load(Ordering::Relaxed);
                let _ = match scale {
                    Some(n) => writeln!(entry.1, "{base}{{{rendered}}} {}", v as f64 / n as f64),
                    None => writeln!(entry.1, "{base}{{{rendered}}} {v}"),
                };
            }
        }
    }
    for (name, (kind, lines)) in families {
        let _ = writeln!(out, "# HELP {name} Defined by a Wasm filter.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        out.push_str(&lines);
    }
}

/// A guest label name as exported: valid for Prometheus (no `:`), and
/// never one wasp sets itself (`filter`; `le` on a histogram) nor one
/// Prometheus reserves (`__*`): those get the `exported_` prefix, as
/// Prometheus itself renames a target's clashing labels.
fn label_name(k: &str, kind: MetricKind) -> String {
    let k = k.replace(':', "_");
    let reserved =
        k == "filter" || k.starts_with("__") || (kind == MetricKind::Histogram && k == "le");
    if reserved {
        format!("exported_{k}")
    } else {
        k
    }
}

/// The reserved guest label holding a value's scale (see [`render`]).
const SCALE_LABEL: &str = "__scale";

/// `base;key=value;...` with the base and keys made valid Prometheus names.
fn canonical(name: &str) -> String {
    let mut parts = name.split(';');
    let mut out = sanitize(parts.next().unwrap_or(""));
    for part in parts {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push(';');
        out.push_str(&sanitize(k));
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Splits a canonical name into its base and labels.
fn split_name(name: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts = name.split(';');
    let base = parts.next().unwrap_or("");
    let labels = parts
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    (base, labels)
}

#[cfg(test)]
mod unit {
    use super::*;

    impl MetricStore {
        fn def(&self, kind: MetricKind, name: &str) -> Option<(u32, Arc<GuestMetric>)> {
            match self.define(kind, name, 1000) {
                Defined::Metric(id, m) => Some((id, m)),
                _ => None,
            }
        }
    }

    #[test]
    fn guest_metrics_never_collide_with_wasp_families_or_labels() {
        let s = Arc::new(MetricStore::default());
        assert!(matches!(
            s.define(MetricKind::Counter, "wasp_requests_total", 10),
            Defined::Reserved
        ));
        assert!(matches!(
            s.define(MetricKind::Gauge, "process.threads", 10),
            Defined::Reserved
        ));
        assert!(matches!(
            s.define(MetricKind::Counter, "wasp_http_requests_total", 10),
            Defined::Metric(..)
        ));
        let (_, c) = s
            .def(
                MetricKind::Counter,
                "mine_total;filter=evil;a:b=1;__x=2;a_b=3",
            )
            .unwrap();
        c.increment(1);
        let (_, h) = s.def(MetricKind::Histogram, "lat;le=5").unwrap();
        h.record(3);
        for i in 0..3 {
            s.def(MetricKind::Counter, &format!("n{i}_total")).unwrap();
        }
        assert!(matches!(
            s.define(MetricKind::Counter, "one_too_many_total", 5),
            Defined::Full
        ));
        let sink = s
            .get(MetricStore::discard_id(MetricKind::Histogram))
            .unwrap();
        assert!(sink.increment(5));
        let mut out = String::new();
        render(
            &mut out,
            &[("f".into(), Arc::new(FilterStats::default()), s)],
        );
        assert!(
            out.contains("mine_total{filter=\"f\",exported_filter=\"evil\",a_b=\"1\",exported___x=\"2\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_bucket{filter=\"f\",exported_le=\"5\",le=\"5\"} 1\n"),
            "{out}"
        );
        assert!(!out.contains("wasp_requests_total"), "{out}");
    }

    /// A gauge or counter named like a histogram's samples, and a bucket
    /// whose `le` is not a number, are left out: the scrape stays valid
    /// (checked with promtool when it is installed, as scripts/test.sh does).
    #[test]
    fn histogram_sample_names_and_bad_le_cannot_break_the_scrape() {
        let s = Arc::new(MetricStore::default());
        let (_, h) = s.def(MetricKind::Histogram, "lat").unwrap();
        h.record(3);
        for name in ["lat_count", "lat_sum"] {
            let (_, g) = s.def(MetricKind::Gauge, name).unwrap();
            g.record(7);
        }
        let (_, b) = s.def(MetricKind::Counter, "x_bucket;le=abc").unwrap();
        b.increment(1);
        let (_, b) = s.def(MetricKind::Counter, "x_bucket;le=+Inf").unwrap();
        b.increment(1);
        let (_, c) = s.def(MetricKind::Counter, "x_count").unwrap();
        c.increment(1);
        let mut out = String::new();
        render(
            &mut out,
            &[("f".into(), Arc::new(FilterStats::default()), s)],
        );
        assert_eq!(out.matches("# TYPE lat ").count(), 1, "{out}");
        assert!(!out.contains("# TYPE lat_count"), "{out}");
        assert!(!out.contains("le=\"abc\""), "{out}");
        assert!(
            out.contains("x_bucket{filter=\"f\",le=\"+Inf\"} 1"),
            "{out}"
        );
        if let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write as _;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(out.as_bytes());
            }
            let done = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("promtool: {e}"));
            let said = String::from_utf8_lossy(&done.stderr).into_owned()
                + &String::from_utf8_lossy(&done.stdout);
            assert!(!said.contains("error"), "promtool: {said}\n{out}");
        }
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize("a.b-c"), "a_b_c");
        assert_eq!(sanitize("9lives"), "_9lives");
        assert_eq!(sanitize("ok_name:x"), "ok_name:x");
    }

    #[test]
    fn labels_in_names_become_labels_and_bucket_counters_a_histogram() {
        let s = Arc::new(MetricStore::default());
        let (_, c) = s
            .def(MetricKind::Counter, "req.total;route=a b;code_class=2xx")
            .unwrap();
        c.increment(3);
        for (le, v) in [("5", 1), ("+Inf", 2)] {
            let (_, b) = s
                .def(
                    MetricKind::Counter,
                    &format!("lat_ms_bucket;route=a;le={le}"),
                )
                .unwrap();
            b.increment(v);
        }
        let (_, sum) = s.def(MetricKind::Counter, "lat_ms_sum;route=a").unwrap();
        sum.increment(12);
        let (_, count) = s.def(MetricKind::Counter, "lat_ms_count;route=a").unwrap();
        count.increment(2);
        let mut out = String::new();
        render(
            &mut out,
            &[("f".into(), Arc::new(FilterStats::default()), s)],
        );
        assert!(out.contains("# TYPE req_total counter\nreq_total{filter=\"f\",route=\"a b\",code_class=\"2xx\"} 3\n"), "{out}");
        assert!(out.contains("# TYPE lat_ms histogram\n"), "{out}");
        assert!(
            out.contains("lat_ms_bucket{filter=\"f\",route=\"a\",le=\"+Inf\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_ms_sum{filter=\"f\",route=\"a\"} 12\n"),
            "{out}"
        );
        assert!(!out.contains("# TYPE lat_ms_sum"), "{out}");
    }

    #[test]
    fn scale_label_is_dropped_and_divides_the_value() {
        let s = Arc::new(MetricStore::default());
        let (_, sum) = s
            .def(
                MetricKind::Counter,
                "lat_seconds_sum;route=a;__scale=1000000",
            )
            .unwrap();
        sum.increment(2_500_250);
        let (_, bad) = s.def(MetricKind::Counter, "other_total;__scale=0").unwrap();
        bad.increment(7);
        let mut out = String::new();
        render(
            &mut out,
            &[("f".into(), Arc::new(FilterStats::default()), s)],
        );
        assert!(
            out.contains("lat_seconds_sum{filter=\"f\",route=\"a\"} 2.50025\n"),
            "{out}"
        );
        assert!(out.contains("other_total{filter=\"f\"} 7\n"), "{out}");
        assert!(!out.contains("__scale"), "{out}");
    }

    #[test]
    fn define_is_idempotent_and_typed() {
        let s = MetricStore::default();
        let (a, _) = s.def(MetricKind::Counter, "x").unwrap();
        let (b, _) = s.def(MetricKind::Counter, "x").unwrap();
        assert_eq!(a, b);
        assert!(s.def(MetricKind::Gauge, "x").is_none());
    }

    #[test]
    fn phase_index_is_its_discriminant() {
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{}", p.name());
        }
    }
}
