//! One VM: a wasmtime `Store` + `Instance` of one filter, with its root
//! context, and the single entry point [`Vm::run`] that runs one guest
//! callback under the CPU deadline and memory cap.
//!
//! Built on a builder thread (or on the control thread for the validation
//! VM of `load`), then moved to the worker that uses it (a `Vm` is `Send`;
//! it is only ever used by one thread at a time). A failed callback (trap,
//! deadline, memory cap, `proc_exit`) makes the whole instance unusable:
//! the worker drops it (see `worker`). Nothing here awaits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Instance, Store, Trap, TypedFunc};

use super::abi::grpc::{self, GrpcCallback, GrpcEvent};
use super::host::{Actions, CalloutAnswer, Host, NewCallout, ProcExit, StreamData};
use super::metrics::{CallResult, Phase};
use super::plugin::{Code, Compiler, Plugin};
use super::worker::RootTx;

/// Epoch ticks (ms) allowed to each start-up callback.
const START_DEADLINE_TICKS: u64 = 1_000;

/// Root context id of every VM.
pub(crate) const ROOT_ID: u32 = 1;

static INCARNATIONS: AtomicU64 = AtomicU64::new(1);

/// Why a VM (or a callback) failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Trap(String),
    Timeout,
    Memory,
    Exit(i32),
    /// `proxy_on_vm_start` / `proxy_on_configure` returned false.
    Rejected(&'static str),
    /// Instantiation or a missing export.
    Setup(String),
    /// No healthy instance could be had (builds fail, or none within the wait).
    Unavailable(String),
    /// The engine's instance pool is full (a capacity problem, not the filter's).
    PoolFull(String),
    /// The stream's context died with an earlier VM.
    ContextLost,
    /// The filter paused with nothing that could resume it.
    Stuck,
}

impl Failure {
    /// Whether the VM must be dropped and rebuilt.
    pub(crate) fn kills_vm(&self) -> bool {
        matches!(
            self,
            Failure::Trap(_)
                | Failure::Timeout
                | Failure::Memory
                | Failure::Exit(_)
                | Failure::Rejected(_)
                | Failure::Setup(_)
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Trap(m) => write!(f, "trap: {m}"),
            Failure::Timeout => f.write_str("CPU deadline exceeded"),
            Failure::Memory => f.write_str("memory limit exceeded"),
            Failure::Exit(c) => write!(f, "proc_exit({c})"),
            Failure::Rejected(what) => write!(f, "{what} returned false"),
            Failure::Setup(m) => f.write_str(m),
            Failure::Unavailable(m) => write!(f, "no healthy instance ({m})"),
            Failure::PoolFull(m) => write!(f, "instance pool full ({m})"),
            Failure::ContextLost => {
                f.write_str("stream context lost with a failed instance it shared")
            }
            Failure::Stuck => {
                f.write_str("paused with no pending http_call or gRPC callout to resume it")
            }
        }
    }
}

/// One guest callback.
#[derive(Debug)]
pub(crate) enum Callback {
    RequestHeaders {
        n: u32,
        eos: bool,
    },
    RequestBody {
        size: u32,
        eos: bool,
    },
    RequestTrailers {
        n: u32,
    },
    ResponseHeaders {
        n: u32,
        eos: bool,
    },
    ResponseBody {
        size: u32,
        eos: bool,
    },
    ResponseTrailers {
        n: u32,
    },
    /// `root`: the root context the call was made under (`NewCallout::root`).
    /// The answer is boxed: every callback is passed by value through
    /// several calls, and this rare one would make them all large.
    HttpCallResponse {
        token: u32,
        root: u32,
        answer: Box<CalloutAnswer>,
    },
    /// One event of a gRPC call or stream; `last` ends its token.
    Grpc {
        token: u32,
        root: u32,
        event: GrpcEvent,
        last: bool,
    },
    /// Network (TCP) filters: the ABI's stream side.
    NewConnection,
    DownstreamData {
        size: u32,
        eos: bool,
    },
    UpstreamData {
        size: u32,
        eos: bool,
    },
    /// `peer`: 0 unknown, 1 local (the proxy closed), 2 remote.
    DownstreamClose {
        peer: u32,
    },
    UpstreamClose {
        peer: u32,
    },
    Tick,
    QueueReady {
        queue: u32,
    },
    Log,
    Done,
    Delete,
}

