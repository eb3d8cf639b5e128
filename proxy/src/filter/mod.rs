//! The Wasm filter engine: a Proxy-Wasm ABI v0.2.1 host on wasmtime.
//!
//! Owns everything between "a `.wasm` file named in `[filters.NAME]`" and
//! "this request's headers/body/trailers after the pipeline ran": module
//! compilation and the on-disk cache ([`engine`], `cache`), the host-function
//! table (`abi`), VM life cycle with rebuild and backoff (`vm`, `worker`),
//! the request and response chains (`stream`), and the filter metrics and
//! status shown on the admin API (`metrics`).
//!
//! Threads:
//! - **control thread**: [`FilterRuntime::load`] compiles (in a child
//!   process under `wasp run`, see `compile`), caches and
//!   validates modules (one throw-away VM per filter) and publishes an
//!   immutable [`FilterSet`]; [`FilterRuntime::render_metrics`] and
//!   [`FilterRuntime::status_json`] read atomics and small locked maps.
//!   A control thread of our own ("wasp-epoch") ticks the engine epoch.
//! - **worker threads**: each keeps, per filter and [`FilterSet`]
//!   generation, a small pool of pre-initialised *stream instances* (one
//!   leased per in-flight stream, returned and reused when it ends) and one
//!   *root instance* (ticks, queue wake-ups, root callouts), in a
//!   thread-local (`worker`). A failure discards only the instance that
//!   failed, so it fails only the stream it served. [`StreamFilters`]
//!   borrows its instance only inside one synchronous callback: **no await
//!   ever happens while an instance is borrowed**, and the request future
//!   holds only ids and `Arc`s, so it is `Send`.
//! - **builder threads** ("wasp-filter-build-N"): build instances
//!   (instantiate, `_initialize`, `proxy_on_vm_start`, `proxy_on_configure`)
//!   off the request path and hand them to the worker that asked.
//! - **tier-up thread** ("wasp-tierup", `[proxy] wasm_compiler = "auto"`):
//!   compiles each newly loaded generation with Cranelift, one module at a
//!   time, after it already serves on Winch; each worker's pump then moves
//!   its pools onto the Cranelift code (`worker::Pool::tier_over`).
//!
//! What it hands on: [`Verdict`] / [`BodyVerdict`] for each phase, stream
//! properties (e.g. `wasp.cluster`) via [`StreamFilters::property`].
//!
//! Notes for the core:
//! - Call [`FilterRuntime::init_worker_thread`] once per worker (optional:
//!   the first use on a thread does it too).
//! - [`HttpCallouts::call`] runs inside a host call: it must only build the
//!   future, never block. Futures are spawned with `tokio::spawn` on the
//!   current (worker) runtime.
//! - A filter that may change a body's size drops `content-length` in its
//!   header callback (the Proxy-Wasm convention); forward such bodies
//!   chunked. When a request or response ends with trailers, call the body
//!   method with an empty chunk and `end_of_stream = true` first so bytes a
//!   paused filter holds are released.
//! - A local response made during the request phase is returned as is; the
//!   response-side callbacks are not run on it.
//!
//! gRPC calls and streams (`proxy_grpc_*`) go to a cluster over HTTP/2
//! through [`HttpCallouts::open`] (see `abi::grpc`). Foreign functions:
//! `clear_route_cache` answers OK (routing runs after the request-header
//! callbacks anyway; the per-route chain stays), any other name NOT_FOUND.
//!
//! Per-route configs (`FilterSpec::route_configs`) are extra root contexts
//! in every instance of the filter (ids `ROOT_ID + k`), each configured at
//! start-up; a stream of a route with one is created under it
//! ([`PipelineEntry::config`]), so no route needs instances of its own. Shared queues are
//! process-wide, keyed by filter name + queue name; an enqueue wakes the
//! latest registrant's `proxy_on_queue_ready` on its own worker.
//!
//! Waiting for callouts: a filter pausing *at* the end of a body while a
//! callout is pending gets [`BodyVerdict::Wait`], and one pausing on
//! trailers [`Verdict::Wait`]; the core polls
//! [`StreamFilters::poll_body_wait`] / [`StreamFilters::poll_trailers_wait`]
//! until they may go on. PAUSE on trailers with no callout pending acts as
//! CONTINUE; PAUSE on headers with no pending callout fails the filter (its
//! policy applies; a timer cannot resume a stream).
//!
//! Network (TCP) filters run on L4 listeners through
//! [`network::NetworkFilters`]. An `http_call` answer that arrives after its
//! stream ended goes to the instance's root context; a gRPC call or stream
//! is cancelled with its stream. Root-only ("background") plugins must not
//! be put in a pipeline: the SDK traps on the HTTP context.

