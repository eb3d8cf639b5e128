//! Per-VM host state (the `T` of `Store<T>`) and the per-stream data a
//! callback may read and change.
//!
//! Runs on a worker thread, inside one synchronous callback. A stream's data
//! lives in its [`StreamFilters`](super::StreamFilters) and is *moved* into
//! [`Host::stream`] for the duration of a callback, then moved back: host
//! functions never hold references into the request future, and nothing here
//! survives an await.
//!
//! Host functions only *record* what the guest asks for (local response,
//! continue, close, new callouts) in [`Actions`]; the caller acts after the
//! callback has returned, so the guest is never re-entered from a host call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use super::metrics::GuestMetric;
use super::plugin::PluginShared;
use super::worker::RootTx;
use super::{CalloutFuture, StreamInfo};

/// The request head as filters see it (pseudo headers come from method/uri).
#[derive(Debug, Clone)]
pub(crate) struct ReqHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// The response head as filters see it.
#[derive(Debug, Clone)]
pub(crate) struct RespHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// Which body a body callback is looking at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Request,
    Response,
}

/// Everything about one stream that host functions read or write.
#[derive(Debug)]
pub(crate) struct StreamData {
    pub info: StreamInfo,
    pub req: Option<ReqHead>,
    pub req_trailers: Option<HeaderMap>,
    pub resp: Option<RespHead>,
    pub resp_trailers: Option<HeaderMap>,
    /// The body buffer of the running body callback (whole buffered body
    /// when paused). `Bytes`, not `BytesMut`: a callback that only reads
    /// the chunk (or ignores it) passes it on as it came, with no copy to
    /// make a shared buffer unique; `proxy_set_buffer_bytes` builds a new
    /// one anyway.
    pub body: Bytes,
    pub body_dir: Option<Dir>,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    /// The connection the upstream's response came on (`upstream.*`
    /// beyond the address).
    pub upstream_conn: Option<Arc<crate::tls::UpstreamConn>>,
    /// Why connecting (TCP or TLS) to the upstream failed, when the
    /// request got no response for that (`upstream.transport_failure_reason`).
    pub upstream_failure: Option<Box<str>>,
    pub error_code: Option<&'static str>,
    /// Properties set with `proxy_set_property`, keyed by dot-joined path.
    pub props: HashMap<String, Bytes>,
    /// Set at log time.
    pub sizes: Option<(u64, u64)>,
    /// Entries and bytes of the request and response header maps as the
    /// chain received them: filters may grow each by `limits.headers` /
    /// `limits.header_bytes` beyond that, whatever the client or upstream
    /// sent (up to its own limits) and the core added.
    pub received: [(usize, usize); 2],
    /// Entries and bytes of the request and response header maps as they
    /// are now: set with `received` and kept current by every edit
    /// (`abi::headers`), so a limit check does not walk the map.
    pub usage: [(usize, usize); 2],
    /// The request / response head has gone on (its header callbacks are
    /// done): its header map can no longer change (BAD_ARGUMENT, as Envoy).
    pub heads_sent: [bool; 2],
}

/// Entries and bytes (names plus values) of a header map.
pub(crate) fn map_usage(h: &http::HeaderMap) -> (usize, usize) {
    let bytes = h.iter().fold(0usize, |n, (k, v)| {
        n.saturating_add(k.as_str().len().saturating_add(v.len()))
    });
    (h.len(), bytes)
}

impl StreamData {
    pub(crate) fn new(info: StreamInfo) -> Self {
        StreamData {
            info,
            req: None,
            received: [(0, 0); 2],
            usage: [(0, 0); 2],
            heads_sent: [false; 2],
            req_trailers: None,
            resp: None,
            resp_trailers: None,
            body: Bytes::new(),
            body_dir: None,
            route: None,
            cluster: None,
            upstream: None,
            upstream_conn: None,
            upstream_failure: None,
            error_code: None,
            props: HashMap::new(),
            sizes: None,
        }
    }
}

/// A response recorded by `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub(crate) struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// What the guest asked for during one callback.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    /// Boxed: a callback's outcome is moved up through several calls, and
    /// a local response is rare.
    pub local: Option<Box<LocalResponse>>,
    pub continue_request: bool,
    pub continue_response: bool,
    pub close: bool,
    /// Log bytes this callback emitted so far (`limits.log_bytes`).
    pub log_bytes: usize,
}

