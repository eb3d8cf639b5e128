//! Shared queues (`proxy_register_shared_queue`, `proxy_resolve_shared_queue`,
//! `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`): process-wide
//! FIFO queues keyed by (VM id, name), where a filter's VM id is its name.
//! An enqueue wakes one registrant with `proxy_on_queue_ready` on its own
//! worker (through that VM's root driver).
//!
//! Called from worker threads inside host calls; one mutex guards the
//! registry (queues are a cross-worker hand-off, not a per-request path).
//! A queue holds at most `limits.queue_depth` items and
//! `limits.queue_bytes` bytes of its owner (the filter that registered it);
//! beyond, the oldest items are dropped (counted, and logged rate-limited).
//! A filter registers at most `limits.queues` queues.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::{fail_request, note_limit, Status};
use crate::filter::host::Host;
use crate::filter::metrics::{FilterStats, Limit};
use crate::filter::HostLimits;

/// Longest queue or VM id name read from the guest.
const MAX_QUEUE_NAME: usize = 1024;
use crate::filter::worker::{RootEvent, RootTx};

struct Queue {
    items: VecDeque<Bytes>,
    /// Bytes of `items`.
    bytes: usize,
    /// Caps of the owner, and where to count what they drop.
    depth: usize,
    max_bytes: usize,
    owner_stats: Arc<FilterStats>,
    owner_name: Arc<str>,
    /// Root drivers of the VMs that registered the queue (latest last).
    owners: Vec<RootTx>,
    /// A wake-up is on its way to the owner and not yet delivered: one
    /// per queue is enough (the guest drains what is there), so a filter
    /// enqueueing per request cannot flood the owner's channel.
    wake_pending: bool,
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

    /// Registers (or finds) queue `name` of filter `vm_id`; `None` if the
    /// filter already has `limits.queues` others.
    pub(crate) fn register(
        &self,
        vm_id: &Arc<str>,
        name: &str,
        owner: Option<RootTx>,
        limits: &HostLimits,
        stats: &Arc<FilterStats>,
    ) -> Option<u32> {
        let mut g = self.lock();
        let key = (vm_id.to_string(), name.to_string());
        let id = match g.by_key.get(&key) {
            Some(id) => *id,
            None => {
                let mine = g.by_key.keys().filter(|(v, _)| **v == **vm_id).count();
                if mine >= limits.queues {
                    return None;
                }
                g.next_id = g.next_id.wrapping_add(1).max(1);
                let id = g.next_id;
                g.by_key.insert(key, id);
                g.queues.insert(
                    id,
                    Queue {
                        items: VecDeque::new(),
                        bytes: 0,
                        depth: limits.queue_depth,
                        max_bytes: limits.queue_bytes,
                        owner_stats: stats.clone(),
                        owner_name: vm_id.clone(),
                        owners: Vec::new(),
                        wake_pending: false,
                    },
                );
                id
            }
        };
        if let Some(q) = g.queues.get_mut(&id) {
            // The latest generation's limits apply.
            q.depth = limits.queue_depth;
            q.max_bytes = limits.queue_bytes;
            if let Some(owner) = owner {
                q.owners
                    .retain(|tx| !tx.is_closed() && !tx.same_channel(&owner));
                q.owners.push(owner);
                // A wake-up pending on an owner that is gone is lost: the
                // new owner must hear about the next item.
                q.wake_pending = false;
            }
        }
        Some(id)
    }

    pub(crate) fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.lock()
            .by_key
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// `Err(())` if the queue does not exist. Beyond the owner's depth or
    /// bytes the oldest items are dropped (an item bigger than the whole
    /// queue is dropped itself).
    pub(crate) fn enqueue(&self, id: u32, value: Bytes) -> Result<(), ()> {
        let mut g = self.lock();
        let q = g.queues.get_mut(&id).ok_or(())?;
        let mut dropped = 0usize;
        let mut limit = Limit::QueueDepth;
        if value.len() > q.max_bytes {
            dropped += 1;
            limit = Limit::QueueBytes;
        } else {
            while q.items.len() >= q.depth.max(1)
                || q.bytes.saturating_add(value.len()) > q.max_bytes
            {
                if q.items.len() < q.depth.max(1) {
                    limit = Limit::QueueBytes;
                }
                let Some(old) = q.items.pop_front() else {
                    break;
                };
                q.bytes = q.bytes.saturating_sub(old.len());
                dropped += 1;
            }
            q.bytes = q.bytes.saturating_add(value.len());
            q.items.push_back(value);
        }
        if dropped > 0 {
            let detail = format!(
                "shared queue {id} full ({} items, {} bytes): dropped {dropped} item(s)",
                q.depth, q.max_bytes
            );
            q.owner_stats.limit_exceeded(&q.owner_name, limit, &detail);
        }
        // Wake the most recent registrant that is still alive, unless a
        // wake-up is already on its way.
        // A pending wake-up whose owner has gone is lost with its channel.
        if q.owners.last().is_some_and(|tx| tx.is_closed()) {
            q.wake_pending = false;
        }
        if !q.wake_pending {
            while let Some(tx) = q.owners.last() {
                if tx.send(RootEvent::QueueReady(id)).is_ok() {
                    q.wake_pending = true;
                    break;
                }
                q.owners.pop();
            }
        }
        Ok(())
    }

    /// The owner is about to run `proxy_on_queue_ready` for `id`: items
    /// enqueued from now on wake it again.
    pub(crate) fn woken(&self, id: u32) {
        if let Some(q) = self.lock().queues.get_mut(&id) {
            q.wake_pending = false;
        }
    }