impl Callback {
    fn phase(&self) -> Phase {
        match self {
            Callback::RequestHeaders { .. } => Phase::RequestHeaders,
            Callback::RequestBody { .. } => Phase::RequestBody,
            Callback::RequestTrailers { .. } => Phase::RequestTrailers,
            Callback::ResponseHeaders { .. } => Phase::ResponseHeaders,
            Callback::ResponseBody { .. } => Phase::ResponseBody,
            Callback::ResponseTrailers { .. } => Phase::ResponseTrailers,
            Callback::HttpCallResponse { .. } => Phase::HttpCallResponse,
            Callback::Grpc { .. } => Phase::GrpcCallback,
            // Network callbacks are counted with the HTTP phase they mirror
            // (connection = headers, data = body, close = log).
            Callback::NewConnection => Phase::RequestHeaders,
            Callback::DownstreamData { .. } => Phase::RequestBody,
            Callback::UpstreamData { .. } => Phase::ResponseBody,
            Callback::DownstreamClose { .. } | Callback::UpstreamClose { .. } => Phase::Log,
            Callback::Tick | Callback::QueueReady { .. } => Phase::Tick,
            Callback::Log => Phase::Log,
            Callback::Done | Callback::Delete => Phase::Done,
        }
    }
}

/// What a callback returned and asked for.
pub(crate) struct Outcome {
    /// 0 = Continue, 1 = Pause (only for HTTP callbacks).
    pub pause: bool,
    pub actions: Actions,
    pub callouts: Vec<NewCallout>,
}

type F1 = TypedFunc<u32, ()>;
type F1R = TypedFunc<u32, u32>;
type F2R = TypedFunc<(u32, u32), u32>;
type F3R = TypedFunc<(u32, u32, u32), u32>;
type F3 = TypedFunc<(u32, u32, u32), ()>;
type F5 = TypedFunc<(u32, u32, u32, u32, u32), ()>;

struct Exports {
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<F2R>,
    configure: Option<F2R>,
    on_done: Option<F1R>,
    on_log: Option<F1>,
    on_delete: Option<F1>,
    on_tick: Option<F1>,
    on_queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    request_headers: Option<F3R>,
    request_body: Option<F3R>,
    request_trailers: Option<F2R>,
    response_headers: Option<F3R>,
    response_body: Option<F3R>,
    response_trailers: Option<F2R>,
    http_call_response: Option<F5>,
    grpc_initial_metadata: Option<F3>,
    grpc_receive: Option<F3>,
    grpc_trailing_metadata: Option<F3>,
    grpc_close: Option<F3>,
    new_connection: Option<F1R>,
    downstream_data: Option<F3R>,
    upstream_data: Option<F3R>,
    downstream_close: Option<TypedFunc<(u32, u32), ()>>,
    upstream_close: Option<TypedFunc<(u32, u32), ()>>,
}

/// A live VM.
pub(crate) struct Vm {
    pub plugin: Arc<Plugin>,
    core: Core,
    /// Borrowed, not cloned, per callback (a `TypedFunc` clone is a
    /// type-registry reference count up and down).
    ex: Exports,
    next_ctx: u32,
    /// First stream context id: after the root contexts.
    first_ctx: u32,
    /// Stream contexts that belong to a per-route root context, with its
    /// config (1..); the others belong to the filter's own root.
    variants: HashMap<u32, u32>,
    /// Unique across all VMs of the process: a stream's context is valid only
    /// in the incarnation that created it.
    pub incarnation: u64,
    /// The compiler of the code it runs (a pool retires instances of the
    /// old one after a tier-up).
    pub compiler: Compiler,
}

