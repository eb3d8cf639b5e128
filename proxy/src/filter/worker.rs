//! Per-worker instance pools: for each (filter-set generation, filter) a
//! worker keeps a small pool of pre-initialised **stream instances** (each
//! in-flight stream leases one and gives it back when it ends) and one
//! **root instance** (ticks, shared-queue wake-ups, root-context callout
//! answers). Instances are built on the engine's builder threads
//! ([`Builder`]), never inside a request's callback, and handed to the
//! worker through a per-pool [`Inbox`].
//!
//! Why: a trap, deadline, memory overrun or `proc_exit` makes a wasm
//! instance unusable. With one instance per stream, that failure discards
//! the one instance and fails the one stream; other streams in flight on the
//! same filter and worker keep theirs. A replacement is built in the
//! background, so clean requests never skip a filter because another one
//! broke it.
//!
//! Runs on worker threads, but for [`Builder`] (its own threads). The
//! registry is a thread-local `RefCell`, borrowed for one synchronous step
//! at a time: never across an await, and guest code run inside it never
//! reaches the registry again (host functions do not), so the borrow cannot
//! be re-entered. A pool's "pump" task (on the worker) takes built
//! instances in, rebuilds with backoff and frees the pools of a generation
//! once its `FilterSet` is gone.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;

use super::abi::grpc::{self, GrpcEvent};
use super::host::StreamData;
use super::host::{CalloutAnswer, CalloutWork, NewCallout};
use super::plugin::Plugin;
use super::set::FilterSet;
use super::vm::{Callback, Failure, Outcome, Vm, ROOT_ID};

/// How long a stream waits for an instance being built before its filter's
/// `fail` policy applies. Start-up callbacks get at least a second each, so
/// this covers a slow but healthy `on_configure`.
pub(crate) const LEASE_WAIT: Duration = Duration::from_secs(5);

/// How far past `limits.instances` a busy worker builds before streams
/// share an instance (the extra ones are freed after `IDLE_TTL` idle).
const GROWTH: usize = 8;

/// Idle stream instances a pool keeps ready (built ahead of demand).
const WARM: usize = 1;

/// An idle stream instance beyond [`WARM`] unused this long is freed (the
/// pool shrinks back after a burst).
const IDLE_TTL: Duration = Duration::from_secs(30);

/// How long an idle instance of a superseded generation is kept.
const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Window of the root CPU budget.
const ROOT_WINDOW: Duration = Duration::from_secs(1);

/// What a root instance's driver is woken for.
pub(crate) enum RootEvent {
    /// An `http_call` made on the root context finished.
    Callout(CalloutDone),
    /// A shared queue this instance registered got an item.
    QueueReady(u32),
}

/// Sender to a root instance's driver.
pub(crate) type RootTx = UnboundedSender<RootEvent>;

/// One stream instance of one worker: valid only on the thread that leased it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InstanceRef {
    pub set_id: u64,
    pub idx: usize,
    pub incarnation: u64,
}

/// Where a finished callout goes: a stream's own channel (falling back to
/// the instance's root context once the stream is gone, so the guest still
/// hears about its token), a root driver, or a stream instance's root
/// context.
pub(crate) enum Deliver {
    Stream(UnboundedSender<CalloutDone>, Option<InstanceRef>),
    Root(RootTx),
    Instance(InstanceRef),
}

impl Deliver {
    /// Runs on the worker (callout tasks are spawned on its runtime).
    fn send(&self, done: CalloutDone) {
        match self {
            Deliver::Stream(tx, fallback) => {
                if let (Err(e), Some(at)) = (tx.send(done), fallback) {
                    root_answer_on_instance(*at, e.0);
                }
            }
            Deliver::Root(tx) => {
                let _ = tx.send(RootEvent::Callout(done));
            }
            Deliver::Instance(at) => root_answer_on_instance(*at, done),
        }
    }

    /// Resolves when the stream that asked is gone (never for root callouts).
    async fn gone(&self) {
        match self {
            Deliver::Stream(tx, _) => tx.closed().await,
            Deliver::Root(_) | Deliver::Instance(_) => std::future::pending().await,
        }
    }
}

/// What came back from a callout.
pub(crate) enum Reply {
    /// The one answer of an `http_call`.
    Http(Result<http::Response<Bytes>, String>),
    /// One event of a gRPC call or stream; `last` ends the token.
    /// `_credit` is the share of the stream's undelivered-bytes bound the
    /// event holds: released when the event reaches the guest (or is dropped).
    Grpc {
        event: GrpcEvent,
        last: bool,
        _credit: grpc::Credit,
    },
}

/// A finished `http_call` (or one gRPC event), on its way back to the VM.
pub(crate) struct CalloutDone {
    pub token: u32,
    pub context: u32,
    /// The root context the call was made under: the answer runs there.
    pub root: u32,
    pub reply: Reply,
}

impl CalloutDone {
    /// Whether nothing more comes for this token (the callout is over).
    pub(crate) fn last(&self) -> bool {
        match &self.reply {
            Reply::Http(_) => true,
            Reply::Grpc { last, .. } => *last,
        }
    }

