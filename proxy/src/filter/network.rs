//! [`NetworkFilters`]: one TCP connection's pass through a pipeline of
//! Proxy-Wasm network filters (the ABI's stream side, what the community
//! SDK calls a `StreamContext`).
//!
//! `proxy_on_new_connection` runs once per filter as soon as the client is
//! accepted, before any upstream connection exists (the caller, `l4`, also
//! runs the client's first chunk through the filters before it connects,
//! as Envoy's `receive_before_connect` does), so a filter that denies a
//! connection means the upstream never sees a connect; each chunk read from the client goes through
//! `proxy_on_downstream_data` in pipeline order, each chunk from the
//! upstream through `proxy_on_upstream_data` in reverse order (as Envoy runs
//! read and write filters). During a data callback the chunk is the
//! `DownstreamData` / `UpstreamData` buffer, which the filter may read and
//! rewrite. PAUSE holds the bytes (that filter sees them again, with what
//! arrives next, until it continues or the side ends; each filter's held
//! buffer is capped by its own `max_body_bytes`). What arrives next still
//! runs through the filters before the paused one first, as in Envoy, so a
//! buffering filter is no way past an inspecting one before it (the same
//! rule as the HTTP body chain in `stream`). `proxy_close_stream` closes
//! the connection.
//! The end of each side is `proxy_on_downstream_connection_close` /
//! `proxy_on_upstream_connection_close`, then `proxy_on_log`,
//! `proxy_on_done`, `proxy_on_delete`.
//!
//! Isolation as for HTTP: each filter's instance is leased from the worker
//! pool for the connection (built off the connection's path), a failure
//! discards that instance and applies the filter's policy to this
//! connection only (`closed`: the connection is closed; `open`: the filter
//! is skipped from then on). Runs on the worker that accepted the
//! connection; callbacks are synchronous and no instance is borrowed across
//! an await. `http_call` answers go to the filter's root context.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::host::{Dir, StreamData};
use super::set::FilterSet;
use super::vm::{Callback, Failure};
use super::worker::{self, spawn_callout, Deliver, InstanceRef};
use super::{FailPolicy, StreamInfo};

/// What to do with a chunk after the filters saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum NetVerdict {
    /// Send these bytes on (possibly rewritten, possibly empty).
    Forward(Bytes),
    /// A filter paused: nothing goes on yet.
    Hold,
    /// Close the connection (a filter asked, or failed under `fail = "closed"`).
    Close(Closed),
}

/// Why the filters closed a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub why: String,
    /// A filter failed (under `fail = "closed"`), rather than asked to close.
    pub failed: bool,
}

/// Which side a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From the client (downstream data).
    Downstream,
    /// From the upstream.
    Upstream,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    idx: usize,
    ctx: u32,
    incarnation: u64,
    skipped: bool,
}

/// Per-connection filter state.
pub struct NetworkFilters {
    set: Arc<FilterSet>,
    slots: Vec<Slot>,
    data: Option<Box<StreamData>>,
    /// Bytes filters paused on to buffer, per side (downstream, upstream),
    /// by step in that side's order. Empty until a filter first pauses, so
    /// a connection where none does allocates nothing for it. Data only
    /// moves forward, so a buffer only ever holds bytes newer than any
    /// buffer at a later step; each buffer is capped by its own filter's
    /// `max_body_bytes`.
    held: [Vec<Option<BytesMut>>; 2],
    finished: bool,
}