    /// `Err(())` if the queue does not exist; `Ok(None)` if it is empty.
    pub(crate) fn dequeue(&self, id: u32) -> Result<Option<Bytes>, ()> {
        let mut g = self.lock();
        let q = g.queues.get_mut(&id).ok_or(())?;
        let item = q.items.pop_front();
        if let Some(v) = &item {
            q.bytes = q.bytes.saturating_sub(v.len());
        }
        Ok(item)
    }
}

/// `proxy_register_shared_queue`: the SDK accepts only OK here, so a
/// filter registering more than `limits.queues` queues fails the request
/// (or, at start-up, the load) by its policy.
pub(crate) fn register(c: &mut Caller<'_, Host>, np: i32, nl: i32, id_out: i32) -> HostResult {
    let name = match memory::read_at_most(c, np, nl, MAX_QUEUE_NAME) {
        Ok(Some(n)) => String::from_utf8_lossy(&n).into_owned(),
        Ok(None) => return Err(fail_request(c, Limit::Queues, "a queue name over 1 KiB")),
        Err(s) => return Ok(s),
    };
    let h = c.data();
    let p = &h.plugin;
    // Wake-ups run on root 1: a per-route root's queue is registered (its
    // id works) but does not wake this VM's root driver.
    let wake = if h.effective != h.root_id && h.is_root(h.effective) {
        tracing::debug!(filter = %p.name, queue = %name, "a per-route root context registered a shared queue: no on_queue_ready for it");
        None
    } else {
        h.root_tx.clone()
    };
    let Some(id) = p.queues.register(&p.name, &name, wake, &p.limits, &p.stats) else {
        let detail = format!("registering more than {} shared queues", p.limits.queues);
        return Err(fail_request(c, Limit::Queues, &detail));
    };
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
    let read = |c: &mut Caller<'_, Host>, p, l| {
        memory::read_at_most(c, p, l, MAX_QUEUE_NAME)
            .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let (vm_id, name) = match (read(c, vp, vl), read(c, np, nl)) {
        (Ok(Some(v)), Ok(Some(n))) => (v, n),
        (Err(s), _) | (_, Err(s)) => return Ok(s),
        _ => return Ok(Status::NotFound),
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
    // An item bigger than a whole queue is dropped unread.
    let max = c.data().plugin.limits.queue_bytes;
    let value = match memory::read_at_most(c, vp, vl, max) {
        Ok(Some(v)) => Bytes::from(v),
        Ok(None) => {
            let detail = format!("a shared queue item of {} bytes was dropped", vl as u32);
            note_limit(c, Limit::QueueBytes, &detail);
            return Ok(Status::Ok);
        }
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

#[cfg(test)]
mod unit {
    use super::*;

    /// A thousand enqueues wake the owner once; after it is woken, the
    /// next item wakes it again; a new owner is woken even if the old one
    /// died with a wake-up pending.
    #[test]
    fn wake_ups_are_coalesced_per_queue() {
        let q = SharedQueues::default();
        let stats = Arc::new(FilterStats::default());
        let limits = HostLimits::default();
        let f: Arc<str> = Arc::from("f");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = q.register(&f, "a", Some(tx), &limits, &stats).unwrap();
        for _ in 0..1000 {
            q.enqueue(id, Bytes::from_static(b"x")).unwrap();
        }
        let mut events = 0;
        while rx.try_recv().is_ok() {
            events += 1;
        }
        assert_eq!(events, 1);
        q.woken(id);
        q.enqueue(id, Bytes::from_static(b"y")).unwrap();
        assert!(rx.try_recv().is_ok(), "woken again after delivery");
        // The owner dies with that wake-up pending; a new one registers.
        drop(rx);
        let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
        q.register(&f, "a", Some(tx2), &limits, &stats).unwrap();
        q.enqueue(id, Bytes::from_static(b"z")).unwrap();
        assert!(
            rx2.try_recv().is_ok(),
            "the new owner hears of the next item"
        );
    }

    #[test]
    fn queues_are_capped_in_count_depth_and_bytes() {
        let q = SharedQueues::default();
        let stats = Arc::new(FilterStats::default());
        let limits = HostLimits {
            queues: 2,
            queue_depth: 3,
            queue_bytes: 10,
            ..HostLimits::default()
        };
        let f: Arc<str> = Arc::from("f");
        let a = q.register(&f, "a", None, &limits, &stats).unwrap();
        assert_eq!(q.register(&f, "a", None, &limits, &stats), Some(a));
        q.register(&f, "b", None, &limits, &stats).unwrap();
        assert_eq!(q.register(&f, "c", None, &limits, &stats), None);
        // Another filter has its own count.
        assert!(q
            .register(&Arc::from("g"), "c", None, &limits, &stats)
            .is_some());

        for i in 0..5u8 {
            q.enqueue(a, Bytes::from(vec![i])).unwrap();
        }
        // Depth 3: the two oldest were dropped.
        assert_eq!(q.dequeue(a).unwrap().as_deref(), Some(&[2u8][..]));
        assert_eq!(stats.limit_count(Limit::QueueDepth), 2);
        // Bytes 10: a 9-byte item pushes out the oldest of [3], [4].
        q.enqueue(a, Bytes::from(vec![9; 9])).unwrap();
        assert_eq!(q.dequeue(a).unwrap().as_deref(), Some(&[4u8][..]));
        assert_eq!(q.dequeue(a).unwrap().map(|b| b.len()), Some(9));
        assert_eq!(q.dequeue(a).unwrap(), None);
        assert!(stats.limit_count(Limit::QueueBytes) >= 1);
        // An item bigger than the whole queue is dropped itself.
        q.enqueue(a, Bytes::from(vec![0; 11])).unwrap();
        assert_eq!(q.dequeue(a).unwrap(), None);
    }
}
