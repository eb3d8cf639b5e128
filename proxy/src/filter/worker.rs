//! Per-worker VM registry: a thread-local map from (filter-set generation,
//! filter index) to that worker's VM, created lazily on first use, dropped
//! on failure and rebuilt on a later use after a backoff; plus the
//! per-VM root driver task (ticks and root-context `http_call` answers) and
//! callout spawning.
//!
//! Runs on worker threads only. [`with_vm`] borrows the registry for one
//! synchronous callback: it must never be held across an await, and guest
//! code run inside it never reaches this registry again (host functions do
//! not), so the `RefCell` borrow cannot be re-entered. VMs of a generation
//! whose `FilterSet` is gone are swept when a new generation first runs on
//! the thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::host::{CalloutAnswer, NewCallout};
use super::set::FilterSet;
use super::vm::{Callback, Failure, Vm, ROOT_ID};

/// What a VM's root driver is woken for.
pub(crate) enum RootEvent {
    /// An `http_call` made on the root context finished.
    Callout(CalloutDone),
    /// A shared queue this VM registered got an item.
    QueueReady(u32),
}

/// Sender to a VM's root driver.
pub(crate) type RootTx = UnboundedSender<RootEvent>;

/// Where a finished callout goes: a stream's own channel (falling back to
/// the VM's root driver once the stream is gone, so the guest still hears
/// about its token) or a root driver.
pub(crate) enum Deliver {
    Stream(UnboundedSender<CalloutDone>, Option<RootTx>),
    Root(RootTx),
}

impl Deliver {
    fn send(&self, done: CalloutDone) {
        match self {
            Deliver::Stream(tx, root) => {
                if let (Err(e), Some(root)) = (tx.send(done), root) {
                    let _ = root.send(RootEvent::Callout(e.0));
                }
            }
            Deliver::Root(tx) => {
                let _ = tx.send(RootEvent::Callout(done));
            }
        }
    }
}

/// A finished `http_call`, on its way back to the VM.
pub(crate) struct CalloutDone {
    pub token: u32,
    pub context: u32,
    pub result: Result<http::Response<Bytes>, String>,
}

impl CalloutDone {
    pub(crate) fn into_answer(self) -> (u32, CalloutAnswer) {
        let answer = match self.result {
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
        (self.token, answer)
    }
}

/// Spawns a callout on the current runtime; its answer goes to `to`.
/// Without a runtime the answer is an immediate failure.
pub(crate) fn spawn_callout(c: NewCallout, to: Deliver) {
    let NewCallout {
        token,
        context,
        timeout,
        future,
    } = c;
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(async move {
                let result = match tokio::time::timeout(timeout, future).await {
                    Ok(r) => r,
                    Err(_) => Err("http_call timed out".to_string()),
                };
                to.send(CalloutDone {
                    token,
                    context,
                    result,
                });
            });
        }
        Err(_) => {
            to.send(CalloutDone {
                token,
                context,
                result: Err("no async runtime on this thread".into()),
            });
        }
    }
}

struct Slot {
    vm: Option<Box<Vm>>,
    /// Sends root-context callout answers to this VM's driver.
    root_tx: Option<RootTx>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    counted_failed: bool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            vm: None,
            root_tx: None,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            counted_failed: false,
        }
    }
}

struct WorkerSet {
    set: Weak<FilterSet>,
    slots: Vec<Slot>,
}

#[derive(Default)]
struct Worker {
    sets: HashMap<u64, WorkerSet>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

/// Delay before rebuilding a VM after `failures` consecutive failures: the
/// first rebuild is immediate, then 50 ms doubling up to 10 s.
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let ms = 50u64.saturating_mul(1 << (failures - 2).min(10));
    Duration::from_millis(ms.min(10_000))
}

/// Applies a callback result to the slot: a VM-killing failure drops it.
fn settle<R>(slot: &mut Slot, r: Result<R, Failure>) -> Result<R, Failure> {
    match &r {
        Ok(_) => slot.failures = 0,
        Err(f) if f.kills_vm() => {
            if let Some(vm) = slot.vm.take() {
                let msg = f.to_string();
                vm.plugin.note_failure(&msg);
                if !slot.counted_failed {
                    vm.plugin.failed_vms.fetch_add(1, Ordering::Relaxed);
                    slot.counted_failed = true;
                }
                slot.last_error = msg;
            }
            slot.root_tx = None;
            slot.failures = slot.failures.saturating_add(1);
            slot.retry_at = Some(Instant::now() + backoff(slot.failures));
        }
        Err(_) => {}
    }
    r
}

/// Builds the VM of a slot if it has none and its backoff has passed.
fn ensure_vm(set: &Arc<FilterSet>, idx: usize, slot: &mut Slot) -> Result<(), Failure> {
    if slot.vm.is_some() {
        return Ok(());
    }
    if let Some(at) = slot.retry_at {
        if Instant::now() < at {
            return Err(Failure::Unavailable(slot.last_error.clone()));
        }
    }
    let plugin = set
        .plugins
        .get(idx)
        .ok_or_else(|| Failure::Setup("no such filter index".into()))?;
    // The root driver's channel exists before start-up, so a queue the guest
    // registers in `proxy_on_vm_start` can already wake it.
    let (root_tx, root_rx) = match tokio::runtime::Handle::try_current() {
        Ok(_) => {
            let (tx, rx) = unbounded_channel();
            (Some(tx), Some(rx))
        }
        Err(_) => (None, None),
    };
    let mut vm = match Vm::new(plugin, root_tx.clone()) {
        Ok(vm) => vm,
        Err(f) => {
            let msg = format!("rebuilding the VM: {f}");
            plugin.note_failure(&msg);
            plugin.rebuild_failing.store(true, Ordering::Relaxed);
            if !slot.counted_failed {
                plugin.failed_vms.fetch_add(1, Ordering::Relaxed);
                slot.counted_failed = true;
            }
            slot.last_error = msg;
            slot.failures = slot.failures.saturating_add(1);
            slot.retry_at = Some(Instant::now() + backoff(slot.failures));
            return Err(f);
        }
    };
    plugin.rebuild_failing.store(false, Ordering::Relaxed);
    if slot.counted_failed {
        plugin.failed_vms.fetch_sub(1, Ordering::Relaxed);
        slot.counted_failed = false;
        tracing::info!(filter = %plugin.name(), "wasm filter VM rebuilt");
    }
    let startup_callouts = vm.take_root_callouts();
    if let Some(rx) = root_rx {
        spawn_driver(set, idx, &vm, rx);
    }
    slot.root_tx = root_tx;
    for c in startup_callouts {
        if let Some(tx) = &slot.root_tx {
            spawn_callout(c, Deliver::Root(tx.clone()));
        }
    }
    slot.vm = Some(Box::new(vm));
    Ok(())
}

