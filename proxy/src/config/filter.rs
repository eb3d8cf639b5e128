//! A filter's host-side caps as plain data (`[filters.NAME] limits`); the
//! engine (`filter`) enforces them.

/// Caps on host-side work and state of one filter (`[filters.NAME] limits`).
/// What the guest sees over each is in `docs/filter-contract.md` ("Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    /// Entries a filter may grow a header or trailer map to (Envoy's
    /// `max_headers_count` default).
    pub headers: usize,
    /// Bytes (names plus values) a filter may grow a header map to
    /// (Envoy's `max_request_headers_kb` default).
    pub header_bytes: usize,
    /// Log bytes one callback may emit (`proxy_log` and stdout/stderr;
    /// each line also counts [`HostLimits::LOG_LINE_OVERHEAD`]).
    pub log_bytes: usize,
    /// Bytes of shared data (keys plus values) of this filter, all workers.
    pub shared_data: usize,
    /// Keys of shared data of this filter, all workers.
    pub shared_data_keys: usize,
    /// Shared queues this filter may register.
    pub queues: usize,
    /// Items one shared queue holds (the oldest is dropped beyond).
    pub queue_depth: usize,
    /// Bytes one shared queue holds (the oldest items are dropped beyond).
    pub queue_bytes: usize,
    /// Metrics this filter may define (all workers, all generations).
    pub metrics: usize,
    /// `http_call`s of this filter in flight (all workers together).
    pub callouts: usize,
}

impl HostLimits {
    pub const DEFAULT_HEADERS: usize = 100;
    pub const DEFAULT_HEADER_BYTES: usize = 60 << 10;
    pub const DEFAULT_LOG_BYTES: usize = 64 << 10;
    pub const DEFAULT_SHARED_DATA: usize = 4 << 20;
    pub const DEFAULT_SHARED_DATA_KEYS: usize = 10_000;
    pub const DEFAULT_QUEUES: usize = 16;
    pub const DEFAULT_QUEUE_DEPTH: usize = 1_000;
    pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;
    pub const DEFAULT_METRICS: usize = 1_000;
    pub const DEFAULT_CALLOUTS: usize = 256;
    /// Largest `headers` a config may ask for (the `http` crate's maps hold
    /// at most 32,768 entries).
    pub const MAX_HEADERS: usize = 10_000;
    /// Log budget every line costs on top of its text.
    pub const LOG_LINE_OVERHEAD: usize = 64;
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            headers: Self::DEFAULT_HEADERS,
            header_bytes: Self::DEFAULT_HEADER_BYTES,
            log_bytes: Self::DEFAULT_LOG_BYTES,
            shared_data: Self::DEFAULT_SHARED_DATA,
            shared_data_keys: Self::DEFAULT_SHARED_DATA_KEYS,
            queues: Self::DEFAULT_QUEUES,
            queue_depth: Self::DEFAULT_QUEUE_DEPTH,
            queue_bytes: Self::DEFAULT_QUEUE_BYTES,
            metrics: Self::DEFAULT_METRICS,
            callouts: Self::DEFAULT_CALLOUTS,
        }
    }
}
