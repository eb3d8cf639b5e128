//! Shared queues (`proxy_register_shared_queue`, `proxy_resolve_shared_queue`,
//! `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`): process-wide
//! FIFO queues keyed by (VM id, name), where a filter's VM id is its name.
//! An enqueue wakes one registrant with `proxy_on_queue_ready` on its own
//! worker (through that VM's root driver).
//!
//! Called from worker threads inside host calls; one mutex guards the
//! registry (queues are a cross-worker hand-off, not a per-request path).
//! A queue holds at most [`MAX_ITEMS`]; beyond that the oldest item is
//! dropped with a warning.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::Host;
use crate::filter::worker::{RootEvent, RootTx};

/// Items kept per queue.
pub(crate) const MAX_ITEMS: usize = 10_000;

struct Queue {
    items: VecDeque<Bytes>,
    /// Root drivers of the VMs that registered the queue (latest last).
    owners: Vec<RootTx>,
}

#[derive(Default)]
struct Inner {
    next_id: u32,
    by_key: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

/// Every shared queue of the process.
#[derive(Default)]
pub(crate) struct SharedQueues {
    inner: Mutex<Inner>,
}

impl SharedQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, vm_id: &str, name: &str, owner: Option<RootTx>) -> u32 {
        let mut g = self.lock();
        let key = (vm_id.to_string(), name.to_string());
        let id = match g.by_key.get(&key) {
            Some(id) => *id,
            None => {
                g.next_id = g.next_id.wrapping_add(1).max(1);
                let id = g.next_id;
                g.by_key.insert(key, id);
                g.queues.insert(
                    id,
                    Queue {
                        items: VecDeque::new(),
                        owners: Vec::new(),
                    },
                );
                id
            }
        };
        if let (Some(q), Some(owner)) = (g.queues.get_mut(&id), owner) {
            q.owners
                .retain(|tx| !tx.is_closed() && !tx.same_channel(&owner));
            q.owners.push(owner);
        }
        id
    }

    pub(crate) fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.lock()
            .by_key
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// `Err(())` if the queue does not exist.
    pub(crate) fn enqueue(&self, id: u32, value: Bytes) -> Result<(), ()> {
        let mut g = self.lock();
        let q = g.queues.get_mut(&id).ok_or(())?;
        if q.items.len() >= MAX_ITEMS {
            q.items.pop_front();
            tracing::warn!(queue = id, "shared queue full; dropped its oldest item");
        }
        q.items.push_back(value);
        // Wake the most recent registrant that is still alive.
        while let Some(tx) = q.owners.last() {
            if tx.send(RootEvent::QueueReady(id)).is_ok() {
                break;
            }
            q.owners.pop();
        }
        Ok(())
    }

    /// `Err(())` if the queue does not exist; `Ok(None)` if it is empty.
    pub(crate) fn dequeue(&self, id: u32) -> Result<Option<Bytes>, ()> {
        let mut g = self.lock();
        let q = g.queues.get_mut(&id).ok_or(())?;
        Ok(q.items.pop_front())
    }
}

pub(crate) fn register(c: &mut Caller<'_, Host>, np: i32, nl: i32, id_out: i32) -> HostResult {
    let name = match memory::read_str(c, np, nl) {
        Ok(n) => n,
        Err(s) => return Ok(s),
    };
    let h = c.data();
    let id = h
        .plugin
        .queues
        .register(&h.plugin.name, &name, h.root_tx.clone());
    Ok(match memory::write_u32(c, id_out, id) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn resolve(
    c: &mut Caller<'_, Host>,
    vp: i32,
    vl: i32,
    np: i32,
    nl: i32,
    id_out: i32,
) -> HostResult {
    let (vm_id, name) = match (memory::read_str(c, vp, vl), memory::read_str(c, np, nl)) {
        (Ok(v), Ok(n)) => (v, n),
        (Err(s), _) | (_, Err(s)) => return Ok(s),
    };
    // An empty VM id means "this filter".
    let vm_id = if vm_id.is_empty() {
        c.data().plugin.name.to_string()
    } else {
        vm_id
    };
    let Some(id) = c.data().plugin.queues.resolve(&vm_id, &name) else {
        return Ok(Status::NotFound);
    };
    Ok(match memory::write_u32(c, id_out, id) {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

pub(crate) fn enqueue(c: &mut Caller<'_, Host>, id: i32, vp: i32, vl: i32) -> HostResult {
    let value = match memory::read(c, vp, vl) {
        Ok(v) => Bytes::from(v),
        Err(s) => return Ok(s),
    };
    Ok(match c.data().plugin.queues.enqueue(id as u32, value) {
        Ok(()) => Status::Ok,
        Err(()) => Status::NotFound,
    })
}

pub(crate) fn dequeue(c: &mut Caller<'_, Host>, id: i32, ptr_out: i32, len_out: i32) -> HostResult {
    match c.data().plugin.queues.dequeue(id as u32) {
        Ok(Some(v)) => copy_out(c, &v, ptr_out, len_out),
        Ok(None) => Ok(Status::Empty),
        Err(()) => Ok(Status::NotFound),
    }
}