mod abi;
mod cache;
mod compile;
mod engine;
mod host;
mod metrics;
pub mod network;
mod plugin;
mod set;
mod stream;
mod vm;
mod worker;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_abi;
#[cfg(test)]
mod tests_routes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use compile::{
    child_main as compile_child_main, ChildLimits, CompileMode, SUBCOMMAND as COMPILE_SUBCOMMAND,
};
pub use engine::{FilterRuntime, PreparedSet, WasmCompiler};
pub(crate) use host::Dir;
pub use set::{FilterSet, PipelineEntry};
pub use stream::{HeaderWait, StreamFilters};

/// What happens to a request when its filter fails (trap, CPU deadline,
/// memory cap, `proc_exit`, or no healthy instance could be built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Skip the filter for the rest of that request.
    Open,
    /// Answer 503 with `x-wasp-error: filter_failed` and a body naming the filter.
    #[default]
    Closed,
}

/// One `[filters.NAME]` entry, resolved by the core.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    /// The filter's name; also the key of its shared data, metrics and status.
    pub name: String,
    /// Path of the `.wasm` file (already resolved in `filters_dir`).
    pub module_path: PathBuf,
    /// Plugin configuration, handed over at `proxy_on_configure`.
    pub config: Bytes,
    /// Per-route configurations: each gets a root context of its own in
    /// every instance (ids `ROOT + 1 ..`), configured with it, and the
    /// streams of a pipeline entry with `config` k + 1 are its children.
    pub route_configs: Vec<Bytes>,
    /// VM configuration, handed over at `proxy_on_vm_start`.
    pub vm_config: Bytes,
    pub fail: FailPolicy,
    /// Wall-clock deadline of one callback (epoch interruption, ~1 ms granularity).
    pub cpu_limit: Duration,
    /// Linear-memory cap of one VM, in bytes.
    pub memory_limit: u64,
    /// Cap of a body buffered because a filter paused on it (over it: 413).
    pub max_body_bytes: u64,
    /// Caps on what host calls may do and hold for this filter.
    pub host_limits: HostLimits,
    /// Instances of this filter one worker keeps for streams (each
    /// in-flight stream leases one; a busy worker builds up to 8x this,
    /// and only past that do streams share the least-loaded one). The
    /// worker's root instance comes on top.
    pub instances: u32,
    /// Floor of the tick period: a guest asking for a shorter one gets this.
    pub tick_min: Duration,
    /// CPU time root-context callbacks (ticks, queue wake-ups, root callout
    /// answers) may use per second on one worker; over it ticks are skipped.
    pub root_cpu: Duration,
}

pub use crate::config::filter::HostLimits;

impl FilterSpec {
    /// Default per-callback deadline.
    pub const DEFAULT_CPU_LIMIT: Duration = Duration::from_millis(50);
    /// Default memory cap of a VM.
    pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
    /// Default cap of a buffered body.
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;
    /// Default cap of stream instances per worker.
    pub const DEFAULT_INSTANCES: u32 = 16;
    /// Default tick period floor.
    pub const DEFAULT_TICK_MIN: Duration = Duration::from_millis(100);
    /// Default root-context CPU budget per second per worker.
    pub const DEFAULT_ROOT_CPU: Duration = Duration::from_millis(100);