    pub(crate) fn into_callback(self) -> Callback {
        let (token, root) = (self.token, self.root);
        let result = match self.reply {
            Reply::Http(r) => r,
            // The credit goes as the event reaches the guest.
            Reply::Grpc { event, last, .. } => {
                return Callback::Grpc {
                    token,
                    root,
                    event,
                    last,
                }
            }
        };
        let answer = match result {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut headers = Vec::with_capacity(parts.headers.len() + 1);
                headers.push((
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                ));
                for (k, v) in &parts.headers {
                    headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
                }
                CalloutAnswer {
                    headers,
                    body,
                    trailers: Vec::new(),
                    status: u32::from(parts.status.as_u16()),
                    message: String::new(),
                }
            }
            Err(message) => CalloutAnswer {
                message,
                ..CalloutAnswer::default()
            },
        };
        Callback::HttpCallResponse {
            token,
            root,
            answer: Box::new(answer),
        }
    }
}

/// Spawns a callout on the current runtime; its answer (or, for gRPC, each
/// event) goes to `to`. Without a runtime the answer is an immediate failure.
pub(crate) fn spawn_callout(c: NewCallout, to: Deliver) {
    let NewCallout {
        token,
        context,
        root,
        timeout,
        work,
    } = c;
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle,
        Err(_) => {
            let reply = match work {
                CalloutWork::Http(_) => Reply::Http(Err("no async runtime on this thread".into())),
                CalloutWork::Grpc(_) => Reply::Grpc {
                    event: GrpcEvent::Close {
                        status: grpc::code::UNAVAILABLE,
                        message: "no async runtime on this thread".into(),
                    },
                    last: true,
                    _credit: None,
                },
            };
            to.send(CalloutDone {
                token,
                context,
                root,
                reply,
            });
            return;
        }
    };
    match work {
        CalloutWork::Http(future) => {
            handle.spawn(async move {
                let result = match tokio::time::timeout(timeout, future).await {
                    Ok(r) => r,
                    Err(_) => Err("http_call timed out".to_string()),
                };
                to.send(CalloutDone {
                    token,
                    context,
                    root,
                    reply: Reply::Http(result),
                });
            });
        }
        CalloutWork::Grpc(task) => {
            handle.spawn(async move {
                let emit = |event, last, credit| {
                    to.send(CalloutDone {
                        token,
                        context,
                        root,
                        reply: Reply::Grpc {
                            event,
                            last,
                            _credit: credit,
                        },
                    })
                };
                grpc::run(task, to.gone(), emit).await;
            });
        }
    }
}

// ---- builder threads --------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stream,
    Root,
}

/// A finished build, waiting in its pool's inbox.
struct Built {
    kind: Kind,
    result: Result<Vm, Failure>,
    root: Option<(RootTx, UnboundedReceiver<RootEvent>)>,
}

/// Where builder threads drop finished instances for one worker's pool.
/// The lock is taken once per finished build and, when `pending` says
/// something is there, once by the worker to take it: not per request.
pub(crate) struct Inbox {
    items: Mutex<Vec<Built>>,
    pending: AtomicUsize,
    /// Wakes the pool's pump task (a permit is kept if it is busy).
    wake: Notify,
}

impl Inbox {
    fn new() -> Arc<Self> {
        Arc::new(Inbox {
            items: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            wake: Notify::new(),
        })
    }

    fn put(&self, b: Built) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        self.pending.fetch_add(1, Ordering::Release);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Built> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let items = std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()));
        self.pending.fetch_sub(items.len(), Ordering::Release);
        items
    }
}

struct Job {
    plugin: Arc<Plugin>,
    kind: Kind,
    inbox: Arc<Inbox>,
}

impl Job {
    fn run(self) {
        let root = (self.kind == Kind::Root).then(unbounded_channel);
        let root_tx = root.as_ref().map(|(tx, _)| tx.clone());
        // A panic while building (a wasp bug) must still report a result,
        // or the pool would wait for this build forever; and the builder
        // thread lives on for the next job.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Vm::new(&self.plugin, root_tx)
        }))
        .unwrap_or_else(|_| {
            Err(Failure::Setup(
                "host panic while building an instance".into(),
            ))
        });
        self.inbox.put(Built {
            kind: self.kind,
            result,
            root,
        });
    }
}

/// Threads that build instances (instantiate, `_initialize`, root context,
/// `proxy_on_vm_start`, `proxy_on_configure`) so no request waits behind a
/// slow start-up on its worker. They end when the last `Builder` handle
/// (the runtime's and every plugin's) is gone.
pub(crate) struct Builder {
    tx: Option<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").finish_non_exhaustive()
    }
}

impl Builder {
    /// Starts `threads` builder threads. If none can start, builds happen
    /// inline on the worker (outside any request's callback), which still
    /// works, only slower for the worker.
    pub(crate) fn start(threads: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wasp-filter-build-{n}"))
                .spawn(move || {
                    wasmtime::Engine::tls_eager_initialize();
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        match job {
                            Ok(job) => job.run(),
                            Err(_) => return,
                        }
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start a filter builder thread: {e}"),
            }
        }
        Arc::new(Builder {
            tx: (started > 0).then_some(tx),
        })
    }

    fn submit(&self, job: Job) {
        let job = match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        job.run();
    }
}

// ---- per-worker pools -----------------------------------------------------

struct Inst {
    vm: Box<Vm>,
    /// Streams holding a lease on it (more than one only above the cap).
    streams: u32,
    /// When it was last leased (the pool's lease count then).
    last_used: u64,
    /// When its last stream ended (or it arrived).
    idle_since: Instant,
}

/// CPU used by root callbacks in the current window.
struct RootBudget {
    window: Instant,
    used: Duration,
}