/// The mutable side of a VM that runs callbacks: its store and the clock
/// of its last callback. Apart from [`Exports`] so a callback borrows its
/// export while the store runs it.
struct Core {
    store: Store<Host>,
    /// When the last callback ended (the clock read that timed it).
    last_end: Instant,
    /// Set by [`Vm::follow_on`]: the next callback starts where the last
    /// one ended, so one clock read both ends one and starts the next.
    /// Consumed (or cleared) by the next [`Vm::run`].
    follow: bool,
    /// The last [`Vm::run`] (or context create) reached the guest, so
    /// `last_end` is its end; cleared on entry to `run`, set by the guard.
    /// A callback the module does not export leaves it false, and a
    /// follow-on after it would time the next one from an older callback.
    ran: bool,
}

/// The `bool`-returning exports are optional: a guest without them accepts.
fn opt<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    instance: &Instance,
    store: &mut Store<Host>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, Failure> {
    if instance.get_export(&mut *store, name).is_none() {
        return Ok(None);
    }
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .map(Some)
        .map_err(|e| Failure::Setup(format!("export {name} has the wrong type: {e}")))
}

impl Vm {
    /// Instantiates, initializes, creates the root context and runs
    /// `proxy_on_vm_start` and `proxy_on_configure`.
    pub(crate) fn new(plugin: &Arc<Plugin>, root_tx: Option<RootTx>) -> Result<Vm, Failure> {
        let code = plugin.serving();
        let built = Vm::with_code(plugin, code, root_tx);
        if code.compiler != plugin.code.compiler {
            match &built {
                Err(Failure::PoolFull(_)) => {}
                r => plugin.note_tiered_build(r.is_ok()),
            }
        }
        built
    }

    /// [`Vm::new`] from a given compilation of the plugin's module (the
    /// tier-up validates its Cranelift code before it serves).
    pub(crate) fn with_code(
        plugin: &Arc<Plugin>,
        code: &Code,
        root_tx: Option<RootTx>,
    ) -> Result<Vm, Failure> {
        let memory_limit = usize::try_from(plugin.spec.memory_limit).unwrap_or(usize::MAX);
        let mut store = Store::new(&code.engine, Host::new(plugin.shared.clone(), memory_limit));
        store.limiter(|h| &mut h.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(plugin.deadline_ticks);
        let instance = code
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, &e, "instantiation"))?;
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = match opt::<u32, u32>(&instance, &mut store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => opt::<u32, u32>(&instance, &mut store, "malloc")?,
        };
        if memory.is_none() || alloc.is_none() {
            return Err(Failure::Setup(
                "module exports no memory or no allocator (proxy_on_memory_allocate / malloc)"
                    .into(),
            ));
        }
        store.data_mut().memory = memory;
        store.data_mut().alloc = alloc;
        store.data_mut().root_id = ROOT_ID;
        // Bounded by the config (one per distinct route override).
        let extra_roots = u32::try_from(plugin.shared.route_configs.len()).unwrap_or(u32::MAX - 2);
        store.data_mut().extra_roots = extra_roots;
        store.data_mut().root_tx = root_tx;
        store.data_mut().effective = ROOT_ID;