    /// A spec with every optional field at its default.
    pub fn new(name: impl Into<String>, module_path: impl Into<PathBuf>) -> Self {
        FilterSpec {
            name: name.into(),
            module_path: module_path.into(),
            config: Bytes::new(),
            route_configs: Vec::new(),
            vm_config: Bytes::new(),
            fail: FailPolicy::Closed,
            cpu_limit: Self::DEFAULT_CPU_LIMIT,
            memory_limit: Self::DEFAULT_MEMORY_LIMIT,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            host_limits: HostLimits::default(),
            instances: Self::DEFAULT_INSTANCES,
            tick_min: Self::DEFAULT_TICK_MIN,
            root_cpu: Self::DEFAULT_ROOT_CPU,
        }
    }
}

/// Makes `proxy_get_log_level` answer `level` (trace..error) rather than
/// the process subscriber's most verbose level: `wasp filter test` collects
/// the guest's lines at its own level. `None` goes back to the subscriber's.
pub fn set_reported_log_level(level: Option<tracing::level_filters::LevelFilter>) {
    use tracing::level_filters::LevelFilter;
    let n = match level {
        None => u8::MAX,
        Some(LevelFilter::TRACE) => 0,
        Some(LevelFilter::DEBUG) => 1,
        Some(LevelFilter::INFO) => 2,
        Some(LevelFilter::WARN) => 3,
        Some(LevelFilter::ERROR) => 4,
        Some(_) => 5,
    };
    abi::context::REPORTED_LOG_LEVEL.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// A boxed answer to an `http_call`.
pub type CalloutFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, String>> + Send>>;

/// Error of a streamed callout body.
pub type StreamError = Box<dyn std::error::Error + Send + Sync>;

/// Body of a streamed callout (gRPC), each way: frames as they are sent or
/// arrive, trailers included.
pub type StreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, StreamError>;

/// The response head of a streamed callout, its body still arriving.
pub type StreamFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<StreamBody>, String>> + Send>>;

/// How the engine sends `proxy_http_call` requests to clusters (implemented by the core).
pub trait HttpCallouts: Send + Sync + 'static {
    /// `None` if `cluster` is unknown (the guest then gets BAD_ARGUMENT).
    /// The future runs on the worker's runtime; the engine applies `timeout` too.
    fn call(
        &self,
        cluster: &str,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> Option<CalloutFuture>;

    /// Opens a streamed exchange with `cluster` (gRPC calls and streams:
    /// the request body is sent as the filter produces it, the answer is
    /// read frame by frame). The answer's body holds whatever the cluster's
    /// circuit breakers counted until it is dropped. `None` if `cluster` is
    /// unknown; the default knows no cluster.
    fn open(&self, cluster: &str, req: http::Request<StreamBody>) -> Option<StreamFuture> {
        let _ = (cluster, req);
        None
    }
}

/// Facts about the downstream connection and request, for properties.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub listener: Arc<str>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    pub request_id: Arc<str>,
    pub start: SystemTime,
    /// Peer identity under mTLS.
    pub principal: Option<Arc<str>>,
    /// The downstream connection's TLS facts (`connection.*` attributes);
    /// `None` on plain text. Shared by the connection's requests.
    pub tls: Option<Arc<crate::tls::ConnTls>>,
}

/// Marks (as a response extension) an answer a filter made with
/// `proxy_send_local_response`, as opposed to one the proxy made for a
/// filter's failure: the core sends it back through the response
/// callbacks, as Envoy runs its encoder filters on a local reply.
#[derive(Debug, Clone, Copy)]
pub struct FilterReply;

/// Outcome of a header or trailer phase.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    /// Trailers only: a filter paused on them to wait for a callout; they
    /// go on once [`StreamFilters::poll_trailers_wait`] is ready.
    Wait,
    /// Answer with this response instead (local response, or a failure under
    /// `fail = "closed"`).
    Respond(http::Response<Bytes>),
}

/// Outcome of one body chunk.
#[derive(Debug)]
pub enum BodyVerdict {
    /// Pass these bytes on now (possibly rewritten, possibly a whole buffered body).
    Forward(Bytes),
    /// A filter paused: the engine is buffering, nothing to send yet.
    Hold,
    /// The body ended and a filter paused on it to wait for a callout:
    /// nothing to send until [`StreamFilters::poll_body_wait`] is ready.
    Wait,
    Respond(http::Response<Bytes>),
}