/// What a callout does once spawned.
pub(crate) enum CalloutWork {
    /// `proxy_http_call`: one answer.
    Http(CalloutFuture),
    /// `proxy_grpc_call` / `proxy_grpc_stream`: a sequence of events.
    Grpc(super::abi::grpc::GrpcTask),
}

/// A callout the guest started; spawned by the caller after the callback.
pub(crate) struct NewCallout {
    pub token: u32,
    /// Context that was effective when the call was made.
    pub context: u32,
    /// The root context that context belongs to (itself for a root),
    /// recorded now: the answer goes to that root even once the stream is
    /// gone, and a per-route root's call is answered on it, not on root 1.
    pub root: u32,
    pub timeout: Duration,
    pub work: CalloutWork,
}

/// The answer of an `http_call`, readable during `proxy_on_http_call_response`
/// (and one gRPC event, readable during its `proxy_on_grpc_*` callback:
/// metadata as `headers`/`trailers`, a message as `body`, the close status).
#[derive(Debug, Default)]
pub(crate) struct CalloutAnswer {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub trailers: Vec<(String, Vec<u8>)>,
    pub status: u32,
    pub message: String,
}

/// Memory cap of one VM; remembers whether the guest hit it.
#[derive(Debug)]
pub(crate) struct MemLimiter {
    pub max: usize,
    pub hit: bool,
}

impl ResourceLimiter for MemLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Why a guest stopped: raised from `proc_exit`.
#[derive(Debug)]
pub(crate) struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// Store data of one VM.
pub(crate) struct Host {
    pub plugin: Arc<PluginShared>,
    pub limiter: MemLimiter,
    pub memory: Option<Memory>,
    /// `proxy_on_memory_allocate` or `malloc`.
    pub alloc: Option<TypedFunc<u32, u32>>,
    pub root_id: u32,
    /// Root contexts made for per-route configs: `root_id + 1 ..= root_id + extra_roots`.
    pub extra_roots: u32,
    /// Which plugin configuration the running callback's context belongs
    /// to (0: the filter's own; k: the k-th per-route one).
    pub config_variant: u32,
    /// Wakes this VM's root driver (none for the validation VM).
    pub root_tx: Option<RootTx>,
    /// Context the guest acts on (`proxy_set_effective_context`).
    pub effective: u32,
    /// Context whose stream data is loaded in `stream`.
    pub stream_ctx: u32,
    pub stream: Option<Box<StreamData>>,
    pub answer: Option<CalloutAnswer>,
    pub actions: Actions,
    pub callouts: Vec<NewCallout>,
    /// The guest's open gRPC calls and streams, by token.
    pub grpc: HashMap<u32, super::abi::grpc::GrpcHandle>,
    pub next_token: u32,
    /// Milliseconds; 0 = no ticks.
    pub tick_period_ms: u32,
    /// Process-wide metrics resolved by this VM, by metric id.
    pub metrics: HashMap<u32, Arc<GuestMetric>>,
    /// Partial line of stdout/stderr output, per fd.
    pub out_lines: [Vec<u8>; 2],
    /// Header names and values this instance's filter keeps writing.
    pub interned: Interned,
}

impl Host {
    pub(crate) fn new(plugin: Arc<PluginShared>, memory_limit: usize) -> Self {
        Host {
            plugin,
            limiter: MemLimiter {
                max: memory_limit,
                hit: false,
            },
            memory: None,
            alloc: None,
            root_id: 0,
            extra_roots: 0,
            config_variant: 0,
            root_tx: None,
            effective: 0,
            stream_ctx: 0,
            stream: None,
            answer: None,
            actions: Actions::default(),
            callouts: Vec::new(),
            grpc: HashMap::new(),
            next_token: 1,
            tick_period_ms: 0,
            metrics: HashMap::new(),
            out_lines: [Vec::new(), Vec::new()],
            interned: Interned::default(),
        }
    }

    /// The plugin configuration of the running callback's root context.
    pub(crate) fn plugin_config(&self) -> Option<&Bytes> {
        self.plugin.config_of(self.config_variant)
    }

    /// The root context of the effective context: itself for a root, else
    /// the root of the running callback's config (a stream's parent).
    pub(crate) fn effective_root(&self) -> u32 {
        if self.is_root(self.effective) {
            self.effective
        } else {
            self.root_id.saturating_add(self.config_variant)
        }
    }