impl std::fmt::Debug for NetworkFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkFilters")
            .field("set", &self.set.id)
            .field("filters", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// A callback's meaning for the chain.
enum Step {
    Go { pause: bool, resumed: bool },
    Close(Closed),
}

impl NetworkFilters {
    pub(crate) fn new(set: Arc<FilterSet>, idx: Vec<usize>, info: StreamInfo) -> Self {
        let data = (!idx.is_empty()).then(|| Box::new(StreamData::new(info)));
        NetworkFilters {
            set,
            slots: idx
                .into_iter()
                .map(|idx| Slot {
                    idx,
                    ctx: 0,
                    incarnation: 0,
                    skipped: false,
                })
                .collect(),
            data,
            held: Default::default(),
            finished: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn name(&self, pos: usize) -> Arc<str> {
        self.slots
            .get(pos)
            .and_then(|s| self.set.plugins.get(s.idx))
            .map(|p| p.name().clone())
            .unwrap_or_else(|| Arc::from("?"))
    }

    fn max_held(&self, pos: usize) -> u64 {
        self.slots
            .get(pos)
            .and_then(|s| self.set.plugins.get(s.idx))
            .map(|p| p.spec.max_body_bytes)
            .unwrap_or(u64::MAX)
    }

    fn fail(&mut self, pos: usize, why: &Failure) -> Step {
        let name = self.name(pos);
        let policy = self
            .slots
            .get(pos)
            .and_then(|s| self.set.plugins.get(s.idx))
            .map(|p| p.fail_policy())
            .unwrap_or_default();
        match policy {
            FailPolicy::Closed => {
                tracing::debug!(filter = %name, error = %why, "network filter failed; closing the connection (fail = closed)");
                Step::Close(Closed {
                    why: format!("filter \"{name}\" failed: {why}"),
                    failed: true,
                })
            }
            FailPolicy::Open => {
                tracing::debug!(filter = %name, error = %why, "network filter failed; skipping it (fail = open)");
                if let Some(s) = self.slots.get_mut(pos) {
                    s.skipped = true;
                }
                Step::Go {
                    pause: false,
                    resumed: false,
                }
            }
        }
    }

    fn instance(&self, pos: usize) -> Option<InstanceRef> {
        let slot = self.slots.get(pos)?;
        (slot.incarnation != 0).then_some(InstanceRef {
            set_id: self.set.id,
            idx: slot.idx,
            incarnation: slot.incarnation,
        })
    }

    fn run_one(&mut self, pos: usize, cb: Callback) -> Step {
        let go = Step::Go {
            pause: false,
            resumed: false,
        };
        let Some(slot) = self.slots.get(pos).copied() else {
            return go;
        };
        if slot.skipped {
            return go;
        }
        let (mut incarnation, mut ctx) = (slot.incarnation, slot.ctx);
        let r = worker::run_held(
            &self.set,
            slot.idx,
            &mut incarnation,
            &mut ctx,
            &mut self.data,
            cb,
        );
        if let Some(s) = self.slots.get_mut(pos) {
            s.incarnation = incarnation;
            s.ctx = ctx;
        }
        let (at, out) = match r {
            Ok(v) => v,
            Err(f) => return self.fail(pos, &f),
        };
        for c in out.callouts {
            spawn_callout(c, Deliver::Instance(at));
        }
        if out.actions.close {
            return Step::Close(Closed {
                why: format!("filter \"{}\" closed the connection", self.name(pos)),
                failed: false,
            });
        }
        Step::Go {
            pause: out.pause,
            resumed: out.actions.continue_request || out.actions.continue_response,
        }
    }

    /// Leases every filter's instance (waiting, bounded, for one being
    /// built) and runs `proxy_on_new_connection`. `Ok(true)`: some filter
    /// paused (the caller waits for the client's first bytes before it
    /// connects upstream).
    pub async fn new_connection(&mut self) -> Result<bool, Closed> {
        let mut paused = false;
        for pos in 0..self.slots.len() {
            let Some(slot) = self.slots.get(pos).copied() else {
                continue;
            };
            if slot.incarnation == 0 && !slot.skipped {
                match worker::lease(&self.set, slot.idx).await {
                    Ok(inc) => {
                        if let Some(s) = self.slots.get_mut(pos) {
                            s.incarnation = inc;
                        }
                    }
                    Err(f) => {
                        if let Step::Close(why) = self.fail(pos, &f) {
                            return Err(why);
                        }
                        continue;
                    }
                }
            }
            match self.run_one(pos, Callback::NewConnection) {
                Step::Close(closed) => return Err(closed),
                Step::Go { pause, resumed } => paused |= pause && !resumed,
            }
        }
        Ok(paused)
    }

    /// One chunk from `side` (empty with `eos` at that side's end) through
    /// the filters. The chunk runs through every position before a held
    /// one (a buffering filter does not hide later chunks from the filters
    /// before it); reaching a held position it joins that buffer and the
    /// filter is called with all of it.
    pub fn data(&mut self, side: Side, chunk: &[u8], eos: bool) -> NetVerdict {
        let n = self.slots.len();
        if n == 0 {
            return NetVerdict::Forward(Bytes::copy_from_slice(chunk));
        }
        let (dir, which) = match side {
            Side::Downstream => (Dir::Request, 0),
            Side::Upstream => (Dir::Response, 1),
        };
        let mut buf = Bytes::copy_from_slice(chunk);
        for k in 0..n {
            let pos = match dir {
                Dir::Request => k,
                Dir::Response => n - 1 - k,
            };
            let held = self
                .held
                .get_mut(which)
                .and_then(|h| h.get_mut(k))
                .and_then(Option::take);
            if let Some(mut held) = held {
                let total = (held.len() as u64).saturating_add(buf.len() as u64);
                if total > self.max_held(pos) {
                    return self.over_limit(pos);
                }
                if !held.is_empty() {
                    held.extend_from_slice(&buf);
                    buf = held.freeze();
                }
            }
            let size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            if let Some(d) = self.data.as_deref_mut() {
                d.body = std::mem::take(&mut buf);
                d.body_dir = Some(dir);
            }
            let cb = match side {
                Side::Downstream => Callback::DownstreamData { size, eos },
                Side::Upstream => Callback::UpstreamData { size, eos },
            };
            let step = self.run_one(pos, cb);
            if let Some(d) = self.data.as_deref_mut() {
                buf = std::mem::take(&mut d.body);
                d.body_dir = None;
            }
            match step {
                Step::Close(why) => return NetVerdict::Close(why),
                Step::Go { pause, resumed } => {
                    if pause && !resumed && !eos {
                        if buf.len() as u64 > self.max_held(pos) {
                            return self.over_limit(pos);
                        }
                        // Sized once per connection and side, at the first
                        // pause: a connection where no filter pauses
                        // allocates nothing here.
                        if let Some(held) = self.held.get_mut(which) {
                            if held.len() < n {
                                held.resize_with(n, || None);
                            }
                            if let Some(h) = held.get_mut(k) {
                                // No copy when nothing else shares the bytes.
                                *h = Some(BytesMut::from(buf));
                                return NetVerdict::Hold;
                            }
                        }
                        // Unreachable (`k < n`): pass the bytes on rather
                        // than lose them.
                    }
                }
            }
        }
        NetVerdict::Forward(buf)
    }

    /// The bytes held for filter `pos` passed its limit.
    fn over_limit(&self, pos: usize) -> NetVerdict {
        NetVerdict::Close(Closed {
            why: format!(
                "bytes held for filter \"{}\" exceed its limit",
                self.name(pos)
            ),
            failed: false,
        })
    }

    /// `side` has ended: its connection-close callback on every filter.
    pub fn side_closed(&mut self, side: Side) {
        for pos in 0..self.slots.len() {
            let cb = match side {
                Side::Downstream => Callback::DownstreamClose { peer: 2 },
                Side::Upstream => Callback::UpstreamClose { peer: 2 },
            };
            if self.slots.get(pos).is_some_and(|s| s.ctx != 0) {
                let _ = self.run_one(pos, cb);
            }
        }
    }

    /// `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`, and the
    /// instances go back to the pool.
    pub fn finish(mut self) {
        self.release(true);
    }

    fn release(&mut self, log: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        for pos in 0..self.slots.len() {
            let Some(slot) = self.slots.get(pos).copied() else {
                continue;
            };
            let Some(at) = self.instance(pos) else {
                continue;
            };
            let data = &mut self.data;
            // One look-up ends the contexts and gives the instance back (a
            // slot that never got a context only gives it back).
            let r = worker::finish_lease(at, |vm| {
                if slot.ctx != 0 {
                    vm.end_context(slot.ctx, data, log && !slot.skipped)?;
                }
                Ok(())
            });
            if let Err(f) = r {
                tracing::debug!(filter = %self.name(pos), error = %f, "network filter failed while ending a connection");
            }
        }
    }
}

impl Drop for NetworkFilters {
    fn drop(&mut self) {
        self.release(false);
    }
}