        let context_create = instance
            .get_typed_func::<(u32, u32), ()>(&mut store, "proxy_on_context_create")
            .map_err(|e| Failure::Setup(format!("missing export proxy_on_context_create: {e}")))?;
        let ex = Exports {
            context_create,
            vm_start: opt(&instance, &mut store, "proxy_on_vm_start")?,
            configure: opt(&instance, &mut store, "proxy_on_configure")?,
            on_done: opt(&instance, &mut store, "proxy_on_done")?,
            on_log: opt(&instance, &mut store, "proxy_on_log")?,
            on_delete: opt(&instance, &mut store, "proxy_on_delete")?,
            on_tick: opt(&instance, &mut store, "proxy_on_tick")?,
            on_queue_ready: opt(&instance, &mut store, "proxy_on_queue_ready")?,
            request_headers: opt(&instance, &mut store, "proxy_on_request_headers")?,
            request_body: opt(&instance, &mut store, "proxy_on_request_body")?,
            request_trailers: opt(&instance, &mut store, "proxy_on_request_trailers")?,
            response_headers: opt(&instance, &mut store, "proxy_on_response_headers")?,
            response_body: opt(&instance, &mut store, "proxy_on_response_body")?,
            response_trailers: opt(&instance, &mut store, "proxy_on_response_trailers")?,
            http_call_response: opt(&instance, &mut store, "proxy_on_http_call_response")?,
            grpc_initial_metadata: opt(
                &instance,
                &mut store,
                "proxy_on_grpc_receive_initial_metadata",
            )?,
            grpc_receive: opt(&instance, &mut store, "proxy_on_grpc_receive")?,
            grpc_trailing_metadata: opt(
                &instance,
                &mut store,
                "proxy_on_grpc_receive_trailing_metadata",
            )?,
            grpc_close: opt(&instance, &mut store, "proxy_on_grpc_close")?,
            new_connection: opt(&instance, &mut store, "proxy_on_new_connection")?,
            downstream_data: opt(&instance, &mut store, "proxy_on_downstream_data")?,
            upstream_data: opt(&instance, &mut store, "proxy_on_upstream_data")?,
            downstream_close: opt(
                &instance,
                &mut store,
                "proxy_on_downstream_connection_close",
            )?,
            upstream_close: opt(&instance, &mut store, "proxy_on_upstream_connection_close")?,
        };
        let mut vm = Vm {
            plugin: plugin.clone(),
            core: Core {
                store,
                last_end: Instant::now(),
                follow: false,
                ran: false,
            },
            ex,
            next_ctx: ROOT_ID + 1 + extra_roots,
            first_ctx: ROOT_ID + 1 + extra_roots,
            variants: HashMap::new(),
            incarnation: INCARNATIONS.fetch_add(1, Ordering::Relaxed),
            compiler: code.compiler,
        };
        vm.initialize(&instance)?;
        vm.start()?;
        Ok(vm)
    }

    /// `_initialize` (then `main` if exported), or `_start`.
    fn initialize(&mut self, instance: &Instance) -> Result<(), Failure> {
        let store = &mut self.core.store;
        if let Some(f) = opt::<(), ()>(instance, store, "_initialize")? {
            self.guard(Phase::Start, |s| f.call(s, ()))?;
            let main = instance.get_func(&mut self.core.store, "main");
            if let Some(main) = main {
                if let Ok(f) = main.typed::<(u32, u32), u32>(&self.core.store) {
                    self.guard(Phase::Start, |s| f.call(s, (0, 0)))?;
                } else if let Ok(f) = main.typed::<(), ()>(&self.core.store) {
                    self.guard(Phase::Start, |s| f.call(s, ()))?;
                }
            }
        } else if let Some(f) = opt::<(), ()>(instance, store, "_start")? {
            match self.guard(Phase::Start, |s| f.call(s, ())) {
                Ok(()) | Err(Failure::Exit(0)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Root context, `proxy_on_vm_start`, `proxy_on_configure`; then the
    /// same for each per-route config, in a root context of its own (as
    /// Envoy starts one root context per plugin sharing a VM).
    fn start(&mut self) -> Result<(), Failure> {
        let extra = self.core.store.data().extra_roots;
        for variant in 0..=extra {
            let root = ROOT_ID.saturating_add(variant);
            {
                let h = self.core.store.data_mut();
                h.config_variant = variant;
                h.effective = root;
            }
            let r = self.start_root(root, variant);
            let h = self.core.store.data_mut();
            h.config_variant = 0;
            h.effective = ROOT_ID;
            r?;
        }
        Ok(())
    }

    fn start_root(&mut self, root: u32, variant: u32) -> Result<(), Failure> {
        let create = self.ex.context_create.clone();
        self.guard(Phase::Start, |s| create.call(s, (root, 0)))?;
        let vm_config_len = self.plugin.shared.vm_config.len() as u32;
        if let Some(f) = self.ex.vm_start.clone() {
            if self.guard(Phase::Start, |s| f.call(s, (root, vm_config_len)))? == 0 {
                return Err(Failure::Rejected("proxy_on_vm_start"));
            }
        }
        let Some(config) = self.plugin.shared.config_of(variant) else {
            return Err(Failure::Unavailable(format!(
                "no per-route config {variant} for this filter"
            )));
        };
        let config_len = u32::try_from(config.len()).unwrap_or(u32::MAX);
        if let Some(f) = self.ex.configure.clone() {
            if self.guard(Phase::Start, |s| f.call(s, (root, config_len)))? == 0 {
                return Err(Failure::Rejected(if variant == 0 {
                    "proxy_on_configure"
                } else {
                    "proxy_on_configure (with a route's filters.NAME.config)"
                }));
            }
        }
        Ok(())
    }

    /// Root-level work (callouts, tick period) requested during start-up.
    pub(crate) fn take_root_callouts(&mut self) -> Vec<NewCallout> {
        std::mem::take(&mut self.core.store.data_mut().callouts)
    }

    pub(crate) fn tick_period_ms(&self) -> u32 {
        self.core.store.data().tick_period_ms
    }

    /// When the last callback on this VM ended.
    pub(crate) fn last_ran(&self) -> Instant {
        self.core.last_end
    }

    /// The next [`Vm::run`] follows the last callback with nothing else in
    /// between on this thread: its duration is timed from the end of the
    /// last one instead of a fresh clock read (one read per callback, not
    /// two, for back-to-back callbacks). Only if the last callback reached
    /// the guest: otherwise `last_end` is from an older one (maybe seconds
    /// ago) and the next callback reads the clock itself.
    pub(crate) fn follow_on(&mut self) {
        self.core.follow = self.core.ran;
    }

    /// Ends a stream's context: `proxy_on_log` (unless `log` is false: the
    /// stream was dropped, or the filter failed open), `proxy_on_done`,
    /// `proxy_on_delete`, back to back.
    pub(crate) fn end_context(
        &mut self,
        ctx: u32,
        data: &mut Option<Box<StreamData>>,
        log: bool,
    ) -> Result<(), Failure> {
        if log {
            self.run(ctx, data, Callback::Log)?;
            self.follow_on();
        }
        self.run(ctx, data, Callback::Done)?;
        self.follow_on();
        self.run(ctx, data, Callback::Delete)?;
        Ok(())
    }

    /// Creates an HTTP context for a new stream, a child of the root
    /// context of config `variant` (0: the filter's own config).
    pub(crate) fn create_context(&mut self, variant: u32) -> Result<u32, Failure> {
        if variant > self.core.store.data().extra_roots {
            // Chains and instances come from one config, so this is a bug;
            // the filter's own config instead could be a laxer one.
            return Err(Failure::Unavailable(format!(
                "no per-route config {variant} in this instance"
            )));
        }
        let id = self.next_ctx;
        self.next_ctx = self.next_ctx.wrapping_add(1).max(self.first_ctx);
        let create = &self.ex.context_create;
        {
            let h = self.core.store.data_mut();
            h.effective = id;
            h.config_variant = variant;
        }
        if variant != 0 {
            self.variants.insert(id, variant);
        }
        let root = ROOT_ID.saturating_add(variant);
        let r = self.core.guard(&self.plugin, Phase::ContextCreate, |s| {
            create.call(s, (id, root))
        });
        self.core.store.data_mut().config_variant = 0;
        r?;
        Ok(id)
    }

    /// Runs one callback on context `ctx`, with `data` (if any) readable by
    /// host functions for its duration. `data` is always given back.
    pub(crate) fn run(
        &mut self,
        ctx: u32,
        data: &mut Option<Box<StreamData>>,
        cb: Callback,
    ) -> Result<Outcome, Failure> {
        let Vm {
            plugin, core, ex, ..
        } = self;
        let plugin: &Plugin = plugin;
        core.ran = false;
        {
            let h = core.store.data_mut();
            h.stream = data.take();
            h.stream_ctx = if h.stream.is_some() { ctx } else { 0 };
            h.effective = ctx;
            h.actions = Actions::default();
            // Which config `proxy_get_buffer(PLUGIN_CONFIGURATION)` shows.
            h.config_variant = if h.is_root(ctx) {
                // A per-route root's own callback (a callout answer).
                ctx.saturating_sub(h.root_id)
            } else if self.variants.is_empty() {
                0
            } else {
                self.variants.get(&ctx).copied().unwrap_or(0)
            };
        }
        let phase = cb.phase();
        let deleting = matches!(cb, Callback::Delete);
        let result: Result<u32, Failure> = match cb {
            Callback::RequestHeaders { n, eos } => core.call3(
                plugin,
                ex.request_headers.as_ref(),
                phase,
                (ctx, n, eos as u32),
            ),
            Callback::RequestBody { size, eos } => core.call3(
                plugin,
                ex.request_body.as_ref(),
                phase,
                (ctx, size, eos as u32),
            ),
            Callback::ResponseHeaders { n, eos } => core.call3(
                plugin,
                ex.response_headers.as_ref(),
                phase,
                (ctx, n, eos as u32),
            ),
            Callback::ResponseBody { size, eos } => core.call3(
                plugin,
                ex.response_body.as_ref(),
                phase,
                (ctx, size, eos as u32),
            ),
            Callback::RequestTrailers { n } => match &ex.request_trailers {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, (ctx, n))),
                None => Ok(0),
            },
            Callback::ResponseTrailers { n } => match &ex.response_trailers {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, (ctx, n))),
                None => Ok(0),
            },
            Callback::HttpCallResponse {
                token,
                root,
                answer,
            } => match &ex.http_call_response {
                Some(f) => {
                    let nh = answer.headers.len() as u32;
                    let nb = answer.body.len() as u32;
                    let nt = answer.trailers.len() as u32;
                    core.store.data_mut().answer = Some(*answer);
                    let r = core.guard(plugin, phase, |s| f.call(s, (root, token, nh, nb, nt)));
                    core.store.data_mut().answer = None;
                    r.map(|()| 0)
                }
                None => Ok(0),
            },
            Callback::Grpc {
                token,
                root,
                event,
                last,
            } => {
                // A cancelled token is never reported to the guest.
                if grpc::wanted(core.store.data_mut(), token, last) {
                    let (which, n, answer) = event.into_callback();
                    let f = match which {
                        GrpcCallback::InitialMetadata => &ex.grpc_initial_metadata,
                        GrpcCallback::Receive => &ex.grpc_receive,
                        GrpcCallback::TrailingMetadata => &ex.grpc_trailing_metadata,
                        GrpcCallback::Close => &ex.grpc_close,
                    };
                    match f {
                        Some(f) => {
                            core.store.data_mut().answer = Some(answer);
                            let r = core.guard(plugin, phase, |s| f.call(s, (root, token, n)));
                            core.store.data_mut().answer = None;
                            r.map(|()| 0)
                        }
                        None => Ok(0),
                    }
                } else {
                    Ok(0)
                }
            }
            Callback::NewConnection => match &ex.new_connection {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, ctx)),
                None => Ok(0),
            },
            Callback::DownstreamData { size, eos } => core.call3(
                plugin,
                ex.downstream_data.as_ref(),
                phase,
                (ctx, size, eos as u32),
            ),
            Callback::UpstreamData { size, eos } => core.call3(
                plugin,
                ex.upstream_data.as_ref(),
                phase,
                (ctx, size, eos as u32),
            ),
            Callback::DownstreamClose { peer } => match &ex.downstream_close {
                Some(f) => core
                    .guard(plugin, phase, |s| f.call(s, (ctx, peer)))
                    .map(|()| 0),
                None => Ok(0),
            },
            Callback::UpstreamClose { peer } => match &ex.upstream_close {
                Some(f) => core
                    .guard(plugin, phase, |s| f.call(s, (ctx, peer)))
                    .map(|()| 0),
                None => Ok(0),
            },
            Callback::Tick => match &ex.on_tick {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, ctx)).map(|()| 0),
                None => Ok(0),
            },
            Callback::QueueReady { queue } => match &ex.on_queue_ready {
                Some(f) => core
                    .guard(plugin, phase, |s| f.call(s, (ctx, queue)))
                    .map(|()| 0),
                None => Ok(0),
            },
            Callback::Log => match &ex.on_log {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, ctx)).map(|()| 0),
                None => Ok(0),
            },
            Callback::Done => match &ex.on_done {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, ctx)),
                None => Ok(1),
            },
            Callback::Delete => match &ex.on_delete {
                Some(f) => core.guard(plugin, phase, |s| f.call(s, ctx)).map(|()| 0),
                None => Ok(0),
            },
        };
        // A callback that did not reach the guest consumed no follow-on.
        core.follow = false;
        let h = core.store.data_mut();
        if deleting {
            if !h.grpc.is_empty() {
                grpc::forget_context(h, ctx);
            }
            // Hashing even a miss costs a SipHash; most filters have no
            // per-route configs.
            if !self.variants.is_empty() {
                self.variants.remove(&ctx);
            }
        }
        h.config_variant = 0;
        *data = h.stream.take();
        h.stream_ctx = 0;
        h.effective = ROOT_ID;
        let actions = std::mem::take(&mut h.actions);
        let callouts = std::mem::take(&mut h.callouts);
        let action = result?;
        Ok(Outcome {
            pause: action == 1,
            actions,
            callouts,
        })
    }

    /// Runs a start-up or context callback (see [`Core::guard`]).
    fn guard<R>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        self.core.guard(&self.plugin, phase, f)
    }
}

