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

use bytes::{Bytes, BytesMut};
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
    /// The body buffer of the running body callback (whole buffered body when paused).
    pub body: BytesMut,
    pub body_dir: Option<Dir>,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
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
            heads_sent: [false; 2],
            req_trailers: None,
            resp: None,
            resp_trailers: None,
            body: BytesMut::new(),
            body_dir: None,
            route: None,
            cluster: None,
            upstream: None,
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
    pub local: Option<LocalResponse>,
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
        }
    }

    /// The plugin configuration of the running callback's root context.
    pub(crate) fn plugin_config(&self) -> &Bytes {
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
}