    /// Whether `ctx` is one of this VM's root contexts.
    pub(crate) fn is_root(&self, ctx: u32) -> bool {
        ctx >= self.root_id && ctx - self.root_id <= self.extra_roots
    }

    /// The stream data, if the effective context is the loaded stream.
    pub(crate) fn stream(&self) -> Option<&StreamData> {
        if self.effective == self.stream_ctx && self.stream_ctx != 0 {
            self.stream.as_deref()
        } else {
            None
        }
    }

    pub(crate) fn stream_mut(&mut self) -> Option<&mut StreamData> {
        if self.effective == self.stream_ctx && self.stream_ctx != 0 {
            self.stream.as_deref_mut()
        } else {
            None
        }
    }

    /// [`Host::stream_mut`] and the filter's interned header names and
    /// values, side by side (a header write needs both).
    pub(crate) fn stream_and_interned(&mut self) -> Option<(&mut StreamData, &mut Interned)> {
        if self.effective == self.stream_ctx && self.stream_ctx != 0 {
            Some((self.stream.as_deref_mut()?, &mut self.interned))
        } else {
            None
        }
    }
}

/// Header names and values this instance's filter wrote more than once
/// lately, parsed once and handed out as clones. A filter adds the same few
/// headers on every request: a hit skips `HeaderName`/`HeaderValue`
/// validation and the copy into a fresh allocation, and, since the clone
/// shares the bytes, the core's copy of the map later is a reference count,
/// not another allocation per header.
///
/// One table per instance (so per filter and worker thread, never shared
/// between filters or generations): whether a write hits says nothing about
/// what another filter wrote, and what is kept lives no longer than the
/// instance whose guest memory held it anyway. A value is kept only the
/// second time it is written: per-request unique values (request ids,
/// timestamps, trace parents) leave behind only a fingerprint in a small
/// ring and never push out the constants a filter repeats.
#[derive(Default)]
pub(crate) struct Interned {
    names: Table<http::header::HeaderName>,
    values: Table<http::HeaderValue>,
}

/// Kept entries (round robin) and fingerprints of entries seen once.
struct Table<T> {
    kept: Vec<T>,
    next: usize,
    seen: [u64; SEEN],
    next_seen: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            kept: Vec::new(),
            next: 0,
            seen: [0; SEEN],
            next_seen: 0,
        }
    }
}

/// Entries of each kind kept per instance.
const INTERNED: usize = 32;
/// Fingerprints of entries written once, per kind and instance.
const SEEN: usize = 32;
/// Longest name or value kept (longer ones are parsed every time).
const INTERNED_LEN: usize = 64;

impl<T: Clone> Table<T> {
    /// Keeps `v` if its fingerprint was seen before, else remembers the
    /// fingerprint (a collision only keeps a value early: harmless).
    fn admit(&mut self, bytes: &[u8], v: &T) {
        let fp = fingerprint(bytes);
        if let Some(slot) = self.seen.iter_mut().find(|s| **s == fp) {
            *slot = 0;
            if self.kept.len() < INTERNED {
                self.kept.push(v.clone());
            } else if let Some(slot) = self.kept.get_mut(self.next) {
                *slot = v.clone();
            }
            self.next = (self.next + 1) % INTERNED;
        } else {
            if let Some(slot) = self.seen.get_mut(self.next_seen) {
                *slot = fp;
            }
            self.next_seen = (self.next_seen + 1) % SEEN;
        }
    }
}

/// A cheap non-zero hash of a short byte string (multiply-rotate over
/// 8-byte words); 0 marks an empty fingerprint slot.
fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        if let Some(dst) = word.get_mut(..chunk.len()) {
            dst.copy_from_slice(chunk);
        }
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    h | 1
}

impl Interned {
    /// `HeaderName::from_bytes(key)` (which lower-cases), from the table
    /// when this filter wrote the same name before.
    pub(crate) fn name(&mut self, key: &[u8]) -> Option<http::header::HeaderName> {
        if key.len() > INTERNED_LEN {
            return http::header::HeaderName::from_bytes(key).ok();
        }
        // Case-insensitive: `from_bytes` of a key that matches a valid
        // name but for ASCII case gives that very name.
        if let Some(n) = self
            .names
            .kept
            .iter()
            .find(|n| n.as_str().as_bytes().eq_ignore_ascii_case(key))
        {
            return Some(n.clone());
        }
        let n = http::header::HeaderName::from_bytes(key).ok()?;
        self.names.admit(n.as_str().as_bytes(), &n);
        Some(n)
    }