/// Runs `f` on this worker's VM for filter `idx` of `set`, creating or
/// rebuilding it if needed. Also hands `f` the root driver's sender.
pub(crate) fn with_vm<R>(
    set: &Arc<FilterSet>,
    idx: usize,
    f: impl FnOnce(&mut Vm, Option<&RootTx>) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let r = WORKER.try_with(|w| {
        let Ok(mut w) = w.try_borrow_mut() else {
            return Err(Failure::Setup("filter VM registry re-entered".into()));
        };
        if !w.sets.contains_key(&set.id) {
            if w.sets.is_empty() {
                // First use on this thread: pay wasmtime's TLS setup now, once.
                wasmtime::Engine::tls_eager_initialize();
            }
            w.sets.retain(|_, ws| ws.set.strong_count() > 0);
            w.sets.insert(
                set.id,
                WorkerSet {
                    set: Arc::downgrade(set),
                    slots: (0..set.plugins.len()).map(|_| Slot::new()).collect(),
                },
            );
        }
        let Some(slot) = w.sets.get_mut(&set.id).and_then(|ws| ws.slots.get_mut(idx)) else {
            return Err(Failure::Setup("no such filter index".into()));
        };
        ensure_vm(set, idx, slot)?;
        let Some(vm) = slot.vm.as_deref_mut() else {
            return Err(Failure::Unavailable(slot.last_error.clone()));
        };
        let r = f(vm, slot.root_tx.as_ref());
        settle(slot, r)
    });
    r.unwrap_or_else(|_| Err(Failure::Setup("worker thread is shutting down".into())))
}

/// Like [`with_vm`] but only if that exact VM incarnation still lives on
/// this thread; never creates one. `None` if it is gone.
pub(crate) fn with_live_vm<R>(
    set_id: u64,
    idx: usize,
    incarnation: u64,
    f: impl FnOnce(&mut Vm, Option<&RootTx>) -> Result<R, Failure>,
) -> Option<Result<R, Failure>> {
    WORKER
        .try_with(|w| {
            let mut w = w.try_borrow_mut().ok()?;
            let slot = w.sets.get_mut(&set_id)?.slots.get_mut(idx)?;
            let vm = slot.vm.as_deref_mut()?;
            if vm.incarnation != incarnation {
                return None;
            }
            let r = f(vm, slot.root_tx.as_ref());
            Some(settle(slot, r))
        })
        .ok()
        .flatten()
}

/// Starts the root driver of a new VM (ticks, root callout answers, queue
/// wake-ups) on the current runtime.
fn spawn_driver(set: &Arc<FilterSet>, idx: usize, vm: &Vm, rx: UnboundedReceiver<RootEvent>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(root_driver(
        Arc::downgrade(set),
        set.id,
        idx,
        vm.incarnation,
        rx,
        std::thread::current().id(),
    ));
}

/// Drives one VM's root context until the VM or its generation is gone.
async fn root_driver(
    set: Weak<FilterSet>,
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
        if set.strong_count() == 0 {
            // The generation is gone: free this thread's VMs of it now.
            let _ = WORKER.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.sets.remove(&set_id);
                }
            });
            return;
        }
        let period = match with_live_vm(set_id, idx, incarnation, |vm, _| Ok(vm.tick_period_ms())) {
            Some(Ok(p)) => p,
            _ => return,
        };
        let wait = if period == 0 {
            Duration::from_millis(250)
        } else {
            Duration::from_millis(u64::from(period))
        };
        let cb = tokio::select! {
            ev = rx.recv() => match ev {
                None => return,
                Some(RootEvent::Callout(done)) => {
                    let (token, answer) = done.into_answer();
                    Callback::HttpCallResponse { token, answer }
                }
                Some(RootEvent::QueueReady(queue)) => Callback::QueueReady { queue },
            },
            _ = tokio::time::sleep(wait) => {
                if period == 0 {
                    continue;
                }
                Callback::Tick
            }
        };
        if std::thread::current().id() != owner {
            return;
        }
        let r = with_live_vm(set_id, idx, incarnation, |vm, tx| {
            let out = vm.run(ROOT_ID, &mut None, cb)?;
            if let Some(tx) = tx {
                for c in out.callouts {
                    spawn_callout(c, Deliver::Root(tx.clone()));
                }
            }
            Ok(())
        });
        match r {
            Some(Ok(())) => {}
            Some(Err(_)) | None => return,
        }
    }
}

/// Whether this thread still holds VMs of generation `set_id`.
#[cfg(test)]
pub(crate) fn holds_set(set_id: u64) -> bool {
    WORKER.with(|w| w.borrow().sets.contains_key(&set_id))
}