struct Pool {
    set_id: u64,
    idx: usize,
    plugin: Arc<Plugin>,
    inbox: Arc<Inbox>,
    /// Woken whenever an instance arrives or a build fails.
    ready: Arc<Notify>,
    insts: Vec<Inst>,
    building: usize,
    cap: usize,
    leases: u64,
    /// This pool's share of `counts.in_use`, published by the pump (not
    /// per lease: that would bounce one cache line between workers).
    published_in_use: i64,
    /// Consecutive failed builds, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    counted_failed: bool,
    /// The engine's pool was full: share instances until then.
    pool_full_until: Option<Instant>,
    root: Option<Box<Vm>>,
    root_tx: Option<RootTx>,
    root_building: bool,
    root_failures: u32,
    root_retry_at: Option<Instant>,
    budget: RootBudget,
}

enum Try {
    Got(u64),
    Wait,
    Fail(Failure),
}

/// Delay before the next build after `failures` consecutive failures: the
/// first retry is immediate, then 50 ms doubling up to 10 s.
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let ms = 50u64.saturating_mul(1 << (failures - 2).min(10));
    Duration::from_millis(ms.min(10_000))
}

fn passed(at: Option<Instant>, now: Instant) -> bool {
    at.is_none_or(|t| now >= t)
}

impl Pool {
    fn new(set_id: u64, idx: usize, plugin: Arc<Plugin>) -> Self {
        let cap = usize::try_from(plugin.spec.instances.max(1)).unwrap_or(1);
        Pool {
            set_id,
            idx,
            plugin,
            inbox: Inbox::new(),
            ready: Arc::new(Notify::new()),
            insts: Vec::new(),
            building: 0,
            cap,
            leases: 0,
            published_in_use: 0,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            counted_failed: false,
            pool_full_until: None,
            root: None,
            root_tx: None,
            root_building: false,
            root_failures: 0,
            root_retry_at: None,
            budget: RootBudget {
                window: Instant::now(),
                used: Duration::ZERO,
            },
        }
    }

    fn submit(&mut self, kind: Kind) {
        match kind {
            Kind::Stream => self.building += 1,
            Kind::Root => self.root_building = true,
        }
        self.plugin.builder.submit(Job {
            plugin: self.plugin.clone(),
            kind,
            inbox: self.inbox.clone(),
        });
    }

    fn set_failed(&mut self, failed: bool) {
        if failed != self.counted_failed {
            let delta = if failed { 1 } else { -1 };
            self.plugin.failed_vms.fetch_add(delta, Ordering::Relaxed);
            self.counted_failed = failed;
        }
        self.plugin.rebuild_failing.store(failed, Ordering::Relaxed);
    }

    /// Takes finished builds in. Returns whether anything arrived.
    fn drain(&mut self) -> bool {
        let items = self.inbox.take();
        if items.is_empty() {
            return false;
        }
        let now = Instant::now();
        for b in items {
            let plugin = self.plugin.clone();
            let counts = &plugin.counts;
            match (b.kind, b.result) {
                (Kind::Stream, Ok(mut vm)) => {
                    self.building = self.building.saturating_sub(1);
                    self.failures = 0;
                    self.retry_at = None;
                    self.set_failed(false);
                    counts.created.fetch_add(1, Ordering::Relaxed);
                    counts.live.fetch_add(1, Ordering::Relaxed);
                    let at = InstanceRef {
                        set_id: self.set_id,
                        idx: self.idx,
                        incarnation: vm.incarnation,
                    };
                    // Callouts started in on_configure answer on this
                    // instance's root context.
                    for c in vm.take_root_callouts() {
                        spawn_callout(c, Deliver::Instance(at));
                    }
                    self.insts.push(Inst {
                        vm: Box::new(vm),
                        streams: 0,
                        last_used: 0,
                        idle_since: now,
                    });
                }
                (Kind::Root, Ok(mut vm)) => {
                    self.root_building = false;
                    self.root_failures = 0;
                    self.root_retry_at = None;
                    counts.created.fetch_add(1, Ordering::Relaxed);
                    let callouts = vm.take_root_callouts();
                    if let Some((tx, rx)) = b.root {
                        spawn_driver(self, &vm, rx);
                        for c in callouts {
                            spawn_callout(c, Deliver::Root(tx.clone()));
                        }
                        self.root_tx = Some(tx);
                    }
                    self.root = Some(Box::new(vm));
                }
                (kind, Err(Failure::PoolFull(msg))) => {
                    // Not the filter's fault: share instances for a while.
                    tracing::warn!(filter = %self.plugin.name(), "wasm instance pool full: {msg}");
                    self.pool_full_until = Some(now + Duration::from_millis(200));
                    match kind {
                        Kind::Stream => self.building = self.building.saturating_sub(1),
                        Kind::Root => {
                            self.root_building = false;
                            self.root_retry_at = Some(now + Duration::from_millis(200));
                        }
                    }
                }
                (Kind::Stream, Err(f)) => {
                    self.building = self.building.saturating_sub(1);
                    let msg = format!("building an instance: {f}");
                    self.plugin.note_failure(&msg);
                    counts.build_failures.fetch_add(1, Ordering::Relaxed);
                    self.failures = self.failures.saturating_add(1);
                    self.retry_at = Some(now + backoff(self.failures));
                    self.last_error = msg;
                    if self.insts.is_empty() {
                        self.set_failed(true);
                    }
                }
                (Kind::Root, Err(f)) => {
                    self.root_building = false;
                    let msg = format!("building the root instance: {f}");
                    self.plugin.note_failure(&msg);
                    counts.build_failures.fetch_add(1, Ordering::Relaxed);
                    self.root_failures = self.root_failures.saturating_add(1);
                    self.root_retry_at = Some(now + backoff(self.root_failures));
                }
            }
        }
        self.ready.notify_waiters();
        true
    }