    /// `HeaderValue::from_bytes(value)`, from the table when this filter
    /// wrote the same value before.
    pub(crate) fn value(&mut self, value: &[u8]) -> Option<http::HeaderValue> {
        if value.len() > INTERNED_LEN {
            return http::HeaderValue::from_bytes(value).ok();
        }
        if let Some(v) = self.values.kept.iter().find(|v| v.as_bytes() == value) {
            return Some(v.clone());
        }
        let v = http::HeaderValue::from_bytes(value).ok()?;
        self.values.admit(value, &v);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::{Interned, INTERNED, INTERNED_LEN};

    fn same_bytes(a: &[u8], b: &[u8]) -> bool {
        a.as_ptr() == b.as_ptr()
    }

    #[test]
    fn interned_names_and_values_are_what_parsing_gives() {
        let mut t = Interned::default();
        for _ in 0..3 {
            // Later rounds: served from the table, same answers.
            assert_eq!(t.name(b"X-Wasm-Filter").unwrap(), "x-wasm-filter");
            assert_eq!(t.name(b"x-wasm-filter").unwrap(), "x-wasm-filter");
            assert!(t.name(b"bad name").is_none());
            assert!(t.name(b"").is_none());
            assert_eq!(t.value(b"add-headers").unwrap(), "add-headers");
            assert!(t.value(b"a\nb").is_none());
            // A value differing only in case is another value.
            assert_eq!(t.value(b"Add-Headers").unwrap(), "Add-Headers");
        }
        let long = vec![b'a'; INTERNED_LEN + 1];
        assert_eq!(t.name(&long).unwrap().as_str().len(), long.len());
        assert_eq!(t.value(&long).unwrap().as_bytes(), &long[..]);
        // More distinct entries than the table holds: each still right.
        for round in 0..3 {
            for i in 0..INTERNED * 2 {
                let k = format!("x-k{i}");
                let v = format!("v{i}-{}", round / 2);
                assert_eq!(t.name(k.as_bytes()).unwrap(), k.as_str());
                assert_eq!(t.value(v.as_bytes()).unwrap(), v.as_str());
            }
        }
    }

    #[test]
    fn a_repeated_value_is_kept_and_shares_its_bytes() {
        let mut t = Interned::default();
        // First write: parsed, only its fingerprint remembered.
        let a = t.value(b"wasp-filter").unwrap();
        let b = t.value(b"wasp-filter").unwrap();
        assert!(!same_bytes(a.as_bytes(), b.as_bytes()));
        // Second write kept it: every later one is the same allocation.
        let c = t.value(b"wasp-filter").unwrap();
        assert!(same_bytes(b.as_bytes(), c.as_bytes()));
        let n1 = t.name(b"x-wasp-filter").unwrap();
        let n2 = t.name(b"X-Wasp-Filter").unwrap();
        let n3 = t.name(b"x-wasp-filter").unwrap();
        assert!(!same_bytes(n1.as_str().as_bytes(), n2.as_str().as_bytes()));
        assert!(same_bytes(n2.as_str().as_bytes(), n3.as_str().as_bytes()));
    }

    #[test]
    fn unique_values_do_not_push_out_repeated_ones() {
        let mut t = Interned::default();
        t.value(b"constant").unwrap();
        let kept = t.value(b"constant").unwrap();
        // A request id per request, many more than the table holds.
        for i in 0..INTERNED * 8 {
            let id = format!("{i:08x}-4c1e-4bb6-9d8e-{:012x}", i * 7919);
            assert_eq!(t.value(id.as_bytes()).unwrap(), id.as_str());
        }
        let again = t.value(b"constant").unwrap();
        assert!(same_bytes(kept.as_bytes(), again.as_bytes()));
    }

    #[test]
    fn tables_are_not_shared() {
        let (mut a, mut b) = (Interned::default(), Interned::default());
        for _ in 0..3 {
            a.value(b"secret-token").unwrap();
        }
        let from_a = a.value(b"secret-token").unwrap();
        let from_b = b.value(b"secret-token").unwrap();
        assert!(!same_bytes(from_a.as_bytes(), from_b.as_bytes()));
    }
}