impl Core {
    fn call3(
        &mut self,
        plugin: &Plugin,
        f: Option<&F3R>,
        phase: Phase,
        args: (u32, u32, u32),
    ) -> Result<u32, Failure> {
        match f {
            Some(f) => self.guard(plugin, phase, |s| f.call(s, args)),
            None => Ok(0),
        }
    }

    /// Runs `f` under a fresh deadline; classifies and counts the result.
    fn guard<R>(
        &mut self,
        plugin: &Plugin,
        phase: Phase,
        f: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        // Start-up (initializers, vm_start, configure) may parse configuration
        // on cold memory: it gets at least a second.
        let ticks = if phase == Phase::Start {
            plugin.deadline_ticks.max(START_DEADLINE_TICKS)
        } else {
            plugin.deadline_ticks
        };
        self.store.set_epoch_deadline(ticks);
        self.store.data_mut().limiter.hit = false;
        let started = if std::mem::take(&mut self.follow) {
            self.last_end
        } else {
            Instant::now()
        };
        // A panic in a host function (a bug in wasp, reachable from this
        // guest) unwinds through wasmtime back to here: it fails this
        // callback like a trap, the instance is discarded, and every other
        // stream and the process go on.
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut self.store)))
        {
            Ok(r) => r,
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic".into());
                tracing::error!(
                    filter = %plugin.name(),
                    phase = phase.name(),
                    "host panic while running a filter (a wasp bug; the instance is discarded): {what}"
                );
                Err(wasmtime::Error::msg(format!("host panic: {what}")))
            }
        };
        let ended = Instant::now();
        self.last_end = ended;
        self.ran = true;
        let took = ended.saturating_duration_since(started);
        let stats = &plugin.shared.stats;
        match r {
            Ok(v) => {
                stats.record(phase, took, CallResult::Ok);
                Ok(v)
            }
            Err(e) => {
                let failure = classify(&self.store, &e, phase.name());
                let result = match failure {
                    Failure::Timeout => CallResult::Timeout,
                    Failure::Trap(_) => CallResult::Trap,
                    _ => CallResult::Error,
                };
                stats.record(phase, took, result);
                Err(failure)
            }
        }
    }
}

/// Maps a wasmtime error to a [`Failure`].
fn classify(store: &Store<Host>, e: &wasmtime::Error, during: &str) -> Failure {
    if let Some(full) = e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        return Failure::PoolFull(full.to_string());
    }
    if let Some(exit) = e.downcast_ref::<ProcExit>() {
        return Failure::Exit(exit.0);
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        if *trap == Trap::Interrupt {
            return Failure::Timeout;
        }
        if store.data().limiter.hit {
            return Failure::Memory;
        }
        return Failure::Trap(format!("{trap} (during {during})"));
    }
    if store.data().limiter.hit {
        return Failure::Memory;
    }
    Failure::Trap(format!("{e:#} (during {during})"))
}