    fn idle(&self) -> usize {
        self.insts.iter().filter(|i| i.streams == 0).count()
    }

    fn pool_full(&self, now: Instant) -> bool {
        !passed(self.pool_full_until, now)
    }

    /// Keeps a warm idle instance and the root instance coming, with backoff.
    fn top_up(&mut self) {
        // Runs on every lease: the clock is read only when something may
        // have to be built.
        let want_root = self.root.is_none() && !self.root_building;
        let total = self.insts.len() + self.building;
        let want_stream = self.idle() + self.building < WARM && total < self.cap;
        if !want_root && !want_stream {
            return;
        }
        let now = Instant::now();
        if self.pool_full(now) {
            return;
        }
        if want_root && passed(self.root_retry_at, now) {
            self.submit(Kind::Root);
        }
        if want_stream && passed(self.retry_at, now) {
            self.submit(Kind::Stream);
        }
    }

    /// When the pump should next look at this pool without being woken.
    fn next_due(&self) -> Option<Instant> {
        let stream = (self.idle() + self.building < WARM)
            .then_some(self.retry_at)
            .flatten();
        let root = (self.root.is_none() && !self.root_building)
            .then_some(self.root_retry_at)
            .flatten();
        [stream, root, self.pool_full_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn take(&mut self, pos: usize) -> Option<u64> {
        let inst = self.insts.get_mut(pos)?;
        if inst.streams > 0 {
            self.plugin
                .counts
                .shared_leases
                .fetch_add(1, Ordering::Relaxed);
        }
        inst.streams = inst.streams.saturating_add(1);
        self.leases = self.leases.wrapping_add(1);
        inst.last_used = self.leases;
        Some(inst.vm.incarnation)
    }

    /// Least-loaded instance, shared (the cap is reached or the engine's
    /// pool is full): degraded isolation rather than a failed request.
    fn share(&mut self) -> Option<u64> {
        let pos = self
            .insts
            .iter()
            .enumerate()
            .min_by_key(|(_, i)| i.streams)
            .map(|(p, _)| p)?;
        self.take(pos)
    }

    /// One attempt to lease. `asked`: this stream already requested a build.
    fn try_lease(&mut self, asked: &mut bool) -> Try {
        self.drain();
        // Most recently used first: sequential streams reuse one warm
        // instance (its caches stay hot; the spare stays a spare). After a
        // tier-up, Cranelift's before Winch's, so the Winch ones fall idle
        // and the pump retires them.
        let idle = self
            .insts
            .iter()
            .enumerate()
            .filter(|(_, i)| i.streams == 0)
            .max_by_key(|(_, i)| (i.vm.compiler, i.last_used))
            .map(|(p, _)| p);
        if self.root.is_none() && self.root_building && self.root_failures == 0 {
            // The first root instance is on its way: let it register its
            // queues and timers before streams start using the filter.
            return Try::Wait;
        }
        if let Some(pos) = idle {
            if let Some(inc) = self.take(pos) {
                self.top_up();
                return Try::Got(inc);
            }
        }
        let now = Instant::now();
        // `limits.instances` is what a worker keeps; under concurrency it
        // builds up to GROWTH times that, so a few slow streams cannot
        // force strangers to share (and so share a failure). Sharing is
        // the last resort, past that or with the engine's pool full.
        let hard_cap = self.cap.saturating_mul(GROWTH);
        let at_cap = self.insts.len() + self.building >= hard_cap || self.pool_full(now);
        if at_cap {
            if let Some(inc) = self.share() {
                return Try::Got(inc);
            }
        } else if (!*asked || self.building == 0) && passed(self.retry_at, now) {
            // Asked again when the build this stream asked for went to
            // another stream and nothing else is on its way.
            self.submit(Kind::Stream);
            *asked = true;
            return Try::Wait;
        }
        if self.building > 0 {
            return Try::Wait;
        }
        // Nothing on its way (builds fail and back off): a busy healthy
        // instance is still better than failing.
        if let Some(inc) = self.share() {
            return Try::Got(inc);
        }
        let why = if self.last_error.is_empty() {
            "the instance pool is full".to_string()
        } else {
            self.last_error.clone()
        };
        Try::Fail(Failure::Unavailable(why))
    }

    /// `ran_until`: when the last callback run while ending the lease
    /// ended, if one reached the guest (its clock read stands for now);
    /// `None` reads the clock, since the last callback the instance ran may
    /// be from the start of a long stream.
    fn give_back(&mut self, incarnation: u64, ran_until: Option<Instant>) {
        if let Some(inst) = self
            .insts
            .iter_mut()
            .find(|i| i.vm.incarnation == incarnation)
        {
            inst.streams = inst.streams.saturating_sub(1);
            if inst.streams == 0 {
                inst.idle_since = ran_until.unwrap_or_else(Instant::now);
            }
        }
    }

    /// Drops a failed stream instance and builds a replacement.
    fn discard(&mut self, incarnation: u64, why: &Failure) {
        let Some(pos) = self
            .insts
            .iter()
            .position(|i| i.vm.incarnation == incarnation)
        else {
            return;
        };
        let inst = self.insts.swap_remove(pos);
        let counts = &self.plugin.counts;
        counts.failed.fetch_add(1, Ordering::Relaxed);
        counts.live.fetch_sub(1, Ordering::Relaxed);
        self.plugin.note_failure(&why.to_string());
        drop(inst);
        self.top_up();
    }

    /// Publishes how many of this pool's instances serve streams now.
    fn publish(&mut self) {
        let busy = self.insts.iter().filter(|i| i.streams > 0).count();
        let busy = i64::try_from(busy).unwrap_or(0);
        let delta = busy - self.published_in_use;
        if delta != 0 {
            self.plugin
                .counts
                .in_use
                .fetch_add(delta, Ordering::Relaxed);
            self.published_in_use = busy;
        }
    }

    /// Frees idle instances unused for [`IDLE_TTL`], keeping [`WARM`].
    fn trim(&mut self, now: Instant) {
        let mut idle = self.idle();
        while idle > WARM {
            let stale = self
                .insts
                .iter()
                .enumerate()
                .filter(|(_, i)| {
                    i.streams == 0 && now.saturating_duration_since(i.idle_since) >= IDLE_TTL
                })
                .min_by_key(|(_, i)| i.last_used)
                .map(|(p, _)| p);
            let Some(pos) = stale else {
                break;
            };
            self.insts.swap_remove(pos);
            self.plugin.counts.live.fetch_sub(1, Ordering::Relaxed);
            idle -= 1;
        }
    }

    /// The filter tiered up (its Cranelift code is ready): move this pool's
    /// stream instances onto it without a request noticing. New builds
    /// already come from the Cranelift code; an idle Winch instance is
    /// replaced by a Cranelift one built first, within the cap (Winch,
    /// Cranelift and those building all count: a stream holding a Winch
    /// instance across the tier-up must not let the filter grow past
    /// `limits.instances x GROWTH`), and freed once that one is ready, or
    /// to make room at the cap. Leased Winch instances finish their streams
    /// and go the same way; one just built may be on its way to a waiting
    /// stream, so it gets [`RETIRE_GRACE`] as in `retire`. The root
    /// instance stays on the code it was built from: replacing it would
    /// drop its callouts in flight and its shared-queue registrations, and
    /// ticks, queues and root callouts are rare enough that their speed
    /// does not matter (a root rebuilt after a failure runs Cranelift).
    fn tier_over(&mut self, now: Instant) {
        // The code new instances come from: the loaded one until the
        // tier-up lands (or again, if builds from Cranelift kept failing).
        let target = self.plugin.serving().compiler;
        if target == self.plugin.code.compiler {
            return;
        }
        if !self
            .insts
            .iter()
            .any(|i| i.streams == 0 && i.vm.compiler != target)
        {
            return;
        }
        let ready = self
            .insts
            .iter()
            .any(|i| i.streams == 0 && i.vm.compiler == target);
        let at_cap = self.insts.len() + self.building >= self.cap.saturating_mul(GROWTH);
        if !ready && !at_cap {
            if self.building == 0 && passed(self.retry_at, now) && !self.pool_full(now) {
                self.submit(Kind::Stream);
            }
            return;
        }
        let before = self.insts.len();
        self.insts.retain(|i| {
            i.streams > 0
                || i.vm.compiler == target
                || now.saturating_duration_since(i.idle_since) < RETIRE_GRACE
        });
        let freed = before - self.insts.len();
        let counts = &self.plugin.counts;
        counts.retired.fetch_add(freed as u64, Ordering::Relaxed);
        counts
            .live
            .fetch_sub(i64::try_from(freed).unwrap_or(0), Ordering::Relaxed);
    }

    /// A newer generation serves new requests on this worker: keep only
    /// the instances streams still hold, build nothing more, and let the
    /// root go (the new generation has its own). Long streams then keep
    /// one instance each alive, not a warm spare and a root per reload.
    fn retire(&mut self, now: Instant) {
        let before = self.insts.len();
        // One just built for a stream that loaded the old snapshot before
        // the reload may not be leased yet: give it a moment.
        self.insts.retain(|i| {
            i.streams > 0 || now.saturating_duration_since(i.idle_since) < RETIRE_GRACE
        });
        let freed = i64::try_from(before - self.insts.len()).unwrap_or(0);
        self.plugin.counts.live.fetch_sub(freed, Ordering::Relaxed);
        self.root = None;
        self.root_tx = None;
    }

    fn drop_root(&mut self, why: &Failure) {
        if self.root.take().is_some() {
            self.plugin.counts.failed.fetch_add(1, Ordering::Relaxed);
            self.plugin.note_failure(&format!("root instance: {why}"));
        }
        self.root_tx = None;
        self.root_failures = self.root_failures.saturating_add(1);
        self.root_retry_at = Some(Instant::now() + backoff(self.root_failures));
        // Let the pump schedule the rebuild.
        self.inbox.wake.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let counts = &self.plugin.counts;
        let live = i64::try_from(self.insts.len()).unwrap_or(0);
        counts.live.fetch_sub(live, Ordering::Relaxed);
        counts
            .in_use
            .fetch_sub(self.published_in_use, Ordering::Relaxed);
        self.set_failed(false);
    }
}

struct WorkerSet {
    set: Weak<FilterSet>,
    pools: Vec<Pool>,
}

/// Hashes a generation id (a small counter) with one multiply: the map is
/// looked up once per callback, where SipHash cost more than the rest of
/// the look-up. Ids come from the engine, not from outside.
#[derive(Default, Clone, Copy)]
struct SetIdHasher(u64);

impl std::hash::Hasher for SetIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct Worker {
    sets: HashMap<u64, WorkerSet, std::hash::BuildHasherDefault<SetIdHasher>>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

/// Runs `f` on the pool of filter `idx` of generation `set_id`, if it exists here.
fn with_pool<R>(set_id: u64, idx: usize, f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
    WORKER
        .try_with(|w| {
            let mut w = w.try_borrow_mut().ok()?;
            let pool = w.sets.get_mut(&set_id)?.pools.get_mut(idx)?;
            Some(f(pool))
        })
        .ok()
        .flatten()
}

/// Creates this worker's pools of `set` on first use: starts their pumps,
/// which build the root instance and a warm stream instance of each filter.
fn ensure_set(set: &Arc<FilterSet>) -> Result<(), Failure> {
    let fresh = WORKER
        .try_with(|w| {
            let Ok(mut w) = w.try_borrow_mut() else {
                return Err(Failure::Setup("filter instance registry re-entered".into()));
            };
            if w.sets.contains_key(&set.id) {
                return Ok(false);
            }
            if w.sets.is_empty() {
                // First use on this thread: pay wasmtime's TLS setup now, once.
                wasmtime::Engine::tls_eager_initialize();
            }
            w.sets.retain(|_, ws| ws.set.strong_count() > 0);
            let pools = set
                .plugins
                .iter()
                .enumerate()
                .map(|(i, p)| Pool::new(set.id, i, p.clone()))
                .collect();
            w.sets.insert(
                set.id,
                WorkerSet {
                    set: Arc::downgrade(set),
                    pools,
                },
            );
            Ok(true)
        })
        .unwrap_or_else(|_| Err(Failure::Setup("worker thread is shutting down".into())))?;
    if fresh {
        for idx in 0..set.plugins.len() {
            with_pool(set.id, idx, Pool::top_up);
            spawn_pump(set, idx);
        }
    }
    Ok(())
}

/// Creates this worker's pools of `set` now (their root and warm stream
/// instances start building), as the first stream on the worker would.
pub(crate) fn prepare(set: &Arc<FilterSet>) -> bool {
    ensure_set(set).is_ok()
}

/// Whether this worker still waits for an instance of `set` to be built.
pub(crate) fn building(set_id: u64) -> bool {
    WORKER
        .try_with(|w| {
            w.try_borrow().is_ok_and(|w| {
                w.sets.get(&set_id).is_some_and(|ws| {
                    ws.pools.iter().any(|p| {
                        p.building > 0
                            || p.root_building
                            || p.inbox.pending.load(Ordering::Acquire) > 0
                    })
                })
            })
        })
        .unwrap_or(false)
}

/// Leases a stream instance of filter `idx`: an idle one, a new one (waiting
/// for the builder, within [`LEASE_WAIT`]) or, above the cap, the least
/// loaded one. Fails only when the filter cannot produce a healthy instance.
pub(crate) async fn lease(set: &Arc<FilterSet>, idx: usize) -> Result<u64, Failure> {
    let mut asked = false;
    match try_lease(set, idx, &mut asked)? {
        Some(inc) => Ok(inc),
        None => lease_wait(set, idx, asked).await,
    }
}

/// One attempt at [`lease`] that does not wait: `Ok(None)` when the stream
/// has to wait for an instance being built (`asked`: it asked for one;
/// hand it to [`lease_wait`]). One look-up of the pool: the set's pools
/// exist on this worker for every stream but its first.
pub(crate) fn try_lease(
    set: &Arc<FilterSet>,
    idx: usize,
    asked: &mut bool,
) -> Result<Option<u64>, Failure> {
    let tried = match with_pool(set.id, idx, |p| p.try_lease(asked)) {
        Some(t) => t,
        None => {
            ensure_set(set)?;
            with_pool(set.id, idx, |p| p.try_lease(asked))
                .ok_or_else(|| Failure::Setup("no such filter index".into()))?
        }
    };
    match tried {
        Try::Got(inc) => Ok(Some(inc)),
        Try::Fail(f) => Err(f),
        Try::Wait => Ok(None),
    }
}

/// The waiting part of [`lease`], after [`try_lease`] found nothing ready.
pub(crate) async fn lease_wait(
    set: &Arc<FilterSet>,
    idx: usize,
    mut asked: bool,
) -> Result<u64, Failure> {
    ensure_set(set)?;
    // Set when the stream first has to wait.
    let mut deadline: Option<Instant> = None;
    loop {
        let Some((r, ready)) = with_pool(set.id, idx, |p| {
            let r = p.try_lease(&mut asked);
            // The notifier is cloned only for a stream that has to wait.
            let ready = matches!(r, Try::Wait).then(|| p.ready.clone());
            (r, ready)
        }) else {
            return Err(Failure::Setup("no such filter index".into()));
        };
        let ready = match (r, ready) {
            (Try::Got(inc), _) => return Ok(inc),
            (Try::Fail(f), _) => return Err(f),
            (Try::Wait, Some(ready)) => ready,
            (Try::Wait, None) => return Err(Failure::Setup("no instance notifier".into())),
        };
        // Same thread as every notifier's drain: nothing can arrive between
        // the check above and this registration.
        let now = Instant::now();
        let deadline = *deadline.get_or_insert(now + LEASE_WAIT);
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() || tokio::time::timeout(left, ready.notified()).await.is_err() {
            return Err(Failure::Unavailable(format!(
                "no instance ready within {LEASE_WAIT:?}"
            )));
        }
    }
}

/// A lease without waiting (for a callback that cannot await): an idle or
/// shared instance, else the filter's policy applies.
pub(crate) fn lease_now(set: &Arc<FilterSet>, idx: usize) -> Result<u64, Failure> {
    let mut asked = false;
    match try_lease(set, idx, &mut asked)? {
        Some(inc) => Ok(inc),
        None => Err(Failure::Unavailable("no instance ready".into())),
    }
}

/// Runs `cb` for filter `idx` of `set` on the instance a stream or a
/// connection holds: `incarnation` (0: none yet, so one that is ready is
/// leased now) and its context there, `ctx` (0: created first). Both are
/// updated in place, so the next callback finds them.
pub(crate) fn run_held(
    set: &Arc<FilterSet>,
    idx: usize,
    incarnation: &mut u64,
    ctx: &mut u32,
    data: &mut Option<Box<StreamData>>,
    cb: Callback,
) -> Result<(InstanceRef, Outcome), Failure> {
    run_held_as(set, idx, 0, incarnation, ctx, data, cb)
}

/// [`run_held`] for a stream of a route with its own config of the filter:
/// its context is created under the root context of config `variant`.
pub(crate) fn run_held_as(
    set: &Arc<FilterSet>,
    idx: usize,
    variant: u32,
    incarnation: &mut u64,
    ctx: &mut u32,
    data: &mut Option<Box<StreamData>>,
    cb: Callback,
) -> Result<(InstanceRef, Outcome), Failure> {
    if *incarnation == 0 {
        *incarnation = lease_now(set, idx)?;
    }
    let at = InstanceRef {
        set_id: set.id,
        idx,
        incarnation: *incarnation,
    };
    let (id, out) = with_instance(at, |vm| {
        let id = if *ctx == 0 {
            let id = vm.create_context(variant)?;
            vm.follow_on();
            id
        } else {
            *ctx
        };
        // A failed callback discards this instance, and only it.
        let out = vm.run(id, data, cb)?;
        Ok((id, out))
    })?;
    *ctx = id;
    Ok((at, out))
}

/// Runs `f` on the leased stream instance `at`. A failure that kills the
/// instance discards it (and only it). `ContextLost` if it is gone.
pub(crate) fn with_instance<R>(
    at: InstanceRef,
    f: impl FnOnce(&mut Vm) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let r = with_pool(at.set_id, at.idx, |p| {
        let Some(inst) = p
            .insts
            .iter_mut()
            .find(|i| i.vm.incarnation == at.incarnation)
        else {
            return Err(Failure::ContextLost);
        };
        let r = f(&mut inst.vm);
        if let Err(e) = &r {
            if e.kills_vm() {
                p.discard(at.incarnation, e);
            }
        }
        r
    });
    r.unwrap_or(Err(Failure::ContextLost))
}

/// Ends a lease taken with [`lease`] / [`lease_now`]: runs `f` (the last
/// callbacks) on the instance and gives it back to the pool, or discards it
/// if `f` killed it; one look-up of the pool for both.
pub(crate) fn finish_lease(
    at: InstanceRef,
    f: impl FnOnce(&mut Vm) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let r = with_pool(at.set_id, at.idx, |p| {
        let Some(inst) = p
            .insts
            .iter_mut()
            .find(|i| i.vm.incarnation == at.incarnation)
        else {
            return Err(Failure::ContextLost);
        };
        let before = inst.vm.last_ran();
        let r = f(&mut inst.vm);
        // Each callback that reaches the guest reads the clock at its end:
        // a later `last_ran` means one ran just now.
        let after = inst.vm.last_ran();
        let ran_until = (after > before).then_some(after);
        match &r {
            Err(e) if e.kills_vm() => p.discard(at.incarnation, e),
            _ => p.give_back(at.incarnation, ran_until),
        }
        r
    });
    r.unwrap_or(Err(Failure::ContextLost))
}

/// A callout answer for a stream instance whose stream is gone, or for a
/// root callout it made: runs `proxy_on_http_call_response` on its root
/// context if the instance still lives.
fn root_answer_on_instance(at: InstanceRef, done: CalloutDone) {
    let root = done.root;
    let cb = done.into_callback();
    let r = with_instance(at, |vm| vm.run(root, &mut None, cb));
    if let Ok(out) = r {
        for c in out.callouts {
            spawn_callout(c, Deliver::Instance(at));
        }
    }
}

/// Starts the pump of one pool on the current runtime.
fn spawn_pump(set: &Arc<FilterSet>, idx: usize) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(inbox) = with_pool(set.id, idx, |p| p.inbox.clone()) else {
        return;
    };
    handle.spawn(pump(
        Arc::downgrade(set),
        set.id,
        idx,
        inbox,
        std::thread::current().id(),
    ));
}

/// Takes built instances into the pool as they arrive, keeps the warm and
/// root instances coming (with backoff after failures), and frees this
/// worker's pools of the generation once it is gone.
async fn pump(set: Weak<FilterSet>, set_id: u64, idx: usize, inbox: Arc<Inbox>, owner: ThreadId) {
    loop {
        if std::thread::current().id() != owner {
            return;
        }
        if set.strong_count() == 0 {
            let _ = WORKER.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.sets.remove(&set_id);
                }
            });
            return;
        }
        // Set ids grow with each load: a larger one on this worker means a
        // newer generation took over.
        let superseded = WORKER
            .try_with(|w| {
                w.try_borrow()
                    .is_ok_and(|w| w.sets.keys().any(|id| *id > set_id))
            })
            .unwrap_or(false);
        let Some(due) = with_pool(set_id, idx, |p| {
            p.drain();
            p.trim(Instant::now());
            if superseded {
                p.retire(Instant::now());
                p.publish();
                return None;
            }
            p.tier_over(Instant::now());
            p.top_up();
            p.publish();
            p.next_due()
        }) else {
            return;
        };
        // Also wakes now and then to notice that the generation is gone.
        let wait = due
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(250))
            .min(Duration::from_millis(250));
        tokio::select! {
            _ = inbox.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Starts the driver of a new root instance (ticks, root callout answers,
/// queue wake-ups) on the current runtime.
fn spawn_driver(pool: &Pool, vm: &Vm, rx: UnboundedReceiver<RootEvent>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(root_driver(
        pool.set_id,
        pool.idx,
        vm.incarnation,
        rx,
        std::thread::current().id(),
    ));
}

/// What the root driver does next.
enum RootStep {
    /// The callback, on this root context (a callout answer names the
    /// root that made the call; ticks and queues are root 1's).
    Run(u32, Callback),
    Skip,
}

/// Drives one root instance until it or its generation is gone. Ticks run
/// at the guest's period but never faster than `limits.tick_min`, and are
/// skipped (and counted) while root callbacks have used more than
/// `limits.root_cpu` in the current second.
async fn root_driver(
    set_id: u64,
    idx: usize,
    incarnation: u64,
    mut rx: UnboundedReceiver<RootEvent>,
    owner: ThreadId,
) {
    loop {
        if std::thread::current().id() != owner {
            return;
        }
        let period = with_pool(set_id, idx, |p| match &p.root {
            Some(vm) if vm.incarnation == incarnation => {
                let ms = vm.tick_period_ms();
                Some(
                    (ms > 0)
                        .then(|| Duration::from_millis(u64::from(ms)).max(p.plugin.spec.tick_min)),
                )
            }
            _ => None,
        })
        .flatten();
        let Some(period) = period else {
            return;
        };
        let wait = period.unwrap_or(Duration::from_millis(250));
        let step = tokio::select! {
            ev = rx.recv() => match ev {
                None => return,
                Some(RootEvent::Callout(done)) => RootStep::Run(done.root, done.into_callback()),
                Some(RootEvent::QueueReady(queue)) => {
                    let _ = with_pool(set_id, idx, |p| {
                        p.plugin.shared.queues.woken(queue);
                        Some(())
                    });
                    RootStep::Run(ROOT_ID, Callback::QueueReady { queue })
                }
            },
            _ = tokio::time::sleep(wait) => {
                if period.is_none() { RootStep::Skip } else { RootStep::Run(ROOT_ID, Callback::Tick) }
            }
        };
        let RootStep::Run(root, cb) = step else {
            continue;
        };
        if std::thread::current().id() != owner {
            return;
        }
        let alive = with_pool(set_id, idx, |p| run_root(p, incarnation, root, cb)).unwrap_or(false);
        if !alive {
            return;
        }
    }
}

/// Runs one root callback under the root CPU budget. False once the root
/// instance is gone.
fn run_root(p: &mut Pool, incarnation: u64, root: u32, cb: Callback) -> bool {
    let now = Instant::now();
    if now.saturating_duration_since(p.budget.window) >= ROOT_WINDOW {
        p.budget.window = now;
        p.budget.used = Duration::ZERO;
    }
    let is_tick = matches!(cb, Callback::Tick);
    if is_tick && p.budget.used >= p.plugin.spec.root_cpu {
        p.plugin
            .counts
            .ticks_skipped
            .fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let Some(vm) = p
        .root
        .as_deref_mut()
        .filter(|v| v.incarnation == incarnation)
    else {
        return false;
    };
    if is_tick {
        p.plugin.counts.ticks.fetch_add(1, Ordering::Relaxed);
    }
    let started = Instant::now();
    let r = vm.run(root, &mut None, cb);
    p.budget.used = p.budget.used.saturating_add(started.elapsed());
    match r {
        Ok(out) => {
            if let Some(tx) = &p.root_tx {
                for c in out.callouts {
                    spawn_callout(c, Deliver::Root(tx.clone()));
                }
            }
            true
        }
        Err(f) if f.kills_vm() => {
            p.drop_root(&f);
            false
        }
        Err(_) => true,
    }
}

/// When the idle stream instances of filter `idx` of generation `set_id`
/// on this thread became idle.
#[cfg(test)]
pub(crate) fn idle_since(set_id: u64, idx: usize) -> Vec<Instant> {
    with_pool(set_id, idx, |p| {
        p.insts
            .iter()
            .filter(|i| i.streams == 0)
            .map(|i| i.idle_since)
            .collect()
    })
    .unwrap_or_default()
}

/// Whether this thread still holds instances of generation `set_id`.
#[cfg(test)]
pub(crate) fn holds_set(set_id: u64) -> bool {
    WORKER.with(|w| w.borrow().sets.contains_key(&set_id))
}
